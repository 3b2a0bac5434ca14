"""Sidecar interception pieces that need no traffic capture (issue 12), differential
against Envoy 1.40: listener filters skipped by ``filter_disabled``
(``ListenerFilterChainMatchPredicate``), a cluster's ``upstream_bind_config`` (the
upstream sees the source address), ``use_downstream_protocol_config`` (each request
goes upstream in its downstream protocol), and a ``use_original_dst`` listener whose
connection was not redirected (nothing restored: its own chains serve).

The hand-off of redirected connections to ``bind_to_port: false`` listeners needs
iptables: tests/test_sidecar_redirect.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from envoyx import _core
from envoyx.config import bootstrap_to_json, load_bootstrap
from support.bootstrap import bootstrap, cluster, http_listener, route, virtual_host
from support.differential import Ctx, Http, Json, Scenario, differential_tests

pytestmark = pytest.mark.envoy

HTTP_INSPECTOR: Json = {
    "name": "envoy.filters.listener.http_inspector",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3."
        "HttpInspector"
    },
}
HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _to(upstream: str) -> list[Json]:
    return [virtual_host("all", ["*"], [route({"prefix": "/"}, cluster=upstream)])]


def _inspected(disabled: Callable[[Ctx], Json] | None) -> Callable[[Ctx], Json]:
    """A listener whose http_inspector picks the chain: HTTP/1.1 detected goes to a,
    anything else (the inspector skipped) to the default chain's b."""

    def build(ctx: Ctx) -> Json:
        listener = http_listener(port=ctx.port, virtual_hosts=_to("a"))
        chain = listener["filter_chains"][0]
        chain["filter_chain_match"] = {"application_protocols": ["http/1.1"]}
        other = http_listener(port=ctx.port, virtual_hosts=_to("b"), stat_prefix="other")
        listener["default_filter_chain"] = other["filter_chains"][0]
        inspector = dict(HTTP_INSPECTOR)
        if disabled is not None:
            inspector["filter_disabled"] = disabled(ctx)
        listener["listener_filters"] = [inspector]
        return bootstrap(
            admin_port=ctx.admin_port,
            listeners=[listener],
            clusters=[cluster("a", [ctx.up("a")]), cluster("b", [ctx.up("b")])],
        )

    return build


def _port(ctx: Ctx) -> Json:
    return {"destination_port_range": {"start": ctx.port, "end": ctx.port + 1}}


OTHER_PORT: Json = {"destination_port_range": {"start": 1, "end": 2}}


def _with_cluster(make: Callable[[Ctx], Json]) -> Callable[[Ctx], Json]:
    """One HTTP listener routing everything to the cluster ``make`` builds (named u)."""

    def build(ctx: Ctx) -> Json:
        return bootstrap(
            admin_port=ctx.admin_port,
            listeners=[http_listener(port=ctx.port, virtual_hosts=_to("u"))],
            clusters=[make(ctx)],
        )

    return build


def _downstream_protocol(ctx: Ctx) -> Json:
    c = cluster("u", [ctx.up("h2")])
    c["typed_extension_protocol_options"] = {
        HTTP_OPTIONS_KEY: {
            "@type": "type.googleapis.com/" + HTTP_OPTIONS_KEY,
            "use_downstream_protocol_config": {
                "http_protocol_options": {},
                "http2_protocol_options": {},
            },
        }
    }
    return c


def _bound(source: str) -> Callable[[Ctx], Json]:
    def make(ctx: Ctx) -> Json:
        c = cluster("u", [ctx.up("a")])
        c["upstream_bind_config"] = {"source_address": {"address": source, "port_value": 0}}
        return c

    return make


def _original_dst_listener(ctx: Ctx) -> Json:
    """Istio's virtualOutbound shape: use_original_dst, a catch-all HTTP chain."""
    listener = http_listener(port=ctx.port, virtual_hosts=_to("a"))
    listener["use_original_dst"] = True
    return bootstrap(
        admin_port=ctx.admin_port,
        listeners=[listener],
        clusters=[cluster("a", [ctx.up("a")])],
    )


SCENARIOS = [
    Scenario(
        name="filter_disabled_on_the_destination_port",
        build=_inspected(_port),
        requests=(Http(expect={"status": 200, "upstream": "b"}),),
        stats={"http_inspector.http11_found": 0, "listener.{listener}.downstream_cx_total": 1},
    ),
    Scenario(
        name="filter_enabled_on_another_port",
        build=_inspected(lambda ctx: OTHER_PORT),
        requests=(Http(expect={"status": 200, "upstream": "a"}),),
        stats={"http_inspector.http11_found": 1},
    ),
    Scenario(
        name="filter_disabled_by_and_or_not_any",
        # (any and not other-port) or other-port: true on the listener's port.
        build=_inspected(
            lambda ctx: {
                "or_match": {
                    "rules": [
                        OTHER_PORT,
                        {"and_match": {"rules": [{"any_match": True}, {"not_match": OTHER_PORT}]}},
                    ]
                }
            }
        ),
        requests=(Http(expect={"status": 200, "upstream": "b"}),),
        stats={"http_inspector.http11_found": 0},
    ),
    Scenario(
        name="filter_enabled_by_not_match_of_the_port",
        build=_inspected(lambda ctx: {"not_match": _port(ctx)}),
        requests=(Http(expect={"status": 200, "upstream": "a"}),),
        stats={"http_inspector.http11_found": 1},
    ),
    Scenario(
        name="use_downstream_protocol_config",
        # HTTP/1.1 in, HTTP/1.1 out; h2c in, HTTP/2 out: one connection of each.
        build=_with_cluster(_downstream_protocol),
        requests=(
            Http(observe=("up.protocol",), expect={"upstream": "h2", "up.protocol": "1.1"}),
            Http(http2=True, observe=("up.protocol",), expect={"up.protocol": "2"}),
            Http(http2=True, observe=("up.protocol",), expect={"up.protocol": "2"}),
            Http(observe=("up.protocol",), expect={"up.protocol": "1.1"}),
        ),
        stats={
            "cluster.u.upstream_cx_http1_total": 1,
            "cluster.u.upstream_cx_http2_total": 1,
            "cluster.u.upstream_rq_total": 4,
        },
    ),
    Scenario(
        name="upstream_bind_config_source_address",
        # Istio's InboundPassthroughCluster binds 127.0.0.6.
        build=_with_cluster(_bound("127.0.0.6")),
        requests=(
            Http(observe=("up.peer_ip",), expect={"upstream": "a", "up.peer_ip": "127.0.0.6"}),
        ),
        stats={"cluster.u.bind_errors": 0},
    ),
    Scenario(
        name="use_original_dst_without_redirect",
        # Nothing to restore (no iptables rule redirected the connection): the
        # listener's own chain serves, and counts the connection.
        build=_original_dst_listener,
        requests=(Http(expect={"status": 200, "upstream": "a"}),),
        stats={"listener.{listener}.downstream_cx_total": 1},
    ),
]

# Listed so that an accidental rename shows.
NAMES = tuple(s.name for s in SCENARIOS)


test_scenario = differential_tests(SCENARIOS, ids=NAMES)


def _errors(c: Json) -> list[str]:
    doc = bootstrap(admin_port=0, listeners=[], clusters=[c])
    return list(_core.validate(bootstrap_to_json(load_bootstrap(doc))))


@pytest.mark.parametrize(
    ("field", "value", "refused"),
    [
        (
            "upstream_bind_config",
            {
                "source_address": {"address": "127.0.0.6", "port_value": 0},
                "socket_options": [{"level": 1, "name": 2, "int_value": 1}],
            },
            "static_resources.clusters[0].upstream_bind_config.socket_options: "
            "not supported by envoyx",
        ),
        (
            "upstream_bind_config",
            {
                "source_address": {"address": "127.0.0.6", "port_value": 0},
                "extra_source_addresses": [{"address": {"address": "::1", "port_value": 0}}],
            },
            "static_resources.clusters[0].upstream_bind_config.extra_source_addresses: "
            "not supported by envoyx",
        ),
        (
            "transport_socket",
            {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                    "UpstreamTlsContext"
                },
            },
            "static_resources.clusters[0].typed_extension_protocol_options: "
            "use_downstream_protocol_config with a transport_socket is not supported by envoyx",
        ),
    ],
)
def test_refused_by_name(field: str, value: Json, refused: str) -> None:
    """What stays refused: a bind config's socket options and extra source
    addresses, use_downstream_protocol_config beside TLS (each connection would need
    its own ALPN)."""
    c = _downstream_protocol(
        Ctx(
            port=1, admin_port=2, upstreams={"h2": ("127.0.0.1", 3)}, refused=("", 0), access_log=""
        )
    )
    c[field] = value
    assert refused in _errors(c)


def test_bind_config_and_downstream_protocol_map() -> None:
    c = _downstream_protocol(
        Ctx(
            port=1, admin_port=2, upstreams={"h2": ("127.0.0.1", 3)}, refused=("", 0), access_log=""
        )
    )
    c["upstream_bind_config"] = {
        "source_address": {"address": "192.0.2.1", "port_value": 0},
        "freebind": True,
    }
    assert _errors(c) == []
