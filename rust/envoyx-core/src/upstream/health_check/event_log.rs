//! A health checker's event log (Envoy's `HealthCheckEventLoggerImpl` with its
//! `event_log_path` file and `envoy.health_check.event_sink.file` sinks): one
//! JSON line per event in the proto-JSON form of
//! `envoy.data.core.v3.HealthCheckEvent`, as Envoy 1.40 prints it (every
//! primitive field, `http_status_code` in failures, the host's locality).
//!
//! Sessions render events on the control thread; the access-log flusher thread
//! writes them.

use std::fmt::Write as _;
use std::sync::Arc;

use crate::access_log::AccessLogger;
use crate::upstream::host::Host;
use crate::upstream::outlier::event_log::{json_str, timestamp_now};

/// Envoy's `HealthCheckFailureType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FailureType {
    Active,
    Passive,
    Network,
    NetworkTimeout,
}

impl FailureType {
    fn name(self) -> &'static str {
        match self {
            FailureType::Active => "ACTIVE",
            FailureType::Passive => "PASSIVE",
            FailureType::Network => "NETWORK",
            FailureType::NetworkTimeout => "NETWORK_TIMEOUT",
        }
    }
}

#[derive(Debug)]
pub(super) struct HealthCheckEventLog {
    files: Vec<Arc<AccessLogger>>,
    /// `HealthCheckerType`: HTTP, TCP or GRPC.
    checker_type: &'static str,
    cluster: String,
}

impl HealthCheckEventLog {
    pub(super) fn new(
        files: Vec<Arc<AccessLogger>>,
        checker_type: &'static str,
        cluster: &str,
    ) -> Self {
        HealthCheckEventLog {
            files,
            checker_type,
            cluster: cluster.to_string(),
        }
    }

    /// `eject_unhealthy_event`: the host just failed.
    pub(super) fn eject_unhealthy(&self, host: &Host, kind: FailureType, status: u16) {
        let event = format!(
            "\"eject_unhealthy_event\":{{\"failure_type\":\"{}\",\"http_status_code\":{status}}}",
            kind.name()
        );
        self.write(host, Some(&event), None, false);
    }

    /// `add_healthy_event`: the host just became healthy.
    pub(super) fn add_healthy(&self, host: &Host, first_check: bool) {
        let event = format!("\"add_healthy_event\":{{\"first_check\":{first_check}}}");
        self.write(host, Some(&event), None, false);
    }

    /// `health_check_failure_event`: a failed check (the first one, or each with
    /// `always_log_health_check_failures`).
    pub(super) fn failure(&self, host: &Host, kind: FailureType, first_check: bool, status: u16) {
        let event = format!(
            "\"health_check_failure_event\":{{\"failure_type\":\"{}\",\"first_check\":{first_check},\
             \"http_status_code\":{status}}}",
            kind.name()
        );
        self.write(host, None, Some(&event), false);
    }

    /// `successful_health_check_event` (with `always_log_health_check_success`).
    pub(super) fn success(&self, host: &Host) {
        self.write(host, None, None, true);
    }

    pub(super) fn degraded(&self, host: &Host) {
        self.write(host, None, Some("\"degraded_healthy_host\":{}"), false);
    }

    pub(super) fn no_longer_degraded(&self, host: &Host) {
        self.write(host, None, Some("\"no_longer_degraded_host\":{}"), false);
    }

    /// One event, its fields in the proto's field-number order: the events
    /// numbered before `timestamp` (4, 5) go `before` it, the others (7–9) `after`,
    /// `successful_health_check_event` (12) last.
    fn write(&self, host: &Host, before: Option<&str>, after: Option<&str>, success: bool) {
        let ip = host.address.ip();
        let mut line = format!(
            "{{\"health_checker_type\":\"{}\",\"host\":{{\"socket_address\":{{\
             \"protocol\":\"TCP\",\"address\":\"{ip}\",\"port_value\":{},\"resolver_name\":\"\",\
             \"ipv4_compat\":false,\"network_namespace_filepath\":\"\"}}}},\"cluster_name\":{}",
            self.checker_type,
            host.address.port(),
            json_str(&self.cluster),
        );
        if let Some(e) = before {
            line.push(',');
            line.push_str(e);
        }
        let _ = write!(line, ",\"timestamp\":\"{}\"", timestamp_now());
        if let Some(e) = after {
            line.push(',');
            line.push_str(e);
        }
        let (region, zone, sub_zone) = host
            .locality
            .as_deref()
            .map_or(("", "", ""), |l| (&l.region, &l.zone, &l.sub_zone));
        let _ = write!(
            line,
            ",\"locality\":{{\"region\":{},\"zone\":{},\"sub_zone\":{}}}",
            json_str(region),
            json_str(zone),
            json_str(sub_zone)
        );
        if success {
            line.push_str(",\"successful_health_check_event\":{}");
        }
        line.push('}');
        for f in &self.files {
            f.log_line(&line);
        }
    }
}
