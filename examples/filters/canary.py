"""Header- and cookie-based canary routing, as a Python filter.

A request that opts in — header ``x-canary: 1``, or cookie ``canary=1`` — goes to the
canary cluster (``ctx.cluster = "canary"``); every other request stays on the cluster
its route names. Nothing else about the request changes, and the upstream is chosen
after the filter, so retries, timeouts and stats are the canary cluster's.

Filter configuration (the TypedStruct's ``value.config``), every key optional::

    cluster: canary     # where opted-in requests go
    header: x-canary    # opt in with this header set to "1"; null: no header opt-in
    cookie: canary      # opt in with this cookie set to "1"; null: no cookie opt-in

A route's ``typed_per_filter_config`` replaces it for that route (``ctx.config``; keys
it leaves out take the defaults above), e.g. a checkout route that only an explicit
header opts in, never a lingering cookie; ``disabled: true`` keeps a route off the
canary entirely (health checks).

Metrics: ``canary.requests{cluster}`` counts the requests sent to a canary cluster,
the Prometheus series ``envoy_python_canary_requests{cluster="canary"}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from envoyx.filters import Counter, Filter, RequestContext

__all__ = ["CanaryRouter"]

DEFAULTS: Mapping[str, str | None] = {"cluster": "canary", "header": "x-canary", "cookie": "canary"}


class CanaryRouter(Filter):
    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config or {})
        self._counters: dict[str, Counter] = {}

    def on_request_headers(self, ctx: RequestContext) -> None:
        config: Mapping[str, Any] = ctx.config or {}
        header = config.get("header", DEFAULTS["header"])
        cookie = config.get("cookie", DEFAULTS["cookie"])
        headers = ctx.request_headers
        if (header is not None and headers.get(header) == "1") or (
            cookie is not None and _cookie(headers.get_all("cookie"), cookie) == "1"
        ):
            cluster = str(config.get("cluster", DEFAULTS["cluster"]))
            ctx.cluster = cluster
            self._counter(cluster).inc()

    def _counter(self, cluster: str) -> Counter:
        counter = self._counters.get(cluster)
        if counter is None:
            counter = self._counters[cluster] = self.metrics.counter(
                "canary.requests", tags={"cluster": cluster}
            )
        return counter


def _cookie(lines: list[str], name: str) -> str | None:
    """The value of cookie ``name`` in ``cookie`` header lines (HTTP/2 may split them)."""
    for line in lines:
        for pair in line.split(";"):
            key, sep, value = pair.strip().partition("=")
            if sep and key == name:
                return value.strip('"')
    return None
