"""Route matching beside Envoy 1.40: a route's ``headers``, ``query_parameters``,
``grpc``, ``runtime_fraction`` (defaults and the bootstrap's static runtime layer),
``path_separated_prefix``, ``case_sensitive``, URI templates (``path_match_policy``
with ``path_rewrite_policy``), virtual host domains with ports,
``ignore_port_in_host_matching`` and the connection manager's
``strip_matching_host_port`` / ``strip_any_host_port``.

Most rows answer with a ``direct_response`` whose body names the route that matched,
so that the compared facts say which route each request took; rewrites and host
stripping go to the echoing upstream and compare what it received. The machinery is
in ``support/differential.py``. The last tests check that malformed matchers are
refused with their field path, by envoyx as by Envoy.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import envoyx
from support.bootstrap import bootstrap, cluster, http_listener, route, virtual_host
from support.differential import Ctx, Http, Json, Scenario, differential_tests

pytestmark = pytest.mark.envoy

URI_MATCH = "type.googleapis.com/envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig"
URI_REWRITE = (
    "type.googleapis.com/envoy.extensions.path.rewrite.uri_template.v3.UriTemplateRewriteConfig"
)


# ---------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------


def named(match: Json, name: str) -> Json:
    """A route answering 200 with its own name."""
    return route(match, direct=(200, name))


def hdr(name: str, **spec: Any) -> Json:
    return {"name": name, **spec}


def sm(**spec: Any) -> Json:
    return {"string_match": spec}


def _hcm(bs: Json) -> Json:
    hcm: Json = bs["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    return hcm


def one_vhost(
    routes: list[Json],
    *,
    domains: tuple[str, ...] = ("*",),
    hcm: Json | None = None,
    route_config: Json | None = None,
    runtime: Json | None = None,
    upstream: bool = False,
) -> Callable[[Ctx], Json]:
    def build(ctx: Ctx) -> Json:
        bs = bootstrap(
            admin_port=ctx.admin_port,
            listeners=[
                http_listener(
                    port=ctx.port, virtual_hosts=[virtual_host("all", list(domains), routes)]
                )
            ],
            clusters=[cluster("backend", [ctx.up("a")])] if upstream else [],
        )
        _hcm(bs).update(hcm or {})
        _hcm(bs)["route_config"].update(route_config or {})
        if runtime is not None:
            bs["layered_runtime"] = {"layers": [{"name": "static", "static_layer": runtime}]}
        return bs

    return build


def vhosts(
    hosts: list[tuple[str, list[str]]], *, hcm: Json | None = None, route_config: Json | None = None
) -> Callable[[Ctx], Json]:
    """Virtual hosts each answering with their name."""

    def build(ctx: Ctx) -> Json:
        bs = bootstrap(
            admin_port=ctx.admin_port,
            listeners=[
                http_listener(
                    port=ctx.port,
                    virtual_hosts=[
                        virtual_host(name, domains, [named({"prefix": "/"}, name)])
                        for name, domains in hosts
                    ],
                )
            ],
            clusters=[],
        )
        _hcm(bs).update(hcm or {})
        _hcm(bs)["route_config"].update(route_config or {})
        return bs

    return build


def get(path: str = "/", *headers: tuple[str, str], took: str | None = None, **kw: Any) -> Http:
    """A GET; ``took`` names the route expected (None: 404, no route)."""
    expect: dict[str, Any] = {"status": 200 if took else 404}
    if took:
        expect["body"] = took
    return Http(path=path, headers=headers, expect=expect, **kw)


GRPC = ("content-type", "application/grpc")


def upstream_took(path: str, *headers: tuple[str, str], **kw: Any) -> Http:
    """A GET expected to reach the upstream (a gRPC request's local replies have no
    body to name a route by)."""
    return Http(path=path, headers=headers, expect={"status": 200, "upstream": "a"}, **kw)


def direct_took(path: str, *headers: tuple[str, str], **kw: Any) -> Http:
    """A GET expected to get a direct response (status 200) rather than the upstream."""
    return Http(path=path, headers=headers, expect={"status": 200, "upstream": None}, **kw)


def host(h: str, took: str | None, path: str = "/", **kw: Any) -> Http:
    return get(path, ("host", h), took=took, **kw)


def template(path_template: str) -> Json:
    return {
        "path_match_policy": {
            "name": "envoy.path.match.uri_template.uri_template_matcher",
            "typed_config": {"@type": URI_MATCH, "path_template": path_template},
        }
    }


def template_route(path_template: str, rewrite: str) -> Json:
    r = route(template(path_template), cluster="backend")
    r["route"]["path_rewrite_policy"] = {
        "name": "envoy.path.rewrite.uri_template.uri_template_rewriter",
        "typed_config": {"@type": URI_REWRITE, "path_template_rewrite": rewrite},
    }
    return r


def upstream_path(path: str, want: str, *headers: tuple[str, str]) -> Http:
    return Http(
        path=path,
        headers=headers,
        observe=("up.path", "up.header:x-envoy-original-path"),
        expect={"status": 200, "up.path": want},
    )


# ---------------------------------------------------------------------------------
# The scenarios
# ---------------------------------------------------------------------------------

SCENARIOS = [
    Scenario(
        "header_exact",
        one_vhost([named({"prefix": "/", "headers": [hdr("x-env", **sm(exact="prod"))]}, "prod")]),
        (
            get("/", ("x-env", "prod"), took="prod"),
            get("/", ("x-env", "Prod")),
            get("/", ("x-env", "prod2")),
            get("/"),
        ),
    ),
    Scenario(
        "header_prefix_suffix_contains",
        one_vhost(
            [
                named({"prefix": "/", "headers": [hdr("x-v", **sm(prefix="v1."))]}, "prefix"),
                named({"prefix": "/", "headers": [hdr("x-v", **sm(suffix="-beta"))]}, "suffix"),
                named({"prefix": "/", "headers": [hdr("x-v", **sm(contains="rc"))]}, "contains"),
            ]
        ),
        (
            get("/", ("x-v", "v1.2-beta"), took="prefix"),
            get("/", ("x-v", "v2.0-beta"), took="suffix"),
            get("/", ("x-v", "v2.0-rc1"), took="contains"),
            get("/", ("x-v", "V1.2")),
            get("/", ("x-v", "v2.0-BETA")),
        ),
    ),
    Scenario(
        "header_ignore_case",
        one_vhost(
            [
                named(
                    {"prefix": "/", "headers": [hdr("x-a", **sm(exact="Alpha", ignore_case=True))]},
                    "exact",
                ),
                named(
                    {
                        "prefix": "/",
                        "headers": [hdr("x-c", **sm(contains="MiD", ignore_case=True))],
                    },
                    "contains",
                ),
                named(
                    {"prefix": "/", "headers": [hdr("x-s", **sm(suffix=".COM", ignore_case=True))]},
                    "suffix",
                ),
            ]
        ),
        (
            get("/", ("x-a", "aLPHA"), took="exact"),
            get("/", ("x-a", "alphab")),
            get("/", ("x-c", "AmIdB"), took="contains"),
            get("/", ("x-s", "a.example.com"), took="suffix"),
            get("/", ("x-s", "a.example.co")),
        ),
    ),
    Scenario(
        "header_regex",
        one_vhost(
            [
                named(
                    {
                        "prefix": "/",
                        "headers": [hdr("x-id", **sm(safe_regex={"regex": "[0-9]{3}-[a-z]+"}))],
                    },
                    "regex",
                ),
            ]
        ),
        (
            get("/", ("x-id", "123-abc"), took="regex"),
            # The regex must match the whole value.
            get("/", ("x-id", "x123-abc")),
            get("/", ("x-id", "123-abc9")),
            get("/", ("x-id", "123-ABC")),
        ),
    ),
    Scenario(
        "header_present",
        one_vhost(
            [
                named({"path": "/p", "headers": [hdr("x-p", present_match=True)]}, "present"),
                named({"path": "/a", "headers": [hdr("x-p", present_match=False)]}, "absent"),
                named(
                    {"path": "/i", "headers": [hdr("x-p", present_match=True, invert_match=True)]},
                    "inverted",
                ),
                named({"path": "/n", "headers": [hdr("x-p")]}, "name_only"),
            ]
        ),
        (
            get("/p", ("x-p", ""), took="present"),
            get("/p"),
            get("/a", took="absent"),
            get("/a", ("x-p", "1")),
            get("/i", took="inverted"),
            get("/i", ("x-p", "1")),
            get("/n", ("x-p", "1"), took="name_only"),
            get("/n"),
        ),
    ),
    Scenario(
        "header_range",
        one_vhost(
            [
                named(
                    {"prefix": "/", "headers": [hdr("x-n", range_match={"start": -10, "end": 10})]},
                    "range",
                ),
            ]
        ),
        (
            get("/", ("x-n", "-10"), took="range"),
            get("/", ("x-n", "9"), took="range"),
            get("/", ("x-n", "+3"), took="range"),
            get("/", ("x-n", "10")),
            get("/", ("x-n", "1.5")),
            get("/", ("x-n", "abc")),
            get("/", ("x-n", "")),
            get("/"),
        ),
    ),
    Scenario(
        "header_invert",
        one_vhost(
            [
                named(
                    {"prefix": "/", "headers": [hdr("x-e", **sm(exact="a"), invert_match=True)]},
                    "not_a",
                ),
                named(
                    {
                        "prefix": "/",
                        "headers": [
                            hdr("x-r", range_match={"start": 0, "end": 5}, invert_match=True)
                        ],
                    },
                    "out_of_range",
                ),
            ]
        ),
        (
            get("/", ("x-e", "b"), took="not_a"),
            get("/", ("x-e", "a")),
            # A missing header fails even an inverted matcher.
            get("/"),
            get("/", ("x-r", "7"), took="out_of_range"),
            get("/", ("x-r", "nan"), took="out_of_range"),
            get("/", ("x-r", "3")),
        ),
    ),
    Scenario(
        "header_missing_as_empty",
        one_vhost(
            [
                named(
                    {
                        "path": "/empty",
                        "headers": [hdr("x-m", **sm(exact=""), treat_missing_header_as_empty=True)],
                    },
                    "empty",
                ),
                named(
                    {
                        "path": "/inv",
                        "headers": [
                            hdr(
                                "x-m",
                                **sm(exact="v"),
                                invert_match=True,
                                treat_missing_header_as_empty=True,
                            )
                        ],
                    },
                    "inverted",
                ),
                named(
                    {
                        "path": "/re",
                        "headers": [
                            hdr(
                                "x-m",
                                **sm(safe_regex={"regex": ".*"}),
                                treat_missing_header_as_empty=True,
                            )
                        ],
                    },
                    "regex",
                ),
            ]
        ),
        (
            get("/empty", took="empty"),
            get("/empty", ("x-m", ""), took="empty"),
            get("/empty", ("x-m", "x")),
            get("/inv", took="inverted"),
            get("/inv", ("x-m", "v")),
            get("/re", took="regex"),
        ),
    ),
    Scenario(
        "header_deprecated_forms",
        one_vhost(
            [
                named({"path": "/exact", "headers": [hdr("x-h", exact_match="v")]}, "exact"),
                named({"path": "/any", "headers": [hdr("x-h", exact_match="")]}, "any"),
                named({"path": "/prefix", "headers": [hdr("x-h", prefix_match="ab")]}, "prefix"),
                named({"path": "/suffix", "headers": [hdr("x-h", suffix_match="yz")]}, "suffix"),
                named(
                    {"path": "/contains", "headers": [hdr("x-h", contains_match="mm")]},
                    "contains",
                ),
                named(
                    {"path": "/regex", "headers": [hdr("x-h", safe_regex_match={"regex": "a+"})]},
                    "regex",
                ),
            ]
        ),
        (
            get("/exact", ("x-h", "v"), took="exact"),
            get("/exact", ("x-h", "V")),
            get("/any", ("x-h", "whatever"), took="any"),
            get("/any"),
            get("/prefix", ("x-h", "abc"), took="prefix"),
            get("/suffix", ("x-h", "xyz"), took="suffix"),
            get("/contains", ("x-h", "hmmm"), took="contains"),
            get("/regex", ("x-h", "aaa"), took="regex"),
            get("/regex", ("x-h", "aab")),
        ),
    ),
    Scenario(
        "header_repeated_values",
        one_vhost(
            [
                named({"path": "/j", "headers": [hdr("x-r", **sm(exact="1,2"))]}, "joined"),
                named({"path": "/f", "headers": [hdr("x-r", **sm(exact="1"))]}, "first"),
                named({"path": "/s", "headers": [hdr("x-r", **sm(exact="2"))]}, "second"),
                named({"path": "/c", "headers": [hdr("x-r", **sm(exact="1, 2"))]}, "comma"),
                named(
                    {"path": "/i", "headers": [hdr("x-r", **sm(exact="1"), invert_match=True)]},
                    "inverted",
                ),
                named(
                    {"path": "/r", "headers": [hdr("x-r", range_match={"start": 2, "end": 3})]},
                    "range",
                ),
            ]
        ),
        (
            # Each value is compared on its own; nothing is joined.
            get("/j", ("x-r", "1"), ("x-r", "2")),
            get("/j", ("x-r", "1,2"), took="joined"),
            get("/f", ("x-r", "1"), ("x-r", "2"), took="first"),
            get("/s", ("x-r", "1"), ("x-r", "2"), took="second"),
            get("/c", ("x-r", "1"), ("x-r", "2")),
            get("/c", ("x-r", "1, 2"), took="comma"),
            # One value matching is the header matching, then inverted.
            get("/i", ("x-r", "1"), ("x-r", "2")),
            get("/i", ("x-r", "2"), ("x-r", "1")),
            get("/i", ("x-r", "2"), ("x-r", "3"), took="inverted"),
            get("/r", ("x-r", "1"), ("x-r", "2"), took="range"),
            get("/s", ("x-r", "1"), ("x-r", "2"), took="second", http2=True),
        ),
    ),
    Scenario(
        "header_pseudo_headers",
        one_vhost(
            [
                named({"prefix": "/", "headers": [hdr(":method", **sm(exact="POST"))]}, "post"),
                named({"prefix": "/", "headers": [hdr(":authority", **sm(prefix="api."))]}, "api"),
                named({"prefix": "/", "headers": [hdr(":path", **sm(suffix="?debug=1"))]}, "debug"),
                named({"prefix": "/", "headers": [hdr("host", **sm(exact="h.example"))]}, "host"),
                named({"prefix": "/", "headers": [hdr(":scheme", **sm(exact="http"))]}, "scheme"),
            ]
        ),
        (
            Http(path="/", method="POST", body=b"x", expect={"status": 200, "body": "post"}),
            host("api.example.com", "api"),
            get("/x?debug=1", took="debug"),
            host("h.example", "host"),
            get("/", took="scheme"),
            Http(path="/", method="POST", http2=True, expect={"status": 200, "body": "post"}),
            host("api.example.com", "api", http2=True),
        ),
    ),
    Scenario(
        "header_all_must_match",
        one_vhost(
            [
                named(
                    {
                        "prefix": "/",
                        "headers": [
                            hdr("x-a", **sm(exact="1")),
                            hdr("x-b", present_match=True),
                            hdr("x-c", present_match=True, invert_match=True),
                        ],
                    },
                    "all",
                ),
                named({"prefix": "/"}, "fallback"),
            ]
        ),
        (
            get("/", ("x-a", "1"), ("x-b", "z"), took="all"),
            get("/", ("x-a", "1"), took="fallback"),
            get("/", ("x-a", "1"), ("x-b", "z"), ("x-c", "y"), took="fallback"),
            get("/", ("x-a", "2"), ("x-b", "z"), took="fallback"),
        ),
    ),
    Scenario(
        "query_string_match",
        one_vhost(
            [
                named(
                    {
                        "prefix": "/",
                        "query_parameters": [{"name": "v", "string_match": {"exact": "2"}}],
                    },
                    "v2",
                ),
                named(
                    {
                        "prefix": "/",
                        "query_parameters": [
                            {"name": "q", "string_match": {"exact": "a%20b"}},
                        ],
                    },
                    "raw",
                ),
                named(
                    {
                        "prefix": "/",
                        "query_parameters": [
                            {"name": "u", "string_match": {"prefix": "AB", "ignore_case": True}},
                            {"name": "r", "string_match": {"safe_regex": {"regex": "[0-9]+"}}},
                        ],
                    },
                    "two",
                ),
            ]
        ),
        (
            get("/?v=2", took="v2"),
            get("/x?a=1&v=2&b", took="v2"),
            # The first value decides.
            get("/?v=1&v=2"),
            get("/?q=a%20b", took="raw"),
            get("/?q=a+b"),
            get("/?u=abc&r=123", took="two"),
            get("/?u=abc&r=12x"),
            get("/?V=2"),
            get("/v=2"),
        ),
    ),
    Scenario(
        "query_present",
        one_vhost(
            [
                named(
                    {"path": "/p", "query_parameters": [{"name": "debug", "present_match": True}]},
                    "present",
                ),
                named(
                    {"path": "/a", "query_parameters": [{"name": "debug", "present_match": False}]},
                    "absent",
                ),
                named({"path": "/n", "query_parameters": [{"name": "debug"}]}, "name_only"),
                named(
                    {
                        "path": "/e",
                        "query_parameters": [{"name": "k", "string_match": {"exact": ""}}],
                    },
                    "empty",
                ),
            ]
        ),
        (
            get("/p?debug", took="present"),
            get("/p?debug=0", took="present"),
            get("/p?debugx=1"),
            get("/p"),
            get("/a", took="absent"),
            get("/a?x=1", took="absent"),
            get("/a?debug=1"),
            get("/n?debug", took="name_only"),
            get("/n"),
            get("/e?k", took="empty"),
            get("/e?k=", took="empty"),
            get("/e?k=1"),
        ),
    ),
    Scenario(
        "grpc_matcher",
        one_vhost(
            [
                route({"prefix": "/", "grpc": {}}, cluster="backend"),
                named({"prefix": "/"}, "other"),
            ],
            upstream=True,
        ),
        (
            upstream_took("/", GRPC),
            upstream_took("/", ("content-type", "application/grpc+proto")),
            get("/", ("content-type", "application/grpc;charset=x"), took="other"),
            get("/", ("content-type", "application/grpc-web"), took="other"),
            get("/", ("content-type", "application/json"), took="other"),
            get("/", took="other"),
            upstream_took("/", GRPC, http2=True),
        ),
    ),
    Scenario(
        "runtime_fraction_defaults",
        one_vhost(
            [
                named(
                    {
                        "prefix": "/",
                        "runtime_fraction": {"default_value": {"numerator": 0}},
                    },
                    "never",
                ),
                named(
                    {
                        "prefix": "/",
                        "runtime_fraction": {
                            "default_value": {"numerator": 1000000, "denominator": "MILLION"},
                            "runtime_key": "routing.not_set",
                        },
                    },
                    "always",
                ),
            ]
        ),
        tuple(get("/", took="always") for _ in range(5)),
    ),
    Scenario(
        "runtime_fraction_static_layer",
        one_vhost(
            [
                named(
                    {
                        "path": "/int",
                        "runtime_fraction": {
                            "default_value": {"numerator": 0},
                            "runtime_key": "routing.canary",
                        },
                    },
                    "canary",
                ),
                named(
                    {
                        "path": "/fraction",
                        "runtime_fraction": {
                            "default_value": {"numerator": 100},
                            "runtime_key": "routing.off",
                        },
                    },
                    "off",
                ),
                named(
                    {
                        "path": "/flat",
                        "runtime_fraction": {
                            "default_value": {"numerator": 0},
                            "runtime_key": "routing.flat",
                        },
                    },
                    "flat",
                ),
                named({"prefix": "/"}, "fallback"),
            ],
            runtime={
                "routing": {
                    "canary": 100,
                    "off": {"numerator": 0, "denominator": "HUNDRED"},
                },
                "routing.flat": "100",
            },
        ),
        (
            get("/int", took="canary"),
            get("/int", took="canary"),
            get("/fraction", took="fallback"),
            get("/fraction", took="fallback"),
            get("/flat", took="flat"),
        ),
    ),
    Scenario(
        "path_separated_prefix",
        one_vhost(
            [
                named({"path_separated_prefix": "/api"}, "api"),
                named({"path_separated_prefix": "/Docs", "case_sensitive": False}, "docs"),
            ]
        ),
        (
            get("/api", took="api"),
            get("/api/", took="api"),
            get("/api/v1/x", took="api"),
            get("/api?x=1", took="api"),
            get("/apis"),
            get("/API/v1"),
            get("/docs/x", took="docs"),
            get("/DOCS", took="docs"),
            get("/docsx"),
        ),
    ),
    Scenario(
        "path_separated_prefix_rewrite",
        one_vhost(
            [
                {
                    "match": {"path_separated_prefix": "/old"},
                    "route": {"cluster": "backend", "prefix_rewrite": "/new"},
                }
            ],
            upstream=True,
        ),
        (upstream_path("/old/a?b=1", "/new/a?b=1"), upstream_path("/old", "/new")),
    ),
    Scenario(
        "case_sensitive_false",
        one_vhost(
            [
                named({"path": "/Exact", "case_sensitive": False}, "path"),
                named({"prefix": "/Pre", "case_sensitive": False}, "prefix"),
                named({"safe_regex": {"regex": "/re/[a-z]+"}, "case_sensitive": False}, "regex"),
                named({"prefix": "/Strict"}, "strict"),
            ]
        ),
        (
            get("/exact", took="path"),
            get("/EXACT?q=1", took="path"),
            get("/prefix", took="prefix"),
            get("/PREfix", took="prefix"),
            get("/re/abc", took="regex"),
            # case_sensitive does not apply to regexes, as in Envoy.
            get("/re/ABC"),
            get("/strict"),
            get("/Strict", took="strict"),
        ),
    ),
    Scenario(
        "uri_template_match",
        one_vhost(
            [
                named(template("/{lang}/static/{file=**}"), "static"),
                named(template("/assets/*/**.css"), "css"),
                named(template("/users/{id}/orders/{order}"), "order"),
                named(template("/v/{ver=*}/"), "slash"),
            ]
        ),
        (
            get("/en/static/css/site.css", took="static"),
            get("/en/static/", took="static"),
            get("/en/dynamic/x"),
            get("/assets/a/b/c.css", took="css"),
            get("/assets/a/b/c.js"),
            get("/users/42/orders/7", took="order"),
            get("/users/42/orders/7?full=1", took="order"),
            get("/users/42/orders"),
            get("/users/4%202/orders/7", took="order"),
            get("/v/2/", took="slash"),
            get("/v/2"),
        ),
    ),
    Scenario(
        "uri_template_rewrite",
        one_vhost(
            [
                template_route("/{lang}/static/{file=**}", "/static/{file}/{lang}"),
                template_route("/users/{id}/orders/{order}", "/orders/{order}/by/{id}"),
            ],
            upstream=True,
        ),
        (
            upstream_path("/en/static/css/site.css", "/static/css/site.css/en"),
            upstream_path("/fr/static/a?v=1", "/static/a/fr?v=1"),
            upstream_path("/users/7/orders/9", "/orders/9/by/7"),
        ),
    ),
    Scenario(
        "uri_template_rewrite_suffix",
        one_vhost(
            [template_route("/shop/{item}.html", "/items/{item}")],
            upstream=True,
        ),
        (upstream_path("/shop/book.html?x", "/items/book?x"),),
    ),
    Scenario(
        "domains_with_ports",
        vhosts(
            [
                ("default", ["*"]),
                ("with_port", ["example.com:8080"]),
                ("without_port", ["example.com"]),
                ("wild_port", ["*.example.com:8080"]),
                ("wild", ["*.example.com"]),
                ("prefix_port", ["api.*"]),
            ]
        ),
        (
            host("example.com:8080", "with_port"),
            host("example.com", "without_port"),
            host("EXAMPLE.com:8080", "with_port"),
            host("example.com:9090", "default"),
            host("a.example.com:8080", "wild_port"),
            host("a.example.com", "wild"),
            host("a.example.com:81", "default"),
            host("api.internal:8080", "prefix_port"),
            host("example.com:8080", "with_port", http2=True),
        ),
    ),
    Scenario(
        "domains_with_ports_no_default",
        vhosts([("with_port", ["example.com:8080"]), ("ipv6", ["[::1]:8080", "[::2]"])]),
        (
            host("example.com", None),
            host("example.com:8080", "with_port"),
            host("[::1]:8080", "ipv6"),
            host("[::1]", None),
            host("[::2]", "ipv6"),
        ),
    ),
    Scenario(
        "ignore_port_in_host_matching",
        vhosts(
            [("exact", ["example.com"]), ("ported", ["ported.com:8080"]), ("v6", ["[::1]"])],
            route_config={"ignore_port_in_host_matching": True},
        ),
        (
            host("example.com:8080", "exact"),
            host("example.com", "exact"),
            host("ported.com:8080", None),
            host("[::1]:443", "v6"),
        ),
    ),
    Scenario(
        "strip_any_host_port",
        one_vhost(
            [route({"prefix": "/"}, cluster="backend")],
            domains=("example.com",),
            hcm={"strip_any_host_port": True},
            upstream=True,
        ),
        (
            Http(
                path="/",
                headers=(("host", "example.com:1234"),),
                observe=("up.header:host",),
                expect={"status": 200, "up.header:host": "example.com"},
            ),
            Http(
                path="/",
                headers=(("host", "example.com"),),
                observe=("up.header:host",),
                expect={"status": 200, "up.header:host": "example.com"},
            ),
            Http(
                path="/",
                headers=(("host", "example.com:1234"),),
                http2=True,
                observe=("up.header:host",),
                expect={"status": 200, "up.header:host": "example.com"},
            ),
        ),
    ),
    Scenario(
        "strip_matching_host_port",
        # httpx sends Host 127.0.0.1:<listener port>: that port is the listener's.
        one_vhost(
            [route({"prefix": "/"}, cluster="backend")],
            domains=("127.0.0.1", "other.example:1"),
            hcm={"strip_matching_host_port": True},
            upstream=True,
        ),
        (
            Http(
                path="/",
                observe=("up.header:host",),
                expect={"status": 200, "up.header:host": "127.0.0.1"},
            ),
            Http(
                path="/",
                headers=(("host", "other.example:1"),),
                observe=("up.header:host",),
                expect={"status": 200, "up.header:host": "other.example:1"},
            ),
            Http(path="/", headers=(("host", "127.0.0.1:1"),), expect={"status": 404}),
        ),
    ),
    Scenario(
        "matchers_fall_through_in_order",
        one_vhost(
            [
                named(
                    {
                        "prefix": "/api",
                        "headers": [hdr("x-canary", **sm(exact="1"))],
                        "query_parameters": [{"name": "beta", "present_match": True}],
                    },
                    "canary_beta",
                ),
                named({"prefix": "/api", "headers": [hdr("x-canary", **sm(exact="1"))]}, "canary"),
                route({"path_separated_prefix": "/api", "grpc": {}}, cluster="backend"),
                named({"prefix": "/api"}, "api"),
            ],
            upstream=True,
        ),
        (
            get("/api/x?beta", ("x-canary", "1"), took="canary_beta"),
            get("/api/x", ("x-canary", "1"), took="canary"),
            upstream_took("/api/x", GRPC),
            direct_took("/apix", GRPC),
            get("/api", took="api"),
            get("/other"),
        ),
    ),
    Scenario(
        "header_matchers_over_http2",
        one_vhost(
            [
                named(
                    {
                        "prefix": "/",
                        "headers": [
                            hdr("x-a", **sm(exact="1")),
                            hdr(":method", **sm(exact="GET")),
                            hdr(":scheme", **sm(exact="http")),
                        ],
                    },
                    "h2",
                ),
                named(
                    {"prefix": "/", "query_parameters": [{"name": "x", "present_match": True}]},
                    "query",
                ),
                named({"prefix": "/"}, "fallback"),
            ]
        ),
        (
            get("/", ("x-a", "1"), took="h2", http2=True),
            get("/", ("x-a", "2"), took="fallback", http2=True),
            get("/?x", took="query", http2=True),
        ),
    ),
]


test_scenario = differential_tests(SCENARIOS)


# ---------------------------------------------------------------------------------
# Bad input: refused by both, envoyx naming the field
# ---------------------------------------------------------------------------------

ROUTES = (
    "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"
    ".route_config.virtual_hosts[0].routes[0]"
)


def _doc(routes: list[Json], hcm: Json | None = None) -> Json:
    bs = bootstrap(
        admin_port=0,
        listeners=[http_listener(port=0, virtual_hosts=[virtual_host("all", ["*"], routes)])],
        clusters=[cluster("backend", [("127.0.0.1", 1)])],
    )
    _hcm(bs).update(hcm or {})
    return bs


def _envoy_refuses(envoy_binary: Path, doc: Json, tmp_path: Path) -> str:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    done = subprocess.run(
        [str(envoy_binary), "--mode", "validate", "-c", str(path), "-l", "critical"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0, f"Envoy accepted it:\n{done.stdout}{done.stderr}"
    return done.stdout + done.stderr


def _rewrite_route(path_template: str, rewrite: str) -> Json:
    return template_route(path_template, rewrite)


BAD = {
    "header_regex": (
        [named({"prefix": "/", "headers": [hdr("x", **sm(safe_regex={"regex": "(["}))]}, "r")],
        None,
        f"{ROUTES}.match.headers[0].string_match.safe_regex.regex: invalid regex",
        "missing ]",
    ),
    "regex_ignore_case": (
        [
            named(
                {
                    "prefix": "/",
                    "headers": [hdr("x", **sm(safe_regex={"regex": "a"}, ignore_case=True))],
                },
                "r",
            )
        ],
        None,
        f"{ROUTES}.match.headers[0].string_match: ignore_case has no effect for safe_regex.",
        "ignore_case has no effect for safe_regex.",
    ),
    "query_regex": (
        [
            named(
                {
                    "prefix": "/",
                    "query_parameters": [
                        {"name": "q", "string_match": {"safe_regex": {"regex": "a("}}}
                    ],
                },
                "r",
            )
        ],
        None,
        f"{ROUTES}.match.query_parameters[0].string_match.safe_regex.regex: invalid regex",
        "missing )",
    ),
    "uri_template": (
        [named(template("/{a}/{a}"), "r")],
        None,
        f"{ROUTES}.match.path_match_policy.typed_config.path_template: /{{a}}/{{a}} is invalid",
        "path_match_policy.path_template /{a}/{a} is invalid",
    ),
    "rewrite_variable_mismatch": (
        [_rewrite_route("/{a}", "/{b}")],
        None,
        f"{ROUTES}.route.path_rewrite_policy.typed_config: mismatch between variables",
        "mismatch between variables in path_match_policy /{a} and path_rewrite_policy /{b}",
    ),
    "rewrite_without_template": (
        [
            {
                "match": {"prefix": "/"},
                "route": {
                    "cluster": "backend",
                    "path_rewrite_policy": {
                        "name": "rw",
                        "typed_config": {"@type": URI_REWRITE, "path_template_rewrite": "/x"},
                    },
                },
            }
        ],
        None,
        f"{ROUTES}.route.path_rewrite_policy: unable to use",
        "unable to use envoy.path.rewrite.uri_template.uri_template_rewriter extension",
    ),
    "rewrite_with_prefix_rewrite": (
        [
            {
                **_rewrite_route("/{a}", "/{a}"),
                "route": {**_rewrite_route("/{a}", "/{a}")["route"], "prefix_rewrite": "/p"},
            }
        ],
        None,
        f"{ROUTES}.route: Specify only one of prefix_rewrite, regex_rewrite or path_rewrite_policy",
        "Specify only one of prefix_rewrite, regex_rewrite or path_rewrite_policy",
    ),
    "path_separated_prefix_trailing_slash": (
        [named({"path_separated_prefix": "/api/"}, "r")],
        None,
        f"{ROUTES}.match.path_separated_prefix: value does not match regex pattern",
        "PathSeparatedPrefix: value does not match regex pattern",
    ),
    "both_strip_ports": (
        [named({"prefix": "/"}, "r")],
        {"strip_matching_host_port": True, "strip_any_host_port": True},
        "Only one of `strip_matching_host_port` or `strip_any_host_port` can be set.",
        "Only one of `strip_matching_host_port` or `strip_any_host_port` can be set.",
    ),
    "dynamic_metadata": (
        [
            named(
                {
                    "prefix": "/",
                    "dynamic_metadata": [
                        {"filter": "f", "path": [{"key": "k"}], "value": {"present_match": True}}
                    ],
                },
                "r",
            )
        ],
        None,
        f"{ROUTES}.match.dynamic_metadata: route matching on dynamic metadata is not supported",
        None,
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_matchers_are_refused_like_envoy(case: str, envoy_binary: Path, tmp_path: Path) -> None:
    routes, hcm, ours, envoys = BAD[case]
    doc = _doc(routes, hcm)
    with pytest.raises(envoyx.ConfigError) as info:
        envoyx.Server(doc)
    assert any(ours in e for e in info.value.errors), info.value.errors
    if envoys is not None:
        assert envoys in _envoy_refuses(envoy_binary, doc, tmp_path)
