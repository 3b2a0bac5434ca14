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

pub mod detector;
pub mod event_log;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use super::cluster::{Cluster, Host, health_flag};

use detector::Event;
pub use detector::{Detector, EjectionType, LocalOriginEvent};
use event_log::{EjectDetail, OutlierEventLog};

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
/// `log`: the cluster manager's outlier event log, if the bootstrap names one.
pub async fn run(cluster: Arc<Cluster>, log: Option<Arc<OutlierEventLog>>) {
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
        log,
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
    log: Option<Arc<OutlierEventLog>>,
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
        self.eject(host, kind, EjectDetail::Consecutive);
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
    fn eject(&mut self, host: &Arc<Host>, kind: EjectionType, detail: EjectDetail) {
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
        let now = Instant::now();
        let state = self.states.entry(key(host)).or_default();
        if rand::rng().random_range(0..100) >= enforcing {
            if let Some(log) = &self.log {
                let since = state.last_unejection.map(|t| now - t);
                let n = state.num_ejections;
                log.log_eject(&self.cluster.name, host, kind, false, n, since, detail);
            }
            return;
        }
        stats.ejections_enforced_total.inc();
        stats.by_type[kind as usize].1.inc();
        host.set_health_flag(health_flag::FAILED_OUTLIER_CHECK);
        state.num_ejections += 1;
        state.last_ejection = Some(now);
        if let Some(log) = &self.log {
            let since = state.last_unejection.map(|t| now - t);
            let n = state.num_ejections;
            log.log_eject(&self.cluster.name, host, kind, true, n, since, detail);
        }
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
        let state = self.states.entry(key(host)).or_default();
        state.last_unejection = Some(now);
        if let Some(log) = &self.log {
            let since = state.last_ejection.map(|t| now - t);
            log.log_uneject(&self.cluster.name, host, state.num_ejections, since);
        }
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
                    let detail = EjectDetail::SuccessRate {
                        host: *rate,
                        average: mean,
                        threshold,
                    };
                    self.detector.stats.ejections_success_rate.inc();
                    let kind = if local {
                        EjectionType::SuccessRateLocalOrigin
                    } else {
                        EjectionType::SuccessRate
                    };
                    self.detector.stats.by_type[kind as usize].0.inc();
                    self.eject(host, kind, detail);
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
                    self.eject(host, kind, EjectDetail::FailurePercentage { host: *rate });
                }
            }
        }
    }
}
