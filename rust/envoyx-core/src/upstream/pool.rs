//! Worker-local upstream connection pools and load-balancer state.
//!
//! Each worker owns one `WorkerPools`: no lock, no `Arc` per request (DESIGN.md §8).
//! HTTP/1.1 connections are kept idle per host and reused (keep-alive); one HTTP/2
//! connection per host is shared by every request of the worker. Connections are
//! closed when idle past the cluster's `idle_timeout`, after
//! `max_requests_per_connection`, and when their host or cluster goes away.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};

use super::cluster::{Cluster, Host};
use super::connect::{ConnectError, UpstreamStream, connect};
use super::lb::{LbContext, PrioritySet};
use crate::config::UpstreamProtocol;
use crate::http::body::ProxyBody;
use crate::io::{CountedIo, LocalExec};
use crate::per_worker::LocalHandle;

/// Cluster id, host address, and the SNI of TLS connections (two SNIs never
/// share a connection).
type PoolKey = (usize, SocketAddr, Option<Arc<str>>);

/// An HTTP/1.1 connection and how many requests it has carried.
pub struct PooledHttp1 {
    sender: http1::SendRequest<ProxyBody>,
    requests: u32,
    /// The cluster's host-set generation when it was opened
    /// (`close_connections_on_host_set_change`).
    generation: u64,
}

/// A shared HTTP/2 connection's use, kept by the pool and by each stream on it.
struct Http2State {
    active_streams: Cell<usize>,
    requests: Cell<u32>,
    idle_since: Cell<Instant>,
}

/// One request's use of an HTTP/2 connection; ends when the stream ends.
pub struct Http2Lease {
    sender: http2::SendRequest<ProxyBody>,
    state: Rc<Http2State>,
}

impl Drop for Http2Lease {
    fn drop(&mut self) {
        let active = self.state.active_streams.get() - 1;
        self.state.active_streams.set(active);
        if active == 0 {
            self.state.idle_since.set(Instant::now());
        }
    }
}

/// A connection ready to carry one request.
pub enum Sender {
    Http1(PooledHttp1),
    Http2(Http2Lease),
}

impl Sender {
    pub fn is_http2(&self) -> bool {
        matches!(self, Sender::Http2(_))
    }

    pub async fn send(
        &mut self,
        req: http::Request<ProxyBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper::Error> {
        match self {
            Sender::Http1(c) => c.sender.send_request(req).await,
            Sender::Http2(l) => l.sender.send_request(req).await,
        }
    }
}

struct IdleHttp1 {
    conn: PooledHttp1,
    since: Instant,
}

struct SharedHttp2 {
    sender: http2::SendRequest<ProxyBody>,
    state: Rc<Http2State>,
}

/// A worker's connections to one host of one cluster.
struct HostPool {
    cluster: Arc<Cluster>,
    host: Arc<Host>,
    idle_http1: Vec<IdleHttp1>,
    http2: Option<SharedHttp2>,
    /// Held while an HTTP/2 connection is being opened, so that concurrent first
    /// requests wait for that one connection instead of opening their own.
    http2_connecting: Rc<tokio::sync::Mutex<()>>,
    /// With `auto_config`: whether ALPN chose HTTP/2 (None until a connection
    /// has told).
    alpn_h2: Option<bool>,
}

impl HostPool {
    fn new(cluster: &Arc<Cluster>, host: &Arc<Host>) -> Self {
        HostPool {
            cluster: cluster.clone(),
            host: host.clone(),
            idle_http1: Vec::new(),
            http2: None,
            http2_connecting: Rc::default(),
            alpn_h2: None,
        }
    }

    /// A lease on the shared HTTP/2 connection, if it can take another request.
    fn lease_http2(&mut self) -> Option<Http2Lease> {
        let shared = self.http2.as_ref()?;
        if shared.sender.is_closed() {
            self.http2 = None;
            return None;
        }
        let state = shared.state.clone();
        let lease = Http2Lease {
            sender: shared.sender.clone(),
            state: state.clone(),
        };
        state.active_streams.set(state.active_streams.get() + 1);
        let requests = state.requests.get() + 1;
        state.requests.set(requests);
        if self
            .cluster
            .pool
            .max_requests_per_connection
            .is_some_and(|max| requests >= max)
        {
            // Its last request: later ones open a new connection.
            self.cluster.stats.upstream_cx_max_requests.inc();
            self.http2 = None;
        }
        Some(lease)
    }

    /// Forgets connections the upstream closed and closes those idle past the
    /// cluster's idle timeout (only those count as `upstream_cx_idle_timeout`);
    /// whether the pool is now empty.
    fn expire_idle(&mut self, now: Instant) -> bool {
        let stats = &self.cluster.stats;
        let timeout = self.cluster.pool.idle_timeout;
        let expired = |since: Instant| timeout.is_some_and(|t| now.duration_since(since) >= t);
        self.idle_http1.retain(|idle| {
            if idle.conn.sender.is_closed() {
                return false;
            }
            if expired(idle.since) {
                stats.upstream_cx_idle_timeout.inc();
                return false;
            }
            true
        });
        if let Some(h2) = &self.http2 {
            if h2.sender.is_closed() {
                self.http2 = None;
            } else if h2.state.active_streams.get() == 0 && expired(h2.state.idle_since.get()) {
                stats.upstream_cx_idle_timeout.inc();
                self.http2 = None;
            }
        }
        self.idle_http1.is_empty() && self.http2.is_none()
    }
}

/// One worker's upstream connections and load-balancer state: no lock, no `Arc`
/// per request (DESIGN.md §8).
#[derive(Default)]
pub struct WorkerPools {
    hosts: RefCell<HashMap<PoolKey, HostPool>>,
    balancers: RefCell<HashMap<usize, ClusterLocal>>,
}

/// A worker's view of one cluster: its hosts by priority and health with their
/// balancers, rebuilt when DNS, EDS or CDS replace the host list or a host's health
/// changes, so that a pick takes no lock and touches no reference count other
/// workers write.
struct ClusterLocal {
    list: Arc<Vec<Arc<Host>>>,
    /// The cluster's health epoch `set` was built at.
    health_epoch: u64,
    set: Rc<PrioritySet>,
}

impl WorkerPools {
    pub fn new() -> Rc<Self> {
        Rc::new(Self::default())
    }

    /// A host of the cluster for one try, by the cluster's policy and this
    /// worker's balancer state; None when the cluster has no usable host.
    pub fn choose_host(
        &self,
        cluster: &Cluster,
        context: &LbContext<'_>,
    ) -> Option<LocalHandle<Host>> {
        let set = {
            let current = cluster.hosts.load();
            let epoch = cluster.health_epoch();
            let mut balancers = self.balancers.borrow_mut();
            let local = balancers.entry(cluster.id).or_insert_with(|| ClusterLocal {
                list: Arc::new(Vec::new()),
                health_epoch: u64::MAX,
                set: Rc::new(PrioritySet::new(&[], cluster.lb, 0, Default::default())),
            });
            if !Arc::ptr_eq(&local.list, &current) || local.health_epoch != epoch {
                let members_changed = local.list.len() != current.len()
                    || local
                        .list
                        .iter()
                        .zip(current.iter())
                        .any(|(a, b)| !Arc::ptr_eq(a, b));
                if members_changed
                    && local.health_epoch != u64::MAX
                    && cluster.lb.close_connections_on_host_set_change
                {
                    self.hosts
                        .borrow_mut()
                        .retain(|(id, _, _), _| *id != cluster.id);
                }
                local.set = Rc::new(PrioritySet::new(
                    &current,
                    cluster.lb,
                    cluster.overprovisioning_factor(),
                    cluster.stats.lb_healthy_panic.clone(),
                ));
                local.list = arc_swap::Guard::into_inner(current);
                local.health_epoch = epoch;
            }
            local.set.clone()
        };
        set.choose(context)
    }

    /// A connection to `host` (with `sni` for TLS): an idle keep-alive one
    /// (HTTP/1.1) or the shared one (HTTP/2) if there is one, else a new one.
    /// `upstream_rq_pending_total` counts the requests that had to wait for a new
    /// connection, as Envoy does.
    pub async fn acquire(
        &self,
        cluster: &Arc<Cluster>,
        host: &Arc<Host>,
        sni: Option<Arc<str>>,
    ) -> Result<Sender, ConnectError> {
        let key = (cluster.id, host.address, sni);
        let http2 = match cluster.protocol {
            UpstreamProtocol::Http1 => Some(false),
            UpstreamProtocol::Http2 => Some(true),
            UpstreamProtocol::Auto => {
                if let Some(lease) = self.lease_http2(&key) {
                    return Ok(Sender::Http2(lease));
                }
                self.hosts.borrow().get(&key).and_then(|p| p.alpn_h2)
            }
        };
        match http2 {
            Some(false) => {
                loop {
                    let idle = self
                        .hosts
                        .borrow_mut()
                        .get_mut(&key)
                        .and_then(|p| p.idle_http1.pop());
                    let Some(IdleHttp1 { mut conn, .. }) = idle else {
                        break;
                    };
                    if !conn.sender.is_closed() && conn.sender.ready().await.is_ok() {
                        conn.requests += 1;
                        return Ok(Sender::Http1(conn));
                    }
                }
                cluster.stats.upstream_rq_pending_total.inc();
                // Boxed: the connect and handshake futures are large and rare on
                // keep-alive; inline they would grow every request's future.
                Box::pin(async {
                    let stream = connect(cluster, host, key.2.as_deref()).await?;
                    open_http1(cluster, host, stream).await
                })
                .await
            }
            Some(true) => {
                if let Some(lease) = self.lease_http2(&key) {
                    return Ok(Sender::Http2(lease));
                }
                Box::pin(self.open_http2(cluster, host, key)).await
            }
            None => Box::pin(self.open_by_alpn(cluster, host, key)).await,
        }
    }

    /// `auto_config`'s first connection to a host: ALPN says which protocol.
    async fn open_by_alpn(
        &self,
        cluster: &Arc<Cluster>,
        host: &Arc<Host>,
        key: PoolKey,
    ) -> Result<Sender, ConnectError> {
        cluster.stats.upstream_rq_pending_total.inc();
        let stream = connect(cluster, host, key.2.as_deref()).await?;
        let h2 = stream.negotiated_h2();
        self.hosts
            .borrow_mut()
            .entry(key.clone())
            .or_insert_with(|| HostPool::new(cluster, host))
            .alpn_h2 = Some(h2);
        if h2 {
            self.install_http2(cluster, host, key, stream).await
        } else {
            open_http1(cluster, host, stream).await
        }
    }

    /// Opens the host's shared HTTP/2 connection, or waits for the request that is
    /// opening it.
    async fn open_http2(
        &self,
        cluster: &Arc<Cluster>,
        host: &Arc<Host>,
        key: PoolKey,
    ) -> Result<Sender, ConnectError> {
        cluster.stats.upstream_rq_pending_total.inc();
        let connecting = self
            .hosts
            .borrow_mut()
            .entry(key.clone())
            .or_insert_with(|| HostPool::new(cluster, host))
            .http2_connecting
            .clone();
        let _connecting = connecting.lock().await;
        // Another request may have opened it while this one waited.
        if let Some(lease) = self.lease_http2(&key) {
            return Ok(Sender::Http2(lease));
        }
        let stream = connect(cluster, host, key.2.as_deref()).await?;
        self.install_http2(cluster, host, key, stream).await
    }

    /// Makes `stream` the host's shared HTTP/2 connection; a lease on it.
    async fn install_http2(
        &self,
        cluster: &Arc<Cluster>,
        host: &Arc<Host>,
        key: PoolKey,
        stream: UpstreamStream,
    ) -> Result<Sender, ConnectError> {
        let (sender, conn) = http2::Builder::new(LocalExec)
            .timer(TokioTimer::new())
            .handshake(counted(cluster, stream))
            .await
            .map_err(ConnectError::Handshake)?;
        cluster.stats.upstream_cx_http2_total.inc();
        tokio::task::spawn_local(track_connection(conn, cluster, host));
        let shared = SharedHttp2 {
            sender,
            state: Rc::new(Http2State {
                active_streams: Cell::new(0),
                requests: Cell::new(0),
                idle_since: Cell::new(Instant::now()),
            }),
        };
        let mut hosts = self.hosts.borrow_mut();
        let pool = hosts
            .entry(key)
            .or_insert_with(|| HostPool::new(cluster, host));
        pool.http2 = Some(shared);
        pool.lease_http2()
            .map(Sender::Http2)
            .ok_or(ConnectError::Closed)
    }

    fn lease_http2(&self, key: &PoolKey) -> Option<Http2Lease> {
        self.hosts.borrow_mut().get_mut(key)?.lease_http2()
    }

    /// Returns an HTTP/1.1 connection whose exchange finished, for reuse; closes it
    /// instead when its host or cluster is gone or it carried its last request.
    pub fn release(
        &self,
        cluster: &Arc<Cluster>,
        host: &Arc<Host>,
        sni: Option<Arc<str>>,
        conn: PooledHttp1,
    ) {
        if conn.sender.is_closed()
            || host.is_removed()
            || (cluster.lb.close_connections_on_host_set_change
                && conn.generation != cluster.host_set_generation())
            || cluster.removed.load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        if cluster
            .pool
            .max_requests_per_connection
            .is_some_and(|max| conn.requests >= max)
        {
            cluster.stats.upstream_cx_max_requests.inc();
            return;
        }
        self.hosts
            .borrow_mut()
            .entry((cluster.id, host.address, sni))
            .or_insert_with(|| HostPool::new(cluster, host))
            .idle_http1
            .push(IdleHttp1 {
                conn,
                since: Instant::now(),
            });
    }

    /// The worker's periodic upkeep: closes the connections of clusters that are
    /// gone (removed or replaced) and of hosts DNS or EDS removed, and those idle
    /// past their cluster's idle timeout.
    pub fn maintain(&self, live: &std::collections::HashSet<usize>) {
        let now = Instant::now();
        self.hosts.borrow_mut().retain(|(id, _, _), pool| {
            if !live.contains(id) || pool.host.is_removed() {
                return false;
            }
            !pool.expire_idle(now) || Rc::strong_count(&pool.http2_connecting) > 1
        });
        self.balancers
            .borrow_mut()
            .retain(|id, _| live.contains(id));
    }

    /// Idle HTTP/1.1 plus shared HTTP/2 connections held (for tests).
    #[cfg(test)]
    fn pooled(&self) -> usize {
        self.hosts
            .borrow()
            .values()
            .map(|p| p.idle_http1.len() + usize::from(p.http2.is_some()))
            .sum()
    }
}

type UpstreamIo = TokioIo<CountedIo<UpstreamStream>>;

/// The stream with the cluster's byte counters.
fn counted(cluster: &Cluster, stream: UpstreamStream) -> UpstreamIo {
    TokioIo::new(CountedIo::new(
        stream,
        cluster.stats.upstream_cx_rx_bytes_total.clone(),
        cluster.stats.upstream_cx_tx_bytes_total.clone(),
    ))
}

/// A new HTTP/1.1 connection on `stream`.
async fn open_http1(
    cluster: &Arc<Cluster>,
    host: &Arc<Host>,
    stream: UpstreamStream,
) -> Result<Sender, ConnectError> {
    let (sender, conn) = http1::Builder::new()
        .handshake(counted(cluster, stream))
        .await
        .map_err(ConnectError::Handshake)?;
    cluster.stats.upstream_cx_http1_total.inc();
    tokio::task::spawn_local(track_connection(conn, cluster, host));
    Ok(Sender::Http1(PooledHttp1 {
        sender,
        requests: 1,
        generation: cluster.host_set_generation(),
    }))
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
    host.stats.cx_active().inc();
    async move {
        let _ = conn.await;
        active.dec();
        host.stats.cx_active().dec();
        destroy.inc();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use super::*;
    use crate::config::{
        ClusterConfig, DiscoveryType, DnsLookupFamily, EndpointConfig, LbConfig, PoolSettings,
    };
    use crate::stats::StatStore;
    use crate::upstream::cluster::Origin;

    fn cluster(protocol: UpstreamProtocol, port: u16, pool: PoolSettings) -> Arc<Cluster> {
        let config = ClusterConfig {
            name: "c".into(),
            discovery: DiscoveryType::Static,
            connect_timeout: Duration::from_secs(1),
            endpoints: vec![EndpointConfig {
                address: "127.0.0.1".into(),
                port,
                ..EndpointConfig::default()
            }],
            protocol,
            dns_refresh_rate: Duration::from_secs(5),
            dns_lookup_family: DnsLookupFamily::Auto,
            lb: LbConfig::default(),
            overprovisioning_factor: 140,
            eds_service_name: None,
            pool,
            tls: None,
            health_checks: Vec::new(),
            outlier_detection: None,
            ignore_health_on_host_removal: false,
            raw: serde_json::Value::Null,
        };
        Cluster::new(
            &config,
            &StatStore::new(),
            &Default::default(),
            Origin::bootstrap(),
        )
        .unwrap()
    }

    /// A loopback server that accepts HTTP/2 (prior knowledge) connections and
    /// answers every request with 200; returns its port and accepted-connection count.
    async fn h2_server() -> (u16, Rc<Cell<usize>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Rc::new(Cell::new(0));
        let count = accepted.clone();
        tokio::task::spawn_local(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.set(count.get() + 1);
                tokio::task::spawn_local(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(ProxyBody::Empty))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(LocalExec)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (port, accepted)
    }

    fn run_local<F: std::future::Future>(f: F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, f)
    }

    #[test]
    fn concurrent_first_http2_requests_share_one_connection() {
        run_local(async {
            let (port, _) = h2_server().await;
            let c = cluster(UpstreamProtocol::Http2, port, PoolSettings::default());
            let host = c.hosts.load()[0].clone();
            let pools = WorkerPools::new();
            let acquires = (0..8).map(|_| pools.acquire(&c, &host, None));
            let senders = futures_util::future::join_all(acquires).await;
            assert!(senders.iter().all(|s| matches!(s, Ok(Sender::Http2(_)))));
            // One connection opened; every request but the first waited for it.
            assert_eq!(c.stats.upstream_cx_total.get(), 1);
            assert_eq!(c.stats.upstream_cx_http2_total.get(), 1);
            assert_eq!(c.stats.upstream_rq_pending_total.get(), 8);
        });
    }

    #[test]
    fn http2_connection_retires_after_max_requests() {
        run_local(async {
            let (port, accepted) = h2_server().await;
            let settings = PoolSettings {
                max_requests_per_connection: Some(2),
                ..PoolSettings::default()
            };
            let c = cluster(UpstreamProtocol::Http2, port, settings);
            let host = c.hosts.load()[0].clone();
            let pools = WorkerPools::new();
            for _ in 0..5 {
                let mut s = pools.acquire(&c, &host, None).await.unwrap();
                let req = http::Request::builder()
                    .uri(format!("http://127.0.0.1:{port}/"))
                    .body(ProxyBody::Empty)
                    .unwrap();
                assert_eq!(s.send(req).await.unwrap().status(), 200);
            }
            assert_eq!(accepted.get(), 3);
            assert_eq!(c.stats.upstream_cx_max_requests.get(), 2);
        });
    }

    #[test]
    fn idle_http2_connection_closes_after_idle_timeout_and_removed_hosts_are_dropped() {
        run_local(async {
            let (port, _) = h2_server().await;
            let settings = PoolSettings {
                idle_timeout: Some(Duration::from_millis(1)),
                ..PoolSettings::default()
            };
            let c = cluster(UpstreamProtocol::Http2, port, settings);
            let host = c.hosts.load()[0].clone();
            let pools = WorkerPools::new();
            let live: HashSet<usize> = [c.id].into();
            let lease = pools.acquire(&c, &host, None).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
            pools.maintain(&live);
            // In use: kept.
            assert_eq!(pools.pooled(), 1);
            drop(lease);
            tokio::time::sleep(Duration::from_millis(5)).await;
            pools.maintain(&live);
            assert_eq!(pools.pooled(), 0);
            assert_eq!(c.stats.upstream_cx_idle_timeout.get(), 1);

            let c = cluster(UpstreamProtocol::Http2, port, PoolSettings::default());
            let host = c.hosts.load()[0].clone();
            drop(pools.acquire(&c, &host, None).await.unwrap());
            let live: HashSet<usize> = [c.id].into();
            pools.maintain(&live);
            assert_eq!(pools.pooled(), 1);
            c.set_hosts(Vec::new());
            assert!(host.is_removed());
            pools.maintain(&live);
            assert_eq!(pools.pooled(), 0);
        });
    }
}
