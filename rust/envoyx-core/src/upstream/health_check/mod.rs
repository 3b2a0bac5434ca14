//! Active health checking (Envoy's `HealthCheckerImplBase` and its HTTP, TCP and
//! gRPC checkers).
//!
//! Checks run on the control thread, never on a worker: each cluster with
//! `health_checks` has a supervisor task that keeps one session task per host
//! (started for hosts DNS or EDS add, aborted for hosts they remove, all ended
//! when the cluster is removed or replaced). A session's verdict is published in
//! the host's [`health_flag`] bits followed by [`Cluster::health_changed`]; the
//! workers' load balancers rebuild their host sets from those on their next pick,
//! without a lock.
//!
//! As in Envoy, a host of a cluster with health checks starts with
//! `FAILED_ACTIVE_HC`, its first passing check makes it healthy at once, and the
//! cluster warms until every host it started with has had its first check.

pub mod checker;
mod event_log;
mod grpc;
mod http;
mod tcp;

pub use checker::HealthChecker;

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::cluster::{Cluster, ClusterManager, Host, health_flag};
use super::connect::UpstreamStream;
use crate::config::health_check::HealthCheckKind;
use crate::http::headers::X_ENVOY_IMMEDIATE_HEALTH_CHECK_FAIL;
use event_log::FailureType;

/// Marks `host` failed at once when a response carries
/// `x-envoy-immediate-health-check-fail` and the cluster is health checked
/// (Envoy's `HealthCheckHostMonitor::setUnhealthy(ImmediateHealthCheckFail)`).
#[inline]
pub fn check_immediate_fail(cluster: &Cluster, host: &Arc<Host>, headers: &::http::HeaderMap) {
    if let Some(hc) = &cluster.health_checker
        && headers.contains_key(&X_ENVOY_IMMEDIATE_HEALTH_CHECK_FAIL)
    {
        // Only a newly set flag moves the health epoch: each move makes every
        // worker rebuild its host sets (a ring or Maglev table too), and a draining
        // host may send the header on every response.
        if host.set_health_flag(health_flag::EXCLUDED_VIA_IMMEDIATE_HC_FAIL) {
            cluster.health_changed();
        }
        let _ = hc.passive.send(host.clone());
    }
}

/// Starts the background tasks of a cluster (its health checker and outlier
/// detector) on the control runtime `rt`.
pub fn start(rt: &tokio::runtime::Handle, cluster: &Arc<Cluster>, cm: &Arc<ClusterManager>) {
    let logs = cm.event_logs();
    if cluster.outlier.is_some() {
        rt.spawn(super::outlier::run(cluster.clone(), logs.outlier.clone()));
    }
    if let Some(hc) = &cluster.health_checker {
        hc.open_event_log(&cluster.name, logs.file_flush);
        rt.spawn(supervise(cluster.clone(), Arc::downgrade(cm)));
    }
}

/// Starts the background tasks of the bootstrap's clusters and waits for their
/// first round of health checks, as Envoy's cluster initialization does before
/// the listeners serve.
pub async fn start_bootstrap(cm: &Arc<ClusterManager>) {
    let rt = tokio::runtime::Handle::current();
    let clusters = cm.all();
    for c in &clusters {
        start(&rt, c, cm);
    }
    for c in clusters {
        // An EDS cluster's hosts come later, over xDS: nothing to wait for here.
        if let Some(hc) = c.health_checker.as_ref().filter(|_| c.hosts_ready()) {
            while !hc.is_warm() && !c.removed.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Identity of a host (pointer) within the supervisor.
fn key(host: &Arc<Host>) -> usize {
    Arc::as_ptr(host) as usize
}

struct SessionHandle {
    host: Arc<Host>,
    task: JoinHandle<()>,
    passive: mpsc::UnboundedSender<()>,
}

/// Keeps a session per current host of the cluster until the cluster is removed.
async fn supervise(cluster: Arc<Cluster>, cm: Weak<ClusterManager>) {
    let Some(hc) = cluster.health_checker.clone() else {
        return;
    };
    let Some(mut passive_rx) = hc
        .passive_rx
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    else {
        return;
    };
    let mut sessions: HashMap<usize, SessionHandle> = HashMap::new();
    let (first_tx, mut first_rx) = mpsc::unbounded_channel::<usize>();
    // The hosts whose first check the cluster's warming waits for.
    let mut first_pending: Option<HashSet<usize>> = None;
    loop {
        if cluster.removed.load(Ordering::Relaxed) {
            for (_, s) in sessions.drain() {
                s.task.abort();
            }
            return;
        }
        let hosts = cluster.hosts.load_full();
        let current: HashSet<usize> = hosts.iter().map(key).collect();
        sessions.retain(|k, s| {
            if current.contains(k) {
                return true;
            }
            s.task.abort();
            // Envoy's onDeferredDeleteBase: the removed host leaves the gauges.
            let flags = s.host.health_flags();
            if flags & health_flag::FAILED_ACTIVE_HC == 0 {
                hc.stats.healthy.dec();
            }
            if flags & health_flag::DEGRADED_ACTIVE_HC != 0 {
                hc.stats.degraded.dec();
            }
            false
        });
        if let Some(pending) = &mut first_pending {
            pending.retain(|k| current.contains(k));
        }
        for host in hosts.iter() {
            sessions.entry(key(host)).or_insert_with(|| {
                let (passive, passive_rx) = mpsc::unbounded_channel();
                let session = Session::new(cluster.clone(), hc.clone(), host.clone());
                SessionHandle {
                    host: host.clone(),
                    task: tokio::spawn(session.run(passive_rx, first_tx.clone())),
                    passive,
                }
            });
        }
        if first_pending.is_none() && cluster.hosts_ready() {
            first_pending = Some(current);
        }
        if !hc.is_warm() && first_pending.as_ref().is_some_and(HashSet::is_empty) {
            hc.warm.store(true, Ordering::Release);
            if let Some(cm) = cm.upgrade() {
                cm.promote(&cluster);
            }
        }
        tokio::select! {
            _ = cluster.hosts_changed.notified() => {}
            Some(k) = first_rx.recv() => {
                if let Some(pending) = &mut first_pending {
                    pending.remove(&k);
                }
            }
            Some(host) = passive_rx.recv() => {
                if let Some(s) = sessions.get(&key(&host)) {
                    let _ = s.passive.send(());
                }
            }
            // The cluster's removal is noticed at least once a second.
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// What one check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Healthy {
        degraded: bool,
    },
    /// `status`: the HTTP status of a failed answer (0 when there was none),
    /// reported in the failure's events.
    Failed {
        kind: FailureType,
        retriable: bool,
        status: u16,
    },
}

impl Outcome {
    const NETWORK: Outcome = Outcome::Failed {
        kind: FailureType::Network,
        retriable: false,
        status: 0,
    };
    const ACTIVE: Outcome = Outcome::Failed {
        kind: FailureType::Active,
        retriable: false,
        status: 0,
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transition {
    Unchanged,
    Changed,
    ChangePending,
}

/// A session's open connection, kept between checks with `reuse_connection`.
enum Conn {
    Http(http::Conn),
    Tcp(UpstreamStream),
}

/// Checks one host, one check at a time (Envoy's `ActiveHealthCheckSession`).
struct Session {
    cluster: Arc<Cluster>,
    hc: Arc<HealthChecker>,
    host: Arc<Host>,
    first_check: bool,
    num_healthy: u32,
    num_unhealthy: u32,
    conn: Option<Conn>,
}

impl Session {
    fn new(cluster: Arc<Cluster>, hc: Arc<HealthChecker>, host: Arc<Host>) -> Self {
        let flags = host.health_flags();
        if flags & health_flag::FAILED_ACTIVE_HC == 0 {
            hc.stats.healthy.inc();
        }
        if flags & health_flag::DEGRADED_ACTIVE_HC != 0 {
            hc.stats.degraded.inc();
        }
        Session {
            cluster,
            hc,
            host,
            first_check: true,
            num_healthy: 0,
            num_unhealthy: 0,
            conn: None,
        }
    }

    async fn run(
        mut self,
        mut passive: mpsc::UnboundedReceiver<()>,
        first: mpsc::UnboundedSender<usize>,
    ) {
        let config = self.hc.config.clone();
        if !config.initial_jitter.is_zero() {
            tokio::time::sleep(jitter(config.initial_jitter)).await;
        }
        loop {
            self.hc.stats.attempt.inc();
            let outcome = match tokio::time::timeout(config.timeout, self.check()).await {
                Ok(outcome) => outcome,
                Err(_elapsed) => {
                    self.conn = None;
                    Outcome::Failed {
                        kind: FailureType::NetworkTimeout,
                        retriable: false,
                        status: 0,
                    }
                }
            };
            let was_first = self.first_check;
            let (healthy, transition) = match outcome {
                Outcome::Healthy { degraded } => (true, self.handle_success(degraded)),
                Outcome::Failed {
                    kind,
                    retriable,
                    status,
                } => {
                    if matches!(kind, FailureType::Network | FailureType::NetworkTimeout) {
                        self.conn = None;
                    }
                    (false, self.set_unhealthy(kind, retriable, status))
                }
            };
            if was_first {
                let _ = first.send(key(&self.host));
            }
            let deadline = tokio::time::Instant::now() + self.interval(healthy, transition);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => break,
                    Some(()) = passive.recv() => {
                        self.set_unhealthy(FailureType::Passive, false, 0);
                    }
                }
            }
        }
    }

    /// One check by the configured kind; never panics on what the host sends.
    async fn check(&mut self) -> Outcome {
        let config = &self.hc.config;
        match &config.kind {
            HealthCheckKind::Http(h) => {
                let conn = match self.conn.take() {
                    Some(Conn::Http(c)) => Some(c),
                    _ => None,
                };
                let verify = &self.hc.stats.verify_cluster;
                let (outcome, conn) = http::check(&self.cluster, &self.host, h, conn, verify).await;
                self.conn = conn.filter(|_| config.reuse_connection).map(Conn::Http);
                outcome
            }
            HealthCheckKind::Grpc(g) => {
                let conn = match self.conn.take() {
                    Some(Conn::Http(c)) => Some(c),
                    _ => None,
                };
                let (outcome, conn) = grpc::check(&self.cluster, &self.host, g, conn).await;
                self.conn = conn.filter(|_| config.reuse_connection).map(Conn::Http);
                outcome
            }
            HealthCheckKind::Tcp(t) => {
                let conn = match self.conn.take() {
                    Some(Conn::Tcp(c)) => Some(c),
                    _ => None,
                };
                let (outcome, conn) = tcp::check(&self.cluster, &self.host, t, conn).await;
                self.conn = conn.filter(|_| config.reuse_connection).map(Conn::Tcp);
                outcome
            }
        }
    }

    fn flag(&self, flag: u32) -> bool {
        self.host.health_flags() & flag != 0
    }

    /// Envoy's `handleSuccess`.
    fn handle_success(&mut self, degraded: bool) -> Transition {
        let before = self.host.health_flags();
        self.num_unhealthy = 0;
        let mut transition = Transition::Unchanged;
        if self.flag(health_flag::FAILED_ACTIVE_HC) {
            if self.first_check || {
                self.num_healthy += 1;
                self.num_healthy == self.hc.config.healthy_threshold
            } {
                self.host.clear_health_flag(
                    health_flag::ACTIVE_HC_TIMEOUT
                        | health_flag::EXCLUDED_VIA_IMMEDIATE_HC_FAIL
                        | health_flag::FAILED_ACTIVE_HC,
                );
                self.hc.stats.healthy.inc();
                transition = Transition::Changed;
                if let Some(log) = self.hc.event_log() {
                    log.add_healthy(&self.host, self.first_check);
                }
            } else {
                transition = Transition::ChangePending;
            }
        }
        if transition != Transition::Changed
            && self.hc.config.always_log_health_check_success
            && let Some(log) = self.hc.event_log()
        {
            log.success(&self.host);
        }
        transition = self.clear_pending(transition);
        if degraded != self.flag(health_flag::DEGRADED_ACTIVE_HC) {
            if degraded {
                self.host.set_health_flag(health_flag::DEGRADED_ACTIVE_HC);
                self.hc.stats.degraded.inc();
                if let Some(log) = self.hc.event_log() {
                    log.degraded(&self.host);
                }
            } else {
                if let Some(log) = self.hc.event_log() {
                    log.no_longer_degraded(&self.host);
                }
                self.host.clear_health_flag(health_flag::DEGRADED_ACTIVE_HC);
                self.hc.stats.degraded.dec();
            }
            if transition == Transition::Unchanged {
                transition = Transition::Changed;
            }
        }
        self.hc.stats.success.inc();
        self.first_check = false;
        if let Some(outlier) = &self.cluster.outlier
            && self.flag(health_flag::FAILED_OUTLIER_CHECK)
            && !self.flag(health_flag::FAILED_ACTIVE_HC)
        {
            outlier.health_check_passed(&self.host);
        }
        self.publish(before);
        transition
    }

    /// Envoy's `setUnhealthy`: a failed response fails the host at once; network
    /// failures and retriable statuses count against `unhealthy_threshold`.
    fn set_unhealthy(&mut self, kind: FailureType, retriable: bool, status: u16) -> Transition {
        let before = self.host.health_flags();
        let network = matches!(kind, FailureType::Network | FailureType::NetworkTimeout);
        self.num_healthy = 0;
        let mut transition = Transition::Unchanged;
        if !self.flag(health_flag::FAILED_ACTIVE_HC) {
            if (!network && !retriable) || {
                self.num_unhealthy += 1;
                self.num_unhealthy == self.hc.config.unhealthy_threshold
            } {
                self.host.set_health_flag(health_flag::FAILED_ACTIVE_HC);
                self.hc.stats.healthy.dec();
                transition = Transition::Changed;
                if let Some(log) = self.hc.event_log() {
                    log.eject_unhealthy(&self.host, kind, status);
                }
                if self.flag(health_flag::PENDING_DYNAMIC_REMOVAL) {
                    self.cluster.remove_pending_host(&self.host);
                }
            } else {
                transition = Transition::ChangePending;
            }
        }
        if kind == FailureType::NetworkTimeout && self.flag(health_flag::FAILED_ACTIVE_HC) {
            self.host.set_health_flag(health_flag::ACTIVE_HC_TIMEOUT);
        } else {
            self.host.clear_health_flag(health_flag::ACTIVE_HC_TIMEOUT);
        }
        transition = self.clear_pending(transition);
        if (self.first_check || self.hc.config.always_log_health_check_failures)
            && let Some(log) = self.hc.event_log()
        {
            log.failure(&self.host, kind, self.first_check, status);
        }
        self.hc.stats.failure.inc();
        if network {
            self.hc.stats.network_failure.inc();
        } else if kind == FailureType::Passive {
            self.hc.stats.passive_failure.inc();
        }
        self.first_check = false;
        self.publish(before);
        transition
    }

    fn clear_pending(&self, transition: Transition) -> Transition {
        if self.host.clear_health_flag(health_flag::PENDING_ACTIVE_HC) {
            Transition::Changed
        } else {
            transition
        }
    }

    /// Tells the workers when the host's flags changed.
    fn publish(&self, before: u32) {
        if self.host.health_flags() != before {
            self.cluster.health_changed();
        }
    }

    /// Envoy's `interval()`: the no-traffic intervals until the cluster has had
    /// upstream traffic, then the edge intervals while a change is pending.
    fn interval(&self, healthy: bool, transition: Transition) -> Duration {
        let c = &self.hc.config;
        let stats = &self.cluster.stats;
        let traffic = stats.upstream_cx_total.get() > 0
            || stats.upstream_cx_tx_bytes_total.get() > 0
            || stats.upstream_cx_rx_bytes_total.get() > 0;
        let pending = transition == Transition::ChangePending;
        let base = match (traffic, healthy) {
            (true, false) if pending => c.unhealthy_edge_interval,
            (true, false) => c.unhealthy_interval,
            (true, true) if pending => c.healthy_edge_interval,
            (true, true) => c.interval,
            (false, true) if !pending => c.no_traffic_healthy_interval,
            (false, _) => c.no_traffic_interval,
        };
        let mut ms = base.as_millis() as u64;
        let percent_mod = u64::from(c.interval_jitter_percent) * ms / 100;
        if percent_mod > 0 {
            ms += rand::rng().random_range(0..percent_mod);
        }
        ms += jitter(c.interval_jitter).as_millis() as u64;
        Duration::from_millis(ms.max(1))
    }
}

/// A random duration below `max` (zero for zero).
fn jitter(max: Duration) -> Duration {
    let ms = max.as_millis() as u64;
    if ms == 0 {
        Duration::ZERO
    } else {
        Duration::from_millis(rand::rng().random_range(0..ms))
    }
}

/// A connection for health checking: no cluster connection stats (Envoy's
/// `createHealthCheckConnection`), the cluster's source address and TLS when it
/// has them.
async fn open(cluster: &Cluster, address: SocketAddr) -> io::Result<UpstreamStream> {
    let tcp = crate::upstream::connect_tcp(cluster, address).await?;
    let _ = tcp.set_nodelay(true);
    match &cluster.tls {
        None => Ok(UpstreamStream::Plain(tcp)),
        Some(tls) => {
            let sni = tls.sni_for(None);
            tls.connect(tcp, sni.as_deref(), address)
                .await
                .map(|s| UpstreamStream::Tls(Box::new(s)))
                .map_err(io::Error::other)
        }
    }
}
