"""Filters used by tests/test_filters_e2e.py.

Each sync filter that a test also runs as ``async def`` has an ``Async<Name>`` twin
made by :func:`asyncified`: the same hooks, awaited after yielding to the loop once.
What the filters observe goes either to the upstream (request headers), back to the
client (response headers) or into module-level records read by the tests: the tests
run envoyx in-process, so they share this module with the proxy.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from envoyx.filters import _HOOK_NAMES, Filter, Headers, LocalReply, LogEntry, RequestContext

# Every hook, as the runtime knows them: a hook added there is asyncified here too.
HOOKS = _HOOK_NAMES


def asyncified(cls: type[Filter]) -> type[Filter]:
    """A subclass of ``cls`` whose overridden hooks are ``async def``."""
    namespace: dict[str, Any] = {"__module__": __name__, "__doc__": f"async {cls.__name__}"}
    for name in HOOKS:
        if name in cls.__dict__:
            namespace[name] = _async_hook(cls.__dict__[name])
    return type(f"Async{cls.__name__}", (cls,), namespace)


def _async_hook(sync: Callable[..., Any]) -> Callable[..., Any]:
    async def hook(self: Filter, *args: Any) -> Any:
        await asyncio.sleep(0)  # really suspend: the rest runs as a later loop step
        return sync(self, *args)

    hook.__name__ = sync.__name__
    return hook


# -- records shared with the tests -----------------------------------------------------


class Records:
    """Thread-safe records keyed by a request id the test chooses."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, list[Any]] = {}

    def add(self, key: str | None, item: Any) -> None:
        with self._lock:
            self._items.setdefault(key or "", []).append(item)

    def get(self, key: str) -> list[Any]:
        with self._lock:
            return list(self._items.get(key, []))


class Gates:
    """Hold points for :class:`Blocker`: ``entered(token)`` once a hook waits on it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entered: dict[str, threading.Event] = {}
        self._released: dict[str, threading.Event] = {}

    def _event(self, table: dict[str, threading.Event], token: str) -> threading.Event:
        with self._lock:
            return table.setdefault(token, threading.Event())

    def wait(self, token: str, timeout: float) -> bool:
        self._event(self._entered, token).set()
        return self._event(self._released, token).wait(timeout)

    def entered(self, token: str) -> bool:
        return self._event(self._entered, token).is_set()

    def release(self, token: str) -> None:
        self._event(self._released, token).set()


LOGS = Records()  # x-log-id -> [(LogEntry, state)]
CANCELLED = Records()  # x-sleep-id -> [True] when an async hook was cancelled
PROBES = Records()  # x-probe -> [the context's fields]
SLEPT = Records()  # x-sleep-id -> [True] when a sync sleep returned
GATES = Gates()


# -- request headers -------------------------------------------------------------------


class HeaderEdit(Filter):
    """Replaces, appends and removes request headers; reads them back through the map."""

    def on_request_headers(self, ctx: RequestContext) -> None:
        h = ctx.request_headers
        h["X-Replaced"] = "new"  # names are case-insensitive
        h.add("x-multi", "two")
        del h["x-remove"]
        h["x-added"] = ",".join(h.get_all("x-multi"))
        h["x-seen-get"] = h.get("X-Client", "none")
        h["x-remove-gone"] = str("x-remove" not in h)
        h["x-pseudo-in-map"] = str(any(name.startswith(":") for name, _ in h.items()))


AsyncHeaderEdit = asyncified(HeaderEdit)


class DenyLocalReply(Filter):
    """``x-deny`` gets a local reply; otherwise a response hook marks the response."""

    def on_request_headers(self, ctx: RequestContext) -> LocalReply | None:
        if ctx.request_headers.get("x-deny") is not None:
            return LocalReply(403, body=b"denied\n", headers={"x-denied-by": "python"})
        return None

    def on_response_headers(self, ctx: RequestContext) -> None:
        assert ctx.response_headers is not None
        ctx.response_headers["x-response-hook"] = "ran"


AsyncDenyLocalReply = asyncified(DenyLocalReply)


# -- bodies and trailers ---------------------------------------------------------------


class BodyEdit(Filter):
    """``x-body-op: replace|append`` rewrites the request body."""

    def on_request_body(self, ctx: RequestContext, body: bytes) -> bytes | None:
        op = ctx.request_headers.get("x-body-op")
        if op == "replace":
            return b"replaced:" + str(len(body)).encode()
        if op == "append":
            return body + b"+appended"
        return None


AsyncBodyEdit = asyncified(BodyEdit)


class RequestTrailers(Filter):
    """Edits request trailers; reports those it saw in a response header."""

    def on_request_trailers(self, ctx: RequestContext, trailers: Headers) -> LocalReply | None:
        ctx.state["trailers"] = sorted(trailers.items())
        if trailers.get("x-deny-trailer") is not None:
            return LocalReply(403, body=b"trailer denied")
        trailers["x-t"] = "modified-" + (trailers.get("x-t") or "")
        trailers["x-trailer-added"] = "py"
        return None

    def on_response_headers(self, ctx: RequestContext) -> None:
        assert ctx.response_headers is not None
        ctx.response_headers["x-seen-trailers"] = json.dumps(ctx.state.get("trailers"))


AsyncRequestTrailers = asyncified(RequestTrailers)


class ResponseHeaderEdit(Filter):
    """Edits response headers; an upstream status of 203 gets the response replaced."""

    def on_response_headers(self, ctx: RequestContext) -> LocalReply | None:
        h = ctx.response_headers
        assert h is not None
        if ctx.status == 203:
            return LocalReply(418, body=b"replaced by python", headers={"x-replaced": "yes"})
        h["x-status-seen"] = str(ctx.status)
        del h["x-upstream"]
        h.add("x-resp-multi", "a")
        h.add("x-resp-multi", "b")
        return None


AsyncResponseHeaderEdit = asyncified(ResponseHeaderEdit)


class ResponseBodyEdit(Filter):
    """Replaces the response body when the upstream answered 201, appends on 202."""

    def on_response_body(self, ctx: RequestContext, body: bytes) -> bytes | None:
        if ctx.status == 201:
            return b"new response body"
        if ctx.status == 202:
            return body + b"<tail>"
        return None


AsyncResponseBodyEdit = asyncified(ResponseBodyEdit)


class RequestHeadersInResponse(Filter):
    """Only response hooks: reads the request's ``x-probe`` header in each."""

    def on_response_headers(self, ctx: RequestContext) -> None:
        assert ctx.response_headers is not None
        ctx.response_headers["x-probe-seen"] = ctx.request_headers.get("x-probe", "missing")

    def on_response_body(self, ctx: RequestContext, body: bytes) -> bytes:
        return b"x-probe=" + ctx.request_headers.get("x-probe", "missing").encode()


class ResponseTrailers(Filter):
    """Edits response trailers (a gRPC call's ``grpc-status`` is among them)."""

    def on_response_trailers(self, ctx: RequestContext, trailers: Headers) -> None:
        trailers["x-trailer"] = "py:" + (trailers.get("x-trailer") or "")
        trailers["x-py-trailer"] = "added"
        trailers["x-seen-grpc-status"] = trailers.get("grpc-status") or "none"


AsyncResponseTrailers = asyncified(ResponseTrailers)


# -- on_log, chains, context, clusters, config -----------------------------------------


class LogRecorder(Filter):
    """Records every finished request's LogEntry under its ``x-log-id``."""

    def on_log(self, ctx: RequestContext, entry: LogEntry) -> None:
        LOGS.add(ctx.request_headers.get("x-log-id"), (entry, dict(ctx.state)))


AsyncLogRecorder = asyncified(LogRecorder)


class Order(Filter):
    """Appends its ``tag`` to shared state in each hook; ``x-stop-at: <tag>`` replies."""

    def on_request_headers(self, ctx: RequestContext) -> LocalReply | None:
        tag = self.config["tag"]
        order = ctx.state.setdefault("request", [])
        order.append(tag)
        ctx.request_headers["x-request-order"] = ",".join(order)
        if ctx.request_headers.get("x-stop-at") == tag:
            return LocalReply(429, body=",".join(order).encode())
        return None

    def on_response_headers(self, ctx: RequestContext) -> None:
        assert ctx.response_headers is not None
        tag = self.config["tag"]
        order = ctx.state.setdefault("response", [])
        order.append(tag)
        ctx.response_headers["x-response-order"] = ",".join(order)
        ctx.response_headers[f"x-request-state-at-{tag}"] = ",".join(ctx.state["request"])


class ContextProbe(Filter):
    """Records the context's fields under ``x-probe`` (also sent upstream in ``x-ctx``)."""

    def on_request_headers(self, ctx: RequestContext) -> None:
        fields = {
            "method": ctx.method,
            "path": ctx.path,
            "authority": ctx.authority,
            "scheme": ctx.scheme,
            "downstream_address": ctx.downstream_address,
            "downstream_peer_identity": ctx.downstream_peer_identity,
            "route_name": ctx.route_name,
            "cluster": ctx.cluster,
            "status": ctx.status,
            "response_headers_is_none": ctx.response_headers is None,
            "config": ctx.config,
        }
        PROBES.add(ctx.request_headers.get("x-probe"), fields)
        ctx.request_headers["x-ctx"] = json.dumps(fields)
        ctx.state["probe"] = ctx.request_headers.get("x-probe")

    def on_response_headers(self, ctx: RequestContext) -> None:
        assert ctx.response_headers is not None
        ctx.response_headers["x-ctx-status"] = str(ctx.status)
        ctx.response_headers["x-ctx-request-header"] = ctx.request_headers.get("x-probe", "")
        ctx.response_headers["x-ctx-state"] = str(ctx.state.get("probe"))


class ClusterPicker(Filter):
    """``x-pick: <cluster>`` sends the request to that cluster."""

    def on_request_headers(self, ctx: RequestContext) -> None:
        ctx.request_headers["x-cluster-before"] = str(ctx.cluster)
        pick = ctx.request_headers.get("x-pick")
        if pick is not None:
            ctx.cluster = pick

    def on_response_headers(self, ctx: RequestContext) -> None:
        assert ctx.response_headers is not None
        ctx.response_headers["x-picked-cluster"] = str(ctx.cluster)


class ConfigEcho(Filter):
    """Sends ``ctx.config`` and ``self.config`` to the upstream, under its own name."""

    def on_request_headers(self, ctx: RequestContext) -> None:
        ctx.request_headers[f"x-config-{self.name}"] = json.dumps(ctx.config, sort_keys=True)
        ctx.request_headers[f"x-self-config-{self.name}"] = json.dumps(self.config, sort_keys=True)


class Counting(Filter):
    """Given to ``envoyx.Server(filters=...)``: counts its calls on the instance."""

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.calls = 0

    def on_request_headers(self, ctx: RequestContext) -> None:
        self.calls += 1
        ctx.request_headers["x-object-config"] = json.dumps(ctx.config, sort_keys=True)
        ctx.request_headers["x-object-calls"] = str(self.calls)


class NotAFilter:
    """Has the hook names but does not derive from Filter."""

    def __init__(self, config: Any = None) -> None:
        self.config = config

    def on_request_headers(self, ctx: RequestContext) -> None:
        return None


# -- failures --------------------------------------------------------------------------


class Raiser(Filter):
    """``x-raise: request|response`` raises in that phase's headers hook."""

    def on_request_headers(self, ctx: RequestContext) -> None:
        if ctx.request_headers.get("x-raise") == "request":
            raise RuntimeError("raised on purpose in on_request_headers")

    def on_response_headers(self, ctx: RequestContext) -> None:
        if ctx.request_headers.get("x-raise") == "response":
            raise RuntimeError("raised on purpose in on_response_headers")


AsyncRaiser = asyncified(Raiser)


class AsyncSleeper(Filter):
    """Awaits ``x-sleep`` seconds; records its cancellation under ``x-sleep-id``."""

    async def on_request_headers(self, ctx: RequestContext) -> None:
        try:
            await asyncio.sleep(float(ctx.request_headers.get("x-sleep", "0")))
        except asyncio.CancelledError:
            CANCELLED.add(ctx.request_headers.get("x-sleep-id"), True)
            raise


class SyncSleeper(Filter):
    """Blocks the executor for ``x-sleep`` seconds; records its return under ``x-sleep-id``."""

    def on_request_headers(self, ctx: RequestContext) -> None:
        time.sleep(float(ctx.request_headers.get("x-sleep", "0")))
        SLEPT.add(ctx.request_headers.get("x-sleep-id"), True)


class Blocker(Filter):
    """Blocks the executor (sync) until the test releases ``x-block``'s token."""

    def on_request_headers(self, ctx: RequestContext) -> None:
        token = ctx.request_headers.get("x-block")
        if token is not None:
            GATES.wait(token, timeout=10)


class BodyBuffering(Filter):
    """Leaves bodies unchanged; its body hooks make envoyx buffer both bodies."""

    def on_request_body(self, ctx: RequestContext, body: bytes) -> None:
        return None

    def on_response_body(self, ctx: RequestContext, body: bytes) -> None:
        return None


# -- metrics ---------------------------------------------------------------------------


class MetricsFilter(Filter):
    """Counts requests by method, sets a gauge and records a histogram."""

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        # self.metrics is available from __init__ on (docs/filters.md).
        self.metrics.counter("filters.built").inc()
        self.get_requests = self.metrics.counter("x.y", tags={"method": "GET"})

    def on_request_headers(self, ctx: RequestContext) -> None:
        if ctx.method == "GET":
            self.get_requests.inc()  # a handle kept from __init__
        else:
            self.metrics.counter("x.y", tags={"method": ctx.method}).inc()
        self.metrics.gauge("queue.depth").set(7)
        self.metrics.histogram("lat.ms").record(12)
