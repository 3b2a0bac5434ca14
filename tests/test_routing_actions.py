"""Route actions beside Envoy 1.40 (issue 11): weighted clusters, ``cluster_header``,
``cluster_not_found_response_code``, path and host rewrites, redirects, direct
responses and request mirroring.

The differential table (``SCENARIOS``) runs each row through the real Envoy and
envoyx and compares the facts (see ``support/differential.py``). Beside it:

- the weighted split measured over 10,000 requests, held to a chi-square bound;
- mirroring with shadow upstreams of the test's own: the shadow sees the request
  (with ``-shadow`` appended to its host, body included), and a shadow that hangs
  or refuses changes nothing for the client, on both proxies;
- configuration errors naming the field.
"""

from __future__ import annotations

import base64
import concurrent.futures
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import envoyx
from support.bootstrap import bootstrap, cluster, http_listener, route, virtual_host
from support.differential import (
    Ctx,
    Http,
    Json,
    Scenario,
    differential_tests,
)
from support.envoy import EnvoyProcess
from support.proxy import EnvoyxProcess, ProxyProcess
from support.upstreams import HttpUpstream
from support.wait import RefusedPort, free_port

pytestmark = pytest.mark.envoy


# ---------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------


def _hcm(bs: Json) -> Json:
    return bs["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def _proxy(
    ctx: Ctx,
    routes: list[Json],
    clusters: list[Json],
    route_config: Json | None = None,
    domains: tuple[str, ...] = ("*",),
) -> Json:
    bs = bootstrap(
        admin_port=ctx.admin_port,
        listeners=[
            http_listener(port=ctx.port, virtual_hosts=[virtual_host("all", list(domains), routes)])
        ],
        clusters=clusters,
    )
    if route_config:
        _hcm(bs)["route_config"].update(route_config)
    return bs


def _abc(ctx: Ctx) -> list[Json]:
    return [cluster(n, [ctx.up(n)]) for n in ("a", "b", "c")]


def _fwd(match: Json, action: Json) -> Json:
    return {"match": match, "route": action}


def _redirect(match: Json, redirect: Json) -> Json:
    return {"match": match, "redirect": redirect}


ALL = {"prefix": "/"}
LOCAL_EMPTY = {"upstream": None, "body": "", "header:content-type": None}


def weighted(*clusters: tuple[str, int], **extra: Any) -> Json:
    return {
        "weighted_clusters": {
            "clusters": [{"name": n, "weight": w} for n, w in clusters],
            **extra,
        }
    }


# ---------------------------------------------------------------------------------
# Weighted clusters and cluster_header
# ---------------------------------------------------------------------------------


def build_weighted(ctx: Ctx) -> Json:
    return _proxy(
        ctx,
        [
            _fwd(
                {"prefix": "/w"},
                weighted(("a", 1), ("b", 2), ("c", 1), header_name="x-pick"),
            ),
            _fwd(
                {"prefix": "/zero"},
                weighted(("a", 0), ("b", 3), header_name="x-pick"),
            ),
            _fwd(
                {"prefix": "/total"},
                # total_weight is deprecated; Envoy 1.40 ignores it (the sum is used).
                weighted(("a", 1), ("c", 1), header_name="x-pick", total_weight=7),
            ),
        ],
        _abc(ctx),
    )


def pick(path: str, value: str, upstream: str | None) -> Http:
    return Http(path, headers=(("x-pick", value),), expect={"upstream": upstream})


def build_weighted_entries(ctx: Ctx) -> Json:
    return _proxy(
        ctx,
        [
            _fwd(
                {"prefix": "/hdr"},
                {
                    "weighted_clusters": {
                        "header_name": "x-pick",
                        "clusters": [
                            {"cluster_header": "x-cluster", "weight": 1},
                            {"name": "c", "weight": 1, "host_rewrite_literal": "c.internal"},
                        ],
                    }
                },
            ),
        ],
        _abc(ctx),
    )


def build_cluster_header(ctx: Ctx) -> Json:
    return _proxy(
        ctx,
        [
            _fwd(
                {"prefix": "/404"},
                {"cluster_header": "x-cluster", "cluster_not_found_response_code": "NOT_FOUND"},
            ),
            _fwd(
                {"prefix": "/500"},
                {
                    "cluster_header": "x-cluster",
                    "cluster_not_found_response_code": "INTERNAL_SERVER_ERROR",
                },
            ),
            _fwd({"prefix": "/"}, {"cluster_header": "x-cluster"}),
        ],
        _abc(ctx),
    )


def cluster_is(path: str, name: str | None, **expect: Any) -> Http:
    headers = (("x-cluster", name),) if name is not None else ()
    return Http(path, headers=headers, expect=expect)


# ---------------------------------------------------------------------------------
# Rewrites
# ---------------------------------------------------------------------------------

UP_PATH = ("up.path", "up.header:x-envoy-original-path")
UP_HOST = ("up.header:host", "up.header:x-forwarded-host")


def build_path_rewrites(ctx: Ctx) -> Json:
    return _proxy(
        ctx,
        [
            _fwd({"prefix": "/api/"}, {"cluster": "a", "prefix_rewrite": "/v2/"}),
            _fwd({"prefix": "/strip"}, {"cluster": "a", "prefix_rewrite": "/"}),
            _fwd({"path": "/exact"}, {"cluster": "a", "prefix_rewrite": "/other"}),
            _fwd(
                {"safe_regex": {"regex": "/re/[0-9]+"}},
                {"cluster": "a", "prefix_rewrite": "/number"},
            ),
            _fwd(
                {"prefix": "/service/"},
                {
                    "cluster": "a",
                    "regex_rewrite": {
                        "pattern": {"regex": "^/service/([^/]+)(/.*)$"},
                        "substitution": "\\2/instance/\\1",
                    },
                },
            ),
            _fwd(
                {"prefix": "/dash"},
                {
                    "cluster": "a",
                    "regex_rewrite": {"pattern": {"regex": "-"}, "substitution": "_"},
                },
            ),
            _fwd({"prefix": "/"}, {"cluster": "a"}),
        ],
        _abc(ctx),
    )


def rewritten(path: str, up_path: str, original: str | None, **kw: Any) -> Http:
    return Http(
        path,
        observe=UP_PATH,
        expect={"up.path": up_path, "up.header:x-envoy-original-path": original},
        **kw,
    )


def build_host_rewrites(ctx: Ctx) -> Json:
    a = ctx.up("a")
    return _proxy(
        ctx,
        [
            _fwd(
                {"prefix": "/literal-xfh"},
                {
                    "cluster": "a",
                    "host_rewrite_literal": "new.host",
                    "append_x_forwarded_host": True,
                },
            ),
            _fwd({"prefix": "/literal"}, {"cluster": "a", "host_rewrite_literal": "new.host"}),
            _fwd(
                {"prefix": "/header"},
                {"cluster": "a", "host_rewrite_header": "x-host", "append_x_forwarded_host": True},
            ),
            _fwd(
                {"prefix": "/regex/"},
                {
                    "cluster": "a",
                    "host_rewrite_path_regex": {
                        "pattern": {"regex": "^/regex/([^/]+)/.*$"},
                        "substitution": "\\1.example",
                    },
                },
            ),
            _fwd({"prefix": "/auto-static"}, {"cluster": "a", "auto_host_rewrite": True}),
            _fwd(
                {"prefix": "/auto-dns"},
                {"cluster": "dns", "auto_host_rewrite": True, "append_x_forwarded_host": True},
            ),
        ],
        [
            *_abc(ctx),
            cluster("dns", [("localhost", a[1])], type="STRICT_DNS", dns_lookup_family="V4_ONLY"),
        ],
    )


def host_is(path: str, host: str | None, xfh: str | None = None, **kw: Any) -> Http:
    return Http(
        path,
        observe=UP_HOST,
        expect={"up.header:host": host, "up.header:x-forwarded-host": xfh, "upstream": "a"},
        **kw,
    )


# ---------------------------------------------------------------------------------
# Redirects and direct responses
# ---------------------------------------------------------------------------------


def build_redirects(ctx: Ctx) -> Json:
    return _proxy(
        ctx,
        [
            _redirect({"prefix": "/https"}, {"https_redirect": True}),
            _redirect({"prefix": "/scheme"}, {"scheme_redirect": "wss", "port_redirect": 8443}),
            _redirect({"prefix": "/hostport"}, {"host_redirect": "h.example", "port_redirect": 81}),
            _redirect({"prefix": "/host"}, {"host_redirect": "other.example"}),
            _redirect({"prefix": "/port"}, {"port_redirect": 9000}),
            _redirect(
                {"prefix": "/path-q"},
                {"path_redirect": "/fixed?from=redirect", "strip_query": True},
            ),
            _redirect({"prefix": "/path-strip"}, {"path_redirect": "/fixed", "strip_query": True}),
            _redirect({"prefix": "/path"}, {"path_redirect": "/fixed"}),
            _redirect({"prefix": "/strip"}, {"strip_query": True}),
            _redirect({"prefix": "/old/"}, {"prefix_rewrite": "/new/"}),
            _redirect(
                {"prefix": "/re/"},
                {
                    "regex_rewrite": {
                        "pattern": {"regex": "^/re/(\\w+)/(\\w+)$"},
                        "substitution": "/\\2/\\1",
                    }
                },
            ),
            _redirect({"path": "/c301"}, {"path_redirect": "/x"}),
            _redirect({"path": "/c302"}, {"path_redirect": "/x", "response_code": "FOUND"}),
            _redirect({"path": "/c303"}, {"path_redirect": "/x", "response_code": "SEE_OTHER"}),
            _redirect(
                {"path": "/c307"}, {"path_redirect": "/x", "response_code": "TEMPORARY_REDIRECT"}
            ),
            _redirect(
                {"path": "/c308"}, {"path_redirect": "/x", "response_code": "PERMANENT_REDIRECT"}
            ),
            _fwd({"prefix": "/"}, {"cluster": "a"}),
        ],
        _abc(ctx),
    )


def redirected(
    path: str, location: str, status: int = 301, host: str = "example.com", **kw: Any
) -> Http:
    headers = (("host", host), *kw.pop("headers", ()))
    return Http(
        path,
        headers=headers,
        observe=("header:location",),
        expect={"status": status, "header:location": location, **LOCAL_EMPTY},
        **kw,
    )


def build_direct_bodies(ctx: Ctx) -> Json:
    body_file = Path(ctx.access_log).parent / f"body-{ctx.port}.txt"
    body_file.write_text("from a file\n")
    big = "x" * 5000
    return _proxy(
        ctx,
        [
            route({"path": "/string"}, direct=(200, "inline string")),
            {
                "match": {"path": "/bytes"},
                "direct_response": {
                    "status": 200,
                    "body": {"inline_bytes": base64.b64encode(b"inline \x01 bytes").decode()},
                },
            },
            {
                "match": {"path": "/file"},
                "direct_response": {"status": 503, "body": {"filename": str(body_file)}},
            },
            route({"path": "/big"}, direct=(200, big)),
            route({"path": "/found"}, direct=(302, "moved")),
            route({"path": "/created"}, direct=(201, None)),
            route({"path": "/plain"}, direct=(404, None)),
        ],
        [],
        route_config={"max_direct_response_body_size_bytes": 6000},
    )


# ---------------------------------------------------------------------------------
# Mirroring (stats only here: the shadow's request is checked in the tests below)
# ---------------------------------------------------------------------------------


def build_mirror_stats(ctx: Ctx) -> Json:
    def mirror(cluster_name: str, numerator: int | None = None) -> Json:
        m: Json = {"cluster": cluster_name}
        if numerator is not None:
            m["runtime_fraction"] = {"default_value": {"numerator": numerator}}
        return m

    return _proxy(
        ctx,
        [
            _fwd(
                {"prefix": "/none"}, {"cluster": "a", "request_mirror_policies": [mirror("b", 0)]}
            ),
            _fwd(
                {"prefix": "/both"},
                {"cluster": "a", "request_mirror_policies": [mirror("b"), mirror("c", 100)]},
            ),
            _fwd(
                {"prefix": "/header"},
                {"cluster": "a", "request_mirror_policies": [{"cluster_header": "x-mirror"}]},
            ),
            _fwd({"prefix": "/"}, {"cluster": "a"}),
        ],
        _abc(ctx),
        # The route configuration's policy applies to routes without their own.
        route_config={"request_mirror_policies": [mirror("c")]},
    )


def build_h2_upstream_rewrites(ctx: Ctx) -> Json:
    return _proxy(
        ctx,
        [
            _fwd(
                {"prefix": "/api/"},
                {
                    "cluster": "h2",
                    "prefix_rewrite": "/",
                    "host_rewrite_literal": "h2.internal",
                    "append_x_forwarded_host": True,
                },
            ),
            _fwd({"prefix": "/w"}, weighted(("h2", 1), ("a", 1), header_name="x-pick")),
        ],
        [cluster("h2", [ctx.up("h2")], http2=True), cluster("a", [ctx.up("a")])],
    )


def build_unvalidated(ctx: Ctx) -> Json:
    return _proxy(
        ctx,
        [
            _fwd({"prefix": "/w"}, weighted(("a", 1), ("missing", 1), header_name="x-pick")),
            _fwd({"prefix": "/"}, {"cluster": "gone"}),
        ],
        _abc(ctx),
        route_config={"validate_clusters": False},
    )


def build_logical_dns(ctx: Ctx) -> Json:
    a = ctx.up("a")
    return _proxy(
        ctx,
        [_fwd(ALL, {"cluster": "logical", "auto_host_rewrite": True})],
        [
            cluster(
                "logical", [("localhost", a[1])], type="LOGICAL_DNS", dns_lookup_family="V4_ONLY"
            )
        ],
    )


def build_weighted_host_layers(ctx: Ctx) -> Json:
    return _proxy(
        ctx,
        [
            _fwd(
                ALL,
                {
                    "weighted_clusters": {
                        "header_name": "x-pick",
                        "clusters": [
                            {"name": "a", "weight": 1, "host_rewrite_literal": "entry.host"},
                            {"name": "b", "weight": 1},
                        ],
                    },
                    "host_rewrite_header": "x-host",
                    "append_x_forwarded_host": True,
                },
            )
        ],
        _abc(ctx),
    )


A = {"upstream": "a", "status": 200}

SCENARIOS: list[Scenario] = [
    # -- weighted clusters ------------------------------------------------------------
    Scenario(
        "weighted_pick_by_header",
        build_weighted,
        (
            pick("/w", "0", "a"),
            pick("/w", "1", "b"),
            pick("/w", "2", "b"),
            pick("/w", "3", "c"),
            pick("/w", "4", "a"),
            pick("/w", "9", "b"),
            pick("/w", "18446744073709551615", "c"),  # u64::MAX % 4 == 3
        ),
        stats={
            "cluster.a.upstream_rq_total": 2,
            "cluster.b.upstream_rq_total": 3,
            "cluster.c.upstream_rq_total": 2,
            "cluster.b.upstream_rq_2xx": 3,
            "http.ingress_http.rq_total": 7,
        },
    ),
    Scenario(
        "weighted_zero_weight_never_picked",
        build_weighted,
        tuple(pick("/zero", str(v), "b") for v in range(4)),
        stats={"cluster.a.upstream_rq_total": 0, "cluster.b.upstream_rq_total": 4},
    ),
    Scenario(
        "weighted_total_weight_ignored",
        build_weighted,
        (pick("/total", "0", "a"), pick("/total", "1", "c"), pick("/total", "6", "a")),
        stats={"cluster.a.upstream_rq_total": 2, "cluster.c.upstream_rq_total": 1},
    ),
    Scenario(
        "weighted_header_value_not_a_number",
        build_weighted,
        # Not one integer: the random value picks; /zero gives b whatever it is.
        (
            pick("/zero", "abc", "b"),
            pick("/zero", "-1", "b"),
            Http("/zero", headers=(("x-pick", "1"), ("x-pick", "2")), expect={"upstream": "b"}),
        ),
    ),
    Scenario(
        "weighted_entry_cluster_header_and_host_rewrite",
        build_weighted_entries,
        (
            Http("/hdr", headers=(("x-pick", "0"), ("x-cluster", "b")), expect={"upstream": "b"}),
            # The picked entry's header is missing: no cluster (503, NC).
            Http(
                "/hdr",
                headers=(("x-pick", "0"),),
                expect={"status": 503, "upstream": None, "body": ""},
            ),
            Http(
                "/hdr",
                headers=(("x-pick", "1"),),
                observe=("up.header:host",),
                expect={"upstream": "c", "up.header:host": "c.internal"},
            ),
        ),
        stats={"http.ingress_http.no_cluster": 1, "cluster.c.upstream_rq_total": 1},
    ),
    # -- cluster_header -------------------------------------------------------------
    Scenario(
        "cluster_header_picks",
        build_cluster_header,
        (
            cluster_is("/", "b", upstream="b"),
            cluster_is("/x", "c", upstream="c"),
            cluster_is("/", "a", upstream="a"),
        ),
        stats={"cluster.b.upstream_rq_total": 1, "cluster.c.upstream_rq_total": 1},
    ),
    Scenario(
        "cluster_header_missing_or_unknown",
        build_cluster_header,
        (
            cluster_is("/", None, status=503, **LOCAL_EMPTY),
            cluster_is("/", "nope", status=503, **LOCAL_EMPTY),
            cluster_is("/", "", status=503, **LOCAL_EMPTY),
        ),
        stats={
            "http.ingress_http.no_cluster": 3,
            "http.ingress_http.downstream_rq_5xx": 3,
            "http.ingress_http.rq_total": 3,
        },
    ),
    Scenario(
        "cluster_not_found_response_codes",
        build_cluster_header,
        (
            cluster_is("/404", "nope", status=404, **LOCAL_EMPTY),
            cluster_is("/404", "b", upstream="b"),
            cluster_is("/500", None, status=500, **LOCAL_EMPTY),
        ),
        stats={
            "http.ingress_http.no_cluster": 2,
            "http.ingress_http.downstream_rq_4xx": 1,
            "http.ingress_http.downstream_rq_5xx": 1,
        },
    ),
    # -- path rewrites ----------------------------------------------------------------
    Scenario(
        "prefix_rewrite_variants",
        build_path_rewrites,
        (
            rewritten("/api/users?x=1", "/v2/users?x=1", "/api/users?x=1"),
            rewritten("/strip/me", "//me", "/strip/me"),
            rewritten("/stripped", "/ped", "/stripped"),
            rewritten("/exact?q", "/other?q", "/exact?q"),
            rewritten("/re/42?y", "/number?y", "/re/42?y"),
            rewritten("/plain", "/plain", None),
        ),
    ),
    Scenario(
        "regex_rewrite",
        build_path_rewrites,
        (
            rewritten(
                "/service/foo/v1/api?k=v", "/v1/api/instance/foo?k=v", "/service/foo/v1/api?k=v"
            ),
            rewritten("/dash-a-b-c", "/dash_a_b_c", "/dash-a-b-c"),
            # The query is kept out of the rewrite.
            rewritten("/dash-x?a-b", "/dash_x?a-b", "/dash-x?a-b"),
            rewritten("/service/nomatch", "/service/nomatch", "/service/nomatch"),
        ),
    ),
    Scenario(
        "rewrite_over_http2",
        build_path_rewrites,
        (
            rewritten("/api/x", "/v2/x", "/api/x", http2=True),
            rewritten("/service/s/t", "/t/instance/s", "/service/s/t", http2=True),
        ),
    ),
    Scenario(
        "original_path_from_the_client_is_replaced",
        build_path_rewrites,
        (
            rewritten(
                "/api/z", "/v2/z", "/api/z", headers=(("x-envoy-original-path", "/spoofed"),)
            ),
            # Without a rewrite the client's header is passed on: Envoy does not
            # count it among the internal headers it strips from external requests.
            rewritten(
                "/plain", "/plain", "/spoofed", headers=(("x-envoy-original-path", "/spoofed"),)
            ),
        ),
    ),
    # -- host rewrites ----------------------------------------------------------------
    Scenario(
        "host_rewrite_literal",
        build_host_rewrites,
        (
            host_is("/literal", "new.host", headers=(("host", "orig.example"),)),
            host_is(
                "/literal-xfh", "new.host", "orig.example", headers=(("host", "orig.example"),)
            ),
            host_is(
                "/literal-xfh",
                "new.host",
                "first,orig.example",
                headers=(("host", "orig.example"), ("x-forwarded-host", "first")),
            ),
            # Idempotent: the host is already the last value.
            host_is(
                "/literal-xfh",
                "new.host",
                "first,orig.example",
                headers=(("host", "orig.example"), ("x-forwarded-host", "first,orig.example")),
            ),
            host_is("/literal", "new.host", http2=True),
        ),
    ),
    Scenario(
        "host_rewrite_header",
        build_host_rewrites,
        (
            host_is(
                "/header",
                "from.header",
                "orig.example",
                headers=(("host", "orig.example"), ("x-host", "from.header")),
            ),
            host_is("/header", "orig.example", headers=(("host", "orig.example"),)),
            host_is("/header", "orig.example", headers=(("host", "orig.example"), ("x-host", ""))),
        ),
    ),
    Scenario(
        "host_rewrite_path_regex",
        build_host_rewrites,
        (
            host_is("/regex/tenant1/x?q=1", "tenant1.example", headers=(("host", "orig.example"),)),
            host_is("/regex/short", "/regex/short", headers=(("host", "orig.example"),)),
        ),
    ),
    Scenario(
        "auto_host_rewrite",
        build_host_rewrites,
        (
            # A STATIC host has no hostname: the Host stays.
            host_is("/auto-static", "orig.example", headers=(("host", "orig.example"),)),
            # A STRICT_DNS host's hostname is its DNS name.
            host_is("/auto-dns", "localhost", "orig.example", headers=(("host", "orig.example"),)),
        ),
    ),
    # -- redirects --------------------------------------------------------------------
    Scenario(
        "redirect_https",
        build_redirects,
        (
            redirected("/https/a?b=c", "https://example.com/https/a?b=c"),
            redirected("/https", "https://example.com/https", host="example.com:80"),
            redirected("/https", "https://example.com:8080/https", host="example.com:8080"),
            redirected("/https", "https://[::1]/https", host="[::1]:80"),
            # The client's x-forwarded-proto (kept: no use_remote_address) decides
            # which default port is dropped.
            redirected("/https", "https://example.com:443/https", host="example.com:443"),
            redirected(
                "/https",
                "https://example.com:443/https",
                host="example.com:443",
                headers=(("x-forwarded-proto", "https"),),
            ),
            redirected("/https", "https://example.com/https", host="example.com:80", http2=True),
        ),
        stats={
            "http.ingress_http.rq_direct_response": 7,
            "http.ingress_http.rq_total": 7,
            "http.ingress_http.downstream_rq_3xx": 7,
        },
    ),
    Scenario(
        "redirect_scheme_host_port",
        build_redirects,
        (
            redirected("/scheme/x", "wss://example.com:8443/scheme/x", host="example.com:80"),
            redirected("/host?q=1", "http://other.example/host?q=1"),
            redirected("/host", "http://other.example/host", host="example.com:1234"),
            redirected("/port/p", "http://example.com:9000/port/p", host="example.com:1234"),
            redirected("/port/p", "http://example.com:9000/port/p"),
            redirected("/hostport", "http://h.example:81/hostport", host="x:5"),
        ),
    ),
    Scenario(
        "redirect_path_and_query",
        build_redirects,
        (
            redirected("/path", "http://example.com/fixed"),
            redirected("/path?a=1", "http://example.com/fixed?a=1"),
            redirected("/path-strip?a=1", "http://example.com/fixed"),
            redirected("/path-q?a=1", "http://example.com/fixed?from=redirect"),
            redirected("/strip/me?a=1&b=2", "http://example.com/strip/me"),
        ),
    ),
    Scenario(
        "redirect_prefix_and_regex_rewrite",
        build_redirects,
        (
            redirected("/old/thing?x=y", "http://example.com/new/thing?x=y"),
            redirected("/re/one/two", "http://example.com/two/one"),
            redirected("/re/one/two?k", "http://example.com/two/one?k"),
        ),
    ),
    Scenario(
        "redirect_response_codes",
        build_redirects,
        (
            redirected("/c301", "http://example.com/x", 301),
            redirected("/c302", "http://example.com/x", 302),
            redirected("/c303", "http://example.com/x", 303),
            redirected("/c307", "http://example.com/x", 307),
            redirected("/c308", "http://example.com/x", 308, method="POST", body=b"data"),
            Http("/elsewhere", expect=A),
        ),
        stats={"http.ingress_http.rq_direct_response": 5, "cluster.a.upstream_rq_total": 1},
    ),
    # -- direct responses -------------------------------------------------------------
    Scenario(
        "direct_response_bodies",
        build_direct_bodies,
        (
            Http(
                "/string",
                expect={
                    "status": 200,
                    "body": "inline string",
                    "header:content-type": "text/plain",
                },
            ),
            Http("/bytes", expect={"status": 200, "body": "inline \x01 bytes"}),
            Http("/file", expect={"status": 503, "body": "from a file\n"}),
            Http("/big", observe=("body.sha256",), expect={"status": 200}),
            Http("/plain", expect={"status": 404, "body": ""}),
        ),
        stats={"http.ingress_http.rq_direct_response": 5},
    ),
    Scenario(
        "direct_response_location",
        build_direct_bodies,
        (
            Http(
                "/found?q=1",
                headers=(("host", "d.example"),),
                observe=("header:location",),
                expect={
                    "status": 302,
                    "body": "moved",
                    "header:location": "http://d.example/found?q=1",
                },
            ),
            Http(
                "/created",
                headers=(("host", "d.example:99"),),
                observe=("header:location",),
                expect={"status": 201, "header:location": "http://d.example:99/created"},
            ),
            Http("/plain", observe=("has:location",), expect={"has:location": False}),
        ),
    ),
    # -- combinations and protocols ---------------------------------------------------
    Scenario(
        "rewrites_to_an_http2_upstream",
        build_h2_upstream_rewrites,
        (
            Http(
                "/api/x?y=1",
                headers=(("host", "front.example"),),
                observe=(
                    "up.path",
                    "up.header:host",
                    "up.header:x-forwarded-host",
                    "up.protocol",
                    "up.header:x-envoy-original-path",
                ),
                expect={
                    "upstream": "h2",
                    "up.path": "/x?y=1",
                    "up.header:host": "h2.internal",
                    "up.header:x-forwarded-host": "front.example",
                },
            ),
            Http(
                "/api/z",
                http2=True,
                observe=("up.path", "up.header:host"),
                expect={"upstream": "h2", "up.path": "/z", "up.header:host": "h2.internal"},
            ),
        ),
    ),
    Scenario(
        "weighted_across_protocols",
        build_h2_upstream_rewrites,
        (
            pick("/w", "0", "h2"),
            pick("/w", "1", "a"),
            Http("/w", headers=(("x-pick", "2"),), http2=True, expect={"upstream": "h2"}),
            Http("/w", headers=(("x-pick", "3"),), http2=True, expect={"upstream": "a"}),
        ),
        stats={"cluster.h2.upstream_rq_total": 2, "cluster.a.upstream_rq_total": 2},
    ),
    Scenario(
        "unknown_clusters_without_validation",
        build_unvalidated,
        (
            pick("/w", "0", "a"),
            pick("/w", "1", None),
            Http("/other", expect={"status": 503, "body": "", "upstream": None}),
        ),
        stats={"http.ingress_http.no_cluster": 2, "cluster.a.upstream_rq_total": 1},
    ),
    Scenario(
        "auto_host_rewrite_logical_dns",
        build_logical_dns,
        (
            Http(
                "/",
                headers=(("host", "orig.example"),),
                observe=UP_HOST,
                expect={"up.header:host": "localhost", "up.header:x-forwarded-host": None},
            ),
        ),
    ),
    Scenario(
        "cluster_header_over_http2",
        build_cluster_header,
        (
            Http("/", headers=(("x-cluster", "c"),), http2=True, expect={"upstream": "c"}),
            Http("/", http2=True, expect={"status": 503, "upstream": None, "body": ""}),
            Http("/404", http2=True, expect={"status": 404, "upstream": None, "body": ""}),
        ),
    ),
    Scenario(
        "redirect_methods_and_http2",
        build_redirects,
        (
            redirected("/old/a", "http://example.com/new/a", method="HEAD"),
            redirected("/old/b", "http://example.com/new/b", method="POST", body=b"payload"),
            redirected("/re/x/y?z", "http://example.com/y/x?z", http2=True),
            redirected("/path-strip?q", "http://example.com/fixed", http2=True),
        ),
    ),
    Scenario(
        "direct_responses_over_http2",
        build_direct_bodies,
        (
            Http("/string", http2=True, expect={"status": 200, "body": "inline string"}),
            Http("/plain", http2=True, expect={"status": 404, "body": ""}),
            Http(
                "/found",
                http2=True,
                headers=(("host", "d.example"),),
                observe=("header:location",),
                expect={"status": 302, "header:location": "http://d.example/found"},
            ),
        ),
    ),
    Scenario(
        "redirect_regex_rewrite_no_match",
        build_redirects,
        (
            redirected("/re/ab/cd", "http://example.com/cd/ab"),
            # No match: the path stays.
            redirected("/re/a-b/c", "http://example.com/re/a-b/c"),
        ),
    ),
    Scenario(
        "weighted_entry_host_under_route_host_rewrite",
        build_weighted_host_layers,
        (
            Http(
                "/",
                headers=(("x-pick", "0"), ("host", "orig")),
                observe=UP_HOST,
                expect={"upstream": "a", "up.header:host": "entry.host"},
            ),
            Http(
                "/",
                headers=(("x-pick", "0"), ("host", "orig"), ("x-host", "hdr.host")),
                observe=UP_HOST,
                expect={"upstream": "a", "up.header:host": "hdr.host"},
            ),
            Http(
                "/",
                headers=(("x-pick", "1"), ("host", "orig"), ("x-host", "hdr.host")),
                observe=UP_HOST,
                expect={
                    "upstream": "b",
                    "up.header:host": "hdr.host",
                    "up.header:x-forwarded-host": "orig",
                },
            ),
        ),
    ),
    Scenario(
        "cluster_header_first_value",
        build_cluster_header,
        (
            Http("/", headers=(("x-cluster", "b"), ("x-cluster", "c")), expect={"upstream": "b"}),
            Http(
                "/",
                headers=(("x-cluster", "nope"), ("x-cluster", "c")),
                expect={"status": 503, "upstream": None},
            ),
        ),
    ),
    Scenario(
        "direct_response_to_head",
        build_direct_bodies,
        (
            Http("/string", method="HEAD", expect={"status": 200, "body": ""}),
            Http("/plain", method="HEAD", expect={"status": 404, "body": ""}),
            Http(
                "/found",
                method="HEAD",
                headers=(("host", "d.example"),),
                observe=("header:location",),
                expect={"status": 302, "header:location": "http://d.example/found"},
            ),
        ),
    ),
    # -- mirroring: what the shadow clusters count ------------------------------------
    Scenario(
        "mirror_policies_stats",
        build_mirror_stats,
        (
            Http("/none", expect=A),
            Http("/both", expect=A),
            Http("/both", method="POST", body=b"mirrored body", expect=A),
            Http("/header", headers=(("x-mirror", "b"),), expect=A),
            Http("/header", expect=A),
            Http("/header", headers=(("x-mirror", "unknown"),), expect=A),
            Http("/inherited", expect=A),
        ),
        stats={
            "cluster.a.upstream_rq_total": 7,
            "cluster.b.upstream_rq_total": 3,
            "cluster.b.upstream_rq_2xx": 3,
            "cluster.c.upstream_rq_total": 3,
            "http.ingress_http.rq_total": 7,
        },
    ),
    Scenario(
        "mirror_policies_over_http2",
        build_mirror_stats,
        (
            Http("/both", http2=True, expect=A),
            Http("/both", http2=True, method="PUT", body=20_000, expect=A),
            Http("/header", http2=True, headers=(("x-mirror", "c"),), expect=A),
        ),
        stats={
            "cluster.a.upstream_rq_total": 3,
            "cluster.b.upstream_rq_total": 2,
            "cluster.c.upstream_rq_total": 3,
        },
    ),
]


test_scenario = differential_tests(SCENARIOS)


def test_table_names_are_unique() -> None:
    names = [s.name for s in SCENARIOS]
    assert len(set(names)) == len(names)


# ---------------------------------------------------------------------------------
# The weighted split, measured
# ---------------------------------------------------------------------------------

SPLIT = {"one": 1, "two": 2, "seven": 7}
SPLIT_REQUESTS = 10_000
# Chi-square with 2 degrees of freedom: P(X > 13.82) = 0.001.
CHI2_BOUND = 13.82


def test_weighted_split_over_ten_thousand_requests(tmp_path: Path) -> None:
    """Weights 1:2:7 over 10,000 requests: the counts per cluster pass a chi-square
    test at the 0.1% level. The clusters have no endpoints, so each request ends in
    a local 503 and is counted by the cluster it picked (no upstream traffic)."""
    port, admin = free_port(), free_port()
    bs = bootstrap(
        admin_port=admin,
        listeners=[
            http_listener(
                port=port,
                virtual_hosts=[virtual_host("all", ["*"], [_fwd(ALL, weighted(*SPLIT.items()))])],
            )
        ],
        clusters=[cluster(n, []) for n in SPLIT],
    )
    with EnvoyxProcess(bs, tmp_path / "envoyx", concurrency=1) as proxy:
        url = f"http://127.0.0.1:{port}/"

        def send(n: int) -> int:
            with httpx.Client(timeout=30) as client:
                return sum(client.get(url).status_code == 503 for _ in range(n))

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answered = sum(pool.map(send, [SPLIT_REQUESTS // 4] * 4))
        assert answered == SPLIT_REQUESTS
        stats = proxy.stats()
    counts = {n: stats.get(f"cluster.{n}.upstream_cx_none_healthy", 0) for n in SPLIT}
    assert sum(counts.values()) == SPLIT_REQUESTS, counts
    total = sum(SPLIT.values())
    chi2 = sum(
        (counts[n] - SPLIT_REQUESTS * w / total) ** 2 / (SPLIT_REQUESTS * w / total)
        for n, w in SPLIT.items()
    )
    assert chi2 < CHI2_BOUND, (counts, chi2)


# ---------------------------------------------------------------------------------
# Mirroring with shadow upstreams of the test's own, on both proxies
# ---------------------------------------------------------------------------------


class HangingUpstream:
    """Accepts connections and reads, never answers (a shadow that hangs)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = self.sock.getsockname()
        self.accepted = 0
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self._conns.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for c in self._conns:
            c.close()
        self.sock.close()


def _mirror_bootstrap(
    port: int, admin: int, main: tuple[str, int], shadow: tuple[str, int], **policy: Any
) -> Json:
    return bootstrap(
        admin_port=admin,
        listeners=[
            http_listener(
                port=port,
                virtual_hosts=[
                    virtual_host(
                        "all",
                        ["*"],
                        [
                            _fwd(
                                ALL,
                                {
                                    "cluster": "main",
                                    # No route timeout: a proxy waiting for a hung
                                    # shadow would never answer.
                                    "timeout": "0s",
                                    "request_mirror_policies": [{"cluster": "shadow", **policy}],
                                },
                            )
                        ],
                    )
                ],
            )
        ],
        clusters=[cluster("main", [main]), cluster("shadow", [shadow])],
    )


@pytest.fixture
def both_proxies(
    envoy_binary: Path, tmp_path: Path
) -> Iterator[Callable[[Callable[[int, int], Json]], list[tuple[str, ProxyProcess, int]]]]:
    """Starts Envoy and envoyx with the bootstraps ``build(port, admin_port)``."""
    started: list[ProxyProcess] = []

    def start(build: Callable[[int, int], Json]) -> list[tuple[str, ProxyProcess, int]]:
        out = []
        for kind in ("envoy", "envoyx"):
            port, admin = free_port(), free_port()
            bs = build(port, admin)
            proxy: ProxyProcess
            if kind == "envoy":
                proxy = EnvoyProcess(envoy_binary, bs, tmp_path / kind, concurrency=1)
            else:
                proxy = EnvoyxProcess(bs, tmp_path / kind, concurrency=1)
            started.append(proxy)
            proxy.start()
            out.append((kind, proxy, port))
        return out

    yield start
    for p in started:
        if p.running:
            p.stop()


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    from support.wait import until

    until(predicate, timeout=timeout, what=what)


# Envoy's async client appends the server's own (interface) address to the shadow's
# x-forwarded-for; envoyx does not (see docs/config-support.md).
NOT_COMPARED_SHADOW_HEADERS = {"x-forwarded-for"}


def test_mirror_shadow_sees_the_request(both_proxies: Any) -> None:
    """The shadow upstream receives the request with ``-shadow`` appended to the
    host (before the port), the same path, method, body and headers as Envoy's."""
    main, shadow = HttpUpstream("main").start(), HttpUpstream("shadow").start()
    try:
        seen: dict[str, dict[str, Any]] = {}
        for kind, _proxy_process, port in both_proxies(
            lambda p, a: _mirror_bootstrap(p, a, main.address, shadow.address)
        ):
            shadow.requests.clear()
            body = b"mirror me " * 1000
            with httpx.Client(timeout=10) as client:
                resp = client.post(
                    f"http://127.0.0.1:{port}/mirror/path?q=1",
                    content=body,
                    headers={"host": "svc.example:8080", "x-custom": "v"},
                )
            assert resp.status_code == 200
            assert resp.headers["x-upstream"] == "main"
            _wait_for(lambda: len(shadow.requests) == 1, f"{kind}: the shadow request")
            req = shadow.requests[0]
            seen[kind] = {
                "method": req.method,
                "path": req.path,
                "host": req.header("host"),
                "x-custom": req.header("x-custom"),
                "body": (req.body_length, req.body_sha256),
                "x-forwarded-proto": req.header("x-forwarded-proto"),
                "x-envoy-expected-rq-timeout-ms": req.header("x-envoy-expected-rq-timeout-ms"),
                "x-envoy-internal": req.header("x-envoy-internal"),
                "header names": sorted({k for k, _ in req.headers} - NOT_COMPARED_SHADOW_HEADERS),
                # The same request id as the client's request.
                "same request id": req.header("x-request-id")
                == main.requests[-1].header("x-request-id"),
            }
        assert seen["envoy"]["host"] == "svc.example-shadow:8080"
        assert seen["envoy"]["body"][0] == 10_000
        assert seen["envoyx"] == seen["envoy"]
    finally:
        main.stop()
        shadow.stop()


def test_mirror_host_suffix_can_be_disabled(both_proxies: Any) -> None:
    main, shadow = HttpUpstream("main").start(), HttpUpstream("shadow").start()
    try:
        hosts = {}
        for kind, _proxy_process, port in both_proxies(
            lambda p, a: _mirror_bootstrap(
                p, a, main.address, shadow.address, disable_shadow_host_suffix_append=True
            )
        ):
            shadow.requests.clear()
            with httpx.Client(timeout=10) as client:
                resp = client.get(f"http://127.0.0.1:{port}/", headers={"host": "svc"})
            assert resp.status_code == 200
            _wait_for(lambda: len(shadow.requests) == 1, f"{kind}: the shadow request")
            hosts[kind] = shadow.requests[0].header("host")
        assert hosts == {"envoy": "svc", "envoyx": "svc"}
    finally:
        main.stop()
        shadow.stop()


@pytest.mark.parametrize("failure", ["hangs", "refuses"])
def test_failing_shadow_changes_nothing(both_proxies: Any, failure: str) -> None:
    """A shadow that never answers (with no route timeout to end it) or refuses
    connections: the client's answers come from the main upstream, unchanged,
    on both proxies. Were the client kept waiting for the shadow, its requests
    would hit the client's timeout."""
    main = HttpUpstream("main").start()
    hanging = HangingUpstream() if failure == "hangs" else None
    refused = RefusedPort() if failure == "refuses" else None
    shadow_address = hanging.address if hanging else (refused.host, refused.port)  # type: ignore[union-attr]
    try:
        answers: dict[str, list[Any]] = {}
        for kind, proxy, port in both_proxies(
            lambda p, a: _mirror_bootstrap(p, a, main.address, shadow_address)
        ):
            with httpx.Client(timeout=10) as client:
                got = []
                for i in range(5):
                    try:
                        resp = client.post(f"http://127.0.0.1:{port}/r{i}", content=b"body %d" % i)
                    except httpx.TimeoutException:
                        pytest.fail(f"{kind}: request {i} waited for the shadow that {failure}")
                    echo = resp.json()
                    got.append(
                        (
                            resp.status_code,
                            resp.headers["x-upstream"],
                            echo["path"],
                            echo["body_length"],
                        )
                    )
            answers[kind] = got
            stats = proxy.stats()
            assert stats.get("cluster.main.upstream_rq_2xx") == 5, kind
            if hanging:
                _wait_for(lambda: hanging.accepted >= 1, f"{kind}: the shadow connected")
        expected = [(200, "main", f"/r{i}", 6) for i in range(5)]
        assert answers == {"envoy": expected, "envoyx": expected}
    finally:
        main.stop()
        if hanging:
            hanging.close()
        if refused:
            refused.close()


# ---------------------------------------------------------------------------------
# Configuration errors name the field
# ---------------------------------------------------------------------------------

ROUTE = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config"


def _config(route_entry: Json, **route_config: Any) -> Json:
    bs = bootstrap(
        admin_port=free_port(),
        listeners=[
            http_listener(port=free_port(), virtual_hosts=[virtual_host("v", ["*"], [route_entry])])
        ],
        clusters=[cluster("a", [("127.0.0.1", 1)]), cluster("b", [("127.0.0.1", 1)])],
    )
    _hcm(bs)["route_config"].update(route_config)
    return bs


@pytest.mark.parametrize(
    ("route_entry", "route_config", "field", "message"),
    [
        (
            _fwd(ALL, weighted(("a", 1), ("zz", 1))),
            {},
            "routes[0].route.weighted_clusters.clusters[1].name",
            "route: unknown weighted cluster 'zz'",
        ),
        (
            _fwd(ALL, weighted(("a", 0), ("b", 0))),
            {},
            "routes[0].route.weighted_clusters.clusters",
            "Sum of weights in the weighted_cluster must be greater than 0.",
        ),
        (
            _fwd(ALL, {"cluster": "a", "request_mirror_policies": [{"cluster": "zz"}]}),
            {},
            "routes[0].route.request_mirror_policies[0].cluster",
            "route: unknown shadow cluster 'zz'",
        ),
        (
            _fwd(ALL, {"cluster": "a", "request_mirror_policies": [{}]}),
            {},
            "routes[0].route.request_mirror_policies[0]",
            "Exactly one of cluster or cluster_header in request mirror policy",
        ),
        (
            _fwd(
                ALL,
                {
                    "cluster": "a",
                    "prefix_rewrite": "/x",
                    "regex_rewrite": {"pattern": {"regex": "a"}, "substitution": "b"},
                },
            ),
            {},
            "routes[0].route.regex_rewrite",
            "Specify only one of prefix_rewrite, regex_rewrite or path_rewrite_policy",
        ),
        (
            _fwd(
                ALL,
                {
                    "cluster": "a",
                    "regex_rewrite": {"pattern": {"regex": "(a"}, "substitution": "b"},
                },
            ),
            {},
            "routes[0].route.regex_rewrite.pattern.regex",
            "invalid regex '(a'",
        ),
        (
            route(ALL, direct=(200, "x" * 5000)),
            {},
            "routes[0].direct_response.body.inline_string",
            "response body size is 5000 bytes; maximum is 4096 "
            "(max_direct_response_body_size_bytes)",
        ),
        (
            route(ALL, direct=(200, "x" * 5000)),
            {"max_direct_response_body_size_bytes": 4999},
            "routes[0].direct_response.body.inline_string",
            "response body size is 5000 bytes; maximum is 4999",
        ),
        (
            {
                "match": ALL,
                "direct_response": {"status": 200, "body": {"filename": "/nonexistent/body"}},
            },
            {},
            "routes[0].direct_response.body.filename",
            "file /nonexistent/body does not exist",
        ),
        (
            _fwd(
                ALL,
                {
                    "cluster": "a",
                    "request_mirror_policies": [{"cluster": "b", "trace_sampled": False}],
                },
            ),
            {},
            "routes[0].route.request_mirror_policies[0].trace_sampled",
            "not supported by envoyx",
        ),
        (
            _fwd(
                ALL,
                {
                    "weighted_clusters": {
                        "clusters": [{"name": "a", "weight": 1}],
                        "runtime_key_prefix": "rt",
                    }
                },
            ),
            {},
            "routes[0].route.weighted_clusters.runtime_key_prefix",
            "not supported by envoyx",
        ),
    ],
    ids=[
        "unknown_weighted_cluster",
        "zero_total_weight",
        "unknown_shadow_cluster",
        "mirror_without_cluster",
        "two_path_rewrites",
        "bad_rewrite_regex",
        "direct_body_over_default_limit",
        "direct_body_over_configured_limit",
        "direct_body_file_missing",
        "trace_sampled_false",
        "runtime_key_prefix",
    ],
)
def test_config_errors_name_the_field(
    route_entry: Json, route_config: Json, field: str, message: str
) -> None:
    with pytest.raises(envoyx.ConfigError) as err:
        envoyx.Server(_config(route_entry, **route_config))
    prefix = f"{ROUTE}.virtual_hosts[0].{field}: "
    matching = [e for e in err.value.errors if e.startswith(prefix)]
    assert matching, err.value.errors
    assert message in matching[0], matching
