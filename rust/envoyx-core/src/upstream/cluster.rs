//! Clusters: their hosts (swapped atomically when DNS answers change), their stats,
//! and the cluster manager that names them.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::config::{
    ClusterConfig, DiscoveryType, DnsLookupFamily, EndpointConfig, UpstreamProtocol,
};
use crate::stats::{Counter, Gauge, Histogram, StatStore};

/// Per-host stats, shown by `/clusters`.
#[derive(Debug, Default)]
pub struct HostStats {
    pub cx_total: Counter,
    pub cx_active: Gauge,
    pub cx_connect_fail: Counter,
    pub rq_total: Counter,
    pub rq_active: Gauge,
    pub rq_success: Counter,
    pub rq_error: Counter,
    pub rq_timeout: Counter,
}

#[derive(Debug)]
pub struct Host {
    pub address: SocketAddr,
    /// The endpoint's host name for DNS clusters, empty for STATIC.
    pub hostname: String,
    pub stats: HostStats,
}

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
    pub upstream_cx_rx_bytes_total: Counter,
    pub upstream_cx_tx_bytes_total: Counter,
    pub upstream_cx_none_healthy: Counter,
    pub upstream_cx_connect_ms: Histogram,
    pub upstream_rq_total: Counter,
    pub upstream_rq_active: Gauge,
    pub upstream_rq_completed: Counter,
    pub upstream_rq_pending_total: Counter,
    pub upstream_rq_pending_failure_eject: Counter,
    pub upstream_rq_timeout: Counter,
    pub upstream_rq_rx_reset: Counter,
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
    fn new(store: &Arc<StatStore>, name: &str) -> Self {
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
            upstream_cx_rx_bytes_total: c("upstream_cx_rx_bytes_total"),
            upstream_cx_tx_bytes_total: c("upstream_cx_tx_bytes_total"),
            upstream_cx_none_healthy: c("upstream_cx_none_healthy"),
            upstream_cx_connect_ms: h("upstream_cx_connect_ms"),
            upstream_rq_total: c("upstream_rq_total"),
            upstream_rq_active: g("upstream_rq_active"),
            upstream_rq_completed: c("upstream_rq_completed"),
            upstream_rq_pending_total: c("upstream_rq_pending_total"),
            upstream_rq_pending_failure_eject: c("upstream_rq_pending_failure_eject"),
            upstream_rq_timeout: c("upstream_rq_timeout"),
            upstream_rq_rx_reset: c("upstream_rq_rx_reset"),
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
}

static NEXT_CLUSTER_ID: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug)]
pub struct Cluster {
    /// Process-unique id, the key of worker-local pools.
    pub id: usize,
    pub name: String,
    pub discovery: DiscoveryType,
    pub protocol: UpstreamProtocol,
    pub connect_timeout: Duration,
    pub dns_refresh_rate: Duration,
    pub dns_lookup_family: DnsLookupFamily,
    pub endpoints: Vec<EndpointConfig>,
    pub hosts: ArcSwap<Vec<Arc<Host>>>,
    pub stats: ClusterStats,
    pub raw: serde_json::Value,
}

impl Cluster {
    pub fn new(config: &ClusterConfig, store: &Arc<StatStore>) -> Arc<Self> {
        let stats = ClusterStats::new(store, &config.name);
        let hosts: Vec<Arc<Host>> = if config.discovery == DiscoveryType::Static {
            config
                .endpoints
                .iter()
                .filter_map(|e| {
                    let ip: IpAddr = e.address.parse().ok()?;
                    Some(new_host(SocketAddr::new(ip, e.port), String::new()))
                })
                .collect()
        } else {
            Vec::new()
        };
        stats.membership_total.set(hosts.len() as i64);
        stats.membership_healthy.set(hosts.len() as i64);
        Arc::new(Cluster {
            id: NEXT_CLUSTER_ID.fetch_add(1, Ordering::Relaxed),
            name: config.name.clone(),
            discovery: config.discovery,
            protocol: config.protocol,
            connect_timeout: config.connect_timeout,
            dns_refresh_rate: config.dns_refresh_rate,
            dns_lookup_family: config.dns_lookup_family,
            endpoints: config.endpoints.clone(),
            hosts: ArcSwap::from_pointee(hosts),
            stats,
            raw: config.raw.clone(),
        })
    }

    pub fn is_dns(&self) -> bool {
        matches!(
            self.discovery,
            DiscoveryType::StrictDns | DiscoveryType::LogicalDns
        )
    }

    /// Replaces the host set, keeping the `Host` (and its stats) of unchanged addresses.
    pub fn set_hosts(&self, resolved: Vec<(SocketAddr, String)>) {
        let current = self.hosts.load();
        let same = current.len() == resolved.len()
            && current
                .iter()
                .zip(&resolved)
                .all(|(h, (a, _))| h.address == *a);
        if same {
            return;
        }
        let by_addr: HashMap<SocketAddr, &Arc<Host>> =
            current.iter().map(|h| (h.address, h)).collect();
        let hosts: Vec<Arc<Host>> = resolved
            .into_iter()
            .map(|(addr, name)| {
                by_addr
                    .get(&addr)
                    .map_or_else(|| new_host(addr, name), |h| (*h).clone())
            })
            .collect();
        self.stats.membership_total.set(hosts.len() as i64);
        self.stats.membership_healthy.set(hosts.len() as i64);
        self.stats.membership_change.inc();
        self.hosts.store(Arc::new(hosts));
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
                        if !resolved.iter().any(|(r, _)| *r == a) {
                            resolved.push((a, ep.address.clone()));
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

fn new_host(address: SocketAddr, hostname: String) -> Arc<Host> {
    Arc::new(Host {
        address,
        hostname,
        stats: HostStats::default(),
    })
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

/// Every cluster by name.
#[derive(Debug, Default)]
pub struct ClusterManager {
    clusters: HashMap<String, Arc<Cluster>>,
    order: Vec<Arc<Cluster>>,
}

impl ClusterManager {
    pub fn new(configs: &[ClusterConfig], store: &Arc<StatStore>) -> Self {
        let mut cm = ClusterManager::default();
        for c in configs {
            let cluster = Cluster::new(c, store);
            cm.clusters.insert(c.name.clone(), cluster.clone());
            cm.order.push(cluster);
        }
        store
            .counter("cluster_manager.cluster_added")
            .add(configs.len() as u64);
        store
            .gauge("cluster_manager.active_clusters")
            .set(configs.len() as i64);
        store.gauge("cluster_manager.warming_clusters").set(0);
        cm
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.get(name)
    }

    pub fn all(&self) -> &[Arc<Cluster>] {
        &self.order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
