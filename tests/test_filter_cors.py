"""``envoy.filters.http.cors`` implemented in Rust: preflight replies, the CORS headers of
responses, the policy of a virtual host under its route's (``typed_per_filter_config``
``CorsPolicy``), ``filter_enabled`` / ``shadow_enabled``, private network access,
``forward_not_matching_preflights``, and the ``cors.origin_valid`` / ``origin_invalid``
stats, side by side with Envoy 1.40; configuration errors name their field.
"""

from __future__ import annotations

from typing import Any

import pytest

import envoyx
from support.bootstrap import bootstrap, cluster, http_listener, route, virtual_host
from support.differential import Ctx, Http, Json, Scenario, differential_tests

pytestmark = pytest.mark.envoy

CORS = "envoy.filters.http.cors"
CORS_TYPE = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"
POLICY_TYPE = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy"
FILTER_CONFIG_TYPE = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
STATS = "http.ingress_http.cors."

ORIGIN = "https://app.example"
CORS_FACTS = (
    "header:access-control-allow-origin",
    "header:access-control-allow-credentials",
    "header:access-control-allow-methods",
    "header:access-control-allow-headers",
    "header:access-control-expose-headers",
    "header:access-control-max-age",
    "header:access-control-allow-private-network",
)


def policy(**fields: Any) -> Json:
    return {"@type": POLICY_TYPE, **fields}


def origins(*matchers: Json) -> list[Json]:
    return list(matchers)


def with_policy(r: Json, p: Json) -> Json:
    r["typed_per_filter_config"] = {CORS: p}
    return r


def build(ctx: Ctx, routes: list[Json], vhost_policy: Json | None = None) -> Json:
    vh = virtual_host("all", ["*"], routes)
    if vhost_policy is not None:
        vh["typed_per_filter_config"] = {CORS: vhost_policy}
    listener = http_listener(port=ctx.port, virtual_hosts=[vh], access_log_path=ctx.access_log)
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [
        {"name": CORS, "typed_config": {"@type": CORS_TYPE}},
        *hcm["http_filters"],
    ]
    return bootstrap(
        admin_port=ctx.admin_port,
        listeners=[listener],
        clusters=[cluster("backend", [ctx.up("a")])],
    )


FULL = policy(
    allow_origin_string_match=[{"exact": ORIGIN}, {"suffix": ".trusted.example"}],
    allow_methods="GET, POST",
    allow_headers="x-a, x-b",
    expose_headers="x-exposed",
    max_age="600",
    allow_credentials=True,
)


def build_vhost(ctx: Ctx) -> Json:
    return build(
        ctx,
        [
            route({"path": "/direct"}, direct=(201, "made here")),
            route({"prefix": "/"}, cluster="backend"),
        ],
        FULL,
    )


def build_route_over_vhost(ctx: Ctx) -> Json:
    return build(
        ctx,
        [
            with_policy(
                route({"prefix": "/star"}, cluster="backend"),
                policy(allow_methods="*", allow_headers="*", allow_credentials=False),
            ),
            with_policy(
                route({"prefix": "/off"}, cluster="backend"),
                {"@type": FILTER_CONFIG_TYPE, "disabled": True},
            ),
            with_policy(
                route({"prefix": "/own"}, cluster="backend"),
                policy(allow_origin_string_match=[{"prefix": "https://own."}]),
            ),
            route({"prefix": "/"}, cluster="backend"),
        ],
        FULL,
    )


def build_forward(ctx: Ctx) -> Json:
    return build(
        ctx,
        [
            with_policy(
                route({"prefix": "/answer"}, cluster="backend"),
                policy(
                    allow_origin_string_match=[{"exact": ORIGIN}],
                    forward_not_matching_preflights=False,
                    allow_methods="PUT",
                ),
            ),
            with_policy(
                route({"prefix": "/any"}, cluster="backend"),
                policy(allow_origin_string_match=[{"safe_regex": {"regex": ".*"}}]),
            ),
            with_policy(
                route({"prefix": "/pna"}, cluster="backend"),
                policy(
                    allow_origin_string_match=[{"exact": ORIGIN}], allow_private_network_access=True
                ),
            ),
            route({"prefix": "/"}, cluster="backend"),
        ],
    )


def build_enabled(ctx: Ctx) -> Json:
    off = {"default_value": {"numerator": 0}}
    on = {"default_value": {"numerator": 100}}
    allowed = [{"exact": ORIGIN}]
    return build(
        ctx,
        [
            with_policy(
                route({"prefix": "/shadow"}, cluster="backend"),
                policy(allow_origin_string_match=allowed, filter_enabled=off, shadow_enabled=on),
            ),
            with_policy(
                route({"prefix": "/off"}, cluster="backend"),
                policy(allow_origin_string_match=allowed, filter_enabled=off),
            ),
            with_policy(
                route({"prefix": "/on"}, cluster="backend"),
                policy(
                    allow_origin_string_match=allowed,
                    allow_methods="GET",
                    filter_enabled={
                        "default_value": {"numerator": 10000, "denominator": "TEN_THOUSAND"}
                    },
                ),
            ),
        ],
    )


def build_legacy(ctx: Ctx) -> Json:
    bs = build(
        ctx,
        [
            with_policy(
                route({"prefix": "/typed"}, cluster="backend"),
                policy(allow_origin_string_match=[{"exact": "https://typed.example"}]),
            ),
            route({"prefix": "/put"}, cluster="backend"),
            route({"prefix": "/"}, cluster="backend"),
        ],
    )
    vh = bs["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"
    ]["virtual_hosts"][0]
    vh["cors"] = {
        "allow_origin_string_match": [{"exact": ORIGIN}],
        "allow_methods": "GET",
        "max_age": "30",
    }
    vh["routes"][1]["route"]["cors"] = {"allow_methods": "PUT", "allow_credentials": True}
    return bs


def preflight(path: str, origin: str = ORIGIN, *extra: tuple[str, str], **expect: Any) -> Http:
    headers = (("origin", origin), ("access-control-request-method", "POST"), *extra)
    return Http(path, method="OPTIONS", headers=headers, observe=CORS_FACTS, expect=expect)


def simple(path: str, origin: str | None = ORIGIN, method: str = "GET", **expect: Any) -> Http:
    headers = (("origin", origin),) if origin is not None else ()
    return Http(path, method=method, headers=headers, observe=CORS_FACTS, expect=expect)


SCENARIOS = [
    Scenario(
        "vhost_policy",
        build_vhost,
        (
            preflight(
                "/",
                **{
                    "status": 200,
                    "upstream": None,
                    "body": "",
                    "header:access-control-allow-origin": ORIGIN,
                    "header:access-control-allow-methods": "GET, POST",
                    "header:access-control-allow-headers": "x-a, x-b",
                    "header:access-control-max-age": "600",
                    "header:access-control-allow-credentials": "true",
                },
            ),
            preflight(
                "/",
                "https://x.trusted.example",
                **{"header:access-control-allow-origin": "https://x.trusted.example"},
            ),
            # Not allowed: forwarded upstream (forward_not_matching_preflights defaults on).
            preflight("/", "https://evil.example", **{"upstream": "a"}),
            simple(
                "/",
                **{
                    "upstream": "a",
                    "header:access-control-allow-origin": ORIGIN,
                    "header:access-control-expose-headers": "x-exposed",
                },
            ),
            simple(
                "/",
                "https://evil.example",
                **{"upstream": "a", "header:access-control-allow-origin": None},
            ),
            simple("/", None, **{"upstream": "a", "header:access-control-allow-origin": None}),
            simple("/", ""),
            # OPTIONS without Access-Control-Request-Method is no preflight.
            simple("/", method="OPTIONS", **{"upstream": "a"}),
            # A direct response has no route entry: the filter leaves it alone.
            simple("/direct", **{"status": 201, "header:access-control-allow-origin": None}),
        ),
        stats={f"{STATS}origin_valid": 4, f"{STATS}origin_invalid": 2},
    ),
    Scenario(
        "route_policy_over_vhost",
        build_route_over_vhost,
        (
            preflight(
                "/star",
                ORIGIN,
                ("access-control-request-headers", "x-custom"),
                **{
                    "status": 200,
                    "header:access-control-allow-methods": "POST",
                    "header:access-control-allow-headers": "x-custom",
                    "header:access-control-allow-credentials": None,
                    "header:access-control-max-age": "600",
                },
            ),
            simple("/star", **{"header:access-control-expose-headers": "x-exposed"}),
            preflight("/off", **{"upstream": "a"}),
            simple("/off", **{"header:access-control-allow-origin": None}),
            preflight("/own", "https://own.example", **{"status": 200}),
            preflight("/own", ORIGIN, **{"upstream": "a"}),
        ),
        stats={f"{STATS}origin_valid": 3, f"{STATS}origin_invalid": 1},
    ),
    Scenario(
        "forward_regex_and_private_network",
        build_forward,
        (
            preflight(
                "/answer",
                "https://evil.example",
                **{
                    "status": 200,
                    "upstream": None,
                    "header:access-control-allow-origin": None,
                    "header:access-control-allow-methods": "PUT",
                },
            ),
            preflight(
                "/any",
                "https://whatever.example",
                **{"header:access-control-allow-origin": "https://whatever.example"},
            ),
            preflight(
                "/pna",
                ORIGIN,
                ("access-control-request-private-network", "true"),
                **{"header:access-control-allow-private-network": "true"},
            ),
            preflight(
                "/pna",
                ORIGIN,
                ("access-control-request-private-network", "false"),
                **{"header:access-control-allow-private-network": None},
            ),
            preflight("/", **{"upstream": "a"}),
        ),
        stats={f"{STATS}origin_valid": 3, f"{STATS}origin_invalid": 1},
    ),
    Scenario(
        "filter_enabled_and_shadow",
        build_enabled,
        (
            preflight("/shadow", **{"upstream": "a", "header:access-control-allow-origin": None}),
            simple("/shadow", "https://evil.example", **{"upstream": "a"}),
            preflight("/off", **{"upstream": "a"}),
            preflight(
                "/on",
                **{"status": 200, "upstream": None, "header:access-control-allow-methods": "GET"},
            ),
        ),
        stats={f"{STATS}origin_valid": 2, f"{STATS}origin_invalid": 1},
    ),
    Scenario(
        "deprecated_cors_fields",
        build_legacy,
        (
            preflight(
                "/",
                **{
                    "status": 200,
                    "header:access-control-allow-methods": "GET",
                    "header:access-control-max-age": "30",
                },
            ),
            preflight(
                "/put",
                **{
                    "status": 200,
                    "header:access-control-allow-methods": "PUT",
                    "header:access-control-allow-credentials": "true",
                    "header:access-control-max-age": "30",
                },
            ),
            # A typed_per_filter_config policy hides the deprecated fields entirely.
            preflight("/typed", **{"upstream": "a"}),
            preflight(
                "/typed",
                "https://typed.example",
                **{"status": 200, "header:access-control-allow-methods": None},
            ),
        ),
        stats={f"{STATS}origin_valid": 3, f"{STATS}origin_invalid": 1},
    ),
    Scenario(
        "preflight_over_http2",
        build_vhost,
        (
            Http(
                "/",
                method="OPTIONS",
                http2=True,
                headers=(("origin", ORIGIN), ("access-control-request-method", "GET")),
                observe=CORS_FACTS,
                expect={"status": 200, "header:access-control-allow-origin": ORIGIN},
            ),
        ),
        stats={f"{STATS}origin_valid": 1},
    ),
]


test_scenario = differential_tests(SCENARIOS)


HCM = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"
ROUTE = f"{HCM}.route_config.virtual_hosts[0].routes[0]"


def _doc(route_fields: Json, filter_config: Json | None = None) -> Json:
    r = {**route({"prefix": "/"}, direct=(200, "x")), **route_fields}
    listener = http_listener(port=0, virtual_hosts=[virtual_host("all", ["*"], [r])])
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [
        {"name": CORS, "typed_config": {"@type": CORS_TYPE, **(filter_config or {})}},
        *hcm["http_filters"],
    ]
    return bootstrap(admin_port=0, listeners=[listener], clusters=[])


PYTHON_FILTER = {
    "name": "py",
    "typed_config": {
        "@type": "type.googleapis.com/xds.type.v3.TypedStruct",
        "type_url": "envoyx.filters.http.python",
        "value": {"module": "m", "class": "C"},
    },
}

BAD: dict[str, tuple[Json, bool, str]] = {
    "bad_origin_regex": (
        {
            "typed_per_filter_config": {
                CORS: policy(allow_origin_string_match=[{"safe_regex": {"regex": "("}}])
            }
        },
        False,
        f'{ROUTE}.typed_per_filter_config["{CORS}"].allow_origin_string_match[0].safe_regex',
    ),
    # envoyx runs its native filters before the Python ones: one after them is refused.
    "after_python_filter": (
        {},
        True,
        f"{HCM}.http_filters[1].name: {CORS}: envoyx runs native filters before Python filters",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_cors_config_names_the_field(case: str) -> None:
    fields, python_first, message = BAD[case]
    doc = _doc(fields)
    if python_first:
        hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        hcm["typed_config"]["http_filters"].insert(0, PYTHON_FILTER)
    with pytest.raises(envoyx.ConfigError) as info:
        envoyx.Server(doc)
    assert any(message in e for e in info.value.errors), info.value.errors
