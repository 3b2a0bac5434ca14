//! What every stream of one downstream connection shares (Envoy's connection
//! manager per connection): the connection manager, the worker's pools, the peer,
//! per-connection stats, and the connection's handles on the route table and its
//! clusters. The codec that serves the connection is [`super::downstream`].

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use http::Version;

use super::connection_manager::HttpConnectionManager;
use super::h1::Refusal;
use crate::config::ForwardAction;
use crate::per_worker::LocalHandle;
use crate::router::RouteTable;
use crate::upstream::{Cluster, WorkerPools};

/// What every stream of one downstream connection shares.
pub(crate) struct DownstreamConnection {
    pub hcm: Arc<HttpConnectionManager>,
    pub pools: Rc<WorkerPools>,
    pub peer: SocketAddr,
    pub local: Option<SocketAddr>,
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
}

#[derive(Default)]
pub(super) struct ClusterSlots {
    table: Option<LocalHandle<RouteTable>>,
    generation: u64,
    slots: Vec<Option<LocalHandle<Cluster>>>,
}

impl DownstreamConnection {
    /// The current route table (a new one once RDS or LDS replaced it).
    pub fn route_table(&self) -> LocalHandle<RouteTable> {
        let current = self.hcm.routes.load();
        let mut cached = self.routes.borrow_mut();
        if !cached.same(&current) {
            *cached = LocalHandle::new(arc_swap::Guard::into_inner(current));
        }
        cached.clone()
    }

    /// The cluster a route forwards to (None: no such cluster now).
    pub fn cluster_for(
        &self,
        routes: &LocalHandle<RouteTable>,
        action: &ForwardAction,
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
        let slot = cache.slots.get_mut(action.cluster_slot)?;
        if slot.is_none() {
            *slot = self.hcm.clusters.get(&action.cluster).map(LocalHandle::new);
        }
        slot.clone()
    }

    /// Counts a new request on this connection (and the connection's protocol
    /// the first time).
    pub fn begin_request(&self, version: Version) {
        let stats = &self.hcm.stats;
        self.screen.in_flight.set(self.screen.in_flight.get() + 1);
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
