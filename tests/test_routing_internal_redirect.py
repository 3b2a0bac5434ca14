"""Internal redirects beside Envoy 1.40 (issue 11): a route's
``internal_redirect_policy`` (and the deprecated ``internal_redirect_action``)
makes the proxy follow an upstream's 3xx itself.

The upstreams answer with the status and ``Location`` the request asks for
(``x-test-status``, ``x-test-response-header``); the redirect targets' routes
overwrite those headers with ``request_headers_to_add``, so that each hop of a
chain answers what the scenario wants. The client sees only the last response; the
echo of the upstream that served it shows the request as redirected (host, path,
method, body, ``x-envoy-original-url``).

Beside the differential table: configuration errors naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import envoyx
from support.bootstrap import bootstrap, cluster, file_access_log, http_listener, virtual_host
from support.differential import (
    Ctx,
    Environment,
    Http,
    Json,
    Scenario,
    differential_tests,
    run_scenario,
)
from support.envoy import EnvoyProcess
from support.proxy import EnvoyxProcess
from support.wait import free_port

pytestmark = pytest.mark.envoy

# ---------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------

OBSERVE = (
    "header:location",
    "up.method",
    "up.path",
    "up.header:host",
    "up.header:x-envoy-original-url",
    "up.body",
)
PREVIOUS_ROUTES = {
    "name": "previous_routes",
    "typed_config": {
        "@type": "type.googleapis.com/"
        "envoy.extensions.internal_redirect.previous_routes.v3.PreviousRoutesConfig"
    },
}


def allow_listed(*names: str) -> Json:
    return {
        "name": "allow_listed_routes",
        "typed_config": {
            "@type": "type.googleapis.com/"
            "envoy.extensions.internal_redirect.allow_listed_routes.v3.AllowListedRoutesConfig",
            "allowed_route_names": list(names),
        },
    }


def _set(name: str, value: str) -> Json:
    return {
        "header": {"key": name, "value": value},
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
    }


def _route(
    name: str,
    prefix: str,
    cluster_name: str,
    policy: Json | None = None,
    *,
    status: str | None = None,
    location: str | None = None,
    **action: Any,
) -> Json:
    """A route to ``cluster_name``; ``status`` / ``location``: what its upstream is
    told to answer (the client's own ask otherwise)."""
    r: Json = {"name": name, "match": {"prefix": prefix}, "route": {"cluster": cluster_name}}
    if policy is not None:
        r["route"]["internal_redirect_policy"] = policy
    r["route"].update(action)
    sets = []
    if status is not None:
        sets.append(_set("x-test-status", status))
    if location is not None:
        sets.append(_set("x-test-response-header", f"location: {location}"))
    if sets:
        r["request_headers_to_add"] = sets
    return r


def _proxy(ctx: Ctx, front: list[Json], b: list[Json], c: list[Json] | None = None) -> Json:
    """Virtual hosts: ``front`` (any host), ``b.internal`` and ``c.internal``."""
    vhosts = [virtual_host("front", ["*"], front), virtual_host("b", ["b.internal"], b)]
    if c is not None:
        vhosts.append(virtual_host("c", ["c.internal"], c))
    return bootstrap(
        admin_port=ctx.admin_port,
        listeners=[http_listener(port=ctx.port, virtual_hosts=vhosts)],
        clusters=[cluster(n, [ctx.up(n)]) for n in ("a", "b", "c")],
    )


def ask(
    path: str,
    status: int,
    location: str | None,
    *,
    method: str = "GET",
    body: bytes | int | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    expect: dict[str, Any] | None = None,
    **kw: Any,
) -> Http:
    """A request whose first upstream answers ``status`` with ``location``."""
    h = [("x-test-status", str(status))]
    if location is not None:
        h.append(("x-test-response-header", f"location: {location}"))
    return Http(
        path,
        method=method,
        body=body,
        headers=(*h, *headers),
        observe=OBSERVE,
        expect=expect or {},
        **kw,
    )


def final_b() -> list[Json]:
    """b.internal: any path to cluster b, which answers 200."""
    return [_route("b-route", "/", "b", status="200")]


# ---------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------


def build_defaults(ctx: Ctx) -> Json:
    return _proxy(ctx, [_route("start", "/start", "a", {})], final_b())


def build_codes(ctx: Ctx) -> Json:
    policy = {"redirect_response_codes": [301, 303, 307, 308, 304]}
    return _proxy(ctx, [_route("start", "/start", "a", policy)], final_b())


def build_chain(ctx: Ctx) -> Json:
    """/two and /one: a → b → c, with at most 2 or 1 redirects."""
    two, one = {"max_internal_redirects": 2}, {"max_internal_redirects": 1}
    return _proxy(
        ctx,
        [_route("front-two", "/two", "a", two), _route("front-one", "/one", "a", one)],
        [
            _route("b-two", "/two", "b", two, location="http://c.internal/two/end"),
            _route("b-one", "/one", "b", one, location="http://c.internal/one/end"),
        ],
        [_route("c-route", "/", "c", status="200")],
    )


def build_loop(ctx: Ctx) -> Json:
    """a ↔ b: /prev with the previous_routes predicate, /max without (max 3)."""
    prev = {"max_internal_redirects": 5, "predicates": [PREVIOUS_ROUTES]}
    limited = {"max_internal_redirects": 3}
    return _proxy(
        ctx,
        [_route("front-prev", "/prev", "a", prev), _route("front-max", "/max", "a", limited)],
        [
            _route("b-prev", "/prev", "b", prev, location="http://front.example/prev"),
            _route("b-max", "/max", "b", limited, location="http://front.example/max"),
        ],
    )


def build_allow_listed(ctx: Ctx) -> Json:
    policy = {"predicates": [allow_listed("b-route")]}
    return _proxy(
        ctx,
        [_route("start", "/start", "a", policy)],
        final_b(),
        [_route("c-route", "/", "c", status="200")],
    )


def build_cross_scheme(ctx: Ctx) -> Json:
    return _proxy(
        ctx,
        [
            _route("strict", "/strict", "a", {}),
            _route("cross", "/cross", "a", {"allow_cross_scheme_redirect": True}),
            _route(
                "safe",
                "/safe",
                "a",
                {"allow_cross_scheme_redirect": True, "predicates": [SAFE_CROSS_SCHEME]},
            ),
        ],
        final_b(),
    )


SAFE_CROSS_SCHEME = {
    "name": "safe_cross_scheme",
    "typed_config": {
        "@type": "type.googleapis.com/"
        "envoy.extensions.internal_redirect.safe_cross_scheme.v3.SafeCrossSchemeConfig"
    },
}


def build_retry_first(ctx: Ctx) -> Json:
    """A retriable 302 is retried first; the last try's 302 is then followed."""
    retry = {
        "retry_on": "retriable-status-codes",
        "retriable_status_codes": [302],
        "num_retries": 1,
        "retry_back_off": {"base_interval": "0.001s"},
    }
    return _proxy(ctx, [_route("start", "/start", "a", {}, retry_policy=retry)], final_b())


def build_h2_upstream(ctx: Ctx) -> Json:
    """The redirect leads to an HTTP/2 upstream (its request has no Host, an
    absolute target). (The h2c test upstream cannot answer with a Location.)"""
    bs = _proxy(
        ctx,
        [_route("to-h2", "/to", "a", {})],
        [_route("b-h2", "/h2", "h2", status="200"), *final_b()],
    )
    bs["static_resources"]["clusters"].append(cluster("h2", [ctx.up("h2")], http2=True))
    return bs


def build_bodies(ctx: Ctx) -> Json:
    policy = {"redirect_response_codes": [307]}
    return _proxy(
        ctx,
        [
            {**_route("small", "/small", "a", policy), "per_request_buffer_limit_bytes": 1024},
            _route("big", "/big", "a", policy),
        ],
        final_b(),
    )


def build_copy(ctx: Ctx) -> Json:
    policy = {"response_headers_to_copy": ["x-carry", "x-gone"]}
    return _proxy(ctx, [_route("start", "/start", "a", policy)], final_b())


def _append(name: str, value: str) -> Json:
    return {"header": {"key": name, "value": value}, "append_action": "APPEND_IF_EXISTS_OR_ADD"}


def build_rewrites(ctx: Ctx) -> Json:
    r = _route("start", "/start", "a", {}, prefix_rewrite="/rewritten")
    r["request_headers_to_add"] = [_append("x-added", "first")]
    b = final_b()
    b[0]["request_headers_to_add"].append(
        {
            "header": {"key": "x-added", "value": "second"},
            "append_action": "APPEND_IF_EXISTS_OR_ADD",
        }
    )
    return _proxy(ctx, [r], b)


def build_deprecated(ctx: Ctx) -> Json:
    return _proxy(
        ctx,
        [
            _route(
                "old",
                "/old",
                "a",
                internal_redirect_action="HANDLE_INTERNAL_REDIRECT",
                max_internal_redirects=2,
            ),
            _route("pass", "/pass", "a", internal_redirect_action="PASS_THROUGH_INTERNAL_REDIRECT"),
        ],
        [
            _route(
                "b-old",
                "/old",
                "b",
                location="http://c.internal/old/end",
                internal_redirect_action="HANDLE_INTERNAL_REDIRECT",
                max_internal_redirects=2,
            ),
            _route("b-route", "/", "b", status="200"),
        ],
        [_route("c-route", "/", "c", status="200")],
    )


def build_targets(ctx: Ctx) -> Json:
    """The redirect lands on a direct response, or on a route with its own
    response headers (the first route's are not the final response's)."""
    first = _route("start", "/start", "a", {})
    first["response_headers_to_add"] = [_set("x-route", "start")]
    final = _route("b-route", "/", "b", status="200")
    final["response_headers_to_add"] = [_set("x-route", "b-route")]
    direct = {"name": "c-direct", "match": {"prefix": "/"}, "direct_response": {"status": 200}}
    direct["direct_response"]["body"] = {"inline_string": "direct"}
    return _proxy(ctx, [first], [final], [direct])


def build_edge(ctx: Ctx) -> Json:
    """The connection manager's request edits (use_remote_address, via) on the
    next request."""
    bs = build_defaults(ctx)
    listener = bs["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["use_remote_address"] = True
    hcm["via"] = "edge"
    return bs


B_FINAL = "http://b.internal/final?x=1"
A = "cluster.a"
H = "http.ingress_http"

SCENARIOS = [
    Scenario(
        "follow_302_by_default",
        build_defaults,
        (
            ask("/start", 302, B_FINAL + "#frag", expect={"status": 200, "upstream": "b"}),
            ask("/start", 302, B_FINAL, http2=True, expect={"status": 200, "upstream": "b"}),
            # Only 302 by default: a 301 passes through unchanged.
            ask("/start", 301, B_FINAL, expect={"status": 301, "upstream": "a"}),
            # No Location, a relative one, one without a route: passed on.
            ask("/start", 302, None, expect={"status": 302, "upstream": "a"}),
            ask("/start", 302, "/final", expect={"status": 302, "upstream": "a"}),
            ask("/start", 302, "http://front.example/nothing", expect={"status": 302}),
        ),
        stats={
            f"{A}.upstream_internal_redirect_succeeded_total": 2,
            f"{A}.upstream_internal_redirect_failed_total": 3,
            f"{H}.passthrough_internal_redirect_bad_location": 1,
            f"{H}.passthrough_internal_redirect_no_route": 1,
            f"{H}.downstream_rq_total": 8,
            f"{H}.downstream_rq_http1_total": 6,
            f"{H}.downstream_rq_http2_total": 2,
            f"{H}.downstream_rq_active": 0,
            f"{H}.downstream_rq_completed": 6,
            f"{H}.downstream_rq_2xx": 2,
            f"{H}.downstream_rq_3xx": 4,
            f"{H}.rq_total": 8,
            f"{A}.upstream_rq_total": 6,
            f"{A}.upstream_rq_302": 3,
            f"{A}.upstream_rq_completed": 4,
            "cluster.b.upstream_rq_200": 2,
        },
    ),
    Scenario(
        "redirect_codes_and_methods",
        build_codes,
        (
            ask("/start", 307, B_FINAL, method="POST", body=b"hello", expect={"upstream": "b"}),
            ask("/start", 308, B_FINAL, method="PUT", body=b"hello", expect={"upstream": "b"}),
            ask("/start", 301, B_FINAL, method="POST", body=b"hello", expect={"upstream": "b"}),
            # 303: a GET without the body.
            ask("/start", 303, B_FINAL, method="POST", body=b"hello", expect={"upstream": "b"}),
            # 302 is not listed (and 304, listed, is dropped: not a redirect).
            ask("/start", 302, B_FINAL, expect={"status": 302, "upstream": "a"}),
        ),
        stats={
            f"{A}.upstream_internal_redirect_succeeded_total": 4,
            f"{A}.upstream_internal_redirect_failed_total": 0,
        },
    ),
    Scenario(
        "chains_up_to_max",
        build_chain,
        (
            ask("/two", 302, "http://b.internal/two", expect={"status": 200, "upstream": "c"}),
            # The second redirect is one too many: b's 302 reaches the client.
            ask("/one", 302, "http://b.internal/one", expect={"status": 302, "upstream": "b"}),
        ),
        stats={
            f"{A}.upstream_internal_redirect_succeeded_total": 2,
            "cluster.b.upstream_internal_redirect_succeeded_total": 1,
            "cluster.b.upstream_internal_redirect_failed_total": 1,
            f"{H}.passthrough_internal_redirect_too_many_redirects": 1,
        },
    ),
    Scenario(
        "redirect_loops",
        build_loop,
        (
            ask("/prev", 302, "http://b.internal/prev", expect={"status": 302}),
            ask("/max", 302, "http://b.internal/max", expect={"status": 302}),
        ),
        stats={
            f"{H}.passthrough_internal_redirect_predicate": 1,
            f"{H}.passthrough_internal_redirect_too_many_redirects": 1,
        },
    ),
    Scenario(
        "allow_listed_routes",
        build_allow_listed,
        (
            ask("/start", 302, B_FINAL, expect={"status": 200, "upstream": "b"}),
            ask("/start", 302, "http://c.internal/x", expect={"status": 302, "upstream": "a"}),
        ),
        stats={f"{H}.passthrough_internal_redirect_predicate": 1},
    ),
    Scenario(
        "cross_scheme",
        build_cross_scheme,
        (
            ask(
                "/strict",
                302,
                "https://b.internal/s",
                expect={"status": 302, "upstream": "a"},
            ),
            ask(
                "/cross",
                302,
                "https://b.internal/c",
                headers=(("x-check", "1"),),
                expect={"status": 200, "upstream": "b"},
            ),
            # safe_cross_scheme: an http request is never sent on to https.
            ask("/safe", 302, "https://b.internal/s", expect={"status": 302, "upstream": "a"}),
        ),
        stats={
            f"{H}.passthrough_internal_redirect_unsafe_scheme": 1,
            f"{H}.passthrough_internal_redirect_predicate": 1,
        },
    ),
    Scenario(
        "retry_before_redirect",
        build_retry_first,
        (ask("/start", 302, B_FINAL, expect={"status": 200, "upstream": "b"}),),
        stats={
            f"{A}.upstream_rq_retry": 1,
            f"{A}.upstream_rq_total": 2,
            f"{A}.upstream_internal_redirect_succeeded_total": 1,
        },
    ),
    Scenario(
        "http2_upstreams",
        build_h2_upstream,
        (
            ask(
                "/to",
                307,
                "http://b.internal/h2/x",
                method="POST",
                body=b"hello",
                expect={"status": 307, "upstream": "a"},
            ),
            ask("/to", 302, "http://b.internal/h2/x", expect={"status": 200, "upstream": "h2"}),
        ),
        stats={
            f"{A}.upstream_internal_redirect_succeeded_total": 1,
            "cluster.h2.upstream_rq_200": 1,
        },
    ),
    Scenario(
        "request_bodies",
        build_bodies,
        (
            ask("/small", 307, B_FINAL, method="POST", body=1000, expect={"upstream": "b"}),
            ask(
                "/small",
                307,
                B_FINAL,
                method="POST",
                body=1000,
                chunked=True,
                expect={"upstream": "b"},
            ),
            # Past per_request_buffer_limit_bytes: not kept, so not redirected.
            ask("/small", 307, B_FINAL, method="POST", body=4096, expect={"upstream": "a"}),
            # The default limit (1 MiB) holds 100 KiB.
            ask("/big", 307, B_FINAL, method="POST", body=100_000, expect={"upstream": "b"}),
        ),
        stats={
            f"{A}.upstream_internal_redirect_succeeded_total": 3,
            f"{A}.upstream_internal_redirect_failed_total": 1,
        },
    ),
    Scenario(
        "response_headers_to_copy",
        build_copy,
        (
            Http(
                "/start",
                headers=(
                    ("x-test-status", "302"),
                    ("x-test-response-header", f"location: {B_FINAL}"),
                    ("x-test-response-header", "x-carry: from-a"),
                    ("x-carry", "from-client"),
                    ("x-gone", "from-client"),
                ),
                observe=(*OBSERVE, "up.header_all:x-carry", "up.has:x-gone"),
                expect={"upstream": "b"},
            ),
        ),
    ),
    Scenario(
        "after_rewrites",
        build_rewrites,
        (
            Http(
                "/start/x",
                headers=(
                    ("x-test-status", "302"),
                    ("x-test-response-header", f"location: {B_FINAL}"),
                ),
                observe=(*OBSERVE, "up.header_all:x-added", "up.header:x-envoy-original-path"),
                expect={"upstream": "b"},
            ),
        ),
    ),
    Scenario(
        "redirect_targets",
        build_targets,
        (
            Http(
                "/start",
                headers=(
                    ("x-test-status", "302"),
                    ("x-test-response-header", f"location: {B_FINAL}"),
                ),
                observe=(*OBSERVE, "header:x-route"),
                expect={"upstream": "b", "header:x-route": "b-route"},
            ),
            Http(
                "/start",
                headers=(
                    ("x-test-status", "302"),
                    ("x-test-response-header", "location: http://c.internal/d"),
                ),
                observe=("header:x-route", "header:location"),
                expect={"status": 200, "body": "direct"},
            ),
            # Not followed: the first route's response headers.
            Http(
                "/start",
                headers=(("x-test-status", "302"),),
                observe=("header:x-route",),
                expect={"status": 302, "header:x-route": "start"},
            ),
        ),
        stats={f"{H}.rq_direct_response": 1},
    ),
    Scenario(
        "connection_manager_edits",
        build_edge,
        (
            Http(
                "/start",
                headers=(
                    ("x-test-status", "302"),
                    ("x-test-response-header", f"location: {B_FINAL}"),
                    ("x-forwarded-for", "10.0.0.1"),
                ),
                observe=(
                    *OBSERVE,
                    "up.header:x-forwarded-for",
                    "up.header:via",
                    "up.header:x-forwarded-proto",
                    "up.header:x-envoy-external-address",
                    "up.has:x-envoy-expected-rq-timeout-ms",
                    "header:via",
                ),
                expect={"upstream": "b"},
            ),
        ),
    ),
    Scenario(
        "deprecated_internal_redirect_action",
        build_deprecated,
        (
            ask("/old", 302, "http://b.internal/old", expect={"status": 200, "upstream": "c"}),
            ask("/pass", 302, B_FINAL, expect={"status": 302, "upstream": "a"}),
        ),
        stats={f"{A}.upstream_internal_redirect_succeeded_total": 1},
    ),
]


test_scenario = differential_tests(SCENARIOS)


def build_logged(ctx: Ctx) -> Json:
    bs = build_defaults(ctx)
    listener = bs["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["access_log"] = [file_access_log(ctx.access_log)]
    return bs


def test_access_log_has_a_line_per_redirected_request(
    envoy_binary: Path, environment: Environment, tmp_path: Path
) -> None:
    """Envoy ends the redirected stream (a line with the next request's method, path
    and authority, the redirect's status, the first upstream) and logs the new one:
    three lines for a followed redirect and one passed on. Envoy's own check of the
    table (one line per request) does not fit, so the lines are compared here."""
    scenario = Scenario(
        "logged",
        build_logged,
        (ask("/start", 302, B_FINAL), ask("/start", 302, "/relative")),
        access_log=True,
    )
    results = {
        kind: run_scenario(
            scenario,
            lambda bs, wd, kind=kind: (
                EnvoyProcess(envoy_binary, bs, wd / kind, concurrency=1)
                if kind == "envoy"
                else EnvoyxProcess(bs, wd / kind, concurrency=1)
            ),
            environment,
            tmp_path,
        ).access_log
        for kind in ("envoy", "envoyx")
    }
    envoy = results["envoy"]
    assert len(envoy) == 3, envoy
    assert envoy[0].split('"')[1] == "GET /final?x=1 HTTP/1.1"
    assert " 302 - 0 0 D - " in envoy[0], envoy[0]
    assert results["envoyx"] == envoy


def test_table_names_are_unique() -> None:
    names = [s.name for s in SCENARIOS]
    assert len(set(names)) == len(names)


# ---------------------------------------------------------------------------------
# Configuration errors
# ---------------------------------------------------------------------------------

ROUTE = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config"


def _config(action: Json) -> Json:
    entry = {"match": {"prefix": "/"}, "route": {"cluster": "a", **action}}
    return bootstrap(
        admin_port=free_port(),
        listeners=[
            http_listener(
                port=free_port(),
                virtual_hosts=[virtual_host("v", ["*"], [entry])],
            )
        ],
        clusters=[cluster("a", [("127.0.0.1", 1)])],
    )


@pytest.mark.parametrize(
    ("action", "field", "message"),
    [
        (
            {"internal_redirect_policy": {"response_headers_to_copy": ["x-ok", "host"]}},
            "internal_redirect_policy.response_headers_to_copy[1]",
            ":-prefixed headers or Hosts may not be specified here.",
        ),
        (
            {"internal_redirect_policy": {"response_headers_to_copy": [":path"]}},
            "internal_redirect_policy.response_headers_to_copy[0]",
            ":-prefixed headers or Hosts may not be specified here.",
        ),
        (
            {
                "internal_redirect_policy": {
                    "predicates": [
                        {
                            "name": "other",
                            "typed_config": {
                                "@type": "type.googleapis.com/google.protobuf.Struct",
                                "value": {},
                            },
                        }
                    ]
                }
            },
            "internal_redirect_policy.predicates[0].typed_config.@type",
            "internal redirect predicate google.protobuf.Struct is not supported by envoyx",
        ),
    ],
    ids=["copy_host", "copy_pseudo_header", "unknown_predicate"],
)
def test_config_errors_name_the_field(action: Json, field: str, message: str) -> None:
    with pytest.raises(envoyx.ConfigError) as err:
        envoyx.Server(_config(action))
    prefix = f"{ROUTE}.virtual_hosts[0].routes[0].route.{field}: "
    matching = [e for e in err.value.errors if e.startswith(prefix)]
    assert matching, err.value.errors
    assert message in matching[0], matching


def test_schema_errors_name_the_field() -> None:
    """protoc-gen-validate rules (Envoy's own): a listed route name is not empty."""
    policy = {"internal_redirect_policy": {"predicates": [allow_listed("b", "")]}}
    with pytest.raises(envoyx.ConfigError) as err:
        envoyx.Server(_config(policy))
    assert any("allowed_route_names" in e for e in err.value.errors), err.value.errors
