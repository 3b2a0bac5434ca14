//! A cluster's circuit breakers (Envoy's `ResourceManagerImpl`): per routing
//! priority, counts of the connections, pending requests, active requests and
//! retries in use by every worker, each against its limit.
//!
//! The counts are atomics shared by all workers, with no lock. As in Envoy, a
//! check (`can_create`) and the increment that follows are not one step, so two
//! workers racing may both pass the check and go one over a limit; this is
//! Envoy's own trade of exactness for a lock-free hot path.
//!
//! Stats, with Envoy's names, under `cluster.<name>.circuit_breakers.<priority>.`:
//! `cx_open`, `cx_pool_open`, `rq_pending_open`, `rq_open`, `rq_retry_open` (1
//! while the breaker is open, i.e. its count is at its limit), and with
//! `track_remaining` the `remaining_cx`, `remaining_pending`, `remaining_rq` and
//! `remaining_retries` gauges. The overflow counters (`upstream_cx_overflow`,
//! `upstream_rq_pending_overflow`, `upstream_rq_active_overflow`,
//! `upstream_rq_retry_overflow`) are the cluster's, shared by both priorities.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::config::circuit_breakers::{CircuitBreakers, Priority, RetryBudget, Thresholds};
use crate::stats::{Counter, Gauge, StatStore};

/// One limited resource: its count, its limit, and its gauges.
#[derive(Debug)]
pub struct Resource {
    count: AtomicU64,
    max: u64,
    /// Whether the `*_open` gauge was last set to 1: the gauge is written only
    /// when the state flips, not on every increment.
    open: AtomicBool,
    open_gauge: Gauge,
    /// `remaining_*`, with `track_remaining` only.
    remaining: Option<Gauge>,
    /// Set once a retry budget has been used: the remaining retries then depend
    /// on other counts, which change without touching this one, and Envoy
    /// shows 0 for them from then on.
    remaining_cleared: AtomicBool,
}

impl Resource {
    fn new(max: u64, open_gauge: Gauge, remaining: Option<Gauge>) -> Self {
        if let Some(r) = &remaining {
            r.set(i64::try_from(max).unwrap_or(i64::MAX));
        }
        Resource {
            count: AtomicU64::new(0),
            max,
            open: AtomicBool::new(false),
            open_gauge,
            remaining,
            remaining_cleared: AtomicBool::new(false),
        }
    }

    /// Shows 0 remaining from now on (see `remaining_cleared`).
    fn clear_remaining(&self) {
        if let Some(r) = &self.remaining {
            self.remaining_cleared.store(true, Ordering::Relaxed);
            r.set(0);
        }
    }

    /// Whether one more may be taken without going over the limit.
    pub fn can_create(&self) -> bool {
        self.count() < self.max
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// Takes one, over the limit or not (the caller checked, or goes over on
    /// purpose as Envoy's pool does for a host with no connection at all).
    pub fn inc(&self) {
        let count = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        self.update(count);
    }

    /// Gives one back.
    pub fn dec(&self) {
        let count = self.count.fetch_sub(1, Ordering::Relaxed) - 1;
        self.update(count);
    }

    /// Takes one if the limit allows: the guard gives it back when dropped.
    pub fn try_acquire(&self) -> Option<ResourceGuard<'_>> {
        self.can_create().then(|| self.acquire())
    }

    /// Takes one whatever the limit; the guard gives it back when dropped.
    pub fn acquire(&self) -> ResourceGuard<'_> {
        self.inc();
        ResourceGuard(self)
    }

    fn update(&self, count: u64) {
        let open = count >= self.max;
        if self.open.load(Ordering::Relaxed) != open
            && self.open.swap(open, Ordering::Relaxed) != open
        {
            self.open_gauge.set(i64::from(open));
        }
        if let Some(r) = &self.remaining {
            let remaining = if self.remaining_cleared.load(Ordering::Relaxed) {
                0
            } else {
                self.max.saturating_sub(count)
            };
            r.set(i64::try_from(remaining).unwrap_or(i64::MAX));
        }
    }
}

/// One unit of a [`Resource`], given back when dropped.
#[must_use = "dropping the guard gives the resource back at once"]
pub struct ResourceGuard<'a>(&'a Resource);

impl Drop for ResourceGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The circuit breakers of one priority of one cluster.
#[derive(Debug)]
pub struct ResourceManager {
    /// `max_connections`: connections open or opening, taken when a pool starts
    /// a connection and given back when it closes.
    pub connections: Resource,
    /// `max_pending_requests`: requests waiting for a connection (being opened
    /// for them, or to be released by another request).
    pub pending_requests: Resource,
    /// `max_requests`: requests on a connection, from the moment the pool hands
    /// them one until their stream ends.
    pub requests: Resource,
    /// `max_retries` (or the retry budget): retries in progress.
    retries: Resource,
    retry_budget: Option<RetryBudget>,
    /// `per_host_thresholds[].max_connections`.
    pub max_connections_per_host: Option<u64>,
    /// `cx_pool_open`: envoyx does not limit connection pools
    /// (`max_connection_pools` is refused), so it is always 0, as in Envoy
    /// without that limit.
    _cx_pool_open: Gauge,
}

impl ResourceManager {
    fn new(store: &StatStore, cluster: &str, priority: Priority, t: &Thresholds) -> Self {
        let prefix = format!(
            "cluster.{cluster}.circuit_breakers.{}.",
            priority.stat_name()
        );
        let g = |s: &str| store.gauge(&format!("{prefix}{s}"));
        let remaining = |s: &str| t.track_remaining.then(|| g(s));
        let retries = Resource::new(
            t.max_retries,
            g("rq_retry_open"),
            remaining("remaining_retries"),
        );
        ResourceManager {
            connections: Resource::new(t.max_connections, g("cx_open"), remaining("remaining_cx")),
            pending_requests: Resource::new(
                t.max_pending_requests,
                g("rq_pending_open"),
                remaining("remaining_pending"),
            ),
            requests: Resource::new(t.max_requests, g("rq_open"), remaining("remaining_rq")),
            retries,
            retry_budget: t.retry_budget,
            max_connections_per_host: t.max_connections_per_host,
            _cx_pool_open: g("cx_pool_open"),
        }
    }

    /// How many retries may be in progress now: `max_retries`, or with a retry
    /// budget `budget_percent` of the active plus pending requests, never less
    /// than `min_retry_concurrency` (Envoy's `RetryBudgetImpl::max`).
    pub fn max_retries(&self) -> u64 {
        match self.retry_budget {
            None => self.retries.max(),
            Some(budget) => {
                let active = self.requests.count() + self.pending_requests.count();
                let share = (budget.budget_percent / 100.0 * active as f64) as u64;
                share.max(u64::from(budget.min_retry_concurrency))
            }
        }
    }

    /// Whether one more retry may start now.
    pub fn can_retry(&self) -> bool {
        if self.retry_budget.is_some() {
            self.retries.clear_remaining();
        }
        self.retries.count() < self.max_retries()
    }

    /// For the router's retry loop, when it has decided to retry (Envoy's
    /// `RetryStateImpl::shouldRetry`): a retry slot, held for as long as the retry
    /// is in progress (until the retried try's outcome is known, or the request
    /// ends), or None when `max_retries` / the retry budget is used up — then the
    /// caller does not retry, counts `upstream_rq_retry_overflow` (see
    /// [`ClusterResources::upstream_rq_retry_overflow`]) and flags the response
    /// `UO` as Envoy does.
    pub fn try_acquire_retry(&self) -> Option<ResourceGuard<'_>> {
        if !self.can_retry() {
            return None;
        }
        Some(self.retries.acquire())
    }

    /// Retries in progress.
    pub fn retries_in_progress(&self) -> u64 {
        self.retries.count()
    }
}

/// A cluster's circuit breakers: one [`ResourceManager`] per priority, and the
/// overflow counters.
#[derive(Debug)]
pub struct ClusterResources {
    default: Arc<ResourceManager>,
    high: Arc<ResourceManager>,
    /// A connection was wanted but `max_connections` (or the per-host limit)
    /// was reached.
    pub upstream_cx_overflow: Counter,
    /// A request was refused because `max_pending_requests` was reached.
    pub upstream_rq_pending_overflow: Counter,
    /// A request was refused because `max_requests` was reached (Envoy 1.40's
    /// name; older Envoys counted it as a pending overflow).
    pub upstream_rq_active_overflow: Counter,
    /// A retry was not made because `max_retries` or the budget was used up.
    pub upstream_rq_retry_overflow: Counter,
    /// Kept for Envoy's dashboards: it counts `max_connection_pools` overflows,
    /// and envoyx has no such limit (the field is refused), so it stays 0 as
    /// Envoy's does without one.
    _upstream_cx_pool_overflow: Counter,
}

impl ClusterResources {
    pub fn new(store: &StatStore, cluster: &str, breakers: &CircuitBreakers) -> Self {
        let c = |s: &str| store.counter(&format!("cluster.{cluster}.{s}"));
        let manager =
            |p: Priority| Arc::new(ResourceManager::new(store, cluster, p, breakers.get(p)));
        ClusterResources {
            default: manager(Priority::Default),
            high: manager(Priority::High),
            upstream_cx_overflow: c("upstream_cx_overflow"),
            upstream_rq_pending_overflow: c("upstream_rq_pending_overflow"),
            upstream_rq_active_overflow: c("upstream_rq_active_overflow"),
            upstream_rq_retry_overflow: c("upstream_rq_retry_overflow"),
            _upstream_cx_pool_overflow: c("upstream_cx_pool_overflow"),
        }
    }

    /// The circuit breakers of `priority` (Envoy's `resourceManager(priority)`).
    pub fn get(&self, priority: Priority) -> &Arc<ResourceManager> {
        match priority {
            Priority::Default => &self.default,
            Priority::High => &self.high,
        }
    }

    /// The router's retry check, once its retry policy says to retry: a retry
    /// slot of `priority` ([`ResourceManager::try_acquire_retry`]) to hold while
    /// the retry is in progress, or None — counted in
    /// `upstream_rq_retry_overflow` — when `max_retries` or the retry budget is
    /// used up; the router then returns the try's own response or failure,
    /// flagged `UO`, as Envoy does.
    pub fn try_acquire_retry(&self, priority: Priority) -> Option<ResourceGuard<'_>> {
        let guard = self.get(priority).try_acquire_retry();
        if guard.is_none() {
            self.upstream_rq_retry_overflow.inc();
        }
        guard
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(t: Thresholds) -> (Arc<StatStore>, ClusterResources) {
        let store = StatStore::new();
        let breakers = CircuitBreakers {
            default: t,
            high: Thresholds::default(),
        };
        let r = ClusterResources::new(&store, "c", &breakers);
        (store, r)
    }

    fn gauge(store: &StatStore, name: &str) -> Option<i64> {
        store
            .values()
            .get(&format!("cluster.c.circuit_breakers.{name}"))
            .copied()
    }

    #[test]
    fn limits_open_and_close_with_guards() {
        let (store, r) = resources(Thresholds {
            max_connections: 2,
            track_remaining: true,
            ..Thresholds::default()
        });
        let cx = &r.get(Priority::Default).connections;
        assert_eq!(gauge(&store, "default.remaining_cx"), Some(2));
        let a = cx.try_acquire().unwrap();
        assert_eq!(gauge(&store, "default.cx_open"), Some(0));
        let b = cx.try_acquire().unwrap();
        assert_eq!(gauge(&store, "default.cx_open"), Some(1));
        assert_eq!(gauge(&store, "default.remaining_cx"), Some(0));
        assert!(cx.try_acquire().is_none());
        // Over the limit on purpose: remaining stays at 0, not below.
        let c = cx.acquire();
        assert_eq!(cx.count(), 3);
        assert_eq!(gauge(&store, "default.remaining_cx"), Some(0));
        drop(c);
        assert_eq!(gauge(&store, "default.cx_open"), Some(1));
        drop(a);
        assert_eq!(gauge(&store, "default.cx_open"), Some(0));
        assert_eq!(gauge(&store, "default.remaining_cx"), Some(1));
        drop(b);
        assert_eq!(cx.count(), 0);
        assert_eq!(gauge(&store, "default.cx_open"), Some(0));
        assert_eq!(gauge(&store, "default.remaining_cx"), Some(2));
        // The other priority has its own counts and Envoy's defaults, and no
        // remaining gauges unless it tracks them.
        assert_eq!(r.get(Priority::High).connections.max(), 1024);
        assert_eq!(gauge(&store, "high.cx_open"), Some(0));
        assert_eq!(gauge(&store, "high.remaining_cx"), None);
        assert_eq!(gauge(&store, "default.cx_pool_open"), Some(0));
    }

    #[test]
    fn max_retries_without_budget() {
        let (_store, r) = resources(Thresholds::default());
        let m = r.get(Priority::Default);
        let held: Vec<_> = (0..3)
            .map(|_| r.try_acquire_retry(Priority::Default).unwrap())
            .collect();
        assert_eq!(m.retries_in_progress(), 3);
        assert!(r.try_acquire_retry(Priority::Default).is_none());
        assert_eq!(r.upstream_rq_retry_overflow.get(), 1);
        // HIGH has its own.
        assert!(r.try_acquire_retry(Priority::High).is_some());
        drop(held);
        assert!(m.can_retry());
    }

    #[test]
    fn retry_budget_scales_with_active_and_pending_requests() {
        let (store, r) = resources(Thresholds {
            retry_budget: Some(RetryBudget {
                budget_percent: 20.0,
                min_retry_concurrency: 3,
            }),
            track_remaining: true,
            ..Thresholds::default()
        });
        let m = r.get(Priority::Default);
        // max_retries' count until the budget is first used, as in Envoy.
        assert_eq!(gauge(&store, "default.remaining_retries"), Some(3));
        // The floor: min_retry_concurrency.
        assert_eq!(m.max_retries(), 3);
        let requests: Vec<_> = (0..20).map(|_| m.requests.acquire()).collect();
        let pending: Vec<_> = (0..10).map(|_| m.pending_requests.acquire()).collect();
        // 20 % of 30.
        assert_eq!(m.max_retries(), 6);
        let retries: Vec<_> = (0..6).map(|_| m.try_acquire_retry().unwrap()).collect();
        assert!(m.try_acquire_retry().is_none());
        assert_eq!(gauge(&store, "default.remaining_retries"), Some(0));
        drop((requests, pending));
        assert_eq!(m.max_retries(), 3);
        assert!(!m.can_retry());
        drop(retries);
        assert!(m.can_retry());
    }
}
