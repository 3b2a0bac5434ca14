"""Active health checking, end to end, against envoyx and (as a second
parametrization of ``start_proxy``) the real Envoy 1.40 with the same bootstrap.

Upstreams are real processes (:mod:`support.health_upstream`) or real servers (a TCP
server, a grpcio server answering ``grpc.health.v1.Health/Check``). Intervals are
short (100-200 ms, ``no_traffic_interval`` too unless a test is about it) so that a
test waits for a few rounds, never for a fixed time: every wait polls ``/clusters``
or ``/stats`` until the expected state, with a bound.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
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
from support.health_upstream import HealthUpstream
from support.proxy import ProxyProcess
from support.upstreams import H2cUpstream
from support.wait import free_port, until
from support.xds_resources import (
    ads_bootstrap,
    cluster_load_assignment,
    eds_cluster,
    listener,
    simple_routes,
)
from support.xds_server import CLUSTER as XDS_CLUSTER
from support.xds_server import ENDPOINT, LISTENER, ROUTE, XdsServer

StartProxy = Callable[..., ProxyProcess]
Json = dict[str, Any]
CLUSTER = "backend"


@pytest.fixture
def upstreams() -> Iterator[Callable[[str], HealthUpstream]]:
    started: list[HealthUpstream] = []

    def make(name: str) -> HealthUpstream:
        up = HealthUpstream(name).start()
        started.append(up)
        return up

    yield make
    for up in started:
        up.stop()


def http_check(**overrides: Any) -> Json:
    hc: Json = {
        "timeout": "1s",
        "interval": "0.1s",
        "no_traffic_interval": "0.1s",
        "unhealthy_threshold": 2,
        "healthy_threshold": 1,
        "http_health_check": {"path": "/healthz"},
    }
    hc.update(overrides)
    return hc


def proxy_config(endpoints: list[tuple[str, int]], health_check: Json, **extra: Any) -> Json:
    c = cluster(CLUSTER, endpoints)
    c["health_checks"] = [health_check]
    c.update(extra)
    return bootstrap(
        admin_port=free_port(),
        listeners=[
            http_listener(
                port=free_port(),
                virtual_hosts=[
                    virtual_host("all", ["*"], [route({"prefix": "/"}, cluster=CLUSTER)])
                ],
            )
        ],
        clusters=[c],
    )


def host_flags(proxy: ProxyProcess) -> dict[str, str]:
    """``/clusters`` text: health_flags by ``ip:port`` of the test cluster."""
    _, _, body = proxy.admin("/clusters")
    out = {}
    for line in body.decode().splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == CLUSTER and parts[2] == "health_flags":
            out[parts[1]] = parts[3]
    return out


def host_statuses(proxy: ProxyProcess) -> dict[str, Json]:
    """``/clusters?format=json``: each host's ``health_status`` by ``ip:port``."""
    _, _, body = proxy.admin("/clusters?format=json")
    for c in json.loads(body)["cluster_statuses"]:
        if c["name"] == CLUSTER:
            return {
                f"{h['address']['socket_address']['address']}:"
                f"{h['address']['socket_address']['port_value']}": h["health_status"]
                for h in c.get("host_statuses", [])
            }
    raise AssertionError("no such cluster")


def addr(up: HealthUpstream) -> str:
    return f"127.0.0.1:{up.port}"


def wait_flags(proxy: ProxyProcess, expected: dict[str, str], timeout: float = 10.0) -> None:
    seen: dict[str, str] = {}

    def check() -> bool:
        nonlocal seen
        seen = host_flags(proxy)
        return seen == expected

    try:
        until(check, timeout=timeout, what="health flags")
    except Exception:
        raise AssertionError(f"{proxy.kind}: flags {seen}, expected {expected}") from None


def served_by(proxy: ProxyProcess, n: int) -> list[str]:
    """Sends ``n`` requests; which upstream answered each (all must succeed)."""
    names = []
    with httpx.Client(timeout=5) as client:
        for _ in range(n):
            r = client.get(proxy.url("/work"))
            assert r.status_code == 200, (proxy.kind, r.status_code, r.text)
            names.append(r.headers["x-upstream"])
    return names


def test_failing_http_check_takes_host_out_and_passing_brings_it_back(
    start_proxy: StartProxy, upstreams: Callable[[str], HealthUpstream]
) -> None:
    a, b = upstreams("a"), upstreams("b")
    b.set(hc=503)
    proxy = start_proxy(proxy_config([a.address, b.address], http_check()))
    # A non-expected status fails the host at once (no unhealthy_threshold for it).
    wait_flags(proxy, {addr(a): "healthy", addr(b): "/failed_active_hc"})
    assert set(served_by(proxy, 6)) == {"a"}
    assert host_statuses(proxy)[addr(b)] == {
        "failed_active_health_check": True,
        "eds_health_status": "HEALTHY",
    }
    stats = proxy.stats()
    assert stats[f"cluster.{CLUSTER}.health_check.healthy"] == 1
    assert stats[f"cluster.{CLUSTER}.health_check.failure"] >= 1
    assert stats[f"cluster.{CLUSTER}.health_check.network_failure"] == 0
    assert stats[f"cluster.{CLUSTER}.membership_healthy"] == 1
    b.set(hc=200)
    wait_flags(proxy, {addr(a): "healthy", addr(b): "healthy"})
    until(lambda: set(served_by(proxy, 4)) == {"a", "b"}, timeout=5, what="both serve")
    assert proxy.stats()[f"cluster.{CLUSTER}.health_check.healthy"] == 2


def test_hosts_start_failed_and_the_server_waits_for_the_first_check(
    start_proxy: StartProxy,
) -> None:
    """Before its first check a host is ``/failed_active_hc`` and the server is not
    ready (cluster warming); a timed-out first check leaves it failed with
    ``/active_hc_timeout`` and the server goes live."""
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    try:
        port = silent.getsockname()[1]
        proxy = start_proxy(
            proxy_config([("127.0.0.1", port)], http_check(timeout="2s")), wait_ready=False
        )
        target = f"127.0.0.1:{port}"
        wait_flags(proxy, {target: "/failed_active_hc"})
        assert not proxy.ready()
        assert host_statuses(proxy)[target] == {
            "failed_active_health_check": True,
            "eds_health_status": "HEALTHY",
        }
        assert proxy.stats()[f"cluster.{CLUSTER}.membership_healthy"] == 0
        until(proxy.ready, timeout=10, what="ready after the first check")
        assert host_flags(proxy) == {target: "/failed_active_hc/active_hc_timeout"}
    finally:
        silent.close()


def test_expected_statuses_and_degraded(
    start_proxy: StartProxy, upstreams: Callable[[str], HealthUpstream]
) -> None:
    a = upstreams("a")
    a.set(hc=201, degraded=1)
    check = http_check(
        http_health_check={"path": "/healthz", "expected_statuses": [{"start": 200, "end": 300}]}
    )
    proxy = start_proxy(proxy_config([a.address], check))
    wait_flags(proxy, {addr(a): "/degraded_active_hc"})
    assert host_statuses(proxy)[addr(a)] == {
        "failed_active_degraded_check": True,
        "eds_health_status": "HEALTHY",
    }
    stats = proxy.wait_stat(f"cluster.{CLUSTER}.health_check.degraded", 1)
    assert stats[f"cluster.{CLUSTER}.health_check.healthy"] == 1


def test_killed_upstream_leaves_rotation_and_returns_after_restart(
    start_proxy: StartProxy, upstreams: Callable[[str], HealthUpstream]
) -> None:
    a, b = upstreams("a"), upstreams("b")
    proxy = start_proxy(proxy_config([a.address, b.address], http_check()))
    wait_flags(proxy, {addr(a): "healthy", addr(b): "healthy"})
    b.kill()
    killed_at = time.monotonic()
    # Connection refused is a network failure: out after unhealthy_threshold (2) of them.
    wait_flags(proxy, {addr(a): "healthy", addr(b): "/failed_active_hc"}, timeout=5)
    assert time.monotonic() - killed_at < 5
    stats = proxy.stats()
    assert stats[f"cluster.{CLUSTER}.health_check.network_failure"] >= 2
    # The remaining host takes all the traffic, without errors.
    assert set(served_by(proxy, 8)) == {"a"}
    b.start()
    wait_flags(proxy, {addr(a): "healthy", addr(b): "healthy"})
    until(lambda: set(served_by(proxy, 4)) == {"a", "b"}, timeout=5, what="both serve")


def test_immediate_health_check_fail_header(
    start_proxy: StartProxy, upstreams: Callable[[str], HealthUpstream]
) -> None:
    a, b = upstreams("a"), upstreams("b")
    b.set(hc=503, immediate=1)
    proxy = start_proxy(proxy_config([a.address, b.address], http_check()))
    wait_flags(
        proxy, {addr(a): "healthy", addr(b): "/failed_active_hc/excluded_via_immediate_hc_fail"}
    )
    assert host_statuses(proxy)[addr(b)] == {
        "failed_active_health_check": True,
        "excluded_via_immediate_hc_fail": True,
        "eds_health_status": "HEALTHY",
    }
    b.set(hc=200, immediate=0)
    wait_flags(proxy, {addr(a): "healthy", addr(b): "healthy"})


def test_immediate_fail_header_on_a_routed_response(
    start_proxy: StartProxy, upstreams: Callable[[str], HealthUpstream]
) -> None:
    """A response to real traffic carrying ``x-envoy-immediate-health-check-fail``
    takes its (health-checked) host out at once, before its next check: a passive
    failure."""
    a, b = upstreams("a"), upstreams("b")
    check = http_check(interval="60s", no_traffic_interval="60s")
    proxy = start_proxy(proxy_config([a.address, b.address], check))
    wait_flags(proxy, {addr(a): "healthy", addr(b): "healthy"})
    b.set(traffic_immediate=1)
    assert {n for n in served_by(proxy, 2)} == {"a", "b"}
    wait_flags(
        proxy, {addr(a): "healthy", addr(b): "/failed_active_hc/excluded_via_immediate_hc_fail"}
    )
    stats = proxy.stats()
    assert stats[f"cluster.{CLUSTER}.health_check.passive_failure"] == 1
    assert stats[f"cluster.{CLUSTER}.health_check.failure"] == 1
    assert set(served_by(proxy, 4)) == {"a"}


def test_no_traffic_interval_until_the_cluster_has_traffic(
    start_proxy: StartProxy, upstreams: Callable[[str], HealthUpstream]
) -> None:
    """Before any traffic the checks run every ``no_traffic_interval`` (60 s by
    default), not every ``interval``: one check per host in the first seconds."""
    a = upstreams("a")
    check = http_check(interval="0.1s")
    del check["no_traffic_interval"]
    proxy = start_proxy(proxy_config([a.address], check))
    proxy.wait_stat(f"cluster.{CLUSTER}.health_check.success", 1)
    time.sleep(1.0)  # ten intervals, far less than no_traffic_interval
    stats = proxy.stats()
    assert stats[f"cluster.{CLUSTER}.health_check.attempt"] == 1
    assert stats[f"cluster.{CLUSTER}.health_check.success"] == 1


def test_garbage_answers_fail_the_host_without_harm(
    start_proxy: StartProxy, upstreams: Callable[[str], HealthUpstream]
) -> None:
    a, b = upstreams("a"), upstreams("b")
    b.set(garbage=1)
    proxy = start_proxy(proxy_config([a.address, b.address], http_check()))
    wait_flags(proxy, {addr(a): "healthy", addr(b): "/failed_active_hc"})
    # Unparsable answers are network failures, check after check.
    until(
        lambda: proxy.stats()[f"cluster.{CLUSTER}.health_check.network_failure"] >= 3,
        timeout=5,
        what="network failures",
    )
    assert set(served_by(proxy, 4)) == {"a"}
    assert proxy.running


def test_http2_codec_check(start_proxy: StartProxy) -> None:
    """``codec_client_type: HTTP2`` checks over h2c (hypercorn with prior knowledge)."""
    server = H2cUpstream("h2").start()
    try:
        check = http_check(
            http_health_check={
                "path": "/healthz",
                "codec_client_type": "HTTP2",
                "request_headers_to_add": [{"header": {"key": "x-hc", "value": "yes"}}],
            }
        )
        proxy = start_proxy(proxy_config([server.address], check))
        wait_flags(proxy, {f"127.0.0.1:{server.address[1]}": "healthy"})
        until(lambda: server.requests, timeout=5, what="a check request")
        req = server.requests[0]
        assert (req.method, req.path, req.http_version) == ("GET", "/healthz", "2")
        # The cluster's name is the authority when the check names none.
        assert (req.header(":authority") or req.header("host")) == CLUSTER
        assert req.header("user-agent") == "Envoy/HC"
        assert req.header("x-hc") == "yes"
    finally:
        server.stop()


class ClosingHttpServer:
    """Answers one HTTP/1.1 request per connection (200, keep-alive by its headers),
    then closes the idle connection a moment later, as servers with short keep-alive
    timeouts do."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            time.sleep(0.05)

    def close(self) -> None:
        self.sock.close()


def test_idle_check_connection_closed_by_the_host_is_no_failure(
    start_proxy: StartProxy,
) -> None:
    """With reuse_connection, a connection the host closed between checks is
    replaced by a new one; the check does not fail."""
    server = ClosingHttpServer()
    try:
        check = http_check(interval="0.2s", no_traffic_interval="0.2s")
        proxy = start_proxy(proxy_config([("127.0.0.1", server.port)], check))
        proxy.wait_stat(f"cluster.{CLUSTER}.health_check.success", 4)
        stats = proxy.stats()
        assert stats[f"cluster.{CLUSTER}.health_check.failure"] == 0
        assert host_flags(proxy) == {f"127.0.0.1:{server.port}": "healthy"}
    finally:
        server.close()


# -- TCP ------------------------------------------------------------------------------


class PingServer:
    """Answers ``PONG`` to each ``PING``; something else when ``broken``."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.broken = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(1024)
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(b"NOPE" if self.broken else b"..PONG..")

    def close(self) -> None:
        self.sock.close()


def test_tcp_check_send_and_receive(start_proxy: StartProxy) -> None:
    server = PingServer()
    try:
        check = http_check()
        del check["http_health_check"]
        check["tcp_health_check"] = {
            # (with a newline: "PING" alone in hex would read as a YAML float)
            "send": {"text": b"PING\n".hex()},
            "receive": [{"text": b"PONG".hex()}],
        }
        proxy = start_proxy(proxy_config([("127.0.0.1", server.port)], check))
        target = f"127.0.0.1:{server.port}"
        wait_flags(proxy, {target: "healthy"})
        # An answer that never matches fails by timeout: a network timeout.
        server.broken = True
        wait_flags(proxy, {target: "/failed_active_hc/active_hc_timeout"}, timeout=8)
        server.broken = False
        wait_flags(proxy, {target: "healthy"}, timeout=8)
    finally:
        server.close()


# -- gRPC -----------------------------------------------------------------------------


class HealthServicer:
    """``grpc.health.v1.Health/Check`` with raw-bytes serializers: SERVING (1) unless
    the requested service is in ``not_serving``."""

    def __init__(self) -> None:
        self.not_serving: set[str] = set()
        self.services: list[str] = []

    def check(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        service = request[2:].decode() if request[:1] == b"\x0a" else ""
        self.services.append(service)
        return b"\x08\x02" if service in self.not_serving else b"\x08\x01"


def test_grpc_check(start_proxy: StartProxy) -> None:
    servicer = HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health",
        {"Check": grpc.unary_unary_rpc_method_handler(servicer.check)},
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        check = http_check()
        del check["http_health_check"]
        check["grpc_health_check"] = {"service_name": "svc"}
        h2 = {
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": HTTP_OPTIONS_TYPE,
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            }
        }
        proxy = start_proxy(proxy_config([("127.0.0.1", port)], check, **h2))
        target = f"127.0.0.1:{port}"
        wait_flags(proxy, {target: "healthy"})
        assert "svc" in servicer.services
        servicer.not_serving.add("svc")
        wait_flags(proxy, {target: "/failed_active_hc"})
        servicer.not_serving.clear()
        wait_flags(proxy, {target: "healthy"})
    finally:
        server.stop(None)


# -- configuration (envoyx only: the refusals are envoyx's) ---------------------------


def test_unsupported_health_check_fields_are_refused_by_name(tmp_path: Any) -> None:
    import envoyx

    grpc_check = http_check()
    del grpc_check["http_health_check"]
    grpc_check["grpc_health_check"] = {}
    with pytest.raises(
        envoyx.ConfigError, match="backend cluster must support HTTP/2 for gRPC healthchecking"
    ):
        envoyx.Server(proxy_config([("127.0.0.1", 1)], grpc_check))
    # The event logs are written (tests/test_event_logs.py); a gRPC event service is not.
    config = proxy_config(
        [("127.0.0.1", 1)],
        http_check(event_service={"grpc_service": {"envoy_grpc": {"cluster_name": CLUSTER}}}),
    )
    with pytest.raises(envoyx.ConfigError, match=r"health_checks\[0\]\.event_service"):
        envoyx.Server(config)


# -- hosts and clusters that come and go (xDS) ----------------------------------------


def xds_health_cluster(**extra: Any) -> Json:
    c = eds_cluster(CLUSTER)
    c["health_checks"] = [http_check()]
    c.update(extra)
    return c


@pytest.mark.parametrize("ignore_health_on_host_removal", [False, True])
def test_eds_removal_of_a_passing_host_and_cluster_removal(
    start_proxy: StartProxy,
    upstreams: Callable[[str], HealthUpstream],
    ignore_health_on_host_removal: bool,
) -> None:
    """EDS drops host b while it passes its checks: Envoy keeps it
    (``/pending_dynamic_removal``) until a check fails it, unless
    ``ignore_health_on_host_removal``. Removing the cluster (CDS) ends its checks."""
    a, b = upstreams("a"), upstreams("b")
    extra = {"ignore_health_on_host_removal": True} if ignore_health_on_host_removal else {}
    port = free_port()
    with XdsServer() as xds:
        xds.set_snapshot(
            {
                XDS_CLUSTER: {CLUSTER: xds_health_cluster(**extra)},
                ENDPOINT: {CLUSTER: cluster_load_assignment(CLUSTER, [a.address, b.address])},
                LISTENER: {"main": listener("main", port, route_config_name="main_routes")},
                ROUTE: {"main_routes": simple_routes("main_routes", CLUSTER)},
            }
        )
        proxy = start_proxy(ads_bootstrap(xds_address=xds.address, admin_port=free_port()))
        wait_flags(proxy, {addr(a): "healthy", addr(b): "healthy"})
        since = xds.mark()
        version = xds.set_resources(
            ENDPOINT, {CLUSTER: cluster_load_assignment(CLUSTER, [a.address])}
        )
        xds.wait_for_ack(ENDPOINT, version, since=since)
        if ignore_health_on_host_removal:
            wait_flags(proxy, {addr(a): "healthy"})
        else:
            wait_flags(proxy, {addr(a): "healthy", addr(b): "/pending_dynamic_removal"})
            b.set(hc=503)
            wait_flags(proxy, {addr(a): "healthy"})
        # No more checks for b once it is gone (one may have been in flight).
        time.sleep(0.3)
        settled = b.checks()
        time.sleep(0.5)  # five intervals
        assert b.checks() == settled
        # The cluster goes away: its checks end too.
        since = xds.mark()
        version = xds.set_resources(XDS_CLUSTER, {})
        xds.wait_for_ack(XDS_CLUSTER, version, since=since)
        time.sleep(1.5)  # past the supervisor's one-second beat
        settled = a.checks()
        time.sleep(0.5)
        assert a.checks() == settled
