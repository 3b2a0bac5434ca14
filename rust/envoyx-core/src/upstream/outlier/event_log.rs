//! The outlier event log (Envoy's `Outlier::EventLoggerImpl`): one JSON line per
//! ejection and unejection, in the proto-JSON form of
//! `envoy.data.cluster.v3.OutlierDetectionEvent`, to the file named by the
//! bootstrap's `cluster_manager.outlier_detection.event_log_path`.
//!
//! Events are rendered by the detector task on the control thread and written by
//! the access-log flusher thread (the same buffering and flush interval as Envoy's
//! access-log manager gives its event files): neither a worker nor the control
//! thread touches the file.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use super::detector::EjectionType;
use crate::access_log::{AccessLogOptions, AccessLogger, FlushSettings};
use crate::upstream::host::Host;

/// The event files of a cluster manager: how they are flushed, and the outlier
/// log every cluster's detector writes to (Envoy keeps it in its cluster manager).
#[derive(Debug, Clone, Default)]
pub struct EventLogs {
    pub file_flush: FlushSettings,
    pub outlier: Option<Arc<OutlierEventLog>>,
}

impl EventLogs {
    /// Opens the outlier log, if any; an unopenable path is a config error, as
    /// in Envoy.
    pub fn open(outlier_path: Option<&str>, file_flush: FlushSettings) -> Result<Self, String> {
        let outlier = match outlier_path {
            Some(path) => Some(Arc::new(OutlierEventLog {
                file: open(path, file_flush)?,
            })),
            None => None,
        };
        Ok(EventLogs {
            file_flush,
            outlier,
        })
    }
}

/// Opens an event file written by the flusher thread; only the control thread
/// renders into it (one buffer).
pub fn open(path: &str, flush: FlushSettings) -> Result<Arc<AccessLogger>, String> {
    AccessLogger::open_lines(path, AccessLogOptions { workers: 0, flush })
        .map_err(|e| format!("unable to open file '{path}': {e}"))
}

/// What an ejection found, for the event's detail.
#[derive(Debug, Clone, Copy)]
pub enum EjectDetail {
    Consecutive,
    /// `host_success_rate`, `cluster_average_success_rate`,
    /// `cluster_success_rate_ejection_threshold` (uint32 in the proto: truncated).
    SuccessRate {
        host: f64,
        average: f64,
        threshold: f64,
    },
    FailurePercentage {
        host: f64,
    },
}

#[derive(Debug)]
pub struct OutlierEventLog {
    file: Arc<AccessLogger>,
}

/// Envoy's `OutlierEjectionType` names.
fn type_name(kind: EjectionType) -> &'static str {
    match kind {
        EjectionType::Consecutive5xx => "CONSECUTIVE_5XX",
        EjectionType::ConsecutiveGatewayFailure => "CONSECUTIVE_GATEWAY_FAILURE",
        EjectionType::ConsecutiveLocalOriginFailure => "CONSECUTIVE_LOCAL_ORIGIN_FAILURE",
        EjectionType::SuccessRate => "SUCCESS_RATE",
        EjectionType::SuccessRateLocalOrigin => "SUCCESS_RATE_LOCAL_ORIGIN",
        EjectionType::FailurePercentage => "FAILURE_PERCENTAGE",
        EjectionType::FailurePercentageLocalOrigin => "FAILURE_PERCENTAGE_LOCAL_ORIGIN",
    }
}

/// A `google.protobuf.Timestamp` of now, as Envoy sets it (milliseconds) and
/// protobuf prints it.
pub fn timestamp_now() -> String {
    let now = chrono::Utc::now();
    let ms = now.timestamp_subsec_millis();
    if ms == 0 {
        now.format("%Y-%m-%dT%H:%M:%SZ").to_string()
    } else {
        format!("{}.{ms:03}Z", now.format("%Y-%m-%dT%H:%M:%S"))
    }
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

impl OutlierEventLog {
    /// Envoy's `logEject`: `since_last` is the time since the host's last
    /// unejection, `num_ejections` counts this one when enforced.
    #[allow(clippy::too_many_arguments)]
    pub fn log_eject(
        &self,
        cluster: &str,
        host: &Host,
        kind: EjectionType,
        enforced: bool,
        num_ejections: u32,
        since_last: Option<Duration>,
        detail: EjectDetail,
    ) {
        let mut line = self.common(
            type_name(kind),
            cluster,
            host,
            "EJECT",
            num_ejections,
            enforced,
            since_last,
        );
        match detail {
            EjectDetail::Consecutive => line.push_str(",\"eject_consecutive_event\":{}"),
            EjectDetail::SuccessRate {
                host,
                average,
                threshold,
            } => {
                let _ = write!(
                    line,
                    ",\"eject_success_rate_event\":{{\"host_success_rate\":{},\
                     \"cluster_average_success_rate\":{},\
                     \"cluster_success_rate_ejection_threshold\":{}}}",
                    as_u32(host),
                    as_u32(average),
                    as_u32(threshold)
                );
            }
            EjectDetail::FailurePercentage { host } => {
                let _ = write!(
                    line,
                    ",\"eject_failure_percentage_event\":{{\"host_success_rate\":{}}}",
                    as_u32(host)
                );
            }
        }
        line.push('}');
        self.file.log_line(&line);
    }

    /// Envoy's `logUneject`: the event's `type` is left at its default
    /// (CONSECUTIVE_5XX) and `enforced` false, as Envoy prints them.
    pub fn log_uneject(
        &self,
        cluster: &str,
        host: &Host,
        num_ejections: u32,
        since_last: Option<Duration>,
    ) {
        let mut line = self.common(
            "CONSECUTIVE_5XX",
            cluster,
            host,
            "UNEJECT",
            num_ejections,
            false,
            since_last,
        );
        line.push('}');
        self.file.log_line(&line);
    }

    /// The fields every event has, in the proto's field order; the object is
    /// left open.
    #[allow(clippy::too_many_arguments)]
    fn common(
        &self,
        kind: &str,
        cluster: &str,
        host: &Host,
        action: &str,
        num_ejections: u32,
        enforced: bool,
        since_last: Option<Duration>,
    ) -> String {
        let mut line = format!(
            "{{\"type\":\"{kind}\",\"timestamp\":\"{}\"",
            timestamp_now()
        );
        if let Some(d) = since_last {
            // A UInt64Value: a JSON string.
            let _ = write!(line, ",\"secs_since_last_action\":\"{}\"", d.as_secs());
        }
        let _ = write!(
            line,
            ",\"cluster_name\":{},\"upstream_url\":\"{}\",\"action\":\"{action}\",\
             \"num_ejections\":{num_ejections},\"enforced\":{enforced}",
            json_str(cluster),
            host.address
        );
        line
    }
}

/// A double stored in a uint32 field, as C++ converts it (truncated, clamped).
fn as_u32(v: f64) -> u32 {
    if v.is_nan() || v <= 0.0 {
        0
    } else {
        v.min(f64::from(u32::MAX)) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        let t = timestamp_now();
        assert!(t.ends_with('Z'), "{t}");
        assert!(t.len() == 20 || t.len() == 24, "{t}");
    }

    #[test]
    fn success_rates_truncate_as_uint32() {
        assert_eq!(as_u32(66.67), 66);
        assert_eq!(as_u32(-5.0), 0);
        assert_eq!(as_u32(100.0), 100);
    }
}
