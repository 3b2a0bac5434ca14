"""Virtual host, route configuration and route options beside Envoy 1.40 (issues 11,
12): ``require_tls`` (Envoy's SSL redirect route, checked before a virtual host's
routes), ``internal_only_headers`` (removed from requests that are not internal), and
the deprecated ``max_grpc_timeout`` / ``grpc_timeout_offset`` Istio still sends (a gRPC
request's route timeout from its ``grpc-timeout``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import envoyx
from support.bootstrap import bootstrap, cluster, http_listener, route, virtual_host
from support.differential import Ctx, Http, Json, Raw, Scenario, differential_tests

pytestmark = pytest.mark.envoy

LOCATION = ("header:location", "upstream")
INTERNAL_LOOPBACK = {"cidr_ranges": [{"address_prefix": "127.0.0.0", "prefix_len": 8}]}


def proxy(
    *, require_tls: str | None = None, route_config: Json | None = None, **hcm: Any
) -> Callable[[Ctx], Json]:
    def build(ctx: Ctx) -> Json:
        tls_host = virtual_host(
            "tls", ["secure.example"], [route({"prefix": "/"}, cluster="backend")]
        )
        if require_tls is not None:
            tls_host["require_tls"] = require_tls
        listener = http_listener(
            port=ctx.port,
            virtual_hosts=[
                tls_host,
                virtual_host("plain", ["*"], [route({"prefix": "/"}, cluster="backend")]),
            ],
        )
        typed = listener["filter_chains"][0]["filters"][0]["typed_config"]
        typed.update(hcm)
        typed["route_config"].update(route_config or {})
        return bootstrap(
            admin_port=ctx.admin_port,
            listeners=[listener],
            clusters=[cluster("backend", [ctx.up("a")])],
        )

    return build


def to_secure(path: str = "/", host: str = "secure.example", **kw: Any) -> Http:
    return Http(path, headers=(("host", host), *kw.pop("headers", ())), observe=LOCATION, **kw)


def grpc_timeouts(ctx: Ctx) -> Json:
    def fwd(prefix: str, **action: Any) -> Json:
        return {"match": {"prefix": prefix}, "route": {"cluster": "backend", **action}}

    routes = [
        fwd("/capped", max_grpc_timeout="2s", grpc_timeout_offset="0.1s"),
        fwd("/uncapped", max_grpc_timeout="0s"),
        # max_stream_duration switches to Envoy's new timeouts: max_grpc_timeout is unused.
        fwd("/new", max_grpc_timeout="2s", max_stream_duration={"max_stream_duration": "9s"}),
        fwd(
            "/header-max",
            max_stream_duration={
                "grpc_timeout_header_max": "2s",
                "grpc_timeout_header_offset": "0.5s",
            },
        ),
        fwd("/", timeout="3s"),
    ]
    listener = http_listener(port=ctx.port, virtual_hosts=[virtual_host("all", ["*"], routes)])
    return bootstrap(
        admin_port=ctx.admin_port,
        listeners=[listener],
        clusters=[cluster("backend", [ctx.up("a")])],
    )


EXPECTED = ("up.header:x-envoy-expected-rq-timeout-ms", "up.header:grpc-timeout")
GRPC = (("content-type", "application/grpc"),)


def grpc(path: str, timeout: str | None, **kw: Any) -> Http:
    headers = GRPC + ((("grpc-timeout", timeout),) if timeout else ())
    return Http(path, method="POST", headers=headers, body=b"", observe=EXPECTED, **kw)


SCENARIOS: list[Scenario] = [
    Scenario(
        "max_grpc_timeout_from_grpc_timeout",
        grpc_timeouts,
        (
            grpc("/capped", "5S", expect={"up.header:x-envoy-expected-rq-timeout-ms": "2000"}),
            grpc("/capped", "1S", expect={"up.header:x-envoy-expected-rq-timeout-ms": "900"}),
            grpc("/capped", "50m"),  # below the offset: not offset
            grpc("/capped", None),  # no header: the cap
            grpc("/uncapped", "1500m"),
            grpc("/uncapped", None),  # infinity: no expected timeout
            grpc("/new", "1S"),
            # The stream's limit replaces grpc-timeout under max_stream_duration.
            grpc("/header-max", "5S", expect={"up.header:grpc-timeout": "1500m"}),
            grpc("/header-max", "300m"),  # the offset would leave nothing: not taken
            grpc("/header-max", None),
            # Not gRPC: the route's timeout (15 s default).
            Http("/capped", observe=EXPECTED),
            grpc("/other", "1S"),
        ),
    ),
    Scenario(
        "require_tls_all",
        proxy(require_tls="ALL"),
        (
            to_secure("/a/b?q=1", expect={"status": 301, "upstream": None}),
            # The host is kept as sent, port included (no https_redirect port rules).
            to_secure("/x", host="secure.example:80"),
            to_secure("/x", host="secure.example:8443"),
            to_secure("/x", http2=True),
            # Other virtual hosts are not affected.
            Http("/a", headers=(("host", "other.example"),), expect={"upstream": "a"}),
            # A client's x-forwarded-proto is kept without use_remote_address, as Envoy.
            to_secure("/y", headers=(("x-forwarded-proto", "https"),)),
            Raw(b"GET /raw HTTP/1.1\r\nHost: secure.example\r\n\r\n"),
        ),
    ),
    Scenario(
        "require_tls_all_at_the_edge",
        proxy(require_tls="ALL", use_remote_address=True),
        (
            # At the edge a client's x-forwarded-proto is overwritten: still redirected.
            to_secure("/y", headers=(("x-forwarded-proto", "https"),)),
            to_secure("/z"),
        ),
    ),
    Scenario(
        "require_tls_external_only",
        proxy(require_tls="EXTERNAL_ONLY", use_remote_address=True),
        (
            # Envoy 1.40 counts no address as internal by default: redirected.
            to_secure("/e"),
            # A client cannot claim to be internal.
            to_secure("/e", headers=(("x-envoy-internal", "true"),)),
        ),
    ),
    Scenario(
        "require_tls_external_only_internal_client",
        proxy(
            require_tls="EXTERNAL_ONLY",
            use_remote_address=True,
            internal_address_config=INTERNAL_LOOPBACK,
        ),
        (
            to_secure("/i", expect={"status": 200, "upstream": "a"}),
            to_secure("/i", http2=True),
        ),
    ),
    Scenario(
        "require_tls_none",
        proxy(require_tls="NONE"),
        (to_secure("/n", expect={"status": 200}),),
    ),
    Scenario(
        "internal_only_headers_external",
        proxy(route_config={"internal_only_headers": ["x-secret", "X-Other"]}),
        (
            Http(
                "/",
                headers=(("x-secret", "1"), ("x-other", "2"), ("x-kept", "3")),
                observe=("up.has:x-secret", "up.has:x-other", "up.header:x-kept"),
                expect={"up.has:x-secret": False, "up.has:x-other": False},
            ),
            Http(
                "/",
                http2=True,
                headers=(("x-secret", "1"),),
                observe=("up.has:x-secret",),
            ),
        ),
    ),
    Scenario(
        "internal_only_headers_internal",
        proxy(
            route_config={"internal_only_headers": ["x-secret"]},
            use_remote_address=True,
            internal_address_config=INTERNAL_LOOPBACK,
        ),
        (
            Http(
                "/",
                headers=(("x-secret", "1"),),
                observe=("up.header:x-secret",),
                expect={"up.header:x-secret": "1"},
            ),
        ),
    ),
]


test_scenario = differential_tests(SCENARIOS)


def test_table_names_are_unique() -> None:
    names = [s.name for s in SCENARIOS]
    assert len(set(names)) == len(names)


OFFLINE = Ctx(
    port=1, admin_port=2, upstreams={"a": ("127.0.0.1", 3)}, refused=("127.0.0.1", 4), access_log=""
)


def test_config_errors_name_the_field() -> None:
    bs = proxy(route_config={"internal_only_headers": ["bad header"]})(OFFLINE)
    with pytest.raises(envoyx.ConfigError) as info:
        envoyx.Server(bs)
    expected = 'route_config.internal_only_headers[0]: "bad header" is not a valid header name'
    assert any(e.endswith(expected) for e in info.value.errors), info.value.errors
