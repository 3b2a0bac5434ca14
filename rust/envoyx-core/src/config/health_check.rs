//! A cluster's `health_checks` (envoy.config.core.v3.HealthCheck) and
//! `outlier_detection` (envoy.config.cluster.v3.OutlierDetection), with Envoy's
//! defaults. What they do is in `upstream::health_check` and `upstream::outlier`.

use std::time::Duration;

use base64::Engine;

use super::matcher::{StringMatcher, map_string_matcher};
use super::reader::Obj;

/// The `@type` of `event_logger[].typed_config` envoyx writes (Envoy's
/// `envoy.health_check.event_sink.file`).
const FILE_EVENT_SINK: &str =
    "envoy.extensions.health_check.event_sinks.file.v3.HealthCheckEventFileSink";

/// One `health_checks[]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheckConfig {
    /// `timeout` (required).
    pub timeout: Duration,
    /// `interval` (required).
    pub interval: Duration,
    /// `initial_jitter` (default 0).
    pub initial_jitter: Duration,
    /// `interval_jitter` (default 0).
    pub interval_jitter: Duration,
    /// `interval_jitter_percent` (default 0).
    pub interval_jitter_percent: u32,
    /// `unhealthy_threshold` (required).
    pub unhealthy_threshold: u32,
    /// `healthy_threshold` (required).
    pub healthy_threshold: u32,
    /// `reuse_connection` (default true).
    pub reuse_connection: bool,
    /// `no_traffic_interval` (default 60 s): used until the cluster saw traffic.
    pub no_traffic_interval: Duration,
    /// `no_traffic_healthy_interval` (default `no_traffic_interval`).
    pub no_traffic_healthy_interval: Duration,
    /// `unhealthy_interval` (default `interval`).
    pub unhealthy_interval: Duration,
    /// `unhealthy_edge_interval` (default `unhealthy_interval`).
    pub unhealthy_edge_interval: Duration,
    /// `healthy_edge_interval` (default `interval`).
    pub healthy_edge_interval: Duration,
    /// Where health-check events go: the deprecated `event_log_path`, then each
    /// `event_logger[]` file sink, in order.
    pub event_log_paths: Vec<String>,
    /// `always_log_health_check_failures` (default: only a host's first failure).
    pub always_log_health_check_failures: bool,
    /// `always_log_health_check_success` (default: only the healthy transition).
    pub always_log_health_check_success: bool,
    pub kind: HealthCheckKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum HealthCheckKind {
    Http(HttpHealthCheck),
    Tcp(TcpHealthCheck),
    Grpc(GrpcHealthCheck),
}

#[derive(Debug, Clone, PartialEq)]
pub struct HttpHealthCheck {
    /// `path` (required).
    pub path: String,
    /// `host`: the `Host`/`:authority` (default: the cluster's name).
    pub host: Option<String>,
    /// `method` (default GET).
    pub method: http::Method,
    /// `expected_statuses` as half-open ranges (default `[200, 201)`).
    pub expected_statuses: Vec<(u16, u16)>,
    /// `retriable_statuses`: failures counted against `unhealthy_threshold`
    /// instead of failing the host at once.
    pub retriable_statuses: Vec<(u16, u16)>,
    /// `request_headers_to_add`: (name, value, append).
    pub request_headers_to_add: Vec<(http::HeaderName, http::HeaderValue, bool)>,
    pub request_headers_to_remove: Vec<http::HeaderName>,
    /// `codec_client_type` HTTP2 (default HTTP1).
    pub http2: bool,
    /// `service_name_matcher`: a passing answer must carry a matching
    /// `x-envoy-upstream-healthchecked-cluster` (counted in `verify_cluster`).
    pub service_name_matcher: Option<ServiceNameMatcher>,
}

/// A `service_name_matcher`, compared by its config (matchers hold compiled regexes).
#[derive(Debug, Clone)]
pub struct ServiceNameMatcher {
    pub matcher: StringMatcher,
    raw: serde_json::Value,
}

impl PartialEq for ServiceNameMatcher {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TcpHealthCheck {
    /// `send`: bytes written on each check (empty: connect only).
    pub send: Vec<u8>,
    /// `receive`: segments that must appear in order in what the host answers.
    pub receive: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GrpcHealthCheck {
    /// `service_name` of the grpc.health.v1 `HealthCheckRequest`.
    pub service_name: String,
    /// `authority` (default: the cluster's name).
    pub authority: Option<String>,
    /// `initial_metadata`: headers added to each check request (name, value, append).
    pub initial_metadata: Vec<(http::HeaderName, http::HeaderValue, bool)>,
}

/// `outlier_detection`, with Envoy's defaults (percentages are 0–100).
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierConfig {
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_time_jitter: Duration,
    pub max_ejection_percent: u32,
    pub consecutive_5xx: u32,
    pub consecutive_gateway_failure: u32,
    pub consecutive_local_origin_failure: u32,
    pub split_external_local_origin_errors: bool,
    pub enforcing_consecutive_5xx: u32,
    pub enforcing_consecutive_gateway_failure: u32,
    pub enforcing_consecutive_local_origin_failure: u32,
    pub enforcing_success_rate: u32,
    pub enforcing_local_origin_success_rate: u32,
    pub enforcing_failure_percentage: u32,
    pub enforcing_failure_percentage_local_origin: u32,
    pub success_rate_minimum_hosts: u32,
    pub success_rate_request_volume: u32,
    /// `success_rate_stdev_factor`, in thousandths (1900 = 1.9).
    pub success_rate_stdev_factor: u32,
    pub failure_percentage_threshold: u32,
    pub failure_percentage_minimum_hosts: u32,
    pub failure_percentage_request_volume: u32,
    pub always_eject_one_host: bool,
    pub successful_active_health_check_uneject_host: bool,
}

/// A cluster's health settings: `health_checks`, `outlier_detection`,
/// `ignore_health_on_host_removal`.
pub type ClusterHealth = (Vec<HealthCheckConfig>, Option<OutlierConfig>, bool);

/// Reads a cluster's `health_checks`, `outlier_detection` and
/// `ignore_health_on_host_removal`.
pub fn map_cluster_health(c: &Obj<'_>) -> ClusterHealth {
    let list = c.list("health_checks");
    if list.len() > 1 {
        // Envoy 1.40 runs several checks as a group only when each has a `name`,
        // a field the v3 schema envoyx validates against does not have: every
        // list of several checks envoyx can read is one Envoy 1.40 refuses, in
        // these words.
        list[0].errors().push(
            list[0].path(),
            "health check at index 0 is missing a name; all health checks must have a name when multiple health checks are configured",
        );
    }
    let checks = list.iter().filter_map(map_health_check).collect();
    let outlier = c.obj("outlier_detection").map(|o| map_outlier(&o));
    let ignore_health_on_host_removal = c.bool("ignore_health_on_host_removal").unwrap_or(false);
    (checks, outlier, ignore_health_on_host_removal)
}

/// A `google.protobuf.UInt32Value` (proto-JSON writes it as the bare number).
fn wrapped(o: &Obj<'_>, key: &'static str, default: u32) -> u32 {
    o.u32(key).unwrap_or(default)
}

fn required_duration(o: &Obj<'_>, key: &'static str) -> Duration {
    o.duration(key).unwrap_or_else(|| {
        if !o.has(key) {
            o.error(key, "is required");
        }
        Duration::from_secs(1)
    })
}

fn required_u32(o: &Obj<'_>, key: &'static str) -> u32 {
    o.u32(key).unwrap_or_else(|| {
        if !o.has(key) {
            o.error(key, "is required");
        }
        1
    })
}

fn map_health_check(h: &Obj<'_>) -> Option<HealthCheckConfig> {
    let timeout = required_duration(h, "timeout");
    let interval = required_duration(h, "interval");
    if interval.is_zero() {
        h.error("interval", "must be greater than 0s");
    }
    if timeout.is_zero() {
        h.error("timeout", "must be greater than 0s");
    }
    let unhealthy_threshold = required_u32(h, "unhealthy_threshold");
    let healthy_threshold = required_u32(h, "healthy_threshold");
    let no_traffic_interval = h
        .duration("no_traffic_interval")
        .unwrap_or(Duration::from_secs(60));
    let unhealthy_interval = h.duration("unhealthy_interval").unwrap_or(interval);
    let mut kinds = Vec::new();
    if let Some(http) = h.obj("http_health_check") {
        kinds.push(HealthCheckKind::Http(map_http(&http)));
    }
    if let Some(tcp) = h.obj("tcp_health_check") {
        kinds.push(HealthCheckKind::Tcp(TcpHealthCheck {
            send: tcp.obj("send").map(|p| payload(&p)).unwrap_or_default(),
            receive: tcp.list("receive").iter().map(payload).collect(),
        }));
    }
    if let Some(grpc) = h.obj("grpc_health_check") {
        kinds.push(HealthCheckKind::Grpc(GrpcHealthCheck {
            service_name: grpc.str("service_name").unwrap_or_default().to_string(),
            authority: grpc
                .str("authority")
                .filter(|a| !a.is_empty())
                .map(str::to_string),
            initial_metadata: header_options(&grpc, "initial_metadata"),
        }));
    }
    if kinds.len() != 1 {
        h.errors().push(
            h.path(),
            "exactly one of http_health_check, tcp_health_check, grpc_health_check is required (envoyx supports these three)",
        );
        return None;
    }
    Some(HealthCheckConfig {
        timeout,
        interval,
        initial_jitter: h.duration("initial_jitter").unwrap_or_default(),
        interval_jitter: h.duration("interval_jitter").unwrap_or_default(),
        interval_jitter_percent: h.u32("interval_jitter_percent").unwrap_or(0),
        unhealthy_threshold,
        healthy_threshold,
        reuse_connection: h.bool("reuse_connection").unwrap_or(true),
        no_traffic_interval,
        no_traffic_healthy_interval: h
            .duration("no_traffic_healthy_interval")
            .unwrap_or(no_traffic_interval),
        unhealthy_interval,
        unhealthy_edge_interval: h
            .duration("unhealthy_edge_interval")
            .unwrap_or(unhealthy_interval),
        healthy_edge_interval: h.duration("healthy_edge_interval").unwrap_or(interval),
        event_log_paths: event_log_paths(h),
        always_log_health_check_failures: h
            .bool("always_log_health_check_failures")
            .unwrap_or(false),
        always_log_health_check_success: h.bool("always_log_health_check_success").unwrap_or(false),
        kind: kinds.pop()?,
    })
}

/// The files a health check's events are written to: `event_log_path` (deprecated,
/// still honoured by Envoy 1.40) and the `event_logger` file sinks.
fn event_log_paths(h: &Obj<'_>) -> Vec<String> {
    let mut paths: Vec<String> = h
        .str("event_log_path")
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .into_iter()
        .collect();
    for sink in h.list("event_logger") {
        sink.ignore(&["name"]);
        let Some(tc) = sink.obj("typed_config") else {
            sink.error("typed_config", "is required");
            continue;
        };
        if tc.any_type() != Some(FILE_EVENT_SINK) {
            tc.error(
                "@type",
                format!(
                    "{} is not supported by envoyx (only {FILE_EVENT_SINK})",
                    tc.any_type().unwrap_or_default()
                ),
            );
            continue;
        }
        match tc.str("event_log_path").filter(|p| !p.is_empty()) {
            Some(path) => paths.push(path.to_string()),
            None => tc.error("event_log_path", "is required"),
        }
    }
    paths
}

/// A list of `envoy.config.core.v3.HeaderValueOption` (request_headers_to_add,
/// initial_metadata): (name, value, append).
fn header_options(
    o: &Obj<'_>,
    key: &'static str,
) -> Vec<(http::HeaderName, http::HeaderValue, bool)> {
    let mut out = Vec::new();
    for option in o.list(key) {
        let append = match option.str("append_action") {
            None | Some("APPEND_IF_EXISTS_OR_ADD") => true,
            Some("OVERWRITE_IF_EXISTS_OR_ADD") => false,
            Some(other) => {
                option.error(
                    "append_action",
                    format!("{other} is not supported by envoyx"),
                );
                true
            }
        };
        let Some(header) = option.obj("header") else {
            continue;
        };
        let key = header.str("key").unwrap_or_default();
        let value = header.str("value").unwrap_or_default();
        match (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(value),
        ) {
            (Ok(k), Ok(v)) => out.push((k, v, append)),
            _ => header.error("key", "invalid header"),
        }
    }
    out
}

fn map_http(o: &Obj<'_>) -> HttpHealthCheck {
    let path = o.str("path").unwrap_or_default().to_string();
    if path.is_empty() {
        o.error("path", "is required");
    }
    let method = match o.str("method").unwrap_or("METHOD_UNSPECIFIED") {
        "METHOD_UNSPECIFIED" | "GET" => http::Method::GET,
        "HEAD" => http::Method::HEAD,
        "POST" => http::Method::POST,
        "PUT" => http::Method::PUT,
        "DELETE" => http::Method::DELETE,
        "OPTIONS" => http::Method::OPTIONS,
        "TRACE" => http::Method::TRACE,
        "PATCH" => http::Method::PATCH,
        other => {
            o.error(
                "method",
                format!("{other} is not allowed for health checks"),
            );
            http::Method::GET
        }
    };
    let http2 = match o.str("codec_client_type").unwrap_or("HTTP1") {
        "HTTP1" => false,
        "HTTP2" => true,
        other => {
            o.error(
                "codec_client_type",
                format!("{other} is not supported by envoyx"),
            );
            false
        }
    };
    let mut expected_statuses = ranges(o, "expected_statuses", "expected");
    if expected_statuses.is_empty() {
        expected_statuses.push((200, 201));
    }
    let retriable_statuses = ranges(o, "retriable_statuses", "retriable");
    let request_headers_to_add = header_options(o, "request_headers_to_add");
    let request_headers_to_remove = o
        .strings("request_headers_to_remove")
        .into_iter()
        .filter_map(|name| match http::HeaderName::from_bytes(name.as_bytes()) {
            Ok(n) => Some(n),
            Err(_) => {
                o.error(
                    "request_headers_to_remove",
                    format!("invalid header {name:?}"),
                );
                None
            }
        })
        .collect();
    HttpHealthCheck {
        path,
        host: o.str("host").filter(|h| !h.is_empty()).map(str::to_string),
        method,
        expected_statuses,
        retriable_statuses,
        request_headers_to_add,
        request_headers_to_remove,
        http2,
        service_name_matcher: o.obj("service_name_matcher").and_then(|m| {
            Some(ServiceNameMatcher {
                matcher: map_string_matcher(&m)?,
                raw: m.to_value(),
            })
        }),
    }
}

/// `envoy.type.v3.Int64Range` list, checked as Envoy checks it.
fn ranges(o: &Obj<'_>, key: &'static str, what: &str) -> Vec<(u16, u16)> {
    let mut out = Vec::new();
    for r in o.list(key) {
        let start = r.u64("start").unwrap_or(0);
        let end = r.u64("end").unwrap_or(0);
        if start >= end {
            r.errors().push(
                r.path(),
                format!("Invalid http {what} status range: expecting start < end, but found start={start} and end={end}"),
            );
        } else if start < 100 {
            r.errors().push(
                r.path(),
                format!("Invalid http {what} status range: expecting start >= 100, but found start={start}"),
            );
        } else if end > 600 {
            r.errors().push(
                r.path(),
                format!(
                    "Invalid http {what} status range: expecting end <= 600, but found end={end}"
                ),
            );
        } else {
            out.push((start as u16, end as u16));
        }
    }
    out
}

/// A `HealthCheck.Payload`: `text` (hex) or `binary` (bytes, base64 in proto-JSON).
fn payload(p: &Obj<'_>) -> Vec<u8> {
    if let Some(text) = p.str("text") {
        match decode_hex(text) {
            Some(bytes) if !bytes.is_empty() => return bytes,
            _ => {
                p.error("text", format!("invalid hex string '{text}'"));
                return Vec::new();
            }
        }
    }
    if let Some(b) = p.str("binary") {
        match base64::engine::general_purpose::STANDARD.decode(b) {
            Ok(bytes) => return bytes,
            Err(_) => p.error("binary", "invalid base64"),
        }
    }
    Vec::new()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn percent(o: &Obj<'_>, key: &'static str, default: u32) -> u32 {
    let v = wrapped(o, key, default);
    if v > 100 {
        o.error(key, "must be at most 100");
    }
    v.min(100)
}

fn map_outlier(o: &Obj<'_>) -> OutlierConfig {
    let base_ejection_time = o
        .duration("base_ejection_time")
        .unwrap_or(Duration::from_secs(30));
    let max_ejection_time = o
        .duration("max_ejection_time")
        .unwrap_or(base_ejection_time.max(Duration::from_secs(300)));
    if max_ejection_time < base_ejection_time {
        o.error(
            "max_ejection_time",
            "outlier detector's max_ejection_time cannot be smaller than base_ejection_time",
        );
    }
    let interval = o.duration("interval").unwrap_or(Duration::from_secs(10));
    if interval.is_zero() {
        o.error("interval", "must be greater than 0s");
    }
    OutlierConfig {
        interval,
        base_ejection_time,
        max_ejection_time,
        max_ejection_time_jitter: o.duration("max_ejection_time_jitter").unwrap_or_default(),
        max_ejection_percent: percent(o, "max_ejection_percent", 10),
        consecutive_5xx: wrapped(o, "consecutive_5xx", 5),
        consecutive_gateway_failure: wrapped(o, "consecutive_gateway_failure", 5),
        consecutive_local_origin_failure: wrapped(o, "consecutive_local_origin_failure", 5),
        split_external_local_origin_errors: o
            .bool("split_external_local_origin_errors")
            .unwrap_or(false),
        enforcing_consecutive_5xx: percent(o, "enforcing_consecutive_5xx", 100),
        enforcing_consecutive_gateway_failure: percent(
            o,
            "enforcing_consecutive_gateway_failure",
            0,
        ),
        enforcing_consecutive_local_origin_failure: percent(
            o,
            "enforcing_consecutive_local_origin_failure",
            100,
        ),
        enforcing_success_rate: percent(o, "enforcing_success_rate", 100),
        enforcing_local_origin_success_rate: percent(o, "enforcing_local_origin_success_rate", 100),
        enforcing_failure_percentage: percent(o, "enforcing_failure_percentage", 0),
        enforcing_failure_percentage_local_origin: percent(
            o,
            "enforcing_failure_percentage_local_origin",
            0,
        ),
        success_rate_minimum_hosts: wrapped(o, "success_rate_minimum_hosts", 5),
        success_rate_request_volume: wrapped(o, "success_rate_request_volume", 100),
        success_rate_stdev_factor: wrapped(o, "success_rate_stdev_factor", 1900),
        failure_percentage_threshold: percent(o, "failure_percentage_threshold", 85),
        failure_percentage_minimum_hosts: wrapped(o, "failure_percentage_minimum_hosts", 5),
        failure_percentage_request_volume: wrapped(o, "failure_percentage_request_volume", 50),
        always_eject_one_host: o.bool("always_eject_one_host").unwrap_or(false),
        successful_active_health_check_uneject_host: o
            .bool("successful_active_health_check_uneject_host")
            .unwrap_or(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::reader::Errors;
    use serde_json::json;

    fn map(doc: serde_json::Value) -> (Vec<HealthCheckConfig>, Option<OutlierConfig>, Vec<String>) {
        let errors = Errors::default();
        let (h, o, _) = {
            let c = Obj::new(&doc, "c".into(), &errors).unwrap();
            map_cluster_health(&c)
        };
        (h, o, errors.into_vec())
    }

    #[test]
    fn http_check_defaults_and_unknown_fields() {
        let (h, o, errs) = map(json!({"health_checks": [{
            "timeout": "1s", "interval": "0.5s", "unhealthy_threshold": 2, "healthy_threshold": 1,
            "http_health_check": {"path": "/hc", "service_name_matcher": {"prefix": "x"}},
            "event_log_path": "/tmp/x",
            "event_logger": [{"name": "f", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.health_check.event_sinks.file.v3.HealthCheckEventFileSink",
                "event_log_path": "/tmp/y"}}, {"name": "g", "typed_config": {
                "@type": "type.googleapis.com/some.Other"}}],
            "event_service": {}
        }]}));
        assert!(o.is_none());
        let hc = &h[0];
        assert_eq!(hc.no_traffic_interval, Duration::from_secs(60));
        assert_eq!(hc.unhealthy_edge_interval, Duration::from_millis(500));
        assert!(hc.reuse_connection);
        let HealthCheckKind::Http(http) = &hc.kind else {
            panic!()
        };
        assert_eq!(http.expected_statuses, vec![(200, 201)]);
        assert!(
            http.service_name_matcher
                .as_ref()
                .unwrap()
                .matcher
                .matches("xyz")
        );
        assert_eq!(hc.event_log_paths, vec!["/tmp/x", "/tmp/y"]);
        assert_eq!(
            errs,
            vec![
                "c.health_checks[0].event_logger[1].typed_config.@type: some.Other is not supported by envoyx (only envoy.extensions.health_check.event_sinks.file.v3.HealthCheckEventFileSink)",
                "c.health_checks[0].event_service: not supported by envoyx",
            ]
        );
    }

    #[test]
    fn tcp_payloads_and_outlier_defaults() {
        let (h, o, errs) = map(json!({
            "health_checks": [{"timeout": "1s", "interval": "1s", "unhealthy_threshold": 1,
                "healthy_threshold": 1, "tcp_health_check": {"send": {"text": "50494e47"},
                "receive": [{"text": "504f4e47"}]}}],
            "outlier_detection": {"consecutive_5xx": 3}
        }));
        assert!(errs.is_empty(), "{errs:?}");
        let HealthCheckKind::Tcp(tcp) = &h[0].kind else {
            panic!()
        };
        assert_eq!(tcp.send, b"PING");
        assert_eq!(tcp.receive, vec![b"PONG".to_vec()]);
        let o = o.unwrap();
        assert_eq!(o.consecutive_5xx, 3);
        assert_eq!(o.max_ejection_percent, 10);
        assert_eq!(o.max_ejection_time, Duration::from_secs(300));
        assert_eq!(o.enforcing_consecutive_gateway_failure, 0);
    }
}
