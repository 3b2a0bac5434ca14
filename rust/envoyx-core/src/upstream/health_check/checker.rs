//! A cluster's active health checker as the cluster holds it: its config, its
//! stats, whether its first round is done, and the way workers report an
//! `x-envoy-immediate-health-check-fail` to its sessions (which run in the module
//! above, on the control thread).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::mpsc;

use super::event_log::HealthCheckEventLog;
use crate::access_log::FlushSettings;
use crate::config::health_check::HealthCheckKind;
use crate::config::{HealthCheckConfig, UpstreamProtocol};
use crate::stats::{Counter, Gauge, StatStore};
use crate::upstream::host::{Host, health_flag};

/// `cluster.<name>.health_check.*`.
#[derive(Debug)]
pub(super) struct HealthCheckStats {
    pub(super) attempt: Counter,
    pub(super) success: Counter,
    pub(super) failure: Counter,
    pub(super) passive_failure: Counter,
    pub(super) network_failure: Counter,
    /// Checks whose answer `service_name_matcher` looked at.
    pub(super) verify_cluster: Counter,
    pub(super) healthy: Gauge,
    pub(super) degraded: Gauge,
}

/// A cluster's active health checker: its config, stats, and the way the
/// workers report an `x-envoy-immediate-health-check-fail` to its sessions.
#[derive(Debug)]
pub struct HealthChecker {
    pub config: HealthCheckConfig,
    pub(super) stats: HealthCheckStats,
    /// Every host the cluster started with has had its first check.
    pub(super) warm: AtomicBool,
    pub(super) passive: mpsc::UnboundedSender<Arc<Host>>,
    /// Taken by the supervisor when it starts.
    pub(super) passive_rx: Mutex<Option<mpsc::UnboundedReceiver<Arc<Host>>>>,
    /// The event log, opened when the checker starts (None: no event files).
    pub(super) events: OnceLock<Option<HealthCheckEventLog>>,
}

impl HealthChecker {
    /// The checker of a cluster's `health_checks` (envoyx supports one).
    pub fn new(
        configs: &[HealthCheckConfig],
        protocol: UpstreamProtocol,
        store: &StatStore,
        cluster: &str,
    ) -> Result<Option<Arc<Self>>, String> {
        let Some(config) = configs.first() else {
            return Ok(None);
        };
        if matches!(config.kind, HealthCheckKind::Grpc(_)) && protocol != UpstreamProtocol::Http2 {
            return Err(format!(
                "{cluster} cluster must support HTTP/2 for gRPC healthchecking"
            ));
        }
        // Envoy opens the event files with the checker: a path it cannot open
        // refuses the cluster. They are opened for writing when the checker
        // starts (with the server's flush settings).
        for path in &config.event_log_paths {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("unable to open file '{path}': {e}"))?;
        }
        let c = |s: &str| store.counter(&format!("cluster.{cluster}.health_check.{s}"));
        let g = |s: &str| store.gauge(&format!("cluster.{cluster}.health_check.{s}"));
        let (passive, passive_rx) = mpsc::unbounded_channel();
        Ok(Some(Arc::new(HealthChecker {
            config: config.clone(),
            stats: HealthCheckStats {
                attempt: c("attempt"),
                success: c("success"),
                failure: c("failure"),
                passive_failure: c("passive_failure"),
                network_failure: c("network_failure"),
                verify_cluster: c("verify_cluster"),
                healthy: g("healthy"),
                degraded: g("degraded"),
            },
            warm: AtomicBool::new(false),
            passive,
            passive_rx: Mutex::new(Some(passive_rx)),
            events: OnceLock::new(),
        })))
    }

    /// Opens the event files (once; on the control thread, before the sessions start).
    pub fn open_event_log(&self, cluster: &str, flush: FlushSettings) {
        self.events.get_or_init(|| {
            if self.config.event_log_paths.is_empty() {
                return None;
            }
            let files = self
                .config
                .event_log_paths
                .iter()
                .filter_map(|path| {
                    crate::upstream::outlier::event_log::open(path, flush)
                        .map_err(|e| crate::log!(Error, "upstream", "health check events: {e}"))
                        .ok()
                })
                .collect();
            let checker_type = match self.config.kind {
                HealthCheckKind::Http(_) => "HTTP",
                HealthCheckKind::Tcp(_) => "TCP",
                HealthCheckKind::Grpc(_) => "GRPC",
            };
            Some(HealthCheckEventLog::new(files, checker_type, cluster))
        });
    }

    /// The event log, when the check has event files.
    pub(super) fn event_log(&self) -> Option<&HealthCheckEventLog> {
        self.events.get().and_then(Option::as_ref)
    }

    /// The flags a new host of the cluster starts with (Envoy: unhealthy until checked).
    pub const INITIAL_FLAGS: u32 = health_flag::FAILED_ACTIVE_HC;

    /// Whether the first round of checks is done (the cluster may leave warming).
    pub fn is_warm(&self) -> bool {
        self.warm.load(Ordering::Acquire)
    }
}
