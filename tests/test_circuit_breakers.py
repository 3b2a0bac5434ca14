"""Cluster circuit breakers (``circuit_breakers.thresholds``), end to end.

Every test takes ``start_proxy``: it runs against envoyx and, as a second
parametrization, against the real Envoy 1.40 with the same bootstrap (one worker unless said) and
the same expected values, so the numbers below are Envoy's.

The upstream holds a request (``x-test-hold``) until the test releases it, so the
requests in flight — and the circuit breakers' gauges while they are — are known
exactly: no timing guesses. Each request goes on its own downstream connection.

- HTTP/1.1, ``max_connections: 1``, ``max_pending_requests: 1``: one request holds
  the only connection, the next waits as pending, the rest get 503 ``UO`` with
  ``x-envoy-overloaded: true``; the pending one is served on the same connection once
  the first completes (no 503);
- HTTP/2, ``max_requests: 1``: a second concurrent request gets 503 ``UO``;
- two workers share one set of counts;
- a request pending behind ``max_connections`` times out with its route;
- no ``circuit_breakers``: Envoy's defaults (1024 connections), the ``*_open`` gauges
  of both priorities at 0 and no ``remaining_*`` gauges.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import httpx
import pytest

from support.bootstrap import bootstrap, cluster, http_listener, route, virtual_host
from support.proxy import ProxyProcess
from support.upstreams import H2cUpstream, HttpUpstream
from support.wait import free_port, until

StartProxy = Callable[..., ProxyProcess]
Json = dict[str, Any]

BACKEND = "backend"
OVERFLOW_BODY = "upstream connect error or disconnect/reset before headers. reset reason: overflow"
OPEN_GAUGES = ("cx_open", "cx_pool_open", "rq_pending_open", "rq_open", "rq_retry_open")
_tokens = itertools.count()


@pytest.fixture
def http1_upstream() -> Iterator[HttpUpstream]:
    up = HttpUpstream("cb").start()
    yield up
    up.stop()


@pytest.fixture
def h2_upstream() -> Iterator[H2cUpstream]:
    up = H2cUpstream("cb2").start()
    yield up
    up.stop()


def breaker_proxy(
    start: StartProxy,
    endpoint: tuple[str, int],
    breakers: Json | None,
    *,
    http2: bool = False,
    timeout: str | None = None,
) -> ProxyProcess:
    c = cluster(BACKEND, [endpoint], http2=http2)
    if breakers is not None:
        c["circuit_breakers"] = breakers
    routes = [route({"prefix": "/"}, cluster=BACKEND)]
    if timeout is not None:
        # /a without a timeout, the rest with `timeout`.
        routes.insert(0, route({"prefix": "/a"}, cluster=BACKEND))
        routes[0]["route"]["timeout"] = "0s"
        routes[1]["route"]["timeout"] = timeout
    bs = bootstrap(
        admin_port=free_port(),
        listeners=[
            http_listener(port=free_port(), virtual_hosts=[virtual_host("all", ["*"], routes)])
        ],
        clusters=[c],
    )
    return start(bs)


class InFlight:
    """A request sent on its own connection from a thread; its response once done."""

    def __init__(self, proxy: ProxyProcess, path: str, hold: bool) -> None:
        self.token = f"cb-{next(_tokens)}"
        headers = {"x-test-token": self.token}
        if hold:
            headers["x-test-hold"] = "1"
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                with httpx.Client(base_url=proxy.url(), timeout=20) as client:
                    self.response = client.get(path, headers=headers)
            except BaseException as exc:  # reported by result()
                self.error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self, timeout: float = 20.0) -> httpx.Response:
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        assert self.response is not None, "request did not finish"
        return self.response


def cluster_stats(proxy: ProxyProcess, names: list[str]) -> dict[str, int | None]:
    now = proxy.stats()
    return {n: now.get(f"cluster.{BACKEND}.{n}") for n in names}


def breaker_gauges(proxy: ProxyProcess, priority: str = "default") -> dict[str, int | None]:
    names = [f"circuit_breakers.{priority}.{g}" for g in OPEN_GAUGES]
    return {n.rsplit(".", 1)[1]: v for n, v in cluster_stats(proxy, names).items()}


def remaining_gauges(proxy: ProxyProcess, priority: str = "default") -> dict[str, int | None]:
    names = [
        f"circuit_breakers.{priority}.remaining_{r}" for r in ("cx", "pending", "rq", "retries")
    ]
    return {n.rsplit(".", 1)[1]: v for n, v in cluster_stats(proxy, names).items()}


def assert_overflow_reply(resp: httpx.Response) -> None:
    assert resp.status_code == 503, resp.text
    assert resp.headers.get("x-envoy-overloaded") == "true", dict(resp.headers)
    assert resp.text == OVERFLOW_BODY


COUNTERS = [
    "upstream_cx_total",
    "upstream_cx_overflow",
    "upstream_rq_pending_total",
    "upstream_rq_pending_overflow",
    "upstream_rq_active_overflow",
    "upstream_rq_retry_overflow",
    "upstream_rq_total",
    "upstream_rq_503",
    "upstream_rq_200",
]


def test_http1_max_connections_and_pending_queue(
    start_proxy: StartProxy, http1_upstream: HttpUpstream
) -> None:
    """One connection allowed, one pending request allowed: A holds the connection, B
    waits for it as pending, C and D overflow (503 UO). When A completes, B is served
    on A's connection, without a second one."""
    proxy = breaker_proxy(
        start_proxy,
        http1_upstream.address,
        {
            "thresholds": [
                {"max_connections": 1, "max_pending_requests": 1, "track_remaining": True}
            ]
        },
    )
    assert remaining_gauges(proxy) == {
        "remaining_cx": 1,
        "remaining_pending": 1,
        "remaining_rq": 1024,
        "remaining_retries": 3,
    }
    a = InFlight(proxy, "/a", hold=True)
    until(lambda: http1_upstream.holding(a.token), what="A at the upstream")
    b = InFlight(proxy, "/b", hold=True)
    until(
        lambda: breaker_gauges(proxy)["rq_pending_open"] == 1,
        what=f"{proxy.kind}: B pending",
    )
    for path in ("/c", "/d"):
        assert_overflow_reply(InFlight(proxy, path, hold=False).result())

    # At the peak: the connection and the pending slot are used up.
    assert breaker_gauges(proxy) == {
        "cx_open": 1,
        "cx_pool_open": 0,
        "rq_pending_open": 1,
        "rq_open": 0,
        "rq_retry_open": 0,
    }
    assert remaining_gauges(proxy) == {
        "remaining_cx": 0,
        "remaining_pending": 0,
        "remaining_rq": 1023,
        "remaining_retries": 3,
    }
    assert cluster_stats(proxy, COUNTERS) == {
        "upstream_cx_total": 1,
        "upstream_cx_overflow": 1,
        "upstream_rq_pending_total": 2,
        "upstream_rq_pending_overflow": 2,
        "upstream_rq_active_overflow": 0,
        "upstream_rq_retry_overflow": 0,
        "upstream_rq_total": 1,
        "upstream_rq_503": 2,
        "upstream_rq_200": None,
    }

    http1_upstream.release(a.token)
    assert a.result().status_code == 200
    until(lambda: http1_upstream.holding(b.token), what="B at the upstream")
    http1_upstream.release(b.token)
    resp_b = b.result()
    assert resp_b.status_code == 200
    served = {r.path: r.connection_id for r in http1_upstream.requests}
    assert served == {"/a": served["/a"], "/b": served["/a"]}, served

    until(lambda: cluster_stats(proxy, ["upstream_rq_200"])["upstream_rq_200"] == 2)
    assert breaker_gauges(proxy) == {
        "cx_open": 1,  # the connection stays open (keep-alive)
        "cx_pool_open": 0,
        "rq_pending_open": 0,
        "rq_open": 0,
        "rq_retry_open": 0,
    }
    assert remaining_gauges(proxy) == {
        "remaining_cx": 0,
        "remaining_pending": 1,
        "remaining_rq": 1024,
        "remaining_retries": 3,
    }
    assert cluster_stats(proxy, COUNTERS) == {
        "upstream_cx_total": 1,
        "upstream_cx_overflow": 1,
        "upstream_rq_pending_total": 2,
        "upstream_rq_pending_overflow": 2,
        "upstream_rq_active_overflow": 0,
        "upstream_rq_retry_overflow": 0,
        "upstream_rq_total": 2,
        "upstream_rq_503": 2,
        "upstream_rq_200": 2,
    }


def test_http2_max_requests(start_proxy: StartProxy, h2_upstream: H2cUpstream) -> None:
    """HTTP/2 upstream, one active request allowed: while A is held, B gets 503 UO,
    counted as upstream_rq_active_overflow (Envoy 1.40's counter for max_requests);
    after A, C is served."""
    proxy = breaker_proxy(
        start_proxy, h2_upstream.address, {"thresholds": [{"max_requests": 1}]}, http2=True
    )
    a = InFlight(proxy, "/a", hold=True)
    until(lambda: h2_upstream.holding(a.token), what="A at the upstream")
    assert breaker_gauges(proxy)["rq_open"] == 1
    assert_overflow_reply(InFlight(proxy, "/b", hold=False).result())
    assert cluster_stats(proxy, COUNTERS) == {
        "upstream_cx_total": 1,
        "upstream_cx_overflow": 0,
        "upstream_rq_pending_total": 1,
        "upstream_rq_pending_overflow": 0,
        "upstream_rq_active_overflow": 1,
        "upstream_rq_retry_overflow": 0,
        "upstream_rq_total": 1,
        "upstream_rq_503": 1,
        "upstream_rq_200": None,
    }
    # Not tracked: no remaining gauges.
    assert set(remaining_gauges(proxy).values()) == {None}
    h2_upstream.release(a.token)
    assert a.result().status_code == 200
    until(lambda: breaker_gauges(proxy)["rq_open"] == 0, what="A ended")
    assert InFlight(proxy, "/c", hold=False).result().status_code == 200


def test_a_high_priority_route_counts_against_the_high_breakers(
    start_proxy: StartProxy, h2_upstream: H2cUpstream
) -> None:
    """Route ``priority: HIGH``: its requests use HIGH's thresholds (``max_requests: 1``
    here) and connections of their own; DEFAULT's (unlimited) are untouched. While one
    HIGH request is held, a second HIGH request overflows and a DEFAULT one is served."""
    c = cluster(BACKEND, [h2_upstream.address], http2=True)
    c["circuit_breakers"] = {"thresholds": [{"priority": "HIGH", "max_requests": 1}]}
    high = route({"prefix": "/high"}, cluster=BACKEND)
    high["route"]["priority"] = "HIGH"
    routes = [high, route({"prefix": "/"}, cluster=BACKEND)]
    proxy = start_proxy(
        bootstrap(
            admin_port=free_port(),
            listeners=[
                http_listener(port=free_port(), virtual_hosts=[virtual_host("all", ["*"], routes)])
            ],
            clusters=[c],
        )
    )
    a = InFlight(proxy, "/high/a", hold=True)
    until(lambda: h2_upstream.holding(a.token), what="A at the upstream")
    assert breaker_gauges(proxy, "high")["rq_open"] == 1
    assert breaker_gauges(proxy, "default")["rq_open"] == 0
    assert_overflow_reply(InFlight(proxy, "/high/b", hold=False).result())
    assert InFlight(proxy, "/default", hold=False).result().status_code == 200
    h2_upstream.release(a.token)
    assert a.result().status_code == 200
    # Each priority has its own connection pool, as in Envoy.
    assert cluster_stats(proxy, ["upstream_cx_total", "upstream_rq_active_overflow"]) == {
        "upstream_cx_total": 2,
        "upstream_rq_active_overflow": 1,
    }


def test_defaults_when_unset(start_proxy: StartProxy, http1_upstream: HttpUpstream) -> None:
    """No circuit_breakers: both priorities have their gauges at 0, none tracks its
    remaining counts, and five concurrent requests open five connections (the
    default limit is 1024)."""
    proxy = breaker_proxy(start_proxy, http1_upstream.address, None)
    closed = dict.fromkeys(OPEN_GAUGES, 0)
    assert breaker_gauges(proxy, "default") == closed
    assert breaker_gauges(proxy, "high") == closed
    assert set(remaining_gauges(proxy).values()) == {None}
    held = [InFlight(proxy, f"/{i}", hold=True) for i in range(5)]
    for r in held:
        until(partial(http1_upstream.holding, r.token), what=f"{r.token} at the upstream")
    assert breaker_gauges(proxy) == closed
    for r in held:
        http1_upstream.release(r.token)
        assert r.result().status_code == 200
    assert cluster_stats(proxy, ["upstream_cx_total", "upstream_rq_pending_overflow"]) == {
        "upstream_cx_total": 5,
        "upstream_rq_pending_overflow": 0,
    }


def test_breaker_stats_of_both_priorities(
    start_proxy: StartProxy, http1_upstream: HttpUpstream
) -> None:
    """Every circuit-breaker stat and overflow counter Envoy shows, by name and value:
    HIGH's thresholds are its own, a retry budget shows max_retries' remaining count
    until it is first used, and an empty ``retry_budget`` changes nothing.

    Envoy also shows ``remaining_cx_pools`` (2^64 - 1 without ``max_connection_pools``,
    which envoyx refuses); envoyx's gauges are signed 64-bit and it does not show it."""
    proxy = breaker_proxy(
        start_proxy,
        http1_upstream.address,
        {
            "thresholds": [
                {
                    "track_remaining": True,
                    "max_requests": 7,
                    "retry_budget": {"budget_percent": {"value": 50.0}},
                },
                {"priority": "HIGH", "track_remaining": True, "max_retries": 5},
                {"priority": "HIGH", "max_retries": 9},  # a second HIGH: ignored
            ],
            "per_host_thresholds": [{"max_connections": 3}],
        },
    )
    stats = {
        k.removeprefix(f"cluster.{BACKEND}."): v
        for k, v in proxy.stats().items()
        if k.startswith(f"cluster.{BACKEND}.")
        and (".circuit_breakers." in k or k.endswith("_overflow"))
        and not k.endswith(".remaining_cx_pools")
    }
    expected = {
        "upstream_cx_overflow": 0,
        "upstream_cx_pool_overflow": 0,
        "upstream_rq_active_overflow": 0,
        "upstream_rq_pending_overflow": 0,
        "upstream_rq_retry_overflow": 0,
    }
    for priority, remaining in (
        ("default", {"cx": 1024, "pending": 1024, "rq": 7, "retries": 3}),
        ("high", {"cx": 1024, "pending": 1024, "rq": 1024, "retries": 5}),
    ):
        for g in OPEN_GAUGES:
            expected[f"circuit_breakers.{priority}.{g}"] = 0
        for r, v in remaining.items():
            expected[f"circuit_breakers.{priority}.remaining_{r}"] = v
    assert stats == expected
    resp = InFlight(proxy, "/x", hold=False).result()
    assert resp.status_code == 200


def test_pending_request_times_out_with_the_route(
    start_proxy: StartProxy, http1_upstream: HttpUpstream
) -> None:
    """The route's timeout runs while a request waits for a connection: B, pending
    behind A (whose route has no timeout) on the only connection, gets Envoy's 504
    when its own route's timeout expires."""
    proxy = breaker_proxy(
        start_proxy,
        http1_upstream.address,
        {"thresholds": [{"max_connections": 1}]},
        timeout="1s",
    )
    a = InFlight(proxy, "/a", hold=True)
    until(lambda: http1_upstream.holding(a.token), what="A at the upstream")
    b = InFlight(proxy, "/b", hold=False).result()
    assert (b.status_code, b.text) == (504, "upstream request timeout")
    http1_upstream.release(a.token)
    assert a.result().status_code == 200
    until(lambda: cluster_stats(proxy, ["upstream_rq_200"])["upstream_rq_200"] == 1)
    assert cluster_stats(
        proxy,
        [
            "upstream_rq_pending_total",
            "upstream_rq_timeout",
            "upstream_rq_total",
            "upstream_rq_504",
            "upstream_cx_total",
        ],
    ) == {
        "upstream_rq_pending_total": 2,
        "upstream_rq_timeout": 1,
        "upstream_rq_total": 1,
        "upstream_rq_504": 1,
        "upstream_cx_total": 1,
    }
    assert breaker_gauges(proxy)["rq_pending_open"] == 0


def test_limits_are_shared_by_all_workers(
    start_proxy: StartProxy, http1_upstream: HttpUpstream
) -> None:
    """Two workers, ``max_requests: 1``: whichever worker takes B, the one request
    already active on the cluster (A) makes B overflow."""
    c = cluster(BACKEND, [http1_upstream.address])
    c["circuit_breakers"] = {"thresholds": [{"max_requests": 1}]}
    bs = bootstrap(
        admin_port=free_port(),
        listeners=[
            http_listener(
                port=free_port(),
                virtual_hosts=[
                    virtual_host("all", ["*"], [route({"prefix": "/"}, cluster=BACKEND)])
                ],
            )
        ],
        clusters=[c],
    )
    proxy = start_proxy(bs, concurrency=2)
    a = InFlight(proxy, "/a", hold=True)
    until(lambda: http1_upstream.holding(a.token), what="A at the upstream")
    for path in ("/b", "/c", "/d"):
        assert_overflow_reply(InFlight(proxy, path, hold=False).result())
    assert cluster_stats(proxy, ["upstream_rq_active_overflow"]) == {
        "upstream_rq_active_overflow": 3
    }
    http1_upstream.release(a.token)
    assert a.result().status_code == 200
