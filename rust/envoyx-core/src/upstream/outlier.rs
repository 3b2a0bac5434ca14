//! Outlier detection (Envoy's `Outlier::DetectorImpl`): passive health from the
//! results of real requests.
//!
//! Workers report each try's result into the host's [`HostMonitor`] (relaxed
//! atomics, no lock). When a consecutive-error counter reaches its threshold the
//! worker posts the host to the cluster's detector task on the control thread,
//! which decides the ejection (enforcement, `max_ejection_percent`), sets
//! `FAILED_OUTLIER_CHECK` and calls [`Cluster::health_changed`]. The same task
//! evaluates success rate and failure percentage every `interval` and unejects
//! hosts whose ejection time has passed, as Envoy's interval timer does.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::cluster::{Cluster, Host, health_flag};
use crate::config::OutlierConfig;
use crate::stats::{Counter, Gauge, StatStore};

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
    /// A non-HTTP transaction failed on the server.
    ExtOriginRequestFailed,
    /// A non-HTTP transaction succeeded.
    ExtOriginRequestSuccess,
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

/// Requests and successes since the last interval.
#[derive(Debug, Default)]
struct Bucket {
    total: AtomicU64,
    success: AtomicU64,
}

impl Bucket {
    fn put(&self, success: bool) {
        self.total.fetch_add(1, Ordering::Relaxed);
        if success {
            self.success.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// (success rate %, volume) of the interval that ended; starts the next one.
    fn take(&self) -> Option<(f64, u64)> {
        let total = self.total.swap(0, Ordering::Relaxed);
        let success = self.success.swap(0, Ordering::Relaxed);
        (total > 0).then(|| (success.min(total) as f64 * 100.0 / total as f64, total))
    }
}

/// One host's outlier counters, written by every worker (Envoy's
/// `DetectorHostMonitorImpl`, minus what only the detector task touches).
#[derive(Debug)]
pub struct HostMonitor {
    consecutive_5xx: AtomicU32,
    consecutive_gateway_failure: AtomicU32,
    consecutive_local_origin_failure: AtomicU32,
    external: Bucket,
    local: Bucket,
    /// Last interval's success rates (f64 bits; -1 when not computed), for `/clusters`.
    success_rate: AtomicU64,
    local_origin_success_rate: AtomicU64,
}

impl Default for HostMonitor {
    fn default() -> Self {
        HostMonitor {
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway_failure: AtomicU32::new(0),
            consecutive_local_origin_failure: AtomicU32::new(0),
            external: Bucket::default(),
            local: Bucket::default(),
            success_rate: AtomicU64::new((-1.0f64).to_bits()),
            local_origin_success_rate: AtomicU64::new((-1.0f64).to_bits()),
        }
    }
}

impl HostMonitor {
    /// The external-origin success rate of the last interval (-1: none).
    pub fn success_rate(&self) -> f64 {
        f64::from_bits(self.success_rate.load(Ordering::Relaxed))
    }

    pub fn local_origin_success_rate(&self) -> f64 {
        f64::from_bits(self.local_origin_success_rate.load(Ordering::Relaxed))
    }

    fn reset_consecutive(&self) {
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway_failure.store(0, Ordering::Relaxed);
        self.consecutive_local_origin_failure
            .store(0, Ordering::Relaxed);
    }
}

/// Reports a try's response status to the cluster's outlier detector, if any.
#[inline]
pub fn put_http_response_code(cluster: &Cluster, host: &Arc<Host>, code: u16) {
    if let Some(d) = &cluster.outlier {
        d.put_http_response_code(host, code);
    }
}

/// Reports a try's connection-level result to the cluster's outlier detector, if any.
#[inline]
pub fn put_result(cluster: &Cluster, host: &Arc<Host>, result: LocalOriginEvent) {
    if let Some(d) = &cluster.outlier {
        d.put_result(host, result);
    }
}

/// `cluster.<name>.outlier_detection.*`, all created up front as in Envoy.
#[derive(Debug)]
struct OutlierStats {
    ejections_active: Gauge,
    ejections_overflow: Counter,
    ejections_total: Counter,
    ejections_consecutive_5xx: Counter,
    ejections_success_rate: Counter,
    ejections_enforced_total: Counter,
    /// Envoy 1.40 counts degraded-host detection here; envoyx has none (always 0).
    #[allow(dead_code)]
    ejections_detected_degradation: Counter,
    /// (detected, enforced) per [`EjectionType`], in its order.
    by_type: [(Counter, Counter); 7],
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
enum Event {
    Consecutive(Arc<Host>, EjectionType),
    /// Active health checking passed a host (`successful_active_health_check_uneject_host`).
    HealthCheckPassed(Arc<Host>),
}

/// A cluster's outlier detector: the config, the stats, and the way to its task.
#[derive(Debug)]
pub struct Detector {
    pub config: OutlierConfig,
    stats: OutlierStats,
    events: mpsc::UnboundedSender<Event>,
    /// Taken by the task when it starts.
    receiver: Mutex<Option<mpsc::UnboundedReceiver<Event>>>,
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Event")
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
            m.consecutive_5xx.store(0, Ordering::Relaxed);
            m.consecutive_gateway_failure.store(0, Ordering::Relaxed);
        }
    }

    /// Envoy's `putResult`: local-origin results count on their own with
    /// `split_external_local_origin_errors`, else as the HTTP status they map to.
    pub fn put_result(&self, host: &Arc<Host>, result: LocalOriginEvent) {
        use LocalOriginEvent::*;
        if !self.config.split_external_local_origin_errors {
            let code = match result {
                ExtOriginRequestSuccess | ConnectSuccessFinal => 200,
                Timeout => 504,
                ConnectFailed => 503,
                ExtOriginRequestFailed => 500,
                ConnectSuccess => return,
            };
            return self.put_http_response_code(host, code);
        }
        let m = &host.outlier;
        match result {
            ConnectSuccess | ConnectSuccessFinal => {
                m.local.put(true);
                m.consecutive_local_origin_failure
                    .store(0, Ordering::Relaxed);
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
            ExtOriginRequestFailed => self.put_http_response_code(host, 503),
            ExtOriginRequestSuccess => {
                self.put_http_response_code(host, 200);
                m.local.put(true);
                m.consecutive_local_origin_failure
                    .store(0, Ordering::Relaxed);
            }
        }
    }

    /// Active health checking found `host` healthy.
    pub fn health_check_passed(&self, host: &Arc<Host>) {
        if self.config.successful_active_health_check_uneject_host {
            let _ = self.events.send(Event::HealthCheckPassed(host.clone()));
        }
    }

    fn enforcing(&self, kind: EjectionType) -> u32 {
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

/// What only the detector task keeps per host.
#[derive(Debug, Default)]
struct EjectionState {
    num_ejections: u32,
    /// Envoy's `ejectTimeBackoff`: the multiple of `base_ejection_time`.
    backoff: u32,
    last_ejection: Option<Instant>,
    last_unejection: Option<Instant>,
    jitter: Duration,
}

/// The detector task of one cluster, on the control thread; ends with the cluster.
pub async fn run(cluster: Arc<Cluster>) {
    let Some(detector) = cluster.outlier.as_ref() else {
        return;
    };
    let Some(mut events) = detector
        .receiver
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    else {
        return;
    };
    let mut task = DetectorTask {
        cluster: &cluster,
        detector,
        states: HashMap::new(),
    };
    let interval = detector.config.interval;
    let mut next = Instant::now() + interval;
    // The cluster's removal is noticed at least once a second.
    let poll = Duration::from_secs(1);
    loop {
        if cluster.removed.load(Ordering::Relaxed) {
            return;
        }
        tokio::select! {
            ev = events.recv() => match ev {
                Some(Event::Consecutive(host, kind)) => task.on_consecutive_error(&host, kind),
                Some(Event::HealthCheckPassed(host)) => task.on_health_check_passed(&host),
                None => return,
            },
            _ = tokio::time::sleep_until(next.min(Instant::now() + poll)) => {
                if Instant::now() >= next {
                    task.on_interval(Instant::now());
                    next = Instant::now() + interval;
                }
            }
        }
    }
}

struct DetectorTask<'a> {
    cluster: &'a Cluster,
    detector: &'a Detector,
    /// By host (pointer identity), for the cluster's current hosts.
    states: HashMap<usize, EjectionState>,
}

fn key(host: &Arc<Host>) -> usize {
    Arc::as_ptr(host) as usize
}

impl DetectorTask<'_> {
    fn current(&self, host: &Arc<Host>) -> bool {
        self.cluster
            .hosts
            .load()
            .iter()
            .any(|h| Arc::ptr_eq(h, host))
    }

    fn ejected_count(&self) -> usize {
        self.cluster
            .hosts
            .load()
            .iter()
            .filter(|h| h.health_flags() & health_flag::FAILED_OUTLIER_CHECK != 0)
            .count()
    }

    fn publish(&self) {
        self.detector
            .stats
            .ejections_active
            .set(self.ejected_count() as i64);
        self.cluster.health_changed();
    }

    fn on_consecutive_error(&mut self, host: &Arc<Host>, kind: EjectionType) {
        if !self.current(host) || host.health_flags() & health_flag::FAILED_OUTLIER_CHECK != 0 {
            return;
        }
        self.detector.stats.by_type[kind as usize].0.inc();
        self.eject(host, kind);
        let m = &host.outlier;
        match kind {
            EjectionType::Consecutive5xx => {
                self.detector.stats.ejections_consecutive_5xx.inc();
                m.consecutive_5xx.store(0, Ordering::Relaxed);
            }
            EjectionType::ConsecutiveGatewayFailure => {
                m.consecutive_gateway_failure.store(0, Ordering::Relaxed);
            }
            EjectionType::ConsecutiveLocalOriginFailure => {
                m.consecutive_local_origin_failure
                    .store(0, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    fn on_health_check_passed(&mut self, host: &Arc<Host>) {
        let flags = host.health_flags();
        if flags & health_flag::FAILED_OUTLIER_CHECK != 0
            && flags & health_flag::FAILED_ACTIVE_HC == 0
            && self.current(host)
        {
            self.uneject(host, Instant::now());
        }
    }

    /// Envoy's `ejectHost`.
    fn eject(&mut self, host: &Arc<Host>, kind: EjectionType) {
        let config = &self.detector.config;
        let stats = &self.detector.stats;
        let hosts = self.cluster.hosts.load().len().max(1);
        let active = self.ejected_count();
        let ejected_percent = 100.0 * (active + 1) as f64 / hosts as f64;
        let mut should_eject = ejected_percent <= f64::from(config.max_ejection_percent.min(100));
        if config.always_eject_one_host {
            should_eject |= active == 0;
        }
        if !should_eject {
            stats.ejections_overflow.inc();
            return;
        }
        if matches!(
            kind,
            EjectionType::Consecutive5xx | EjectionType::SuccessRate
        ) {
            stats.ejections_total.inc();
        }
        let enforcing = self.detector.enforcing(kind);
        if rand::rng().random_range(0..100) >= enforcing {
            return;
        }
        stats.ejections_enforced_total.inc();
        stats.by_type[kind as usize].1.inc();
        host.set_health_flag(health_flag::FAILED_OUTLIER_CHECK);
        let state = self.states.entry(key(host)).or_default();
        state.num_ejections += 1;
        state.last_ejection = Some(Instant::now());
        let jitter_ms = config.max_ejection_time_jitter.as_millis() as u64;
        state.jitter = Duration::from_millis(rand::rng().random_range(0..=jitter_ms));
        let base = config.base_ejection_time;
        if base * state.backoff < config.max_ejection_time + base {
            state.backoff += 1;
        }
        crate::log!(
            Debug,
            "upstream",
            "outlier detection: cluster '{}' ejected {} ({kind:?})",
            self.cluster.name,
            host.address
        );
        self.publish();
    }

    fn uneject(&mut self, host: &Arc<Host>, now: Instant) {
        host.clear_health_flag(health_flag::FAILED_OUTLIER_CHECK);
        host.outlier.reset_consecutive();
        self.states.entry(key(host)).or_default().last_unejection = Some(now);
        self.publish();
    }

    /// Envoy's `onIntervalTimer`.
    fn on_interval(&mut self, now: Instant) {
        let hosts = self.cluster.hosts.load_full();
        let live: std::collections::HashSet<usize> = hosts.iter().map(key).collect();
        self.states.retain(|k, _| live.contains(k));
        let config = self.detector.config.clone();
        for host in hosts.iter() {
            if host.health_flags() & health_flag::FAILED_OUTLIER_CHECK != 0 {
                let state = self.states.entry(key(host)).or_default();
                let eject_time = (config.base_ejection_time * state.backoff)
                    .min(config.max_ejection_time)
                    + state.jitter;
                let since = state.last_ejection.map_or(Duration::MAX, |t| now - t);
                if eject_time <= since {
                    self.uneject(host, now);
                }
            }
        }
        self.success_rate_ejections(&hosts, false);
        self.success_rate_ejections(&hosts, true);
        for host in hosts.iter() {
            if host.health_flags() & health_flag::FAILED_OUTLIER_CHECK == 0
                && let Some(state) = self.states.get_mut(&key(host))
                && state
                    .last_unejection
                    .is_some_and(|t| now - t >= config.interval)
                && state.backoff > 0
            {
                state.backoff -= 1;
            }
        }
        // A removed host's ejection no longer counts.
        self.detector
            .stats
            .ejections_active
            .set(self.ejected_count() as i64);
    }

    /// Envoy's `processSuccessRateEjections` for one origin.
    fn success_rate_ejections(&mut self, hosts: &[Arc<Host>], local: bool) {
        let c = self.detector.config.clone();
        let mut rates: Vec<(Arc<Host>, f64, u64)> = Vec::new();
        for host in hosts {
            let m = &host.outlier;
            let (bucket, slot) = if local {
                (&m.local, &m.local_origin_success_rate)
            } else {
                (&m.external, &m.success_rate)
            };
            let taken = bucket.take();
            slot.store((-1.0f64).to_bits(), Ordering::Relaxed);
            if host.health_flags() & health_flag::FAILED_OUTLIER_CHECK != 0 {
                continue;
            }
            let Some((rate, volume)) = taken else {
                continue;
            };
            if volume
                >= u64::from(
                    c.success_rate_request_volume
                        .min(c.failure_percentage_request_volume),
                )
            {
                slot.store(rate.to_bits(), Ordering::Relaxed);
            }
            rates.push((host.clone(), rate, volume));
        }
        if hosts.len() < c.success_rate_minimum_hosts as usize
            && hosts.len() < c.failure_percentage_minimum_hosts as usize
        {
            return;
        }
        let sr: Vec<&(Arc<Host>, f64, u64)> = rates
            .iter()
            .filter(|(_, _, v)| *v >= u64::from(c.success_rate_request_volume))
            .collect();
        if !sr.is_empty() && sr.len() >= c.success_rate_minimum_hosts as usize {
            let n = sr.len() as f64;
            let mean = sr.iter().map(|(_, r, _)| r).sum::<f64>() / n;
            let variance = sr.iter().map(|(_, r, _)| (r - mean).powi(2)).sum::<f64>() / n;
            let threshold =
                mean - f64::from(c.success_rate_stdev_factor) / 1000.0 * variance.sqrt();
            for (host, rate, _) in sr {
                if *rate < threshold {
                    self.detector.stats.ejections_success_rate.inc();
                    let kind = if local {
                        EjectionType::SuccessRateLocalOrigin
                    } else {
                        EjectionType::SuccessRate
                    };
                    self.detector.stats.by_type[kind as usize].0.inc();
                    self.eject(host, kind);
                }
            }
        }
        let fp: Vec<&(Arc<Host>, f64, u64)> = rates
            .iter()
            .filter(|(_, _, v)| *v >= u64::from(c.failure_percentage_request_volume))
            .collect();
        if !fp.is_empty() && fp.len() >= c.failure_percentage_minimum_hosts as usize {
            for (host, rate, _) in fp {
                if 100.0 - rate >= f64::from(c.failure_percentage_threshold)
                    && host.health_flags() & health_flag::FAILED_OUTLIER_CHECK == 0
                {
                    let kind = if local {
                        EjectionType::FailurePercentageLocalOrigin
                    } else {
                        EjectionType::FailurePercentage
                    };
                    self.detector.stats.by_type[kind as usize].0.inc();
                    self.eject(host, kind);
                }
            }
        }
    }
}
