//! A downstream connection (Envoy's `ConnectionManagerImpl` per connection): the
//! codec (HTTP/1.1, HTTP/2 or both by preface), per-connection stats, drain, and
//! one [`ActiveStream`] per request. Generic over the byte stream, so TLS plugs in
//! under it unchanged.

use std::cell::{Cell, RefCell};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::SystemTime;

use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use super::active_stream::ActiveStream;
use super::body::ResponseBody;
use super::connection_manager::HttpConnectionManager;
use super::framing_guard::{ConnectionScreen, FramingGuard};
use crate::access_log::LogRecord;
use crate::config::{CodecType, ForwardAction};
use crate::io::{CountedIo, LocalExec};
use crate::per_worker::LocalHandle;
use crate::router::RouteTable;
use crate::upstream::{Cluster, WorkerPools};

/// What every stream of one downstream connection shares.
pub(crate) struct DownstreamConnection {
    pub hcm: Arc<HttpConnectionManager>,
    pub pools: Rc<WorkerPools>,
    pub peer: SocketAddr,
    pub local: Option<SocketAddr>,
    /// The protocol of the first request, for the `downstream_cx_http*` stats.
    protocol: Cell<Option<Version>>,
    pub screen: Rc<ConnectionScreen>,
    /// The route table this connection's requests last used: requests share it
    /// through an `Rc` instead of each touching the table's shared reference
    /// count (written by every worker) while they wait.
    routes: RefCell<LocalHandle<RouteTable>>,
    /// Handles on the clusters that route table names, found once per table and
    /// cluster generation: a request indexes them by the route's `cluster_slot`.
    clusters: RefCell<ClusterSlots>,
}

#[derive(Default)]
struct ClusterSlots {
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

/// Serves one downstream connection until it closes or `drain` fires.
pub(super) async fn serve<S>(
    hcm: Arc<HttpConnectionManager>,
    pools: Rc<WorkerPools>,
    stream: S,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    mut drain: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let stats = &hcm.stats;
    stats.downstream_cx_total.inc();
    stats.downstream_cx_active.inc();
    let counted = CountedIo::new(
        stream,
        stats.downstream_cx_rx_bytes_total.clone(),
        stats.downstream_cx_tx_bytes_total.clone(),
    );
    let screen = Rc::new(ConnectionScreen::default());
    let conn = Rc::new(DownstreamConnection {
        hcm: hcm.clone(),
        pools,
        peer,
        local,
        protocol: Cell::new(None),
        screen: screen.clone(),
        routes: RefCell::new(LocalHandle::new(hcm.routes.load_full())),
        clusters: RefCell::default(),
    });
    // Closes the connection's books even when the worker drops this future
    // (a drain deadline), not only when the codec returns.
    let _books = ConnectionBooks(conn.clone());
    let service = StreamService(conn.clone());
    let result: Result<(), Box<dyn std::error::Error + Send + Sync>> = match hcm.codec {
        CodecType::Auto => {
            let mut builder = hyper_util::server::conn::auto::Builder::new(LocalExec);
            builder.http1().timer(TokioTimer::new()).keep_alive(true);
            builder.http2().timer(TokioTimer::new());
            let io = TokioIo::new(FramingGuard::new(
                counted,
                screen.clone(),
                hcm.server_name(),
            ));
            let served = builder.serve_connection(io, service);
            tokio::pin!(served);
            tokio::select! {
                r = served.as_mut() => r,
                _ = drain.wait_for(|d| *d) => {
                    served.as_mut().graceful_shutdown();
                    served.await
                }
            }
        }
        CodecType::Http1 => {
            let io = TokioIo::new(FramingGuard::new(
                counted,
                screen.clone(),
                hcm.server_name(),
            ));
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(io, service);
            tokio::pin!(served);
            tokio::select! {
                r = served.as_mut() => r.map_err(Into::into),
                _ = drain.wait_for(|d| *d) => {
                    served.as_mut().graceful_shutdown();
                    served.await.map_err(Into::into)
                }
            }
        }
        CodecType::Http2 => {
            let io = TokioIo::new(counted);
            let served = hyper::server::conn::http2::Builder::new(LocalExec)
                .timer(TokioTimer::new())
                .serve_connection(io, service);
            tokio::pin!(served);
            tokio::select! {
                r = served.as_mut() => r.map_err(Into::into),
                _ = drain.wait_for(|d| *d) => {
                    served.as_mut().graceful_shutdown();
                    served.await.map_err(Into::into)
                }
            }
        }
    };
    let never_spoke_h2 = hcm.codec == CodecType::Http2 && conn.protocol.get().is_none();
    if let Err(e) = result
        && (never_spoke_h2
            || e.downcast_ref::<hyper::Error>()
                .is_some_and(|h| h.is_parse() || h.is_parse_too_large()))
    {
        stats.downstream_cx_protocol_error.inc();
    }
}

/// The end of a downstream connection: refused requests recorded, gauges closed.
struct ConnectionBooks(Rc<DownstreamConnection>);

impl Drop for ConnectionBooks {
    fn drop(&mut self) {
        let conn = &self.0;
        let stats = &conn.hcm.stats;
        record_refusals(conn);
        match conn.protocol.get() {
            Some(Version::HTTP_2) => stats.downstream_cx_http2_active.dec(),
            Some(_) => stats.downstream_cx_http1_active.dec(),
            None => {}
        }
        stats.downstream_cx_active.dec();
        stats.downstream_cx_destroy.inc();
    }
}

/// Stats and access log lines for the requests the framing guard refused.
fn record_refusals(conn: &DownstreamConnection) {
    let hcm = &conn.hcm;
    for refusal in conn.screen.refusals.borrow().iter() {
        let stats = &hcm.stats;
        stats.downstream_cx_protocol_error.inc();
        stats.downstream_rq_total.inc();
        stats.downstream_rq_http1_total.inc();
        stats.downstream_rq_completed.inc();
        stats.response_class(refusal.status);
        if hcm.access_logs.is_empty() {
            continue;
        }
        let record = LogRecord {
            start: Some(SystemTime::now()),
            method: "-".into(),
            path: "-".into(),
            protocol: "HTTP/1.1",
            response_code: refusal.status,
            response_flags: "DPE",
            response_code_details: refusal.details,
            bytes_sent: refusal.body_len(),
            downstream_remote: Some(conn.peer),
            downstream_local: conn.local,
            ..Default::default()
        };
        for logger in &hcm.access_logs {
            logger.log(&record);
        }
    }
}

/// hyper's per-request entry: one [`ActiveStream`] per request.
#[derive(Clone)]
struct StreamService(Rc<DownstreamConnection>);

impl hyper::service::Service<Request<Incoming>> for StreamService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>>>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let conn = self.0.clone();
        Box::pin(async move { Ok(ActiveStream::run(conn, req).await) })
    }
}
