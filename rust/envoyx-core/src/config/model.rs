//! The core's typed configuration model: what envoyx implements of Envoy's v3 API.
//!
//! Every type here is produced by [`super::bootstrap::map_bootstrap`] from canonical
//! proto-JSON; each field is documented by the Envoy field it comes from.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
    /// `layered_runtime`: the static layers' values.
    pub runtime: crate::runtime::Runtime,
    /// `cluster_manager.outlier_detection.event_log_path`.
    pub outlier_event_log_path: Option<String>,
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
    /// `listener_filters`, in order; `use_original_dst` adds an `original_dst`
    /// filter after them, as Envoy does.
    pub listener_filters: Vec<ListenerFilterConfig>,
    /// `use_original_dst`: a connection whose original destination the
    /// `original_dst` filter restored is handed to the listener on that address
    /// (Envoy's `hand_off_restored_destination_connections`).
    pub use_original_dst: bool,
    /// `bind_to_port` (default true): false makes a listener that only takes
    /// connections handed off by a `use_original_dst` listener.
    pub bind_to_port: bool,
    /// `listener_filters_timeout` (default 15 s; zero disables it).
    pub listener_filters_timeout: Option<Duration>,
    /// `continue_on_listener_filters_timeout` (default false: the connection closes).
    pub continue_on_listener_filters_timeout: bool,
    /// `max_connections_to_accept_per_socket_event` (None: as many as are pending).
    pub max_accepts_per_wakeup: Option<u32>,
    pub raw: Value,
}

impl ListenerConfig {
    /// Every filter chain, the default one last.
    pub fn chains(&self) -> impl Iterator<Item = &FilterChainConfig> {
        self.filter_chains.iter().chain(&self.default_filter_chain)
    }
}

/// A listener filter and when it is skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerFilterConfig {
    pub kind: ListenerFilterKind,
    /// `filter_disabled`: the filter does not run on a connection this matches.
    pub disabled: Option<ListenerFilterPredicate>,
}

/// `envoy.config.listener.v3.ListenerFilterChainMatchPredicate` (Envoy's
/// `ListenerFilterMatcher`s), evaluated on the connection's local address as the
/// listener filters before have left it (restored by `original_dst`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerFilterPredicate {
    /// `any_match`.
    Any,
    /// `not_match`.
    Not(Box<ListenerFilterPredicate>),
    /// `and_match.rules`: all of them (none: true).
    And(Vec<ListenerFilterPredicate>),
    /// `or_match.rules`: any of them (none: false).
    Or(Vec<ListenerFilterPredicate>),
    /// `destination_port_range`: `start <= port < end`.
    DestinationPortRange { start: u32, end: u32 },
}

impl ListenerFilterPredicate {
    pub fn matches(&self, local: std::net::SocketAddr) -> bool {
        match self {
            Self::Any => true,
            Self::Not(p) => !p.matches(local),
            Self::And(ps) => ps.iter().all(|p| p.matches(local)),
            Self::Or(ps) => ps.iter().any(|p| p.matches(local)),
            Self::DestinationPortRange { start, end } => {
                let port = u32::from(local.port());
                *start <= port && port < *end
            }
        }
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
    /// `envoy.filters.listener.original_dst`: the connection's local address is
    /// restored to its original destination (Linux `SO_ORIGINAL_DST`), which an
    /// `ORIGINAL_DST` cluster then connects to.
    OriginalDst,
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

pub use super::matcher::CidrRange;

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

// Built once per filter chain when configuration is applied; its size does not matter.
#[allow(clippy::large_enum_variant)]
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
    /// `xff_num_trusted_hops` (default 0).
    pub xff_num_trusted_hops: u32,
    /// `strip_matching_host_port` / `strip_any_host_port`.
    pub strip_host_port: super::route_match::StripHostPort,
    /// `internal_address_config.cidr_ranges`: the addresses whose requests are
    /// internal. Unset, no address is (Envoy 1.40's default).
    pub internal_cidrs: Vec<CidrRange>,
    /// `forward_client_cert_details` (default SANITIZE).
    pub forward_client_cert: ForwardClientCert,
    /// `set_current_client_cert_details`.
    pub client_cert_details: ClientCertDetails,
    /// `http_filters` before the router: Python filters, in order.
    pub http_filters: Vec<HttpFilterSpec>,
    /// `http_filters` implemented in Rust (gRPC stats, fault, CORS), in order; they
    /// run before the Python filters (boxed, as `limits`).
    pub native_filters: Box<super::native_filters::NativeFilterSpecs>,
    /// The connection manager's timeouts and per-connection limits (boxed: the
    /// network filter enum stays small).
    pub limits: Box<HcmLimits>,
    /// Header edits and request-id options (boxed, as `limits`).
    pub options: Box<HcmOptions>,
    /// `upgrade_configs`: the upgrade types (WebSocket, CONNECT…) it allows.
    pub upgrades: super::upgrade::HcmUpgrades,
}

/// What the connection manager writes into requests and responses beyond its
/// defaults (Envoy's fields of the same names).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HcmOptions {
    /// `local_reply_config`, compiled.
    pub local_reply: Option<super::local_reply::LocalReplyConfig>,
    /// `skip_xff_append`: at the edge, `x-forwarded-for` is left as it came.
    pub skip_xff_append: bool,
    /// `via`: appended to the request's and the response's `via`.
    pub via: Option<String>,
    /// `server_header_transformation` (default OVERWRITE).
    pub server_header: ServerHeaderTransformation,
    /// `scheme_header_transformation.scheme_to_overwrite` (`http` or `https`).
    pub scheme_to_overwrite: Option<String>,
    /// `preserve_external_request_id`: an edge request keeps its `x-request-id`.
    pub preserve_external_request_id: bool,
    /// `always_set_request_id_in_response`.
    pub always_set_request_id_in_response: bool,
    /// `http_protocol_options.default_host_for_http_10`.
    pub default_host_for_http_10: Option<String>,
    /// `normalize_path` (default false).
    pub normalize_path: bool,
    /// `merge_slashes` (default false).
    pub merge_slashes: bool,
    /// `path_with_escaped_slashes_action` (default: KEEP_UNCHANGED).
    pub escaped_slashes: EscapedSlashesAction,
}

/// `HttpConnectionManager.PathWithEscapedSlashesAction`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EscapedSlashesAction {
    /// Also IMPLEMENTATION_SPECIFIC_DEFAULT, as Envoy's default runtime has it.
    #[default]
    KeepUnchanged,
    RejectRequest,
    UnescapeAndRedirect,
    UnescapeAndForward,
}

/// `HttpConnectionManager.ServerHeaderTransformation`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ServerHeaderTransformation {
    /// `server` is `server_name`, whatever the upstream sent.
    #[default]
    Overwrite,
    /// `server_name` only where the response has no `server`.
    AppendIfAbsent,
    /// The response's own `server` (none on local replies).
    PassThrough,
}

/// The connection manager's timers and limits, with Envoy's defaults. A zero
/// duration disables a timer (None).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HcmLimits {
    /// `stream_idle_timeout` (default 5 min): a stream with no activity either
    /// way for this long gets 408 (504 once the request is whole), or is reset
    /// once its response started.
    pub stream_idle_timeout: Option<Duration>,
    /// `request_timeout` (default off): the whole request must arrive in time.
    pub request_timeout: Option<Duration>,
    /// `request_headers_timeout` (default off): the request head must arrive in time.
    pub request_headers_timeout: Option<Duration>,
    /// `common_http_protocol_options.idle_timeout` (default 1 h): a connection
    /// without streams for this long drains.
    pub idle_timeout: Option<Duration>,
    /// `common_http_protocol_options.max_connection_duration` (default off).
    pub max_connection_duration: Option<Duration>,
    /// `common_http_protocol_options.max_requests_per_connection` (default off).
    pub max_requests_per_connection: Option<u32>,
    /// `common_http_protocol_options.max_stream_duration` (default off).
    pub max_stream_duration: Option<Duration>,
    /// `common_http_protocol_options.headers_with_underscores_action`.
    pub headers_with_underscores: UnderscoresAction,
    /// `common_http_protocol_options.max_headers_count` (default 100).
    pub max_headers_count: usize,
    /// `max_request_headers_kb` in bytes (default 60 KiB).
    pub max_request_headers_bytes: usize,
    /// `http_protocol_options.accept_http_10` (default false: 426).
    pub accept_http_10: bool,
    /// `http_protocol_options.allow_chunked_length` (default false: a request
    /// with both framings is a 400).
    pub allow_chunked_length: bool,
    /// `proxy_100_continue`: an HTTP/1.1 request's `Expect: 100-continue` goes
    /// upstream and the upstream's `100 Continue` comes back, instead of envoyx
    /// answering it.
    pub proxy_100_continue: bool,
    /// `http_protocol_options.header_key_format`: how response header names are
    /// written, and whether the case of request header names is kept.
    pub header_key_format: super::HeaderKeyFormat,
    /// `http2_protocol_options`: what the HTTP/2 codec advertises, Envoy's
    /// defaults when unset (1024 streams, 16 MiB per stream, 24 MiB per connection).
    pub h2_max_concurrent_streams: u32,
    pub h2_initial_stream_window_size: u32,
    pub h2_initial_connection_window_size: u32,
    /// `http2_protocol_options.allow_connect`: advertise extended CONNECT
    /// (RFC 8441, WebSocket over HTTP/2).
    pub h2_allow_connect: bool,
    /// `drain_timeout` (default 5 s): between a drain's start and the close.
    pub drain_timeout: Duration,
    /// `delayed_close_timeout` (default 1 s): after a close envoyx decided, how
    /// long the peer has to close first.
    pub delayed_close_timeout: Option<Duration>,
}

impl Default for HcmLimits {
    fn default() -> Self {
        HcmLimits {
            stream_idle_timeout: Some(Duration::from_secs(300)),
            request_timeout: None,
            request_headers_timeout: None,
            idle_timeout: Some(Duration::from_secs(3600)),
            max_connection_duration: None,
            max_requests_per_connection: None,
            max_stream_duration: None,
            headers_with_underscores: UnderscoresAction::Allow,
            max_headers_count: 100,
            max_request_headers_bytes: 60 * 1024,
            accept_http_10: false,
            allow_chunked_length: false,
            proxy_100_continue: false,
            header_key_format: super::HeaderKeyFormat::Default,
            h2_max_concurrent_streams: 1024,
            h2_initial_stream_window_size: 16 * 1024 * 1024,
            h2_initial_connection_window_size: 24 * 1024 * 1024,
            h2_allow_connect: false,
            drain_timeout: Duration::from_secs(5),
            delayed_close_timeout: Some(Duration::from_secs(1)),
        }
    }
}

/// `HttpProtocolOptions.HeadersWithUnderscoresAction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnderscoresAction {
    Allow,
    /// 400 (HTTP/1) and `requests_rejected_with_underscores_in_headers`.
    RejectRequest,
    /// The header is removed and `dropped_headers_with_underscores` counted.
    DropHeader,
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

#[derive(Debug)]
pub enum RouteSource {
    Inline(super::route::RouteConfig),
    /// `rds.route_config_name`: the table arrives as a RouteConfiguration resource.
    Rds(String),
    /// `scoped_routes`: a route table per scope, chosen by the request's headers.
    Scoped(Box<super::scoped_route::ScopedRoutesConfig>),
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
    /// `ORIGINAL_DST`: a host per original destination, made on demand
    /// ([`OriginalDstConfig`]).
    OriginalDst,
}

/// An `ORIGINAL_DST` cluster's `original_dst_lb_config` and `cleanup_interval`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginalDstConfig {
    /// `use_http_header`: the destination is this request header's `ip:port`
    /// (`http_header_name`, default `x-envoy-original-dst-host`).
    pub http_header_name: Option<http::HeaderName>,
    /// `upstream_port_override`: the destination's port is replaced by this one.
    pub upstream_port_override: Option<u16>,
    /// `cleanup_interval` (default 5 s): a host not picked for that long leaves.
    pub cleanup_interval: Duration,
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

/// A cluster's load-balancing policy (`lb_policy` with its `*_lb_config`, or the
/// typed `load_balancing_policy`), with Envoy's defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LbPolicy {
    /// `ROUND_ROBIN`: weighted by Envoy's EDF scheduler when weights differ.
    RoundRobin,
    /// `LEAST_REQUEST`: the least busy of `choice_count` random hosts when weights
    /// are equal, else EDF on `weight / (active_requests + 1)^active_request_bias`.
    LeastRequest {
        choice_count: u32,
        active_request_bias: f64,
    },
    /// `RANDOM`: uniform over the hosts (Envoy ignores host weights here too).
    Random,
    /// `RING_HASH` (`ring_hash_lb_config`, xxHash64).
    RingHash {
        minimum_ring_size: u64,
        maximum_ring_size: u64,
    },
    /// `MAGLEV` (`maglev_lb_config.table_size`, a prime).
    Maglev { table_size: u64 },
}

/// `lb_policy` and `common_lb_config`: how a cluster's hosts are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LbConfig {
    pub policy: LbPolicy,
    /// `common_lb_config.healthy_panic_threshold`, rounded percent (default 50):
    /// below it a priority uses all its hosts, healthy or not.
    pub healthy_panic_threshold: u32,
    /// `common_lb_config.locality_weighted_lb_config` (or the typed policy's):
    /// localities are chosen by their `load_balancing_weight`.
    pub locality_weighted: bool,
    /// `common_lb_config.close_connections_on_host_set_change`.
    pub close_connections_on_host_set_change: bool,
}

impl Default for LbConfig {
    fn default() -> Self {
        LbConfig {
            policy: LbPolicy::RoundRobin,
            healthy_panic_threshold: 50,
            locality_weighted: false,
            close_connections_on_host_set_change: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
    /// `auto_config`: HTTP/2 when the upstream's TLS handshake negotiates `h2` by
    /// ALPN, else HTTP/1.1.
    Auto,
    /// `use_downstream_protocol_config`: each request goes out in its downstream
    /// connection's protocol (HTTP/2 for HTTP/2, HTTP/1.1 for HTTP/1.x).
    Downstream,
}

impl UpstreamProtocol {
    /// HTTP/2 or not for a request that came in as `downstream`; None when ALPN
    /// is to tell (`auto_config`).
    pub fn http2_for(self, downstream: http::Version) -> Option<bool> {
        match self {
            UpstreamProtocol::Http1 => Some(false),
            UpstreamProtocol::Http2 => Some(true),
            UpstreamProtocol::Auto => None,
            UpstreamProtocol::Downstream => Some(downstream == http::Version::HTTP_2),
        }
    }
}

/// A cluster's `upstream_bind_config`: the local address its connections bind to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamBindConfig {
    /// `source_address` (port 0: any).
    pub source: std::net::SocketAddr,
    /// `freebind`: IP_FREEBIND, binding to an address the host does not have.
    pub freebind: bool,
}

#[derive(Debug)]
pub struct ClusterConfig {
    pub name: String,
    /// `alt_stat_name`, else the name: the cluster's name in stats and access logs
    /// (Envoy's observability name).
    pub stat_name: String,
    /// `metadata` (`%CLUSTER_METADATA%`).
    pub metadata: Option<Arc<super::metadata::Metadata>>,
    /// `type`.
    pub discovery: DiscoveryType,
    /// `connect_timeout` (default 5 s).
    pub connect_timeout: Duration,
    /// `load_assignment.endpoints[*].lb_endpoints[*].endpoint.address.socket_address`.
    pub endpoints: Vec<EndpointConfig>,
    /// HTTP/2 when `typed_extension_protocol_options` or `http2_protocol_options` ask.
    pub protocol: UpstreamProtocol,
    /// `upstream_bind_config`.
    pub upstream_bind: Option<UpstreamBindConfig>,
    /// `dns_refresh_rate` (default 5 s).
    pub dns_refresh_rate: Duration,
    pub dns_lookup_family: DnsLookupFamily,
    /// `lb_policy`, `load_balancing_policy`, `common_lb_config`.
    pub lb: LbConfig,
    /// `load_assignment.policy.overprovisioning_factor` (default 140).
    pub overprovisioning_factor: u32,
    /// `eds_cluster_config.service_name` (default: the cluster's name) for EDS.
    pub eds_service_name: Option<String>,
    /// `common_http_protocol_options` of the cluster's HTTP protocol options.
    pub pool: PoolSettings,
    /// `transport_socket`: TLS to the upstream hosts.
    pub tls: Option<UpstreamTlsConfig>,
    /// `health_checks` (see `config::health_check`).
    pub health_checks: Vec<super::HealthCheckConfig>,
    /// `outlier_detection`.
    pub outlier_detection: Option<super::OutlierConfig>,
    /// `ignore_health_on_host_removal`: a host DNS/EDS removed leaves at once even
    /// while it passes its health checks.
    pub ignore_health_on_host_removal: bool,
    /// `circuit_breakers`.
    pub circuit_breakers: super::circuit_breakers::CircuitBreakers,
    /// `ORIGINAL_DST` clusters' settings.
    pub original_dst: Option<OriginalDstConfig>,
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
    /// `http_protocol_options.header_key_format` (HTTP/1.1): how request header
    /// names are written, and whether the case of response header names is kept.
    pub header_key_format: super::HeaderKeyFormat,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            idle_timeout: Some(Duration::from_secs(3600)),
            max_requests_per_connection: None,
            header_key_format: super::HeaderKeyFormat::Default,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EndpointConfig {
    /// An IP literal for STATIC clusters, a host name for DNS clusters.
    pub address: String,
    pub port: u16,
    /// `lb_endpoints[].load_balancing_weight` (default 1).
    pub weight: u32,
    /// The locality's `priority` (0 is the highest).
    pub priority: u32,
    /// The locality's `locality` (for `/clusters` and locality weighting).
    pub locality: Option<Arc<Locality>>,
    /// The locality's `load_balancing_weight` (0: unset).
    pub locality_weight: u32,
    /// `lb_endpoints[].health_status`.
    pub health: EdsHealth,
    /// `lb_endpoints[].metadata` (`%UPSTREAM_METADATA%`).
    pub metadata: Option<Arc<super::metadata::Metadata>>,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig {
            address: String::new(),
            port: 0,
            weight: 1,
            priority: 0,
            locality: None,
            locality_weight: 0,
            health: EdsHealth::Healthy,
            metadata: None,
        }
    }
}

/// `envoy.config.core.v3.Locality`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub sub_zone: String,
}

/// `envoy.config.core.v3.HealthStatus` as EDS reports it, by its effect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EdsHealth {
    /// `UNKNOWN` or `HEALTHY`.
    #[default]
    Healthy,
    /// `UNHEALTHY` or `TIMEOUT`: `FAILED_EDS_HEALTH`.
    Unhealthy,
    /// `DRAINING`: `EDS_STATUS_DRAINING`.
    Draining,
    /// `DEGRADED`: `DEGRADED_EDS_HEALTH`.
    Degraded,
}

/// A `ClusterLoadAssignment`'s endpoints and policy.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadAssignment {
    pub endpoints: Vec<EndpointConfig>,
    /// `policy.overprovisioning_factor` (default 140).
    pub overprovisioning_factor: u32,
}

/// Envoy's default `overprovisioning_factor`: a priority with 72% healthy hosts
/// still takes all its load.
pub const DEFAULT_OVERPROVISIONING_FACTOR: u32 = 140;

#[derive(Debug, Clone)]
pub enum AccessLogSink {
    File(String),
    Stdout,
    Stderr,
    /// `envoy.access_loggers.http_grpc` / `tcp_grpc`: entries streamed to an
    /// access log service (the format is not used).
    Grpc(std::sync::Arc<GrpcAccessLogConfig>),
}

/// Which entries a gRPC access logger sends (`HTTPAccessLogEntry` or
/// `TCPAccessLogEntry`), as Envoy's `GrpcAccessLoggerType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcLogKind {
    Http,
    Tcp,
    /// `envoy.access_loggers.open_telemetry`: OTLP `LogsService/Export`.
    OpenTelemetry,
}

/// What `OpenTelemetryAccessLogConfig` adds to the common config.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OtelLogConfig {
    /// `body.string_value`: a format string (None: no body).
    pub body: Option<String>,
    /// `attributes.values`: keys and format strings of `string_value`s.
    pub attributes: Vec<(String, String)>,
    /// `resource_attributes.values`: keys and plain `string_value`s.
    pub resource_attributes: Vec<(String, String)>,
    /// `disable_builtin_labels`: no `log_name`, `zone_name`, `cluster_name`,
    /// `node_name` resource attributes.
    pub disable_builtin_labels: bool,
}

/// `HttpGrpcAccessLogConfig` / `TcpGrpcAccessLogConfig` and their `common_config`.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpcAccessLogConfig {
    pub kind: GrpcLogKind,
    /// `common_config.log_name`: sent in the stream's identifier.
    pub log_name: String,
    /// `common_config.grpc_service.envoy_grpc.cluster_name`.
    pub cluster: String,
    /// `common_config.buffer_size_bytes` (Envoy's default 16384; 0: every entry
    /// is sent at once).
    pub buffer_size_bytes: u32,
    /// `common_config.buffer_flush_interval` (Envoy's default 1 s).
    pub buffer_flush_interval: std::time::Duration,
    /// `additional_request_headers_to_log` / `additional_response_headers_to_log`,
    /// lower-cased (pseudo-headers such as `:method` included).
    pub request_headers: Vec<String>,
    pub response_headers: Vec<String>,
    /// The OpenTelemetry logger's own fields.
    pub otel: Option<OtelLogConfig>,
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
