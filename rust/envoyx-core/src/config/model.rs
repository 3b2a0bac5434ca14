//! The core's typed configuration model: what envoyx implements of Envoy's v3 API.
//!
//! Every type here is produced by [`super::bootstrap::map_bootstrap`] from canonical
//! proto-JSON; each field is documented by the Envoy field it comes from.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use regex::Regex;
use serde_json::Value;

#[derive(Debug)]
pub struct Bootstrap {
    /// `node`, echoed in `/server_info` and `/config_dump`.
    pub node: Value,
    /// `admin`.
    pub admin: Option<AdminConfig>,
    /// `static_resources.listeners`.
    pub listeners: Vec<ListenerConfig>,
    /// `static_resources.clusters`.
    pub clusters: Vec<ClusterConfig>,
    /// The whole bootstrap as given, for `/config_dump`.
    pub raw: Value,
}

#[derive(Debug)]
pub struct AdminConfig {
    /// `admin.address.socket_address`.
    pub address: SocketAddr,
    /// `admin.access_log`.
    pub access_logs: Vec<AccessLogConfig>,
}

#[derive(Debug)]
pub struct ListenerConfig {
    /// `name`; Envoy defaults it to a generated UUID, envoyx to the address.
    pub name: String,
    /// `address.socket_address`.
    pub address: SocketAddr,
    /// The terminal network filter of the single `filter_chains[0]`.
    pub filter: NetworkFilter,
    pub raw: Value,
}

#[derive(Debug)]
pub enum NetworkFilter {
    /// `envoy.filters.network.http_connection_manager`.
    Http(HttpConnectionManagerConfig),
    /// `envoy.filters.network.tcp_proxy`.
    Tcp(TcpProxyConfig),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodecType {
    Auto,
    Http1,
    Http2,
}

#[derive(Debug)]
pub struct HttpConnectionManagerConfig {
    /// `stat_prefix`: stats are `http.<stat_prefix>.*`.
    pub stat_prefix: String,
    /// `codec_type` (AUTO detects the HTTP/2 connection preface).
    pub codec: CodecType,
    /// `route_config` (inline) or `rds` (by name, over xDS).
    pub routes: RouteSource,
    /// `access_log`.
    pub access_logs: Vec<AccessLogConfig>,
    /// `server_name` (default `envoy`), written into the `server` response header.
    pub server_name: String,
    /// `generate_request_id` (default true).
    pub generate_request_id: bool,
    /// `use_remote_address` (default false): append the peer to `x-forwarded-for`.
    pub use_remote_address: bool,
    /// `http_filters` before the router: Python filters, in order.
    pub http_filters: Vec<HttpFilterSpec>,
}

/// An `envoyx.filters.http.python` HTTP filter: a TypedStruct's `value`.
#[derive(Debug, Clone)]
pub struct HttpFilterSpec {
    /// The HTTP filter's `name` (the key of `typed_per_filter_config`).
    pub name: String,
    /// The field path of the filter's `value`, for errors found when it is built.
    pub path: String,
    /// `value.module` and `value.class`, or `value.object`.
    pub module: Option<String>,
    pub class: Option<String>,
    pub object: Option<String>,
    /// `value.config` (null when absent).
    pub config: Value,
    pub settings: FilterSettings,
}

/// What each filter's TypedStruct says about how the core runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterSettings {
    /// `timeout`: one hook call may take this long; past it the request gets 504.
    pub timeout: Duration,
    /// `error_status`: the local reply's status when a hook raises.
    pub error_status: u16,
    /// `max_request_bytes`: the buffered request body limit (413 past it).
    pub max_request_bytes: usize,
    /// `max_response_bytes`: the buffered response body limit (500 past it).
    pub max_response_bytes: usize,
}

impl Default for FilterSettings {
    fn default() -> Self {
        FilterSettings {
            timeout: Duration::from_secs(1),
            error_status: 500,
            max_request_bytes: 1 << 20,
            max_response_bytes: 1 << 20,
        }
    }
}

/// A route's `typed_per_filter_config` entry for one filter.
#[derive(Debug, Clone)]
pub enum FilterOverride {
    /// `envoy.config.route.v3.FilterConfig` with `disabled: true`.
    Disabled,
    /// A TypedStruct whose `value.config` replaces the filter's config (JSON text).
    Config(Arc<str>),
}

#[derive(Debug)]
pub enum RouteSource {
    Inline(RouteConfig),
    /// `rds.route_config_name`: the table arrives as a RouteConfiguration resource.
    Rds(String),
}

#[derive(Debug)]
pub struct RouteConfig {
    /// `name`.
    pub name: String,
    /// `virtual_hosts`.
    pub virtual_hosts: Vec<VirtualHostConfig>,
    /// `validate_clusters`: refuse routes naming unknown clusters. Envoy's default
    /// is on for static route configurations and off for RDS.
    pub validate_clusters: Option<bool>,
    pub raw: Value,
}

#[derive(Debug)]
pub struct VirtualHostConfig {
    pub name: String,
    /// `domains`: exact, `*.suffix`, `prefix.*` or `*`, lower-cased.
    pub domains: Vec<String>,
    pub routes: Vec<RouteEntry>,
}

#[derive(Debug)]
pub struct RouteEntry {
    pub name: String,
    pub path_match: PathMatch,
    /// `match.case_sensitive` (default true; regexes are not affected, as in Envoy).
    pub case_sensitive: bool,
    pub action: RouteAction,
    /// `typed_per_filter_config` of the route, over its virtual host's, by filter name.
    pub filter_overrides: Vec<(String, FilterOverride)>,
}

#[derive(Debug)]
pub enum PathMatch {
    /// `match.prefix`.
    Prefix(String),
    /// `match.path`: the whole path without the query string.
    Path(String),
    /// `match.safe_regex.regex`, anchored: it must match the whole path without query.
    Regex(Regex),
}

#[derive(Debug)]
pub enum RouteAction {
    /// `route`.
    Forward(ForwardAction),
    /// `direct_response`.
    Direct { status: u16, body: Option<String> },
}

#[derive(Debug)]
pub struct ForwardAction {
    /// `route.cluster`.
    pub cluster: String,
    /// The index of `cluster` among the cluster names of the compiled route table
    /// ([`crate::router::RouteTable::cluster_names`]), set when it is compiled, so
    /// that a request finds its cluster without hashing the name.
    pub cluster_slot: usize,
    /// `route.timeout` (default 15 s; zero disables).
    pub timeout: Option<Duration>,
    /// `x-envoy-expected-rq-timeout-ms` for `timeout`, made once here rather than
    /// formatted for every request.
    pub expected_timeout: Option<http::HeaderValue>,
    /// `route.prefix_rewrite`.
    pub prefix_rewrite: Option<String>,
    /// `route.host_rewrite_literal`.
    pub host_rewrite: Option<String>,
}

#[derive(Debug)]
pub struct TcpProxyConfig {
    /// `stat_prefix`: stats are `tcp.<stat_prefix>.*`.
    pub stat_prefix: String,
    /// `cluster`.
    pub cluster: String,
    pub access_logs: Vec<AccessLogConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoveryType {
    Static,
    StrictDns,
    LogicalDns,
    /// Endpoints arrive as ClusterLoadAssignment resources for `service_name`.
    Eds,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsLookupFamily {
    /// Envoy's AUTO: IPv6 first, IPv4 if there is none.
    Auto,
    V4Only,
    V6Only,
    V4Preferred,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    /// `ROUND_ROBIN`, per worker.
    RoundRobin,
    /// `LEAST_REQUEST`: the less loaded of two random hosts (Envoy's default
    /// `choice_count` of 2), by active requests.
    LeastRequest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
}

#[derive(Debug)]
pub struct ClusterConfig {
    pub name: String,
    /// `type`.
    pub discovery: DiscoveryType,
    /// `connect_timeout` (default 5 s).
    pub connect_timeout: Duration,
    /// `load_assignment.endpoints[*].lb_endpoints[*].endpoint.address.socket_address`.
    pub endpoints: Vec<EndpointConfig>,
    /// HTTP/2 when `typed_extension_protocol_options` or `http2_protocol_options` ask.
    pub protocol: UpstreamProtocol,
    /// `dns_refresh_rate` (default 5 s).
    pub dns_refresh_rate: Duration,
    pub dns_lookup_family: DnsLookupFamily,
    /// `lb_policy`.
    pub lb_policy: LbPolicy,
    /// `eds_cluster_config.service_name` (default: the cluster's name) for EDS.
    pub eds_service_name: Option<String>,
    /// `common_http_protocol_options` of the cluster's HTTP protocol options.
    pub pool: PoolSettings,
    pub raw: Value,
}

/// How long and how much an upstream connection may be used
/// (`HttpProtocolOptions.common_http_protocol_options`, Envoy's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// `idle_timeout`: a connection with no request for this long is closed
    /// (default 1 h; `0s` disables it).
    pub idle_timeout: Option<Duration>,
    /// `max_requests_per_connection`: after this many requests a connection is
    /// not reused (unset or 0: unlimited).
    pub max_requests_per_connection: Option<u32>,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            idle_timeout: Some(Duration::from_secs(3600)),
            max_requests_per_connection: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// An IP literal for STATIC clusters, a host name for DNS clusters.
    pub address: String,
    pub port: u16,
}

#[derive(Debug, Clone)]
pub enum AccessLogSink {
    File(String),
    Stdout,
    Stderr,
}

#[derive(Debug, Clone)]
pub enum AccessLogFormat {
    /// A text format string with command operators.
    Text(String),
    /// `json_format`: keys to format strings.
    Json(Vec<(String, String)>),
}

#[derive(Debug, Clone)]
pub struct AccessLogConfig {
    pub sink: AccessLogSink,
    pub format: AccessLogFormat,
}
