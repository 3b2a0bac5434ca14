//! Worker-local upstream connection pools and load-balancer state.
//!
//! Each worker owns one `WorkerPools`: no lock, no `Arc` per request (DESIGN.md §8).
//! HTTP/1.1 connections are kept idle per host and reused (keep-alive); an HTTP/2
//! connection per host is shared by every request of the worker.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::cluster::{Cluster, Host};
use crate::config::{LbPolicy, UpstreamProtocol};
use crate::http::body::ProxyBody;
use crate::io::{CountedIo, LocalExec};

type PoolKey = (usize, SocketAddr);

/// A connection ready to carry one request.
pub enum Sender {
    Http1(http1::SendRequest<ProxyBody>),
    Http2(http2::SendRequest<ProxyBody>),
}

/// Why no connection could be had; each maps to Envoy's reset reason text.
#[derive(Debug)]
pub enum ConnectError {
    Timeout,
    Io(std::io::Error),
    Handshake(hyper::Error),
}

impl ConnectError {
    /// Envoy's `reset reason` / `transport failure reason` wording.
    pub fn reset_reason(&self) -> String {
        match self {
            ConnectError::Timeout => "connection timeout".to_string(),
            // Envoy 1.40 names only the reason in the reply body; the transport
            // failure goes to %UPSTREAM_TRANSPORT_FAILURE_REASON%.
            ConnectError::Io(_) => "remote connection failure".to_string(),
            ConnectError::Handshake(e) => {
                format!("connection failure, transport failure reason: {e}")
            }
        }
    }

    pub fn transport_failure(&self) -> String {
        match self {
            ConnectError::Timeout => "connection timeout".to_string(),
            ConnectError::Io(e) => format!("delayed connect error: {}", io_reason(e)),
            ConnectError::Handshake(e) => e.to_string(),
        }
    }
}

/// The strerror text without Rust's " (os error N)" suffix, as Envoy prints it.
fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

#[derive(Default)]
pub struct WorkerPools {
    idle_h1: RefCell<HashMap<PoolKey, Vec<http1::SendRequest<ProxyBody>>>>,
    h2: RefCell<HashMap<PoolKey, http2::SendRequest<ProxyBody>>>,
    round_robin: RefCell<HashMap<usize, Rc<Cell<usize>>>>,
}

impl WorkerPools {
    pub fn new() -> Rc<Self> {
        Rc::new(Self::default())
    }

    /// Round robin over the cluster's current hosts, per worker as in Envoy.
    pub fn pick_host(&self, cluster: &Cluster) -> Option<Arc<Host>> {
        let hosts = cluster.hosts.load();
        if hosts.is_empty() {
            return None;
        }
        if cluster.lb_policy == LbPolicy::LeastRequest && hosts.len() > 1 {
            let a = rand::random_range(0..hosts.len());
            let b = (a + rand::random_range(1..hosts.len())) % hosts.len();
            let (ha, hb) = (&hosts[a], &hosts[b]);
            let pick = if hb.stats.rq_active.get() < ha.stats.rq_active.get() {
                hb
            } else {
                ha
            };
            return Some(pick.clone());
        }
        let next = self
            .round_robin
            .borrow_mut()
            .entry(cluster.id)
            .or_insert_with(|| Rc::new(Cell::new(rand::random::<u32>() as usize)))
            .clone();
        let i = next.get();
        next.set(i.wrapping_add(1));
        Some(hosts[i % hosts.len()].clone())
    }

    /// A connection to `host`: an idle keep-alive one if any, else a new one.
    pub async fn acquire(
        &self,
        cluster: &Cluster,
        host: &Arc<Host>,
    ) -> Result<Sender, ConnectError> {
        let key = (cluster.id, host.address);
        match cluster.protocol {
            UpstreamProtocol::Http1 => {
                loop {
                    let idle = self.idle_h1.borrow_mut().get_mut(&key).and_then(Vec::pop);
                    let Some(mut sender) = idle else { break };
                    if sender.is_closed() {
                        continue;
                    }
                    if sender.ready().await.is_ok() {
                        return Ok(Sender::Http1(sender));
                    }
                }
                let io = connect(cluster, host).await?;
                let (sender, conn) = http1::Builder::new()
                    .handshake(io)
                    .await
                    .map_err(ConnectError::Handshake)?;
                cluster.stats.upstream_cx_http1_total.inc();
                tokio::task::spawn_local(track_connection(conn, cluster, host));
                Ok(Sender::Http1(sender))
            }
            UpstreamProtocol::Http2 => {
                let existing = self.h2.borrow().get(&key).cloned();
                if let Some(mut sender) = existing
                    && !sender.is_closed()
                    && sender.ready().await.is_ok()
                {
                    return Ok(Sender::Http2(sender));
                }
                let io = connect(cluster, host).await?;
                let (sender, conn) = http2::Builder::new(LocalExec)
                    .timer(TokioTimer::new())
                    .handshake(io)
                    .await
                    .map_err(ConnectError::Handshake)?;
                cluster.stats.upstream_cx_http2_total.inc();
                tokio::task::spawn_local(track_connection(conn, cluster, host));
                self.h2.borrow_mut().insert(key, sender.clone());
                Ok(Sender::Http2(sender))
            }
        }
    }

    /// Closes the idle connections of clusters that are gone (removed or replaced).
    pub fn prune(&self, live: &std::collections::HashSet<usize>) {
        self.idle_h1
            .borrow_mut()
            .retain(|(id, _), _| live.contains(id));
        self.h2.borrow_mut().retain(|(id, _), _| live.contains(id));
        self.round_robin
            .borrow_mut()
            .retain(|id, _| live.contains(id));
    }

    /// Returns an HTTP/1.1 connection whose exchange finished, for reuse.
    pub fn release(
        &self,
        cluster_id: usize,
        host: SocketAddr,
        sender: http1::SendRequest<ProxyBody>,
    ) {
        if !sender.is_closed() {
            self.idle_h1
                .borrow_mut()
                .entry((cluster_id, host))
                .or_default()
                .push(sender);
        }
    }
}

type UpstreamIo = TokioIo<CountedIo<TcpStream>>;

async fn connect(cluster: &Cluster, host: &Arc<Host>) -> Result<UpstreamIo, ConnectError> {
    let stats = &cluster.stats;
    stats.upstream_cx_total.inc();
    host.stats.cx_total.inc();
    let started = Instant::now();
    let stream =
        match tokio::time::timeout(cluster.connect_timeout, TcpStream::connect(host.address)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                stats.upstream_cx_connect_fail.inc();
                host.stats.cx_connect_fail.inc();
                return Err(ConnectError::Io(e));
            }
            Err(_) => {
                stats.upstream_cx_connect_fail.inc();
                stats.upstream_cx_connect_timeout.inc();
                host.stats.cx_connect_fail.inc();
                return Err(ConnectError::Timeout);
            }
        };
    stats
        .upstream_cx_connect_ms
        .record(started.elapsed().as_millis() as u64);
    let _ = stream.set_nodelay(true);
    Ok(TokioIo::new(CountedIo::new(
        stream,
        stats.upstream_cx_rx_bytes_total.clone(),
        stats.upstream_cx_tx_bytes_total.clone(),
    )))
}

/// Drives an upstream connection and keeps `upstream_cx_active` right around it.
fn track_connection<C>(
    conn: C,
    cluster: &Cluster,
    host: &Arc<Host>,
) -> impl Future<Output = ()> + 'static
where
    C: Future<Output = Result<(), hyper::Error>> + 'static,
{
    let active = cluster.stats.upstream_cx_active.clone();
    let destroy = cluster.stats.upstream_cx_destroy.clone();
    let host = host.clone();
    active.inc();
    host.stats.cx_active.inc();
    async move {
        let _ = conn.await;
        active.dec();
        host.stats.cx_active.dec();
        destroy.inc();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{ClusterConfig, DiscoveryType, DnsLookupFamily, EndpointConfig};
    use crate::stats::StatStore;
    use crate::upstream::cluster::Origin;

    fn cluster(lb_policy: LbPolicy) -> Arc<Cluster> {
        let config = ClusterConfig {
            name: "c".into(),
            discovery: DiscoveryType::Static,
            connect_timeout: Duration::from_secs(1),
            endpoints: ["127.0.0.1:1", "127.0.0.1:2"]
                .iter()
                .map(|a| {
                    let a: SocketAddr = a.parse().unwrap();
                    EndpointConfig {
                        address: a.ip().to_string(),
                        port: a.port(),
                    }
                })
                .collect(),
            protocol: UpstreamProtocol::Http1,
            dns_refresh_rate: Duration::from_secs(5),
            dns_lookup_family: DnsLookupFamily::Auto,
            lb_policy,
            eds_service_name: None,
            raw: serde_json::Value::Null,
        };
        Cluster::new(&config, &StatStore::new(), Origin::bootstrap())
    }

    #[test]
    fn least_request_avoids_the_busier_host() {
        let c = cluster(LbPolicy::LeastRequest);
        let hosts = c.hosts.load();
        for _ in 0..5 {
            hosts[0].stats.rq_active.inc();
        }
        let pools = WorkerPools::new();
        for _ in 0..100 {
            assert_eq!(pools.pick_host(&c).unwrap().address, hosts[1].address);
        }
    }

    #[test]
    fn round_robin_alternates() {
        let c = cluster(LbPolicy::RoundRobin);
        let pools = WorkerPools::new();
        let picks: Vec<SocketAddr> = (0..4)
            .map(|_| pools.pick_host(&c).unwrap().address)
            .collect();
        assert_ne!(picks[0], picks[1]);
        assert_eq!(picks[0], picks[2]);
        assert_eq!(picks[1], picks[3]);
    }

    #[test]
    fn prune_forgets_clusters_that_are_gone() {
        let c = cluster(LbPolicy::RoundRobin);
        let pools = WorkerPools::new();
        pools.pick_host(&c);
        assert!(pools.round_robin.borrow().contains_key(&c.id));
        pools.prune(&std::collections::HashSet::new());
        assert!(pools.round_robin.borrow().is_empty());
    }
}
