//! What every stream of one downstream connection shares (Envoy's connection
//! manager per connection): the connection manager, the worker's pools, the peer,
//! per-connection stats, and the connection's handles on the route table and its
//! clusters. The codec that serves the connection is [`super::downstream`].

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;
use std::time::Instant;

use http::Version;

use super::connection_manager::HttpConnectionManager;
use super::h1::Refusal;
use super::h1::head::HeadRules;
use crate::per_worker::LocalHandle;
use crate::router::RouteTable;
use crate::upstream::{Cluster, WorkerPools};

/// What every stream of one downstream connection shares.
pub(crate) struct DownstreamConnection {
    pub hcm: Arc<HttpConnectionManager>,
    pub pools: Rc<WorkerPools>,
    pub peer: SocketAddr,
    pub local: Option<SocketAddr>,
    /// Whether `local` is the original destination a listener filter restored
    /// (Envoy's `localAddressRestored`): an `ORIGINAL_DST` cluster connects to it.
    pub local_restored: bool,
    /// The TLS session's facts (None: plaintext).
    pub tls: Option<Arc<crate::tls::PeerTls>>,
    /// The protocol of the first request, for the `downstream_cx_http*` stats.
    pub(super) protocol: Cell<Option<Version>>,
    pub screen: ConnectionScreen,
    /// The route table this connection's requests last used: requests share it
    /// through an `Rc` instead of each touching the table's shared reference
    /// count (written by every worker) while they wait.
    pub(super) routes: RefCell<LocalHandle<RouteTable>>,
    /// Handles on the clusters that route table names, found once per table and
    /// cluster generation: a request indexes them by the route's `cluster_slot`.
    pub(super) clusters: RefCell<ClusterSlots>,
    /// When the connection began (`max_connection_duration`).
    pub(super) started: Instant,
    /// Requests begun on it (`max_requests_per_connection`).
    pub(super) requests: Cell<u32>,
    /// When Envoy's drain sequence began (idle timeout, max connection duration,
    /// max requests): HTTP/1 responses then close the connection, HTTP/2 sends
    /// GOAWAY; an idle connection closes `drain_timeout` later.
    pub(super) drain_started: Cell<Option<Instant>>,
    /// `max_connection_duration` was reached (and counted).
    duration_reached: Cell<bool>,
    /// The HTTP/2 connection's task, woken when a drain starts.
    pub(super) drain_waker: Cell<Option<Waker>>,
    /// When its last stream ended (the HTTP/2 idle timer; HTTP/1 knows).
    pub(super) idle_since: Cell<Instant>,
}

#[derive(Default)]
pub(super) struct ClusterSlots {
    table: Option<LocalHandle<RouteTable>>,
    generation: u64,
    slots: Vec<Option<LocalHandle<Cluster>>>,
}

impl DownstreamConnection {
    pub(super) fn new(
        hcm: Arc<HttpConnectionManager>,
        pools: Rc<WorkerPools>,
        peer: SocketAddr,
        local: Option<SocketAddr>,
        tls: Option<Arc<crate::tls::PeerTls>>,
    ) -> Self {
        let routes = RefCell::new(LocalHandle::new(hcm.routes.load_full()));
        let now = Instant::now();
        DownstreamConnection {
            hcm,
            pools,
            peer,
            local,
            local_restored: false,
            tls,
            protocol: Cell::new(None),
            screen: ConnectionScreen::default(),
            routes,
            clusters: RefCell::default(),
            started: now,
            requests: Cell::new(0),
            drain_started: Cell::new(None),
            duration_reached: Cell::new(false),
            drain_waker: Cell::new(None),
            idle_since: Cell::new(now),
        }
    }

    /// What the HTTP/1 codec checks of each request head.
    pub(super) fn head_rules(&self) -> HeadRules {
        let limits = &self.hcm.limits;
        HeadRules {
            max_headers: limits.max_headers_count,
            underscores: limits.headers_with_underscores,
            max_head: limits.max_request_headers_bytes,
            accept_http_10: limits.accept_http_10,
            allow_chunked_length: limits.allow_chunked_length,
            proxy_100_continue: limits.proxy_100_continue,
            preserve_case: limits.header_key_format.preserve(),
        }
    }

    /// Starts Envoy's drain sequence (once).
    pub(super) fn start_drain(&self) {
        if self.drain_started.get().is_none() {
            self.drain_started.set(Some(Instant::now()));
            if let Some(w) = self.drain_waker.take() {
                w.wake();
            }
        }
    }

    pub(super) fn draining(&self) -> bool {
        self.drain_started.get().is_some()
    }

    /// This connection carried its last request (`max_requests_per_connection`).
    pub(super) fn max_requests_reached(&self) -> bool {
        self.hcm
            .limits
            .max_requests_per_connection
            .is_some_and(|max| self.requests.get() >= max)
    }

    /// `max_connection_duration`: counted and drained once reached. HTTP/1 checks
    /// it when it writes a response and while it waits for the next request, so
    /// a busy connection needs no timer of its own.
    pub(super) fn check_duration(&self) {
        if let Some(max) = self.hcm.limits.max_connection_duration
            && !self.duration_reached.get()
            && self.started.elapsed() >= max
        {
            self.duration_reached.set(true);
            self.hcm.stats.downstream_cx_max_duration_reached.inc();
            self.start_drain();
        }
    }

    /// The current route table (a new one once RDS or LDS replaced it).
    pub fn route_table(&self) -> LocalHandle<RouteTable> {
        let current = self.hcm.routes.load();
        let mut cached = self.routes.borrow_mut();
        if !cached.same(&current) {
            *cached = LocalHandle::new(arc_swap::Guard::into_inner(current));
        }
        cached.clone()
    }

    /// The route table of the request's scope (`scoped_routes`); the connection
    /// keeps the last one, so that requests of one scope share its handle.
    pub fn scoped_route_table(
        &self,
        scoped: &crate::router::scoped::ScopedRoutes,
        headers: &http::HeaderMap,
    ) -> LocalHandle<RouteTable> {
        let scopes = scoped.table.load();
        let current = scopes.find(headers);
        let mut cached = self.routes.borrow_mut();
        if !cached.same(current) {
            *cached = LocalHandle::new(current.clone());
        }
        cached.clone()
    }

    /// The cluster named `name` whose slot in `routes` is `slot` (a route's
    /// `cluster` or a weighted entry's `name`; None: no such cluster now).
    pub fn cluster_for(
        &self,
        routes: &LocalHandle<RouteTable>,
        slot: usize,
        name: &str,
    ) -> Option<LocalHandle<Cluster>> {
        let generation = self.hcm.clusters.generation();
        let mut cache = self.clusters.borrow_mut();
        if cache.generation != generation
            || !cache
                .table
                .as_ref()
                .is_some_and(|t| LocalHandle::ptr_eq(t, routes))
        {
            *cache = ClusterSlots {
                table: Some(routes.clone()),
                generation,
                slots: vec![None; routes.cluster_names.len()],
            };
        }
        let slot = cache.slots.get_mut(slot)?;
        if slot.is_none() {
            *slot = self.hcm.clusters.get(name).map(LocalHandle::new);
        }
        slot.clone()
    }

    /// Counts a new request on this connection (and the connection's protocol
    /// the first time).
    pub fn begin_request(&self, version: Version) {
        let stats = &self.hcm.stats;
        self.screen.in_flight.set(self.screen.in_flight.get() + 1);
        let requests = self.requests.get() + 1;
        self.requests.set(requests);
        if let Some(max) = self.hcm.limits.max_requests_per_connection
            && requests >= max
        {
            stats.downstream_cx_max_requests_reached.inc();
            self.start_drain();
        }
        stats.downstream_rq_total.inc();
        stats.downstream_rq_active.inc();
        let h2 = version == Version::HTTP_2;
        if h2 {
            stats.downstream_rq_http2_total.inc();
        } else {
            stats.downstream_rq_http1_total.inc();
        }
        if self.protocol.get().is_none() {
            self.protocol.set(Some(version));
            if h2 {
                stats.downstream_cx_http2_total.inc();
                stats.downstream_cx_http2_active.inc();
            } else {
                stats.downstream_cx_http1_total.inc();
                stats.downstream_cx_http1_active.inc();
            }
        }
    }
}

/// What the codec and the connection's books share: the requests the codec
/// refused itself (for stats and the access log when the connection ends) and
/// the requests in flight.
#[derive(Debug, Default)]
pub struct ConnectionScreen {
    pub in_flight: Cell<u32>,
    pub refusals: RefCell<Vec<Refusal>>,
}
