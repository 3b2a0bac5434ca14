"""Endpoint attributes arriving over EDS (a real ADS server), against envoyx and
(second parametrization) the real Envoy 1.40 with the same bootstrap and updates:

- an EDS update marks the priority-0 hosts UNHEALTHY / DRAINING: traffic fails over
  to priority 1; the next update marks them HEALTHY again and traffic comes back;
- an EDS update changes endpoint weights in place (same hosts): round robin follows
  the new weights;
- ``overprovisioning_factor`` in the ClusterLoadAssignment's policy;
- ``common_lb_config.close_connections_on_host_set_change``: when a host joins, the
  pooled connection to a host that stays is not reused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from support.lb import KeepAliveClient, lb_endpoint
from support.proxy import ProxyProcess
from support.upstreams import HttpUpstream
from support.wait import free_port, until
from support.xds_resources import ads_bootstrap, eds_cluster, listener, simple_routes
from support.xds_server import CLUSTER, ENDPOINT, LISTENER, ROUTE, XdsServer

StartProxy = Callable[..., ProxyProcess]
Json = dict[str, Any]
BACKEND = "backend"


@pytest.fixture
def ups() -> Iterator[dict[str, HttpUpstream]]:
    started = {n: HttpUpstream(n).start() for n in ("p0a", "p0b", "p1a")}
    yield started
    for u in started.values():
        u.stop()


def assignment(localities: list[Json], policy: Json | None = None) -> Json:
    cla: Json = {"cluster_name": BACKEND, "endpoints": localities}
    if policy:
        cla["policy"] = policy
    return cla


class EdsProxy:
    """An ADS server and a proxy whose cluster ``backend`` takes its endpoints from it."""

    def __init__(self, start: StartProxy, xds: XdsServer, cluster: Json, first: Json) -> None:
        self.xds = xds
        self.port = free_port()
        xds.set_snapshot(
            {
                CLUSTER: {BACKEND: cluster},
                ENDPOINT: {BACKEND: first},
                LISTENER: {"main": listener("main", self.port, route_config_name="routes")},
                ROUTE: {"routes": simple_routes("routes", BACKEND)},
            }
        )
        self.proxy = start(ads_bootstrap(xds_address=xds.address, admin_port=free_port()))
        self.client = KeepAliveClient(("127.0.0.1", self.port))
        until(lambda: self.client.get()[0] == 200, what="the xDS listener")

    def update(self, cla: Json) -> None:
        since = self.xds.mark()
        version = self.xds.set_resources(ENDPOINT, {BACKEND: cla})
        self.xds.wait_for_ack(ENDPOINT, version, since=since)

    def served(self, n: int) -> dict[str, int]:
        return dict(self.client.served_by(n))


def test_eds_health_status_fails_over_and_back(
    start_proxy: StartProxy, ups: dict[str, HttpUpstream]
) -> None:
    def localities(p0_health: str | None, p0b_health: str | None) -> list[Json]:
        return [
            {
                "lb_endpoints": [
                    lb_endpoint(ups["p0a"].address, health=p0_health),
                    lb_endpoint(ups["p0b"].address, health=p0b_health),
                ]
            },
            {"priority": 1, "lb_endpoints": [lb_endpoint(ups["p1a"].address)]},
        ]

    with XdsServer() as xds:
        eds = EdsProxy(start_proxy, xds, eds_cluster(BACKEND), assignment(localities(None, None)))
        assert set(eds.served(20)) == {"p0a", "p0b"}
        eds.update(assignment(localities("UNHEALTHY", "DRAINING")))
        until(lambda: set(eds.served(10)) == {"p1a"}, what="failover to priority 1")
        assert set(eds.served(50)) == {"p1a"}
        eds.update(assignment(localities("HEALTHY", "HEALTHY")))
        until(lambda: "p1a" not in eds.served(10), what="back to priority 0")
        assert set(eds.served(50)) == {"p0a", "p0b"}
        # Half healthy: 70% stay on priority 0; with a factor of 200, all of it.
        eds.update(assignment(localities(None, "UNHEALTHY"), {"overprovisioning_factor": 200}))
        until(lambda: set(eds.served(10)) == {"p0a"}, what="the factor of 200")
        assert set(eds.served(300)) == {"p0a"}
        eds.client.close()


def test_eds_weight_change_in_place(start_proxy: StartProxy, ups: dict[str, HttpUpstream]) -> None:
    def weights(a: int, b: int) -> Json:
        return assignment(
            [
                {
                    "lb_endpoints": [
                        lb_endpoint(ups["p0a"].address, weight=a),
                        lb_endpoint(ups["p0b"].address, weight=b),
                    ]
                }
            ]
        )

    with XdsServer() as xds:
        eds = EdsProxy(start_proxy, xds, eds_cluster(BACKEND), weights(1, 1))
        eds.update(weights(1, 3))
        until(lambda: eds.served(400) == {"p0a": 100, "p0b": 300}, what="weights 1:3")
        # The hosts stayed: still one pooled connection each.
        assert ups["p0a"].connections_total == 1
        assert ups["p0b"].connections_total == 1
        eds.client.close()


@pytest.mark.parametrize("close", [True, False])
def test_close_connections_on_host_set_change(
    start_proxy: StartProxy, ups: dict[str, HttpUpstream], close: bool
) -> None:
    cluster = eds_cluster(BACKEND)
    cluster["common_lb_config"] = {"close_connections_on_host_set_change": close}
    one = assignment([{"lb_endpoints": [lb_endpoint(ups["p0a"].address)]}])
    two = assignment(
        [{"lb_endpoints": [lb_endpoint(ups["p0a"].address), lb_endpoint(ups["p0b"].address)]}]
    )
    with XdsServer() as xds:
        eds = EdsProxy(start_proxy, xds, cluster, one)
        assert eds.served(3) == {"p0a": 3}
        assert ups["p0a"].connections_total == 1
        eds.update(two)
        until(lambda: "p0b" in eds.served(4), what="the new host")
        eds.served(10)
        # p0a's first connection was dropped (a new one opened) only with the option.
        assert ups["p0a"].connections_total == (2 if close else 1)
        eds.client.close()
