"""go-control-plane's integration resources served to a proxy, as its CI driver
(``pkg/test/main``) serves them to Envoy: each snapshot is ``resource.TestSnapshot``'s
(``tests/xds_go --resources integration``) — EDS clusters, HTTP listeners with RDS
(``MakeRouteHTTPListener``), HTTP listeners with scoped RDS keyed by the Host header
(``MakeScopedRouteHTTPListener``, ``MakeScopedRouteConfig``), TCP listeners
(``MakeTCPListener``), a runtime layer (``MakeRuntime``) and an extension config —
over ADS and Delta ADS, with traffic through every listener checked after each
snapshot (as the driver's ``callEcho``) and every response ACKed.

The HTTP listeners carry an ``envoy.access_loggers.http_grpc`` logger to
``als_cluster`` (in the bootstrap, as in the module's ``sample/bootstrap-ads.yaml``;
nothing listens there: a dead receiver loses log entries, never traffic). Both proxies
run the resources as they are.
"""

from __future__ import annotations

import http.client
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_xds_go import API_TYPES, XdsGoServer, ads_bootstrap, free_port_block, xds_go_binary

from support.envoy import targets_from_env
from support.upstreams import HttpUpstream
from support.wait import free_port, until

__all__ = ["xds_go_binary"]  # the fixture, shared with test_xds_go.py

pytestmark = pytest.mark.envoy

UPSTREAM = "xds-go-integration-upstream"
PER_KIND = 2  # HTTP (RDS), scoped HTTP (SRDS) and TCP listeners of each snapshot
CLUSTERS = 4
SNAPSHOTS = 3  # the driver's default number of updates
CONVERGE_TIMEOUT_S = 15.0
TYPES = tuple(
    "type.googleapis.com/envoy." + t
    for t in (
        "config.cluster.v3.Cluster",
        "config.endpoint.v3.ClusterLoadAssignment",
        "config.listener.v3.Listener",
        "config.route.v3.ScopedRouteConfiguration",
        "config.route.v3.RouteConfiguration",
    )
)


@pytest.fixture(scope="module")
def upstream() -> Iterator[HttpUpstream]:
    up = HttpUpstream(UPSTREAM).start()
    yield up
    up.stop()


def _dead_port() -> int:
    """A loopback port nobody listens on (the access-log receiver's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, host: str | None = None) -> tuple[int, str | None]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/", headers={"host": host} if host else {})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("x-upstream")
    except OSError as exc:
        return -1, repr(exc)
    finally:
        conn.close()


def _check_traffic(base: int) -> None:
    """As the driver's callEcho: every listener reaches the upstream (the scoped ones
    with their scope's key, the Host ``127.0.0.1:<port>``); a scoped listener answers
    404 to a Host that is no scope's key."""
    ok = (200, UPSTREAM)
    ports = range(base, base + 3 * PER_KIND)
    for port in ports:
        until(lambda p=port: _get(p) == ok, timeout=CONVERGE_TIMEOUT_S, what=f":{port} serves")
    for _ in range(2):
        assert {p: _get(p) for p in ports} == dict.fromkeys(ports, ok)
    for port in range(base + PER_KIND, base + 2 * PER_KIND):
        assert _get(port, host="elsewhere.example") == (404, None)


@pytest.mark.parametrize("mode", ["ads", "delta-ads"])
@pytest.mark.parametrize("target", targets_from_env("ENVOYX_XDS_TARGETS"))
def test_integration_snapshots(
    target: str,
    mode: str,
    request: pytest.FixtureRequest,
    xds_go_binary: Path,
    upstream: HttpUpstream,
    tmp_path: Path,
) -> None:
    base = free_port_block(3 * PER_KIND)
    server = XdsGoServer(
        xds_go_binary,
        mode=mode,
        upstream_port=upstream.port,
        base_port=base,
        listeners=PER_KIND,
        log_path=tmp_path / f"xds-go-{mode}.log",
        extra_args=(
            "--resources",
            "integration",
            "--clusters",
            str(CLUSTERS),
        ),
    )
    try:
        bootstrap = ads_bootstrap(
            admin_port=free_port(), xds_port=server.port, api_type=API_TYPES[mode]
        )
        bootstrap["static_resources"]["clusters"].append(
            {
                "name": "als_cluster",
                "type": "STATIC",
                "connect_timeout": "1s",
                "typed_extension_protocol_options": bootstrap["static_resources"]["clusters"][0][
                    "typed_extension_protocol_options"
                ],
                "load_assignment": {
                    "cluster_name": "als_cluster",
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {
                                    "endpoint": {
                                        "address": {
                                            "socket_address": {
                                                "address": "127.0.0.1",
                                                "port_value": _dead_port(),
                                            }
                                        }
                                    }
                                }
                            ]
                        }
                    ],
                },
            }
        )
        proxy = request.getfixturevalue(f"start_{target}")(bootstrap, wait_ready=False)
        start = 0
        for n in range(SNAPSHOTS):
            version = f"v{n}"
            if n:
                start = server.mark()
                assert server.update() == version
            for type_url in TYPES:
                server.wait_event(
                    # A NACK's version is the one still in use: any NACK of the type.
                    lambda e, t=type_url, v=version: (
                        (e.kind == "ack" and e.args[:2] == (t, v))
                        or (e.kind == "nack" and e.args[0] == t)
                    ),
                    start=start,
                )
                assert not server.nacks(), "\n".join(e.line for e in server.nacks())
            _check_traffic(base)
        stats = proxy.stats()
        # Envoy shares one SRDS subscription among the scoped listeners (same source);
        # envoyx counts it per connection manager: only the scope counts are compared.
        assert stats["http.http.scoped_rds.scoped-route-config.all_scopes"] == PER_KIND
        assert not server.nacks()
    except BaseException:
        print(server.transcript())
        raise
    finally:
        server.stop()
