"""Priorities, EDS health status and panic mode, against envoyx and (second
parametrization) the real Envoy 1.40 with the same bootstrap. The endpoints'
``health_status`` (as EDS would send it, here in the static load assignment) marks
hosts unhealthy, draining or degraded:

- priority 0 all unhealthy/draining → every request goes to priority 1;
- priority 0 half healthy → 70% stays (overprovisioning factor 1.4), 30% spills
  to priority 1; with ``overprovisioning_factor: 200`` nothing spills;
- below ``healthy_panic_threshold`` (default 50%) a priority uses all its hosts,
  unhealthy ones included; with the threshold at 0 it never panics;
- degraded hosts take only what healthy ones cannot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from support.lb import KeepAliveClient, lb_endpoint, lb_proxy
from support.proxy import ProxyProcess
from support.upstreams import HttpUpstream

StartProxy = Callable[..., ProxyProcess]


@pytest.fixture
def ups() -> Iterator[dict[str, HttpUpstream]]:
    started = {n: HttpUpstream(n).start() for n in ("p0a", "p0b", "p0c", "p1a", "p1b")}
    yield started
    for u in started.values():
        u.stop()


def served(proxy: ProxyProcess, n: int) -> dict[str, int]:
    with KeepAliveClient(proxy.listener_address()) as client:
        return dict(client.served_by(n))


def test_priority_0_unhealthy_by_eds_status_fails_over_to_priority_1(
    start_proxy: StartProxy, ups: dict[str, HttpUpstream]
) -> None:
    localities = [
        {
            "lb_endpoints": [
                lb_endpoint(ups["p0a"].address, health="UNHEALTHY"),
                lb_endpoint(ups["p0b"].address, health="DRAINING"),
                lb_endpoint(ups["p0c"].address, health="TIMEOUT"),
            ]
        },
        {
            "priority": 1,
            "lb_endpoints": [lb_endpoint(ups["p1a"].address), lb_endpoint(ups["p1b"].address)],
        },
    ]
    tally = served(start_proxy(lb_proxy(localities)), 200)
    assert set(tally) == {"p1a", "p1b"}, tally


@pytest.mark.parametrize(("factor", "p0_share"), [(None, 0.7), (200, 1.0)])
def test_partial_health_spills_over_by_the_overprovisioning_factor(
    start_proxy: StartProxy, ups: dict[str, HttpUpstream], factor: int | None, p0_share: float
) -> None:
    localities = [
        {
            "lb_endpoints": [
                lb_endpoint(ups["p0a"].address),
                lb_endpoint(ups["p0b"].address, health="UNHEALTHY"),
            ]
        },
        {"priority": 1, "lb_endpoints": [lb_endpoint(ups["p1a"].address)]},
    ]
    policy = {"overprovisioning_factor": factor} if factor else None
    tally = served(start_proxy(lb_proxy(localities, policy=policy)), 2000)
    assert "p0b" not in tally
    share = tally.get("p0a", 0) / 2000
    assert abs(share - p0_share) <= 0.04, tally


@pytest.mark.parametrize(("threshold", "panic"), [(None, True), (0, False)])
def test_panic_mode_uses_every_host_of_the_priority(
    start_proxy: StartProxy, ups: dict[str, HttpUpstream], threshold: int | None, panic: bool
) -> None:
    """One healthy host of three (33% < 50%): panic, all three share the traffic;
    with the threshold at 0 only the healthy host gets it."""
    localities = [
        {
            "lb_endpoints": [
                lb_endpoint(ups["p0a"].address),
                lb_endpoint(ups["p0b"].address, health="UNHEALTHY"),
                lb_endpoint(ups["p0c"].address, health="UNHEALTHY"),
            ]
        },
    ]
    extra = {}
    if threshold is not None:
        extra = {"common_lb_config": {"healthy_panic_threshold": {"value": threshold}}}
    proxy = start_proxy(lb_proxy(localities, cluster_extra=extra))
    tally = served(proxy, 300)
    # One count per pick made in panic mode.
    proxy.wait_stat("cluster.backend.lb_healthy_panic", 300 if panic else 0)
    if panic:
        assert set(tally) == {"p0a", "p0b", "p0c"}, tally
        assert all(80 <= n <= 120 for n in tally.values()), tally
    else:
        assert tally == {"p0a": 300}


def test_degraded_hosts_take_only_what_healthy_ones_cannot(
    start_proxy: StartProxy, ups: dict[str, HttpUpstream]
) -> None:
    """One healthy and three degraded hosts: healthy availability 140 * 1/4 = 35%,
    the degraded hosts take the other 65%."""
    localities = [
        {
            "lb_endpoints": [
                lb_endpoint(ups["p0a"].address),
                lb_endpoint(ups["p0b"].address, health="DEGRADED"),
                lb_endpoint(ups["p0c"].address, health="DEGRADED"),
                lb_endpoint(ups["p1a"].address, health="DEGRADED"),
            ]
        },
    ]
    tally = served(start_proxy(lb_proxy(localities)), 2000)
    assert abs(tally["p0a"] / 2000 - 0.35) <= 0.04, tally
