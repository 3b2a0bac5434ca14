//! The router filter (Envoy's `Router::Filter`), the terminal filter of every HTTP
//! filter chain: route → cluster → upstream request, the request headers Envoy
//! writes for the upstream, and the local replies for what goes wrong on the way.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http::header::{self, HeaderValue};
use hyper::body::Incoming;

use super::upstream_request::{TryFailure, TryResponse, UpstreamHandle, UpstreamRequest};
use crate::access_log::LogRecord;
use crate::config::{ForwardAction, PathMatch, RouteAction, RouteEntry};
use crate::http::body::ProxyBody;
use crate::http::connection::DownstreamConnection;
use crate::http::headers::{
    X_ENVOY_EXPECTED_TIMEOUT, X_ENVOY_ORIGINAL_PATH, X_ENVOY_OVERLOADED, X_FORWARDED_FOR,
    X_FORWARDED_PROTO, forward_client_cert, strip_hop_by_hop,
};
use crate::http::local_reply::LocalReply;
use crate::per_worker::LocalHandle;
use crate::router::RouteTable;
use crate::upstream::lb::LbContext;

/// How the router ended its part of a request.
pub(crate) enum RouterOutcome {
    /// A reply of the router's own; the encoder filters see it.
    Reply(LocalReply),
    /// The downstream request was malformed mid-body: replied to as Envoy's codec
    /// does, without the encoder filters.
    CodecError(LocalReply),
    /// The upstream's response headers; its body is still to stream.
    Upstream(UpstreamResponse),
}

pub(crate) struct UpstreamResponse {
    pub parts: http::response::Parts,
    pub body: Incoming,
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
    /// The table `route` came from (its cluster slots index the connection's
    /// cluster handles).
    pub routes: &'r LocalHandle<RouteTable>,
    pub authority: &'r str,
    pub path: &'r str,
}

impl Router<'_, '_> {
    /// Routes the request (after the decoder filters; `chosen_cluster` is a
    /// filter's choice) and sends it upstream.
    pub async fn decode(
        self,
        route: Option<&RouteEntry>,
        parts: http::request::Parts,
        body: ProxyBody,
        chosen_cluster: Option<&str>,
    ) -> RouterOutcome {
        let conn = self.conn.clone();
        let hcm = &conn.hcm;
        let stats = &hcm.stats;
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
            RouteAction::Direct { status, body } => {
                stats.rq_direct_response.inc();
                let body = body.clone().map(Bytes::from).unwrap_or_default();
                return RouterOutcome::Reply(LocalReply::new(
                    *status,
                    body,
                    "-",
                    "direct_response",
                ));
            }
            RouteAction::Forward(f) => f,
        };
        stats.rq_total.inc();
        let cluster = match chosen_cluster {
            Some(name) => hcm.clusters.get(name).map(LocalHandle::new),
            None => conn.cluster_for(self.routes, action),
        };
        let Some(cluster) = cluster else {
            stats.no_cluster.inc();
            return RouterOutcome::Reply(LocalReply::new(
                503,
                Bytes::new(),
                "NC",
                "cluster_not_found",
            ));
        };
        if let Some(r) = self.record.as_mut() {
            r.upstream_cluster = Some(cluster.name.clone());
        }
        let upstream = UpstreamRequest {
            cluster: &cluster,
            pools: &conn.pools,
        };
        let host = match upstream.choose_host(&LbContext::default()) {
            Ok(h) => h,
            Err(failure) => return self.failure(failure),
        };
        let body = match body {
            ProxyBody::Stream(b) if self.record.is_some() => {
                ProxyBody::Counted(b, self.bytes_received.clone())
            }
            other => other,
        };
        if let Some(r) = self.record.as_mut() {
            r.upstream_host = Some(host.address);
        }
        let (authority, path) = (self.authority, self.path);
        let rewrite = RequestRewrite {
            action,
            matched: &route.path_match,
            authority,
            path,
            forwarded_for: hcm.use_remote_address.then_some(conn.peer),
            downstream_tls: conn.tls.as_deref(),
            xfcc: (hcm.forward_client_cert, hcm.client_cert_details),
            upstream_tls: upstream.cluster.tls.is_some(),
        };
        // TLS with auto_sni names the host the request goes to (after any rewrite).
        let sni =
            upstream.cluster.tls.as_ref().and_then(|tls| {
                tls.sni_for(Some(action.host_rewrite.as_deref().unwrap_or(authority)))
            });
        let sent = upstream
            .send(&host, sni, parts, body, action.timeout, |p, h2| {
                rewrite.apply(p, h2)
            })
            .await;
        match sent {
            Ok(TryResponse {
                response,
                handle,
                service_time,
            }) => {
                let (parts, body) = response.into_parts();
                RouterOutcome::Upstream(UpstreamResponse {
                    parts,
                    body,
                    handle,
                    service_time,
                })
            }
            Err(failure) => self.failure(failure),
        }
    }

    /// The local reply for a failed try, with Envoy's status, body and flags.
    fn failure(self, failure: TryFailure) -> RouterOutcome {
        let record = self.record.as_mut();
        let reply = match failure {
            TryFailure::NoHealthyUpstream => {
                LocalReply::new(503, "no healthy upstream", "UH", "no_healthy_upstream")
            }
            TryFailure::Connect(e) => {
                if let Some(r) = record {
                    r.upstream_failure = Some(e.transport_failure());
                }
                let body = format!(
                    "upstream connect error or disconnect/reset before headers. reset reason: {}",
                    e.reset_reason()
                );
                LocalReply::new(
                    503,
                    body,
                    "UF",
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
                    "upstream connect error or disconnect/reset before headers. reset reason: {reason}"
                );
                LocalReply::new(
                    503,
                    body,
                    "UC",
                    "upstream_reset_before_response_started{connection_termination}",
                )
            }
            TryFailure::Timeout => LocalReply::new(
                504,
                "upstream request timeout",
                "UT",
                "upstream_response_timeout",
            ),
        };
        RouterOutcome::Reply(reply)
    }
}

/// The edits Envoy makes to a request for its upstream.
struct RequestRewrite<'a> {
    action: &'a ForwardAction,
    matched: &'a PathMatch,
    authority: &'a str,
    path: &'a str,
    /// The downstream peer, appended to `x-forwarded-for` (`use_remote_address`).
    forwarded_for: Option<SocketAddr>,
    /// The downstream TLS session (`x-forwarded-proto: https`, client cert details).
    downstream_tls: Option<&'a crate::tls::PeerTls>,
    /// `forward_client_cert_details` and `set_current_client_cert_details`.
    xfcc: (
        crate::config::ForwardClientCert,
        crate::config::ClientCertDetails,
    ),
    /// Whether the upstream connection is TLS (the HTTP/2 `:scheme`).
    upstream_tls: bool,
}

impl RequestRewrite<'_> {
    /// Edits the request in place; touches the URI and `Host` only when something
    /// changes (a rewrite, or the protocol's form of the target).
    fn apply(&self, req: &mut http::request::Parts, h2_upstream: bool) {
        let action = self.action;
        let path = self.path;
        let new_path = match (&action.prefix_rewrite, self.matched) {
            (Some(rewrite), PathMatch::Prefix(prefix)) if path.len() >= prefix.len() => {
                Some(format!("{rewrite}{}", &path[prefix.len()..]))
            }
            _ => None,
        };
        let authority = action.host_rewrite.as_deref().unwrap_or(self.authority);
        let headers = &mut req.headers;
        strip_hop_by_hop(headers);
        // Envoy writes the downstream scheme at the edge (use_remote_address),
        // elsewhere only when the header is absent.
        if self.forwarded_for.is_some() || !headers.contains_key(&X_FORWARDED_PROTO) {
            let scheme = if self.downstream_tls.is_some() {
                "https"
            } else {
                "http"
            };
            headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(scheme));
        }
        forward_client_cert(headers, self.xfcc.0, self.xfcc.1, self.downstream_tls);
        if let Some(peer) = self.forwarded_for {
            let peer = peer.ip().to_string();
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
                .scheme(if self.upstream_tls { "https" } else { "http" })
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
}
