"""``Server.update()`` against the real core: resources applied from Python without a
management server, through the same path as xDS."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import envoyx
from support.upstreams import HttpUpstream
from support.wait import until
from support.xds_resources import cluster_load_assignment, eds_cluster

HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
    ".HttpConnectionManager"
)
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def listener(name: str, route_name: str) -> dict[str, Any]:
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": HCM,
                            "stat_prefix": name,
                            "rds": {"route_config_name": route_name, "config_source": {"ads": {}}},
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {"@type": ROUTER},
                                }
                            ],
                        },
                    }
                ]
            }
        ],
    }


def routes(name: str, cluster: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "virtual_hosts": [
            {
                "name": "all",
                "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}],
            }
        ],
        **extra,
    }


@pytest.fixture
def server(http_upstream: HttpUpstream) -> Iterator[envoyx.Server]:
    with envoyx.Server({"node": {"id": "update-test"}}, concurrency=1) as s:
        s.update(
            clusters=[eds_cluster("backend")],
            endpoints=[cluster_load_assignment("backend", [("127.0.0.1", http_upstream.port)])],
            listeners=[listener("main", "main-routes")],
            routes=[routes("main-routes", "backend")],
        )
        yield s


def get(server: envoyx.Server, path: str = "/") -> httpx.Response:
    host, port = server.listener_addresses()["main"]
    return httpx.get(f"http://{host}:{port}{path}", timeout=5)


def test_update_serves_traffic_through_dynamic_resources(
    server: envoyx.Server, http_upstream: HttpUpstream
) -> None:
    resp = get(server)
    assert resp.status_code == 200
    assert resp.headers["x-upstream"] == http_upstream.name
    dump = server.config_dump()["configs"]
    clusters = next(c for c in dump if c["@type"].endswith("ClustersConfigDump"))
    assert [c["cluster"]["name"] for c in clusters["dynamic_active_clusters"]] == ["backend"]


def test_route_to_unknown_cluster_with_validate_clusters_is_rejected(
    server: envoyx.Server, http_upstream: HttpUpstream
) -> None:
    with pytest.raises(envoyx.ConfigError) as err:
        server.update(routes=[routes("main-routes", "nope", validate_clusters=True)])
    assert "route: unknown cluster 'nope'" in str(err.value)
    # The previous route configuration keeps serving.
    assert get(server).headers["x-upstream"] == http_upstream.name


def test_invalid_regex_is_rejected_and_the_old_routes_serve(
    server: envoyx.Server, http_upstream: HttpUpstream
) -> None:
    bad = routes("main-routes", "backend")
    bad["virtual_hosts"][0]["routes"][0]["match"] = {"safe_regex": {"regex": "(["}}
    with pytest.raises(envoyx.ConfigError) as err:
        server.update(routes=[bad])
    assert "invalid regex" in str(err.value)
    assert get(server).headers["x-upstream"] == http_upstream.name


def test_listener_on_a_port_in_use_is_rejected(server: envoyx.Server) -> None:
    _, port = server.listener_addresses()["main"]
    clash = listener("clash", "main-routes")
    clash["address"]["socket_address"]["port_value"] = port
    with pytest.raises(envoyx.ConfigError) as err:
        server.update(listeners=[clash])
    assert "duplicate address" in str(err.value)
    assert "clash" not in server.listener_addresses()


def static_cluster(name: str, port: int) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }


def test_an_open_connection_follows_route_and_cluster_changes(
    http_upstreams: dict[str, HttpUpstream],
) -> None:
    """A keep-alive connection caches the route table and its cluster handles (so a
    request touches no reference count other workers write); a route or cluster
    replaced while it is open still applies to its next request."""
    a, b, c = http_upstreams["a"], http_upstreams["b"], http_upstreams["c"]
    with envoyx.Server({"node": {"id": "update-test"}}, concurrency=1) as s:
        s.update(
            clusters=[static_cluster("one", a.port), static_cluster("two", b.port)],
            listeners=[listener("main", "main-routes")],
            routes=[routes("main-routes", "one")],
        )
        host, port = s.listener_addresses()["main"]
        with httpx.Client(base_url=f"http://{host}:{port}", timeout=5) as client:
            assert client.get("/").headers["x-upstream"] == a.name
            # The cluster the route names is replaced (CDS): same name, new host.
            s.update(clusters=[static_cluster("one", c.port)])
            assert client.get("/").headers["x-upstream"] == c.name
            # The route table is replaced (RDS): another cluster.
            s.update(routes=[routes("main-routes", "two")])
            assert client.get("/").headers["x-upstream"] == b.name
            # The cluster is removed: 503 NC, and back when it returns.
            s.update(routes=[routes("main-routes", "one")], remove_clusters=["two"])
            assert client.get("/").headers["x-upstream"] == c.name
            s.update(remove_clusters=["one"])
            assert client.get("/").status_code == 503
            s.update(clusters=[static_cluster("one", a.port)])
            assert client.get("/").headers["x-upstream"] == a.name
            # One connection throughout.
            stats = s.stats()
            assert stats["http.main.downstream_cx_total"] == 1


def test_a_removed_listener_closes_its_connections_after_the_drain_time(
    http_upstream: HttpUpstream,
) -> None:
    """LDS removal drains a listener: its connections get ``--drain-time-s`` to finish
    what they are doing, then are closed (before, a stuck response kept them forever)."""
    token = f"drain-{uuid.uuid4().hex}"
    with envoyx.Server({"node": {"id": "update-test"}}, concurrency=1, drain_time_s=0.5) as s:
        s.update(
            clusters=[static_cluster("backend", http_upstream.port)],
            listeners=[listener("main", "main-routes")],
            routes=[routes("main-routes", "backend")],
        )
        host, port = s.listener_addresses()["main"]
        sock = socket.create_connection((host, port), timeout=30)
        try:
            sock.sendall(
                b"GET /held HTTP/1.1\r\nhost: x\r\nx-test-response-size: 100000\r\n"
                + f"x-test-token: {token}\r\nx-test-hold-response: 1\r\n\r\n".encode()
            )
            until(lambda: http_upstream.holding(token), timeout=10, what="the held response")
            s.update(remove_listeners=["main"])
            # The upstream still holds the body: only the drain deadline ends it.
            received = b""
            started = time.monotonic()
            while chunk := sock.recv(65536):
                received += chunk
            assert time.monotonic() - started < 20
            assert b"200 OK" not in received or len(received) < 100000
        finally:
            http_upstream.release(token)
            sock.close()
