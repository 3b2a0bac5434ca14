//! Clusters: their hosts (swapped atomically when DNS answers change), their stats,
//! and the cluster manager that names them.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;

pub use super::host::{Host, HostHealth, HostSpec, health_flag};
use crate::config::{
    ClusterConfig, DiscoveryType, DnsLookupFamily, EndpointConfig, LbConfig, LoadAssignment,
    PoolSettings, UpstreamProtocol,
};
use crate::stats::{Counter, Gauge, Histogram, StatStore};
use crate::tls::{ClientTlsContext, SecretStore, SslStats};

/// `cluster.<name>.*` with Envoy's meanings.
#[derive(Debug)]
pub struct ClusterStats {
    store: Arc<StatStore>,
    prefix: String,
    pub upstream_cx_total: Counter,
    pub upstream_cx_active: Gauge,
    pub upstream_cx_http1_total: Counter,
    pub upstream_cx_http2_total: Counter,
    pub upstream_cx_connect_fail: Counter,
    pub upstream_cx_connect_timeout: Counter,
    pub upstream_cx_destroy: Counter,
    pub upstream_cx_destroy_remote: Counter,
    pub upstream_cx_idle_timeout: Counter,
    pub upstream_cx_max_requests: Counter,
    pub upstream_cx_rx_bytes_total: Counter,
    pub upstream_cx_tx_bytes_total: Counter,
    pub upstream_cx_none_healthy: Counter,
    /// An `ORIGINAL_DST` cluster's `use_http_header` value that is no `ip:port`.
    pub original_dst_host_invalid: Counter,
    /// Connections whose `upstream_bind_config` source address could not be bound.
    pub bind_errors: Counter,
    /// Picks made in panic mode (all hosts of a priority, healthy or not).
    pub lb_healthy_panic: Counter,
    pub upstream_cx_connect_ms: Histogram,
    pub upstream_rq_total: Counter,
    pub upstream_rq_active: Gauge,
    pub upstream_rq_completed: Counter,
    pub upstream_rq_pending_total: Counter,
    pub upstream_rq_pending_failure_eject: Counter,
    pub upstream_rq_timeout: Counter,
    pub upstream_rq_rx_reset: Counter,
    pub upstream_rq_per_try_timeout: Counter,
    pub upstream_rq_per_try_idle_timeout: Counter,
    pub upstream_rq_retry: Counter,
    pub upstream_rq_retry_success: Counter,
    pub upstream_rq_retry_limit_exceeded: Counter,
    pub upstream_rq_retry_backoff_exponential: Counter,
    pub upstream_rq_retry_backoff_ratelimited: Counter,
    pub upstream_internal_redirect_succeeded_total: Counter,
    pub upstream_internal_redirect_failed_total: Counter,
    pub upstream_rq_time: Histogram,
    pub membership_total: Gauge,
    pub membership_healthy: Gauge,
    pub membership_change: Counter,
    pub update_attempt: Counter,
    pub update_success: Counter,
    pub update_failure: Counter,
    /// `upstream_rq_1xx` … `upstream_rq_5xx`.
    upstream_rq_class: [Counter; 5],
    /// `upstream_rq_<code>`, created the first time a code is seen.
    upstream_rq_code: Box<[OnceLock<Counter>]>,
}

impl ClusterStats {
    pub(super) fn new(store: &Arc<StatStore>, name: &str) -> Self {
        let prefix = format!("cluster.{name}.");
        let c = |s: &str| store.counter(&format!("{prefix}{s}"));
        let g = |s: &str| store.gauge(&format!("{prefix}{s}"));
        let h = |s: &str| store.histogram(&format!("{prefix}{s}"));
        ClusterStats {
            upstream_cx_total: c("upstream_cx_total"),
            upstream_cx_active: g("upstream_cx_active"),
            upstream_cx_http1_total: c("upstream_cx_http1_total"),
            upstream_cx_http2_total: c("upstream_cx_http2_total"),
            upstream_cx_connect_fail: c("upstream_cx_connect_fail"),
            upstream_cx_connect_timeout: c("upstream_cx_connect_timeout"),
            upstream_cx_destroy: c("upstream_cx_destroy"),
            upstream_cx_destroy_remote: c("upstream_cx_destroy_remote"),
            upstream_cx_idle_timeout: c("upstream_cx_idle_timeout"),
            upstream_cx_max_requests: c("upstream_cx_max_requests"),
            upstream_cx_rx_bytes_total: c("upstream_cx_rx_bytes_total"),
            upstream_cx_tx_bytes_total: c("upstream_cx_tx_bytes_total"),
            upstream_cx_none_healthy: c("upstream_cx_none_healthy"),
            original_dst_host_invalid: c("original_dst_host_invalid"),
            bind_errors: c("bind_errors"),
            lb_healthy_panic: c("lb_healthy_panic"),
            upstream_cx_connect_ms: h("upstream_cx_connect_ms"),
            upstream_rq_total: c("upstream_rq_total"),
            upstream_rq_active: g("upstream_rq_active"),
            upstream_rq_completed: c("upstream_rq_completed"),
            upstream_rq_pending_total: c("upstream_rq_pending_total"),
            upstream_rq_pending_failure_eject: c("upstream_rq_pending_failure_eject"),
            upstream_rq_timeout: c("upstream_rq_timeout"),
            upstream_rq_rx_reset: c("upstream_rq_rx_reset"),
            upstream_rq_per_try_timeout: c("upstream_rq_per_try_timeout"),
            upstream_rq_per_try_idle_timeout: c("upstream_rq_per_try_idle_timeout"),
            upstream_rq_retry: c("upstream_rq_retry"),
            upstream_rq_retry_success: c("upstream_rq_retry_success"),
            upstream_rq_retry_limit_exceeded: c("upstream_rq_retry_limit_exceeded"),
            upstream_rq_retry_backoff_exponential: c("upstream_rq_retry_backoff_exponential"),
            upstream_rq_retry_backoff_ratelimited: c("upstream_rq_retry_backoff_ratelimited"),
            upstream_internal_redirect_succeeded_total: c(
                "upstream_internal_redirect_succeeded_total",
            ),
            upstream_internal_redirect_failed_total: c("upstream_internal_redirect_failed_total"),
            upstream_rq_time: h("upstream_rq_time"),
            membership_total: g("membership_total"),
            membership_healthy: g("membership_healthy"),
            membership_change: c("membership_change"),
            update_attempt: c("update_attempt"),
            update_success: c("update_success"),
            update_failure: c("update_failure"),
            upstream_rq_class: [1, 2, 3, 4, 5].map(|d| c(&format!("upstream_rq_{d}xx"))),
            upstream_rq_code: (0..500).map(|_| OnceLock::new()).collect(),
            store: store.clone(),
            prefix,
        }
    }

    /// Counts a response from the upstream: `upstream_rq_<code>`, `_<class>xx`, completed.
    pub fn response(&self, status: u16) {
        if (100..600).contains(&status) {
            self.upstream_rq_class[(status / 100 - 1) as usize].inc();
            self.upstream_rq_code[(status - 100) as usize]
                .get_or_init(|| {
                    self.store
                        .counter(&format!("{}upstream_rq_{status}", self.prefix))
                })
                .inc();
        }
        self.upstream_rq_completed.inc();
    }

    /// Counts a response that was retried (`retry.upstream_rq_<code>`, `_<class>xx`,
    /// `retry.upstream_rq_completed`) instead of the response counters, as Envoy.
    /// Created when first seen: retries are the rare path.
    pub fn retry_response(&self, status: u16) {
        let c = |s: String| self.store.counter(&format!("{}retry.{s}", self.prefix));
        if (100..600).contains(&status) {
            c(format!("upstream_rq_{}xx", status / 100)).inc();
            c(format!("upstream_rq_{status}")).inc();
        }
        c("upstream_rq_completed".to_string()).inc();
    }
}

static NEXT_CLUSTER_ID: AtomicUsize = AtomicUsize::new(0);

pub struct Cluster {
    /// Process-unique id, the key of worker-local pools.
    pub id: usize,
    pub name: String,
    /// `alt_stat_name`, else the name: what stats and access logs call the cluster.
    pub observability_name: Arc<str>,
    /// `metadata` (`%CLUSTER_METADATA%`).
    pub metadata: Option<Arc<crate::config::metadata::Metadata>>,
    pub discovery: DiscoveryType,
    pub protocol: UpstreamProtocol,
    /// `upstream_bind_config`: the local address of its connections.
    pub upstream_bind: Option<crate::config::UpstreamBindConfig>,
    pub connect_timeout: Duration,
    pub dns_refresh_rate: Duration,
    pub dns_lookup_family: DnsLookupFamily,
    /// `lb_policy`, `load_balancing_policy`, `common_lb_config`.
    pub lb: LbConfig,
    /// The load assignment's `policy.overprovisioning_factor` (EDS may change it).
    overprovisioning_factor: AtomicU32,
    /// Bumped when hosts join or leave: with `close_connections_on_host_set_change`
    /// connections opened before are not reused.
    host_set_generation: AtomicU64,
    /// Idle timeout and request limit of this cluster's pooled connections.
    pub pool: PoolSettings,
    /// Rows of each host's stats (the server's workers + 1).
    host_shards: usize,
    pub endpoints: Vec<EndpointConfig>,
    pub hosts: ArcSwap<Vec<Arc<Host>>>,
    pub stats: ClusterStats,
    /// `eds_cluster_config.service_name` for EDS clusters.
    pub eds_service_name: Option<String>,
    /// Where it came from, for `/config_dump` and `/clusters`.
    pub origin: Origin,
    /// Set once the cluster is removed or replaced: its pools stop reusing
    /// connections and its DNS refresh ends.
    pub removed: AtomicBool,
    /// `transport_socket`: TLS to the hosts.
    pub tls: Option<ClientTlsContext>,
    /// Its first hosts are known (static, or a first DNS answer or EDS update).
    hosts_ready: AtomicBool,
    /// Bumped whenever a host's health flags change: a worker whose load balancer
    /// was built at an older epoch rebuilds its host sets (no lock on the pick).
    health_epoch: AtomicU64,
    /// `health_checks`: its sessions run on the control thread.
    pub health_checker: Option<Arc<super::health_check::checker::HealthChecker>>,
    /// `outlier_detection`: workers report each try's result to it.
    pub outlier: Option<super::outlier::detector::Detector>,
    /// Notified when the host list changes (the health checker follows it).
    pub hosts_changed: tokio::sync::Notify,
    /// `ignore_health_on_host_removal`.
    ignore_health_on_host_removal: bool,
    /// `circuit_breakers`: the limits and counts shared by every worker.
    pub resources: super::resource_manager::ClusterResources,
    /// `ORIGINAL_DST`: its own balancer and on-demand hosts.
    pub original_dst: Option<super::original_dst::OriginalDst>,
    pub raw: serde_json::Value,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.name)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Static (bootstrap) or dynamic (xDS / `Server.update`), with its version.
#[derive(Debug, Clone)]
pub struct Origin {
    pub dynamic: bool,
    pub version_info: String,
    pub last_updated: std::time::SystemTime,
}

impl Origin {
    pub fn bootstrap() -> Self {
        Origin {
            dynamic: false,
            version_info: String::new(),
            last_updated: std::time::SystemTime::now(),
        }
    }

    pub fn dynamic(version_info: &str) -> Self {
        Origin {
            dynamic: true,
            version_info: version_info.to_string(),
            last_updated: std::time::SystemTime::now(),
        }
    }
}

impl Cluster {
    /// Records this cluster as the request's (`%UPSTREAM_CLUSTER%`: the observability
    /// name, `%CLUSTER_METADATA%`).
    pub fn record_in(&self, record: &mut crate::access_log::LogRecord) {
        record.upstream_cluster = Some(self.observability_name.clone());
        record.cluster_metadata = self.metadata.clone();
    }

    pub fn new(
        config: &ClusterConfig,
        store: &Arc<StatStore>,
        secrets: &SecretStore,
        origin: Origin,
    ) -> Result<Arc<Self>, String> {
        let tls = match &config.tls {
            Some(tls) => {
                let alpn: Vec<Vec<u8>> = match config.protocol {
                    UpstreamProtocol::Http1 => vec![b"http/1.1".to_vec()],
                    UpstreamProtocol::Http2 => vec![b"h2".to_vec()],
                    UpstreamProtocol::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
                    // Refused with TLS (config/bootstrap.rs).
                    UpstreamProtocol::Downstream => Vec::new(),
                };
                let stats =
                    SslStats::new(store, &format!("cluster.{}.", config.stat_name), "client");
                Some(ClientTlsContext::new(tls.clone(), alpn, secrets, stats)?)
            }
            None => None,
        };
        let stats = ClusterStats::new(store, &config.stat_name);
        let health_checker = super::health_check::checker::HealthChecker::new(
            &config.health_checks,
            config.protocol,
            store,
            &config.stat_name,
        )?;
        let outlier = config
            .outlier_detection
            .clone()
            .map(|o| super::outlier::detector::Detector::new(o, store, &config.stat_name));
        let shards = store.shards();
        let hosts: Vec<Arc<Host>> = if config.discovery == DiscoveryType::Static {
            config
                .endpoints
                .iter()
                .filter_map(|e| {
                    let ip: IpAddr = e.address.parse().ok()?;
                    let spec = HostSpec::new(SocketAddr::new(ip, e.port), String::new(), e);
                    Some(Arc::new(Host::from_spec(&spec, shards)))
                })
                .collect()
        } else {
            Vec::new()
        };
        if health_checker.is_some() {
            for h in &hosts {
                h.set_health_flag(super::health_check::checker::HealthChecker::INITIAL_FLAGS);
            }
        }
        stats.membership_total.set(hosts.len() as i64);
        stats.membership_healthy.set(healthy_count(&hosts));
        Ok(Arc::new(Cluster {
            id: NEXT_CLUSTER_ID.fetch_add(1, Ordering::Relaxed),
            name: config.name.clone(),
            observability_name: config.stat_name.as_str().into(),
            metadata: config.metadata.clone(),
            discovery: config.discovery,
            protocol: config.protocol,
            upstream_bind: config.upstream_bind,
            connect_timeout: config.connect_timeout,
            dns_refresh_rate: config.dns_refresh_rate,
            dns_lookup_family: config.dns_lookup_family,
            lb: config.lb,
            overprovisioning_factor: AtomicU32::new(config.overprovisioning_factor),
            host_set_generation: AtomicU64::new(0),
            pool: config.pool,
            host_shards: shards,
            endpoints: config.endpoints.clone(),
            hosts: ArcSwap::from_pointee(hosts),
            stats,
            eds_service_name: config.eds_service_name.clone(),
            origin,
            removed: AtomicBool::new(false),
            // An ORIGINAL_DST cluster's hosts come with the requests.
            hosts_ready: AtomicBool::new(matches!(
                config.discovery,
                DiscoveryType::Static | DiscoveryType::OriginalDst
            )),
            tls,
            health_epoch: AtomicU64::new(0),
            health_checker,
            outlier,
            hosts_changed: tokio::sync::Notify::new(),
            ignore_health_on_host_removal: config.ignore_health_on_host_removal,
            resources: super::resource_manager::ClusterResources::new(
                store,
                &config.stat_name,
                &config.circuit_breakers,
            ),
            original_dst: config
                .original_dst
                .clone()
                .map(|o| super::original_dst::OriginalDst::new(o, &config.name, shards)),
            raw: config.raw.clone(),
        }))
    }

    /// Tells the workers that a host's health flags changed.
    pub fn health_changed(&self) {
        self.health_epoch.fetch_add(1, Ordering::AcqRel);
        self.stats
            .membership_healthy
            .set(healthy_count(&self.hosts.load()));
    }

    /// The load assignment's `overprovisioning_factor`.
    pub fn overprovisioning_factor(&self) -> u32 {
        self.overprovisioning_factor.load(Ordering::Relaxed)
    }

    /// Changes when hosts join or leave the cluster.
    pub fn host_set_generation(&self) -> u64 {
        self.host_set_generation.load(Ordering::Acquire)
    }

    /// The epoch of the hosts' health flags (see [`Cluster::health_changed`]).
    pub fn health_epoch(&self) -> u64 {
        self.health_epoch.load(Ordering::Acquire)
    }

    /// Whether it has what it warms for: its first hosts and its TLS secrets.
    fn is_warm(&self) -> bool {
        self.hosts_ready()
            && !self.tls.as_ref().is_some_and(|t| t.config.is_warming())
            && self.health_checker.as_ref().is_none_or(|hc| hc.is_warm())
    }

    /// Whether its first hosts are known.
    pub fn hosts_ready(&self) -> bool {
        self.hosts_ready.load(Ordering::Relaxed)
    }

    pub fn is_dns(&self) -> bool {
        matches!(
            self.discovery,
            DiscoveryType::StrictDns | DiscoveryType::LogicalDns
        )
    }

    /// Replaces the host set, keeping the `Host` (and its stats) of unchanged addresses.
    pub fn set_hosts(&self, resolved: Vec<HostSpec>) {
        self.set_assignment(resolved, self.overprovisioning_factor());
    }

    /// [`Cluster::set_hosts`] with the load assignment's overprovisioning factor (EDS).
    pub fn set_assignment(&self, resolved: Vec<HostSpec>, overprovisioning_factor: u32) {
        self.hosts_ready.store(true, Ordering::Relaxed);
        let factor_changed = self
            .overprovisioning_factor
            .swap(overprovisioning_factor, Ordering::Relaxed)
            != overprovisioning_factor;
        let current = self.hosts.load();
        let by_addr: HashMap<SocketAddr, &Arc<Host>> =
            current.iter().map(|h| (h.address, h)).collect();
        let (mut attrs_changed, mut health_changed) = (factor_changed, false);
        let mut hosts: Vec<Arc<Host>> = resolved
            .iter()
            .map(|spec| match by_addr.get(&spec.address) {
                Some(h) if h.locality == spec.locality => {
                    health_changed |= h.clear_health_flag(health_flag::PENDING_DYNAMIC_REMOVAL);
                    let (attrs, health) = h.update(spec);
                    attrs_changed |= attrs;
                    health_changed |= health;
                    (*h).clone()
                }
                _ => self.new_host(spec),
            })
            .collect();
        let same_members = current.len() == hosts.len()
            && current.iter().zip(&hosts).all(|(a, b)| Arc::ptr_eq(a, b));
        if same_members {
            if attrs_changed {
                // Same hosts, new weights or priorities: the workers rebuild.
                self.hosts.store(Arc::new(hosts));
            }
            if health_changed || attrs_changed {
                self.health_changed();
            }
            return;
        }
        // With health checks, Envoy keeps a removed host that still passes them
        // (PENDING_DYNAMIC_REMOVAL) until a check fails it.
        let keep_passing = self.health_checker.is_some() && !self.ignore_health_on_host_removal;
        // A set, not a scan of `hosts` per old host: 10,000 hosts replaced by 10,000
        // others would be 10^8 comparisons (~100 ms of an EDS update).
        let kept: HashSet<*const Host> = hosts.iter().map(Arc::as_ptr).collect();
        for old in current.iter() {
            if !kept.contains(&Arc::as_ptr(old)) {
                let failed = health_flag::FAILED_ACTIVE_HC | health_flag::FAILED_EDS_HEALTH;
                if keep_passing && old.health_flags() & failed == 0 {
                    old.set_health_flag(health_flag::PENDING_DYNAMIC_REMOVAL);
                    hosts.push(old.clone());
                } else {
                    old.removed.store(true, Ordering::Relaxed);
                }
            }
        }
        self.stats.membership_total.set(hosts.len() as i64);
        self.stats.membership_change.inc();
        self.host_set_generation.fetch_add(1, Ordering::AcqRel);
        self.hosts.store(Arc::new(hosts));
        self.health_changed();
        self.hosts_changed.notify_one();
    }

    /// Drops a host kept for PENDING_DYNAMIC_REMOVAL once its health check failed it.
    pub fn remove_pending_host(&self, host: &Arc<Host>) {
        self.hosts.rcu(|list| {
            list.iter()
                .filter(|h| !Arc::ptr_eq(h, host))
                .cloned()
                .collect::<Vec<_>>()
        });
        host.removed.store(true, Ordering::Relaxed);
        self.stats
            .membership_total
            .set(self.hosts.load().len() as i64);
        self.stats.membership_change.inc();
        self.health_changed();
        self.hosts_changed.notify_one();
    }

    /// A host new to the cluster; unhealthy until checked when health checked.
    fn new_host(&self, spec: &HostSpec) -> Arc<Host> {
        let host = Arc::new(Host::from_spec(spec, self.host_shards));
        if self.health_checker.is_some() {
            host.set_health_flag(super::health_check::checker::HealthChecker::INITIAL_FLAGS);
        }
        host
    }

    /// Resolves every endpoint of a DNS cluster once and installs the answer.
    pub async fn resolve(&self) {
        self.stats.update_attempt.inc();
        let mut resolved = Vec::new();
        let mut failed = false;
        for ep in &self.endpoints {
            match tokio::net::lookup_host((ep.address.as_str(), ep.port)).await {
                Ok(addrs) => {
                    let addrs = pick_family(addrs.collect(), self.dns_lookup_family);
                    // LOGICAL_DNS uses only the first address of the answer.
                    let take = if self.discovery == DiscoveryType::LogicalDns {
                        1
                    } else {
                        usize::MAX
                    };
                    for a in addrs.into_iter().take(take) {
                        if !resolved.iter().any(|r: &HostSpec| r.address == a) {
                            resolved.push(HostSpec::new(a, ep.address.clone(), ep));
                        }
                    }
                }
                Err(_) => failed = true,
            }
        }
        if failed {
            self.stats.update_failure.inc();
            // Keep the last good answer, as Envoy does.
            if resolved.is_empty() {
                return;
            }
        }
        self.stats.update_success.inc();
        self.set_hosts(resolved);
    }
}

/// Hosts not unhealthy (`membership_healthy`).
fn healthy_count(hosts: &[Arc<Host>]) -> i64 {
    hosts
        .iter()
        .filter(|h| h.health() != HostHealth::Unhealthy)
        .count() as i64
}

/// Applies Envoy's `dns_lookup_family` to a resolver answer.
pub fn pick_family(addrs: Vec<SocketAddr>, family: DnsLookupFamily) -> Vec<SocketAddr> {
    let (v4, v6): (Vec<SocketAddr>, Vec<SocketAddr>) = addrs.into_iter().partition(|a| a.is_ipv4());
    match family {
        DnsLookupFamily::V4Only => v4,
        DnsLookupFamily::V6Only => v6,
        DnsLookupFamily::Auto => {
            if v6.is_empty() {
                v4
            } else {
                v6
            }
        }
        DnsLookupFamily::V4Preferred => {
            if v4.is_empty() {
                v6
            } else {
                v4
            }
        }
        DnsLookupFamily::All => v4.into_iter().chain(v6).collect(),
    }
}

#[derive(Debug, Default, Clone)]
struct ClusterMap {
    by_name: HashMap<String, Arc<Cluster>>,
    /// In the order they were added, for admin output.
    order: Vec<Arc<Cluster>>,
}

impl ClusterMap {
    fn insert(&mut self, cluster: Arc<Cluster>) -> Option<Arc<Cluster>> {
        let old = self.by_name.insert(cluster.name.clone(), cluster.clone());
        match &old {
            Some(prev) => {
                if let Some(slot) = self.order.iter_mut().find(|c| Arc::ptr_eq(c, prev)) {
                    *slot = cluster;
                }
            }
            None => self.order.push(cluster),
        }
        old
    }

    fn remove(&mut self, name: &str) -> Option<Arc<Cluster>> {
        let old = self.by_name.remove(name)?;
        self.order.retain(|c| !Arc::ptr_eq(c, &old));
        Some(old)
    }
}

/// Starts a cluster's background tasks on the control runtime.
pub type StartTasks = fn(&tokio::runtime::Handle, &Arc<Cluster>, &Arc<ClusterManager>);

#[derive(Debug)]
struct Control {
    runtime: tokio::runtime::Handle,
    start_tasks: StartTasks,
}

/// Every cluster by name. Requests read the active set through one `ArcSwap` load;
/// configuration changes (serialised by `writer`) swap in a new set.
#[derive(Debug)]
pub struct ClusterManager {
    store: Arc<StatStore>,
    active: ArcSwap<ClusterMap>,
    /// Bumped whenever the active clusters change: workers' cached cluster
    /// handles are valid while it stays the same.
    generation: AtomicU64,
    /// Clusters waiting for their first hosts (EDS, DNS); an active cluster of the
    /// same name keeps serving meanwhile.
    warming: Mutex<ClusterMap>,
    /// The last endpoints of each EDS service, for clusters that come later.
    eds: Mutex<HashMap<String, LoadAssignment>>,
    writer: Mutex<()>,
    /// The control thread, where DNS resolution and each cluster's background
    /// tasks run.
    control: OnceLock<Control>,
    /// Where health-check and outlier events are written (set by the server).
    event_logs: OnceLock<super::outlier::event_log::EventLogs>,
    pub cds_version: Mutex<String>,
    /// Secrets by name (static and SDS), for the TLS contexts of clusters and
    /// listeners.
    pub secrets: Arc<SecretStore>,
}

impl ClusterManager {
    pub fn new(
        configs: &[ClusterConfig],
        store: &Arc<StatStore>,
        secrets: Arc<SecretStore>,
    ) -> Result<Arc<Self>, Vec<String>> {
        let mut map = ClusterMap::default();
        let mut errors = Vec::new();
        for c in configs {
            match Cluster::new(c, store, &secrets, Origin::bootstrap()) {
                Ok(cluster) => {
                    map.insert(cluster);
                }
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        store
            .counter("cluster_manager.cluster_added")
            .add(configs.len() as u64);
        let cm = Arc::new(ClusterManager {
            store: store.clone(),
            active: ArcSwap::from_pointee(map),
            generation: AtomicU64::new(0),
            warming: Mutex::new(ClusterMap::default()),
            eds: Mutex::new(HashMap::new()),
            writer: Mutex::new(()),
            control: OnceLock::new(),
            event_logs: OnceLock::new(),
            cds_version: Mutex::new(String::new()),
            secrets,
        });
        cm.update_gauges();
        Ok(cm)
    }

    /// The control thread's runtime, and what starts a new cluster's background
    /// tasks there (health checks, outlier detection): given by the server, so
    /// that clusters do not depend on the modules that act on them.
    pub fn set_control(&self, runtime: tokio::runtime::Handle, start_tasks: StartTasks) {
        let _ = self.control.set(Control {
            runtime,
            start_tasks,
        });
    }

    /// The event files (bootstrap `cluster_manager.outlier_detection`, the file
    /// flush settings health checkers' event files use); set once by the server.
    pub fn set_event_logs(&self, logs: super::outlier::event_log::EventLogs) {
        let _ = self.event_logs.set(logs);
    }

    pub fn event_logs(&self) -> super::outlier::event_log::EventLogs {
        self.event_logs.get().cloned().unwrap_or_default()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Cluster>> {
        self.active.load().by_name.get(name).cloned()
    }

    /// Changes whenever an active cluster is added, replaced or removed.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn all(&self) -> Vec<Arc<Cluster>> {
        self.active.load().order.clone()
    }

    /// Ids of every cluster that may still get requests (active or warming).
    pub fn live_ids(&self) -> std::collections::HashSet<usize> {
        self.all()
            .iter()
            .chain(self.warming().iter())
            .map(|c| c.id)
            .collect()
    }

    pub fn warming(&self) -> Vec<Arc<Cluster>> {
        lock(&self.warming).order.clone()
    }

    /// SDS secrets named by clusters' TLS contexts (active or warming).
    pub fn wanted_secrets(&self) -> Vec<String> {
        self.all()
            .into_iter()
            .chain(self.warming())
            .filter_map(|c| {
                c.tls.as_ref().map(|t| {
                    t.config
                        .dynamic_secrets()
                        .map(str::to_string)
                        .collect::<Vec<_>>()
                })
            })
            .flatten()
            .collect()
    }

    /// Rebuilds the TLS contexts naming changed secrets, and activates the
    /// clusters that waited for them; the refusals.
    pub fn secrets_changed(&self, names: &[String]) -> Vec<(String, String)> {
        let mut rejected = Vec::new();
        for c in self.all().into_iter().chain(self.warming()) {
            let Some(tls) = &c.tls else { continue };
            if let Some(name) = names.iter().find(|n| tls.config.uses_secret(n)) {
                match tls.refresh(&self.secrets) {
                    Ok(()) if tls.config.current().is_some() => {
                        tls.stats.context_update_by_sds.inc();
                    }
                    Ok(()) => {}
                    Err(e) => rejected.push((name.clone(), e)),
                }
            }
        }
        for c in self.warming() {
            self.promote(&c);
        }
        rejected
    }

    /// EDS service names of every EDS cluster, active or warming (for EDS requests).
    pub fn wanted_eds_services(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .all()
            .into_iter()
            .chain(self.warming())
            .filter_map(|c| c.eds_service_name.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    fn update_gauges(&self) {
        self.store
            .gauge("cluster_manager.active_clusters")
            .set(self.active.load().order.len() as i64);
        self.store
            .gauge("cluster_manager.warming_clusters")
            .set(lock(&self.warming).order.len() as i64);
    }

    /// Adds or replaces clusters and removes others (CDS). A cluster identical to
    /// the active one is left alone, so its pools survive a State-of-the-World
    /// response that repeats it.
    /// Returns the clusters refused (name, why).
    pub fn apply(
        self: &Arc<Self>,
        upserts: Vec<ClusterConfig>,
        removed: &[String],
        version: &str,
    ) -> Vec<(String, String)> {
        let _writer = lock(&self.writer);
        let mut active = (**self.active.load()).clone();
        let mut rejected = Vec::new();
        for config in upserts {
            if active
                .by_name
                .get(&config.name)
                .is_some_and(|c| c.raw == config.raw)
            {
                continue;
            }
            let cluster = match Cluster::new(
                &config,
                &self.store,
                &self.secrets,
                Origin::dynamic(version),
            ) {
                Ok(c) => c,
                Err(e) => {
                    rejected.push((config.name.clone(), e));
                    continue;
                }
            };
            if let Some(control) = self.control.get() {
                (control.start_tasks)(&control.runtime, &cluster, self);
            }
            let replacing = active.by_name.contains_key(&config.name);
            self.store
                .counter(if replacing {
                    "cluster_manager.cluster_modified"
                } else {
                    "cluster_manager.cluster_added"
                })
                .inc();
            match cluster.discovery {
                DiscoveryType::Static | DiscoveryType::OriginalDst if !cluster.is_warm() => {
                    // Its TLS context waits for an SDS secret.
                    lock(&self.warming).insert(cluster);
                }
                DiscoveryType::Static | DiscoveryType::OriginalDst => {
                    if let Some(old) = active.insert(cluster) {
                        old.removed.store(true, Ordering::Relaxed);
                    }
                }
                DiscoveryType::Eds => {
                    let known = cluster
                        .eds_service_name
                        .as_ref()
                        .and_then(|s| lock(&self.eds).get(s).cloned());
                    if let Some(assignment) = &known {
                        cluster.set_assignment(
                            eds_hosts(assignment),
                            assignment.overprovisioning_factor,
                        );
                    }
                    match known {
                        Some(_) if cluster.is_warm() => {
                            if let Some(old) = active.insert(cluster) {
                                old.removed.store(true, Ordering::Relaxed);
                            }
                        }
                        _ => {
                            lock(&self.warming).insert(cluster);
                        }
                    }
                }
                DiscoveryType::StrictDns | DiscoveryType::LogicalDns => {
                    lock(&self.warming).insert(cluster.clone());
                    let cm = self.clone();
                    if let Some(control) = self.control.get() {
                        control.runtime.spawn(async move {
                            cluster.resolve().await;
                            cm.promote(&cluster);
                            refresh_dns(cluster).await;
                        });
                    }
                }
            }
        }
        for name in removed {
            if let Some(old) = active.remove(name) {
                old.removed.store(true, Ordering::Relaxed);
                self.store.counter("cluster_manager.cluster_removed").inc();
            }
            if let Some(old) = lock(&self.warming).remove(name) {
                old.removed.store(true, Ordering::Relaxed);
            }
        }
        self.active.store(Arc::new(active));
        self.generation.fetch_add(1, Ordering::Release);
        *lock(&self.cds_version) = version.to_string();
        self.update_gauges();
        rejected
    }

    /// Moves a warm cluster from warming to active, replacing the old one.
    pub(crate) fn promote(&self, cluster: &Arc<Cluster>) {
        if !cluster.is_warm() {
            return;
        }
        let _writer = lock(&self.writer);
        {
            let mut warming = lock(&self.warming);
            match warming.by_name.get(&cluster.name) {
                Some(w) if Arc::ptr_eq(w, cluster) => {
                    warming.remove(&cluster.name);
                }
                _ => return,
            }
        }
        let mut active = (**self.active.load()).clone();
        if let Some(old) = active.insert(cluster.clone()) {
            old.removed.store(true, Ordering::Relaxed);
        }
        self.active.store(Arc::new(active));
        self.generation.fetch_add(1, Ordering::Release);
        self.update_gauges();
    }

    /// New endpoints for EDS services (ClusterLoadAssignment resources): in force
    /// for the next request; warming clusters become active.
    pub fn apply_endpoints(&self, upserts: Vec<(String, LoadAssignment)>, removed: &[String]) {
        let mut warmed = Vec::new();
        {
            let _writer = lock(&self.writer);
            let mut eds = lock(&self.eds);
            let updates = upserts.into_iter().chain(removed.iter().map(|name| {
                let empty = LoadAssignment {
                    endpoints: Vec::new(),
                    overprovisioning_factor: crate::config::DEFAULT_OVERPROVISIONING_FACTOR,
                };
                (name.clone(), empty)
            }));
            for (service, assignment) in updates {
                let clusters = self
                    .active
                    .load()
                    .order
                    .iter()
                    .cloned()
                    .chain(lock(&self.warming).order.iter().cloned())
                    .filter(|c| c.eds_service_name.as_deref() == Some(service.as_str()))
                    .collect::<Vec<_>>();
                for c in clusters {
                    c.set_assignment(eds_hosts(&assignment), assignment.overprovisioning_factor);
                    warmed.push(c);
                }
                eds.insert(service, assignment);
            }
        }
        for c in warmed {
            self.promote(&c);
        }
    }
}

/// The hosts of an EDS load assignment (IP literals, checked when mapped).
fn eds_hosts(assignment: &LoadAssignment) -> Vec<HostSpec> {
    assignment
        .endpoints
        .iter()
        .filter_map(|e| {
            let ip: IpAddr = e.address.parse().ok()?;
            Some(HostSpec::new(SocketAddr::new(ip, e.port), String::new(), e))
        })
        .collect()
}

async fn refresh_dns(cluster: Arc<Cluster>) {
    while !cluster.removed.load(Ordering::Relaxed) {
        tokio::time::sleep(cluster.dns_refresh_rate).await;
        cluster.resolve().await;
    }
}

/// Starts the first resolution and the refresh loop of the bootstrap's DNS clusters.
pub async fn resolve_static_dns(cm: &ClusterManager) {
    let dns: Vec<_> = cm.all().into_iter().filter(|c| c.is_dns()).collect();
    futures_util::future::join_all(dns.iter().map(|c| c.resolve())).await;
    for cluster in dns {
        tokio::spawn(refresh_dns(cluster));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EdsHealth;

    #[test]
    fn auto_prefers_v6_and_v4_preferred_prefers_v4() {
        let v4: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let v6: SocketAddr = "[::1]:80".parse().unwrap();
        assert_eq!(pick_family(vec![v4, v6], DnsLookupFamily::Auto), vec![v6]);
        assert_eq!(pick_family(vec![v4], DnsLookupFamily::Auto), vec![v4]);
        assert_eq!(
            pick_family(vec![v6, v4], DnsLookupFamily::V4Preferred),
            vec![v4]
        );
        assert_eq!(
            pick_family(vec![v6, v4], DnsLookupFamily::All),
            vec![v4, v6]
        );
    }

    #[test]
    fn eds_updates_keep_hosts_and_change_weights_and_health_in_place() {
        let config = crate::config::bootstrap::map_cluster_resource(&serde_json::json!({
            "name": "c", "type": "EDS", "connect_timeout": "1s"}))
        .unwrap();
        let c = Cluster::new(
            &config,
            &StatStore::new(),
            &Default::default(),
            Origin::bootstrap(),
        )
        .unwrap();
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        c.set_hosts(vec![HostSpec::plain(a)]);
        let first = c.hosts.load_full();
        let epoch = c.health_epoch();
        c.set_assignment(
            vec![HostSpec {
                weight: 3,
                health: EdsHealth::Draining,
                ..HostSpec::plain(a)
            }],
            200,
        );
        let second = c.hosts.load_full();
        // The same host (stats, connections), a new list: the workers rebuild.
        assert!(Arc::ptr_eq(&first[0], &second[0]));
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(second[0].weight(), 3);
        assert_eq!(second[0].health_flags(), health_flag::EDS_STATUS_DRAINING);
        assert_eq!(c.overprovisioning_factor(), 200);
        assert!(c.health_epoch() > epoch);
        assert_eq!(c.host_set_generation(), 1);
        // Health only: the list stays, the epoch moves.
        let epoch = c.health_epoch();
        c.set_assignment(
            vec![HostSpec {
                weight: 3,
                ..HostSpec::plain(a)
            }],
            200,
        );
        assert!(Arc::ptr_eq(&second, &c.hosts.load_full()));
        assert!(c.health_epoch() > epoch);
        assert_eq!(second[0].health(), HostHealth::Healthy);
        assert_eq!(c.host_set_generation(), 1);
    }

    #[test]
    fn response_codes_are_counted_by_code_and_class() {
        let store = StatStore::new();
        let stats = ClusterStats::new(&store, "c");
        stats.response(200);
        stats.response(503);
        let v = store.values();
        assert_eq!(v["cluster.c.upstream_rq_200"], 1);
        assert_eq!(v["cluster.c.upstream_rq_2xx"], 1);
        assert_eq!(v["cluster.c.upstream_rq_5xx"], 1);
        assert_eq!(v["cluster.c.upstream_rq_completed"], 2);
    }
}
