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
    /// `static_resources.secrets`: name, secret, the resource as given.
    pub secrets: Vec<(String, SecretConfig, Value)>,
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
    /// `filter_chains`, in order.
    pub filter_chains: Vec<FilterChainConfig>,
    /// `default_filter_chain`: used when no chain matches.
    pub default_filter_chain: Option<FilterChainConfig>,
    /// `listener_filters`, in order.
    pub listener_filters: Vec<ListenerFilterKind>,
    /// `listener_filters_timeout` (default 15 s; zero disables it).
    pub listener_filters_timeout: Option<Duration>,
    /// `continue_on_listener_filters_timeout` (default false: the connection closes).
    pub continue_on_listener_filters_timeout: bool,
    pub raw: Value,
}

impl ListenerConfig {
    /// Every filter chain, the default one last.
    pub fn chains(&self) -> impl Iterator<Item = &FilterChainConfig> {
        self.filter_chains.iter().chain(&self.default_filter_chain)
    }
}

/// A listener filter: what it reads of a new connection before a chain is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerFilterKind {
    /// `envoy.filters.listener.tls_inspector`: TLS or not, SNI and ALPN from the
    /// ClientHello.
    TlsInspector,
    /// `envoy.filters.listener.http_inspector`: `http/1.0`, `http/1.1` or `h2c`
    /// as the application protocol of a plaintext connection.
    HttpInspector,
}

#[derive(Debug)]
pub struct FilterChainConfig {
    /// `name` (Envoy's stat and drain key).
    pub name: String,
    /// `filter_chain_match`.
    pub matcher: FilterChainMatch,
    /// `transport_socket`: TLS (`envoy.transport_sockets.tls`) or none (raw_buffer).
    pub tls: Option<DownstreamTlsConfig>,
    /// `transport_socket_connect_timeout`: the TLS handshake's deadline.
    pub handshake_timeout: Option<Duration>,
    /// The terminal network filter.
    pub filter: NetworkFilter,
    /// The chain as given: an LDS update keeps the connections of unchanged chains.
    pub raw: Value,
}

/// `envoy.config.listener.v3.FilterChainMatch`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FilterChainMatch {
    pub destination_port: Option<u16>,
    /// `prefix_ranges`: the destination (local) address.
    pub prefix_ranges: Vec<CidrRange>,
    pub direct_source_prefix_ranges: Vec<CidrRange>,
    pub source_type: SourceType,
    pub source_prefix_ranges: Vec<CidrRange>,
    pub source_ports: Vec<u16>,
    /// `server_names`, lower-cased: exact names and `*.suffix` wildcards.
    pub server_names: Vec<String>,
    /// `transport_protocol`: `tls` or `raw_buffer` (empty: any).
    pub transport_protocol: Option<String>,
    pub application_protocols: Vec<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum SourceType {
    #[default]
    Any,
    SameIpOrLoopback,
    External,
}

/// `envoy.config.core.v3.CidrRange`, with the address masked to its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CidrRange {
    pub address: std::net::IpAddr,
    pub prefix_len: u8,
}

impl CidrRange {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.address, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let bits = u32::from(ip) ^ u32::from(net);
                self.prefix_len == 0 || bits >> (32 - u32::from(self.prefix_len.min(32))) == 0
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let bits = u128::from(ip) ^ u128::from(net);
                self.prefix_len == 0 || bits >> (128 - u32::from(self.prefix_len.min(128))) == 0
            }
            _ => false,
        }
    }
}

// -- TLS -----------------------------------------------------------------------------

/// A certificate chain and its private key (`TlsCertificate`), read from files or
/// inline data when the configuration is mapped, as Envoy does.
#[derive(Debug, Clone)]
pub struct TlsCertificate {
    pub chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    pub key: Arc<rustls_pki_types::PrivateKeyDer<'static>>,
    /// Where it was configured, for errors found when the TLS context is built.
    pub path: String,
    /// The file it was read from, or `<inline>` (admin `/certs`).
    pub source: String,
}

/// `CertificateValidationContext`.
#[derive(Debug, Clone, Default)]
pub struct ValidationConfig {
    /// `trusted_ca` (empty: the peer's certificate is not chain-verified).
    pub trusted_ca: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// `crl`.
    pub crls: Vec<rustls_pki_types::CertificateRevocationListDer<'static>>,
    /// `match_typed_subject_alt_names`: the peer's certificate must have a SAN
    /// matching one of them (none: any).
    pub san_matchers: Vec<SanMatcher>,
    pub path: String,
    /// The file `trusted_ca` was read from, or `<inline>` (admin `/certs`).
    pub ca_source: String,
    /// `custom_validator_config` `envoy.tls.cert_validator.spiffe`: the peer is
    /// verified against its trust domain's bundle instead of `trusted_ca`.
    pub spiffe: Option<SpiffeConfig>,
}

/// `SPIFFECertValidatorConfig`: a bundle of CAs (and CRLs) per trust domain.
#[derive(Debug, Clone, Default)]
pub struct SpiffeConfig {
    pub trust_domains: Vec<SpiffeTrustDomain>,
}

#[derive(Debug, Clone)]
pub struct SpiffeTrustDomain {
    /// `name`: `example.org` for `spiffe://example.org/...`.
    pub name: String,
    pub cas: Vec<rustls_pki_types::CertificateDer<'static>>,
    pub crls: Vec<rustls_pki_types::CertificateRevocationListDer<'static>>,
    /// The file `trust_bundle` was read from, or `<inline>` (admin `/certs`).
    pub source: String,
}

#[derive(Debug, Clone)]
pub struct SanMatcher {
    pub kind: SanType,
    pub matcher: super::matcher::StringMatcher,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SanType {
    Dns,
    Uri,
    IpAddress,
    Email,
}

/// A certificate or validation context named by SDS: `name`, and whether it comes
/// over xDS (`sds_config` set) or from the bootstrap's `static_resources.secrets`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    pub name: String,
    pub dynamic: bool,
}

/// `envoy.extensions.transport_sockets.tls.v3.Secret`.
#[derive(Debug, Clone)]
pub enum SecretConfig {
    TlsCertificate(TlsCertificate),
    ValidationContext(ValidationConfig),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

/// `CommonTlsContext`.
#[derive(Debug, Clone, Default)]
pub struct CommonTlsConfig {
    /// `tls_certificates`.
    pub certificates: Vec<TlsCertificate>,
    /// `tls_certificate_sds_secret_configs`.
    pub certificate_secrets: Vec<SecretRef>,
    /// `validation_context`, or `combined_validation_context.default_validation_context`.
    pub validation: Option<ValidationConfig>,
    /// `validation_context_sds_secret_config` (or the combined context's): its
    /// trusted CA and CRL join `validation`'s matchers.
    pub validation_secret: Option<SecretRef>,
    /// `tls_params.tls_minimum_protocol_version` / `tls_maximum_protocol_version`.
    pub min_version: Option<TlsVersion>,
    pub max_version: Option<TlsVersion>,
    /// `tls_params.cipher_suites`: OpenSSL names, checked when mapped.
    pub cipher_suites: Vec<String>,
    /// `tls_params.ecdh_curves`.
    pub ecdh_curves: Vec<String>,
    /// `alpn_protocols`.
    pub alpn: Vec<String>,
}

impl CommonTlsConfig {
    /// The SDS secrets this context names.
    pub fn secrets(&self) -> impl Iterator<Item = &SecretRef> {
        self.certificate_secrets
            .iter()
            .chain(&self.validation_secret)
    }
}

/// `DownstreamTlsContext`.
#[derive(Debug, Clone, Default)]
pub struct DownstreamTlsConfig {
    pub common: CommonTlsConfig,
    /// `require_client_certificate`.
    pub require_client_certificate: bool,
    /// `disable_stateless_session_resumption`: no session tickets.
    pub disable_tickets: bool,
    /// `disable_stateful_session_resumption`: no session-ID cache.
    pub disable_session_cache: bool,
    pub path: String,
}

/// `UpstreamTlsContext`, with the cluster's `upstream_http_protocol_options`.
#[derive(Debug, Clone, Default)]
pub struct UpstreamTlsConfig {
    pub common: CommonTlsConfig,
    /// `sni`.
    pub sni: Option<String>,
    /// `auto_sni`: the SNI is the request's host (without port).
    pub auto_sni: bool,
    /// `auto_san_validation`: the upstream certificate must be valid for that host.
    pub auto_san_validation: bool,
    pub path: String,
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
    /// `forward_client_cert_details` (default SANITIZE).
    pub forward_client_cert: ForwardClientCert,
    /// `set_current_client_cert_details`.
    pub client_cert_details: ClientCertDetails,
    /// `http_filters` before the router: Python filters, in order.
    pub http_filters: Vec<HttpFilterSpec>,
}

/// What happens to `x-forwarded-client-cert` (Envoy's `ForwardClientCertDetails`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ForwardClientCert {
    /// Removed.
    #[default]
    Sanitize,
    /// Forwarded as received when the connection is mutual TLS, else removed.
    ForwardOnly,
    /// The client's details appended (mutual TLS), else removed.
    AppendForward,
    /// Replaced by the client's details (mutual TLS), else removed.
    SanitizeSet,
    /// Always forwarded as received.
    AlwaysForwardOnly,
}

/// `set_current_client_cert_details`: which details go into the header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientCertDetails {
    pub subject: bool,
    pub cert: bool,
    pub chain: bool,
    pub dns: bool,
    pub uri: bool,
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
    /// `auto_config`: HTTP/2 when the upstream's TLS handshake negotiates `h2` by
    /// ALPN, else HTTP/1.1.
    Auto,
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
    /// `transport_socket`: TLS to the upstream hosts.
    pub tls: Option<UpstreamTlsConfig>,
    /// `circuit_breakers`.
    pub circuit_breakers: super::circuit_breakers::CircuitBreakers,
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
