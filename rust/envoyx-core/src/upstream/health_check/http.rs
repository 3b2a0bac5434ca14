//! The HTTP checker (Envoy's `HttpHealthCheckerImpl`): a request to `path`; a
//! status in `expected_statuses` passes (degraded with `x-envoy-degraded`).

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::{FailureType, Outcome};
use crate::config::health_check::HttpHealthCheck;
use crate::http::headers::{
    X_ENVOY_DEGRADED, X_ENVOY_IMMEDIATE_HEALTH_CHECK_FAIL, X_ENVOY_UPSTREAM_HEALTHCHECKED_CLUSTER,
};
use crate::stats::Counter;
use crate::upstream::cluster::{Cluster, Host, health_flag};

/// An open checking connection (HTTP/1.1 or HTTP/2, by `codec_client_type`).
pub(super) enum Conn {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

impl Conn {
    /// Opens a connection to `host`; None when it cannot be had.
    pub(super) async fn open(cluster: &Cluster, host: &Host, h2: bool) -> Option<Conn> {
        let io = TokioIo::new(super::open(cluster, host.address).await.ok()?);
        if h2 {
            let (sender, conn) = http2::handshake(TokioExecutor::new(), io).await.ok()?;
            tokio::spawn(conn);
            Some(Conn::H2(sender))
        } else {
            let (sender, conn) = http1::handshake(io).await.ok()?;
            tokio::spawn(conn);
            Some(Conn::H1(sender))
        }
    }

    /// The host closed it while idle: Envoy just opens a new one (no failure).
    pub(super) fn is_closed(&self) -> bool {
        match self {
            Conn::H1(s) => s.is_closed(),
            Conn::H2(s) => s.is_closed(),
        }
    }

    fn is_h2(&self) -> bool {
        matches!(self, Conn::H2(_))
    }

    /// Sends one request; the response headers, or None when the connection failed.
    pub(super) async fn send(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> Option<http::Response<hyper::body::Incoming>> {
        match self {
            Conn::H1(s) => {
                s.ready().await.ok()?;
                s.send_request(req).await.ok()
            }
            Conn::H2(s) => {
                s.ready().await.ok()?;
                s.send_request(req).await.ok()
            }
        }
    }
}

/// The `Host` / `:authority` of checks: the configured one, else the cluster's name.
pub(super) fn authority<'a>(cluster: &'a Cluster, configured: Option<&'a str>) -> &'a str {
    configured.unwrap_or(&cluster.name)
}

/// A request target in the form the connection's protocol wants.
pub(super) fn uri(cluster: &Cluster, h2: bool, authority: &str, path: &str) -> http::Uri {
    let built = if h2 {
        let scheme = if cluster.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{authority}{path}").parse()
    } else {
        path.parse()
    };
    built.unwrap_or_else(|_| http::Uri::from_static("/"))
}

/// One check; returns the connection when it may be used again.
pub(super) async fn check(
    cluster: &Arc<Cluster>,
    host: &Arc<Host>,
    config: &HttpHealthCheck,
    conn: Option<Conn>,
    verify_cluster: &Counter,
) -> (Outcome, Option<Conn>) {
    let mut conn = match conn.filter(|c| !c.is_closed()) {
        Some(c) => c,
        None => match Conn::open(cluster, host, config.http2).await {
            Some(c) => c,
            None => return (Outcome::NETWORK, None),
        },
    };
    let h2 = conn.is_h2();
    let authority = authority(cluster, config.host.as_deref());
    let mut req = Request::builder()
        .method(config.method.clone())
        .uri(uri(cluster, h2, authority, &config.path))
        .body(Full::new(Bytes::new()))
        .expect("a request from checked parts");
    let headers = req.headers_mut();
    if !h2 && let Ok(v) = HeaderValue::from_str(authority) {
        headers.insert(header::HOST, v);
    }
    headers.insert(header::USER_AGENT, HeaderValue::from_static("Envoy/HC"));
    for (name, value, append) in &config.request_headers_to_add {
        if *append {
            headers.append(name.clone(), value.clone());
        } else {
            headers.insert(name.clone(), value.clone());
        }
    }
    for name in &config.request_headers_to_remove {
        headers.remove(name);
    }
    let Some(response) = conn.send(req).await else {
        return (Outcome::NETWORK, None);
    };
    let (parts, mut body) = response.into_parts();
    // The body is read (and dropped) so that the connection can carry the next check.
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            return (Outcome::NETWORK, None);
        }
    }
    let close = !h2
        && parts
            .headers
            .get(header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let keep = (!close).then_some(conn);
    let status = parts.status.as_u16();
    let in_ranges = |ranges: &[(u16, u16)]| ranges.iter().any(|(s, e)| (*s..*e).contains(&status));
    if !in_ranges(&config.expected_statuses) {
        if parts
            .headers
            .contains_key(&X_ENVOY_IMMEDIATE_HEALTH_CHECK_FAIL)
        {
            host.set_health_flag(health_flag::EXCLUDED_VIA_IMMEDIATE_HC_FAIL);
        }
        let retriable = in_ranges(&config.retriable_statuses);
        return (
            Outcome::Failed {
                kind: FailureType::Active,
                retriable,
                status,
            },
            keep,
        );
    }
    let degraded = parts.headers.contains_key(&X_ENVOY_DEGRADED);
    if let Some(m) = &config.service_name_matcher {
        verify_cluster.inc();
        let cluster_header = parts
            .headers
            .get(&X_ENVOY_UPSTREAM_HEALTHCHECKED_CLUSTER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !m.matcher.matches(cluster_header) {
            let failed = Outcome::Failed {
                kind: FailureType::Active,
                retriable: false,
                status,
            };
            return (failed, keep);
        }
    }
    (Outcome::Healthy { degraded }, keep)
}
