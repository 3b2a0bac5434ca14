//! A cluster's outlier detector as the workers see it: what they report a try's
//! result to, and the counters that decide when the detector task must look.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::config::OutlierConfig;
use crate::stats::{Counter, Gauge, StatStore};
use crate::upstream::host::Host;

/// A try's result that is not an HTTP status (Envoy's `Outlier::Result`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalOriginEvent {
    /// Connected; the request goes on (an error may still come as a status).
    ConnectSuccess,
    /// Connected, and that is the whole transaction.
    ConnectSuccessFinal,
    /// No connection could be had, or it reset before the response.
    ConnectFailed,
    /// No response within the timeout.
    Timeout,
}

/// Envoy's `OutlierEjectionType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EjectionType {
    Consecutive5xx,
    ConsecutiveGatewayFailure,
    ConsecutiveLocalOriginFailure,
    SuccessRate,
    SuccessRateLocalOrigin,
    FailurePercentage,
    FailurePercentageLocalOrigin,
}

/// `cluster.<name>.outlier_detection.*`, all created up front as in Envoy.
#[derive(Debug)]
pub(super) struct OutlierStats {
    pub(super) ejections_active: Gauge,
    pub(super) ejections_overflow: Counter,
    pub(super) ejections_total: Counter,
    pub(super) ejections_consecutive_5xx: Counter,
    pub(super) ejections_success_rate: Counter,
    pub(super) ejections_enforced_total: Counter,
    /// Envoy 1.40 counts degraded-host detection here; envoyx has none (always 0).
    #[allow(dead_code)]
    pub(super) ejections_detected_degradation: Counter,
    /// (detected, enforced) per [`EjectionType`], in its order.
    pub(super) by_type: [(Counter, Counter); 7],
}

impl OutlierStats {
    fn new(store: &StatStore, cluster: &str) -> Self {
        let c = |s: &str| store.counter(&format!("cluster.{cluster}.outlier_detection.{s}"));
        let pair = |s: &str| {
            (
                c(&format!("ejections_detected_{s}")),
                c(&format!("ejections_enforced_{s}")),
            )
        };
        OutlierStats {
            ejections_active: store.gauge(&format!(
                "cluster.{cluster}.outlier_detection.ejections_active"
            )),
            ejections_overflow: c("ejections_overflow"),
            ejections_total: c("ejections_total"),
            ejections_consecutive_5xx: c("ejections_consecutive_5xx"),
            ejections_success_rate: c("ejections_success_rate"),
            ejections_enforced_total: c("ejections_enforced_total"),
            ejections_detected_degradation: c("ejections_detected_degradation"),
            by_type: [
                pair("consecutive_5xx"),
                pair("consecutive_gateway_failure"),
                pair("consecutive_local_origin_failure"),
                pair("success_rate"),
                pair("local_origin_success_rate"),
                pair("failure_percentage"),
                pair("local_origin_failure_percentage"),
            ],
        }
    }
}

/// What reaches the detector task.
pub(super) enum Event {
    Consecutive(Arc<Host>, EjectionType),
    /// Active health checking passed a host (`successful_active_health_check_uneject_host`).
    HealthCheckPassed(Arc<Host>),
}

/// A cluster's outlier detector: the config, the stats, and the way to its task.
#[derive(Debug)]
pub struct Detector {
    pub config: OutlierConfig,
    pub(super) stats: OutlierStats,
    pub(super) events: mpsc::UnboundedSender<Event>,
    /// Taken by the task when it starts.
    pub(super) receiver: Mutex<Option<mpsc::UnboundedReceiver<Event>>>,
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Event")
    }
}

/// Zeroes a consecutive-error counter, writing only when it is not zero already.
fn reset(counter: &std::sync::atomic::AtomicU32) {
    if counter.load(Ordering::Relaxed) != 0 {
        counter.store(0, Ordering::Relaxed);
    }
}

fn is_gateway_error(code: u16) -> bool {
    matches!(code, 502..=504)
}

impl Detector {
    pub fn new(config: OutlierConfig, store: &StatStore, cluster: &str) -> Self {
        let (events, receiver) = mpsc::unbounded_channel();
        Detector {
            config,
            stats: OutlierStats::new(store, cluster),
            events,
            receiver: Mutex::new(Some(receiver)),
        }
    }

    fn notify(&self, host: &Arc<Host>, kind: EjectionType) {
        let _ = self.events.send(Event::Consecutive(host.clone(), kind));
    }

    /// Envoy's `putHttpResponseCode`.
    pub fn put_http_response_code(&self, host: &Arc<Host>, code: u16) {
        let m = &host.outlier;
        if (500..600).contains(&code) {
            m.external.put(false);
            if is_gateway_error(code) {
                let n = m
                    .consecutive_gateway_failure
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                if n == self.config.consecutive_gateway_failure {
                    self.notify(host, EjectionType::ConsecutiveGatewayFailure);
                }
            } else {
                m.consecutive_gateway_failure.store(0, Ordering::Relaxed);
            }
            let n = m.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
            if n == self.config.consecutive_5xx {
                self.notify(host, EjectionType::Consecutive5xx);
            }
        } else {
            m.external.put(true);
            // Stores only when set: the line is shared by every worker, and a
            // healthy host's counters stay at 0 (no write per response).
            reset(&m.consecutive_5xx);
            reset(&m.consecutive_gateway_failure);
        }
    }

    /// Envoy's `putResult`: local-origin results count on their own with
    /// `split_external_local_origin_errors`, else as the HTTP status they map to.
    pub fn put_result(&self, host: &Arc<Host>, result: LocalOriginEvent) {
        use LocalOriginEvent::*;
        if !self.config.split_external_local_origin_errors {
            let code = match result {
                ConnectSuccessFinal => 200,
                Timeout => 504,
                ConnectFailed => 503,
                ConnectSuccess => return,
            };
            return self.put_http_response_code(host, code);
        }
        let m = &host.outlier;
        match result {
            ConnectSuccess | ConnectSuccessFinal => {
                m.local.put(true);
                reset(&m.consecutive_local_origin_failure);
            }
            Timeout | ConnectFailed => {
                m.local.put(false);
                let n = m
                    .consecutive_local_origin_failure
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                if n == self.config.consecutive_local_origin_failure {
                    self.notify(host, EjectionType::ConsecutiveLocalOriginFailure);
                }
            }
        }
    }

    /// Active health checking found `host` healthy.
    pub fn health_check_passed(&self, host: &Arc<Host>) {
        if self.config.successful_active_health_check_uneject_host {
            let _ = self.events.send(Event::HealthCheckPassed(host.clone()));
        }
    }

    pub(super) fn enforcing(&self, kind: EjectionType) -> u32 {
        let c = &self.config;
        match kind {
            EjectionType::Consecutive5xx => c.enforcing_consecutive_5xx,
            EjectionType::ConsecutiveGatewayFailure => c.enforcing_consecutive_gateway_failure,
            EjectionType::ConsecutiveLocalOriginFailure => {
                c.enforcing_consecutive_local_origin_failure
            }
            EjectionType::SuccessRate => c.enforcing_success_rate,
            EjectionType::SuccessRateLocalOrigin => c.enforcing_local_origin_success_rate,
            EjectionType::FailurePercentage => c.enforcing_failure_percentage,
            EjectionType::FailurePercentageLocalOrigin => {
                c.enforcing_failure_percentage_local_origin
            }
        }
    }
}
