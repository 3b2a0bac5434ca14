"""Envoy's documented defaults for the fields envoyx supports, and where each message sits.

The table was made from the comments of Envoy's API protos (envoyproxy/data-plane-api at
84e84367, the API of Envoy 1.37 to 1.40): every field of the messages below whose comment
names a default ("Defaults to …", "If not specified, the default is …", "If unset …"),
keeping the fields envoyx supports. Only fields whose unset state proto3 can tell from a
written-out value are listed (wrappers, durations, messages): for a plain `bool`, `uint32`
or enum field, unset *is* the zero value, so there is nothing to check.

A default is either a value that can be written out (`DEFAULTS`: the field left unset and
the field set to that value must configure envoyx identically), or the absence of a
feature (`ABSENT`: "if not set, there is no limit / the timeout is disabled", no value
of the field means the same). The remaining supported wrapper and duration fields carry
no documented default (`NO_DEFAULT`): tests/test_config_defaults.py checks that every
supported field of these messages is in exactly one of the three, so a field supported
later has to be classified here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from support.config_fields import _ROUTES, PLACES, Place, _at, _set, _set_action

HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
PROTOCOL = "envoy.config.core.v3"
ROUTE = "envoy.config.route.v3"
CLUSTER = "envoy.config.cluster.v3"

_C = "static_resources.clusters[0]"
_L = "static_resources.listeners[0]"
_HEALTH_CHECK = {
    "timeout": "1s",
    "interval": "2s",
    "unhealthy_threshold": 1,
    "healthy_threshold": 1,
    "http_health_check": {"path": "/h"},
}
TCP_PROXY = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"


def _tcp_proxy(doc: dict[str, Any]) -> None:
    chain = _at(doc, f"{_L}.filter_chains[0]")
    chain["filters"] = [
        {
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": {
                "@type": f"type.googleapis.com/{TCP_PROXY}",
                "stat_prefix": "t",
                "cluster": "c",
            },
        }
    ]


#: The route and connection-manager messages of the field index, and the cluster and
#: listener messages that carry defaults.
DEFAULT_PLACES = [
    *PLACES,
    Place(f"{CLUSTER}.Cluster", _C),
    Place(
        f"{CLUSTER}.OutlierDetection", f"{_C}.outlier_detection", _set(_C, "outlier_detection", {})
    ),
    Place(
        f"{CLUSTER}.CircuitBreakers.Thresholds",
        f"{_C}.circuit_breakers.thresholds[0]",
        _set(_C, "circuit_breakers", {"thresholds": [{}]}),
    ),
    Place(
        f"{PROTOCOL}.HealthCheck",
        f"{_C}.health_checks[0]",
        _set(_C, "health_checks", [_HEALTH_CHECK]),
    ),
    Place(
        f"{PROTOCOL}.HealthCheck.HttpHealthCheck",
        f"{_C}.health_checks[0].http_health_check",
        _set(_C, "health_checks", [_HEALTH_CHECK]),
    ),
    Place("envoy.config.listener.v3.Listener", _L),
    Place(TCP_PROXY, f"{_L}.filter_chains[0].filters[0].typed_config", _tcp_proxy),
    Place(
        f"{ROUTE}.RetryPolicy.RetryBackOff",
        f"{_ROUTES}.route.retry_policy.retry_back_off",
        _set_action(
            "route", {"cluster": "c", "retry_policy": {"retry_back_off": {"base_interval": "0.1s"}}}
        ),
    ),
]


@dataclass(frozen=True)
class Default:
    """One field's documented default: `value` in proto JSON, `doc` Envoy's words."""

    message: str
    field: str
    value: Any
    doc: str
    #: A different value when the message arrives as an xDS resource (RDS, CDS, LDS)
    #: rather than in the bootstrap: Envoy documents a few defaults per source.
    xds_value: Any = None

    @property
    def name(self) -> str:
        return f"{self.message.rsplit('.', 1)[-1]}.{self.field}"


def _d(message: str, field: str, value: Any, doc: str, xds_value: Any = None) -> Default:
    return Default(message, field, value, doc, xds_value)


_H1 = f"{PROTOCOL}.HttpProtocolOptions"
_H2 = f"{PROTOCOL}.Http2ProtocolOptions"
_OD = f"{CLUSTER}.OutlierDetection"
_CB = f"{CLUSTER}.CircuitBreakers.Thresholds"
_HC = f"{PROTOCOL}.HealthCheck"

DEFAULTS: list[Default] = [
    # The HTTP connection manager.
    _d(
        HCM,
        "max_request_headers_kb",
        60,
        "If unconfigured, the default max request headers allowed is 60 KiB.",
    ),
    _d(HCM, "stream_idle_timeout", "300s", "If not specified, this defaults to 5 minutes."),
    _d(HCM, "request_timeout", "0s", "If not specified or set to 0, this timeout is disabled."),
    _d(
        HCM,
        "request_headers_timeout",
        "0s",
        "If not specified or set to 0, this timeout is disabled.",
    ),
    _d(
        HCM,
        "drain_timeout",
        "5s",
        "The default grace period is 5000 milliseconds (5 seconds) if this option is not "
        "specified.",
    ),
    _d(
        HCM,
        "delayed_close_timeout",
        "1s",
        "The default timeout is 1000 ms if this option is not specified.",
    ),
    _d(HCM, "generate_request_id", True, "This defaults to true."),
    _d(
        HCM,
        "normalize_path",
        False,
        "This defaults to false currently but will default true in the future.",
    ),
    _d(_H1, "idle_timeout", "3600s", "If not specified, this defaults to ``1 hour``."),
    _d(
        _H1,
        "max_headers_count",
        100,
        "If unconfigured, the default maximum number of headers allowed is ``100``.",
    ),
    _d(_H2, "max_concurrent_streams", 1024, "… and defaults to ``1024`` for safety …"),
    _d(
        _H2,
        "initial_stream_window_size",
        16 * 1024 * 1024,
        "… and defaults to ``16MiB`` (``16 * 1024 * 1024``).",
    ),
    _d(
        _H2,
        "initial_connection_window_size",
        24 * 1024 * 1024,
        "The default is ``24MiB`` (``24 * 1024 * 1024``).",
    ),
    _d(
        f"{HCM}.UpgradeConfig",
        "enabled",
        True,
        "Determines if upgrades are enabled or disabled by default. Defaults to true.",
    ),
    # Route tables.
    _d(
        f"{ROUTE}.RouteConfiguration",
        "validate_clusters",
        True,
        "This setting defaults to true if the route table is statically defined via the "
        "route_config option. This setting default to false if the route table is loaded "
        "dynamically via the rds option.",
        xds_value=False,
    ),
    _d(
        f"{ROUTE}.RouteConfiguration",
        "max_direct_response_body_size_bytes",
        4096,
        "If not specified the default is 4096.",
    ),
    _d(f"{ROUTE}.RouteMatch", "case_sensitive", True, "The default is true."),
    _d(f"{ROUTE}.RouteAction", "timeout", "15s", "If not specified, the default is 15s."),
    _d(f"{ROUTE}.RouteAction.UpgradeConfig", "enabled", True, "Defaults to ``true``."),
    _d(f"{ROUTE}.RetryPolicy", "num_retries", 1, "This parameter is optional and defaults to 1."),
    _d(
        f"{ROUTE}.RetryPolicy",
        "retry_back_off",
        {"base_interval": "0.025s", "max_interval": "0.250s"},
        "This parameter is optional, in which case the default base interval is 25 "
        "milliseconds … The default maximum interval is 10 times the base interval.",
    ),
    _d(
        f"{ROUTE}.RetryPolicy.RetryBackOff",
        "max_interval",
        "1s",
        "The default is 10 times the ``base_interval``.",
    ),
    _d(
        f"{PROTOCOL}.HeaderValueOption",
        "append",
        True,
        "If true (default), the value is appended to existing values.",
    ),
    # Clusters.
    _d(
        f"{CLUSTER}.Cluster",
        "connect_timeout",
        "5s",
        "If not set, a default value of 5s will be used.",
    ),
    _d(
        f"{CLUSTER}.Cluster",
        "dns_refresh_rate",
        "5s",
        "If this setting is not specified, the value defaults to 5000ms.",
    ),
    _d(_OD, "consecutive_5xx", 5, "Defaults to 5."),
    _d(_OD, "interval", "10s", "Defaults to 10000ms or 10s."),
    _d(_OD, "base_ejection_time", "30s", "Defaults to 30000ms or 30s."),
    _d(_OD, "max_ejection_percent", 10, "Defaults to 10% ."),
    _d(_OD, "enforcing_consecutive_5xx", 100, "Defaults to 100."),
    _d(_OD, "enforcing_success_rate", 100, "Defaults to 100."),
    _d(_OD, "success_rate_minimum_hosts", 5, "Defaults to 5."),
    _d(_OD, "success_rate_request_volume", 100, "Defaults to 100."),
    _d(_OD, "success_rate_stdev_factor", 1900, "Defaults to 1900."),
    _d(_OD, "consecutive_gateway_failure", 5, "Defaults to 5."),
    _d(_OD, "enforcing_consecutive_gateway_failure", 0, "Defaults to 0."),
    _d(_OD, "consecutive_local_origin_failure", 5, "Defaults to 5."),
    _d(_OD, "enforcing_consecutive_local_origin_failure", 100, "Defaults to 100."),
    _d(_OD, "enforcing_local_origin_success_rate", 100, "Defaults to 100."),
    _d(_OD, "failure_percentage_threshold", 85, "Defaults to 85."),
    _d(_OD, "enforcing_failure_percentage", 0, "Defaults to 0."),
    _d(_OD, "enforcing_failure_percentage_local_origin", 0, "Defaults to 0."),
    _d(_OD, "failure_percentage_minimum_hosts", 5, "Defaults to 5."),
    _d(_OD, "failure_percentage_request_volume", 50, "Defaults to 50."),
    _d(
        _OD,
        "max_ejection_time",
        "300s",
        "If not specified, the default value (300000ms or 300s) … is used.",
    ),
    _d(_OD, "max_ejection_time_jitter", "0s", "Defaults to 0s."),
    _d(
        _OD,
        "successful_active_health_check_uneject_host",
        True,
        "… a successful active health check unejects the host by default …",
    ),
    _d(_OD, "always_eject_one_host", False, "Defaults to false."),
    _d(_CB, "max_connections", 1024, "If not specified, the default is 1024."),
    _d(_CB, "max_pending_requests", 1024, "If not specified, the default is 1024."),
    _d(_CB, "max_requests", 1024, "If not specified, the default is 1024."),
    _d(_CB, "max_retries", 3, "If not specified, the default is 3."),
    _d(
        _HC,
        "reuse_connection",
        True,
        "Reuse health check connection between health checks. Default is true.",
    ),
    _d(
        _HC,
        "no_traffic_interval",
        "60s",
        'The default value for "no traffic interval" is 60 seconds.',
    ),
    _d(
        _HC,
        "no_traffic_healthy_interval",
        "60s",
        "If no_traffic_healthy_interval is not set, it will default to the no traffic interval …",
    ),
    _d(
        _HC,
        "unhealthy_interval",
        "2s",
        'The default value for "unhealthy interval" is the same as "interval".',
    ),
    _d(
        _HC,
        "unhealthy_edge_interval",
        "2s",
        'The default value for "unhealthy edge interval" is the same as "unhealthy interval".',
    ),
    _d(
        _HC,
        "healthy_edge_interval",
        "2s",
        'The default value for "healthy edge interval" is the same as the default interval.',
    ),
    # Listeners and TCP proxying.
    _d(
        "envoy.config.listener.v3.Listener",
        "bind_to_port",
        True,
        "Whether the listener should bind to the port. … Default is true.",
    ),
    _d(
        "envoy.config.listener.v3.Listener",
        "listener_filters_timeout",
        "15s",
        "If not specified, a default timeout of 15s is used.",
    ),
]

#: Defaults that are the absence of a feature: no value of the field says the same.
ABSENT: dict[str, str] = {
    "HttpConnectionManager.scheme_header_transformation": (
        "If not set, Envoy's default scheme handling applies."
    ),
    "HttpConnectionManager.internal_address_config": (
        "If unspecified, only RFC1918 IP addresses will be considered internal."
    ),
    "HttpConnectionManager.request_id_extension": (
        "If empty, the UuidRequestIdConfig default extension is used with default parameters."
    ),
    "HttpConnectionManager.local_reply_config": (
        "If not specified, status code and text body are hard coded in Envoy."
    ),
    "HttpProtocolOptions.max_connection_duration": "If not set, there is no max duration.",
    "HttpProtocolOptions.max_stream_duration": "If not specified, this value is not set.",
    "HttpProtocolOptions.max_requests_per_connection": "If not specified, there is no limit.",
    "Http1ProtocolOptions.header_key_format": "By default, all header keys are lower cased.",
    "RouteMatch.runtime_fraction": (
        "If the key is not present, the default value, the router continues."
    ),
    "RouteAction.idle_timeout": "If not specified, there is no per-route idle timeout.",
    "RouteAction.max_grpc_timeout": "If not present, the grpc-timeout header is not used.",
    "RouteAction.max_internal_redirects": (
        "Unset: one internal redirect (the policy's own default)."
    ),
    "RequestMirrorPolicy.runtime_fraction": (
        "If not specified, all requests to the target cluster will be mirrored."
    ),
    "RetryPolicy.per_try_timeout": (
        "If left unspecified, Envoy will use the global route timeout for the request."
    ),
    "RetryPolicy.rate_limited_retry_back_off": (
        "If not configured, the exponential back-off applies."
    ),
    "Cluster.max_requests_per_connection": "If not specified, there is no limit.",
    "Cluster.http2_protocol_options": "Unset: the upstream is HTTP/1.1.",
    "HttpHealthCheck.host": "If left empty (default value), the name of the cluster is used.",
    "Listener.default_filter_chain": (
        "If no default filter chain is supplied, the connection will be closed."
    ),
    "Listener.use_original_dst": "Defaults to false.",
}

#: Supported wrapper and duration fields whose comment documents no default: unset
#: means the feature is off (or the field is required by the schema).
NO_DEFAULT: set[str] = {
    "HttpConnectionManager.use_remote_address",
    "ResponseMapper.status_code",
    "VirtualHost.per_request_buffer_limit_bytes",
    "Route.per_request_buffer_limit_bytes",
    "RouteAction.auto_host_rewrite",
    "RouteAction.grpc_timeout_offset",
    "WeightedCluster.total_weight",
    "ClusterWeight.weight",
    "RequestMirrorPolicy.trace_sampled",
    "RetryPolicy.per_try_idle_timeout",
    "HealthCheck.timeout",
    "HealthCheck.interval",
    "HealthCheck.initial_jitter",
    "HealthCheck.interval_jitter",
    "HealthCheck.unhealthy_threshold",
    "HealthCheck.healthy_threshold",
    "Listener.max_connections_to_accept_per_socket_event",
    "RetryBackOff.base_interval",
}
