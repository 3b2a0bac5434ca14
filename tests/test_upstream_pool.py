"""Upstream connection pools, end to end: which upstream connections the proxy keeps,
reuses and closes, seen from the upstream servers' side and in the cluster stats.

- a host removed by EDS: its idle pooled connection is closed, the others stay;
- ``common_http_protocol_options.idle_timeout``: an idle connection is closed;
- ``max_requests_per_connection``: a connection carries at most that many requests;
- ``upstream_rq_pending_total`` counts only requests that waited for a new connection.

Every test takes ``start_proxy``: it runs against envoyx and, as a second
parametrization, against the real Envoy 1.40 with the same bootstrap and the same
expected values (the upstream-side connection counts and the stat values are
Envoy's). Each runs for HTTP/1.1 and HTTP/2 (h2c) upstream clusters.

Each test has its own upstream servers, so that the connections they count are the
ones this test's proxy opened. ``open_connections`` is the upstream's view: for the
HTTP/1.1 upstream, connections it is still serving (it has not read their end); for
the h2c upstream, its sockets the kernel holds as ESTABLISHED (the proxy's FIN takes a
socket out of that state).

Closing is checked "within a few seconds": envoyx closes idle connections on its
workers' 1 s upkeep beat, Envoy on a timer of its own.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from support.bootstrap import (
    HTTP_OPTIONS_TYPE,
    bootstrap,
    cluster,
    http_listener,
    route,
    virtual_host,
)
from support.proxy import ProxyProcess
from support.upstreams import H2cUpstream, HttpUpstream
from support.wait import free_port, until
from support.xds_resources import (
    ads_bootstrap,
    cluster_load_assignment,
    eds_cluster,
    listener,
    simple_routes,
)
from support.xds_server import CLUSTER, ENDPOINT, LISTENER, ROUTE, XdsServer

StartProxy = Callable[..., ProxyProcess]
Upstream = HttpUpstream | H2cUpstream
Json = dict[str, Any]

HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
CLOSE_TIMEOUT_S = 5.0  # "within a few seconds"
BACKEND = "backend"
PROTOCOLS = ["http1", "http2"]


# -- upstreams and bootstraps ------------------------------------------------------------


@pytest.fixture
def make_upstream() -> Iterator[Callable[[str, str], Upstream]]:
    """Starts a fresh upstream: ``(protocol, name)``; all stopped at teardown."""
    started: list[Upstream] = []

    def make(protocol: str, name: str) -> Upstream:
        up: Upstream = H2cUpstream(name) if protocol == "http2" else HttpUpstream(name)
        started.append(up.start())
        return up

    yield make
    for up in started:
        up.stop()


def pool_cluster(
    endpoint: tuple[str, int], *, protocol: str, common: Json, spelling: str = "extension"
) -> Json:
    """A STATIC cluster of one endpoint with ``common_http_protocol_options``
    (``envoy.config.core.v3.HttpProtocolOptions``) spelled as the upstream HTTP
    protocol options extension (``extension``) or as the deprecated fields of the
    cluster itself (``cluster``)."""
    c = cluster(BACKEND, [endpoint])
    if spelling == "extension":
        explicit: Json = {f"{'http2' if protocol == 'http2' else 'http'}_protocol_options": {}}
        c["typed_extension_protocol_options"] = {
            HTTP_OPTIONS: {
                "@type": HTTP_OPTIONS_TYPE,
                "explicit_http_config": explicit,
                "common_http_protocol_options": common,
            }
        }
    else:
        c["common_http_protocol_options"] = common
        if protocol == "http2":
            c["http2_protocol_options"] = {}
    return c


def pool_proxy(start: StartProxy, c: Json) -> ProxyProcess:
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
    return start(bs)


def stat(proxy: ProxyProcess, name: str) -> int:
    return proxy.stats().get(f"cluster.{BACKEND}.{name}", 0)


def wait_cluster_stats(proxy: ProxyProcess, expected: dict[str, int]) -> None:
    """Poll until every ``cluster.backend.<name>`` has its expected value."""
    seen: dict[str, int] = {}

    def check() -> bool:
        nonlocal seen
        now = proxy.stats()
        seen = {k: now.get(f"cluster.{BACKEND}.{k}", 0) for k in expected}
        return seen == expected

    try:
        until(check, timeout=CLOSE_TIMEOUT_S, what=f"cluster stats {expected}")
    except AssertionError:
        raise AssertionError(f"{proxy.kind}: cluster stats {seen}, expected {expected}") from None


def wait_open(up: Upstream, n: int) -> None:
    try:
        until(lambda: up.open_connections == n, timeout=CLOSE_TIMEOUT_S)
    except AssertionError:
        raise AssertionError(
            f"upstream {up.name} has {up.open_connections} open connection(s) after "
            f"{CLOSE_TIMEOUT_S}s, expected {n}"
        ) from None


def connection_ids(client: httpx.Client, count: int) -> list[int]:
    """Sends ``count`` sequential GETs on ``client`` (one keep-alive connection) and
    returns the upstream connection each was served on (from the upstream's echo)."""
    ids = []
    for i in range(count):
        resp = client.get(f"/seq/{i}")
        assert resp.status_code == 200, resp.text[:300]
        ids.append(json.loads(resp.content)["connection_id"])
    return ids


def client_for(proxy: ProxyProcess) -> httpx.Client:
    return httpx.Client(base_url=proxy.url(), timeout=10)


# -- 1. a host removed by EDS ----------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_idle_connection_to_a_host_removed_by_eds_is_closed(
    start_proxy: StartProxy, make_upstream: Callable[[str, str], Upstream], protocol: str
) -> None:
    """Both hosts of an EDS cluster get a pooled keep-alive connection; an EDS update
    removes host b: its idle connection is closed (b sees it end; upstream_cx_active
    drops, upstream_cx_destroy rises) while host a keeps serving on its connection."""
    a, b = make_upstream(protocol, "a"), make_upstream(protocol, "b")
    port = free_port()
    with XdsServer() as xds:
        xds.set_snapshot(
            {
                CLUSTER: {BACKEND: eds_cluster(BACKEND, http2=protocol == "http2")},
                ENDPOINT: {BACKEND: cluster_load_assignment(BACKEND, [a.address, b.address])},
                LISTENER: {"main": listener("main", port, route_config_name="main_routes")},
                ROUTE: {"main_routes": simple_routes("main_routes", BACKEND)},
            }
        )
        proxy = start_proxy(ads_bootstrap(xds_address=xds.address, admin_port=free_port()))
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            # Ready means warmed; still, the first request is retried until it is served.
            until(lambda: client.get("/first").status_code == 200, what="the xDS listener")
            served = [client.get(f"/rr/{i}").headers["x-upstream"] for i in range(3)]
            assert {"a", "b"} <= {*served}, served  # round robin: both hosts served
            # One pooled connection to each host, reused.
            assert (a.connections_total, b.connections_total) == (1, 1)
            wait_open(a, 1)
            wait_open(b, 1)
            wait_cluster_stats(proxy, {"upstream_cx_active": 2, "upstream_cx_destroy": 0})

            since = xds.mark()
            version = xds.set_resources(
                ENDPOINT, {BACKEND: cluster_load_assignment(BACKEND, [a.address])}
            )
            xds.wait_for_ack(ENDPOINT, version, since=since)

            wait_open(b, 0)
            wait_cluster_stats(
                proxy,
                {"upstream_cx_active": 1, "upstream_cx_destroy": 1, "membership_total": 1},
            )
            assert a.open_connections == 1
            # The remaining host keeps serving, on the connection it had.
            after = [client.get(f"/after/{i}").headers["x-upstream"] for i in range(3)]
            assert after == ["a"] * 3
            assert (a.connections_total, b.connections_total) == (1, 1)
            assert a.open_connections == 1
            assert stat(proxy, "upstream_cx_total") == 2


# -- 2. idle timeout ---------------------------------------------------------------------

# (protocol, spelling): the HttpProtocolOptions extension, and for HTTP/1.1 also the
# deprecated cluster-level field, which Envoy's schema still accepts.
VARIANTS = [("http1", "extension"), ("http1", "cluster"), ("http2", "extension")]


@pytest.mark.parametrize(("protocol", "spelling"), VARIANTS)
def test_idle_timeout_closes_an_idle_upstream_connection(
    start_proxy: StartProxy,
    make_upstream: Callable[[str, str], Upstream],
    protocol: str,
    spelling: str,
) -> None:
    up = make_upstream(protocol, "idle")
    proxy = pool_proxy(
        start_proxy,
        pool_cluster(
            up.address, protocol=protocol, spelling=spelling, common={"idle_timeout": "0.5s"}
        ),
    )
    with client_for(proxy) as client:
        assert client.get("/one").status_code == 200
        assert up.connections_total == 1
        # The client's connection stays open: the upstream one is closed for being
        # idle, not because its downstream went away.
        wait_open(up, 0)
        wait_cluster_stats(
            proxy,
            {
                "upstream_cx_total": 1,
                "upstream_cx_idle_timeout": 1,
                "upstream_cx_destroy": 1,
                "upstream_cx_active": 0,
            },
        )
        # The next request opens a new connection.
        assert client.get("/two").status_code == 200
        assert up.connections_total == 2
        assert stat(proxy, "upstream_cx_total") == 2


def test_idle_connection_closed_by_the_upstream_is_not_an_idle_timeout(
    start_proxy: StartProxy, make_upstream: Callable[[str, str], Upstream]
) -> None:
    """An idle pooled connection that the upstream closes (as a server's keep-alive
    timeout would) is destroyed, but it did not time out: upstream_cx_idle_timeout
    stays 0. A second cluster with a 0.5 s idle timeout, used after the close, shows
    that the pool's idle upkeep has run since (its own connection timed out)."""
    closing = make_upstream("http1", "closing")
    probe_up = make_upstream("http1", "probe")
    probe = pool_cluster(probe_up.address, protocol="http1", common={"idle_timeout": "0.5s"})
    probe["name"] = probe["load_assignment"]["cluster_name"] = "probe"
    bs = bootstrap(
        admin_port=free_port(),
        listeners=[
            http_listener(
                port=free_port(),
                virtual_hosts=[
                    virtual_host(
                        "all",
                        ["*"],
                        [
                            route({"prefix": "/probe"}, cluster="probe"),
                            route({"prefix": "/"}, cluster=BACKEND),
                        ],
                    )
                ],
            )
        ],
        clusters=[cluster(BACKEND, [closing.address]), probe],
    )
    proxy = start_proxy(bs)
    with client_for(proxy) as client:
        assert client.get("/backend").status_code == 200
        wait_open(closing, 1)
        closing.stop()  # shuts down the connection it was keeping alive
        wait_cluster_stats(proxy, {"upstream_cx_active": 0, "upstream_cx_destroy": 1})

        assert client.get("/probe").status_code == 200
        proxy.wait_stat("cluster.probe.upstream_cx_idle_timeout", 1)
    assert stat(proxy, "upstream_cx_idle_timeout") == 0


# -- 3. max_requests_per_connection -------------------------------------------------------


@pytest.mark.parametrize(("protocol", "spelling"), VARIANTS)
def test_max_requests_per_connection_retires_connections(
    start_proxy: StartProxy,
    make_upstream: Callable[[str, str], Upstream],
    protocol: str,
    spelling: str,
) -> None:
    """max_requests_per_connection 2: six sequential keep-alive requests use three
    upstream connections, two requests each; each is closed after its second."""
    up = make_upstream(protocol, "maxrq")
    proxy = pool_proxy(
        start_proxy,
        pool_cluster(
            up.address,
            protocol=protocol,
            spelling=spelling,
            common={"max_requests_per_connection": 2},
        ),
    )
    with client_for(proxy) as client:
        ids = connection_ids(client, 6)
    runs = [len(list(group)) for _, group in itertools.groupby(ids)]
    assert runs == [2, 2, 2] and len(set(ids)) == 3, ids
    assert up.connections_total == 3
    # A retired connection is closed, the last one too (it carried its second request).
    wait_open(up, 0)
    wait_cluster_stats(
        proxy,
        {
            "upstream_rq_total": 6,
            "upstream_cx_total": 3,
            "upstream_cx_max_requests": 3,
            "upstream_cx_destroy": 3,
            "upstream_cx_active": 0,
        },
    )


# -- 4. upstream_rq_pending_total ---------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_pending_total_counts_only_requests_that_waited_for_a_connection(
    start_proxy: StartProxy, make_upstream: Callable[[str, str], Upstream], protocol: str
) -> None:
    """Five sequential requests over one reused upstream connection: only the first
    waited for a connection to open."""
    up = make_upstream(protocol, "pending")
    proxy = pool_proxy(start_proxy, pool_cluster(up.address, protocol=protocol, common={}))
    with client_for(proxy) as client:
        ids = connection_ids(client, 5)
    assert len(set(ids)) == 1, ids
    assert up.connections_total == 1
    wait_cluster_stats(
        proxy,
        {
            "upstream_rq_total": 5,
            "upstream_cx_total": 1,
            "upstream_rq_pending_total": 1,
            "upstream_cx_active": 1,
        },
    )
