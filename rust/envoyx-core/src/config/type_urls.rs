//! The `@type` URLs of the Envoy messages envoyx reads inside `typed_config`s
//! (without `type.googleapis.com/`), in one place for every mapper.

pub const HCM_TYPE: &str =
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
pub const TCP_PROXY_TYPE: &str = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
pub const ROUTER_TYPE: &str = "envoy.extensions.filters.http.router.v3.Router";
pub const TYPED_STRUCT_TYPE: &str = "xds.type.v3.TypedStruct";
pub const UDPA_TYPED_STRUCT_TYPE: &str = "udpa.type.v1.TypedStruct";
pub const FILTER_CONFIG_TYPE: &str = "envoy.config.route.v3.FilterConfig";
/// The TypedStruct `type_url` of a Python HTTP filter.
pub const PYTHON_FILTER_TYPE: &str = "envoyx.filters.http.python";
pub const FILE_LOG_TYPE: &str = "envoy.extensions.access_loggers.file.v3.FileAccessLog";
pub const STDOUT_LOG_TYPE: &str = "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog";
pub const STDERR_LOG_TYPE: &str = "envoy.extensions.access_loggers.stream.v3.StderrAccessLog";
pub const HTTP_GRPC_LOG_TYPE: &str =
    "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig";
pub const OTEL_LOG_TYPE: &str =
    "envoy.extensions.access_loggers.open_telemetry.v3.OpenTelemetryAccessLogConfig";
pub const TCP_GRPC_LOG_TYPE: &str =
    "envoy.extensions.access_loggers.grpc.v3.TcpGrpcAccessLogConfig";
pub const FAULT_TYPE: &str = "envoy.extensions.filters.http.fault.v3.HTTPFault";
pub const CORS_TYPE: &str = "envoy.extensions.filters.http.cors.v3.Cors";
pub const CORS_POLICY_TYPE: &str = "envoy.extensions.filters.http.cors.v3.CorsPolicy";
pub const GRPC_STATS_TYPE: &str = "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig";
