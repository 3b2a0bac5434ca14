//! Worker-local upstream connection pools and load-balancer state.
//!
//! Each worker owns one `WorkerPools`: no lock, no `Arc` per request (DESIGN.md §8).
//! HTTP/1.1 connections are kept idle per host and reused (keep-alive); one HTTP/2
//! connection per host is shared by every request of the worker. Connections are
//! closed when idle past the cluster's `idle_timeout`, after
//! `max_requests_per_connection`, and when their host or cluster goes away.
//!
//! The cluster's circuit breakers (upstream/resource_manager.rs) are enforced
//! here as Envoy's pool does: a request that finds no free connection is pending
//! (`max_pending_requests`) while a connection is opened for it or, when
//! `max_connections` is reached, until another request releases one; a request
//! handed a connection becomes active (`max_requests`).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};

use super::cluster::{Cluster, Host};
use super::connect::{ConnectError, UpstreamStream, connect};
use super::lb::{LbContext, PrioritySet};
use super::resource_manager::ResourceManager;
use crate::config::HeaderKeyFormat;
use crate::config::circuit_breakers::Priority;
use crate::http::body::ProxyBody;
use crate::http::header_case::{CaseIo, CaseSlot};
use crate::io::{CountedIo, LocalExec};
use crate::per_worker::LocalHandle;

/// Cluster id, host address, and the SNI of TLS connections (two SNIs never
/// share a connection).
/// A worker's pool: cluster, host, SNI and the request's routing priority (each
/// priority has its own connections and circuit breakers, as in Envoy).
type PoolKey = (usize, SocketAddr, Option<Arc<str>>, Priority);

/// An HTTP/1.1 connection and how many requests it has carried.
pub struct PooledHttp1 {
    sender: http1::SendRequest<ProxyBody>,
    requests: u32,
    /// The cluster's host-set generation when it was opened
    /// (`close_connections_on_host_set_change`).
    generation: u64,
    /// The request it carries now (none while idle).
    active: Option<ActiveRequest>,
    /// Header-name case for the request in flight (http/header_case.rs).
    case: Arc<CaseSlot>,
    /// The cluster's `http_protocol_options.header_key_format`.
    key_format: HeaderKeyFormat,
}

/// Why `acquire` gave no connection.
#[derive(Debug)]
pub enum AcquireError {
    /// A circuit breaker refused the request (`max_pending_requests` or
    /// `max_requests`): Envoy's pool overflow, answered 503 `UO`.
    Overflow,
    Connect(ConnectError),
}

impl From<ConnectError> for AcquireError {
    fn from(e: ConnectError) -> Self {
        AcquireError::Connect(e)
    }
}

/// A request's place in `max_requests`, from when it is handed a connection
/// until its stream ends (its `Sender` drops, or its HTTP/1.1 connection is
/// released).
struct ActiveRequest(LocalHandle<ResourceManager>);

impl ActiveRequest {
    /// Takes a place if `max_requests` allows (Envoy's `attachStreamToClient`),
    /// else counts the overflow.
    fn attach(pool: &HostPool) -> Result<Self, AcquireError> {
        let requests = &pool.resources.requests;
        if !requests.can_create() {
            pool.cluster.resources.upstream_rq_active_overflow.inc();
            return Err(AcquireError::Overflow);
        }
        requests.inc();
        Ok(ActiveRequest(pool.resources.clone()))
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.requests.dec();
    }
}

/// What a worker's HTTP/1.1 connections to one host share with the tasks that
/// drive them: how many are open, and the requests waiting for one.
#[derive(Default)]
struct Http1Shared {
    /// Connections open or opening (busy or idle).
    open: Cell<usize>,
    /// Requests waiting because `max_connections` was reached, first come first
    /// served: each is handed a released connection, or None when a connection
    /// closed (it may then open one itself).
    waiters: RefCell<VecDeque<tokio::sync::oneshot::Sender<Option<PooledHttp1>>>>,
}

impl Http1Shared {
    /// Hands `conn` (or news of a closed connection) to the first waiter still
    /// waiting; gives it back when none is.
    fn hand_over(&self, mut conn: Option<PooledHttp1>) -> Option<PooledHttp1> {
        loop {
            let Some(waiter) = self.waiters.borrow_mut().pop_front() else {
                return conn;
            };
            match waiter.send(conn) {
                Ok(()) => return None,
                Err(back) => conn = back,
            }
        }
    }
}

/// A connection's place in `max_connections`, from when it starts opening until
/// it closes (held by the task that drives it).
struct ConnectionSlot {
    resources: Arc<ResourceManager>,
    /// Set for an HTTP/1.1 connection: its host pool's count and waiters.
    http1: Option<Rc<Http1Shared>>,
}

impl ConnectionSlot {
    fn new(resources: &Arc<ResourceManager>) -> Self {
        resources.connections.inc();
        ConnectionSlot {
            resources: resources.clone(),
            http1: None,
        }
    }

    /// The slot of a connection opened because the pool has none it can use:
    /// opened even over `max_connections`, counting `upstream_cx_overflow`
    /// (Envoy's rule for a host with no connection; a worker shares one HTTP/2
    /// connection per host, so it opens one only when it has none).
    fn open_anyway(cluster: &Cluster, host: &Host, resources: &Arc<ResourceManager>) -> Self {
        if !can_create_connection(resources, host) {
            cluster.resources.upstream_cx_overflow.inc();
        }
        Self::new(resources)
    }

    fn http1(mut self, shared: &Rc<Http1Shared>) -> Self {
        shared.open.set(shared.open.get() + 1);
        self.http1 = Some(shared.clone());
        self
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.resources.connections.dec();
        if let Some(shared) = &self.http1 {
            shared.open.set(shared.open.get() - 1);
            // A waiter may now open a connection in its place.
            shared.hand_over(None);
        }
    }
}

/// Whether a new connection to `host` is within `max_connections` and the
/// per-host limit (Envoy's `canCreateConnection`).
fn can_create_connection(resources: &ResourceManager, host: &Host) -> bool {
    if let Some(max) = resources.max_connections_per_host
        && host.stats.cx_active().get() >= max as i64
    {
        return false;
    }
    resources.connections.can_create()
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
    _active: ActiveRequest,
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
        mut req: http::Request<ProxyBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper::Error> {
        match self {
            Sender::Http1(c) => {
                if let Some(gate) = req.extensions().get::<Arc<super::ContinueGate>>() {
                    let gate = gate.clone();
                    hyper::ext::on_informational(&mut req, move |res| {
                        if res.status() == http::StatusCode::CONTINUE {
                            gate.open();
                        }
                    });
                }
                let records = c.case.arm(&req, c.key_format);
                let mut response = c.sender.send_request(req).await?;
                if records && let Some(case) = c.case.take_recorded() {
                    response.extensions_mut().insert(case);
                }
                Ok(response)
            }
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
    /// The circuit breakers requests to this host count against.
    resources: LocalHandle<ResourceManager>,
    http1: Rc<Http1Shared>,
}

impl HostPool {
    fn new(cluster: &Arc<Cluster>, host: &Arc<Host>, priority: Priority) -> Self {
        HostPool {
            cluster: cluster.clone(),
            host: host.clone(),
            idle_http1: Vec::new(),
            http2: None,
            http2_connecting: Rc::default(),
            alpn_h2: None,
            resources: LocalHandle::new(cluster.resources.get(priority).clone()),
            http1: Rc::default(),
        }
    }

    /// A lease on the shared HTTP/2 connection, if it can take another request
    /// (and `max_requests` allows one more).
    fn lease_http2(&mut self) -> Result<Option<Http2Lease>, AcquireError> {
        let Some(shared) = self.http2.as_ref() else {
            return Ok(None);
        };
        if shared.sender.is_closed() {
            self.http2 = None;
            return Ok(None);
        }
        let active = ActiveRequest::attach(self)?;
        let shared = self.http2.as_ref().expect("checked above");
        let state = shared.state.clone();
        let lease = Http2Lease {
            sender: shared.sender.clone(),
            state: state.clone(),
            _active: active,
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
        Ok(Some(lease))
    }

    /// Whether a connection is being opened, an HTTP/1.1 connection is in use,
    /// or a request waits for one: the pool's counts must outlive its idle
    /// connections.
    fn in_use(&self) -> bool {
        self.http1.open.get() > 0
            || !self.http1.waiters.borrow().is_empty()
            || Rc::strong_count(&self.http2_connecting) > 1
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
        if let Some(original_dst) = &cluster.original_dst {
            return original_dst
                .choose(&cluster.stats, context)
                .map(LocalHandle::new);
        }
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
                        .retain(|(id, ..), _| *id != cluster.id);
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
    /// (HTTP/1.1) or the shared one (HTTP/2) if there is one, else a new one, or
    /// (HTTP/1.1 at `max_connections`) one another request releases. A request
    /// that has to wait is pending and counted in `upstream_rq_pending_total`, as
    /// in Envoy; `max_pending_requests` and `max_requests` refuse it with
    /// [`AcquireError::Overflow`] — the limits of the route's `priority`.
    /// `downstream`: the request's protocol as it came in (for
    /// `use_downstream_protocol_config`).
    pub async fn acquire(
        &self,
        cluster: &Arc<Cluster>,
        host: &Arc<Host>,
        sni: Option<Arc<str>>,
        priority: Priority,
        downstream: http::Version,
    ) -> Result<Sender, AcquireError> {
        let key = (cluster.id, host.address, sni, priority);
        let http2 = match cluster.protocol.http2_for(downstream) {
            Some(h2) => Some(h2),
            None => {
                if let Some(lease) = self.lease_http2(&key)? {
                    return Ok(Sender::Http2(lease));
                }
                self.hosts.borrow().get(&key).and_then(|p| p.alpn_h2)
            }
        };
        match http2 {
            Some(false) => {
                if let Some(conn) = self.take_idle_http1(&key).await {
                    return self.attach_http1(cluster, host, key, conn);
                }
                Box::pin(self.wait_http1(cluster, host, key)).await
            }
            Some(true) => {
                if let Some(lease) = self.lease_http2(&key)? {
                    return Ok(Sender::Http2(lease));
                }
                Box::pin(self.open_http2(cluster, host, key)).await
            }
            None => Box::pin(self.open_by_alpn(cluster, host, key)).await,
        }
    }

    /// An idle HTTP/1.1 connection that is still usable.
    async fn take_idle_http1(&self, key: &PoolKey) -> Option<PooledHttp1> {
        loop {
            let idle = self
                .hosts
                .borrow_mut()
                .get_mut(key)
                .and_then(|p| p.idle_http1.pop());
            let IdleHttp1 { mut conn, .. } = idle?;
            if !conn.sender.is_closed() && conn.sender.ready().await.is_ok() {
                return Some(conn);
            }
        }
    }

    /// Gives the request `conn` if `max_requests` allows; else the connection
    /// goes back to the pool.
    fn attach_http1(
        &self,
        cluster: &Arc<Cluster>,
        host: &Arc<Host>,
        key: PoolKey,
        mut conn: PooledHttp1,
    ) -> Result<Sender, AcquireError> {
        let active = ActiveRequest::attach(&self.host_pool(cluster, host, &key));
        match active {
            Ok(active) => {
                conn.requests += 1;
                conn.active = Some(active);
                Ok(Sender::Http1(conn))
            }
            Err(e) => {
                self.release(cluster, host, key.2, key.3, conn);
                Err(e)
            }
        }
    }

    /// The pending part of an HTTP/1.1 request (no idle connection): opens a
    /// connection, or at `max_connections` waits for one to be released — unless
    /// this worker has no connection to the host at all, when it opens one anyway
    /// so that the request is not left waiting for nothing (Envoy's rule).
    async fn wait_http1(
        &self,
        cluster: &Arc<Cluster>,
        host: &Arc<Host>,
        key: PoolKey,
    ) -> Result<Sender, AcquireError> {
        let (resources, shared) = {
            let pool = self.host_pool(cluster, host, &key);
            (pool.resources.clone(), pool.http1.clone())
        };
        let Some(_pending) = resources.pending_requests.try_acquire() else {
            cluster.resources.upstream_rq_pending_overflow.inc();
            return Err(AcquireError::Overflow);
        };
        cluster.stats.upstream_rq_pending_total.inc();
        loop {
            let can_create = can_create_connection(&resources, host);
            if !can_create {
                cluster.resources.upstream_cx_overflow.inc();
            }
            if can_create || shared.open.get() == 0 {
                let slot = ConnectionSlot::new(resources.shared()).http1(&shared);
                let stream = connect(cluster, host, key.2.as_deref()).await?;
                let conn = open_http1(cluster, host, stream, slot).await?;
                return self.attach_http1(cluster, host, key, conn);
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            shared.waiters.borrow_mut().push_back(tx);
            // None (or a dropped sender): a connection closed; look again.
            if let Ok(Some(mut conn)) = rx.await
                && conn.sender.ready().await.is_ok()
            {
                return self.attach_http1(cluster, host, key, conn);
            }
            if let Some(conn) = self.take_idle_http1(&key).await {
                return self.attach_http1(cluster, host, key, conn);
            }
        }
    }

    /// The worker's pool for `key`, made on first use.
    fn host_pool(
        &self,
        cluster: &Arc<Cluster>,
        host: &Arc<Host>,
        key: &PoolKey,
    ) -> std::cell::RefMut<'_, HostPool> {
        std::cell::RefMut::map(self.hosts.borrow_mut(), |hosts| {
            hosts
                .entry(key.clone())
                .or_insert_with(|| HostPool::new(cluster, host, key.3))
        })
    }

    /// A pending request's place in `max_pending_requests` while a connection
    /// is opened for it (or by another request, HTTP/2), or the overflow.
    fn pend_for_new_connection<'r>(
        cluster: &Cluster,
        resources: &'r ResourceManager,
    ) -> Result<super::resource_manager::ResourceGuard<'r>, AcquireError> {
        let Some(pending) = resources.pending_requests.try_acquire() else {
            cluster.resources.upstream_rq_pending_overflow.inc();
            return Err(AcquireError::Overflow);
        };
        cluster.stats.upstream_rq_pending_total.inc();
        Ok(pending)
    }

    /// `auto_config`'s first connection to a host: ALPN says which protocol.
    async fn open_by_alpn(
        &self,
        cluster: &Arc<Cluster>,
        host: &Arc<Host>,
        key: PoolKey,
    ) -> Result<Sender, AcquireError> {
        let resources = self.host_pool(cluster, host, &key).resources.clone();
        let _pending = Self::pend_for_new_connection(cluster, &resources)?;
        let slot = ConnectionSlot::open_anyway(cluster, host, resources.shared());
        let stream = connect(cluster, host, key.2.as_deref()).await?;
        let h2 = stream.negotiated_h2();
        let shared = {
            let mut pool = self.host_pool(cluster, host, &key);
            pool.alpn_h2 = Some(h2);
            pool.http1.clone()
        };
        if h2 {
            self.install_http2(cluster, host, &key, stream, slot)
                .await?;
            self.lease_http2(&key)?
                .map(Sender::Http2)
                .ok_or(AcquireError::Connect(ConnectError::Closed))
        } else {
            let conn = open_http1(cluster, host, stream, slot.http1(&shared)).await?;
            self.attach_http1(cluster, host, key, conn)
        }
    }

    /// Opens the host's shared HTTP/2 connection, or waits for the request that is
    /// opening it.
    async fn open_http2(
        &self,
        cluster: &Arc<Cluster>,
        host: &Arc<Host>,
        key: PoolKey,
    ) -> Result<Sender, AcquireError> {
        let (resources, connecting) = {
            let pool = self.host_pool(cluster, host, &key);
            (pool.resources.clone(), pool.http2_connecting.clone())
        };
        let _pending = Self::pend_for_new_connection(cluster, &resources)?;
        let _connecting = connecting.lock().await;
        // Another request may have opened it while this one waited.
        if let Some(lease) = self.lease_http2(&key)? {
            return Ok(Sender::Http2(lease));
        }
        let slot = ConnectionSlot::open_anyway(cluster, host, resources.shared());
        let stream = connect(cluster, host, key.2.as_deref()).await?;
        self.install_http2(cluster, host, &key, stream, slot)
            .await?;
        self.lease_http2(&key)?
            .map(Sender::Http2)
            .ok_or(AcquireError::Connect(ConnectError::Closed))
    }

    /// Makes `stream` the host's shared HTTP/2 connection.
    async fn install_http2(
        &self,
        cluster: &Arc<Cluster>,
        host: &Arc<Host>,
        key: &PoolKey,
        stream: UpstreamStream,
        slot: ConnectionSlot,
    ) -> Result<(), ConnectError> {
        let (sender, conn) = http2::Builder::new(LocalExec)
            .timer(TokioTimer::new())
            .handshake(counted(cluster, stream))
            .await
            .map_err(ConnectError::Handshake)?;
        cluster.stats.upstream_cx_http2_total.inc();
        tokio::task::spawn_local(track_connection(conn, cluster, host, slot));
        let shared = SharedHttp2 {
            sender,
            state: Rc::new(Http2State {
                active_streams: Cell::new(0),
                requests: Cell::new(0),
                idle_since: Cell::new(Instant::now()),
            }),
        };
        self.host_pool(cluster, host, key).http2 = Some(shared);
        Ok(())
    }

    fn lease_http2(&self, key: &PoolKey) -> Result<Option<Http2Lease>, AcquireError> {
        match self.hosts.borrow_mut().get_mut(key) {
            Some(pool) => pool.lease_http2(),
            None => Ok(None),
        }
    }

    /// Returns an HTTP/1.1 connection whose exchange finished, for reuse: to the
    /// first request waiting for one, else to the idle list; closes it instead
    /// when its host or cluster is gone or it carried its last request.
    pub fn release(
        &self,
        cluster: &Arc<Cluster>,
        host: &Arc<Host>,
        sni: Option<Arc<str>>,
        priority: Priority,
        mut conn: PooledHttp1,
    ) {
        // Its request has ended.
        conn.active = None;
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
        let key = (cluster.id, host.address, sni, priority);
        let shared = self.host_pool(cluster, host, &key).http1.clone();
        if let Some(conn) = shared.hand_over(Some(conn)) {
            self.host_pool(cluster, host, &key)
                .idle_http1
                .push(IdleHttp1 {
                    conn,
                    since: Instant::now(),
                });
        }
    }

    /// The worker's periodic upkeep: closes the connections of clusters that are
    /// gone (removed or replaced) and of hosts DNS or EDS removed, and those idle
    /// past their cluster's idle timeout.
    pub fn maintain(&self, live: &std::collections::HashSet<usize>) {
        let now = Instant::now();
        self.hosts.borrow_mut().retain(|(id, ..), pool| {
            if !live.contains(id) || pool.host.is_removed() {
                return false;
            }
            !pool.expire_idle(now) || pool.in_use()
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

/// A new HTTP/1.1 connection on `stream` (not yet carrying a request).
async fn open_http1(
    cluster: &Arc<Cluster>,
    host: &Arc<Host>,
    stream: UpstreamStream,
    slot: ConnectionSlot,
) -> Result<PooledHttp1, ConnectError> {
    let case = Arc::new(CaseSlot::default());
    let io = TokioIo::new(CaseIo::new(
        CountedIo::new(
            stream,
            cluster.stats.upstream_cx_rx_bytes_total.clone(),
            cluster.stats.upstream_cx_tx_bytes_total.clone(),
        ),
        case.clone(),
    ));
    let (sender, conn) = http1::Builder::new()
        .handshake(io)
        .await
        .map_err(ConnectError::Handshake)?;
    cluster.stats.upstream_cx_http1_total.inc();
    // An upgrade's `101` hands the connection to the tunnel (http/upgrade.rs).
    tokio::task::spawn_local(track_connection(conn.with_upgrades(), cluster, host, slot));
    Ok(PooledHttp1 {
        sender,
        requests: 0,
        active: None,
        generation: cluster.host_set_generation(),
        case,
        key_format: cluster.pool.header_key_format,
    })
}

/// Drives an upstream connection and keeps `upstream_cx_active` and its place
/// in `max_connections` right around it.
fn track_connection<C>(
    conn: C,
    cluster: &Cluster,
    host: &Arc<Host>,
    slot: ConnectionSlot,
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
        drop(slot);
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
        UpstreamProtocol,
    };
    use crate::stats::StatStore;
    use crate::upstream::cluster::Origin;

    fn cluster(protocol: UpstreamProtocol, port: u16, pool: PoolSettings) -> Arc<Cluster> {
        cluster_with_breakers(protocol, port, pool, Default::default())
    }

    fn cluster_with_breakers(
        protocol: UpstreamProtocol,
        port: u16,
        pool: PoolSettings,
        circuit_breakers: crate::config::circuit_breakers::CircuitBreakers,
    ) -> Arc<Cluster> {
        let config = ClusterConfig {
            name: "c".into(),
            stat_name: "c".into(),
            metadata: None,
            discovery: DiscoveryType::Static,
            connect_timeout: Duration::from_secs(1),
            endpoints: vec![EndpointConfig {
                address: "127.0.0.1".into(),
                port,
                ..EndpointConfig::default()
            }],
            protocol,
            upstream_bind: None,
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
            circuit_breakers,
            original_dst: None,
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

    /// A loopback HTTP/1.1 server answering every request with 200; returns its
    /// port and accepted-connection count.
    async fn h1_server() -> (u16, Rc<Cell<usize>>) {
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
                    let _ = hyper::server::conn::http1::Builder::new()
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
            let acquires = (0..8)
                .map(|_| pools.acquire(&c, &host, None, Priority::Default, http::Version::HTTP_11));
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
                let mut s = pools
                    .acquire(&c, &host, None, Priority::Default, http::Version::HTTP_11)
                    .await
                    .unwrap();
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
            let lease = pools
                .acquire(&c, &host, None, Priority::Default, http::Version::HTTP_11)
                .await
                .unwrap();
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
            drop(
                pools
                    .acquire(&c, &host, None, Priority::Default, http::Version::HTTP_11)
                    .await
                    .unwrap(),
            );
            let live: HashSet<usize> = [c.id].into();
            pools.maintain(&live);
            assert_eq!(pools.pooled(), 1);
            c.set_hosts(Vec::new());
            assert!(host.is_removed());
            pools.maintain(&live);
            assert_eq!(pools.pooled(), 0);
        });
    }

    #[test]
    fn http1_request_waits_for_a_released_connection_at_max_connections() {
        use futures_util::FutureExt;

        use crate::config::circuit_breakers::{CircuitBreakers, Thresholds};
        run_local(async {
            let (port, accepted) = h1_server().await;
            let breakers = CircuitBreakers {
                default: Thresholds {
                    max_connections: 1,
                    max_pending_requests: 1,
                    ..Thresholds::default()
                },
                high: Thresholds::default(),
            };
            let c = cluster_with_breakers(
                UpstreamProtocol::Http1,
                port,
                PoolSettings::default(),
                breakers,
            );
            let limits = c.resources.get(Priority::Default).clone();
            let host = c.hosts.load()[0].clone();
            let pools = WorkerPools::new();
            let first = pools
                .acquire(&c, &host, None, Priority::Default, http::Version::HTTP_11)
                .await
                .unwrap();
            assert_eq!(limits.connections.count(), 1);
            assert_eq!(limits.requests.count(), 1);
            // The second waits for the only connection, as pending.
            let second = pools.acquire(&c, &host, None, Priority::Default, http::Version::HTTP_11);
            tokio::pin!(second);
            assert!((&mut second).now_or_never().is_none());
            assert_eq!(limits.pending_requests.count(), 1);
            assert_eq!(c.resources.upstream_cx_overflow.get(), 1);
            // A third finds the pending slot taken.
            let third = pools
                .acquire(&c, &host, None, Priority::Default, http::Version::HTTP_11)
                .await;
            assert!(matches!(third, Err(AcquireError::Overflow)));
            assert_eq!(c.resources.upstream_rq_pending_overflow.get(), 1);
            // The first's exchange ends: its connection goes to the second.
            let Sender::Http1(conn) = first else {
                panic!("an HTTP/1.1 connection")
            };
            pools.release(&c, &host, None, Priority::Default, conn);
            let second = second.await.unwrap();
            assert!(matches!(&second, Sender::Http1(c) if c.requests == 2));
            assert_eq!(accepted.get(), 1);
            assert_eq!(limits.pending_requests.count(), 0);
            assert_eq!(limits.requests.count(), 1);
            // Dropped (not released): the connection closes and frees its slot.
            drop(second);
            assert_eq!(limits.requests.count(), 0);
            for _ in 0..100 {
                if limits.connections.count() == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(limits.connections.count(), 0);
        });
    }

    #[test]
    fn http2_max_requests_refuses_a_stream_beyond_it() {
        use crate::config::circuit_breakers::{CircuitBreakers, Thresholds};
        run_local(async {
            let (port, _) = h2_server().await;
            let breakers = CircuitBreakers {
                default: Thresholds {
                    max_requests: 2,
                    ..Thresholds::default()
                },
                high: Thresholds::default(),
            };
            let c = cluster_with_breakers(
                UpstreamProtocol::Http2,
                port,
                PoolSettings::default(),
                breakers,
            );
            let host = c.hosts.load()[0].clone();
            let pools = WorkerPools::new();
            let a = pools
                .acquire(&c, &host, None, Priority::Default, http::Version::HTTP_11)
                .await
                .unwrap();
            let b = pools
                .acquire(&c, &host, None, Priority::Default, http::Version::HTTP_11)
                .await
                .unwrap();
            let refused = pools
                .acquire(&c, &host, None, Priority::Default, http::Version::HTTP_11)
                .await;
            assert!(matches!(refused, Err(AcquireError::Overflow)));
            assert_eq!(c.resources.upstream_rq_active_overflow.get(), 1);
            drop(a);
            let c2 = pools
                .acquire(&c, &host, None, Priority::Default, http::Version::HTTP_11)
                .await
                .unwrap();
            assert!(c2.is_http2());
            drop((b, c2));
            assert_eq!(c.resources.get(Priority::Default).requests.count(), 0);
        });
    }
}
