//! A cluster's host: its address, stats, health flags (set by active health
//! checking, outlier detection and EDS, read by the workers without a lock),
//! load-balancing attributes, and its outlier counters.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use arc_swap::ArcSwapOption;

use super::host_stats::HostStats;
use crate::config::metadata::Metadata;
use crate::config::{EdsHealth, EndpointConfig, Locality};

/// Why a host is out of (or degraded in) rotation: Envoy's `Host::HealthFlag`, one
/// bit each, set and cleared by whoever owns the reason (active health checking,
/// outlier detection, EDS) and read by the workers' load balancers without a lock.
pub mod health_flag {
    pub const FAILED_ACTIVE_HC: u32 = 1 << 0;
    pub const FAILED_OUTLIER_CHECK: u32 = 1 << 1;
    pub const FAILED_EDS_HEALTH: u32 = 1 << 2;
    pub const DEGRADED_ACTIVE_HC: u32 = 1 << 3;
    pub const DEGRADED_EDS_HEALTH: u32 = 1 << 4;
    pub const PENDING_DYNAMIC_REMOVAL: u32 = 1 << 5;
    pub const PENDING_ACTIVE_HC: u32 = 1 << 6;
    pub const EXCLUDED_VIA_IMMEDIATE_HC_FAIL: u32 = 1 << 7;
    pub const ACTIVE_HC_TIMEOUT: u32 = 1 << 8;
    pub const EDS_STATUS_DRAINING: u32 = 1 << 9;

    /// The flags that make a host unhealthy (Envoy's `coarseHealth`).
    pub const UNHEALTHY: u32 = FAILED_ACTIVE_HC
        | FAILED_OUTLIER_CHECK
        | FAILED_EDS_HEALTH
        | EDS_STATUS_DRAINING
        | EXCLUDED_VIA_IMMEDIATE_HC_FAIL;
    /// The flags that make an otherwise healthy host degraded.
    pub const DEGRADED: u32 = DEGRADED_ACTIVE_HC | DEGRADED_EDS_HEALTH;
}

/// A host's coarse health, as Envoy's load balancers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostHealth {
    Healthy,
    Degraded,
    Unhealthy,
}

#[derive(Debug)]
pub struct Host {
    pub address: SocketAddr,
    /// The endpoint's host name for DNS clusters, empty for STATIC.
    pub hostname: String,
    pub stats: HostStats,
    /// Set when DNS or EDS took the host out of its cluster: workers close its
    /// idle pooled connections and stop reusing the others.
    pub removed: AtomicBool,
    /// [`health_flag`] bits. Whoever changes them calls
    /// [`Cluster::health_changed`] so the workers rebuild their host sets.
    health_flags: AtomicU32,
    /// Outlier detection's per-host counters (written by the workers).
    pub outlier: HostMonitor,
    /// `load_balancing_weight` (EDS may change it in place, as in Envoy).
    weight: AtomicU32,
    /// The priority of its locality.
    priority: AtomicU32,
    /// Its locality's `load_balancing_weight` (0: unset).
    locality_weight: AtomicU32,
    /// Its `locality` (a host that moves to another locality is a new host).
    pub locality: Option<Arc<Locality>>,
    /// Its endpoint's `metadata` (EDS may change it in place, as in Envoy).
    metadata: ArcSwapOption<Metadata>,
}

/// What DNS, EDS or the static config say of one host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostSpec {
    pub address: SocketAddr,
    pub hostname: String,
    pub weight: u32,
    pub priority: u32,
    pub locality: Option<Arc<Locality>>,
    pub locality_weight: u32,
    pub health: EdsHealth,
    pub metadata: Option<Arc<Metadata>>,
}

impl HostSpec {
    /// The host at `address` of endpoint `ep`.
    pub fn new(address: SocketAddr, hostname: String, ep: &EndpointConfig) -> Self {
        HostSpec {
            address,
            hostname,
            weight: ep.weight,
            priority: ep.priority,
            locality: ep.locality.clone(),
            locality_weight: ep.locality_weight,
            health: ep.health,
            metadata: ep.metadata.clone(),
        }
    }

    /// A plain host: weight 1, priority 0, no locality, healthy.
    pub fn plain(address: SocketAddr) -> Self {
        Self::new(address, String::new(), &EndpointConfig::default())
    }
}

impl Host {
    /// The endpoint's `metadata`, if it has any.
    pub fn metadata(&self) -> Option<Arc<Metadata>> {
        self.metadata.load_full()
    }

    /// Records this host as the one a request went to (`%UPSTREAM_HOST%`,
    /// `%UPSTREAM_METADATA%`).
    pub fn record_in(&self, record: &mut crate::access_log::LogRecord) {
        record.upstream_host = Some(self.address);
        record.upstream_metadata = self.metadata();
    }

    /// `shards`: the server's workers + 1 (rows of the host's stats).
    pub fn new(address: SocketAddr, hostname: String, shards: usize) -> Self {
        Host {
            address,
            hostname,
            stats: HostStats::new(shards),
            removed: AtomicBool::new(false),
            health_flags: AtomicU32::new(0),
            outlier: Default::default(),
            weight: AtomicU32::new(1),
            priority: AtomicU32::new(0),
            locality_weight: AtomicU32::new(0),
            locality: None,
            metadata: ArcSwapOption::empty(),
        }
    }

    pub fn from_spec(spec: &HostSpec, shards: usize) -> Self {
        let host = Host {
            locality: spec.locality.clone(),
            ..Host::new(spec.address, spec.hostname.clone(), shards)
        };
        host.update(spec);
        host
    }

    /// Applies `spec`'s weight, priority and EDS health; (whether the weights or
    /// priority changed, whether the EDS health flags changed).
    pub(super) fn update(&self, spec: &HostSpec) -> (bool, bool) {
        if self.metadata.load().as_ref() != spec.metadata.as_ref() {
            self.metadata.store(spec.metadata.clone());
        }
        let mut changed = self.weight.swap(spec.weight, Ordering::Relaxed) != spec.weight;
        changed |= self.priority.swap(spec.priority, Ordering::Relaxed) != spec.priority;
        changed |= self
            .locality_weight
            .swap(spec.locality_weight, Ordering::Relaxed)
            != spec.locality_weight;
        let eds = health_flag::FAILED_EDS_HEALTH
            | health_flag::EDS_STATUS_DRAINING
            | health_flag::DEGRADED_EDS_HEALTH;
        let want = match spec.health {
            EdsHealth::Healthy => 0,
            EdsHealth::Unhealthy => health_flag::FAILED_EDS_HEALTH,
            EdsHealth::Draining => health_flag::EDS_STATUS_DRAINING,
            EdsHealth::Degraded => health_flag::DEGRADED_EDS_HEALTH,
        };
        let had = self.health_flags() & eds;
        if had != want {
            self.clear_health_flag(had & !want);
            self.set_health_flag(want);
        }
        (changed, had != want)
    }

    /// `load_balancing_weight` (at least 1).
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    pub fn priority(&self) -> u32 {
        self.priority.load(Ordering::Relaxed)
    }

    /// Its locality's `load_balancing_weight` (0: unset).
    pub fn locality_weight(&self) -> u32 {
        self.locality_weight.load(Ordering::Relaxed)
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Relaxed)
    }

    /// The [`health_flag`] bits now set.
    pub fn health_flags(&self) -> u32 {
        self.health_flags.load(Ordering::Acquire)
    }

    /// Sets `flag`; true when it was not set before.
    pub fn set_health_flag(&self, flag: u32) -> bool {
        self.health_flags.fetch_or(flag, Ordering::AcqRel) & flag == 0
    }

    /// Clears `flag`; true when it was set before.
    pub fn clear_health_flag(&self, flag: u32) -> bool {
        self.health_flags.fetch_and(!flag, Ordering::AcqRel) & flag != 0
    }

    pub fn health(&self) -> HostHealth {
        let flags = self.health_flags();
        if flags & health_flag::UNHEALTHY != 0 {
            HostHealth::Unhealthy
        } else if flags & health_flag::DEGRADED != 0 {
            HostHealth::Degraded
        } else {
            HostHealth::Healthy
        }
    }
}

/// Requests and successes since the last interval.
#[derive(Debug, Default)]
pub(crate) struct Bucket {
    total: AtomicU64,
    success: AtomicU64,
}

impl Bucket {
    pub(crate) fn put(&self, success: bool) {
        self.total.fetch_add(1, Ordering::Relaxed);
        if success {
            self.success.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// (success rate %, volume) of the interval that ended; starts the next one.
    pub(crate) fn take(&self) -> Option<(f64, u64)> {
        let total = self.total.swap(0, Ordering::Relaxed);
        let success = self.success.swap(0, Ordering::Relaxed);
        (total > 0).then(|| (success.min(total) as f64 * 100.0 / total as f64, total))
    }
}

/// One host's outlier counters, written by every worker (Envoy's
/// `DetectorHostMonitorImpl`, minus what only the detector task touches).
#[derive(Debug)]
pub struct HostMonitor {
    pub(crate) consecutive_5xx: AtomicU32,
    pub(crate) consecutive_gateway_failure: AtomicU32,
    pub(crate) consecutive_local_origin_failure: AtomicU32,
    pub(crate) external: Bucket,
    pub(crate) local: Bucket,
    /// Last interval's success rates (f64 bits; -1 when not computed), for `/clusters`.
    pub(crate) success_rate: AtomicU64,
    pub(crate) local_origin_success_rate: AtomicU64,
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

    pub(crate) fn reset_consecutive(&self) {
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway_failure.store(0, Ordering::Relaxed);
        self.consecutive_local_origin_failure
            .store(0, Ordering::Relaxed);
    }
}
