"""``envoy.filters.http.grpc_stats`` implemented in Rust: the per-call counters under the
route's cluster (``cluster.<c>.grpc[.<service>.<method>].{<status>, success, failure,
total, request_message_count, response_message_count}``) for every method, an allowlist
or none, side by side with Envoy 1.40 with real gRPC calls (grpcio client and server);
also in Istio's chain (grpc_stats, fault, cors, router), where a fault's abort is a
counted gRPC failure. Configuration errors name their field.
"""

from __future__ import annotations

from typing import Any

import pytest

import envoyx
from support.bootstrap import bootstrap, cluster, http_listener, route, virtual_host
from support.differential import Ctx, Grpc, Http, Json, Scenario, differential_tests
from support.upstreams import GRPC_SERVICE, STREAM_METHOD, UNARY_METHOD

pytestmark = pytest.mark.envoy

GRPC_STATS = "envoy.filters.http.grpc_stats"
GRPC_STATS_TYPE = "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig"
FAULT = {
    "name": "envoy.filters.http.fault",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
        "abort": {"header_abort": {}, "percentage": {"numerator": 100}},
    },
}
CORS = {
    "name": "envoy.filters.http.cors",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"},
}
C = "cluster.backend.grpc."
UNARY = f"{C}{GRPC_SERVICE}.Unary."
STREAM = f"{C}{GRPC_SERVICE}.Stream."


def grpc_stats(**config: Any) -> Json:
    return {"name": GRPC_STATS, "typed_config": {"@type": GRPC_STATS_TYPE, **config}}


def build_with(*filters: Json) -> Any:
    def build(ctx: Ctx) -> Json:
        listener = http_listener(
            port=ctx.port,
            virtual_hosts=[
                virtual_host(
                    "all",
                    ["*"],
                    [
                        route({"prefix": "/plain"}, cluster="http"),
                        route({"prefix": "/"}, cluster="backend"),
                    ],
                )
            ],
        )
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["http_filters"] = [*filters, *hcm["http_filters"]]
        return bootstrap(
            admin_port=ctx.admin_port,
            listeners=[listener],
            clusters=[
                cluster("backend", [ctx.up("grpc")], http2=True),
                cluster("http", [ctx.up("a")]),
            ],
        )

    return build


def calls() -> tuple[Grpc | Http, ...]:
    return (
        Grpc(UNARY_METHOD, b"one", expect={"grpc.code": "OK"}),
        Grpc(UNARY_METHOD, b"two", expect={"grpc.code": "OK"}),
        Grpc(
            UNARY_METHOD,
            b"fail",
            metadata=(("x-test-grpc-code", "5"),),
            expect={"grpc.code": "NOT_FOUND"},
        ),
        Grpc(STREAM_METHOD, b"3", expect={"grpc.code": "OK"}),
        # Not gRPC: not counted.
        Http("/plain", expect={"status": 200, "upstream": "a"}),
    )


SCENARIOS = [
    Scenario(
        "every_method",
        build_with(grpc_stats(stats_for_all_methods=True)),
        calls(),
        stats={
            f"{UNARY}success": 2,
            f"{UNARY}failure": 1,
            f"{UNARY}total": 3,
            f"{UNARY}0": 2,
            f"{UNARY}5": 1,
            f"{UNARY}request_message_count": 3,
            f"{UNARY}response_message_count": 2,
            f"{STREAM}success": 1,
            f"{STREAM}total": 1,
            f"{STREAM}0": 1,
            f"{STREAM}request_message_count": 1,
            f"{STREAM}response_message_count": 3,
        },
    ),
    Scenario(
        "allowlist",
        build_with(
            grpc_stats(
                individual_method_stats_allowlist={
                    "services": [{"name": GRPC_SERVICE, "method_names": ["Unary"]}]
                }
            )
        ),
        calls(),
        stats={
            f"{UNARY}success": 2,
            f"{UNARY}total": 3,
            f"{UNARY}5": 1,
            f"{UNARY}request_message_count": 3,
            f"{C}success": 1,
            f"{C}total": 1,
            f"{C}0": 1,
            f"{C}request_message_count": 1,
            f"{C}response_message_count": 3,
        },
    ),
    Scenario(
        "replace_dots",
        build_with(grpc_stats(stats_for_all_methods=True, replace_dots_in_grpc_service_name=True)),
        (Grpc(UNARY_METHOD, b"one", expect={"grpc.code": "OK"}),),
        stats={
            f"{C}{GRPC_SERVICE.replace('.', '_')}.Unary.success": 1,
            f"{C}{GRPC_SERVICE.replace('.', '_')}.Unary.response_message_count": 1,
        },
    ),
    Scenario(
        # Istio's chain and settings: no per-method names; a fault's abort is a
        # trailers-only gRPC failure the gRPC stats count.
        "istio_chain",
        build_with(grpc_stats(emit_filter_state=True, stats_for_all_methods=False), FAULT, CORS),
        (
            *calls(),
            Grpc(
                UNARY_METHOD,
                b"x",
                metadata=(("x-envoy-fault-abort-grpc-request", "14"),),
                expect={"grpc.code": "UNAVAILABLE", "grpc.details": "fault filter abort"},
            ),
        ),
        stats={
            f"{C}success": 3,
            f"{C}failure": 2,
            f"{C}total": 5,
            f"{C}0": 3,
            f"{C}5": 1,
            f"{C}14": 1,
            f"{C}request_message_count": 4,
            f"{C}response_message_count": 5,
            "http.ingress_http.fault.aborts_injected": 1,
        },
    ),
]


test_scenario = differential_tests(SCENARIOS)


HCM = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"


BAD = {
    "enable_upstream_stats": (
        [grpc_stats(enable_upstream_stats=True)],
        f"{HCM}.http_filters[0].typed_config.enable_upstream_stats: not supported by envoyx",
    ),
    "after_the_router": (
        "last",
        f"{HCM}.http_filters[1].name: the last HTTP filter must be envoy.filters.http.router",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_grpc_stats_config_names_the_field(case: str) -> None:
    filters, message = BAD[case]
    listener = http_listener(
        port=0,
        virtual_hosts=[virtual_host("all", ["*"], [route({"prefix": "/"}, direct=(200, "x"))])],
    )
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    if filters == "last":
        hcm["http_filters"] = [*hcm["http_filters"], grpc_stats()]
    else:
        hcm["http_filters"] = [*filters, *hcm["http_filters"]]
    doc = bootstrap(admin_port=0, listeners=[listener], clusters=[])
    with pytest.raises(envoyx.ConfigError) as info:
        envoyx.Server(doc)
    assert any(message in e for e in info.value.errors), info.value.errors
