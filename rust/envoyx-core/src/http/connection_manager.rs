//! `envoy.filters.network.http_connection_manager` with the router filter.
//!
//! One [`HttpConnectionManager`] exists per listener (shared by workers, immutable
//! except for the atomically swapped route table). Each downstream connection is
//! served by hyper on its worker; each request is routed, forwarded through the
//! worker's pools, and its response streamed back, with Envoy's headers, local
//! replies, response flags, stats and access log.

use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::body::{ProxyBody, ResponseBody, StreamEnd};
use super::filter::{FilterChain, FilterStream, HookOutcome, Phase};
use super::filtering::RequestFilters;
use super::framing_guard::{ConnectionScreen, FramingGuard};
use crate::access_log::{AccessLogOptions, AccessLogger, LogRecord};
use crate::config::{
    CodecType, ForwardAction, HttpConnectionManagerConfig, PathMatch, RouteAction, RouteSource,
};
use crate::io::{CountedIo, LocalExec};
use crate::router::RouteTable;
use crate::stats::{Counter, Gauge, Histogram, StatStore};
use crate::upstream::cluster::{Cluster, ClusterManager};
use crate::upstream::pool::{Sender, WorkerPools};

/// `http.<stat_prefix>.*` with Envoy's meanings.
#[derive(Debug)]
pub struct HcmStats {
    pub downstream_cx_total: Counter,
    pub downstream_cx_active: Gauge,
    pub downstream_cx_destroy: Counter,
    pub downstream_cx_http1_total: Counter,
    pub downstream_cx_http2_total: Counter,
    pub downstream_cx_http1_active: Gauge,
    pub downstream_cx_http2_active: Gauge,
    pub downstream_cx_protocol_error: Counter,
    pub downstream_cx_rx_bytes_total: Counter,
    pub downstream_cx_tx_bytes_total: Counter,
    pub downstream_rq_total: Counter,
    pub downstream_rq_http1_total: Counter,
    pub downstream_rq_http2_total: Counter,
    pub downstream_rq_active: Gauge,
    pub downstream_rq_completed: Counter,
    pub downstream_rq_rx_reset: Counter,
    pub downstream_rq_time: Histogram,
    downstream_rq_class: [Counter; 5],
    /// Router filter stats, also under `http.<stat_prefix>.`.
    pub no_route: Counter,
    pub no_cluster: Counter,
    pub rq_direct_response: Counter,
    pub rq_total: Counter,
    /// `python.errors` / `python.timeouts`: hooks that raised or overran (only
    /// registered when the connection manager has Python filters).
    pub python_errors: Counter,
    pub python_timeouts: Counter,
}

impl HcmStats {
    fn new(store: &StatStore, prefix: &str, python: bool) -> Self {
        let c = |s: &str| store.counter(&format!("http.{prefix}.{s}"));
        let g = |s: &str| store.gauge(&format!("http.{prefix}.{s}"));
        HcmStats {
            downstream_cx_total: c("downstream_cx_total"),
            downstream_cx_active: g("downstream_cx_active"),
            downstream_cx_destroy: c("downstream_cx_destroy"),
            downstream_cx_http1_total: c("downstream_cx_http1_total"),
            downstream_cx_http2_total: c("downstream_cx_http2_total"),
            downstream_cx_http1_active: g("downstream_cx_http1_active"),
            downstream_cx_http2_active: g("downstream_cx_http2_active"),
            downstream_cx_protocol_error: c("downstream_cx_protocol_error"),
            downstream_cx_rx_bytes_total: c("downstream_cx_rx_bytes_total"),
            downstream_cx_tx_bytes_total: c("downstream_cx_tx_bytes_total"),
            downstream_rq_total: c("downstream_rq_total"),
            downstream_rq_http1_total: c("downstream_rq_http1_total"),
            downstream_rq_http2_total: c("downstream_rq_http2_total"),
            downstream_rq_active: g("downstream_rq_active"),
            downstream_rq_completed: c("downstream_rq_completed"),
            downstream_rq_rx_reset: c("downstream_rq_rx_reset"),
            downstream_rq_time: store.histogram(&format!("http.{prefix}.downstream_rq_time")),
            downstream_rq_class: [1, 2, 3, 4, 5].map(|d| c(&format!("downstream_rq_{d}xx"))),
            no_route: c("no_route"),
            no_cluster: c("no_cluster"),
            rq_direct_response: c("rq_direct_response"),
            rq_total: c("rq_total"),
            python_errors: if python {
                c("python.errors")
            } else {
                Counter::default()
            },
            python_timeouts: if python {
                c("python.timeouts")
            } else {
                Counter::default()
            },
        }
    }

    fn response_class(&self, status: u16) {
        if (100..600).contains(&status) {
            self.downstream_rq_class[(status / 100 - 1) as usize].inc();
        }
    }
}

/// The runtime form of one listener's HTTP connection manager.
pub struct HttpConnectionManager {
    codec: CodecType,
    pub stat_prefix: String,
    /// `rds.route_config_name`: the table arrives later and is swapped into `routes`.
    pub rds_name: Option<String>,
    pub routes: ArcSwap<RouteTable>,
    pub clusters: Arc<ClusterManager>,
    pub stats: HcmStats,
    access_logs: Vec<Arc<AccessLogger>>,
    server_name: HeaderValue,
    generate_request_id: bool,
    use_remote_address: bool,
    /// The Python filters before the router; None on the fast path.
    filters: Option<Arc<dyn FilterChain>>,
}

impl HttpConnectionManager {
    pub fn new(
        config: HttpConnectionManagerConfig,
        clusters: Arc<ClusterManager>,
        store: &StatStore,
        filters: Option<Arc<dyn FilterChain>>,
        log_options: AccessLogOptions,
    ) -> std::io::Result<Arc<Self>> {
        let access_logs = config
            .access_logs
            .iter()
            .map(|c| AccessLogger::open(c, log_options))
            .collect::<std::io::Result<Vec<_>>>()?;
        let (table, rds_name) = match config.routes {
            RouteSource::Inline(rc) => (RouteTable::new(rc), None),
            RouteSource::Rds(name) => (RouteTable::empty(&name), Some(name)),
        };
        Ok(Arc::new(HttpConnectionManager {
            codec: config.codec,
            stats: HcmStats::new(store, &config.stat_prefix, filters.is_some()),
            stat_prefix: config.stat_prefix,
            rds_name,
            routes: ArcSwap::new(table),
            clusters,
            access_logs,
            server_name: HeaderValue::from_str(&config.server_name)
                .unwrap_or_else(|_| HeaderValue::from_static("envoy")),
            generate_request_id: config.generate_request_id,
            use_remote_address: config.use_remote_address,
            filters,
        }))
    }

    /// Serves one downstream connection until it closes or `drain` fires.
    pub async fn serve(
        self: Arc<Self>,
        pools: Rc<WorkerPools>,
        stream: TcpStream,
        peer: SocketAddr,
        mut drain: watch::Receiver<bool>,
    ) {
        let stats = &self.stats;
        stats.downstream_cx_total.inc();
        stats.downstream_cx_active.inc();
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok();
        let counted = CountedIo::new(
            stream,
            stats.downstream_cx_rx_bytes_total.clone(),
            stats.downstream_cx_tx_bytes_total.clone(),
        );
        let screen = Rc::new(ConnectionScreen::default());
        let conn = Rc::new(DownstreamConnection {
            hcm: self.clone(),
            pools,
            peer,
            local,
            protocol: Cell::new(None),
            screen: screen.clone(),
        });
        let server_name = self.server_name.to_str().unwrap_or("envoy").to_string();
        let service = ConnectionService(conn.clone());
        let result: Result<(), Box<dyn std::error::Error + Send + Sync>> = match self.codec {
            CodecType::Auto => {
                let mut builder = hyper_util::server::conn::auto::Builder::new(LocalExec);
                builder.http1().timer(TokioTimer::new()).keep_alive(true);
                builder.http2().timer(TokioTimer::new());
                let io = TokioIo::new(FramingGuard::new(counted, screen.clone(), &server_name));
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
                let io = TokioIo::new(FramingGuard::new(counted, screen.clone(), &server_name));
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
        let never_spoke_h2 = self.codec == CodecType::Http2 && conn.protocol.get().is_none();
        if let Err(e) = result
            && (never_spoke_h2
                || e.downcast_ref::<hyper::Error>()
                    .is_some_and(|h| h.is_parse() || h.is_parse_too_large()))
        {
            stats.downstream_cx_protocol_error.inc();
        }
        self.record_refusals(&screen, peer, local);
        match conn.protocol.get() {
            Some(Version::HTTP_2) => stats.downstream_cx_http2_active.dec(),
            Some(_) => stats.downstream_cx_http1_active.dec(),
            None => {}
        }
        stats.downstream_cx_active.dec();
        stats.downstream_cx_destroy.inc();
    }
}

impl HttpConnectionManager {
    /// Stats and access log lines for the requests the framing guard refused.
    fn record_refusals(
        &self,
        screen: &ConnectionScreen,
        peer: SocketAddr,
        local: Option<SocketAddr>,
    ) {
        for refusal in screen.refusals.borrow().iter() {
            let stats = &self.stats;
            stats.downstream_cx_protocol_error.inc();
            stats.downstream_rq_total.inc();
            stats.downstream_rq_http1_total.inc();
            stats.downstream_rq_completed.inc();
            stats.response_class(refusal.status);
            if self.access_logs.is_empty() {
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
                downstream_remote: Some(peer),
                downstream_local: local,
                ..Default::default()
            };
            for logger in &self.access_logs {
                logger.log(&record);
            }
        }
    }
}

struct DownstreamConnection {
    hcm: Arc<HttpConnectionManager>,
    pools: Rc<WorkerPools>,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    /// The protocol of the first request, for the `downstream_cx_http*` stats.
    protocol: Cell<Option<Version>>,
    screen: Rc<ConnectionScreen>,
}

#[derive(Clone)]
struct ConnectionService(Rc<DownstreamConnection>);

impl hyper::service::Service<Request<Incoming>> for ConnectionService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>>>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let conn = self.0.clone();
        Box::pin(async move { Ok(conn.handle(req).await) })
    }
}

/// Hop-by-hop headers, never forwarded (RFC 9110 §7.6.1).
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
    header::TRAILER,
];

static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_ENVOY_EXPECTED_TIMEOUT: HeaderName =
    HeaderName::from_static("x-envoy-expected-rq-timeout-ms");
static X_ENVOY_UPSTREAM_SERVICE_TIME: HeaderName =
    HeaderName::from_static("x-envoy-upstream-service-time");
static X_ENVOY_ORIGINAL_PATH: HeaderName = HeaderName::from_static("x-envoy-original-path");

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named by `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        // gRPC needs `te: trailers` end to end.
        if *n == header::TE && headers.get(header::TE).is_some_and(|v| v == "trailers") {
            continue;
        }
        headers.remove(n);
    }
}

fn protocol_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "-",
    }
}

/// A response envoyx generates itself, as Envoy's `sendLocalReply` does.
pub(super) struct LocalReply {
    pub status: StatusCode,
    pub body: Bytes,
    pub flags: &'static str,
    pub details: &'static str,
    /// Headers a filter asked for, written over the defaults.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The whole header map, when response hooks have edited it.
    pub edited_headers: Option<HeaderMap>,
}

impl LocalReply {
    pub(super) fn new(
        status: u16,
        body: impl Into<Bytes>,
        flags: &'static str,
        details: &'static str,
    ) -> Self {
        LocalReply {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body: body.into(),
            flags,
            details,
            headers: Vec::new(),
            edited_headers: None,
        }
    }
}

/// What finishing a request must update once its response stream ends.
struct Exchange {
    hcm: Arc<HttpConnectionManager>,
    screen: Rc<ConnectionScreen>,
    started: Instant,
    record: Option<LogRecord>,
    upstream: Option<UpstreamExchange>,
    /// The request's filter stream when a filter has an `on_log` hook.
    filter_log: Option<Arc<dyn FilterStream>>,
}

struct UpstreamExchange {
    cluster: Arc<Cluster>,
    pools: Rc<WorkerPools>,
    host: SocketAddr,
    host_ref: Arc<crate::upstream::Host>,
    /// An HTTP/1.1 connection goes back to the pool when its response has ended.
    reusable: Option<hyper::client::conn::http1::SendRequest<ProxyBody>>,
}

impl Exchange {
    fn finish(mut self, end: StreamEnd, bytes_sent: u64, bytes_received: Option<&Rc<Cell<u64>>>) {
        let stats = &self.hcm.stats;
        let elapsed = self.started.elapsed();
        self.screen
            .in_flight
            .set(self.screen.in_flight.get().saturating_sub(1));
        stats.downstream_rq_active.dec();
        stats.downstream_rq_completed.inc();
        stats.downstream_rq_time.record(elapsed.as_millis() as u64);
        let mut flags = None;
        if let Some(up) = self.upstream.take() {
            up.cluster.stats.upstream_rq_active.dec();
            up.host_ref.stats.rq_active.dec();
            match end {
                StreamEnd::Complete => {
                    if let Some(sender) = up.reusable
                        && !up
                            .cluster
                            .removed
                            .load(std::sync::atomic::Ordering::Relaxed)
                    {
                        up.pools.release(up.cluster.id, up.host, sender);
                    }
                }
                StreamEnd::UpstreamError => {
                    up.cluster.stats.upstream_rq_rx_reset.inc();
                    flags = Some("UR");
                }
                StreamEnd::DownstreamGone => {
                    stats.downstream_rq_rx_reset.inc();
                    flags = Some("DC");
                }
            }
        }
        if let Some(mut record) = self.record.take() {
            record.bytes_sent = bytes_sent;
            record.bytes_received = bytes_received.map_or(0, |c| c.get());
            record.duration = elapsed;
            if let Some(f) = flags
                && record.response_flags == "-"
            {
                record.response_flags = f;
            }
            for logger in &self.hcm.access_logs {
                logger.log(&record);
            }
            if let Some(filters) = self.filter_log.take() {
                filters.log(record);
            }
        }
    }
}

impl DownstreamConnection {
    async fn handle(self: Rc<Self>, mut req: Request<Incoming>) -> Response<ResponseBody> {
        let hcm = &self.hcm;
        let stats = &hcm.stats;
        let version = req.version();
        let head_request = req.method() == http::Method::HEAD;
        self.screen.in_flight.set(self.screen.in_flight.get() + 1);
        stats.downstream_rq_total.inc();
        stats.downstream_rq_active.inc();
        if version == Version::HTTP_2 {
            stats.downstream_rq_http2_total.inc();
        } else {
            stats.downstream_rq_http1_total.inc();
        }
        if self.protocol.get().is_none() {
            self.protocol.set(Some(version));
            if version == Version::HTTP_2 {
                stats.downstream_cx_http2_total.inc();
                stats.downstream_cx_http2_active.inc();
            } else {
                stats.downstream_cx_http1_total.inc();
                stats.downstream_cx_http1_active.inc();
            }
        }
        let started = Instant::now();
        if hcm.generate_request_id && !req.headers().contains_key(&X_REQUEST_ID) {
            let id = uuid::Uuid::new_v4();
            let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
            let s = id.hyphenated().encode_lower(&mut buf);
            if let Ok(v) = HeaderValue::from_str(s) {
                req.headers_mut().insert(X_REQUEST_ID.clone(), v);
            }
        }
        // Borrowed from a clone of the URI (and Host), which shares the bytes hyper
        // parsed: no copy per request.
        let uri = req.uri().clone();
        let host = match uri.authority() {
            Some(_) => None,
            None => req.headers().get(header::HOST).cloned(),
        };
        let authority = uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| host.as_ref().and_then(|h| h.to_str().ok()))
            .unwrap_or("");
        let path = uri.path_and_query().map_or("/", |p| p.as_str());

        let bytes_received = Rc::new(Cell::new(0u64));
        let routes = hcm.routes.load();
        let route = routes.find(authority, path);
        let filters = hcm.filters.as_ref().and_then(|chain| {
            RequestFilters::start(chain, route, &req, authority, path, self.peer)
        });
        let wants_log = filters.as_ref().is_some_and(|f| f.hooks.has(Phase::Log));
        let mut record = (!hcm.access_logs.is_empty() || wants_log).then(|| LogRecord {
            start: Some(SystemTime::now()),
            request_headers: Some(req.headers().clone()),
            method: req.method().as_str().to_string(),
            path: path.to_string(),
            authority: authority.to_string(),
            protocol: protocol_name(version),
            downstream_remote: Some(self.peer),
            downstream_local: self.local,
            response_flags: "-",
            ..Default::default()
        });
        if let (Some(r), Some(route)) = (record.as_mut(), route) {
            r.route_name = route.name.clone();
        }
        let exchange = Exchange {
            hcm: hcm.clone(),
            screen: self.screen.clone(),
            started,
            record: None,
            upstream: None,
            filter_log: filters
                .as_ref()
                .filter(|_| wants_log)
                .map(|f| f.stream.clone()),
        };
        let (mut parts, body) = req.into_parts();

        // Request hooks run before the route's action, as Envoy's decoder filters run
        // before the router: a filter may answer for a route that does not exist.
        let mut chosen_cluster = None;
        let request_body = match &filters {
            None => ProxyBody::Stream(body),
            Some(f) => match f.on_request(&mut parts, body, stats).await {
                Ok(passed) => {
                    chosen_cluster = passed.cluster;
                    if let Some(n) = passed.bytes_received {
                        bytes_received.set(n);
                    }
                    passed.body
                }
                Err(reply) => return self.local_reply(reply, exchange, record, &bytes_received),
            },
        };

        let Some(route) = route else {
            stats.no_route.inc();
            return self
                .router_reply(
                    filters.as_ref(),
                    LocalReply::new(404, Bytes::new(), "NR", "route_not_found"),
                    exchange,
                    record,
                    &bytes_received,
                )
                .await;
        };
        let action = match &route.action {
            RouteAction::Direct { status, body } => {
                stats.rq_direct_response.inc();
                let body = body.clone().map(Bytes::from).unwrap_or_default();
                return self
                    .router_reply(
                        filters.as_ref(),
                        LocalReply::new(*status, body, "-", "direct_response"),
                        exchange,
                        record,
                        &bytes_received,
                    )
                    .await;
            }
            RouteAction::Forward(f) => f,
        };
        stats.rq_total.inc();
        let cluster_name = chosen_cluster.as_deref().unwrap_or(&action.cluster);
        let Some(cluster) = hcm.clusters.get(cluster_name) else {
            stats.no_cluster.inc();
            return self
                .router_reply(
                    filters.as_ref(),
                    LocalReply::new(503, Bytes::new(), "NC", "cluster_not_found"),
                    exchange,
                    record,
                    &bytes_received,
                )
                .await;
        };
        if let Some(r) = record.as_mut() {
            r.upstream_cluster = Some(cluster.name.clone());
        }
        let Some(host) = self.pools.pick_host(&cluster) else {
            cluster.stats.upstream_cx_none_healthy.inc();
            cluster.stats.response(503);
            return self
                .router_reply(
                    filters.as_ref(),
                    LocalReply::new(503, "no healthy upstream", "UH", "no_healthy_upstream"),
                    exchange,
                    record,
                    &bytes_received,
                )
                .await;
        };
        if let Some(r) = record.as_mut() {
            r.upstream_host = Some(host.address);
        }

        cluster.stats.upstream_rq_total.inc();
        cluster.stats.upstream_rq_pending_total.inc();
        host.stats.rq_total.inc();
        let mut sender = match self.pools.acquire(&cluster, &host).await {
            Ok(s) => s,
            Err(e) => {
                host.stats.rq_error.inc();
                cluster.stats.upstream_rq_pending_failure_eject.inc();
                cluster.stats.response(503);
                if let Some(r) = record.as_mut() {
                    r.upstream_failure = Some(e.transport_failure());
                }
                let body = format!(
                    "upstream connect error or disconnect/reset before headers. reset reason: {}",
                    e.reset_reason()
                );
                let reply = LocalReply::new(
                    503,
                    body,
                    "UF",
                    "upstream_reset_before_response_started{connection_failure}",
                );
                return self
                    .router_reply(filters.as_ref(), reply, exchange, record, &bytes_received)
                    .await;
            }
        };

        // Prepare the upstream request in place: same headers map, same body stream.
        let is_h2_upstream = matches!(sender, Sender::Http2(_));
        self.rewrite_request_headers(
            &mut parts,
            action,
            &route.path_match,
            authority,
            path,
            is_h2_upstream,
        );
        let upstream_body = match request_body {
            ProxyBody::Stream(body) if record.is_some() => {
                ProxyBody::Counted(body, bytes_received.clone())
            }
            other => other,
        };
        parts.version = if is_h2_upstream {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        let upstream_req = Request::from_parts(parts, upstream_body);

        cluster.stats.upstream_rq_active.inc();
        host.stats.rq_active.inc();
        let mut exchange = Exchange {
            upstream: Some(UpstreamExchange {
                cluster: cluster.clone(),
                pools: self.pools.clone(),
                host: host.address,
                host_ref: host.clone(),
                reusable: None,
            }),
            ..exchange
        };
        let sent_at = Instant::now();
        let response = match &mut sender {
            Sender::Http1(s) => with_timeout(action, s.send_request(upstream_req)).await,
            Sender::Http2(s) => with_timeout(action, s.send_request(upstream_req)).await,
        };
        let response = match response {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) if e.is_user() => {
                // The downstream request body failed (e.g. a malformed chunk):
                // a downstream protocol error, answered as Envoy's codec does.
                stats.downstream_cx_protocol_error.inc();
                let reply = LocalReply::new(400, "Bad Request", "DPE", "http1.codec_error");
                let mut resp = self.local_reply(reply, exchange, record, &bytes_received);
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return resp;
            }
            Ok(Err(e)) => {
                host.stats.rq_error.inc();
                cluster.stats.upstream_rq_rx_reset.inc();
                cluster.stats.response(503);
                let reason = if e.is_canceled() || e.is_incomplete_message() || e.is_closed() {
                    "connection termination"
                } else {
                    "protocol error"
                };
                if let Some(r) = record.as_mut() {
                    r.upstream_failure = Some(e.to_string());
                }
                let body = format!(
                    "upstream connect error or disconnect/reset before headers. reset reason: {reason}"
                );
                return self
                    .router_reply(
                        filters.as_ref(),
                        LocalReply::new(
                            503,
                            body,
                            "UC",
                            "upstream_reset_before_response_started{connection_termination}",
                        ),
                        exchange,
                        record,
                        &bytes_received,
                    )
                    .await;
            }
            Err(_elapsed) => {
                cluster.stats.upstream_rq_timeout.inc();
                cluster.stats.response(504);
                host.stats.rq_timeout.inc();
                return self
                    .router_reply(
                        filters.as_ref(),
                        LocalReply::new(
                            504,
                            "upstream request timeout",
                            "UT",
                            "upstream_response_timeout",
                        ),
                        exchange,
                        record,
                        &bytes_received,
                    )
                    .await;
            }
        };
        let service_time = sent_at.elapsed();
        cluster
            .stats
            .upstream_rq_time
            .record(service_time.as_millis() as u64);
        let status = response.status().as_u16();
        cluster.stats.response(status);
        if status < 500 {
            host.stats.rq_success.inc();
        } else {
            host.stats.rq_error.inc();
        }

        let (mut parts, body) = response.into_parts();
        // Envoy writes its own reason phrase, not the upstream\'s.
        parts.extensions.remove::<hyper::ext::ReasonPhrase>();
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.insert(
            X_ENVOY_UPSTREAM_SERVICE_TIME.clone(),
            HeaderValue::from(service_time.as_millis() as u64),
        );
        parts
            .headers
            .insert(header::SERVER, hcm.server_name.clone());
        parts.version = version;
        let mut response_body = ProxyBody::Stream(body);
        if let Some(f) = &filters {
            // After a filter replaces the response the upstream connection is not
            // reused (its body is not read).
            let passed = f.on_response(&mut parts, response_body, status, head_request, stats);
            match passed.await {
                Ok(body) => response_body = body,
                Err(reply) => return self.local_reply(reply, exchange, record, &bytes_received),
            }
        }
        stats.response_class(status);
        if let Some(r) = record.as_mut() {
            r.response_code = status;
            r.response_headers = Some(parts.headers.clone());
            r.response_duration = Some(started.elapsed());
            r.response_code_details = "via_upstream";
        }
        exchange.record = record;
        if let (Sender::Http1(s), Some(up)) = (sender, exchange.upstream.as_mut()) {
            up.reusable = Some(s);
        }
        let counted = bytes_received.clone();
        let body = ResponseBody::new(
            response_body,
            Some(Box::new(move |end, bytes| {
                exchange.finish(end, bytes, Some(&counted))
            })),
        );
        Response::from_parts(parts, body)
    }

    /// Edits the request in place for the upstream; touches the URI and `Host` only
    /// when something changes (a rewrite, or the protocol's form of the target).
    fn rewrite_request_headers(
        &self,
        req: &mut http::request::Parts,
        action: &ForwardAction,
        matched: &PathMatch,
        authority: &str,
        path: &str,
        h2_upstream: bool,
    ) {
        let hcm = &self.hcm;
        let new_path = match (&action.prefix_rewrite, matched) {
            (Some(rewrite), PathMatch::Prefix(prefix)) if path.len() >= prefix.len() => {
                Some(format!("{rewrite}{}", &path[prefix.len()..]))
            }
            _ => None,
        };
        let authority = action.host_rewrite.as_deref().unwrap_or(authority);
        let headers = &mut req.headers;
        strip_hop_by_hop(headers);
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
        }
        if hcm.use_remote_address {
            let peer = self.peer.ip().to_string();
            let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
                Some(existing) => format!("{existing}, {peer}"),
                None => peer,
            };
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(X_FORWARDED_FOR.clone(), v);
            }
        }
        if let Some(expected) = &action.expected_timeout {
            headers.insert(X_ENVOY_EXPECTED_TIMEOUT.clone(), expected.clone());
        }
        if new_path.is_some()
            && let Ok(v) = HeaderValue::from_str(path)
        {
            headers.insert(X_ENVOY_ORIGINAL_PATH.clone(), v);
        }
        let final_path = new_path.as_deref().unwrap_or(path);
        if h2_upstream {
            headers.remove(header::HOST);
            if let Ok(uri) = Uri::builder()
                .scheme("http")
                .authority(authority)
                .path_and_query(final_path)
                .build()
            {
                req.uri = uri;
            }
        } else {
            // An HTTP/1.1 request already carries Host unless it came over HTTP/2.
            if (action.host_rewrite.is_some() || !headers.contains_key(header::HOST))
                && let Ok(v) = HeaderValue::from_str(authority)
            {
                headers.insert(header::HOST, v);
            }
            // Origin form, unless it already is and the path is unchanged.
            if (new_path.is_some() || req.uri.authority().is_some())
                && let Ok(uri) = final_path.parse::<Uri>()
            {
                req.uri = uri;
            }
        }
    }

    /// A local reply's headers: Envoy's defaults, then those a filter asked for.
    fn local_reply_headers(&self, reply: &mut LocalReply) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if !reply.body.is_empty() {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        headers.insert(header::SERVER, self.hcm.server_name.clone());
        for (name, value) in reply.headers.drain(..) {
            headers.insert(name, value);
        }
        headers
    }

    /// A reply the router makes (no route, direct response, upstream failures): the
    /// filters' response hooks see it, as Envoy's encoder filters do.
    async fn router_reply(
        &self,
        filters: Option<&RequestFilters>,
        mut reply: LocalReply,
        exchange: Exchange,
        record: Option<LogRecord>,
        bytes_received: &Rc<Cell<u64>>,
    ) -> Response<ResponseBody> {
        let Some(f) = filters
            .filter(|f| f.hooks.has(Phase::ResponseHeaders) || f.hooks.has(Phase::ResponseBody))
        else {
            return self.local_reply(reply, exchange, record, bytes_received);
        };
        let status = reply.status.as_u16();
        let mut headers = self.local_reply_headers(&mut reply);
        if f.hooks.has(Phase::ResponseHeaders) {
            match f
                .run(Phase::ResponseHeaders, Some(headers), status, None)
                .await
            {
                HookOutcome::Continue { headers: h, .. } => headers = h.unwrap_or_default(),
                other => {
                    let reply = f.local_reply(other, &self.hcm.stats);
                    return self.local_reply(reply, exchange, record, bytes_received);
                }
            }
        }
        if f.hooks.has(Phase::ResponseBody) {
            let message_headers = (!f.hooks.has(Phase::ResponseHeaders)).then(|| headers.clone());
            let body = Some(reply.body.clone());
            match f
                .run_with(Phase::ResponseBody, None, message_headers, status, body)
                .await
            {
                HookOutcome::Continue { body, .. } => reply.body = body.unwrap_or_default(),
                other => {
                    let reply = f.local_reply(other, &self.hcm.stats);
                    return self.local_reply(reply, exchange, record, bytes_received);
                }
            }
        }
        reply.edited_headers = Some(headers);
        self.local_reply(reply, exchange, record, bytes_received)
    }

    fn local_reply(
        &self,
        mut reply: LocalReply,
        mut exchange: Exchange,
        mut record: Option<LogRecord>,
        bytes_received: &Rc<Cell<u64>>,
    ) -> Response<ResponseBody> {
        let status = reply.status.as_u16();
        self.hcm.stats.response_class(status);
        let mut resp = Response::new(());
        *resp.status_mut() = reply.status;
        *resp.headers_mut() = match reply.edited_headers.take() {
            Some(h) => h,
            None => self.local_reply_headers(&mut reply),
        };
        let headers = resp.headers_mut();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(reply.body.len()));
        if let Some(r) = record.as_mut() {
            r.response_code = status;
            r.response_flags = reply.flags;
            r.response_code_details = reply.details;
            r.response_headers = Some(headers.clone());
        }
        exchange.record = record;
        let counted = bytes_received.clone();
        let (parts, ()) = resp.into_parts();
        Response::from_parts(
            parts,
            ResponseBody::new(
                ProxyBody::text(reply.body),
                Some(Box::new(move |end, bytes| {
                    exchange.finish(end, bytes, Some(&counted))
                })),
            ),
        )
    }
}

async fn with_timeout<F: Future>(
    action: &ForwardAction,
    fut: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    match action.timeout {
        Some(t) => tokio::time::timeout(t, fut).await,
        None => Ok(fut.await),
    }
}
