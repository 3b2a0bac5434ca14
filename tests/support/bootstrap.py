"""Builders of Envoy v3 bootstrap documents (plain dicts, Envoy's own spelling).

They are sugar for the tests only: what they return is exactly what one would write
in an Envoy YAML file, and every differential test feeds it unchanged to Envoy.
"""

from __future__ import annotations

from typing import Any

HCM = "envoy.filters.network.http_connection_manager"
HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network."
    "http_connection_manager.v3.HttpConnectionManager"
)
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
TCP_PROXY_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
FILE_LOG_TYPE = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
HTTP_OPTIONS_TYPE = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

Json = dict[str, Any]


def socket_address(host: str, port: int) -> Json:
    return {"socket_address": {"address": host, "port_value": port}}


def bootstrap(
    *,
    admin_port: int,
    listeners: list[Json],
    clusters: list[Json],
    admin_host: str = "127.0.0.1",
) -> Json:
    return {
        "admin": {"address": socket_address(admin_host, admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def route(
    match: Json,
    *,
    cluster: str | None = None,
    direct: tuple[int, str | None] | None = None,
) -> Json:
    """A route to ``cluster`` or a ``direct_response`` of ``(status, body)``."""
    r: Json = {"match": match}
    if cluster is not None:
        r["route"] = {"cluster": cluster}
    elif direct is not None:
        status, body = direct
        dr: Json = {"status": status}
        if body is not None:
            dr["body"] = {"inline_string": body}
        r["direct_response"] = dr
    else:
        raise ValueError("route needs a cluster or a direct response")
    return r


def virtual_host(name: str, domains: list[str], routes: list[Json]) -> Json:
    return {"name": name, "domains": domains, "routes": routes}


def file_access_log(path: str, fmt: str | None = None) -> Json:
    """``envoy.access_loggers.file``; without ``fmt`` Envoy's default format applies."""
    typed: Json = {"@type": FILE_LOG_TYPE, "path": path}
    if fmt is not None:
        typed["log_format"] = {"text_format_source": {"inline_string": fmt}}
    return {"name": "envoy.access_loggers.file", "typed_config": typed}


def http_listener(
    *,
    port: int,
    virtual_hosts: list[Json],
    name: str = "ingress",
    host: str = "127.0.0.1",
    stat_prefix: str = "ingress_http",
    codec_type: str = "AUTO",
    access_log_path: str | None = None,
) -> Json:
    hcm: Json = {
        "@type": HCM_TYPE,
        "stat_prefix": stat_prefix,
        "codec_type": codec_type,
        "route_config": {"name": "local_route", "virtual_hosts": virtual_hosts},
        "http_filters": [
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}
        ],
    }
    if access_log_path is not None:
        hcm["access_log"] = [file_access_log(access_log_path)]
    return {
        "name": name,
        "address": socket_address(host, port),
        "filter_chains": [{"filters": [{"name": HCM, "typed_config": hcm}]}],
    }


def tcp_listener(
    *,
    port: int,
    cluster: str,
    name: str = "tcp",
    host: str = "127.0.0.1",
    stat_prefix: str = "tcp",
) -> Json:
    return {
        "name": name,
        "address": socket_address(host, port),
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": {
                            "@type": TCP_PROXY_TYPE,
                            "stat_prefix": stat_prefix,
                            "cluster": cluster,
                        },
                    }
                ]
            }
        ],
    }


def cluster(
    name: str,
    endpoints: list[tuple[str, int]],
    *,
    type: str = "STATIC",
    http2: bool = False,
    connect_timeout: str = "1s",
    lb_policy: str = "ROUND_ROBIN",
    dns_lookup_family: str | None = None,
) -> Json:
    c: Json = {
        "name": name,
        "type": type,
        "connect_timeout": connect_timeout,
        "lb_policy": lb_policy,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": socket_address(h, p)}} for h, p in endpoints
                    ]
                }
            ]
            if endpoints
            else [],
        },
    }
    if dns_lookup_family is not None:
        c["dns_lookup_family"] = dns_lookup_family
    if http2:
        c["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_OPTIONS_TYPE,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return c


def simple_proxy(
    *,
    port: int,
    admin_port: int,
    upstream: tuple[str, int],
    cluster_name: str = "backend",
    http2_upstream: bool = False,
    codec_type: str = "AUTO",
    access_log_path: str | None = None,
) -> Json:
    """One HTTP listener routing everything to one cluster of one endpoint."""
    return bootstrap(
        admin_port=admin_port,
        listeners=[
            http_listener(
                port=port,
                codec_type=codec_type,
                access_log_path=access_log_path,
                virtual_hosts=[
                    virtual_host("all", ["*"], [route({"prefix": "/"}, cluster=cluster_name)])
                ],
            )
        ],
        clusters=[cluster(cluster_name, [upstream], http2=http2_upstream)],
    )
