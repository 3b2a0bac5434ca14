"""Scoped routes (the connection manager's ``scoped_routes``): the request's headers
build a scope key, the scope with that key gives the route table.

- differential scenarios (inline ``scoped_route_configurations_list``) against Envoy
  1.40: key fragments by index and by ``key<separator>value`` element, several
  fragments in order, the first header value only, a key that matches no scope (404
  ``NR``, ``no_route``), scopes routing on their own virtual hosts;
- ``/config_dump``'s ``ScopedRoutesConfigDump`` beside Envoy's;
- bad input: each mistake refused with its field path, where Envoy refuses it too
  (``on_demand`` is refused by name: envoyx does not fetch scopes on demand);
- SRDS (``ScopedRouteConfiguration`` over ADS, State of the World and Delta) with the
  in-process management server: scopes added, changed and removed with traffic
  checked after each, a scope whose route table is missing, a key conflict NACKed,
  the ``scoped_rds`` stats and the dump — the same scenario run against Envoy first.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import envoyx
from support.bootstrap import (
    HCM,
    HCM_TYPE,
    ROUTER_TYPE,
    bootstrap,
    cluster,
    file_access_log,
    socket_address,
)
from support.differential import Ctx, Http, Json, Scenario, differential_tests
from support.envoy import targets_from_env
from support.proxy import ProxyProcess
from support.upstreams import HttpUpstream
from support.wait import free_port, until
from support.xds_resources import (
    ADS_SOURCE,
    ads_bootstrap,
    cluster_load_assignment,
    eds_cluster,
    simple_routes,
)
from support.xds_server import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    SCOPED_ROUTE,
    XdsRequest,
    XdsServer,
)

pytestmark = pytest.mark.envoy

StartProxy = Callable[..., ProxyProcess]

# ---------------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------------


def header_fragment(name: str, *, sep: str = "", index: int | None = None, **kv: str) -> Json:
    """A ``header_value_extractor`` fragment: ``index``, or ``key``/``separator`` of an
    element."""
    extractor: Json = {"name": name}
    if sep:
        extractor["element_separator"] = sep
    if index is not None:
        extractor["index"] = index
    else:
        extractor["element"] = {"key": kv["key"], "separator": kv["separator"]}
    return {"header_value_extractor": extractor}


def direct_table(name: str, body: str, *, domains: list[str] | None = None) -> Json:
    """A route configuration answering ``body`` (200) for every path."""
    return {
        "name": name,
        "virtual_hosts": [
            {
                "name": "all",
                "domains": domains or ["*"],
                "routes": [
                    {
                        "match": {"prefix": "/"},
                        "direct_response": {"status": 200, "body": {"inline_string": body}},
                    }
                ],
            }
        ],
    }


def scope(name: str, key: list[str], **route: Any) -> Json:
    """A ScopedRouteConfiguration: ``route_configuration=`` (inline) or
    ``route_configuration_name=`` (SRDS)."""
    return {"name": name, "key": {"fragments": [{"string_key": k} for k in key]}, **route}


def scoped_hcm(
    fragments: list[Json],
    *,
    scopes: list[Json] | None = None,
    stat_prefix: str = "ingress_http",
    name: str = "scopes",
) -> Json:
    """A connection manager with ``scoped_routes``: inline ``scopes``, or SRDS over ADS
    (route tables from ADS too) when ``scopes`` is None."""
    scoped: Json = {"name": name, "scope_key_builder": {"fragments": fragments}}
    if scopes is None:
        scoped["rds_config_source"] = dict(ADS_SOURCE)
        scoped["scoped_rds"] = {"scoped_rds_config_source": dict(ADS_SOURCE)}
    else:
        scoped["scoped_route_configurations_list"] = {"scoped_route_configurations": scopes}
    return {
        "@type": HCM_TYPE,
        "stat_prefix": stat_prefix,
        "scoped_routes": scoped,
        "http_filters": [
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}
        ],
    }


def scoped_listener(name: str, port: int, hcm: Json) -> Json:
    return {
        "name": name,
        "address": socket_address("127.0.0.1", port),
        "filter_chains": [{"filters": [{"name": HCM, "typed_config": hcm}]}],
    }


def inline_bootstrap(ctx: Ctx, fragments: list[Json], scopes: list[Json]) -> Json:
    """One listener with inline scopes, logging in Envoy's default format."""
    hcm = scoped_hcm(fragments, scopes=scopes)
    hcm["access_log"] = [file_access_log(ctx.access_log)]
    return bootstrap(
        admin_port=ctx.admin_port,
        listeners=[scoped_listener("ingress", ctx.port, hcm)],
        clusters=[cluster("a", [ctx.up("a")]), cluster("b", [ctx.up("b")])],
    )


# ---------------------------------------------------------------------------------
# differential scenarios (inline scopes)
# ---------------------------------------------------------------------------------


def build_element_and_index(ctx: Ctx) -> Json:
    """Two fragments: the value of ``bar=`` in ``x-foo-key`` (``;``-separated), then
    the second ``,``-separated element of ``x-baz``. The two scopes have the same
    fragments in the other order."""
    fragments = [
        header_fragment("x-foo-key", sep=";", key="bar", separator="="),
        header_fragment("x-baz", sep=",", index=1),
    ]
    return inline_bootstrap(
        ctx,
        fragments,
        [
            scope("ab", ["a", "b"], route_configuration=direct_table("rc_ab", "scope ab")),
            scope("ba", ["b", "a"], route_configuration=direct_table("rc_ba", "scope ba")),
        ],
    )


def _h(*pairs: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    # A fixed-size answer rather than the echo: the access logs compared carry the
    # response's size, and the echo's connection ids grow through the session.
    return (*pairs, ("x-test-response-size", "64"))


SCENARIOS = [
    Scenario(
        "element_and_index_fragments",
        build_element_and_index,
        (
            Http(headers=_h(("x-foo-key", "bar=a"), ("x-baz", "q,b")), expect={"status": 200}),
            Http(headers=_h(("x-foo-key", "x=1;bar=b;y"), ("x-baz", "q,a,z"))),
            # the fragments' order counts
            Http(headers=_h(("x-foo-key", "bar=b"), ("x-baz", "q,b")), expect={"status": 404}),
            # a value is what follows the first separator; elements are not trimmed
            Http(headers=_h(("x-foo-key", "bar=a=c"), ("x-baz", "q,b"))),
            Http(headers=_h(("x-foo-key", "x=1; bar=a"), ("x-baz", "q,b"))),
            # a missing header, a missing element, an index past the end: no key
            Http(headers=_h(("x-baz", "q,b"))),
            Http(headers=_h(("x-foo-key", "foo=a"), ("x-baz", "q,b"))),
            Http(headers=_h(("x-foo-key", "bar=a"), ("x-baz", "q"))),
            # only the first value of a header is read
            Http(headers=_h(("x-foo-key", "bar=a"), ("x-foo-key", "bar=b"), ("x-baz", "q,b"))),
            Http(headers=_h(("x-foo-key", "bar=a"), ("x-baz", "q,b"), ("x-baz", "q,a"))),
            # the separator of the element list is the configured one only
            Http(headers=_h(("x-foo-key", "bar=a,bar=b"), ("x-baz", ",b"))),
        ),
        stats={"http.ingress_http.no_route": 7, "http.ingress_http.rq_direct_response": 4},
        access_log=True,
    ),
    Scenario(
        "whole_value_and_empty_fragments",
        lambda ctx: inline_bootstrap(
            ctx,
            # Upper case in the configured name: Envoy looks it up lower-cased.
            [header_fragment("X-Tenant", index=0), header_fragment("x-part", sep="/", index=2)],
            [
                scope("t1", ["tenant-1", ""], route_configuration=direct_table("r1", "empty")),
                scope("t2", ["tenant-1", "c"], route_configuration=direct_table("r2", "third")),
                scope("t3", ["a,b", "c"], route_configuration=direct_table("r3", "whole")),
            ],
        ),
        (
            Http(headers=_h(("x-tenant", "tenant-1"), ("x-part", "a/b/"))),
            Http(headers=_h(("x-tenant", "tenant-1"), ("x-part", "a/b/c"))),
            Http(headers=_h(("x-tenant", "tenant-1"), ("x-part", "a/b"))),
            Http(headers=_h(("x-tenant", "a,b"), ("x-part", "//c/d"))),
            Http(headers=_h(("x-tenant", "Tenant-1"), ("x-part", "a/b/c"))),
        ),
    ),
    Scenario(
        "scopes_route_to_clusters_by_host",
        lambda ctx: inline_bootstrap(
            ctx,
            [header_fragment("x-scope", index=0)],
            [
                scope(
                    "one",
                    ["one"],
                    route_configuration={
                        "name": "one_routes",
                        "virtual_hosts": [
                            {
                                "name": "api",
                                "domains": ["api.example"],
                                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "b"}}],
                            },
                            {
                                "name": "rest",
                                "domains": ["*"],
                                "routes": [
                                    {"match": {"prefix": "/x"}, "route": {"cluster": "a"}},
                                ],
                            },
                        ],
                    },
                ),
                scope(
                    "two",
                    ["two"],
                    route_configuration={
                        "name": "two_routes",
                        "virtual_hosts": [
                            {
                                "name": "all",
                                "domains": ["*"],
                                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "b"}}],
                            }
                        ],
                    },
                ),
            ],
        ),
        (
            Http("/x", headers=_h(("x-scope", "one")), expect={"upstream": "a"}),
            Http("/x", headers=_h(("x-scope", "one"), ("host", "api.example"))),
            Http("/y", headers=_h(("x-scope", "one")), expect={"status": 404}),
            Http("/y", headers=_h(("x-scope", "two")), expect={"upstream": "b"}),
            Http("/y", headers=_h(("x-scope", "three"))),
            Http("/y"),
        ),
        stats={
            "http.ingress_http.no_route": 3,
            "cluster.a.upstream_rq_total": 1,
            "cluster.b.upstream_rq_total": 2,
        },
        access_log=True,
    ),
    Scenario(
        "same_key_later_scope_wins",
        lambda ctx: inline_bootstrap(
            ctx,
            [header_fragment("x-scope", index=0)],
            [
                scope("first", ["k"], route_configuration=direct_table("r1", "first")),
                scope("second", ["k"], route_configuration=direct_table("r2", "second")),
            ],
        ),
        (Http(headers=_h(("x-scope", "k"))),),
    ),
]


test_scenario = differential_tests(SCENARIOS)


# ---------------------------------------------------------------------------------
# /config_dump of inline scopes
# ---------------------------------------------------------------------------------


def _scoped_dump(proxy: ProxyProcess) -> Json:
    status, _, body = proxy.admin("/config_dump")
    assert status == 200, body[:300]
    configs = {c["@type"].rsplit(".", 1)[-1]: c for c in json.loads(body)["configs"]}
    return configs


def _without_times(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if k != "last_updated"}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def test_config_dump_shows_inline_scopes_as_envoy(
    start_envoy: StartProxy, start_envoyx: StartProxy, http_upstreams: dict[str, HttpUpstream]
) -> None:
    """``inline_scoped_route_configs`` holds each scope as configured (its route table
    inside it: the tables are not in ``RoutesConfigDump``), named by ``scoped_routes``."""
    dumps = []
    for start in (start_envoy, start_envoyx):
        ctx = Ctx(
            port=free_port(),
            admin_port=free_port(),
            upstreams={n: u.address for n, u in http_upstreams.items()},
            refused=("127.0.0.1", 1),
            access_log="/dev/null",
        )
        proxy = start(build_element_and_index(ctx))
        configs = _scoped_dump(proxy)
        scoped = configs["ScopedRoutesConfigDump"]
        assert scoped["inline_scoped_route_configs"][0]["last_updated"]
        assert not configs["RoutesConfigDump"].get("static_route_configs")
        assert not configs["RoutesConfigDump"].get("dynamic_route_configs")
        dumps.append(_without_times(scoped))
        proxy.stop()
    envoy, ours = dumps
    assert [s["name"] for s in envoy["inline_scoped_route_configs"][0]["scoped_route_configs"]] == [
        "ab",
        "ba",
    ]
    assert ours == envoy


# ---------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------

_LIST = (
    "static_resources.listeners[0].filter_chains[0].filters[0].typed_config."
    "scoped_routes.scoped_route_configurations_list.scoped_route_configurations"
)
_BUILDER = (
    "static_resources.listeners[0].filter_chains[0].filters[0].typed_config."
    "scoped_routes.scope_key_builder.fragments[0].header_value_extractor"
)


def _bad_inline(ctx: Ctx, case: str) -> Json:
    fragments = [header_fragment("x-scope", index=0)]
    good = scope("s", ["k"], route_configuration=direct_table("r", "ok"))
    scopes = [good]
    if case == "route_configuration_name":
        scopes = [{**good, "route_configuration_name": "elsewhere"}]
    elif case == "no_route_configuration":
        scopes = [scope("s", ["k"])]
    elif case == "index_without_separator":
        fragments = [header_fragment("x-scope", index=1)]
    elif case == "no_extract_type":
        fragments = [{"header_value_extractor": {"name": "x-scope"}}]
    elif case == "unknown_cluster":
        table = direct_table("r", "ok")
        table["virtual_hosts"][0]["routes"] = [
            {"match": {"prefix": "/"}, "route": {"cluster": "nowhere"}}
        ]
        scopes = [scope("s", ["k"], route_configuration=table)]
    elif case == "on_demand":
        scopes = [{**good, "on_demand": True}]
    return inline_bootstrap(ctx, fragments, scopes)


# case -> (the path envoyx names, a piece of its message, whether Envoy refuses it too)
BAD_INPUT = {
    "route_configuration_name": (
        f"{_LIST}[0].route_configuration_name",
        "not supported with inline scoped routes",
        True,
    ),
    "no_route_configuration": (
        f"{_LIST}[0].route_configuration",
        "You must specify a route_configuration",
        True,
    ),
    "index_without_separator": (f"{_BUILDER}.index", "Index > 0", True),
    "no_extract_type": (f"{_BUILDER}.index", "extract_type not set", True),
    "unknown_cluster": (
        f"{_LIST}[0].route_configuration.virtual_hosts[0].routes[0].route.cluster",
        "unknown cluster 'nowhere'",
        True,
    ),
    # Envoy would fetch such a scope's routes on a request's first use of it (with the
    # on_demand filter); envoyx does not, and says so.
    "on_demand": (f"{_LIST}[0].on_demand", "not supported by envoyx", False),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_names_the_field(case: str, envoy_binary: Path, tmp_path: Path) -> None:
    path, message, envoy_refuses = BAD_INPUT[case]
    ctx = Ctx(
        port=free_port(),
        admin_port=free_port(),
        upstreams={"a": ("127.0.0.1", 1), "b": ("127.0.0.1", 2)},
        refused=("127.0.0.1", 1),
        access_log="/dev/null",
    )
    bs = _bad_inline(ctx, case)
    with pytest.raises(envoyx.ConfigError) as info:
        envoyx.Server(bs)
    errors = info.value.errors
    assert any(e.startswith(path) and message in e for e in errors), errors
    file = tmp_path / "bad.json"
    file.write_text(json.dumps(bs))
    proc = subprocess.run(
        [str(envoy_binary), "--mode", "validate", "-c", str(file), "-l", "critical"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (proc.returncode != 0) == envoy_refuses, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------
# SRDS over ADS
# ---------------------------------------------------------------------------------

XDS_TARGETS = targets_from_env("ENVOYX_XDS_TARGETS")
API_TYPES = {"sotw": "GRPC", "delta": "DELTA_GRPC"}
ACK_TIMEOUT_S = 10.0
SCOPES = "tenants"  # scoped_routes.name
SRDS_STATS = "http.main.scoped_rds.tenants."


@pytest.fixture(params=XDS_TARGETS)
def target(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=list(API_TYPES))
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def xds_server() -> Iterator[XdsServer]:
    server = XdsServer().start()
    yield server
    server.stop()


class Srds:
    """One proxy, one management server, a listener ``main`` with scoped RDS keyed by
    ``x-tenant``; route tables ``to_a``/``to_b``/``to_c`` send to upstream a/b/c."""

    def __init__(
        self, server: XdsServer, proxy_start: StartProxy, mode: str, ups: dict[str, HttpUpstream]
    ) -> None:
        self.server = server
        self.start_proxy = proxy_start
        self.mode = mode
        self.ups = ups
        self.port = free_port()
        self.nacks: list[XdsRequest] = []
        self.proxy: ProxyProcess | None = None

    def start(self, scopes: dict[str, Json], routes: list[str], *, static: bool = False) -> None:
        """Serve the scopes and route tables; the listener comes by LDS, or is in the
        bootstrap's ``static_resources`` (``static``)."""
        main = scoped_listener(
            "main",
            self.port,
            scoped_hcm([header_fragment("x-tenant", index=0)], stat_prefix="main", name=SCOPES),
        )
        self.server.set_snapshot(
            {
                CLUSTER: {n: eds_cluster(n) for n in "abc"},
                ENDPOINT: {n: cluster_load_assignment(n, [self.ups[n].address]) for n in "abc"},
                LISTENER: {} if static else {"main": main},
                SCOPED_ROUTE: scopes,
                ROUTE: {name: simple_routes(name, name[-1]) for name in routes},
            }
        )
        bs = ads_bootstrap(
            xds_address=self.server.address,
            admin_port=free_port(),
            api_type=API_TYPES[self.mode],  # type: ignore[arg-type]
            node_id=f"srds-{self.mode}",
        )
        if static:
            bs["static_resources"]["listeners"] = [main]
        self.proxy = self.start_proxy(bs, extra_args=("--drain-time-s", "1"))

    @property
    def p(self) -> ProxyProcess:
        assert self.proxy is not None
        return self.proxy

    def push(self, type_url: str, resources: dict[str, Json]) -> None:
        since = self.server.mark()
        version = self.server.set_resources(type_url, resources)
        self.server.wait_for_ack(type_url, version, ACK_TIMEOUT_S, since=since)

    def push_nacked(self, type_url: str, resources: dict[str, Json]) -> XdsRequest:
        since = self.server.mark()
        version = self.server.set_resources(type_url, resources)
        nack = self.server.wait_for_nack(type_url, version, ACK_TIMEOUT_S, since=since)
        self.nacks.append(nack)
        return nack

    def tenant(self, tenant: str | None) -> tuple[int, str | None]:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            headers = {"host": "xds.test"}
            if tenant is not None:
                headers["x-tenant"] = tenant
            conn.request("GET", "/", headers=headers)
            resp = conn.getresponse()
            resp.read()
            return resp.status, resp.getheader("x-upstream")
        finally:
            conn.close()

    def served(self, expected: dict[str | None, tuple[int, str | None]]) -> None:
        """Each tenant gets its answer (polled: the ACK may precede the swap by a
        moment on the workers)."""

        def now() -> dict[str | None, tuple[int, str | None]]:
            return {t: self.tenant(t) for t in expected}

        until(lambda: now() == expected, timeout=10, what=f"tenants served as {expected}")

    def scopes_dump(self) -> Json:
        return _scoped_dump(self.p)["ScopedRoutesConfigDump"]

    def dump_names(self) -> list[str]:
        dynamic = self.scopes_dump().get("dynamic_scoped_route_configs", [])
        assert [d["name"] for d in dynamic] == [SCOPES], dynamic
        return [s["name"] for s in dynamic[0].get("scoped_route_configs", [])]


@pytest.fixture
def srds(
    request: pytest.FixtureRequest,
    target: str,
    mode: str,
    xds_server: XdsServer,
    http_upstreams: dict[str, HttpUpstream],
) -> Srds:
    launch: StartProxy = request.getfixturevalue(
        "start_envoy" if target == "envoy" else "start_envoyx"
    )
    return Srds(xds_server, launch, mode, http_upstreams)


def test_srds_scopes_added_changed_removed(srds: Srds) -> None:
    """Start-up fetches LDS, then the scopes (a wildcard subscription), then the route
    tables they name; each later change of the scopes is in force once ACKed, and the
    route tables follow what the scopes name."""
    srds.start(
        {
            "one": scope("one", ["t1"], route_configuration_name="to_a"),
            "two": scope("two", ["t2"], route_configuration_name="to_b"),
        },
        ["to_a", "to_b", "to_c"],
    )
    srv = srds.server
    first_srds = srv.requests(SCOPED_ROUTE)[0]
    if srds.mode == "sotw":
        assert first_srds.resource_names == ()
    else:
        assert first_srds.subscribe in ((), ("*",))
    rds = srv.requests(ROUTE)[0]
    assert sorted(rds.resource_names or rds.subscribe) == ["to_a", "to_b"]
    srds.served({"t1": (200, "a"), "t2": (200, "b"), "t3": (404, None), None: (404, None)})
    stats = srds.p.stats()
    assert stats[SRDS_STATS + "all_scopes"] == 2
    assert stats[SRDS_STATS + "active_scopes"] == 2
    assert stats[SRDS_STATS + "on_demand_scopes"] == 0
    assert stats[SRDS_STATS + "update_success"] == 1
    assert stats[SRDS_STATS + "config_reload"] == 1
    assert stats["http.main.rds.to_a.update_success"] == 1
    assert stats["http.main.no_route"] == 2
    assert srds.dump_names() == ["one", "two"]

    # added
    srds.push(
        SCOPED_ROUTE,
        {
            "one": scope("one", ["t1"], route_configuration_name="to_a"),
            "two": scope("two", ["t2"], route_configuration_name="to_b"),
            "three": scope("three", ["t3"], route_configuration_name="to_c"),
        },
    )
    srds.served({"t1": (200, "a"), "t2": (200, "b"), "t3": (200, "c")})
    assert srds.dump_names() == ["one", "three", "two"]
    # changed: a new key for one scope, a new table for another
    srds.push(
        SCOPED_ROUTE,
        {
            "one": scope("one", ["t1-new"], route_configuration_name="to_a"),
            "two": scope("two", ["t2"], route_configuration_name="to_c"),
            "three": scope("three", ["t3"], route_configuration_name="to_c"),
        },
    )
    srds.served({"t1": (404, None), "t1-new": (200, "a"), "t2": (200, "c"), "t3": (200, "c")})
    # removed
    srds.push(SCOPED_ROUTE, {"three": scope("three", ["t3"], route_configuration_name="to_c")})
    srds.served({"t1-new": (404, None), "t2": (404, None), "t3": (200, "c")})
    stats = srds.p.stats()
    assert stats[SRDS_STATS + "all_scopes"] == 1
    assert stats[SRDS_STATS + "update_success"] == 4
    assert stats[SRDS_STATS + "update_rejected"] == 0
    assert srds.dump_names() == ["three"]
    dynamic = srds.scopes_dump()["dynamic_scoped_route_configs"][0]
    assert dynamic["version_info"]
    assert dynamic["scoped_route_configs"][0] == {
        "@type": "type.googleapis.com/envoy.config.route.v3.ScopedRouteConfiguration",
        "name": "three",
        "route_configuration_name": "to_c",
        "key": {"fragments": [{"string_key": "t3"}]},
    }
    # a route table of a scope changes: the scope follows it
    srds.push(ROUTE, {"to_c": simple_routes("to_c", "a")})
    srds.served({"t3": (200, "a")})
    assert not srv.requests(kind="nack")


def test_srds_scope_whose_route_table_is_missing(srds: Srds) -> None:
    """A scope added once the listener is in force whose route table the server does
    not have: its requests get 404 (the listener does not wait for it), the other
    scopes keep serving; once the table comes, the scope serves."""
    srds.start({"one": scope("one", ["t1"], route_configuration_name="to_a")}, ["to_a"])
    srds.served({"t1": (200, "a")})
    srds.push(
        SCOPED_ROUTE,
        {
            "one": scope("one", ["t1"], route_configuration_name="to_a"),
            "late": scope("late", ["t2"], route_configuration_name="to_b"),
        },
    )
    srds.served({"t1": (200, "a"), "t2": (404, None)})
    until(
        lambda: any(
            "to_b" in (r.resource_names or r.subscribe) for r in srds.server.requests(ROUTE)
        ),
        timeout=10,
        what="to_b subscribed",
    )
    srds.push(ROUTE, {"to_a": simple_routes("to_a", "a"), "to_b": simple_routes("to_b", "b")})
    srds.served({"t1": (200, "a"), "t2": (200, "b")})


def test_srds_key_conflict_is_nacked_and_changes_nothing(srds: Srds) -> None:
    """Two scopes with one key: the whole update is refused (NACK), the scopes in
    force keep serving; ``update_rejected`` counts it."""
    srds.start({"one": scope("one", ["t1"], route_configuration_name="to_a")}, ["to_a", "to_b"])
    srds.served({"t1": (200, "a")})
    nack = srds.push_nacked(
        SCOPED_ROUTE,
        {
            "one": scope("one", ["t1"], route_configuration_name="to_a"),
            "two": scope("two", ["t2"], route_configuration_name="to_b"),
            "clash": scope("clash", ["t1"], route_configuration_name="to_b"),
        },
    )
    assert "scope key conflict" in nack.error_detail, nack.error_detail
    srds.served({"t1": (200, "a"), "t2": (404, None)})
    until(
        lambda: srds.p.stats().get(SRDS_STATS + "update_rejected") == 1,
        timeout=5,
        what="update_rejected counted",
    )
    assert srds.dump_names() == ["one"]


def test_srds_of_a_static_listener(srds: Srds) -> None:
    """A listener of the bootstrap with scoped RDS subscribes to the scopes (and their
    tables) over the bootstrap's ADS, as one that came by LDS does."""
    srds.start(
        {"one": scope("one", ["t1"], route_configuration_name="to_a")}, ["to_a"], static=True
    )
    srds.served({"t1": (200, "a"), "t2": (404, None)})
    srds.push(
        SCOPED_ROUTE,
        {
            "one": scope("one", ["t1"], route_configuration_name="to_a"),
            "two": scope("two", ["t2"], route_configuration_name="to_b"),
        },
    )
    srds.push(ROUTE, {"to_a": simple_routes("to_a", "a"), "to_b": simple_routes("to_b", "b")})
    srds.served({"t1": (200, "a"), "t2": (200, "b")})
    assert srds.dump_names() == ["one", "two"]


#: Stats whose value is a time or a hash of the version: compared by name only.
_VARYING = ("update_time", "config_reload_time_ms", "version")


@pytest.mark.parametrize("mode", list(API_TYPES))
def test_srds_stats_named_as_envoy(
    mode: str,
    request: pytest.FixtureRequest,
    http_upstreams: dict[str, HttpUpstream],
) -> None:
    """The same start-up and one added scope through Envoy, then envoyx: the stats
    under ``http.main.scoped_rds.`` and ``http.main.rds.`` have the same names and
    (times and version hashes aside) the same values."""
    seen = []
    for target in ("envoy", "envoyx"):
        server = XdsServer().start()
        try:
            run = Srds(server, request.getfixturevalue(f"start_{target}"), mode, http_upstreams)
            run.start({"one": scope("one", ["t1"], route_configuration_name="to_a")}, ["to_a"])
            run.served({"t1": (200, "a")})
            run.push(
                SCOPED_ROUTE,
                {
                    "one": scope("one", ["t1"], route_configuration_name="to_a"),
                    "two": scope("two", ["t2"], route_configuration_name="to_b"),
                },
            )
            run.push(
                ROUTE, {"to_a": simple_routes("to_a", "a"), "to_b": simple_routes("to_b", "b")}
            )
            run.served({"t1": (200, "a"), "t2": (200, "b")})
            stats = run.p.stats()
            run.p.stop()
        finally:
            server.stop()
        seen.append(
            {
                name: (None if name.rsplit(".", 1)[-1] in _VARYING else value)
                for name, value in stats.items()
                if name.startswith(("http.main.scoped_rds.", "http.main.rds."))
            }
        )
    envoy, ours = seen
    assert SRDS_STATS + "config_reload" in envoy and "http.main.rds.to_b.config_reload" in envoy
    assert ours == envoy
