"""``envoy.filters.http.fault`` (Envoy's ``HTTPFault``), implemented in Rust: delays and
aborts, percentages (fixed, header-controlled, runtime keys), header / cluster / node
matching, ``max_active_faults``, per-route overrides, stats and the ``DI`` / ``FI``
response flags, side by side with Envoy 1.40 (the same bootstrap and requests to both,
see ``support/differential.py``), and the configuration errors with their field paths.

Percentages are 0 % or 100 % (or set per request by header) so that both proxies make
the same decisions; ``test_abort_percentage_is_statistical`` checks a 50 % abort
against a binomial bound on envoyx alone.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

import envoyx
from support.bootstrap import bootstrap, cluster, http_listener, route, virtual_host
from support.differential import Ctx, Environment, Grpc, Http, Json, Scenario, differential_tests
from support.upstreams import UNARY_METHOD

pytestmark = pytest.mark.envoy

FAULT = "envoy.filters.http.fault"
FAULT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
FILTER_CONFIG_TYPE = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
STATS = "http.ingress_http.fault."


def fault(**config: Any) -> Json:
    return {"name": FAULT, "typed_config": {"@type": FAULT_TYPE, **config}}


def pct(numerator: int, denominator: str = "HUNDRED") -> Json:
    return {"numerator": numerator, "denominator": denominator}


def abort(status: int, numerator: int = 100, **kw: Any) -> Json:
    return {"http_status": status, "percentage": pct(numerator), **kw}


def delay_ms(ms: int, numerator: int = 100) -> Json:
    return {"fixed_delay": f"{ms / 1000:.3f}s", "percentage": pct(numerator)}


def with_filters(listener: Json, filters: list[Json]) -> Json:
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [*filters, *hcm["http_filters"]]
    return listener


def per_filter(r: Json, config: Json) -> Json:
    r["typed_per_filter_config"] = {FAULT: config}
    return r


def override(**config: Any) -> Json:
    return {"@type": FAULT_TYPE, **config}


DISABLED = {"@type": FILTER_CONFIG_TYPE, "disabled": True}


def build(
    ctx: Ctx,
    filter_config: Json,
    routes: list[Json] | None = None,
    *,
    runtime: Json | None = None,
    vhost_override: Json | None = None,
    clusters: list[Json] | None = None,
) -> Json:
    vh = virtual_host("all", ["*"], routes or [route({"prefix": "/"}, cluster="backend")])
    if vhost_override is not None:
        vh["typed_per_filter_config"] = {FAULT: vhost_override}
    listener = http_listener(port=ctx.port, virtual_hosts=[vh], access_log_path=ctx.access_log)
    bs = bootstrap(
        admin_port=ctx.admin_port,
        listeners=[with_filters(listener, [fault(**filter_config)])],
        clusters=clusters or [cluster("backend", [ctx.up("a")])],
    )
    if runtime is not None:
        bs["layered_runtime"] = {"layers": [{"name": "static", "static_layer": runtime}]}
    return bs


ABORTED = {"status": 503, "upstream": None, "body": "fault filter abort"}
PASSED = {"status": 200, "upstream": "a"}


def build_abort(ctx: Ctx) -> Json:
    return build(
        ctx,
        {"abort": abort(503)},
        [
            per_filter(route({"prefix": "/off"}, cluster="backend"), DISABLED),
            per_filter(
                route({"prefix": "/zero"}, cluster="backend"), override(abort=abort(503, 0))
            ),
            per_filter(route({"prefix": "/teapot"}, cluster="backend"), override(abort=abort(418))),
            route({"prefix": "/"}, cluster="backend"),
        ],
    )


def build_vhost_override(ctx: Ctx) -> Json:
    return build(
        ctx,
        {"abort": abort(503)},
        [
            per_filter(route({"prefix": "/route"}, cluster="backend"), override(abort=abort(429))),
            route({"prefix": "/"}, cluster="backend"),
        ],
        vhost_override=override(abort=abort(502)),
    )


def build_delay(ctx: Ctx) -> Json:
    return build(
        ctx,
        {"delay": delay_ms(100)},
        [
            per_filter(
                route({"prefix": "/abort"}, cluster="backend"),
                override(delay=delay_ms(50), abort=abort(500)),
            ),
            per_filter(
                route({"prefix": "/never"}, cluster="backend"), override(delay=delay_ms(50, 0))
            ),
            route({"prefix": "/"}, cluster="backend"),
        ],
    )


def build_headers(ctx: Ctx) -> Json:
    return build(
        ctx,
        {
            "delay": {"header_delay": {}, "percentage": pct(100)},
            "abort": {"header_abort": {}, "percentage": pct(100)},
        },
    )


def build_matching(ctx: Ctx) -> Json:
    return build(
        ctx,
        {
            "abort": abort(503),
            "upstream_cluster": "backend",
            "downstream_nodes": ["node-a", "node-b"],
            "headers": [
                {"name": "x-fault", "string_match": {"exact": "yes"}},
                {"name": ":method", "string_match": {"exact": "GET"}},
            ],
        },
        [
            route({"prefix": "/other"}, cluster="other"),
            route({"prefix": "/"}, cluster="backend"),
        ],
        clusters=[cluster("backend", [ctx.up("a")]), cluster("other", [ctx.up("b")])],
    )


def build_overflow(ctx: Ctx) -> Json:
    return build(
        ctx,
        {"abort": abort(503), "max_active_faults": 0},
        [
            per_filter(
                route({"prefix": "/open"}, cluster="backend"),
                override(abort=abort(503), max_active_faults=5),
            ),
            route({"prefix": "/"}, cluster="backend"),
        ],
    )


def build_runtime(ctx: Ctx) -> Json:
    return build(
        ctx,
        {"abort": abort(503), "abort_percent_runtime": "my.abort"},
        runtime={
            "fault": {
                "http": {
                    "abort": {"http_status": 418},
                    "quiet": {"abort": {"abort_percent": 0}},
                    "loud": {"abort": {"http_status": 451}},
                }
            },
            "my": {"abort": 100},
        },
    )


def build_grpc(ctx: Ctx) -> Json:
    return build(
        ctx,
        {"abort": {"header_abort": {}, "percentage": pct(100)}},
        clusters=[cluster("backend", [ctx.up("grpc")], http2=True)],
    )


def build_flags(ctx: Ctx) -> Json:
    return build(
        ctx,
        {
            "delay": {"header_delay": {}, "percentage": pct(100)},
            "abort": {"header_abort": {}, "percentage": pct(100)},
        },
        [
            route({"prefix": "/refused"}, cluster="refused"),
            route({"prefix": "/"}, direct=(200, "direct")),
        ],
        clusters=[cluster("refused", [ctx.refused])],
    )


DELAY = ("x-envoy-fault-delay-request", "20")


SCENARIOS = [
    Scenario(
        "abort_fixed_and_per_route",
        build_abort,
        (
            Http("/", expect=ABORTED),
            Http("/off", expect=PASSED),
            Http("/zero", expect=PASSED),
            Http("/teapot", expect={"status": 418, "body": "fault filter abort"}),
            Http("/", http2=True, expect=ABORTED),
        ),
        stats={
            f"{STATS}aborts_injected": 3,
            f"{STATS}delays_injected": 0,
            f"{STATS}active_faults": 0,
            "http.ingress_http.downstream_rq_5xx": 2,
            "cluster.backend.upstream_rq_total": 2,
        },
    ),
    Scenario(
        "vhost_override_under_route_override",
        build_vhost_override,
        (
            Http("/route", expect={"status": 429, "body": "fault filter abort"}),
            Http("/", expect={"status": 502, "body": "fault filter abort"}),
        ),
        stats={f"{STATS}aborts_injected": 2},
    ),
    Scenario(
        "delay_then_continue_or_abort",
        build_delay,
        (
            Http("/", expect=PASSED),
            Http("/abort", expect={"status": 500, "body": "fault filter abort"}),
            Http("/never", expect=PASSED),
        ),
        stats={
            f"{STATS}delays_injected": 2,
            f"{STATS}aborts_injected": 1,
            f"{STATS}active_faults": 0,
        },
    ),
    Scenario(
        "header_controlled",
        build_headers,
        (
            Http("/", expect=PASSED),
            Http(
                "/",
                headers=(("x-envoy-fault-abort-request", "429"),),
                expect={"status": 429, "body": "fault filter abort"},
            ),
            # Outside [200, 600): no abort.
            Http("/", headers=(("x-envoy-fault-abort-request", "700"),), expect=PASSED),
            Http("/", headers=(("x-envoy-fault-abort-request", "nope"),), expect=PASSED),
            # The header's percentage caps the configured one.
            Http(
                "/",
                headers=(
                    ("x-envoy-fault-abort-request", "429"),
                    ("x-envoy-fault-abort-request-percentage", "0"),
                ),
                expect=PASSED,
            ),
            # A gRPC status on a plain HTTP request: 200 with the abort's text.
            Http(
                "/",
                headers=(("x-envoy-fault-abort-grpc-request", "14"),),
                expect={"status": 200, "upstream": None, "body": "fault filter abort"},
            ),
            Http("/", headers=(("x-envoy-fault-delay-request", "60"),), expect=PASSED),
            Http("/", headers=(("x-envoy-fault-delay-request", "0"),), expect=PASSED),
            Http(
                "/",
                headers=(
                    ("x-envoy-fault-delay-request", "30"),
                    ("x-envoy-fault-abort-request", "503"),
                ),
                expect=ABORTED,
            ),
            Http(
                "/",
                headers=(
                    ("x-envoy-fault-delay-request", "30"),
                    ("x-envoy-fault-delay-request-percentage", "0"),
                ),
                expect=PASSED,
            ),
        ),
        stats={
            f"{STATS}aborts_injected": 3,
            f"{STATS}delays_injected": 2,
            f"{STATS}active_faults": 0,
        },
    ),
    Scenario(
        "headers_cluster_and_nodes",
        build_matching,
        (
            Http(
                "/",
                headers=(("x-fault", "yes"), ("x-envoy-downstream-service-node", "node-b")),
                expect=ABORTED,
            ),
            Http(
                "/",
                headers=(("x-fault", "no"), ("x-envoy-downstream-service-node", "node-b")),
                expect=PASSED,
            ),
            Http("/", headers=(("x-fault", "yes"),), expect=PASSED),
            Http(
                "/",
                headers=(("x-fault", "yes"), ("x-envoy-downstream-service-node", "node-c")),
                expect=PASSED,
            ),
            Http(
                "/",
                method="POST",
                headers=(("x-fault", "yes"), ("x-envoy-downstream-service-node", "node-a")),
                expect=PASSED,
            ),
            Http(
                "/other",
                headers=(("x-fault", "yes"), ("x-envoy-downstream-service-node", "node-a")),
                expect={"status": 200, "upstream": "b"},
            ),
        ),
        stats={f"{STATS}aborts_injected": 1},
    ),
    Scenario(
        "max_active_faults",
        build_overflow,
        (
            Http("/", expect=PASSED),
            Http("/", expect=PASSED),
            Http("/open", expect=ABORTED),
        ),
        stats={
            f"{STATS}faults_overflow": 2,
            f"{STATS}aborts_injected": 1,
            f"{STATS}active_faults": 0,
        },
    ),
    Scenario(
        "runtime_keys",
        build_runtime,
        (
            Http("/", expect={"status": 418, "body": "fault filter abort"}),
            # A downstream cluster's keys replace the filter's.
            Http("/", headers=(("x-envoy-downstream-service-cluster", "quiet"),), expect=PASSED),
            Http(
                "/",
                headers=(("x-envoy-downstream-service-cluster", "loud"),),
                expect={"status": 451, "body": "fault filter abort"},
            ),
        ),
        stats={
            f"{STATS}aborts_injected": 2,
            f"{STATS}loud.aborts_injected": 1,
        },
    ),
    Scenario(
        "response_flags_in_access_log",
        build_flags,
        (
            Http("/", expect={"status": 200, "body": "direct"}),
            Http("/", headers=(DELAY,), expect={"status": 200, "body": "direct"}),
            Http("/", headers=(("x-envoy-fault-abort-request", "503"),), expect=ABORTED),
            Http(
                "/",
                headers=(DELAY, ("x-envoy-fault-abort-request", "504")),
                expect={"status": 504, "body": "fault filter abort"},
            ),
            # A delay, then the router's own failure: both flags, in Envoy's order.
            Http("/refused", headers=(DELAY,), expect={"status": 503}),
        ),
        stats={f"{STATS}delays_injected": 3, f"{STATS}aborts_injected": 2},
        access_log=True,
    ),
    Scenario(
        "grpc_abort",
        build_grpc,
        (
            Grpc(
                UNARY_METHOD,
                b"ping",
                metadata=(("x-envoy-fault-abort-grpc-request", "14"),),
                expect={"grpc.code": "UNAVAILABLE", "grpc.details": "fault filter abort"},
            ),
            Grpc(
                UNARY_METHOD,
                b"ping",
                metadata=(("x-envoy-fault-abort-request", "404"),),
                expect={"grpc.code": "UNIMPLEMENTED", "grpc.details": "fault filter abort"},
            ),
            Grpc(UNARY_METHOD, b"ping", expect={"grpc.code": "OK"}),
        ),
        stats={f"{STATS}aborts_injected": 2},
    ),
]


test_scenario = differential_tests(SCENARIOS)


# ---------------------------------------------------------------------------------
# envoyx alone: time and chance
# ---------------------------------------------------------------------------------


def _serve(doc: Json) -> envoyx.Server:
    return envoyx.Server(doc, concurrency=1)


def _ctx(environment: Environment) -> Ctx:
    from support.wait import free_port

    return Ctx(
        port=free_port(),
        admin_port=free_port(),
        upstreams=environment.addresses,
        refused=environment.refused,
        access_log="/dev/null",
    )


def test_delay_holds_the_request_at_least_that_long(environment: Environment) -> None:
    ctx = _ctx(environment)
    with (
        _serve(build(ctx, {"delay": delay_ms(150)})),
        httpx.Client(base_url=f"http://127.0.0.1:{ctx.port}") as client,
    ):
        client.get("/")  # the upstream connection is made
        started = time.monotonic()
        resp = client.get("/")
        took = time.monotonic() - started
    assert resp.status_code == 200
    assert took >= 0.150


def test_abort_percentage_is_statistical(environment: Environment) -> None:
    """50 % (as 5000 per TEN_THOUSAND) of 400 requests: binomial, mean 200, sd 10;
    the bound [130, 270] is seven standard deviations wide each side."""
    ctx = _ctx(environment)
    config = {"abort": {"http_status": 503, "percentage": pct(5000, "TEN_THOUSAND")}}
    with _serve(build(ctx, config)) as server:
        with httpx.Client(base_url=f"http://127.0.0.1:{ctx.port}") as client:
            aborted = sum(client.get("/").status_code == 503 for _ in range(400))
        stats = server.stats()
    assert 130 <= aborted <= 270
    assert stats[f"{STATS}aborts_injected"] == aborted


# ---------------------------------------------------------------------------------
# Configuration errors
# ---------------------------------------------------------------------------------

HCM = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"

BAD: dict[str, tuple[list[Json], str]] = {
    "response_rate_limit": (
        [fault(response_rate_limit={"fixed_limit": {"limit_kbps": 1}, "percentage": pct(100)})],
        f"{HCM}.http_filters[0].typed_config.response_rate_limit: not supported by envoyx",
    ),
    "abort_without_status": (
        [fault(abort={"percentage": pct(100)})],
        f"{HCM}.http_filters[0].typed_config.abort",
    ),
    "delay_without_duration": (
        [fault(delay={"percentage": pct(100)})],
        f"{HCM}.http_filters[0].typed_config.delay",
    ),
    "http_status_out_of_range": (
        [fault(abort=abort(100))],
        f"{HCM}.http_filters[0].typed_config.abort.http_status",
    ),
    "fault_last": (
        "last",
        f"{HCM}.http_filters[1].name: the last HTTP filter must be envoy.filters.http.router",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_fault_config_names_the_field(case: str) -> None:
    filters, message = BAD[case]
    listener = http_listener(
        port=0,
        virtual_hosts=[virtual_host("all", ["*"], [route({"prefix": "/"}, direct=(200, "x"))])],
    )
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    if filters == "last":
        hcm["http_filters"] = [*hcm["http_filters"], fault(abort=abort(503))]
    else:
        hcm["http_filters"] = [*filters, *hcm["http_filters"]]
    doc = bootstrap(admin_port=0, listeners=[listener], clusters=[])
    with pytest.raises(envoyx.ConfigError) as info:
        envoyx.Server(doc)
    assert any(message in e for e in info.value.errors), info.value.errors


def test_bad_route_override_names_the_field() -> None:
    r = per_filter(
        route({"prefix": "/"}, direct=(200, "x")),
        override(abort=abort(503), response_rate_limit={"header_limit": {}}),
    )
    listener = with_filters(
        http_listener(port=0, virtual_hosts=[virtual_host("all", ["*"], [r])]),
        [fault()],
    )
    doc = bootstrap(admin_port=0, listeners=[listener], clusters=[])
    with pytest.raises(envoyx.ConfigError) as info:
        envoyx.Server(doc)
    want = f"{HCM}.route_config.virtual_hosts[0].routes[0].typed_per_filter_config"
    assert any(want in e and "response_rate_limit" in e for e in info.value.errors), (
        info.value.errors
    )
