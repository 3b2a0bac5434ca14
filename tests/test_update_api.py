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
from support.tls import client_context, https_request, shared_pki
from support.upstreams import HttpUpstream
from support.wait import free_port, until
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


TLS_CONTEXT = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"


def test_secrets_by_update_serve_tls_and_rotate() -> None:
    """``Server.update(secrets=...)`` feeds SDS secrets without a management server: a
    listener naming one warms (its port refuses connections) until it comes, then
    serves with it; a replaced secret is used by the next handshake."""
    pki = shared_pki()

    def secret(cert: Any) -> dict[str, Any]:
        return {
            "name": "cert",
            "tls_certificate": {
                "certificate_chain": {"inline_string": cert.cert_pem},
                "private_key": {"inline_string": cert.key_pem},
            },
        }

    tls_listener = listener("tls", "tls-routes")
    tls_listener["filter_chains"][0]["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TLS_CONTEXT,
            "common_tls_context": {
                "tls_certificate_sds_secret_configs": [{"name": "cert", "sds_config": {"ads": {}}}]
            },
        },
    }
    direct = routes("tls-routes", "unused")
    direct["virtual_hosts"][0]["routes"] = [
        {"match": {"prefix": "/"}, "direct_response": {"status": 200}}
    ]
    with envoyx.Server({"node": {"id": "update-tls"}}, concurrency=1) as s:
        s.update(listeners=[tls_listener], routes=[direct])
        dump = s.config_dump()["configs"]
        listeners_dump = next(c for c in dump if c["@type"].endswith("ListenersConfigDump"))
        assert "warming_state" in listeners_dump["dynamic_listeners"][0]

        s.update(secrets=[secret(pki.server_ecdsa)])
        address = s.listener_addresses()["tls"]
        until(lambda: "tls" in s.listener_addresses(), timeout=5)
        resp, hs = https_request(address, client_context(pki), server_name="server.example.com")
        assert (resp.status, hs.peer_cn) == (200, pki.server_ecdsa.common_name)

        s.update(secrets=[secret(pki.server_rsa)])
        _, hs = https_request(address, client_context(pki), server_name="server.example.com")
        assert hs.peer_cn == pki.server_rsa.common_name


def test_an_lds_update_of_one_filter_chain_drains_only_its_connections() -> None:
    """Envoy's in-place filter chain update: a listener whose update changes only one
    of its filter chains keeps the connections of the unchanged chain open (they go
    on serving past the drain time) and drains those of the changed one."""

    def chain(body: str, source_port_match: bool) -> dict[str, Any]:
        direct = routes(f"r-{body}", "unused")
        direct["virtual_hosts"][0]["routes"] = [
            {
                "match": {"prefix": "/"},
                "direct_response": {"status": 200, "body": {"inline_string": body}},
            }
        ]
        c: dict[str, Any] = {
            "name": f"chain-{body[0]}",
            "filters": [
                {
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": HCM,
                        "stat_prefix": f"chain_{body[0]}",
                        "route_config": direct,
                        "http_filters": [
                            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}
                        ],
                    },
                }
            ],
        }
        if source_port_match:
            # Connections from the IPv4 loopback take this chain; the other is default.
            c["filter_chain_match"] = {
                "source_prefix_ranges": [{"address_prefix": "127.0.0.1", "prefix_len": 32}]
            }
        return c

    port = free_port()

    def two_chains(a_body: str, b_body: str) -> dict[str, Any]:
        lis = listener("multi", "unused")
        lis["address"]["socket_address"]["port_value"] = port
        lis["filter_chains"] = [chain(a_body, True)]
        lis["default_filter_chain"] = chain(b_body, False)
        return lis

    def get_on(sock: socket.socket) -> bytes:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith((b"a1", b"a2")):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data

    with envoyx.Server({"node": {"id": "in-place"}}, concurrency=1, drain_time_s=0.3) as s:
        s.update(listeners=[two_chains("a1", "b1")])
        host = s.listener_addresses()["multi"][0]
        sock = socket.create_connection((host, port), timeout=10)
        try:
            assert get_on(sock).endswith(b"a1")
            # Only the default chain changes: the connection on chain a stays.
            s.update(listeners=[two_chains("a1", "b2")])
            time.sleep(1.0)  # well past the drain time
            assert get_on(sock).endswith(b"a1")
            assert s.stats()["listener_manager.listener_in_place_updated"] == 1
            # Now chain a changes: its connection drains and closes.
            s.update(listeners=[two_chains("a2", "b2")])
            time.sleep(1.0)
            sock.settimeout(5)
            try:
                sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                assert sock.recv(4096) == b""
            except (ConnectionResetError, BrokenPipeError):
                pass
        finally:
            sock.close()
        # New connections see the new chain.
        resp = httpx.get(f"http://{host}:{port}/", timeout=5)
        assert resp.text == "a2"
