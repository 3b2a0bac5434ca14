"""Consistent hashing as Envoy does it, differential against the real Envoy 1.40:

- ``RING_HASH`` and ``MAGLEV`` with a route ``hash_policy`` on a header: for 200
  keys, envoyx sends each key to the same upstream as Envoy, with all five hosts
  and after one host is removed (a bootstrap without it: the ring or table is
  rebuilt from the remaining hosts, as on an EDS removal); about 1/5 of the keys
  move, and only those of the removed host for Maglev mostly;
- the typed ``load_balancing_policy`` spelling gives the same mapping;
- ``cookie`` with a ``ttl``: without the cookie the proxy makes one up for the
  connection and sets it on the response, spelled as Envoy spells it; with the
  cookie the request sticks to one host.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from support.lb import KeepAliveClient, lb_endpoint, lb_proxy
from support.proxy import ProxyProcess
from support.upstreams import HttpUpstream

StartProxy = Callable[..., ProxyProcess]
LB_POLICY = "type.googleapis.com/envoy.extensions.load_balancing_policies."
KEYS = [f"user-{i}" for i in range(200)]
HEADER_HASH = [{"header": {"header_name": "x-key"}}]


@pytest.fixture(scope="module")
def upstreams() -> Iterator[list[HttpUpstream]]:
    ups = [HttpUpstream(f"u{i}").start() for i in range(5)]
    yield ups
    for u in ups:
        u.stop()


def policy_fields(policy: str, spelling: str) -> dict[str, Any]:
    if spelling == "lb_policy":
        return {"lb_policy": policy}
    typed = {
        "RING_HASH": ("ring_hash.v3.RingHash", {}),
        "MAGLEV": ("maglev.v3.Maglev", {}),
    }[policy]
    return {
        "load_balancing_policy": {
            "policies": [
                {
                    "typed_extension_config": {
                        "name": policy.lower(),
                        "typed_config": {"@type": f"{LB_POLICY}{typed[0]}", **typed[1]},
                    }
                }
            ]
        }
    }


def key_map(proxy: ProxyProcess) -> dict[str, str]:
    with KeepAliveClient(proxy.listener_address()) as client:
        return {k: client.get("/", {"x-key": k})[1]["x-upstream"] for k in KEYS}


@pytest.mark.parametrize("spelling", ["lb_policy", "load_balancing_policy"])
@pytest.mark.parametrize("policy", ["RING_HASH", "MAGLEV"])
def test_keys_reach_the_same_hosts_as_in_envoy(
    start_envoyx: StartProxy,
    start_envoy: StartProxy,
    upstreams: list[HttpUpstream],
    policy: str,
    spelling: str,
) -> None:
    maps: dict[str, list[dict[str, str]]] = {}
    for kind, start in (("envoyx", start_envoyx), ("envoy", start_envoy)):
        for hosts in (upstreams, [u for u in upstreams if u.name != "u2"]):
            bs = lb_proxy(
                [{"lb_endpoints": [lb_endpoint(u.address) for u in hosts]}],
                cluster_extra=policy_fields(policy, spelling),
                hash_policy=HEADER_HASH,
            )
            proxy = start(bs)
            maps.setdefault(kind, []).append(key_map(proxy))
            proxy.stop()
    assert maps["envoyx"][0] == maps["envoy"][0]
    assert maps["envoyx"][1] == maps["envoy"][1]
    full, fewer = maps["envoyx"]
    assert len(set(full.values())) == 5
    moved = [k for k in KEYS if full[k] != fewer[k]]
    # The removed host's keys (about 1/5) and, as the ring/table is rebuilt with more
    # points per remaining host, some others: how many depends on where the hosts'
    # (random) ports put them, up to ~40% in runs here — with exactly Envoy's maps, as
    # asserted above. The bound only catches a rebuild that moves most keys.
    assert {k for k in KEYS if full[k] == "u2"} <= set(moved)
    assert 0.1 * len(KEYS) <= len(moved) <= 0.5 * len(KEYS), len(moved)


def test_weighted_ring_and_table_match_envoy(
    start_envoyx: StartProxy, start_envoy: StartProxy, upstreams: list[HttpUpstream]
) -> None:
    """Endpoint weights 1..5 shape the ring (running sums of fractional shares) and
    the Maglev table (rounds by share) exactly as in Envoy."""
    eps = [lb_endpoint(u.address, weight=w) for u, w in zip(upstreams, range(1, 6), strict=True)]
    for policy in ("RING_HASH", "MAGLEV"):
        got = []
        for start in (start_envoyx, start_envoy):
            proxy = start(
                lb_proxy(
                    [{"lb_endpoints": eps}],
                    cluster_extra={"lb_policy": policy},
                    hash_policy=HEADER_HASH,
                )
            )
            got.append(key_map(proxy))
            proxy.stop()
        assert got[0] == got[1], policy


COOKIE = re.compile(r'^sticky="([0-9a-f]{16})"; Max-Age=60; Path=/; HttpOnly$')


def test_cookie_with_ttl_is_generated_and_sticks(
    start_proxy: StartProxy, upstreams: list[HttpUpstream]
) -> None:
    hash_policy = [{"cookie": {"name": "sticky", "ttl": "60s", "path": "/"}}]
    proxy = start_proxy(
        lb_proxy(
            [{"lb_endpoints": [lb_endpoint(u.address) for u in upstreams]}],
            cluster_extra={"lb_policy": "RING_HASH"},
            hash_policy=hash_policy,
        )
    )
    with KeepAliveClient(proxy.listener_address()) as client:
        _, first = client.get()
        m = COOKIE.match(first.get("set-cookie", ""))
        assert m, first
        # Same connection, no cookie: the same value (made from the connection's
        # addresses), so racing streams get one cookie.
        _, again = client.get()
        assert again["set-cookie"] == first["set-cookie"]
        # With the cookie: no new one, and always the same host.
        cookie = {"cookie": f'sticky="{m.group(1)}"'}
        hosts = set()
        for _ in range(20):
            _, got = client.get("/", cookie)
            assert "set-cookie" not in got
            hosts.add(got["x-upstream"])
        # The cookie hashes as the generated value did: the first request's host.
        assert hosts == {first["x-upstream"]} == {again["x-upstream"]}
    with KeepAliveClient(proxy.listener_address()) as other:
        _, theirs = other.get()
    # Another connection (another client port): another cookie.
    assert theirs["set-cookie"] != first["set-cookie"]


def test_cookie_without_ttl_and_without_cookie_picks_at_random(
    start_proxy: StartProxy, upstreams: list[HttpUpstream]
) -> None:
    """No hash: ring hash picks at random, and no cookie is set."""
    proxy = start_proxy(
        lb_proxy(
            [{"lb_endpoints": [lb_endpoint(u.address) for u in upstreams]}],
            cluster_extra={"lb_policy": "RING_HASH"},
            hash_policy=[{"cookie": {"name": "sticky"}}],
        )
    )
    with KeepAliveClient(proxy.listener_address()) as client:
        seen = set()
        for _ in range(100):
            _, got = client.get()
            assert "set-cookie" not in got
            seen.add(got["x-upstream"])
    assert len(seen) == 5


# Several policies on one route: Envoy rotates and xors their hashes in order, and a
# terminal policy that produced a hash ends the list.
COMBINED = {
    "query": [{"query_parameter": {"name": "user"}}],
    "header+query": [
        {"header": {"header_name": "x-key"}},
        {"query_parameter": {"name": "user"}},
    ],
    "terminal query, then header": [
        {"query_parameter": {"name": "user"}, "terminal": True},
        {"header": {"header_name": "x-key"}},
    ],
    "source ip + header": [
        {"connection_properties": {"source_ip": True}},
        {"header": {"header_name": "x-key"}},
    ],
}


@pytest.mark.parametrize("name", list(COMBINED))
def test_hash_policies_combine_as_in_envoy(
    start_envoyx: StartProxy,
    start_envoy: StartProxy,
    upstreams: list[HttpUpstream],
    name: str,
) -> None:
    """Each request has a header and most a query parameter (those without it get
    nothing from the terminal policy, so the header decides): the host of every
    request is Envoy's, for MAGLEV."""
    # Without any hash the pick is random: the query-only policy gets the parameter
    # on every request.
    always = name == "query"
    requests = [
        (f"/p?a=1&user=u{i}" if i % 4 or always else "/p?a=1", {"x-key": f"k{i % 7}"})
        for i in range(80)
    ]
    got = []
    for start in (start_envoyx, start_envoy):
        proxy = start(
            lb_proxy(
                [{"lb_endpoints": [lb_endpoint(u.address) for u in upstreams]}],
                cluster_extra={"lb_policy": "MAGLEV"},
                hash_policy=COMBINED[name],
            )
        )
        with KeepAliveClient(proxy.listener_address()) as client:
            got.append([client.get(path, h)[1]["x-upstream"] for path, h in requests])
        proxy.stop()
    assert got[0] == got[1]
    assert len(set(got[0])) > 1


def test_locality_weights_shape_the_table_as_in_envoy(
    start_envoyx: StartProxy, start_envoy: StartProxy, upstreams: list[HttpUpstream]
) -> None:
    """With ``locality_weighted_lb_config``, a host's share of the ring and of the
    Maglev table is its locality's weight times its weight within the locality."""
    localities = [
        {
            "locality": {"zone": "a"},
            "load_balancing_weight": 1,
            "lb_endpoints": [lb_endpoint(u.address) for u in upstreams[:3]],
        },
        {
            "locality": {"zone": "b"},
            "load_balancing_weight": 4,
            "lb_endpoints": [
                lb_endpoint(upstreams[3].address, weight=2),
                lb_endpoint(upstreams[4].address),
            ],
        },
    ]
    for policy in ("RING_HASH", "MAGLEV"):
        extra = {"lb_policy": policy, "common_lb_config": {"locality_weighted_lb_config": {}}}
        got = []
        for start in (start_envoyx, start_envoy):
            proxy = start(lb_proxy(localities, cluster_extra=extra, hash_policy=HEADER_HASH))
            got.append(key_map(proxy))
            proxy.stop()
        assert got[0] == got[1], policy
        # Zone b (4/5 of the weight) takes most keys.
        in_b = sum(1 for host in got[0].values() if host in ("u3", "u4"))
        assert in_b > 0.6 * len(KEYS), (policy, in_b)
