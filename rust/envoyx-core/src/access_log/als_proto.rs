//! The subset of `envoy.service.accesslog.v3` / `envoy.data.accesslog.v3` (and the
//! core and well-known types they use) that envoyx's gRPC access loggers send,
//! written as prost messages with Envoy's field numbers (no protoc, no generated
//! code). Fields envoyx never fills are left out: an absent field and an unset
//! one are the same on the wire.

use std::collections::BTreeMap;

/// `envoy.service.accesslog.v3.StreamAccessLogsMessage`. The logger encodes it
/// field by field from its batch (`grpc::encode`); the struct is the unit tests'
/// decoder.
#[cfg(test)]
#[derive(Clone, PartialEq, prost::Message)]
pub struct StreamAccessLogsMessage {
    #[prost(message, optional, tag = "1")]
    pub identifier: Option<Identifier>,
    #[prost(oneof = "LogEntries", tags = "2, 3")]
    pub log_entries: Option<LogEntries>,
}

#[cfg(test)]
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum LogEntries {
    #[prost(message, tag = "2")]
    HttpLogs(HttpAccessLogEntries),
    #[prost(message, tag = "3")]
    TcpLogs(TcpAccessLogEntries),
}

/// `StreamAccessLogsMessage.Identifier`: sent in a stream's first message only.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Identifier {
    #[prost(message, optional, tag = "1")]
    pub node: Option<Node>,
    #[prost(string, tag = "2")]
    pub log_name: String,
}

#[cfg(test)]
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpAccessLogEntries {
    #[prost(message, repeated, tag = "1")]
    pub log_entry: Vec<HttpAccessLogEntry>,
}

#[cfg(test)]
#[derive(Clone, PartialEq, prost::Message)]
pub struct TcpAccessLogEntries {
    #[prost(message, repeated, tag = "1")]
    pub log_entry: Vec<TcpAccessLogEntry>,
}

/// `envoy.config.core.v3.Node` (identity fields only).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Node {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub cluster: String,
    #[prost(message, optional, tag = "3")]
    pub metadata: Option<Struct>,
    #[prost(message, optional, tag = "4")]
    pub locality: Option<Locality>,
    #[prost(string, tag = "6")]
    pub user_agent_name: String,
    #[prost(message, optional, tag = "8")]
    pub user_agent_build_version: Option<BuildVersion>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Locality {
    #[prost(string, tag = "1")]
    pub region: String,
    #[prost(string, tag = "2")]
    pub zone: String,
    #[prost(string, tag = "3")]
    pub sub_zone: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BuildVersion {
    #[prost(message, optional, tag = "1")]
    pub version: Option<SemanticVersion>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SemanticVersion {
    #[prost(uint32, tag = "1")]
    pub major_number: u32,
    #[prost(uint32, tag = "2")]
    pub minor_number: u32,
    #[prost(uint32, tag = "3")]
    pub patch: u32,
}

/// `google.protobuf.Struct`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Struct {
    #[prost(btree_map = "string, message", tag = "1")]
    pub fields: BTreeMap<String, Value>,
}

/// `google.protobuf.Value`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Value {
    #[prost(oneof = "Kind", tags = "1, 2, 3, 4, 5, 6")]
    pub kind: Option<Kind>,
}

/// `Value.kind`, with protobuf's variant names.
#[derive(Clone, PartialEq, prost::Oneof)]
#[allow(clippy::enum_variant_names)]
pub enum Kind {
    #[prost(int32, tag = "1")]
    NullValue(i32),
    #[prost(double, tag = "2")]
    NumberValue(f64),
    #[prost(string, tag = "3")]
    StringValue(String),
    #[prost(bool, tag = "4")]
    BoolValue(bool),
    #[prost(message, tag = "5")]
    StructValue(Struct),
    #[prost(message, tag = "6")]
    ListValue(ListValue),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListValue {
    #[prost(message, repeated, tag = "1")]
    pub values: Vec<Value>,
}

impl Struct {
    /// A JSON object as a `google.protobuf.Struct` (other JSON is an empty one).
    pub fn from_json(v: &serde_json::Value) -> Struct {
        let fields = match v {
            serde_json::Value::Object(map) => map
                .iter()
                .map(|(k, v)| (k.clone(), Value::from_json(v)))
                .collect(),
            _ => BTreeMap::new(),
        };
        Struct { fields }
    }
}

impl Value {
    pub fn from_json(v: &serde_json::Value) -> Value {
        use serde_json::Value as J;
        let kind = match v {
            J::Null => Kind::NullValue(0),
            J::Bool(b) => Kind::BoolValue(*b),
            J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
            J::String(s) => Kind::StringValue(s.clone()),
            J::Array(items) => Kind::ListValue(ListValue {
                values: items.iter().map(Value::from_json).collect(),
            }),
            J::Object(_) => Kind::StructValue(Struct::from_json(v)),
        };
        Value { kind: Some(kind) }
    }
}

/// `google.protobuf.Timestamp` and `google.protobuf.Duration` (same fields).
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Timestamp {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

pub type Duration = Timestamp;

impl Timestamp {
    pub fn of(d: std::time::Duration) -> Timestamp {
        Timestamp {
            seconds: d.as_secs() as i64,
            nanos: d.subsec_nanos() as i32,
        }
    }
}

/// `google.protobuf.UInt32Value`.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct UInt32Value {
    #[prost(uint32, tag = "1")]
    pub value: u32,
}

/// `envoy.config.core.v3.Address` with its `socket_address`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Address {
    #[prost(message, optional, tag = "1")]
    pub socket_address: Option<SocketAddress>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SocketAddress {
    #[prost(string, tag = "2")]
    pub address: String,
    /// `port_value`, in the `port_specifier` oneof: sent even when 0.
    #[prost(oneof = "PortSpecifier", tags = "3")]
    pub port: Option<PortSpecifier>,
}

#[derive(Clone, Copy, PartialEq, prost::Oneof)]
pub enum PortSpecifier {
    #[prost(uint32, tag = "3")]
    PortValue(u32),
}

impl Address {
    pub fn of(a: std::net::SocketAddr) -> Address {
        Address {
            socket_address: Some(SocketAddress {
                address: a.ip().to_string(),
                port: Some(PortSpecifier::PortValue(a.port().into())),
            }),
        }
    }
}

/// `envoy.data.accesslog.v3.AccessLogCommon` (the fields envoyx fills).
#[derive(Clone, PartialEq, prost::Message)]
pub struct AccessLogCommon {
    #[prost(message, optional, tag = "2")]
    pub downstream_remote_address: Option<Address>,
    #[prost(message, optional, tag = "3")]
    pub downstream_local_address: Option<Address>,
    #[prost(message, optional, tag = "4")]
    pub tls_properties: Option<TlsProperties>,
    #[prost(message, optional, tag = "5")]
    pub start_time: Option<Timestamp>,
    #[prost(message, optional, tag = "9")]
    pub time_to_first_upstream_rx_byte: Option<Duration>,
    #[prost(message, optional, tag = "13")]
    pub upstream_remote_address: Option<Address>,
    #[prost(string, tag = "15")]
    pub upstream_cluster: String,
    #[prost(message, optional, tag = "16")]
    pub response_flags: Option<ResponseFlags>,
    #[prost(string, tag = "18")]
    pub upstream_transport_failure_reason: String,
    #[prost(string, tag = "19")]
    pub route_name: String,
    #[prost(message, optional, tag = "20")]
    pub downstream_direct_remote_address: Option<Address>,
    #[prost(message, optional, tag = "23")]
    pub duration: Option<Duration>,
    #[prost(uint32, tag = "24")]
    pub upstream_request_attempt_count: u32,
    #[prost(string, tag = "26")]
    pub stream_id: String,
    /// `AccessLogType`: `TcpConnectionEnd` (3) or `DownstreamEnd` (6).
    #[prost(int32, tag = "33")]
    pub access_log_type: i32,
}

pub const TCP_CONNECTION_END: i32 = 3;

/// `envoy.data.accesslog.v3.TLSProperties` (no session id, no JA3).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TlsProperties {
    /// `TLSVersion`: TLSv1_2 3, TLSv1_3 4.
    #[prost(int32, tag = "1")]
    pub tls_version: i32,
    #[prost(message, optional, tag = "2")]
    pub tls_cipher_suite: Option<UInt32Value>,
    #[prost(string, tag = "3")]
    pub tls_sni_hostname: String,
    #[prost(message, optional, tag = "4")]
    pub local_certificate_properties: Option<CertificateProperties>,
    #[prost(message, optional, tag = "5")]
    pub peer_certificate_properties: Option<CertificateProperties>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CertificateProperties {
    #[prost(message, repeated, tag = "1")]
    pub subject_alt_name: Vec<SubjectAltName>,
    #[prost(string, tag = "2")]
    pub subject: String,
    #[prost(string, tag = "3")]
    pub issuer: String,
}

/// `CertificateProperties.SubjectAltName` with its `uri` (the only kind Envoy logs).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SubjectAltName {
    #[prost(string, optional, tag = "1")]
    pub uri: Option<String>,
}
pub const DOWNSTREAM_END: i32 = 6;

/// `envoy.data.accesslog.v3.ResponseFlags`.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct ResponseFlags {
    #[prost(bool, tag = "1")]
    pub failed_local_healthcheck: bool,
    #[prost(bool, tag = "2")]
    pub no_healthy_upstream: bool,
    #[prost(bool, tag = "3")]
    pub upstream_request_timeout: bool,
    #[prost(bool, tag = "4")]
    pub local_reset: bool,
    #[prost(bool, tag = "5")]
    pub upstream_remote_reset: bool,
    #[prost(bool, tag = "6")]
    pub upstream_connection_failure: bool,
    #[prost(bool, tag = "7")]
    pub upstream_connection_termination: bool,
    #[prost(bool, tag = "8")]
    pub upstream_overflow: bool,
    #[prost(bool, tag = "9")]
    pub no_route_found: bool,
    #[prost(bool, tag = "10")]
    pub delay_injected: bool,
    #[prost(bool, tag = "11")]
    pub fault_injected: bool,
    #[prost(bool, tag = "12")]
    pub rate_limited: bool,
    #[prost(bool, tag = "14")]
    pub rate_limit_service_error: bool,
    #[prost(bool, tag = "15")]
    pub downstream_connection_termination: bool,
    #[prost(bool, tag = "16")]
    pub upstream_retry_limit_exceeded: bool,
    #[prost(bool, tag = "17")]
    pub stream_idle_timeout: bool,
    #[prost(bool, tag = "18")]
    pub invalid_envoy_request_headers: bool,
    #[prost(bool, tag = "19")]
    pub downstream_protocol_error: bool,
    #[prost(bool, tag = "20")]
    pub upstream_max_stream_duration_reached: bool,
    #[prost(bool, tag = "21")]
    pub response_from_cache_filter: bool,
    #[prost(bool, tag = "22")]
    pub no_filter_config_found: bool,
    #[prost(bool, tag = "23")]
    pub duration_timeout: bool,
    #[prost(bool, tag = "24")]
    pub upstream_protocol_error: bool,
    #[prost(bool, tag = "25")]
    pub no_cluster_found: bool,
    #[prost(bool, tag = "26")]
    pub overload_manager: bool,
    #[prost(bool, tag = "27")]
    pub dns_resolution_failure: bool,
    #[prost(bool, tag = "28")]
    pub downstream_remote_reset: bool,
}

impl ResponseFlags {
    /// The flags of Envoy's short form (`UH`, `UF,URX`, `-`); None when none is set.
    pub fn parse(short: &str) -> Option<ResponseFlags> {
        let mut f = ResponseFlags::default();
        let mut any = false;
        for flag in short.split(',') {
            let slot = match flag {
                "LH" => &mut f.failed_local_healthcheck,
                "UH" => &mut f.no_healthy_upstream,
                "UT" => &mut f.upstream_request_timeout,
                "LR" => &mut f.local_reset,
                "UR" => &mut f.upstream_remote_reset,
                "UF" => &mut f.upstream_connection_failure,
                "UC" => &mut f.upstream_connection_termination,
                "UO" => &mut f.upstream_overflow,
                "NR" => &mut f.no_route_found,
                "DI" => &mut f.delay_injected,
                "FI" => &mut f.fault_injected,
                "RL" => &mut f.rate_limited,
                "RLSE" => &mut f.rate_limit_service_error,
                "DC" => &mut f.downstream_connection_termination,
                "URX" => &mut f.upstream_retry_limit_exceeded,
                "SI" => &mut f.stream_idle_timeout,
                "IH" => &mut f.invalid_envoy_request_headers,
                "DPE" => &mut f.downstream_protocol_error,
                "UMSDR" => &mut f.upstream_max_stream_duration_reached,
                "RFCF" => &mut f.response_from_cache_filter,
                "NFCF" => &mut f.no_filter_config_found,
                "DT" => &mut f.duration_timeout,
                "UPE" => &mut f.upstream_protocol_error,
                "NC" => &mut f.no_cluster_found,
                "OM" => &mut f.overload_manager,
                "DF" => &mut f.dns_resolution_failure,
                "DR" => &mut f.downstream_remote_reset,
                _ => continue,
            };
            *slot = true;
            any = true;
        }
        any.then_some(f)
    }
}

/// `envoy.data.accesslog.v3.HTTPAccessLogEntry`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpAccessLogEntry {
    #[prost(message, optional, tag = "1")]
    pub common_properties: Option<AccessLogCommon>,
    /// `HTTPVersion`: HTTP10 1, HTTP11 2, HTTP2 3.
    #[prost(int32, tag = "2")]
    pub protocol_version: i32,
    #[prost(message, optional, tag = "3")]
    pub request: Option<HttpRequestProperties>,
    #[prost(message, optional, tag = "4")]
    pub response: Option<HttpResponseProperties>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpRequestProperties {
    /// `envoy.config.core.v3.RequestMethod`.
    #[prost(int32, tag = "1")]
    pub request_method: i32,
    #[prost(string, tag = "2")]
    pub scheme: String,
    #[prost(string, tag = "3")]
    pub authority: String,
    #[prost(string, tag = "5")]
    pub path: String,
    #[prost(string, tag = "6")]
    pub user_agent: String,
    #[prost(string, tag = "7")]
    pub referer: String,
    #[prost(string, tag = "8")]
    pub forwarded_for: String,
    #[prost(string, tag = "9")]
    pub request_id: String,
    #[prost(string, tag = "10")]
    pub original_path: String,
    #[prost(uint64, tag = "12")]
    pub request_body_bytes: u64,
    #[prost(btree_map = "string, string", tag = "13")]
    pub request_headers: BTreeMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpResponseProperties {
    #[prost(message, optional, tag = "1")]
    pub response_code: Option<UInt32Value>,
    #[prost(uint64, tag = "3")]
    pub response_body_bytes: u64,
    #[prost(btree_map = "string, string", tag = "4")]
    pub response_headers: BTreeMap<String, String>,
    #[prost(string, tag = "6")]
    pub response_code_details: String,
}

/// `envoy.data.accesslog.v3.TCPAccessLogEntry`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TcpAccessLogEntry {
    #[prost(message, optional, tag = "1")]
    pub common_properties: Option<AccessLogCommon>,
    #[prost(message, optional, tag = "2")]
    pub connection_properties: Option<ConnectionProperties>,
}

#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct ConnectionProperties {
    #[prost(uint64, tag = "1")]
    pub received_bytes: u64,
    #[prost(uint64, tag = "2")]
    pub sent_bytes: u64,
}

/// `envoy.config.core.v3.RequestMethod` of a method name (0: another method).
pub fn request_method(method: &str) -> i32 {
    match method {
        "GET" => 1,
        "HEAD" => 2,
        "POST" => 3,
        "PUT" => 4,
        "DELETE" => 5,
        "CONNECT" => 6,
        "OPTIONS" => 7,
        "TRACE" => 8,
        "PATCH" => 9,
        _ => 0,
    }
}

// ---------------------------------------------------------------------------------
// OTLP logs (`opentelemetry.proto.collector.logs.v1.LogsService/Export`)
// ---------------------------------------------------------------------------------

/// `opentelemetry.proto.common.v1.AnyValue` with its `string_value` (the only
/// kind envoyx formats).
#[derive(Clone, PartialEq, prost::Message)]
pub struct AnyValue {
    #[prost(string, optional, tag = "1")]
    pub string_value: Option<String>,
}

/// `opentelemetry.proto.common.v1.KeyValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(message, optional, tag = "2")]
    pub value: Option<AnyValue>,
}

impl KeyValue {
    pub fn string(key: &str, value: String) -> KeyValue {
        KeyValue {
            key: key.to_string(),
            value: Some(AnyValue {
                string_value: Some(value),
            }),
        }
    }
}

/// `opentelemetry.proto.logs.v1.LogRecord` (the fields Envoy's logger sets
/// without tracing).
#[derive(Clone, PartialEq, prost::Message)]
pub struct OtelLogRecord {
    #[prost(fixed64, tag = "1")]
    pub time_unix_nano: u64,
    #[prost(message, optional, tag = "5")]
    pub body: Option<AnyValue>,
    #[prost(message, repeated, tag = "6")]
    pub attributes: Vec<KeyValue>,
}

/// `opentelemetry.proto.resource.v1.Resource`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Resource {
    #[prost(message, repeated, tag = "1")]
    pub attributes: Vec<KeyValue>,
}

/// `ExportLogsServiceRequest` → `ResourceLogs` → `ScopeLogs`: the logger encodes
/// them field by field around its batch; the structs are the unit tests' decoder.
#[cfg(test)]
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportLogsServiceRequest {
    #[prost(message, repeated, tag = "1")]
    pub resource_logs: Vec<ResourceLogs>,
}

#[cfg(test)]
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResourceLogs {
    #[prost(message, optional, tag = "1")]
    pub resource: Option<Resource>,
    #[prost(message, repeated, tag = "2")]
    pub scope_logs: Vec<ScopeLogs>,
}

#[cfg(test)]
#[derive(Clone, PartialEq, prost::Message)]
pub struct ScopeLogs {
    #[prost(message, repeated, tag = "2")]
    pub log_records: Vec<OtelLogRecord>,
}
