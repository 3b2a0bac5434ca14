"""Load-balancing policies seen from real upstreams, statistically, against envoyx
and (second parametrization) the real Envoy 1.40 with the same bootstrap:

- ``ROUND_ROBIN`` with endpoint weights 1:2:3 (Envoy's EDF scheduler): each host
  gets its weight's share of 12,000 requests;
- ``RANDOM``: uniform over the hosts, weights ignored (as Envoy does);
- ``LEAST_REQUEST``: a slow host (its requests stay active longer) gets less of
  concurrent traffic than a fast one;
- the typed ``load_balancing_policy`` form behaves as ``lb_policy``.

Tolerances are a few standard deviations wide, so the tests fail only when the
distribution is wrong.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import h11
import pytest

from support.lb import KeepAliveClient, lb_endpoint, lb_proxy
from support.proxy import ProxyProcess
from support.upstreams import HttpUpstream

StartProxy = Callable[..., ProxyProcess]
LB_POLICY = "type.googleapis.com/envoy.extensions.load_balancing_policies."


@pytest.fixture
def upstreams() -> Iterator[list[HttpUpstream]]:
    ups = [HttpUpstream(f"u{i}").start() for i in range(4)]
    yield ups
    for u in ups:
        u.stop()


def within(tally: Counter[str], expected: dict[str, float], tolerance: float) -> None:
    total = sum(tally.values())
    for name, share in expected.items():
        got = tally[name] / total
        assert abs(got - share) <= tolerance, f"{name}: {got:.3f} of {total}, expected {share:.3f}"


def test_weighted_round_robin_follows_weights(
    start_proxy: StartProxy, upstreams: list[HttpUpstream]
) -> None:
    """Weights 1:2:3: over 10,002 requests (whole EDF cycles) the shares are 1/6,
    2/6, 3/6 — exactly, give or take the cycle a worker started in."""
    eps = [lb_endpoint(u.address, weight=w) for u, w in zip(upstreams, (1, 2, 3), strict=False)]
    proxy = start_proxy(lb_proxy([{"lb_endpoints": eps}]))
    with KeepAliveClient(proxy.listener_address()) as client:
        tally = client.served_by(10_002)
    within(tally, {"u0": 1 / 6, "u1": 2 / 6, "u2": 3 / 6}, 0.005)


def test_round_robin_with_equal_weights_alternates(
    start_proxy: StartProxy, upstreams: list[HttpUpstream]
) -> None:
    eps = [lb_endpoint(u.address) for u in upstreams[:3]]
    proxy = start_proxy(lb_proxy([{"lb_endpoints": eps}]))
    with KeepAliveClient(proxy.listener_address()) as client:
        order = [client.get()[1]["x-upstream"] for _ in range(9)]
    assert order[:3] * 3 == order and len(set(order[:3])) == 3, order


@pytest.mark.parametrize("spelling", ["lb_policy", "load_balancing_policy"])
def test_random_is_uniform_and_ignores_weights(
    start_proxy: StartProxy, upstreams: list[HttpUpstream], spelling: str
) -> None:
    """10,000 requests over 4 hosts, one of weight 5: each host gets 1/4 ± 3% (about
    7 standard deviations; the typed spelling, checked for equivalence, 2,000
    requests and ± 5%)."""
    eps = [lb_endpoint(u.address, weight=w) for u, w in zip(upstreams, (1, 1, 1, 5), strict=False)]
    extra: dict[str, Any] = {"lb_policy": "RANDOM"}
    if spelling == "load_balancing_policy":
        extra = {
            "load_balancing_policy": {
                "policies": [
                    {
                        "typed_extension_config": {
                            "name": "random",
                            "typed_config": {"@type": f"{LB_POLICY}random.v3.Random"},
                        }
                    }
                ]
            }
        }
    proxy = start_proxy(lb_proxy([{"lb_endpoints": eps}], cluster_extra=extra))
    n, tolerance = (10_000, 0.03) if spelling == "lb_policy" else (2_000, 0.05)
    with KeepAliveClient(proxy.listener_address()) as client:
        tally = client.served_by(n)
    within(tally, {u.name: 0.25 for u in upstreams}, tolerance)


class SlowUpstream(HttpUpstream):
    """An upstream that takes ``delay`` seconds over each response."""

    def __init__(self, name: str, delay: float) -> None:
        super().__init__(name)
        self.delay = delay

    def _handle(self, sock: Any, conn: h11.Connection, request: h11.Request, *rest: Any) -> bool:
        time.sleep(self.delay)
        return super()._handle(sock, conn, request, *rest)


@pytest.mark.parametrize("choice_count", [2, 5])
def test_least_request_sends_less_to_a_slow_host(
    start_proxy: StartProxy, choice_count: int
) -> None:
    """Two hosts, one answering in 40 ms and one at once; 8 clients in parallel.
    Round robin would give each half; least request (with ``choice_count``) sees the
    slow host's active requests and sends it clearly less."""
    slow, fast = SlowUpstream("slow", 0.04).start(), HttpUpstream("fast").start()
    try:
        eps = [lb_endpoint(slow.address), lb_endpoint(fast.address)]
        extra = {
            "lb_policy": "LEAST_REQUEST",
            "least_request_lb_config": {"choice_count": choice_count},
        }
        proxy = start_proxy(lb_proxy([{"lb_endpoints": eps}], cluster_extra=extra))
        tally: Counter[str] = Counter()
        lock = threading.Lock()

        def client() -> None:
            with KeepAliveClient(proxy.listener_address()) as c:
                got = c.served_by(60)
            with lock:
                tally.update(got)

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(tally.values()) == 480
        # The slow host wins only when every choice is the slow host (1/2^n) or
        # on a tie: about 0.27 of requests for 2 choices, 0.04 for 5; round robin
        # would give it 0.5.
        assert tally["slow"] < (0.4 if choice_count == 2 else 0.15) * 480, tally
    finally:
        slow.stop()
        fast.stop()


@pytest.mark.parametrize("policy", ["ROUND_ROBIN", "RANDOM", "LEAST_REQUEST"])
def test_locality_weights_split_traffic(
    start_proxy: StartProxy, upstreams: list[HttpUpstream], policy: str
) -> None:
    """``locality_weighted_lb_config``: zone a (weight 1, one host) gets 1/4 of the
    requests, zone b (weight 3, two hosts) 3/4, whatever the policy."""
    localities = [
        {
            "locality": {"zone": "a"},
            "load_balancing_weight": 1,
            "lb_endpoints": [lb_endpoint(upstreams[0].address)],
        },
        {
            "locality": {"zone": "b"},
            "load_balancing_weight": 3,
            "lb_endpoints": [lb_endpoint(u.address) for u in upstreams[1:3]],
        },
    ]
    extra = {"lb_policy": policy, "common_lb_config": {"locality_weighted_lb_config": {}}}
    proxy = start_proxy(lb_proxy(localities, cluster_extra=extra))
    with KeepAliveClient(proxy.listener_address()) as client:
        tally = client.served_by(2_000)
    within(tally, {"u0": 0.25}, 0.04)
    assert tally["u1"] > 0 and tally["u2"] > 0, tally
