"""Builders of xDS resources and of an ADS bootstrap (plain dicts, Envoy's v3 spelling).

Like :mod:`support.bootstrap`, what they return is exactly what one would write in an
Envoy YAML file; :class:`support.xds_server.XdsServer` packs the resource dicts into
their messages (``google.protobuf.json_format``), so a typo fails in the test, not in
the proxy.
"""

from __future__ import annotations

from typing import Any, Literal

from support.bootstrap import HCM, HCM_TYPE, HTTP_OPTIONS_TYPE, ROUTER_TYPE, socket_address

Json = dict[str, Any]
ApiType = Literal["GRPC", "DELTA_GRPC"]

XDS_CLUSTER = "xds_cluster"
ADS_SOURCE: Json = {"ads": {}, "resource_api_version": "V3"}


def ads_source(initial_fetch_timeout: str | None = None) -> Json:
    src = dict(ADS_SOURCE)
    if initial_fetch_timeout is not None:
        src["initial_fetch_timeout"] = initial_fetch_timeout
    return src


# -- resources -------------------------------------------------------------------------


def listener(
    name: str,
    port: int,
    *,
    route_config_name: str,
    stat_prefix: str | None = None,
    host: str = "127.0.0.1",
    codec_type: str = "AUTO",
) -> Json:
    """An HTTP listener whose HCM takes its routes from RDS over ADS."""
    hcm: Json = {
        "@type": HCM_TYPE,
        "stat_prefix": stat_prefix or name,
        "codec_type": codec_type,
        "rds": {"config_source": dict(ADS_SOURCE), "route_config_name": route_config_name},
        "http_filters": [
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}
        ],
    }
    return {
        "name": name,
        "address": socket_address(host, port),
        "filter_chains": [{"filters": [{"name": HCM, "typed_config": hcm}]}],
    }


def route_configuration(name: str, virtual_hosts: list[Json]) -> Json:
    return {"name": name, "virtual_hosts": virtual_hosts}


def prefix_route(prefix: str, cluster: str) -> Json:
    return {"match": {"prefix": prefix}, "route": {"cluster": cluster}}


def regex_route(regex: str, cluster: str) -> Json:
    return {"match": {"safe_regex": {"regex": regex}}, "route": {"cluster": cluster}}


def simple_routes(name: str, cluster: str, *, extra: list[Json] | None = None) -> Json:
    """A route configuration with one virtual host ``*``: ``extra`` routes first, then
    everything else (prefix ``/``) to ``cluster``."""
    routes = [*(extra or []), prefix_route("/", cluster)]
    return route_configuration(name, [{"name": "all", "domains": ["*"], "routes": routes}])


def eds_cluster(
    name: str,
    *,
    service_name: str | None = None,
    connect_timeout: str = "1s",
    lb_policy: str = "ROUND_ROBIN",
    http2: bool = False,
) -> Json:
    """``type: EDS`` with its endpoints from ADS (under ``service_name`` or its name)."""
    eds_config: Json = {"eds_config": dict(ADS_SOURCE)}
    if service_name is not None:
        eds_config["service_name"] = service_name
    c: Json = {
        "name": name,
        "type": "EDS",
        "connect_timeout": connect_timeout,
        "lb_policy": lb_policy,
        "eds_cluster_config": eds_config,
    }
    if http2:
        c["typed_extension_protocol_options"] = _http2_options()
    return c


def cluster_load_assignment(cluster_name: str, endpoints: list[tuple[str, int]]) -> Json:
    """One locality holding ``endpoints``; an empty list means no endpoints."""
    return {
        "cluster_name": cluster_name,
        "endpoints": [
            {
                "lb_endpoints": [
                    {"endpoint": {"address": socket_address(h, p)}} for h, p in endpoints
                ]
            }
        ]
        if endpoints
        else [],
    }


def _http2_options() -> Json:
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": HTTP_OPTIONS_TYPE,
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }


# -- bootstrap ---------------------------------------------------------------------------


def ads_bootstrap(
    *,
    xds_address: tuple[str, int],
    admin_port: int,
    api_type: ApiType = "GRPC",
    node_id: str = "envoyx-test",
    node_cluster: str = "envoyx-tests",
    initial_fetch_timeout: str | None = None,
    retry_base: str = "0.1s",
    retry_max: str = "0.5s",
    static_clusters: list[Json] | None = None,
) -> Json:
    """A bootstrap taking listeners and clusters from ADS (``api_type`` ``GRPC`` for
    State of the World, ``DELTA_GRPC`` for incremental) through a static HTTP/2
    ``xds_cluster`` pointing at ``xds_address``; admin on ``admin_port``.

    The reconnect back-off (``retry_policy.retry_back_off`` of the ``envoy_grpc``) is
    short so that reconnect tests are quick.
    """
    host, port = xds_address
    xds_cluster: Json = {
        "name": XDS_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": XDS_CLUSTER,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": socket_address(host, port)}}]}
            ],
        },
        "typed_extension_protocol_options": _http2_options(),
    }
    return {
        "node": {"id": node_id, "cluster": node_cluster},
        "admin": {"address": socket_address("127.0.0.1", admin_port)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "grpc_services": [
                    {
                        "envoy_grpc": {
                            "cluster_name": XDS_CLUSTER,
                            "retry_policy": {
                                "retry_back_off": {
                                    "base_interval": retry_base,
                                    "max_interval": retry_max,
                                }
                            },
                        }
                    }
                ],
            },
            "lds_config": ads_source(initial_fetch_timeout),
            "cds_config": ads_source(initial_fetch_timeout),
        },
        "static_resources": {"clusters": [xds_cluster, *(static_clusters or [])]},
    }
