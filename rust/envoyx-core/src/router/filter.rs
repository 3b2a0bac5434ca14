//! The router filter (Envoy's `Router::Filter`), the terminal filter of every HTTP
//! filter chain: route → cluster → upstream request, the request headers Envoy
//! writes for the upstream, and the local replies for what goes wrong on the way.

use std::borrow::Cow;
use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Uri;
use http::header::{self, HeaderValue};

use super::cluster_specifier::{ClusterChoice, choose};
use super::retry_state::{BackOff, RetryDecision, RetryState};
use super::upstream_request::{TryFailure, TryResponse, UpstreamHandle, UpstreamRequest};
use crate::access_log::LogRecord;
use crate::config::route_action::{ClusterWeight, HostRewrite};
use crate::config::{ForwardAction, PathMatch, RouteAction, RouteEntry};
use crate::http::body::{PeerBody, ProxyBody, ReplayBuffer, TimedBody};
use crate::http::connection::DownstreamConnection;
use crate::http::headers::{
    X_ENVOY_EXPECTED_TIMEOUT, X_ENVOY_ORIGINAL_PATH, X_ENVOY_OVERLOADED, X_FORWARDED_PROTO,
    forward_client_cert, strip_hop_by_hop,
};
use crate::http::internal_request::has_envoy_header;
use crate::http::local_reply::LocalReply;
use crate::per_worker::LocalHandle;
use crate::router::RouteTable;
use crate::upstream::lb::LbContext;
use crate::upstream::{Cluster, Host};

static X_FORWARDED_HOST: http::HeaderName = http::HeaderName::from_static("x-forwarded-host");
pub static X_ENVOY_ATTEMPT_COUNT: http::HeaderName =
    http::HeaderName::from_static("x-envoy-attempt-count");
static X_ENVOY_UPSTREAM_RQ_TIMEOUT_MS: http::HeaderName =
    http::HeaderName::from_static("x-envoy-upstream-rq-timeout-ms");
static X_ENVOY_UPSTREAM_RQ_PER_TRY_TIMEOUT_MS: http::HeaderName =
    http::HeaderName::from_static("x-envoy-upstream-rq-per-try-timeout-ms");
static X_ENVOY_UPSTREAM_RQ_TIMEOUT_ALT_RESPONSE: http::HeaderName =
    http::HeaderName::from_static("x-envoy-upstream-rq-timeout-alt-response");
static X_ENVOY_HEDGE_ON_PER_TRY_TIMEOUT: http::HeaderName =
    http::HeaderName::from_static("x-envoy-hedge-on-per-try-timeout");

/// How the router ended its part of a request.
pub(crate) enum RouterOutcome {
    /// A reply of the router's own; the encoder filters see it.
    Reply(LocalReply),
    /// The downstream request was malformed mid-body: replied to as Envoy's codec
    /// does, without the encoder filters.
    CodecError(LocalReply),
    /// The upstream's response headers; its body is still to stream.
    Upstream(UpstreamResponse),
    /// A CONNECT the route terminates: its response (200), carrying the tunnel
    /// to the cluster's host (http/upgrade.rs).
    Tunnel(http::response::Parts),
    /// An upstream redirect the route follows: the next request, routed again
    /// ([`super::internal_redirect::follow`]; never leaves the router).
    InternalRedirect(Box<super::internal_redirect::Next>),
}

pub(crate) struct UpstreamResponse {
    pub parts: http::response::Parts,
    pub body: PeerBody,
    pub handle: UpstreamHandle,
    pub service_time: Duration,
}

/// The router for one request: what it needs of the request's stream (Envoy's
/// decoder filter callbacks), not the stream itself.
pub(crate) struct Router<'s, 'r> {
    pub conn: &'s Rc<DownstreamConnection>,
    /// The access-log record, when there is one (upstream cluster, host, failure).
    pub record: &'s mut Option<Box<LogRecord>>,
    /// Where the downstream body's bytes are counted as they stream upstream.
    pub bytes_received: &'s Rc<Cell<u64>>,
    /// The request's upgrade, when its route allowed one.
    pub upgrade: &'s mut Option<Box<crate::http::upgrade::UpgradeRequest>>,
    /// The table `route` came from (its cluster slots index the connection's
    /// cluster handles).
    pub routes: &'r LocalHandle<RouteTable>,
    /// The route's weighted cluster entry picked for this request (with the route).
    pub weighted: Option<&'r ClusterWeight>,
    pub authority: &'r str,
    pub path: &'r str,
    /// Set to the route of the last request when internal redirects were
    /// followed (its response headers are the response's).
    pub redirected_to: &'s mut Option<&'r RouteEntry>,
}

impl Router<'_, '_> {
    /// Routes the request (after the decoder filters; `chosen_cluster` is a
    /// filter's choice) and sends it upstream, following the internal redirects
    /// its routes accept.
    pub async fn decode(
        self,
        route: Option<&RouteEntry>,
        parts: http::request::Parts,
        body: ProxyBody,
        chosen_cluster: Option<&str>,
    ) -> RouterOutcome {
        let version = parts.version;
        let hop = Router {
            conn: self.conn,
            record: &mut *self.record,
            bytes_received: self.bytes_received,
            upgrade: &mut *self.upgrade,
            routes: self.routes,
            weighted: self.weighted,
            authority: self.authority,
            path: self.path,
            redirected_to: &mut *self.redirected_to,
        };
        match hop
            .decode_hop(route, parts, body, chosen_cluster, None)
            .await
        {
            RouterOutcome::InternalRedirect(next) => {
                Box::pin(super::internal_redirect::follow(self, next, version)).await
            }
            outcome => outcome,
        }
    }

    /// One pass of the router over a request (an internal redirect's next request
    /// makes another, with the redirects followed so far in `chain`).
    pub(super) async fn decode_hop(
        mut self,
        route: Option<&RouteEntry>,
        parts: http::request::Parts,
        body: ProxyBody,
        chosen_cluster: Option<&str>,
        chain: Option<Box<super::internal_redirect::Chain>>,
    ) -> RouterOutcome {
        let sent = SentRequest::default();
        let outcome = self
            .forward(route, parts, body, chosen_cluster, chain, &sent)
            .await;
        sent.log_into(self.record);
        outcome
    }

    /// The work of [`Self::decode_hop`]; the request as its tries sent it is left
    /// in `sent`, for the record.
    async fn forward(
        &mut self,
        route: Option<&RouteEntry>,
        parts: http::request::Parts,
        body: ProxyBody,
        chosen_cluster: Option<&str>,
        chain: Option<Box<super::internal_redirect::Chain>>,
        sent: &SentRequest,
    ) -> RouterOutcome {
        let conn = self.conn.clone();
        let hcm = &conn.hcm;
        let stats = &hcm.stats;
        // Every request the router decodes, direct responses and misses included.
        stats.rq_total.inc();
        let Some(route) = route else {
            stats.no_route.inc();
            return RouterOutcome::Reply(LocalReply::new(
                404,
                Bytes::new(),
                "NR",
                "route_not_found",
            ));
        };
        let action = match &route.action {
            RouteAction::Direct {
                status,
                body,
                redirect,
            } => {
                stats.rq_direct_response.inc();
                let mut reply = LocalReply::new(
                    *status,
                    body.clone().unwrap_or_default(),
                    "-",
                    "direct_response",
                );
                if let Some(redirect) = redirect {
                    let url = self.request_url(&parts);
                    let location =
                        super::redirect::location(redirect, &route.route_match.path, &url);
                    if let Ok(v) = HeaderValue::from_str(&location) {
                        reply.headers.push((header::LOCATION, v));
                    }
                }
                return RouterOutcome::Reply(reply);
            }
            RouteAction::Forward(f) => f,
        };
        let cluster = match chosen_cluster {
            Some(name) => hcm.clusters.get(name).map(LocalHandle::new),
            None => match choose(action, self.weighted, &parts.headers) {
                ClusterChoice::Slot(slot, name) => conn.cluster_for(self.routes, slot, name),
                ClusterChoice::Named(name) => hcm.clusters.get(&name).map(LocalHandle::new),
            },
        };
        let Some(cluster) = cluster else {
            stats.no_cluster.inc();
            return RouterOutcome::Reply(LocalReply::new(
                action.cluster_not_found_status,
                Bytes::new(),
                "NC",
                "cluster_not_found",
            ));
        };
        let cluster_host_rewrite = self.weighted.and_then(|e| e.host_rewrite.as_deref());
        if let Some(r) = self.record.as_mut() {
            cluster.record_in(r);
        }
        let upstream = UpstreamRequest {
            cluster: &cluster,
            pools: &conn.pools,
            priority: action.priority,
        };
        let mut parts = parts;
        // One pass over the names: most requests carry no x-envoy-* header, and
        // then none of the lookups below (each hashes a name) is made.
        let envoy_headers = has_envoy_header(&parts.headers);
        let timeouts = Timeouts::of(action, &mut parts.headers, envoy_headers);
        if self
            .upgrade
            .as_ref()
            .is_some_and(|u| u.terminates_connect(action))
        {
            return self.terminate_connect(&upstream, &timeouts).await;
        }
        // An upgrade keeps its `upgrade` / `connection` headers upstream.
        let upgrade_headers = self.upgrade.as_ref().and_then(|u| u.upstream_token());
        let mut retry = match &action.retry_policy {
            None if !envoy_headers => None,
            policy => RetryState::new(policy.as_ref(), &mut parts.headers),
        };
        // Once per request: every try hashes to the same place, and a generated
        // cookie is sent back once.
        let hash = super::hash_policy::for_request(
            action.hash_policy.as_deref(),
            &parts.headers,
            self.path,
            conn.peer,
            conn.local,
        );
        let body = match body {
            ProxyBody::Stream(b) if self.record.is_some() => {
                ProxyBody::Counted(b, self.bytes_received.clone())
            }
            other => other,
        };
        // Mirrors configured and sampled for this request (none: no allocation).
        let shadows = if action.mirrors.is_empty() || parts.method == http::Method::CONNECT {
            Vec::new()
        } else {
            super::mirror::active(&action.mirrors, &parts.headers)
        };
        // A request that may be retried, redirected or is mirrored keeps its body
        // for the next try or the shadow (one without a body, most of them, has
        // nothing to keep: a retry sends none).
        let (replay, mut body) = match &retry {
            _ if (retry.is_some() || !shadows.is_empty() || action.internal_redirect.is_some())
                && !http_body::Body::is_end_stream(&body) =>
            {
                (
                    Some(ReplayBuffer::new(body, action.retry_buffer_limit)),
                    None,
                )
            }
            _ => (None, Some(body)),
        };
        let (authority, path) = (self.authority, self.path);
        let host = HostEdit::of(
            action,
            cluster_host_rewrite,
            authority,
            &parts.headers,
            path,
        );
        let start = self.record.as_ref().and_then(|r| r.start);
        let mutations = super::header_mutation::RequestMutations::of(
            route,
            self.weighted,
            &conn,
            authority,
            path,
            start,
        );
        // Envoy's log and response formatters read the request its mutations
        // changed (one map there): the record gets the request as sent.
        let logged = (mutations.is_some() && self.record.is_some()).then_some(sent);
        let rewrite = RequestRewrite {
            action,
            matched: &route.route_match.path,
            host,
            path,
            downstream_tls: conn.tls.as_deref(),
            xfcc: (hcm.forward_client_cert, hcm.client_cert_details),
            upstream_tls: upstream.cluster.tls.is_some(),
            expected_timeout: timeouts.expected_header(action),
            grpc_timeout_rewrite: timeouts.grpc,
            mutations,
        };
        // TLS with auto_sni names the host the request goes to (after any rewrite
        // but auto_host_rewrite's, as in Envoy).
        let sni = upstream
            .cluster
            .tls
            .as_ref()
            .and_then(|tls| tls.sni_for(Some(&rewrite.host.authority)));
        for (policy, shadow_cluster) in shadows {
            let mut head = clone_head(&parts);
            rewrite.apply(&mut head, false, "");
            super::mirror::spawn(
                &hcm.clusters,
                &conn.pools,
                policy,
                shadow_cluster,
                head,
                replay.clone(),
                timeouts.global,
            );
        }
        let deadline = timeouts.global.map(|t| Instant::now() + t);
        if timeouts.hedge
            && let Some(per_try) = timeouts.per_try
            && let Some(retry) = retry.take()
        {
            return self
                .decode_hedged(Hedged {
                    cluster: &cluster,
                    upstream: &upstream,
                    timeouts: &timeouts,
                    rewrite: &rewrite,
                    deadline,
                    per_try,
                    retry,
                    hash: hash.hash,
                    set_cookie: hash.set_cookie,
                    replay,
                    body,
                    parts,
                    sni,
                    include_attempt_count: action.include_attempt_count_in_request,
                    logged,
                })
                .await;
        }
        let stats = &cluster.stats;
        let mut previous_hosts: Vec<LocalHandle<Host>> = Vec::new();
        let mut attempt: u32 = 1;
        let mut parts = Some(parts);
        let mut exhausted = false;
        // A retry's place in the cluster's `max_retries`, held while it runs.
        let mut _retry_in_progress = None;
        loop {
            let avoid = retry
                .as_ref()
                .is_some_and(RetryState::avoids_previous_hosts);
            let context = LbContext {
                previous_hosts: if avoid { &previous_hosts } else { &[] },
                host_selection_attempts: retry
                    .as_ref()
                    .map_or(1, |r| r.host_selection_max_attempts().saturating_add(1)),
                hash: hash.hash,
                headers: parts.as_ref().map(|p| &p.headers),
                restored_local_address: conn.local.filter(|_| conn.local_restored),
            };
            let host = match upstream.choose_host(&context) {
                Ok(h) => h,
                Err(failure) => return self.failure(failure, &cluster, &timeouts, attempt, false),
            };
            if let Some(r) = self.record.as_mut() {
                host.record_in(r);
            }
            // A try's own copy of the head when another try may follow.
            let mut try_parts = match (&retry, parts.as_ref()) {
                (Some(_), Some(p)) => clone_head(p),
                _ => parts
                    .take()
                    .expect("a request without retries is tried once"),
            };
            if action.include_attempt_count_in_request {
                try_parts
                    .headers
                    .insert(X_ENVOY_ATTEMPT_COUNT.clone(), HeaderValue::from(attempt));
            }
            let try_body = match &replay {
                Some(r) => r.body(),
                None => body.take().unwrap_or(ProxyBody::Empty),
            };
            let limit = timeouts.for_try(deadline);
            let expected = (attempt > 1)
                .then(|| timeouts.expected_for_retry(deadline))
                .flatten();
            // The request as sent, for an internal redirect to start from.
            let mut sent_head = None;
            let sent = upstream
                .send(
                    &host,
                    sni.clone(),
                    try_parts,
                    try_body,
                    limit.wait,
                    |p, h2| {
                        rewrite.apply_for_try(p, h2, &host.hostname, expected);
                        if let Some(l) = logged {
                            l.capture(&p.headers);
                        }
                        if let Some(token) = &upgrade_headers {
                            crate::http::upgrade::restore_request_headers(&mut p.headers, token);
                        }
                        if action.internal_redirect.is_some() {
                            sent_head = Some(clone_head(p));
                        }
                    },
                )
                .await;
            let decision = match &sent {
                Ok(TryResponse { response, .. }) => match retry.as_mut() {
                    Some(r) => r.on_response(response.status().as_u16(), response.headers()),
                    None => RetryDecision::No,
                },
                Err(TryFailure::Timeout) if !limit.per_try_binds => {
                    // The route's timeout: the request is over, whatever the policy.
                    return self.route_timeout(&cluster, &timeouts, attempt, false);
                }
                Err(failure) => {
                    if matches!(failure, TryFailure::Timeout) {
                        if limit.idle_binds {
                            stats.upstream_rq_per_try_idle_timeout.inc();
                        } else {
                            stats.upstream_rq_per_try_timeout.inc();
                        }
                    }
                    match (retry.as_mut(), failure.reset_kind()) {
                        (Some(r), Some(kind)) => r.on_reset(kind),
                        _ => RetryDecision::No,
                    }
                }
            };
            let back_off = match decision {
                RetryDecision::Yes(back_off) => Some(back_off),
                RetryDecision::LimitExceeded => {
                    stats.upstream_rq_retry_limit_exceeded.inc();
                    exhausted = true;
                    None
                }
                RetryDecision::No => None,
            };
            // The previous retry's place in `max_retries` ends with its outcome.
            _retry_in_progress = None;
            let mut overflowed = false;
            let mut retrying = matches!(decision, RetryDecision::Yes(_));
            if retrying {
                // The cluster's `max_retries` / retry budget (Envoy checks it after
                // the retry limit): refused, the try's outcome stands, flagged `UO`.
                match cluster.resources.try_acquire_retry(action.priority) {
                    Some(guard) => _retry_in_progress = Some(guard),
                    None => {
                        overflowed = true;
                        retrying = false;
                        if let Some(r) = retry.as_mut() {
                            r.refused();
                        }
                    }
                }
            }
            if retrying && let Some(r) = &replay {
                retrying = within(deadline, r.fill()).await.unwrap_or(false);
            }
            if !retrying {
                if overflowed && let Some(r) = self.record.as_mut() {
                    r.response_flags = "UO";
                }
                let retried = retry.as_ref().is_some_and(|r| r.retries > 0);
                return match sent {
                    Ok(resp) => {
                        if let Some(policy) = action.internal_redirect.as_deref()
                            && policy.redirects_on(resp.response.status().as_u16())
                            && let Some(next) = self.accept_redirect(
                                super::internal_redirect::Candidate {
                                    policy,
                                    status: resp.response.status().as_u16(),
                                    response: resp.response.headers(),
                                    sent: sent_head,
                                    replay: replay.as_ref(),
                                    downstream_is_http: self.conn.tls.is_none(),
                                    chain,
                                },
                                &cluster,
                            )
                        {
                            return RouterOutcome::InternalRedirect(next);
                        }
                        if retried && !exhausted {
                            stats.upstream_rq_retry_success.inc();
                        }
                        let mut outcome = self.upstream_response(
                            resp, &cluster, &timeouts, deadline, attempt, exhausted,
                        );
                        if let (RouterOutcome::Upstream(up), Some(cookie)) =
                            (&mut outcome, hash.set_cookie)
                        {
                            up.parts.headers.append(header::SET_COOKIE, cookie);
                        }
                        outcome
                    }
                    Err(TryFailure::Timeout) => {
                        let kind = if limit.idle_binds {
                            TimeoutKind::PerTryIdle
                        } else {
                            TimeoutKind::PerTry
                        };
                        self.timeout_reply(&cluster, &timeouts, attempt, exhausted, kind)
                    }
                    Err(failure) => self.failure(failure, &cluster, &timeouts, attempt, exhausted),
                };
            }
            // Retry: the try's response (if any) is dropped unread.
            if let Ok(resp) = &sent {
                stats.retry_response(resp.response.status().as_u16());
            }
            drop(sent);
            stats.upstream_rq_retry.inc();
            let back_off = back_off.expect("a retry has a back-off");
            match back_off {
                BackOff::Exponential(_) => stats.upstream_rq_retry_backoff_exponential.inc(),
                BackOff::RateLimited(_) => stats.upstream_rq_retry_backoff_ratelimited.inc(),
            }
            previous_hosts.push(host);
            attempt += 1;
            if within(deadline, tokio::time::sleep(back_off.delay()))
                .await
                .is_none()
            {
                return self.route_timeout(&cluster, &timeouts, attempt - 1, false);
            }
        }
    }

    /// The request's URL as a redirect sees it: the scheme of the request (else of
    /// the connection) and `x-forwarded-proto` as the connection manager sets it.
    fn request_url<'p>(
        &'p self,
        parts: &'p http::request::Parts,
    ) -> super::redirect::RequestUrl<'p> {
        let conn_scheme = if self.conn.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let forwarded_proto = match parts.headers.get(&X_FORWARDED_PROTO) {
            Some(v) if !self.conn.hcm.use_remote_address => v.to_str().unwrap_or(conn_scheme),
            _ => conn_scheme,
        };
        super::redirect::RequestUrl {
            scheme: parts.uri.scheme_str().unwrap_or(conn_scheme),
            forwarded_proto,
            host: self.authority,
            path: self.path,
        }
    }

    /// A CONNECT the route terminates (`connect_config`): a TCP connection to a
    /// host of the cluster, then the 200 that starts the tunnel over it.
    async fn terminate_connect(
        &mut self,
        upstream: &UpstreamRequest<'_>,
        timeouts: &Timeouts,
    ) -> RouterOutcome {
        use crate::upstream::outlier::{LocalOriginEvent, put_result};
        let cluster = upstream.cluster;
        let host = match upstream.choose_host(&LbContext::default()) {
            Ok(h) => h,
            Err(failure) => return self.failure(failure, cluster, timeouts, 1, false),
        };
        if let Some(r) = self.record.as_mut() {
            host.record_in(r);
        }
        match crate::upstream::connect(cluster, host.shared(), None).await {
            Ok(stream) => {
                put_result(cluster, host.shared(), LocalOriginEvent::ConnectSuccess);
                let Some(upgrade) = self.upgrade.as_mut() else {
                    unreachable!("checked by the caller");
                };
                RouterOutcome::Tunnel(upgrade.connect_response(stream))
            }
            Err(e) => {
                put_result(cluster, host.shared(), LocalOriginEvent::ConnectFailed);
                self.failure(TryFailure::Connect(e), cluster, timeouts, 1, false)
            }
        }
    }

    /// The upstream's response headers: counted, then handed to the encoder path
    /// with the route's timers on its body.
    pub(super) fn upstream_response(
        &mut self,
        resp: TryResponse,
        cluster: &LocalHandle<Cluster>,
        timeouts: &Timeouts,
        deadline: Option<Instant>,
        attempt: u32,
        exhausted: bool,
    ) -> RouterOutcome {
        let TryResponse {
            response,
            handle,
            service_time,
        } = resp;
        let (mut parts, body) = response.into_parts();
        cluster.stats.response(parts.status.as_u16());
        if exhausted && let Some(r) = self.record.as_mut() {
            r.response_flags = "URX";
        }
        if timeouts.attempt_count_in_response {
            parts
                .headers
                .insert(X_ENVOY_ATTEMPT_COUNT.clone(), HeaderValue::from(attempt));
        }
        RouterOutcome::Upstream(UpstreamResponse {
            parts,
            body: TimedBody::wrap(body, deadline.map(Into::into), timeouts.per_try_idle),
            handle,
            service_time,
        })
    }

    /// The reply when the route's timeout fired before response headers
    /// (counted in `upstream_rq_timeout`).
    pub(super) fn route_timeout(
        &mut self,
        cluster: &LocalHandle<Cluster>,
        timeouts: &Timeouts,
        attempt: u32,
        exhausted: bool,
    ) -> RouterOutcome {
        cluster.stats.upstream_rq_timeout.inc();
        self.timeout_reply(cluster, timeouts, attempt, exhausted, TimeoutKind::Route)
    }

    /// The reply when the route's timeout or the last try's fired before
    /// response headers.
    pub(super) fn timeout_reply(
        &mut self,
        cluster: &LocalHandle<Cluster>,
        timeouts: &Timeouts,
        attempt: u32,
        exhausted: bool,
        kind: TimeoutKind,
    ) -> RouterOutcome {
        let mut outcome = self.failure(TryFailure::Timeout, cluster, timeouts, attempt, exhausted);
        if let RouterOutcome::Reply(reply) = &mut outcome {
            reply.details = match kind {
                TimeoutKind::Route => "response_timeout",
                TimeoutKind::PerTry => "upstream_per_try_timeout",
                TimeoutKind::PerTryIdle => "upstream_per_try_idle_timeout",
            };
        }
        outcome
    }

    /// The local reply for a request whose last try failed, with Envoy's status,
    /// body and flags. `retried`: earlier tries were retried (Envoy then says
    /// "retried and the latest reset reason"); `exhausted`: the last failure was
    /// retriable but no retry was left (`URX`).
    pub(super) fn failure(
        &mut self,
        failure: TryFailure,
        cluster: &LocalHandle<Cluster>,
        timeouts: &Timeouts,
        attempt: u32,
        exhausted: bool,
    ) -> RouterOutcome {
        let retried = attempt > 1;
        let record = self.record.as_mut();
        let latest = if retried {
            "retried and the latest reset reason"
        } else {
            "reset reason"
        };
        let mut reply = match failure {
            TryFailure::NoHealthyUpstream => {
                LocalReply::new(503, "no healthy upstream", "UH", "no_healthy_upstream")
            }
            TryFailure::Connect(e) => {
                if let Some(r) = record {
                    r.upstream_failure = Some(e.transport_failure());
                }
                let body = format!(
                    "upstream connect error or disconnect/reset before headers. {latest}: {}",
                    e.reset_reason()
                );
                LocalReply::new(
                    503,
                    body,
                    if exhausted { "URX,UF" } else { "UF" },
                    "upstream_reset_before_response_started{connection_failure}",
                )
            }
            TryFailure::Overflow => {
                let mut reply = LocalReply::new(
                    503,
                    "upstream connect error or disconnect/reset before headers. reset reason: overflow",
                    "UO",
                    "upstream_reset_before_response_started{overflow}",
                );
                reply
                    .headers
                    .push((X_ENVOY_OVERLOADED.clone(), HeaderValue::from_static("true")));
                reply
            }
            TryFailure::DownstreamBody => {
                // The downstream request body failed (e.g. a malformed chunk): a
                // downstream protocol error, answered as Envoy's codec does.
                self.conn.hcm.stats.downstream_cx_protocol_error.inc();
                let mut reply = LocalReply::new(400, "Bad Request", "DPE", "http1.codec_error");
                reply.close_connection = true;
                return RouterOutcome::CodecError(reply);
            }
            TryFailure::Reset(e) => {
                let reason = if e.is_canceled() || e.is_incomplete_message() || e.is_closed() {
                    "connection termination"
                } else {
                    "protocol error"
                };
                if let Some(r) = record {
                    r.upstream_failure = Some(e.to_string());
                }
                let body = format!(
                    "upstream connect error or disconnect/reset before headers. {latest}: {reason}"
                );
                LocalReply::new(
                    503,
                    body,
                    if exhausted { "URX,UC" } else { "UC" },
                    "upstream_reset_before_response_started{connection_termination}",
                )
            }
            TryFailure::Timeout => {
                let status = timeouts.timeout_status;
                let body = if status == 504 {
                    "upstream request timeout"
                } else {
                    ""
                };
                LocalReply::new(
                    status,
                    body,
                    if exhausted { "URX,UT" } else { "UT" },
                    "response_timeout",
                )
            }
        };
        cluster.stats.response(reply.status.as_u16());
        if timeouts.attempt_count_in_response {
            reply
                .headers
                .push((X_ENVOY_ATTEMPT_COUNT.clone(), HeaderValue::from(attempt)));
        }
        RouterOutcome::Reply(reply)
    }
}

/// What a hedged request needs, prepared by the router (its tries run in
/// [`super::hedge`]).
pub(super) struct Hedged<'a> {
    pub cluster: &'a LocalHandle<Cluster>,
    pub upstream: &'a UpstreamRequest<'a>,
    pub timeouts: &'a Timeouts,
    pub rewrite: &'a RequestRewrite<'a>,
    pub deadline: Option<Instant>,
    pub per_try: Duration,
    pub retry: RetryState,
    pub hash: Option<u64>,
    pub set_cookie: Option<HeaderValue>,
    pub replay: Option<ReplayBuffer>,
    pub body: Option<ProxyBody>,
    pub parts: http::request::Parts,
    pub sni: Option<std::sync::Arc<str>>,
    pub include_attempt_count: bool,
    /// Where each try's request goes for the access log (None: not wanted).
    pub logged: Option<&'a SentRequest>,
}

/// The request as the route's mutations changed it, for the access log and the
/// response formatters (Envoy's read the one request map its router mutates):
/// copied from the first try sent, once per request; a later try writes only
/// what differs per try over the copy (its attempt count, expected timeout, and
/// the host `auto_host_rewrite` picked).
#[derive(Default)]
pub(super) struct SentRequest(std::cell::RefCell<Option<http::HeaderMap>>);

impl SentRequest {
    pub(super) fn capture(&self, headers: &http::HeaderMap) {
        let mut slot = self.0.borrow_mut();
        let Some(logged) = slot.as_mut() else {
            *slot = Some(headers.clone());
            return;
        };
        for name in [
            &X_ENVOY_ATTEMPT_COUNT,
            &X_ENVOY_EXPECTED_TIMEOUT,
            &header::HOST,
        ] {
            match headers.get(name) {
                Some(v) => {
                    logged.insert(name.clone(), v.clone());
                }
                None => {
                    logged.remove(name);
                }
            }
        }
    }

    fn log_into(self, record: &mut Option<Box<LogRecord>>) {
        if let (Some(headers), Some(r)) = (self.0.into_inner(), record.as_mut()) {
            r.request_headers = Some(headers);
        }
    }
}

/// A copy of a request's head for one try (the body is the try's own).
pub(super) fn clone_head(p: &http::request::Parts) -> http::request::Parts {
    let mut req = http::Request::new(());
    *req.method_mut() = p.method.clone();
    *req.uri_mut() = p.uri.clone();
    *req.version_mut() = p.version;
    *req.headers_mut() = p.headers.clone();
    // The case the names came with (preserve_case) is every try's.
    if let Some(case) = p.extensions.get::<crate::http::header_case::RecordedCase>() {
        req.extensions_mut().insert(case.clone());
    }
    // Every try may open the client's `100 Continue` (proxy_100_continue).
    if let Some(gate) = p
        .extensions
        .get::<std::sync::Arc<crate::upstream::ContinueGate>>()
    {
        req.extensions_mut().insert(gate.clone());
    }
    req.into_parts().0
}

/// `fut`, unless `deadline` passes first (None).
pub(super) async fn within<F: std::future::Future>(
    deadline: Option<Instant>,
    fut: F,
) -> Option<F::Output> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d.into(), fut).await.ok(),
        None => Some(fut.await),
    }
}

/// The timeouts of one request (Envoy's `FilterUtility::finalTimeout`): the
/// route's, or an internal request's `x-envoy-upstream-rq-timeout-ms`; the per-try timeouts of
/// the retry policy or `x-envoy-upstream-rq-per-try-timeout-ms`.
pub(crate) struct Timeouts {
    /// Until the whole response is received (None: no limit).
    pub global: Option<Duration>,
    pub per_try: Option<Duration>,
    pub per_try_idle: Option<Duration>,
    /// 504, or 204 with `x-envoy-upstream-rq-timeout-alt-response`.
    pub timeout_status: u16,
    pub attempt_count_in_response: bool,
    /// `hedge_on_per_try_timeout` (the route's hedge policy, or an internal
    /// request's `x-envoy-hedge-on-per-try-timeout`).
    pub hedge: bool,
    /// Whether the timeouts differ from the route's own (the precomputed
    /// `x-envoy-expected-rq-timeout-ms` then does not apply).
    from_request: bool,
    /// A gRPC request's timeout came from `max_grpc_timeout` and its `grpc-timeout`.
    grpc: bool,
}

/// Which timeout ended a request (its reply's details).
#[derive(Clone, Copy)]
pub(super) enum TimeoutKind {
    Route,
    PerTry,
    PerTryIdle,
}

/// How long one try may wait for response headers, and which limit that is.
struct TryLimit {
    wait: Option<Duration>,
    /// A per-try limit is shorter than what is left of the route's.
    per_try_binds: bool,
    /// ... and it is the per-try idle timeout.
    idle_binds: bool,
}

impl Timeouts {
    /// `envoy_headers`: the request has some `x-envoy-*` header.
    fn of(action: &ForwardAction, headers: &mut http::HeaderMap, envoy_headers: bool) -> Self {
        let policy = action.retry_policy.as_deref();
        let mut global = action.timeout;
        // A gRPC request's own timeout under the deprecated max_grpc_timeout.
        let grpc_timeout = action
            .grpc_timeout
            .filter(|_| crate::router::route_match::is_grpc_content_type(headers));
        if let Some(g) = grpc_timeout {
            global = g.timeout(
                headers
                    .get(&crate::http::headers::GRPC_TIMEOUT)
                    .and_then(|v| v.to_str().ok())
                    .and_then(crate::http::headers::parse_grpc_timeout),
            );
        }
        let mut per_try = policy.and_then(|p| p.per_try_timeout);
        if !envoy_headers {
            if let (Some(p), Some(g)) = (per_try, global)
                && p >= g
            {
                per_try = None;
            }
            let hedge = action.hedge_policy.on_per_try_timeout;
            return Timeouts {
                global,
                per_try,
                per_try_idle: policy.and_then(|p| p.per_try_idle_timeout),
                timeout_status: 504,
                attempt_count_in_response: action.include_attempt_count_in_response,
                hedge,
                from_request: (per_try.is_some() && !hedge) || grpc_timeout.is_some(),
                grpc: grpc_timeout.is_some(),
            };
        }
        let mut from_request = grpc_timeout.is_some();
        if let Some(ms) = take_millis(headers, &X_ENVOY_UPSTREAM_RQ_TIMEOUT_MS) {
            global = (ms > 0).then(|| Duration::from_millis(ms));
            from_request = true;
        }
        if let Some(ms) = take_millis(headers, &X_ENVOY_UPSTREAM_RQ_PER_TRY_TIMEOUT_MS) {
            per_try = (ms > 0).then(|| Duration::from_millis(ms));
            from_request = true;
        }
        if let (Some(p), Some(g)) = (per_try, global)
            && p >= g
        {
            per_try = None;
        }
        let alt = headers
            .remove(&X_ENVOY_UPSTREAM_RQ_TIMEOUT_ALT_RESPONSE)
            .is_some();
        let hedge = match headers.remove(&X_ENVOY_HEDGE_ON_PER_TRY_TIMEOUT) {
            Some(v) if v == "true" => true,
            Some(v) if v == "false" => false,
            _ => action.hedge_policy.on_per_try_timeout,
        };
        Timeouts {
            global,
            per_try,
            per_try_idle: policy.and_then(|p| p.per_try_idle_timeout),
            timeout_status: if alt { 204 } else { 504 },
            attempt_count_in_response: action.include_attempt_count_in_response,
            hedge,
            from_request: from_request || (per_try.is_some() && !hedge),
            grpc: grpc_timeout.is_some(),
        }
    }

    /// `x-envoy-expected-rq-timeout-ms`: the per-try timeout, else the route's
    /// (when hedging, the route's: a try may outlive its per-try timeout).
    fn expected_header(&self, action: &ForwardAction) -> Option<HeaderValue> {
        if !self.from_request {
            return action.expected_timeout.clone();
        }
        let per_try = if self.hedge { None } else { self.per_try };
        per_try
            .or(self.global)
            .map(|t| HeaderValue::from(t.as_millis() as u64))
    }

    /// `x-envoy-expected-rq-timeout-ms` for a retry (Envoy's `setTimeoutHeaders`
    /// with the time elapsed): the first try's value, capped by what is left of
    /// the route's timeout (at least 1 ms). None: the first try's value stands.
    pub(super) fn expected_for_retry(&self, deadline: Option<Instant>) -> Option<HeaderValue> {
        let (global, deadline) = (self.global?, deadline?);
        let expected = match self.per_try {
            Some(p) if !self.hedge => p,
            _ => global,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = expected.min(left).as_millis().max(1) as u64;
        Some(HeaderValue::from(ms))
    }

    fn for_try(&self, deadline: Option<Instant>) -> TryLimit {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let own = match (self.per_try, self.per_try_idle) {
            (Some(a), Some(b)) => Some((a.min(b), b < a)),
            (Some(a), None) => Some((a, false)),
            (None, Some(b)) => Some((b, true)),
            (None, None) => None,
        };
        match (own, left) {
            (Some((t, idle)), Some(l)) if t < l => TryLimit {
                wait: Some(t),
                per_try_binds: true,
                idle_binds: idle,
            },
            (Some((t, idle)), None) => TryLimit {
                wait: Some(t),
                per_try_binds: true,
                idle_binds: idle,
            },
            (_, left) => TryLimit {
                wait: left,
                per_try_binds: false,
                idle_binds: false,
            },
        }
    }
}

fn take_millis(headers: &mut http::HeaderMap, name: &http::HeaderName) -> Option<u64> {
    let v = headers.remove(name)?;
    v.to_str().ok()?.trim().parse().ok()
}

/// The upstream `Host` of a request, decided once before its tries: a picked
/// weighted cluster's `host_rewrite_literal`, then the route's literal, header
/// or path-regex rewrite (Envoy's `finalizeRequestHeaders`); `auto_host_rewrite`
/// waits for the host each try picks.
struct HostEdit<'a> {
    authority: Cow<'a, str>,
    /// The authority differs from the request's.
    changed: bool,
    /// The host to append to `x-forwarded-host` (`append_x_forwarded_host`).
    forwarded_host: Option<Cow<'a, str>>,
    auto: bool,
}

impl<'a> HostEdit<'a> {
    fn of(
        action: &'a ForwardAction,
        cluster_rewrite: Option<&'a str>,
        authority: &'a str,
        headers: &http::HeaderMap,
        path: &str,
    ) -> Self {
        let mut edit = HostEdit {
            authority: Cow::Borrowed(cluster_rewrite.unwrap_or(authority)),
            changed: cluster_rewrite.is_some(),
            forwarded_host: None,
            auto: false,
        };
        let new: Option<Cow<'a, str>> = match action.host_rewrite.as_deref() {
            None => None,
            Some(HostRewrite::Literal(h)) => Some(Cow::Borrowed(h.as_str())),
            Some(HostRewrite::Header(name)) => headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(|v| Cow::Owned(v.to_string())),
            Some(HostRewrite::PathRegex(re)) => {
                Some(Cow::Owned(re.replace_all(super::redirect::path_only(path))))
            }
            Some(HostRewrite::Auto) => {
                edit.auto = true;
                None
            }
        };
        if let Some(new) = new {
            let old = std::mem::replace(&mut edit.authority, new);
            edit.changed = true;
            if action.append_x_forwarded_host && !old.is_empty() {
                edit.forwarded_host = Some(old);
            }
        }
        edit
    }
}

/// Appends `host` to `x-forwarded-host` unless it is already its last value
/// (Envoy's idempotent `updateAuthority`).
fn append_forwarded_host(headers: &mut http::HeaderMap, host: &str) {
    let value = match headers.get(&X_FORWARDED_HOST).and_then(|v| v.to_str().ok()) {
        Some(xfh) if !xfh.is_empty() => {
            if xfh.rsplit(',').next() == Some(host) {
                return;
            }
            format!("{xfh},{host}")
        }
        _ => host.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(X_FORWARDED_HOST.clone(), v);
    }
}

/// The edits Envoy makes to a request for its upstream.
pub(super) struct RequestRewrite<'a> {
    action: &'a ForwardAction,
    matched: &'a PathMatch,
    host: HostEdit<'a>,
    path: &'a str,
    /// The downstream TLS session (client cert details). `x-forwarded-for` and
    /// `x-forwarded-proto` are the connection manager's (http/internal_request.rs).
    downstream_tls: Option<&'a crate::tls::PeerTls>,
    /// `forward_client_cert_details` and `set_current_client_cert_details`.
    xfcc: (
        crate::config::ForwardClientCert,
        crate::config::ClientCertDetails,
    ),
    /// Whether the upstream connection is TLS (the HTTP/2 `:scheme`).
    upstream_tls: bool,
    /// `x-envoy-expected-rq-timeout-ms`.
    expected_timeout: Option<HeaderValue>,
    /// A gRPC request under `max_grpc_timeout`: its `grpc-timeout` is rewritten to
    /// the expected timeout, as Envoy's `setTimeoutHeaders` does.
    grpc_timeout_rewrite: bool,
    /// The route's `request_headers_to_add` and kin (Envoy's `finalizeRequestHeaders`).
    mutations: Option<super::header_mutation::RequestMutations<'a>>,
}

impl RequestRewrite<'_> {
    /// [`Self::apply`] for a try, with the try's own expected timeout (a retry's).
    pub(super) fn apply_for_try(
        &self,
        req: &mut http::request::Parts,
        h2_upstream: bool,
        hostname: &str,
        expected_timeout: Option<HeaderValue>,
    ) {
        self.apply(req, h2_upstream, hostname);
        if let Some(v) = expected_timeout {
            self.set_expected_timeout(&mut req.headers, v);
        }
    }

    /// `x-envoy-expected-rq-timeout-ms`, and a gRPC request's `grpc-timeout` with it
    /// under `max_grpc_timeout`.
    fn set_expected_timeout(&self, headers: &mut http::HeaderMap, ms: HeaderValue) {
        if self.grpc_timeout_rewrite {
            let mut grpc = Vec::with_capacity(ms.len() + 1);
            grpc.extend_from_slice(ms.as_bytes());
            grpc.push(b'm');
            if let Ok(v) = HeaderValue::from_bytes(&grpc) {
                headers.insert(crate::http::headers::GRPC_TIMEOUT.clone(), v);
            }
        }
        headers.insert(X_ENVOY_EXPECTED_TIMEOUT.clone(), ms);
    }

    /// Edits the request in place; touches the URI and `Host` only when something
    /// changes (a rewrite, or the protocol's form of the target). `hostname`: the
    /// picked host's (for `auto_host_rewrite`; "" for none).
    pub(super) fn apply(&self, req: &mut http::request::Parts, h2_upstream: bool, hostname: &str) {
        let action = self.action;
        let path = self.path;
        let new_path = match (&action.path_rewrite, self.matched) {
            (Some(rw), matched) => super::redirect::rewrite_path(rw, matched, path),
            // `path_rewrite_policy`: the URI template's variables put in place.
            (None, PathMatch::Template(template)) => template.rewrite(path),
            (None, _) => None,
        };
        let auto = self.host.auto && !hostname.is_empty();
        let (authority, host_changed) = if auto {
            (hostname, true)
        } else {
            (self.host.authority.as_ref(), self.host.changed)
        };
        let headers = &mut req.headers;
        strip_hop_by_hop(headers);
        forward_client_cert(headers, self.xfcc.0, self.xfcc.1, self.downstream_tls);
        if let Some(expected) = &self.expected_timeout {
            self.set_expected_timeout(headers, expected.clone());
        }
        // After the headers the connection manager and the router's timeouts add
        // (a mutation may remove them), before the path and host rewrites.
        if let Some(m) = &self.mutations {
            m.apply(headers, &req.method, req.version);
        }
        if let Some(old) = &self.host.forwarded_host {
            append_forwarded_host(headers, old);
        } else if auto && action.append_x_forwarded_host && !self.host.authority.is_empty() {
            append_forwarded_host(headers, &self.host.authority);
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
                .scheme(if self.upstream_tls { "https" } else { "http" })
                .authority(authority)
                .path_and_query(final_path)
                .build()
            {
                req.uri = uri;
            }
        } else {
            // An HTTP/1.1 request already carries Host unless it came over HTTP/2.
            if (host_changed || !headers.contains_key(header::HOST))
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sent_request_is_copied_once_then_takes_each_try_s_own_headers() {
        let sent = SentRequest::default();
        let mut first = http::HeaderMap::new();
        first.insert("x-added", HeaderValue::from_static("by-route"));
        first.insert(X_ENVOY_ATTEMPT_COUNT.clone(), HeaderValue::from(1));
        first.insert(X_ENVOY_EXPECTED_TIMEOUT.clone(), HeaderValue::from(5000));
        sent.capture(&first);
        let mut retry = first.clone();
        retry.insert(X_ENVOY_ATTEMPT_COUNT.clone(), HeaderValue::from(2));
        retry.remove(&X_ENVOY_EXPECTED_TIMEOUT);
        retry.insert("x-other", HeaderValue::from_static("not copied again"));
        sent.capture(&retry);
        let mut record = Some(Box::new(LogRecord::default()));
        sent.log_into(&mut record);
        let logged = record.unwrap().request_headers.unwrap();
        assert_eq!(logged["x-added"], "by-route");
        assert_eq!(logged[&X_ENVOY_ATTEMPT_COUNT], "2");
        assert!(!logged.contains_key(&X_ENVOY_EXPECTED_TIMEOUT));
        assert!(!logged.contains_key("x-other"));
    }
}
