//! One request on a downstream connection (Envoy's `ActiveStream` with its filter
//! manager): request bookkeeping, the decoder filters, the router as the terminal
//! filter, the encoder filters, local replies, and the completion that writes
//! stats and the access log when the response stream ends.

use std::cell::Cell;
use std::future::Future as _;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::header::{self, HeaderValue};
use http::{HeaderMap, Request, Response, Version};
use http_body::Body as _;

use super::body::{PeerBody, ProxyBody, ResponseBody, StreamEnd, StreamWatch};
use super::connection::DownstreamConnection;
use super::filter::{FilterStream, HookOutcome, Phase};
use super::filtering::RequestFilters;
use super::headers::{X_ENVOY_UPSTREAM_SERVICE_TIME, X_REQUEST_ID, protocol_name};
use super::local_reply::LocalReply;

use super::headers::{GRPC_MESSAGE, GRPC_STATUS, GRPC_TIMEOUT};
use super::internal_request::Origin;
use super::path_normalization::Normalized;
use crate::access_log::LogRecord;
use crate::config::{HcmLimits, RouteAction, RouteEntry, ServerHeaderTransformation};
use crate::router::filter::{Router, RouterOutcome, UpstreamResponse};
use crate::router::upstream_request::UpstreamHandle;

pub(crate) struct ActiveStream {
    pub(crate) conn: Rc<DownstreamConnection>,
    pub version: Version,
    head_request: bool,
    /// A gRPC request (`content-type: application/grpc…`): its local replies are
    /// gRPC statuses.
    grpc: bool,
    started: Instant,
    /// The access-log record, when a logger or an `on_log` hook wants one (boxed:
    /// it is large, and every request's future would carry it inline).
    pub(crate) record: Option<Box<LogRecord>>,
    pub(crate) filters: Option<RequestFilters>,
    /// Downstream body bytes, counted as they stream (for the access log).
    pub(crate) bytes_received: Rc<Cell<u64>>,
    /// The upstream try whose response is being streamed (pool return, stats).
    upstream: Option<UpstreamHandle>,
    /// A CONNECT request: HTTP/1 closes the connection after a local reply (the
    /// request never ends), as Envoy does.
    connect: bool,
    /// The request's `x-request-id`, for the response
    /// (`always_set_request_id_in_response`).
    request_id: Option<HeaderValue>,
    /// The route's `response_headers_to_add` and kin, when it has some.
    response_mutations: Option<ResponseMutations>,
    /// An upgrade (WebSocket, CONNECT…) the route allowed.
    upgrade: Option<Box<super::upgrade::UpgradeRequest>>,
    /// What the native filters keep for the response (None: nothing).
    native: Option<Box<super::native::NativeState>>,
}

/// `via` appended, Envoy's way (`, ` between values).
fn append_via(headers: &mut HeaderMap, via: &HeaderValue) {
    let value = match headers.get(header::VIA) {
        Some(existing) if !existing.is_empty() => {
            let mut v = Vec::with_capacity(existing.len() + 2 + via.len());
            v.extend_from_slice(existing.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(via.as_bytes());
            HeaderValue::from_bytes(&v).unwrap_or_else(|_| via.clone())
        }
        _ => via.clone(),
    };
    headers.insert(header::VIA, value);
}

/// A route's response mutations; the access-log record (kept for them) holds
/// what their formatters read. A direct-response route's apply only to its
/// direct response, as Envoy's (it has no route entry for other local replies).
struct ResponseMutations {
    route: Option<Arc<crate::config::header_mutation::RouteHeaderMutations>>,
    /// The picked weighted cluster's, evaluated before the route's (Envoy's
    /// `WeightedClusterEntry::finalizeResponseHeaders`).
    cluster: Option<Arc<crate::config::header_mutation::HeaderMutations>>,
    direct: bool,
}

impl ResponseMutations {
    /// The response mutations of route `r` and its picked weighted cluster entry.
    fn of(
        r: &RouteEntry,
        weighted: Option<&crate::config::route_action::ClusterWeight>,
    ) -> Option<Self> {
        let m = r.header_mutations.as_ref().filter(|m| m.has_response);
        let cluster = weighted
            .and_then(|w| w.header_mutations.as_ref())
            .filter(|m| !m.response.is_empty());
        if m.is_none() && cluster.is_none() {
            return None;
        }
        Some(ResponseMutations {
            route: m.cloned(),
            cluster: cluster.cloned(),
            direct: matches!(r.action, RouteAction::Direct { .. }),
        })
    }
}

impl ActiveStream {
    /// Serves one request to its end: what is returned is the response whose body
    /// completes the stream.
    pub async fn run(
        conn: Rc<DownstreamConnection>,
        mut req: Request<PeerBody>,
    ) -> Response<StreamBody> {
        // Borrowed through an Rc of this worker: no shared reference count is
        // touched per request.
        let connection = conn.clone();
        let hcm = &*connection.hcm;
        let version = req.version();
        conn.begin_request(version);
        let edits = &hcm.edits;
        if version == Version::HTTP_10
            && let Some(default) = &edits.default_host_for_http_10
            && !req.headers().contains_key(header::HOST)
            && req.uri().authority().is_none()
        {
            req.headers_mut().insert(header::HOST, default.clone());
        }
        let mut upgrade = super::upgrade::UpgradeRequest::detect(&mut req);
        let was_upgrade = upgrade.is_some();
        // Before any filter or the router reads them, as Envoy does.
        let origin = hcm
            .internal_policy
            .apply(req.headers_mut(), conn.peer, conn.tls.is_some());
        let routes = match &hcm.scoped {
            None => conn.route_table(),
            Some(scoped) => conn.scoped_route_table(scoped, req.headers()),
        };
        if origin != Origin::Internal {
            for name in &routes.internal_only_headers {
                req.headers_mut().remove(name);
            }
        }
        if hcm.generate_request_id {
            // An edge request gets its own id unless the client's is to be kept.
            let replace = origin == Origin::Edge && !edits.preserve_external_request_id;
            if replace || !req.headers().contains_key(&X_REQUEST_ID) {
                let id = uuid::Uuid::new_v4();
                let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
                let s = id.hyphenated().encode_lower(&mut buf);
                if let Ok(v) = HeaderValue::from_str(s) {
                    req.headers_mut().insert(X_REQUEST_ID.clone(), v);
                }
            }
        }
        if let Some(via) = &edits.via {
            append_via(req.headers_mut(), via);
        }
        // Envoy's path normalisation, before anything routes on the path.
        let mut path_verdict = None;
        if edits.paths.is_active() && req.uri().path().starts_with('/') {
            let p = req.uri().path_and_query().map_or("/", |p| p.as_str());
            match edits.paths.apply(p) {
                Normalized::Unchanged => {}
                Normalized::Changed(new) => {
                    let mut parts = req.uri().clone().into_parts();
                    parts.path_and_query = new.parse().ok();
                    if let Ok(uri) = http::Uri::from_parts(parts) {
                        *req.uri_mut() = uri;
                    }
                }
                verdict => path_verdict = Some(verdict),
            }
        }
        // Borrowed from a clone of the URI (and Host), which shares the bytes hyper
        // parsed: no copy per request.
        let uri = req.uri().clone();
        let host = match uri.authority() {
            Some(_) => None,
            None => req.headers().get(header::HOST).cloned(),
        };
        let has_host = uri.authority().is_some() || host.is_some();
        let authority = uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| host.as_ref().and_then(|h| h.to_str().ok()))
            .unwrap_or("");
        let connect = req.method() == http::Method::CONNECT;
        // A CONNECT target is an authority, not a path: without one, no route
        // with a path matcher takes it (Envoy's CONNECT has no `:path`).
        let path = match uri.path_and_query() {
            Some(p) => p.as_str(),
            None if connect => "",
            None => "/",
        };
        // Before route selection, as Envoy's connection manager does; the upstream
        // sees the stripped host too.
        let authority = match crate::router::table::strip_host_port(
            hcm.strip_host_port,
            authority,
            req.method(),
            conn.local.map(|a| a.port()),
        ) {
            Some(stripped) => {
                if req.headers().contains_key(header::HOST)
                    && let Ok(v) = HeaderValue::from_str(stripped)
                {
                    req.headers_mut().insert(header::HOST, v);
                }
                stripped
            }
            None => authority,
        };

        // Envoy's checks of the head before routing: HTTP/1 needs a Host (400),
        // and only a path is routed (`OPTIONS *` and the like get 404).
        let early = if !has_host && version != Version::HTTP_2 {
            let mut reply = LocalReply::new(400, "", "-", "missing_host_header");
            reply.close_connection = true;
            Some(reply)
        } else if !path.is_empty() && !path.starts_with('/') {
            hcm.stats.downstream_rq_non_relative_path.inc();
            Some(LocalReply::new(404, "", "-", "absolute_path"))
        } else {
            match path_verdict {
                Some(Normalized::Redirect(to)) => {
                    hcm.stats
                        .downstream_rq_redirected_with_normalized_path
                        .inc();
                    let mut reply = LocalReply::new(307, "", "-", "path_normalization_redirect");
                    if let Ok(v) = HeaderValue::from_str(&to) {
                        reply.headers.push((header::LOCATION, v));
                    }
                    Some(reply)
                }
                Some(_) => {
                    hcm.stats.downstream_rq_failed_path_normalization.inc();
                    let mut reply = LocalReply::new(400, "", "-", "path_normalization_failed");
                    // Envoy closes after it (the reply counts as a protocol error).
                    reply.close_connection = true;
                    Some(reply)
                }
                None => None,
            }
        };

        let scheme = match uri.scheme_str() {
            Some(s) => s,
            None if conn.tls.is_some() => "https",
            None => "http",
        };
        let route = if early.is_some() {
            None
        } else {
            routes.find(
                &crate::router::route_match::RouteRequest::new(
                    authority,
                    path,
                    req.method(),
                    scheme,
                    req.headers(),
                )
                .with_tls(conn.tls.as_deref()),
            )
        };
        // The weighted cluster entry is picked with the route, as in Envoy: its
        // per-filter configs and header mutations are the most specific.
        let weighted =
            route.and_then(|r| crate::router::cluster_specifier::pick_weighted(r, req.headers()));
        let upgrade_refused = match (upgrade.as_mut(), route) {
            (Some(u), Some(r)) => matches!(
                u.decide(&hcm.upgrades, r),
                super::upgrade::Decision::Refused
            ),
            _ => false,
        };
        let filters = hcm.filters.as_ref().and_then(|chain| {
            RequestFilters::start(
                chain,
                super::filter::RouteFilterConfigs { route, weighted },
                &req,
                authority,
                path,
                conn.peer,
                conn.tls.as_ref(),
            )
        });
        let wants_log = filters.as_ref().is_some_and(|f| f.hooks.has(Phase::Log));
        let response_mutations = route.and_then(|r| ResponseMutations::of(r, weighted));
        // A local reply format or mapper reads the request (its headers).
        let reply_reads = edits.local_reply.as_ref().is_some_and(|l| l.needs_record());
        let record = (!hcm.access_logs.is_empty()
            || wants_log
            || reply_reads
            || response_mutations.is_some())
        .then(|| {
            Box::new(LogRecord {
                start: Some(SystemTime::now()),
                request_headers: Some(req.headers().clone()),
                method: req.method().as_str().to_string(),
                path: path.to_string(),
                authority: authority.to_string(),
                protocol: protocol_name(version),
                downstream_remote: Some(conn.peer),
                downstream_local: conn.local,
                response_flags: "-",
                route_name: route.map(|r| r.name.clone()).unwrap_or_default(),
                route_metadata: route.and_then(|r| r.metadata.clone()),
                downstream_tls: conn.tls.clone(),
                ..Default::default()
            })
        });
        let mut stream = ActiveStream {
            conn,
            version,
            head_request: req.method() == http::Method::HEAD,
            grpc: crate::router::route_match::is_grpc_content_type(req.headers()),
            started: Instant::now(),
            record,
            filters,
            bytes_received: Rc::new(Cell::new(0)),
            upstream: None,
            connect,
            request_id: if edits.always_set_request_id_in_response {
                req.headers().get(&X_REQUEST_ID).cloned()
            } else {
                None
            },
            response_mutations,
            upgrade,
            native: None,
        };
        if upgrade_refused {
            // Envoy's answer, and the connection closes: bytes after a refused
            // upgrade's head must never be read as another request.
            let mut reply = LocalReply::new(403, bytes::Bytes::new(), "-", "upgrade_failed");
            reply.close_connection = true;
            let (parts, body) = stream.send_local_reply(reply).into_parts();
            return Response::from_parts(parts, StreamBody::new(body, None));
        }
        if let Some(reply) = early {
            let (parts, body) = stream.send_local_reply(reply).into_parts();
            return Response::from_parts(parts, StreamBody::new(body, None));
        }
        let (mut parts, mut body) = req.into_parts();
        // Envoy's stream timers, only for streams that have one: they race the
        // decoding (filters, router, upstream) until the response starts.
        let timers = StreamTimers::for_route(&hcm.limits, route, &parts.headers);
        // Envoy's refreshDurationTimeout: under the route's max_stream_duration (its
        // "new timeouts"), a gRPC request's `grpc-timeout` is the stream's limit.
        if let Some(limit) = timers.as_ref().and_then(|t| t.max_duration)
            && route.is_some_and(uses_stream_duration)
            && crate::router::route_match::is_grpc_content_type(&parts.headers)
            && let Ok(v) = HeaderValue::from_str(&format!("{}m", limit.as_millis()))
        {
            parts.headers.insert(GRPC_TIMEOUT.clone(), v);
        }
        let watch = timers.map(|_| Rc::new(StreamWatch::new(body.is_end_stream())));
        if let Some(w) = &watch {
            body = body.watched(w);
        }
        let started = stream.started;
        // The route an internal redirect ended on, if any.
        let mut redirected_to = None;

        let decoding = async {
            // Decoder filters run before the router, as in Envoy: a filter may
            // answer for a route that does not exist.
            let mut chosen_cluster = None;
            if let Some(native) = &hcm.native {
                let req = crate::router::route_match::RouteRequest::new(
                    authority,
                    path,
                    &parts.method,
                    scheme,
                    &parts.headers,
                );
                // Boxed, as the Python filters' futures: a request without them
                // does not carry their state.
                let decode = native.decode(req, route, &mut stream.native, &mut stream.record);
                if let Err(reply) = Box::pin(decode).await {
                    return Decoded::FilterReply(reply);
                }
                if let Some(state) = &stream.native {
                    body = state.decode_body(body);
                }
            }
            let request_body = match &stream.filters {
                None => ProxyBody::Stream(body),
                // Filter futures are boxed: a request without filters does not
                // carry their (large) state in its own future.
                Some(f) => match Box::pin(f.on_request(&mut parts, body, &hcm.stats)).await {
                    Ok(passed) => {
                        chosen_cluster = passed.cluster;
                        if let Some(n) = passed.bytes_received {
                            stream.bytes_received.set(n);
                        }
                        passed.body
                    }
                    Err(reply) => return Decoded::FilterReply(reply),
                },
            };
            let router = Router {
                conn: &stream.conn,
                record: &mut stream.record,
                bytes_received: &stream.bytes_received,
                upgrade: &mut stream.upgrade,
                routes: &routes,
                weighted,
                authority,
                path,
                redirected_to: &mut redirected_to,
            };
            Decoded::Router(
                router
                    .decode(route, parts, request_body, chosen_cluster.as_deref())
                    .await,
            )
        };
        let decoded = match (timers, &watch) {
            (Some(timers), Some(watch)) => {
                tokio::select! {
                    biased;
                    d = decoding => d,
                    e = timers.expired(watch, started) => Decoded::Expired(e),
                }
            }
            _ => decoding.await,
        };
        if let Some(r) = redirected_to {
            stream.response_mutations = ResponseMutations::of(r, None);
        }
        let response = match decoded {
            Decoded::FilterReply(reply) => stream.send_local_reply(reply),
            Decoded::Router(RouterOutcome::Reply(reply)) => stream.encode_local_reply(reply).await,
            Decoded::Router(RouterOutcome::CodecError(reply)) => stream.send_local_reply(reply),
            Decoded::Router(RouterOutcome::Upstream(response)) => {
                stream.encode_upstream(response).await
            }
            Decoded::Router(RouterOutcome::InternalRedirect(_)) => {
                unreachable!("the router follows its internal redirects")
            }
            Decoded::Router(RouterOutcome::Tunnel(mut parts)) => {
                parts
                    .headers
                    .insert(header::SERVER, hcm.server_name.clone());
                parts.version = stream.version;
                stream.respond(parts, ProxyBody::Empty)
            }
            Decoded::Expired(expiry) => {
                let complete = watch.as_ref().is_some_and(|w| w.request_complete.get());
                let reply = expiry.local_reply(&hcm.stats, complete);
                stream.encode_local_reply(reply).await
            }
        };
        let (mut parts, body) = response.into_parts();
        if was_upgrade && version == Version::HTTP_11 {
            super::upgrade::close_unless_switched(&mut parts);
        }
        // The idle and duration timers go on while the response body streams.
        let timers = timers
            .filter(|t| (t.idle.is_some() || t.max_duration.is_some()) && !body.is_end_stream())
            .map(|t| ResponseTimers {
                conn: connection.clone(),
                idle: t.idle,
                deadline: t.max_duration.map(|d| started + d),
                last_activity: Instant::now(),
                request: watch.clone(),
            });
        Response::from_parts(parts, StreamBody::new(body, timers))
    }

    /// The upstream's response through the encoder filters to the downstream.
    async fn encode_upstream(mut self, up: UpstreamResponse) -> Response<ResponseBody> {
        let UpstreamResponse {
            mut parts,
            body,
            mut handle,
            service_time,
        } = up;
        // Envoy writes its own reason phrase, not the upstream's.
        parts.extensions.remove::<hyper::ext::ReasonPhrase>();
        let upgraded = match self.upgrade.as_mut() {
            Some(u) => u.on_upstream_response(&mut parts, self.version),
            None => None,
        };
        super::headers::strip_hop_by_hop(&mut parts.headers);
        if let Some(upgraded) = upgraded {
            // The connection is the tunnel's now, never the pool's again.
            handle.forgo_reuse();
            upgraded.restore(&mut parts.headers);
        }
        // Envoy's router times only a request that was whole when the response
        // came; an upgrade's (or CONNECT's) request goes on as the tunnel.
        if self.upgrade.is_none() {
            parts.headers.insert(
                X_ENVOY_UPSTREAM_SERVICE_TIME.clone(),
                HeaderValue::from(service_time.as_millis() as u64),
            );
        }
        // After the router's own headers, before the connection manager's.
        self.mutate_response(&mut parts.headers, parts.status.as_u16(), false);
        self.edit_response_headers(&mut parts.headers);
        parts.version = self.version;
        self.upstream = Some(handle);
        let encodes = self
            .filters
            .as_ref()
            .is_some_and(|f| f.hooks.has(Phase::ResponseHeaders) || f.hooks.buffers_response());
        if encodes {
            // Boxed: a request without response filters does not carry this state.
            Box::pin(self.filter_upstream_response(parts, body)).await
        } else {
            self.respond(parts, ProxyBody::Stream(body))
        }
    }

    async fn filter_upstream_response(
        mut self,
        mut parts: http::response::Parts,
        body: PeerBody,
    ) -> Response<ResponseBody> {
        let Some(f) = &self.filters else {
            return self.respond(parts, ProxyBody::Stream(body));
        };
        let status = parts.status.as_u16();
        let passed = f.on_response(
            &mut parts,
            ProxyBody::Stream(body),
            status,
            self.head_request,
            &self.conn.hcm.stats,
        );
        match passed.await {
            Ok(body) => self.respond(parts, body),
            Err(reply) => {
                // The filter replaced the response: the upstream body is not
                // read, so its connection is not reused.
                if let Some(up) = self.upstream.as_mut() {
                    up.forgo_reuse();
                }
                self.send_local_reply(reply)
            }
        }
    }

    /// Sends the (upstream's) response downstream.
    fn respond(
        mut self,
        mut parts: http::response::Parts,
        body: ProxyBody,
    ) -> Response<ResponseBody> {
        let body = match &self.native {
            Some(native) => {
                native.encode_headers(&mut parts.headers);
                native.encode_body(body)
            }
            None => body,
        };
        let status = parts.status.as_u16();
        self.conn.hcm.stats.response_class(status);
        let elapsed = self.started.elapsed();
        if let Some(r) = self.record.as_mut() {
            r.response_code = status;
            r.response_headers = Some(parts.headers.clone());
            r.response_duration = Some(elapsed);
            r.response_code_details = "via_upstream";
        }
        Response::from_parts(parts, self.into_body(body))
    }

    /// A reply the router makes (no route, direct response, upstream failures):
    /// the encoder filters see it, as Envoy's do.
    async fn encode_local_reply(self, reply: LocalReply) -> Response<ResponseBody> {
        let encodes = self.filters.as_ref().is_some_and(|f| {
            f.hooks.has(Phase::ResponseHeaders) || f.hooks.has(Phase::ResponseBody)
        });
        if encodes {
            Box::pin(self.filter_local_reply(reply)).await
        } else {
            self.send_local_reply(reply)
        }
    }

    async fn filter_local_reply(self, mut reply: LocalReply) -> Response<ResponseBody> {
        let Some(f) = self.filters.as_ref() else {
            return self.send_local_reply(reply);
        };
        let stats = &self.conn.hcm.stats;
        let status = reply.status.as_u16();
        let mut headers = self.local_reply_headers(&mut reply);
        if f.hooks.has(Phase::ResponseHeaders) {
            match f
                .run(Phase::ResponseHeaders, Some(headers), status, None)
                .await
            {
                HookOutcome::Continue { headers: h, .. } => headers = h.unwrap_or_default(),
                other => {
                    let reply = f.local_reply(other, stats);
                    return self.send_local_reply(reply);
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
                    let reply = f.local_reply(other, stats);
                    return self.send_local_reply(reply);
                }
            }
        }
        reply.edited_headers = Some(headers);
        self.send_local_reply(reply)
    }

    /// The connection manager's edits of every response (Envoy's
    /// `encodeHeaders` and `mutateResponseHeaders`): `server`, `via`, the
    /// request's id when asked for.
    fn edit_response_headers(&self, headers: &mut HeaderMap) {
        let hcm = &self.conn.hcm;
        match hcm.edits.server_header {
            ServerHeaderTransformation::Overwrite => {
                headers.insert(header::SERVER, hcm.server_name.clone());
            }
            ServerHeaderTransformation::AppendIfAbsent => {
                if !headers.contains_key(header::SERVER) {
                    headers.insert(header::SERVER, hcm.server_name.clone());
                }
            }
            ServerHeaderTransformation::PassThrough => {}
        }
        if let Some(via) = &hcm.edits.via {
            append_via(headers, via);
        }
        if let Some(id) = &self.request_id {
            headers.insert(X_REQUEST_ID.clone(), id.clone());
        }
    }

    /// A local reply's headers: the route's response mutations, those the router
    /// or a filter asked for, then Envoy's defaults (a content-type set by a
    /// mutation stays, as in Envoy's `prepareLocalReply`).
    fn local_reply_headers(&self, reply: &mut LocalReply) -> HeaderMap {
        let mut headers = HeaderMap::new();
        // Envoy formats a local reply's headers before it records the reply's
        // status: `%RESPONSE_CODE%` is 0 there.
        self.mutate_response(&mut headers, 0, reply.details == "direct_response");
        if reply.body.is_empty() {
            // Envoy's `prepareLocalReply`: a reply without a body has no type.
            headers.remove(header::CONTENT_TYPE);
        }
        self.edit_response_headers(&mut headers);
        for (name, value) in reply.headers.drain(..) {
            headers.insert(name, value);
        }
        if !reply.body.is_empty() && !headers.contains_key(header::CONTENT_TYPE) {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        headers
    }

    /// Applies the route's response mutations (Envoy's `finalizeResponseHeaders`).
    fn mutate_response(&self, headers: &mut HeaderMap, response_code: u16, direct: bool) {
        let (Some(m), Some(record)) = (&self.response_mutations, &self.record) else {
            return;
        };
        if m.direct && !direct {
            return;
        }
        let mut facts = record.facts();
        facts.response_code = response_code;
        facts.duration = None;
        if let Some(cluster) = &m.cluster {
            cluster.apply_response(headers, &facts);
        }
        if let Some(route) = &m.route {
            route.apply_response(headers, &facts);
        }
    }

    /// Sends a local reply as it is (Envoy's `sendLocalReply`), the one place
    /// where a generated response is built.
    pub fn send_local_reply(mut self, mut reply: LocalReply) -> Response<ResponseBody> {
        let mut headers = match reply.edited_headers.take() {
            Some(h) => h,
            None => self.local_reply_headers(&mut reply),
        };
        let conn = self.conn.clone();
        if let Some(config) = &conn.hcm.edits.local_reply {
            let had_body = !reply.body.is_empty();
            match self.record.as_deref_mut() {
                Some(record) => config.rewrite(&mut reply, &mut headers, record),
                None => config.rewrite(&mut reply, &mut headers, &mut LogRecord::default()),
            }
            if !had_body && !reply.body.is_empty() && !headers.contains_key(header::CONTENT_TYPE) {
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            }
        }
        let status = reply.status.as_u16();
        self.conn
            .hcm
            .stats
            .response_class(if self.grpc { 200 } else { status });
        if self.grpc {
            // A gRPC client gets a gRPC status (trailers-only), as from Envoy:
            // HTTP 200, `grpc-status` and the text as `grpc-message`.
            let code = reply
                .grpc_status
                .unwrap_or_else(|| super::local_reply::http_to_grpc_status(status));
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.insert(GRPC_STATUS.clone(), HeaderValue::from(u16::from(code)));
            if !reply.body.is_empty()
                && let Ok(v) = HeaderValue::from_str(&super::local_reply::grpc_message(&reply.body))
            {
                headers.insert(GRPC_MESSAGE.clone(), v);
            }
            reply.status = http::StatusCode::OK;
            reply.body = bytes::Bytes::new();
        }
        // The encoder filters see a local reply as any response (Envoy's
        // `sendLocalReply` encodes through them), gRPC status included.
        if let Some(native) = &self.native {
            native.encode_headers(&mut headers);
        }
        // Envoy sets a length only for a body; its HTTP/1 codec writes
        // `content-length: 0` for an empty one (not to a HEAD request), its
        // HTTP/2 codec nothing.
        if !reply.body.is_empty() || (self.version != http::Version::HTTP_2 && !self.head_request) {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(reply.body.len()));
        }
        if reply.close_connection || (self.connect && self.version != Version::HTTP_2) {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(r) = self.record.as_mut() {
            r.response_code = status;
            r.response_flags = super::native::with_earlier_flags(r.response_flags, reply.flags);
            r.response_code_details = reply.details;
            r.response_headers = Some(headers.clone());
        }
        let mut resp = Response::new(());
        *resp.status_mut() = reply.status;
        *resp.headers_mut() = headers;
        let (parts, ()) = resp.into_parts();
        Response::from_parts(parts, self.into_body(ProxyBody::text(reply.body)))
    }

    /// The downstream body, which completes the stream when it ends.
    fn into_body(self, body: ProxyBody) -> ResponseBody {
        let completion = StreamCompletion {
            conn: self.conn,
            started: self.started,
            filter_log: self
                .filters
                .as_ref()
                .filter(|f| f.hooks.has(Phase::Log) && self.record.is_some())
                .map(|f| f.stream.clone()),
            record: self.record,
            upstream: self.upstream,
            bytes_received: self.bytes_received,
        };
        ResponseBody::new(
            body,
            Some(Box::new(move |end, bytes| completion.finish(end, bytes))),
        )
    }
}

/// How the decoding of a request ended.
enum Decoded {
    /// A decoder filter answered.
    FilterReply(LocalReply),
    Router(RouterOutcome),
    /// A stream timer fired first.
    Expired(Expiry),
}

/// Envoy's per-stream timers before the response starts (`stream_idle_timeout` or
/// the route's `idle_timeout`, `request_timeout`, `max_stream_duration`).
#[derive(Debug, Clone, Copy)]
struct StreamTimers {
    idle: Option<Duration>,
    request: Option<Duration>,
    max_duration: Option<Duration>,
}

/// A stream's duration limit (Envoy's `refreshDurationTimeout`): a gRPC
/// request's `grpc-timeout` when its route sets `grpc_timeout_header_max` (capped
/// by it unless zero, less `grpc_timeout_header_offset`), else the route's
/// `max_stream_duration` (`0s`: none), else the connection manager's.
/// Whether route `r` sets `max_stream_duration` (Envoy's `usingNewTimeouts`).
fn uses_stream_duration(r: &RouteEntry) -> bool {
    matches!(&r.action, RouteAction::Forward(f) if f.stream_duration.is_some())
}

fn max_stream_duration(
    hcm: Option<Duration>,
    route: Option<&crate::config::RouteStreamDuration>,
    headers: &http::HeaderMap,
) -> Option<Duration> {
    let Some(route) = route else {
        return hcm;
    };
    let grpc_timeout = route
        .grpc_header_max
        .and_then(|_| headers.get(&GRPC_TIMEOUT))
        .and_then(|v| v.to_str().ok())
        .and_then(super::headers::parse_grpc_timeout);
    match (grpc_timeout, route.grpc_header_max) {
        (Some(mut t), Some(cap)) => {
            if !cap.is_zero() && t > cap {
                t = cap;
            }
            // An offset that leaves nothing leaves a timer of zero: the stream is
            // over at once, as in Envoy.
            if let Some(offset) = route.grpc_header_offset
                && !t.is_zero()
            {
                t = t.saturating_sub(offset);
            }
            Some(t)
        }
        _ => match route.max {
            Some(d) => (!d.is_zero()).then_some(d),
            None => hcm,
        },
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    Idle,
    Request,
    MaxDuration,
}

impl StreamTimers {
    /// The timers of a stream on `route`; None when it has none.
    fn for_route(
        limits: &HcmLimits,
        route: Option<&RouteEntry>,
        headers: &http::HeaderMap,
    ) -> Option<Self> {
        let forward = route.and_then(|r| match &r.action {
            RouteAction::Forward(f) => Some(f),
            RouteAction::Direct { .. } => None,
        });
        let route_idle = forward.and_then(|f| f.idle_timeout);
        let timers = StreamTimers {
            idle: route_idle.unwrap_or(limits.stream_idle_timeout),
            request: limits.request_timeout,
            max_duration: max_stream_duration(
                limits.max_stream_duration,
                forward.and_then(|f| f.stream_duration.as_ref()),
                headers,
            ),
        };
        (timers.idle.is_some() || timers.request.is_some() || timers.max_duration.is_some())
            .then_some(timers)
    }

    /// Resolves when the first timer expires: one timer at a time, re-armed only
    /// when it fires (the idle deadline moves with the request body's progress).
    async fn expired(self, watch: &StreamWatch, started: Instant) -> Expiry {
        loop {
            let mut next: Option<(Instant, Expiry)> = None;
            let mut consider = |at: Instant, expiry| {
                if next.is_none_or(|(n, _)| at < n) {
                    next = Some((at, expiry));
                }
            };
            if let Some(d) = self.max_duration {
                consider(started + d, Expiry::MaxDuration);
            }
            if let Some(d) = self.request
                && !watch.request_complete.get()
            {
                consider(started + d, Expiry::Request);
            }
            if let Some(d) = self.idle {
                consider(watch.last_activity.get() + d, Expiry::Idle);
            }
            let Some((at, expiry)) = next else {
                return std::future::pending().await;
            };
            if at <= Instant::now() {
                return expiry;
            }
            tokio::time::sleep_until(at.into()).await;
        }
    }
}

impl Expiry {
    /// Envoy's local reply and stat for the timer: 408, or 504 once the whole
    /// request was received (`maybeRequestTimeoutCode`).
    fn local_reply(
        self,
        stats: &super::connection_manager::HcmStats,
        complete: bool,
    ) -> LocalReply {
        let status = if complete { 504 } else { 408 };
        match self {
            Expiry::Idle => {
                stats.downstream_rq_idle_timeout.inc();
                LocalReply::new(status, "stream timeout", "SI", "stream_idle_timeout")
            }
            Expiry::Request => {
                stats.downstream_rq_timeout.inc();
                LocalReply::new(408, "request timeout", "-", "request_overall_timeout")
            }
            Expiry::MaxDuration => {
                stats.downstream_rq_max_duration_reached.inc();
                let mut reply = LocalReply::new(
                    status,
                    "downstream duration timeout",
                    "-",
                    "max_duration_timeout",
                );
                reply.grpc_status = Some(4); // DEADLINE_EXCEEDED, as Envoy's
                reply
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The downstream response body under its stream's timers once the response
    /// started: past `stream_idle_timeout` without a frame, or past
    /// `max_stream_duration`, the stream is reset (HTTP/1.1: the connection
    /// closes; HTTP/2: RST_STREAM), as Envoy's `doEndStream` does.
    pub(crate) struct StreamBody {
        inner: ResponseBody,
        timers: Option<ResponseTimers>,
        // One timer per stream, armed only while the body waits, moved only
        // when it fires (frames just note the time).
        #[pin]
        sleep: Option<tokio::time::Sleep>,
    }
}

struct ResponseTimers {
    conn: Rc<DownstreamConnection>,
    idle: Option<Duration>,
    deadline: Option<Instant>,
    /// The last response frame.
    last_activity: Instant,
    /// The request body still streaming (a bidirectional stream) also counts
    /// as activity, as in Envoy.
    request: Option<Rc<StreamWatch>>,
}

impl ResponseTimers {
    fn next(&self) -> Option<(Instant, Expiry)> {
        let last = match &self.request {
            Some(w) => self.last_activity.max(w.last_activity.get()),
            None => self.last_activity,
        };
        let idle = self.idle.map(|d| (last + d, Expiry::Idle));
        match (idle, self.deadline) {
            (Some(i), Some(d)) if d < i.0 => Some((d, Expiry::MaxDuration)),
            (Some(i), _) => Some(i),
            (None, d) => d.map(|d| (d, Expiry::MaxDuration)),
        }
    }
}

impl StreamBody {
    fn new(inner: ResponseBody, timers: Option<ResponseTimers>) -> Self {
        StreamBody {
            inner,
            timers,
            sleep: None,
        }
    }
}

impl http_body::Body for StreamBody {
    type Data = bytes::Bytes;
    type Error = super::body::BodyError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        use std::task::Poll;
        let mut this = self.project();
        let polled = std::pin::Pin::new(&mut *this.inner).poll_frame(cx);
        let Some(timers) = this.timers.as_mut() else {
            return polled;
        };
        match polled {
            Poll::Pending => {}
            Poll::Ready(Some(Ok(frame))) => {
                if timers.idle.is_some() {
                    timers.last_activity = Instant::now();
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            done => return done,
        }
        loop {
            let Some((at, expiry)) = timers.next() else {
                return Poll::Pending;
            };
            if at <= Instant::now() {
                let stats = &timers.conn.hcm.stats;
                let why = match expiry {
                    Expiry::MaxDuration => {
                        stats.downstream_rq_max_duration_reached.inc();
                        "max_duration_timeout"
                    }
                    _ => {
                        stats.downstream_rq_idle_timeout.inc();
                        "stream_idle_timeout"
                    }
                };
                *this.timers = None;
                return Poll::Ready(Some(Err(super::body::BodyError::StreamTimeout(why))));
            }
            let at = tokio::time::Instant::from_std(at);
            match this.sleep.as_mut().as_pin_mut() {
                Some(sleep) if sleep.deadline() == at => {}
                Some(sleep) => sleep.reset(at),
                None => this.sleep.set(Some(tokio::time::sleep_until(at))),
            }
            if let Some(sleep) = this.sleep.as_mut().as_pin_mut()
                && sleep.poll(cx).is_pending()
            {
                return Poll::Pending;
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// What finishing a request must update once its response stream ends.
struct StreamCompletion {
    conn: Rc<DownstreamConnection>,
    started: Instant,
    record: Option<Box<LogRecord>>,
    upstream: Option<UpstreamHandle>,
    bytes_received: Rc<Cell<u64>>,
    /// The request's filter stream when a filter has an `on_log` hook.
    filter_log: Option<Arc<dyn FilterStream>>,
}

impl StreamCompletion {
    fn finish(mut self, end: StreamEnd, bytes_sent: u64) {
        let conn = self.conn.clone();
        let hcm = &conn.hcm;
        let stats = &hcm.stats;
        let elapsed = self.started.elapsed();
        let screen = &self.conn.screen;
        let in_flight = screen.in_flight.get().saturating_sub(1);
        screen.in_flight.set(in_flight);
        // The HTTP/2 idle timer runs from the end of the last stream.
        if in_flight == 0
            && hcm.limits.idle_timeout.is_some()
            && conn.protocol.get() == Some(Version::HTTP_2)
        {
            conn.idle_since.set(Instant::now());
        }
        stats.downstream_rq_active.dec();
        stats.downstream_rq_completed.inc();
        stats.downstream_rq_time.record(elapsed.as_millis() as u64);
        let mut flags = None;
        if let Some(up) = self.upstream.take() {
            match end {
                StreamEnd::Complete => {}
                StreamEnd::UpstreamError => flags = Some("UR"),
                StreamEnd::UpstreamTimeout => flags = Some("UT"),
                StreamEnd::DownstreamGone => {
                    stats.downstream_rq_rx_reset.inc();
                    flags = Some("DC");
                }
            }
            up.finish(end);
        }
        if let Some(mut record) = self.record.take() {
            record.bytes_sent = bytes_sent;
            record.bytes_received = self.bytes_received.get();
            record.duration = elapsed;
            if let Some(f) = flags
                && record.response_flags == "-"
            {
                record.response_flags = f;
            }
            for logger in &hcm.access_logs {
                logger.log(&record);
            }
            if let Some(filters) = self.filter_log.take() {
                filters.log(*record);
            }
        }
    }
}
