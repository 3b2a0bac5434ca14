//! One request's run through its connection manager's filters: the connection
//! manager's side of [`super::filter`] (timeouts, buffering with Envoy's limits, and
//! the local replies for failures).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{HeaderMap, Request};
use http_body::Body;
use http_body_util::BodyExt;

use super::body::{PeerBody, ProxyBody};
use super::connection_manager::HcmStats;
use super::filter::{
    FilterChain, FilterPlan, FilterStream, HookCall, HookOutcome, HookReply, Hooks, Phase, PlanRef,
    RouteFilterConfigs, StreamStart,
};
use super::local_reply::LocalReply;
use crate::config::RouteAction;

/// Why a buffering step ends the request: a reply of the proxy's own, or a hook's outcome.
pub(crate) enum Rejection {
    Reply(LocalReply),
    Outcome(HookOutcome),
}

/// A request the request hooks let through.
pub(crate) struct PassedRequest {
    /// The body to send upstream: the downstream stream, or the buffered body.
    pub body: ProxyBody,
    /// The cluster the filters chose (None: the route's).
    pub cluster: Option<String>,
    /// The downstream body's length, when it was buffered.
    pub bytes_received: Option<u64>,
}

pub(crate) struct RequestFilters {
    chain: Arc<dyn FilterChain>,
    pub stream: Arc<dyn FilterStream>,
    pub hooks: Hooks,
    timeout: Duration,
    max_request_bytes: usize,
    max_response_bytes: usize,
}

impl RequestFilters {
    /// None when no filter is active on the route.
    pub fn start(
        chain: &Arc<dyn FilterChain>,
        configs: RouteFilterConfigs<'_>,
        req: &Request<PeerBody>,
        authority: &str,
        path: &str,
        peer: SocketAddr,
        tls: Option<&Arc<crate::tls::PeerTls>>,
    ) -> Option<RequestFilters> {
        let plan_ref = FilterPlan::for_request(chain.as_ref(), configs)?;
        let RouteFilterConfigs { route, weighted } = configs;
        let (plan, active) = match &plan_ref {
            PlanRef::Default => (chain.default_plan()?, None),
            PlanRef::Route(p) => (&**p, Some(p.active.clone())),
        };
        let cluster = route.and_then(|r| match &r.action {
            RouteAction::Forward(f) => Some(match weighted.and_then(|w| w.name.as_ref()) {
                Some(name) => name.clone(),
                None => f.cluster.clone(),
            }),
            RouteAction::Direct { .. } => None,
        });
        let stream = chain.start(StreamStart {
            method: req.method().clone(),
            path: path.to_string(),
            authority: authority.to_string(),
            scheme: if tls.is_some() { "https" } else { "http" },
            downstream: peer,
            tls: tls.cloned(),
            route_name: route.map(|r| r.name.clone()),
            cluster,
            active,
            hooks: plan.hooks,
            request_headers: (!plan.hooks.has(Phase::RequestHeaders))
                .then(|| req.headers().clone()),
        });
        Some(RequestFilters {
            chain: chain.clone(),
            stream,
            hooks: plan.hooks,
            timeout: plan.timeout,
            max_request_bytes: plan.max_request_bytes,
            max_response_bytes: plan.max_response_bytes,
        })
    }

    /// The request hooks: headers, then (buffered) body and trailers. `Err` is the
    /// reply that ends the request.
    pub async fn on_request(
        &self,
        parts: &mut http::request::Parts,
        body: PeerBody,
        stats: &HcmStats,
    ) -> Result<PassedRequest, LocalReply> {
        let mut passed = PassedRequest {
            body: ProxyBody::Empty,
            cluster: None,
            bytes_received: None,
        };
        if self.hooks.has(Phase::RequestHeaders) {
            let headers = std::mem::take(&mut parts.headers);
            match self
                .run(Phase::RequestHeaders, Some(headers), 0, None)
                .await
            {
                HookOutcome::Continue {
                    headers, cluster, ..
                } => {
                    parts.headers = headers.unwrap_or_default();
                    passed.cluster = cluster;
                }
                other => return Err(self.local_reply(other, stats)),
            }
        }
        if !self.hooks.buffers_request() {
            passed.body = ProxyBody::Stream(body);
        } else if let Err(rejection) = self.buffer_request(parts, body, &mut passed).await {
            return Err(self.local_reply_or(rejection, stats));
        }
        Ok(passed)
    }

    /// The response hooks: headers, then (buffered) body and trailers. `Err` is the
    /// reply that replaces the response.
    pub async fn on_response(
        &self,
        parts: &mut http::response::Parts,
        body: ProxyBody,
        status: u16,
        head_request: bool,
        stats: &HcmStats,
    ) -> Result<ProxyBody, LocalReply> {
        if self.hooks.has(Phase::ResponseHeaders) {
            let headers = std::mem::take(&mut parts.headers);
            match self
                .run(Phase::ResponseHeaders, Some(headers), status, None)
                .await
            {
                HookOutcome::Continue { headers, .. } => {
                    parts.headers = headers.unwrap_or_default();
                }
                other => return Err(self.local_reply(other, stats)),
            }
        }
        if !self.hooks.buffers_response() {
            return Ok(body);
        }
        self.buffer_response(parts, body, status, head_request)
            .await
            .map_err(|rejection| self.local_reply_or(rejection, stats))
    }

    /// Runs one phase's hooks; past the phase's timeout the outcome is `TimedOut`
    /// (whatever the hook still does later is ignored).
    pub async fn run(
        &self,
        phase: Phase,
        headers: Option<HeaderMap>,
        status: u16,
        body: Option<Bytes>,
    ) -> HookOutcome {
        self.run_with(phase, headers, None, status, body).await
    }

    /// [`Self::run`] for body and trailers phases, with the message's headers.
    pub async fn run_with(
        &self,
        phase: Phase,
        headers: Option<HeaderMap>,
        message_headers: Option<HeaderMap>,
        status: u16,
        body: Option<Bytes>,
    ) -> HookOutcome {
        let (reply, answer) = HookReply::channel();
        let call = HookCall {
            phase,
            headers,
            message_headers,
            status,
            body,
        };
        self.stream.clone().call(call, reply);
        tokio::time::timeout(self.timeout, answer)
            .await
            .unwrap_or(HookOutcome::TimedOut)
    }

    /// The reply for an outcome that ends the request (anything but `Continue`).
    pub fn local_reply(&self, outcome: HookOutcome, stats: &HcmStats) -> LocalReply {
        match outcome {
            HookOutcome::LocalReply {
                status,
                headers,
                body,
            } => {
                let mut reply = LocalReply::new(status, body, "-", "python_filter_response");
                reply.headers = headers;
                reply
            }
            HookOutcome::Failed { filter } => {
                stats.python_errors.inc();
                let status = self
                    .chain
                    .filters()
                    .iter()
                    .find(|f| f.name == filter)
                    .map_or(500, |f| f.settings.error_status);
                LocalReply::new(status, "python filter error", "-", "python_filter_error")
            }
            HookOutcome::TimedOut => {
                stats.python_timeouts.inc();
                LocalReply::new(504, "python filter timeout", "-", "python_filter_timeout")
            }
            HookOutcome::Continue { .. } => {
                // Not an ending; callers match Continue first. Fail closed.
                stats.python_errors.inc();
                LocalReply::new(500, "python filter error", "-", "python_filter_error")
            }
        }
    }

    fn local_reply_or(&self, rejection: Rejection, stats: &HcmStats) -> LocalReply {
        match rejection {
            Rejection::Reply(reply) => reply,
            Rejection::Outcome(outcome) => self.local_reply(outcome, stats),
        }
    }

    /// Buffers the request body (up to the limit: 413 past it, as Envoy's buffer
    /// limit answers), runs the body and trailers hooks; `passed` gets the body to
    /// send, its received length and the cluster the hooks chose.
    async fn buffer_request(
        &self,
        parts: &mut http::request::Parts,
        body: PeerBody,
        passed: &mut PassedRequest,
    ) -> Result<(), Rejection> {
        let cluster = &mut passed.cluster;
        let too_large = || {
            Rejection::Reply(LocalReply::new(
                413,
                "Payload Too Large",
                "-",
                "request_payload_too_large",
            ))
        };
        if declared_length(&parts.headers).is_some_and(|n| n > self.max_request_bytes) {
            return Err(too_large());
        }
        let (mut data, mut trailers) = match collect(body, self.max_request_bytes).await {
            Ok(collected) => collected,
            Err(CollectError::TooLarge) => return Err(too_large()),
            Err(CollectError::Body) => {
                return Err(Rejection::Reply(LocalReply::new(
                    400,
                    "Bad Request",
                    "DPE",
                    "http1.codec_error",
                )));
            }
        };
        let len_received = data.len() as u64;
        if self.hooks.has(Phase::RequestBody) {
            match self.run(Phase::RequestBody, None, 0, Some(data)).await {
                HookOutcome::Continue {
                    body, cluster: c, ..
                } => {
                    data = body.unwrap_or_default();
                    *cluster = c;
                }
                other => return Err(Rejection::Outcome(other)),
            }
        }
        if let Some(t) = trailers.take() {
            trailers = Some(if self.hooks.has(Phase::RequestTrailers) {
                match self.run(Phase::RequestTrailers, Some(t), 0, None).await {
                    HookOutcome::Continue {
                        headers,
                        cluster: c,
                        ..
                    } => {
                        *cluster = c;
                        headers.unwrap_or_default()
                    }
                    other => return Err(Rejection::Outcome(other)),
                }
            } else {
                t
            });
        }
        // A request that had no body (a GET) is not given `content-length: 0`.
        let had_body = parts.headers.contains_key(header::CONTENT_LENGTH)
            || parts.headers.contains_key(header::TRANSFER_ENCODING);
        if had_body || !data.is_empty() || trailers.is_some() {
            set_length(&mut parts.headers, data.len(), trailers.is_some());
        }
        passed.body = ProxyBody::Buffered(Some(data), trailers);
        passed.bytes_received = Some(len_received);
        Ok(())
    }

    /// Buffers the upstream response body (500 past the limit, as Envoy answers when
    /// a response it must buffer is too large), runs the body and trailers hooks.
    async fn buffer_response(
        &self,
        parts: &mut http::response::Parts,
        body: ProxyBody,
        status: u16,
        head_request: bool,
    ) -> Result<ProxyBody, Rejection> {
        let too_large = || {
            Rejection::Reply(LocalReply::new(
                500,
                "Internal Server Error",
                "-",
                "response_payload_too_large",
            ))
        };
        if declared_length(&parts.headers).is_some_and(|n| n > self.max_response_bytes) {
            return Err(too_large());
        }
        let (mut data, mut trailers) = match collect(body, self.max_response_bytes).await {
            Ok(collected) => collected,
            Err(CollectError::TooLarge) => return Err(too_large()),
            Err(CollectError::Body) => {
                return Err(Rejection::Reply(LocalReply::new(
                    503,
                    "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
                    "UC",
                    "upstream_reset_before_response_started{connection_termination}",
                )));
            }
        };
        let snapshot = || (!self.hooks.has(Phase::ResponseHeaders)).then(|| parts.headers.clone());
        if self.hooks.has(Phase::ResponseBody) {
            let call = self.run_with(Phase::ResponseBody, None, snapshot(), status, Some(data));
            match call.await {
                HookOutcome::Continue { body, .. } => data = body.unwrap_or_default(),
                other => return Err(Rejection::Outcome(other)),
            }
        }
        if let Some(t) = trailers.take() {
            trailers = Some(if self.hooks.has(Phase::ResponseTrailers) {
                let call =
                    self.run_with(Phase::ResponseTrailers, Some(t), snapshot(), status, None);
                match call.await {
                    HookOutcome::Continue { headers, .. } => headers.unwrap_or_default(),
                    other => return Err(Rejection::Outcome(other)),
                }
            } else {
                t
            });
        }
        // Responses that never have a body keep their framing headers: a HEAD
        // response's length is the GET's, 204 and 304 carry none of their own.
        if !(head_request || status == 204 || status == 304) {
            set_length(&mut parts.headers, data.len(), trailers.is_some());
        }
        Ok(ProxyBody::Buffered(Some(data), trailers))
    }
}

enum CollectError {
    TooLarge,
    Body,
}

/// The whole body and its trailers, or an error as soon as it passes `limit` bytes.
async fn collect<B>(mut body: B, limit: usize) -> Result<(Bytes, Option<HeaderMap>), CollectError>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut buf = BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| CollectError::Body)?;
        match frame.into_data() {
            Ok(data) => {
                if buf.len() + data.len() > limit {
                    return Err(CollectError::TooLarge);
                }
                buf.extend_from_slice(&data);
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    Ok((buf.freeze(), trailers))
}

fn declared_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// A buffered body is sent with its length, or chunked when trailers follow it.
fn set_length(headers: &mut HeaderMap, len: usize, trailers: bool) {
    headers.remove(header::TRANSFER_ENCODING);
    if trailers {
        headers.remove(header::CONTENT_LENGTH);
    } else {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
}
