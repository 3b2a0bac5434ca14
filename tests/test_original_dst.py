"""ORIGINAL_DST clusters (issue 12, sidecar interception), differential against Envoy
1.40: the request names its upstream in a header (``use_http_header``), and
``upstream_port_override`` replaces the named port. Without an ``ip:port`` in the
header (and no listener filter restoring the connection's original destination)
there is no host: 503 ``no healthy upstream``, as Envoy.

The scenarios name the session's upstreams by address, so the table is built from
the environment (the ports are known only then).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from support.bootstrap import bootstrap, http_listener, route, tcp_listener, virtual_host
from support.differential import Ctx, Environment, Http, Json, Scenario, Tcp, run_differential
from support.envoy import targets_from_env

pytestmark = pytest.mark.envoy

_SHA256_EMPTY = hashlib.sha256(b"").hexdigest()


def _original_dst_cluster(name: str, **lb_config: object) -> Json:
    c: Json = {
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "1s",
    }
    if lb_config:
        c["original_dst_lb_config"] = lb_config
    return c


ORIGINAL_DST_FILTER: Json = {
    "name": "envoy.filters.listener.original_dst",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
    },
}


def _via(cluster: Json, listener_filters: list[Json] | None = None) -> Callable[[Ctx], Json]:
    def build(ctx: Ctx) -> Json:
        listener = http_listener(
            port=ctx.port,
            virtual_hosts=[
                virtual_host("all", ["*"], [route({"prefix": "/"}, cluster=cluster["name"])])
            ],
        )
        if listener_filters is not None:
            listener["listener_filters"] = listener_filters
        return bootstrap(admin_port=ctx.admin_port, listeners=[listener], clusters=[cluster])

    return build


def _hostport(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def _scenarios(env: Environment) -> dict[str, Scenario]:
    a, b = _hostport(env.addresses["a"]), _hostport(env.addresses["b"])
    header = "x-envoy-original-dst-host"
    scenarios = [
        Scenario(
            name="header_names_the_upstream",
            build=_via(_original_dst_cluster("od", use_http_header=True)),
            requests=(
                Http(headers=((header, a),), expect={"status": 200, "upstream": "a"}),
                Http(headers=((header, b),), expect={"status": 200, "upstream": "b"}),
                # The same host again: made once, reused.
                Http(headers=((header, a),), expect={"status": 200, "upstream": "a"}),
                # The header is not removed: the upstream sees it as sent.
                Http(
                    headers=((header, b),),
                    observe=("up.header:x-envoy-original-dst-host",),
                    expect={"upstream": "b", "up.header:x-envoy-original-dst-host": b},
                ),
            ),
            stats={
                "cluster.od.upstream_rq_total": 4,
                "cluster.od.upstream_cx_total": 2,
                "cluster.od.upstream_cx_none_healthy": 0,
                "cluster.od.original_dst_host_invalid": 0,
            },
        ),
        Scenario(
            name="missing_or_invalid_header_has_no_host",
            build=_via(_original_dst_cluster("od", use_http_header=True)),
            requests=(
                Http(expect={"status": 503, "body": "no healthy upstream"}),
                Http(headers=((header, "not-an-address"),), expect={"status": 503}),
                # A name is no address; a port is required.
                Http(headers=((header, "localhost:80"),), expect={"status": 503}),
                Http(headers=((header, "127.0.0.1"),), expect={"status": 503}),
                Http(headers=((header, a),), expect={"status": 200, "upstream": "a"}),
            ),
            stats={
                "cluster.od.upstream_rq_total": 1,
                "cluster.od.upstream_cx_none_healthy": 4,
                "cluster.od.original_dst_host_invalid": 3,
            },
        ),
        Scenario(
            name="header_name_and_port_override",
            build=_via(
                _original_dst_cluster(
                    "od",
                    use_http_header=True,
                    http_header_name="x-dst",
                    upstream_port_override=env.addresses["b"][1],
                )
            ),
            requests=(
                # Any port in the header: the override names b's.
                Http(headers=(("x-dst", "127.0.0.1:1"),), expect={"status": 200, "upstream": "b"}),
                Http(headers=(("X-Dst", a),), expect={"status": 200, "upstream": "b"}),
                # The default header name means nothing once another is configured.
                Http(headers=((header, a),), expect={"status": 503}),
            ),
            stats={
                "cluster.od.upstream_rq_total": 2,
                "cluster.od.upstream_cx_none_healthy": 1,
            },
        ),
        Scenario(
            name="without_use_http_header_no_host",
            # No listener filter restored the connection's original destination:
            # the header means nothing and there is no host.
            build=_via(_original_dst_cluster("od")),
            requests=(Http(headers=((header, a),), expect={"status": 503}),),
            stats={"cluster.od.upstream_cx_none_healthy": 1},
        ),
        Scenario(
            name="listener_filter_without_redirect",
            # The original_dst listener filter on a connection no iptables rule
            # redirected: the kernel has no original destination for it
            # (SO_ORIGINAL_DST fails), so nothing is restored and the cluster has
            # no host.
            build=_via(
                _original_dst_cluster("od", upstream_port_override=env.addresses["a"][1]),
                [ORIGINAL_DST_FILTER],
            ),
            requests=(Http(expect={"status": 503}),),
            stats={"cluster.od.upstream_cx_none_healthy": 1},
        ),
        Scenario(
            name="tcp_proxy_listener_filter_without_redirect",
            # Istio's passthrough: tcp_proxy to an ORIGINAL_DST cluster behind the
            # original_dst filter. Not redirected, so no host: the connection is
            # closed (UH) without a byte, as Envoy.
            build=lambda ctx: bootstrap(
                admin_port=ctx.admin_port,
                listeners=[
                    {
                        **tcp_listener(port=ctx.port, cluster="od"),
                        "listener_filters": [ORIGINAL_DST_FILTER],
                    }
                ],
                clusters=[
                    _original_dst_cluster("od", upstream_port_override=env.addresses["echo"][1])
                ],
            ),
            requests=(Tcp(b"hello", expect={"tcp.received": (0, _SHA256_EMPTY)}),),
            stats={"cluster.od.upstream_cx_none_healthy": 1},
        ),
    ]
    return {s.name: s for s in scenarios}


NAMES = (
    "header_names_the_upstream",
    "missing_or_invalid_header_has_no_host",
    "header_name_and_port_override",
    "without_use_http_header_no_host",
    "listener_filter_without_redirect",
    "tcp_proxy_listener_filter_without_redirect",
)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("target", targets_from_env("ENVOYX_DIFF_TARGETS"))
def test_scenario(
    target: str,
    name: str,
    envoy_binary: Path,
    environment: Environment,
    tmp_path: Path,
) -> None:
    run_differential(target, _scenarios(environment)[name], envoy_binary, environment, tmp_path)


def test_names_cover_the_table(environment: Environment) -> None:
    assert tuple(_scenarios(environment)) == NAMES
