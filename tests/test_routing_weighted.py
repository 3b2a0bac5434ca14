"""Weighted cluster entries and route ``tls_context`` beside Envoy 1.40: each entry's
``request_headers_to_add`` / ``_to_remove`` and ``response_headers_to_add`` /
``_to_remove`` (Envoy's ``WeightedClusterEntry`` evaluates them before the route's levels, whatever
``most_specific_header_mutations_wins`` says), on proxied responses and on the
router's local replies, and each entry's ``typed_per_filter_config`` (the most
specific per-filter config of a request that picked it: Envoy's Lua filter against
envoyx's Python twin, as in tests/test_filters_differential.py). Every pick is
deterministic: ``header_name`` chooses the entry. Then a route match's
``tls_context`` (``presented``, ``validated``) over plaintext and TLS, with and
without a client certificate.

The scenarios run through the real Envoy and through envoyx (the machinery is
``support/differential.py``); the refused configurations through ``envoy --mode
validate`` and envoyx's own validation, with the field paths.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_filters_differential import FIRST, TAG, Req, _describe, _run, disabled
from test_filters_differential import Scenario as FilterScenario
from test_filters_differential import check_expectations as check_filter_expectations
from test_filters_e2e import (
    DISABLED,
    Proxy,
    Serve,
    backend,
    override,
    proxy_config,
    py_filter,
    seen_headers,
)
from test_routing_headers import HCM_PATH, dummy_ctx, envoy_refusal, envoyx_errors, hv

import envoyx
from support.bootstrap import bootstrap, cluster, http_listener, route, virtual_host
from support.differential import Ctx, Http, Json, Scenario, differential_tests
from support.proxy import ProxyProcess
from support.tls import (
    Pki,
    client_context,
    downstream_tls,
    hcm_config,
    https_request,
    shared_pki,
    validation_context,
)
from support.tls import listener as tls_listener
from support.upstreams import HttpUpstream
from support.wait import free_port

pytestmark = pytest.mark.envoy

StartProxy = Callable[..., ProxyProcess]


# ---------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------


def entry(name: str, **fields: Any) -> Json:
    """A ``ClusterWeight`` of weight 1 (``header_name`` picks it by its index)."""
    return {"name": name, "weight": 1, **fields}


def weighted_route(*entries: Json, prefix: str = "/", **route_fields: Any) -> Json:
    return {
        "match": {"prefix": prefix},
        "route": {"weighted_clusters": {"header_name": "x-pick", "clusters": list(entries)}},
        **route_fields,
    }


def setup(
    routes: list[Json],
    *,
    vhost: Json | None = None,
    rc: Json | None = None,
) -> Callable[[Ctx], Json]:
    """One virtual host of ``routes``; clusters ``a``, ``b`` (upstreams a and b),
    ``empty`` (no endpoint) and ``refused`` (a port that refuses)."""

    def build(ctx: Ctx) -> Json:
        vh: Json = {"name": "vh", "domains": ["*"], "routes": routes, **(vhost or {})}
        bs = bootstrap(
            admin_port=ctx.admin_port,
            listeners=[http_listener(port=ctx.port, virtual_hosts=[vh])],
            clusters=[
                cluster("a", [ctx.up("a")]),
                cluster("b", [ctx.up("b")]),
                cluster("empty", []),
                cluster("refused", [ctx.refused]),
            ],
        )
        hcm = bs["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        hcm["typed_config"]["route_config"].update(rc or {})
        return bs

    return build


def pick(index: int, *headers: tuple[str, str], **kw: Any) -> Http:
    return Http(headers=(("x-pick", str(index)), *headers), **kw)


def respond_with(*headers: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    """Request headers asking the test upstream to answer with ``headers``."""
    return tuple(("x-test-response-header", f"{k}: {v}") for k, v in headers)


def leveled(most_specific_wins: bool) -> Callable[[Ctx], Json]:
    """The same two headers at every level (entry, route, virtual host, route
    configuration), both directions: ``x-order`` appended (the order shows), ``x-win``
    overwritten (the last evaluated wins)."""

    def level(name: str) -> Json:
        return {
            f"{d}_headers_to_add": [
                hv("x-order", name),
                hv("x-win", name, "OVERWRITE_IF_EXISTS_OR_ADD"),
            ]
            for d in ("request", "response")
        }

    rc = level("global")
    if most_specific_wins:
        rc["most_specific_header_mutations_wins"] = True
    return setup(
        [weighted_route(entry("a", **level("entry")), entry("b"), **level("route"))],
        vhost=level("vhost"),
        rc=rc,
    )


ORDER_FACTS = (
    "up.header_all:x-order",
    "up.header:x-win",
    "header_all:x-order",
    "header:x-win",
)


# ---------------------------------------------------------------------------------
# The scenarios
# ---------------------------------------------------------------------------------

SCENARIOS: list[Scenario] = [
    Scenario(
        "entry_request_headers_follow_the_pick",
        setup(
            [
                weighted_route(
                    entry(
                        "a",
                        request_headers_to_add=[hv("x-entry", "a")],
                        request_headers_to_remove=["x-drop"],
                    ),
                    entry("b", request_headers_to_add=[hv("x-entry", "b", "ADD_IF_ABSENT")]),
                )
            ]
        ),
        (
            pick(
                0,
                ("x-drop", "1"),
                ("x-entry", "client"),
                observe=("up.header_all:x-entry", "up.has:x-drop"),
                expect={"upstream": "a", "up.header_all:x-entry": ["client", "a"]},
            ),
            pick(
                1,
                ("x-drop", "1"),
                observe=("up.header_all:x-entry", "up.has:x-drop"),
                expect={"upstream": "b", "up.header_all:x-entry": ["b"], "up.has:x-drop": True},
            ),
            pick(
                1,
                ("x-entry", "client"),
                http2=True,
                observe=("up.header_all:x-entry",),
                expect={"upstream": "b", "up.header_all:x-entry": ["client"]},
            ),
        ),
    ),
    Scenario(
        "entry_response_headers_follow_the_pick",
        setup(
            [
                weighted_route(
                    entry(
                        "a",
                        response_headers_to_add=[hv("x-entry", "a")],
                        response_headers_to_remove=["x-upstream-said"],
                    ),
                    entry(
                        "b",
                        response_headers_to_add=[
                            hv("x-entry", "b", "OVERWRITE_IF_EXISTS"),
                            hv("x-echo", "%REQ(x-a)%/%RESP(x-upstream-said)%/%PROTOCOL%"),
                        ],
                    ),
                )
            ]
        ),
        (
            pick(
                0,
                *respond_with(("x-upstream-said", "hi"), ("x-entry", "up")),
                observe=("header_all:x-entry", "header:x-upstream-said"),
                expect={"upstream": "a", "header_all:x-entry": ["up", "a"]},
            ),
            pick(
                1,
                ("x-a", "1"),
                *respond_with(("x-upstream-said", "hi"), ("x-entry", "up")),
                observe=("header_all:x-entry", "header:x-upstream-said", "header:x-echo"),
                expect={
                    "upstream": "b",
                    "header_all:x-entry": ["b"],
                    "header:x-echo": "1/hi/HTTP/1.1",
                },
            ),
            pick(
                1,
                http2=True,
                observe=("header_all:x-entry", "header:x-echo"),
                expect={"header_all:x-entry": [], "header:x-echo": "//HTTP/2"},
            ),
        ),
    ),
    Scenario(
        "entry_before_route_levels",
        leveled(False),
        (
            pick(
                0,
                observe=ORDER_FACTS,
                expect={
                    "up.header_all:x-order": ["entry", "route", "vhost", "global"],
                    "up.header:x-win": "global",
                },
            ),
            pick(
                1,
                observe=ORDER_FACTS,
                expect={"up.header_all:x-order": ["route", "vhost", "global"]},
            ),
        ),
    ),
    Scenario(
        "entry_first_with_most_specific_header_mutations_wins",
        leveled(True),
        (
            pick(
                0,
                observe=ORDER_FACTS,
                expect={
                    "up.header_all:x-order": ["entry", "global", "vhost", "route"],
                    "up.header:x-win": "route",
                    "header_all:x-order": ["entry", "global", "vhost", "route"],
                    "header:x-win": "route",
                },
            ),
            pick(1, observe=ORDER_FACTS, expect={"up.header:x-win": "route"}),
        ),
    ),
    Scenario(
        "entry_request_headers_read_the_request",
        setup(
            [
                weighted_route(
                    entry(
                        "a",
                        host_rewrite_literal="rewritten.test",
                        request_headers_to_add=[
                            hv("x-seen-host", "%REQ(:authority)%"),
                            hv("x-copy", "<%REQ(x-a)%>"),
                            hv("x-peer", "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"),
                        ],
                    ),
                    entry("b"),
                    request_headers_to_add=[hv("x-route-seen", "%REQ(x-copy)%")],
                )
            ]
        ),
        (
            pick(
                0,
                ("x-a", "1"),
                observe=(
                    "up.header:host",
                    "up.header:x-seen-host",
                    "up.header:x-copy",
                    "up.header:x-peer",
                    "up.header:x-route-seen",
                ),
                expect={"up.header:host": "rewritten.test", "up.header:x-copy": "<1>"},
            ),
        ),
    ),
    Scenario(
        "entry_response_headers_on_local_replies",
        setup(
            [
                weighted_route(
                    entry("empty", response_headers_to_add=[hv("x-entry", "empty")]),
                    entry("refused", response_headers_to_add=[hv("x-entry", "refused")]),
                    entry("missing", response_headers_to_add=[hv("x-entry", "missing")]),
                    response_headers_to_add=[hv("x-route", "r")],
                )
            ],
            rc={"validate_clusters": False},
        ),
        (
            pick(0, observe=("header_all:x-entry", "header:x-route")),
            pick(1, observe=("header_all:x-entry", "header:x-route")),
            pick(2, observe=("header_all:x-entry", "header:x-route")),
        ),
        stats={"cluster.empty.upstream_rq_503": 1, "http.ingress_http.no_cluster": 1},
    ),
    Scenario(
        "entry_with_cluster_header",
        setup(
            [
                weighted_route(
                    {
                        "cluster_header": "x-cluster",
                        "weight": 1,
                        "request_headers_to_add": [hv("x-entry", "by-header")],
                        "response_headers_to_add": [hv("x-entry", "by-header")],
                    },
                    entry("a", request_headers_to_add=[hv("x-entry", "named")]),
                )
            ]
        ),
        (
            pick(
                0,
                ("x-cluster", "b"),
                observe=("up.header_all:x-entry", "header_all:x-entry"),
                expect={"upstream": "b", "up.header_all:x-entry": ["by-header"]},
            ),
            pick(
                1,
                observe=("up.header_all:x-entry", "header_all:x-entry"),
                expect={"upstream": "a", "up.header_all:x-entry": ["named"]},
            ),
        ),
    ),
]


# ---------------------------------------------------------------------------------
# typed_per_filter_config of an entry: Envoy's Lua filter against the Python twin
# ---------------------------------------------------------------------------------


def _filter_weighted(per_filter: list[Json | None], **route_fields: Any) -> Json:
    """A route to weighted entries all naming ``backend`` (the filter tests' one
    upstream), each with its own ``typed_per_filter_config`` (None: none)."""
    clusters = []
    for config in per_filter:
        e: Json = {"name": "backend", "weight": 1}
        if config is not None:
            e["typed_per_filter_config"] = config
        clusters.append(e)
    return {
        "match": {"prefix": "/"},
        "route": {"weighted_clusters": {"header_name": "x-pick", "clusters": clusters}},
        **route_fields,
    }


TAG_FACTS = ("up:x-tag", "resp:x-tag-resp")


def _tagged(index: int, on: bool) -> Req:
    return Req(
        headers=(("x-pick", str(index)),),
        observe=TAG_FACTS,
        expect={
            "up:x-tag": ["lua"] if on else [],
            "resp:x-tag-resp": ["lua"] if on else [],
        },
    )


FILTER_SCENARIOS: list[FilterScenario] = [
    FilterScenario(
        "entry_disables_a_filter",
        (TAG,),
        (_tagged(0, False), _tagged(1, True)),
        virtual_hosts=(
            {
                "name": "all",
                "domains": ["*"],
                "routes": [_filter_weighted([disabled("tag"), None])],
            },
        ),
    ),
    FilterScenario(
        # The route disables one filter, an entry another: both apply to that entry.
        "entry_and_route_overrides_combine",
        (TAG, FIRST),
        (
            Req(
                headers=(("x-pick", "0"),),
                observe=(*TAG_FACTS, "up:x-order"),
                expect={"up:x-tag": [], "up:x-order": []},
            ),
            Req(
                headers=(("x-pick", "1"),),
                observe=(*TAG_FACTS, "up:x-order"),
                expect={"up:x-tag": ["lua"], "up:x-order": []},
            ),
        ),
        virtual_hosts=(
            {
                "name": "all",
                "domains": ["*"],
                "routes": [
                    _filter_weighted(
                        [disabled("tag"), None], typed_per_filter_config=disabled("first")
                    )
                ],
            },
        ),
    ),
]


# ---------------------------------------------------------------------------------
# Configurations refused, with their paths
# ---------------------------------------------------------------------------------

ENTRY = "virtual_hosts[0].routes[0].route.weighted_clusters.clusters[0]"

# (name, the first entry's extra fields, envoyx's error path under the route
# configuration, the message (Envoy's, where Envoy refuses it too))
REFUSED: list[tuple[str, Json, str, str]] = [
    (
        "pseudo_header_added",
        {"request_headers_to_add": [hv(":path", "/x")]},
        f"{ENTRY}.request_headers_to_add[0].header.key",
        ":-prefixed or host headers may not be modified",
    ),
    (
        "host_removed",
        {"response_headers_to_remove": ["host"]},
        f"{ENTRY}.response_headers_to_remove[0]",
        ":-prefixed or host headers may not be removed",
    ),
    (
        "append_with_append_action",
        {"response_headers_to_add": [hv("x", "1", "ADD_IF_ABSENT", append=True)]},
        f"{ENTRY}.response_headers_to_add[0].append",
        "Both append and append_action are set and it's not allowed",
    ),
    (
        "unknown_operator",
        {"request_headers_to_add": [hv("x", "%NOT_AN_OPERATOR%")]},
        f"{ENTRY}.request_headers_to_add[0].header.value",
        "Not supported field in StreamInfo: NOT_AN_OPERATOR",
    ),
]


def refused_document(fields: Json, tmp_path: Path) -> Json:
    ctx = dummy_ctx(tmp_path)
    ctx = replace(ctx, upstreams={**ctx.upstreams, "b": ("127.0.0.1", 10004)})
    return setup([weighted_route(entry("a", **fields), entry("b"))])(ctx)


# ---------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------


@pytest.fixture
def serve() -> Iterator[Serve]:
    """An in-process ``envoyx.Server`` (one worker), stopped at teardown."""
    servers: list[envoyx.Server] = []

    def start(config: Json) -> Proxy:
        server = envoyx.Server(config, concurrency=1)
        servers.append(server)
        server.start()
        return Proxy(server)

    yield start
    for server in servers:
        server.stop()


test_scenario = differential_tests(SCENARIOS)


@pytest.mark.parametrize("scenario", FILTER_SCENARIOS, ids=[s.name for s in FILTER_SCENARIOS])
def test_entry_filter_config(
    scenario: FilterScenario,
    envoy_binary: Path,
    http_upstreams: dict[str, HttpUpstream],
    tmp_path: Path,
) -> None:
    up = http_upstreams["a"]
    envoy = _run(scenario, "envoy", envoy_binary, up, tmp_path)
    check_filter_expectations(scenario, envoy, "Envoy")
    ours = _run(scenario, "envoyx", envoy_binary, up, tmp_path)
    for i, (req, e, x) in enumerate(zip(scenario.requests, envoy.facts, ours.facts, strict=True)):
        assert e == x, f"request {i} ({_describe(req)}): envoy={e!r} envoyx={x!r}"


@pytest.mark.parametrize(
    ("fields", "path", "message"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED]
)
def test_refused_like_envoy(
    fields: Json, path: str, message: str, envoy_binary: Path, tmp_path: Path
) -> None:
    document = refused_document(fields, tmp_path)
    refusal = envoy_refusal(envoy_binary, document, tmp_path)
    assert refusal is not None, "Envoy accepts it"
    assert message in refusal
    errors = envoyx_errors(document)
    assert any(e.startswith(f"{HCM_PATH}.{path}: ") and message in e for e in errors), errors


def test_entry_python_filter_config_is_the_most_specific(
    serve: Serve, http_upstream: HttpUpstream
) -> None:
    """A Python filter's config replaced per entry (envoyx's TypedStruct override; Envoy
    has no Python filter): the entry's over the route's over the virtual host's."""
    route = {
        "match": {"prefix": "/"},
        "route": {
            "weighted_clusters": {
                "header_name": "x-pick",
                "clusters": [
                    {
                        "name": "backend",
                        "weight": 1,
                        "typed_per_filter_config": {"one": override("one-entry")},
                    },
                    {
                        "name": "backend",
                        "weight": 1,
                        "typed_per_filter_config": {"two": DISABLED},
                    },
                ],
            }
        },
        "typed_per_filter_config": {"one": override("one-route")},
    }
    vhost = virtual_host("all", ["*"], [route])
    vhost["typed_per_filter_config"] = {"two": override("two-vhost")}
    proxy = serve(
        proxy_config(
            [
                py_filter("one", "ConfigEcho", config="one"),
                py_filter("two", "ConfigEcho", config="two"),
            ],
            [backend(http_upstream)],
            virtual_hosts=[vhost],
        )
    )
    first = seen_headers(proxy.get("/", headers={"x-pick": "0"}))
    assert json.loads(first["x-config-one"][0]) == "one-entry"
    assert json.loads(first["x-config-two"][0]) == "two-vhost"
    second = seen_headers(proxy.get("/", headers={"x-pick": "1"}))
    assert json.loads(second["x-config-one"][0]) == "one-route"
    assert "x-config-two" not in second


def test_entry_filter_config_of_an_unknown_type_is_refused_by_path(tmp_path: Path) -> None:
    document = refused_document(
        {
            "typed_per_filter_config": {
                "tag": {"@type": "type.googleapis.com/google.protobuf.Empty"}
            }
        },
        tmp_path,
    )
    errors = envoyx_errors(document)
    assert any(e.startswith(f"{HCM_PATH}.{ENTRY}.typed_per_filter_config") for e in errors), errors


def test_entry_fields_still_refused_name_their_path(tmp_path: Path) -> None:
    document = refused_document({"metadata_match": {"filter_metadata": {}}}, tmp_path)
    assert f"{HCM_PATH}.{ENTRY}.metadata_match: not supported by envoyx" in envoyx_errors(document)


# ---------------------------------------------------------------------------------
# Route match tls_context: presented / validated over plaintext and TLS
# ---------------------------------------------------------------------------------

TLS_SERVER = "server.example.com"  # a DNS SAN of the PKI's server certificates


def _tls_routes() -> list[Json]:
    def on(prefix: str, criteria: Json, body: str) -> Json:
        r = route({"prefix": prefix}, direct=(200, body))
        r["match"]["tls_context"] = criteria
        return r

    return [
        on("/presented", {"presented": True}, "presented"),
        on("/presented", {"presented": False}, "not-presented"),
        on("/validated", {"validated": True}, "validated"),
        on("/validated", {"validated": False}, "not-validated"),
        on("/both", {"presented": True, "validated": True}, "both"),
        on("/unvalidated", {"presented": True, "validated": False}, "presented-unvalidated"),
        on("/empty", {}, "empty"),
        route({"prefix": "/"}, direct=(200, "fallback")),
    ]


def _tls_bootstrap(pki: Pki, ports: dict[str, int], admin_port: int) -> Json:
    def chain(transport_socket: Json | None) -> Json:
        c: Json = {"filters": [hcm_config([virtual_host("all", ["*"], _tls_routes())])]}
        if transport_socket is not None:
            c["transport_socket"] = transport_socket
        return c

    return bootstrap(
        admin_port=admin_port,
        listeners=[
            tls_listener(ports["plain"], [chain(None)], name="plain"),
            tls_listener(
                ports["mtls"],
                [
                    chain(
                        downstream_tls([pki.server_rsa], validation=validation_context(pki.ca_path))
                    )
                ],
                name="mtls",
            ),
            tls_listener(ports["tls"], [chain(downstream_tls([pki.server_rsa]))], name="tls"),
        ],
        clusters=[],
    )


TLS_PATHS = ("/presented", "/validated", "/both", "/unvalidated", "/empty")

# (listener, client certificate) → the body of each path's route, as Envoy 1.40 answers.
TLS_EXPECTED: dict[tuple[str, bool], tuple[str, ...]] = {
    ("plain", False): ("not-presented", "not-validated", "fallback", "fallback", "empty"),
    ("mtls", False): ("not-presented", "not-validated", "fallback", "fallback", "empty"),
    ("mtls", True): ("presented", "validated", "both", "fallback", "empty"),
    # No validation context: Envoy does not ask for a client certificate.
    ("tls", True): ("not-presented", "not-validated", "fallback", "fallback", "empty"),
}


def _tls_answers(proxy: ProxyProcess, pki: Pki, ports: dict[str, int]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for (where, with_cert), _ in TLS_EXPECTED.items():
        bodies = []
        for path in TLS_PATHS:
            address = ("127.0.0.1", ports[where])
            if where == "plain":
                resp = httpx.get(f"http://127.0.0.1:{ports[where]}{path}", timeout=5)
                bodies.append((resp.status_code, resp.text))
            else:
                ctx = client_context(pki, cert=pki.client_web if with_cert else None)
                raw, _ = https_request(address, ctx, path, server_name=TLS_SERVER)
                bodies.append((raw.status, raw.body.decode()))
        out[(where, with_cert)] = bodies
    return out


def test_route_tls_context_presented_and_validated(
    start_envoy: StartProxy, start_envoyx: StartProxy
) -> None:
    pki = shared_pki()
    answers = {}
    for who, start in (("envoy", start_envoy), ("envoyx", start_envoyx)):
        ports = {name: free_port() for name in ("plain", "mtls", "tls")}
        proxy = start(_tls_bootstrap(pki, ports, free_port()))
        answers[who] = _tls_answers(proxy, pki, ports)
        proxy.stop()
    expected = {key: [(200, body) for body in bodies] for key, bodies in TLS_EXPECTED.items()}
    assert answers["envoy"] == expected, "the table is Envoy's"
    assert answers["envoyx"] == answers["envoy"]
