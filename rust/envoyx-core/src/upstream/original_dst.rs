//! `ORIGINAL_DST` clusters (Envoy's `source/extensions/clusters/original_dst/`): no
//! configured hosts; each request's original destination (a request header's
//! `ip:port` under `use_http_header`, else the downstream connection's local address
//! when the `original_dst` listener filter restored it) names the host, made on first use and shared by the workers,
//! and removed once no request picked it for a `cleanup_interval`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::Host;
use super::cluster::ClusterStats;
use super::lb::LbContext;
use crate::config::OriginalDstConfig;

/// The cluster's balancer and its hosts by address.
#[derive(Debug)]
pub struct OriginalDst {
    config: OriginalDstConfig,
    /// The cluster's name: a host's hostname is it followed by the address, as
    /// Envoy names them.
    cluster_name: String,
    /// Rows of a host's stats (the server's workers + 1).
    shards: usize,
    hosts: Mutex<Hosts>,
}

#[derive(Debug)]
struct Hosts {
    /// Each host and whether a request picked it since the last cleanup.
    by_address: HashMap<SocketAddr, (Arc<Host>, bool)>,
    next_cleanup: Instant,
}

impl OriginalDst {
    pub fn new(config: OriginalDstConfig, cluster_name: &str, shards: usize) -> Self {
        let next_cleanup = Instant::now() + config.cleanup_interval;
        OriginalDst {
            config,
            cluster_name: cluster_name.to_string(),
            shards,
            hosts: Mutex::new(Hosts {
                by_address: HashMap::new(),
                next_cleanup,
            }),
        }
    }

    /// Envoy's `OriginalDstCluster::LoadBalancer::chooseHost`: None when the
    /// request has no usable original destination.
    pub fn choose(&self, stats: &ClusterStats, context: &LbContext<'_>) -> Option<Arc<Host>> {
        // Then the downstream connection's local address, only when a listener
        // filter restored it (`original_dst`): else there is no host.
        let mut address = self
            .request_override_host(stats, context)
            .or(context.restored_local_address)?;
        if let Some(port) = self.config.upstream_port_override {
            address.set_port(port);
        }
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if now >= hosts.next_cleanup {
            // Envoy's `cleanup()` on its timer: a host not picked during the last
            // interval leaves, the others start a new one. Run here, by the
            // first pick after the interval, it removes the same hosts before any
            // request could see them.
            hosts.by_address.retain(|_, (host, used)| {
                let keep = std::mem::replace(used, false);
                if !keep {
                    host.removed
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                keep
            });
            hosts.next_cleanup = now + self.config.cleanup_interval;
        }
        let (host, used) = hosts.by_address.entry(address).or_insert_with(|| {
            (
                Arc::new(Host::new(
                    address,
                    format!("{}{address}", self.cluster_name),
                    self.shards,
                )),
                false,
            )
        });
        *used = true;
        let host = host.clone();
        let count = hosts.by_address.len() as i64;
        drop(hosts);
        stats.membership_total.set(count);
        stats.membership_healthy.set(count);
        Some(host)
    }

    /// The `use_http_header` header's address; an unparsable one counts
    /// `original_dst_host_invalid` and is ignored.
    fn request_override_host(
        &self,
        stats: &ClusterStats,
        context: &LbContext<'_>,
    ) -> Option<SocketAddr> {
        let name = self.config.http_header_name.as_ref()?;
        // An untrusted header: only its first value counts, as in Envoy.
        let value = context.headers?.get(name)?;
        match value.to_str().ok().and_then(|v| v.parse().ok()) {
            Some(address) => Some(address),
            None => {
                stats.original_dst_host_invalid.inc();
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::stats::StatStore;

    fn original_dst(header: bool, port: Option<u16>, cleanup: Duration) -> OriginalDst {
        OriginalDst::new(
            OriginalDstConfig {
                http_header_name: header.then(|| http::HeaderName::from_static("x-dst")),
                upstream_port_override: port,
                cleanup_interval: cleanup,
            },
            "od",
            2,
        )
    }

    fn pick(od: &OriginalDst, stats: &ClusterStats, value: Option<&str>) -> Option<Arc<Host>> {
        let mut headers = http::HeaderMap::new();
        if let Some(v) = value {
            headers.insert("x-dst", v.parse().unwrap());
        }
        od.choose(
            stats,
            &LbContext {
                headers: Some(&headers),
                ..LbContext::default()
            },
        )
    }

    #[test]
    fn a_host_per_destination_shared_until_unused() {
        let stats = ClusterStats::new(&StatStore::new(), "od");
        let od = original_dst(true, None, Duration::from_secs(60));
        let a = pick(&od, &stats, Some("10.0.0.1:80")).unwrap();
        assert_eq!(a.address, "10.0.0.1:80".parse().unwrap());
        assert_eq!(a.hostname, "od10.0.0.1:80");
        assert!(Arc::ptr_eq(
            &a,
            &pick(&od, &stats, Some("10.0.0.1:80")).unwrap()
        ));
        let b = pick(&od, &stats, Some("[::1]:81")).unwrap();
        assert_eq!(b.address, "[::1]:81".parse().unwrap());
        assert_eq!(stats.membership_total.get(), 2);
        assert!(pick(&od, &stats, None).is_none());
        assert_eq!(stats.original_dst_host_invalid.get(), 0);
        for bad in ["10.0.0.1", "host:80", "::1:80"] {
            assert!(pick(&od, &stats, Some(bad)).is_none());
        }
        assert_eq!(stats.original_dst_host_invalid.get(), 3);
        // Without use_http_header the header means nothing.
        let plain = original_dst(false, None, Duration::from_secs(60));
        assert!(pick(&plain, &stats, Some("10.0.0.1:80")).is_none());
    }

    #[test]
    fn restored_local_address_when_no_header_names_one() {
        let stats = ClusterStats::new(&StatStore::new(), "od");
        let restored = "10.0.0.9:15001".parse().unwrap();
        let context = |headers| LbContext {
            headers,
            restored_local_address: Some(restored),
            ..LbContext::default()
        };
        let plain = original_dst(false, Some(80), Duration::from_secs(60));
        let host = plain.choose(&stats, &context(None)).unwrap();
        assert_eq!(host.address, "10.0.0.9:80".parse().unwrap());
        // With use_http_header a valid header wins; an invalid one falls back.
        let od = original_dst(true, None, Duration::from_secs(60));
        let (mut good, mut bad) = (http::HeaderMap::new(), http::HeaderMap::new());
        good.insert("x-dst", "10.0.0.1:81".parse().unwrap());
        bad.insert("x-dst", "bad".parse().unwrap());
        let host = od.choose(&stats, &context(Some(&good))).unwrap();
        assert_eq!(host.address, "10.0.0.1:81".parse().unwrap());
        let host = od.choose(&stats, &context(Some(&bad))).unwrap();
        assert_eq!(host.address, restored);
        assert_eq!(stats.original_dst_host_invalid.get(), 1);
    }

    #[test]
    fn port_override_and_cleanup() {
        let stats = ClusterStats::new(&StatStore::new(), "od");
        let od = original_dst(true, Some(9), Duration::from_millis(20));
        let a = pick(&od, &stats, Some("10.0.0.1:80")).unwrap();
        assert_eq!(a.address, "10.0.0.1:9".parse().unwrap());
        // Picked during the first interval: kept by the first cleanup, gone
        // after an interval without a pick.
        std::thread::sleep(Duration::from_millis(25));
        let b = pick(&od, &stats, Some("10.0.0.2:80")).unwrap();
        assert_eq!(stats.membership_total.get(), 2);
        std::thread::sleep(Duration::from_millis(25));
        let b2 = pick(&od, &stats, Some("10.0.0.2:80")).unwrap();
        assert!(Arc::ptr_eq(&b, &b2));
        assert!(a.removed.load(std::sync::atomic::Ordering::Relaxed));
        assert_eq!(stats.membership_total.get(), 1);
        let a2 = pick(&od, &stats, Some("10.0.0.1:80")).unwrap();
        assert!(!Arc::ptr_eq(&a, &a2));
    }
}
