//! Upgrades and CONNECT, as Envoy's connection manager does them.
//!
//! - An HTTP/1.1 request with `Upgrade: <type>` and `Connection: upgrade`, or an
//!   HTTP/2 extended CONNECT (RFC 8441, `:protocol <type>`; converted to the HTTP/1.1
//!   form as Envoy's codec converts it), or a `CONNECT`, is an upgrade request of
//!   that type (`CONNECT` for CONNECT).
//! - Its route allows it when the route's `upgrade_configs` enables the type, else
//!   when the connection manager's does (Envoy's `createUpgradeFilterChain`);
//!   otherwise the answer is 403 with no body, the connection closes, and
//!   `downstream_rq_ws_on_non_ws_route` counts it.
//! - An allowed upgrade goes to the upstream as an HTTP/1.1 upgrade; a `101` comes
//!   back (an HTTP/2 client sees `200`), then both connections carry the tunnel's
//!   bytes until both sides have closed (each side's end of stream is passed on:
//!   half-close). Any other answer of the upstream passes through.
//! - A `CONNECT` on a route with `connect_config` is answered `200` by the proxy once
//!   a TCP connection to the cluster's host is open, and the stream's bytes are
//!   tunnelled over it.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::h1::Shared;
use crate::config::upgrade::HcmUpgrades;
use crate::config::{RouteAction, RouteEntry};
use crate::stats::{Counter, Gauge, StatStore};
use crate::upstream::UpstreamStream;

/// The connection manager's upgrade settings and stats.
#[derive(Debug)]
pub struct Upgrades {
    config: HcmUpgrades,
    /// `downstream_cx_upgrades_total` / `_active`: upgrades allowed (active until
    /// their stream, tunnel included, ends).
    total: Counter,
    active: Gauge,
    /// `downstream_rq_ws_on_non_ws_route`: upgrades a route refused (403).
    refused: Counter,
}

impl Upgrades {
    pub fn new(config: HcmUpgrades, store: &StatStore, prefix: &str) -> Self {
        let name = |s: &str| format!("http.{prefix}.{s}");
        Upgrades {
            config,
            total: store.counter(&name("downstream_cx_upgrades_total")),
            active: store.gauge(&name("downstream_cx_upgrades_active")),
            refused: store.counter(&name("downstream_rq_ws_on_non_ws_route")),
        }
    }
}

/// What a request is upgraded to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// `Upgrade: <token>` (lower-cased), WebSocket or other.
    Token(String),
    Connect,
}

/// An upgrade request, found by [`UpgradeRequest::detect`] before the route is
/// looked up.
#[derive(Debug)]
pub(crate) struct UpgradeRequest {
    kind: Kind,
    /// The `upgrade` value as the client wrote it (forwarded as is).
    value: Option<HeaderValue>,
    /// The HTTP/2 stream's own upgrade (the tunnel's downstream side); None over
    /// HTTP/1.1, where the connection itself is the tunnel.
    h2: Option<hyper::upgrade::OnUpgrade>,
    /// Held while the upgrade is active (`downstream_cx_upgrades_active`).
    active: Option<ActiveUpgrade>,
}

#[derive(Debug)]
struct ActiveUpgrade(Gauge);

impl Drop for ActiveUpgrade {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// How the route decided an upgrade request.
pub(crate) enum Decision {
    Allowed,
    /// Envoy's 403 (the caller replies, with the connection closed).
    Refused,
}

impl UpgradeRequest {
    /// The request's upgrade, if it is one. An HTTP/2 extended CONNECT becomes the
    /// HTTP/1.1 upgrade it stands for (GET, `upgrade`, `connection: upgrade`), as
    /// Envoy's HTTP/2 codec converts it; an `Upgrade` header without
    /// `Connection: upgrade` (or `h2c`, which Envoy does not support) is no upgrade.
    /// Costs a method comparison and one header lookup per request.
    pub fn detect<B>(req: &mut Request<B>) -> Option<Box<Self>> {
        if req.method() == Method::CONNECT {
            let h2 = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
            let protocol = req.extensions_mut().remove::<hyper::ext::Protocol>();
            let mut value = None;
            let kind = match protocol {
                Some(p) => {
                    let token = p.as_str().to_ascii_lowercase();
                    *req.method_mut() = Method::GET;
                    let headers = req.headers_mut();
                    value = HeaderValue::from_str(p.as_str()).ok();
                    if let Some(v) = &value {
                        headers.insert(header::UPGRADE, v.clone());
                    }
                    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                    Kind::Token(token)
                }
                None => Kind::Connect,
            };
            return Some(Box::new(UpgradeRequest {
                kind,
                value,
                h2,
                active: None,
            }));
        }
        let value = req.headers().get(header::UPGRADE)?;
        let connection_upgrade = req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v.as_bytes(), b"upgrade"));
        let token = value.to_str().ok()?.trim().to_ascii_lowercase();
        if !connection_upgrade || token == "h2c" || req.version() != Version::HTTP_11 {
            return None;
        }
        Some(Box::new(UpgradeRequest {
            kind: Kind::Token(token),
            value: Some(value.clone()),
            h2: None,
            active: None,
        }))
    }

    /// Whether `route` allows this upgrade (Envoy's precedence: the route's
    /// `upgrade_configs` entry for the type, else the connection manager's).
    /// An allowed upgrade is counted (`downstream_cx_upgrades_total`, `_active`),
    /// a refused one too (`downstream_rq_ws_on_non_ws_route`).
    pub fn decide(&mut self, upgrades: &Upgrades, route: &RouteEntry) -> Decision {
        let name = match &self.kind {
            Kind::Token(t) => t.as_str(),
            Kind::Connect => "connect",
        };
        let route_says = match &route.action {
            RouteAction::Forward(f) => f
                .upgrades
                .as_ref()
                .and_then(|u| u.types.iter().find(|(t, _)| t == name).map(|(_, on)| *on)),
            RouteAction::Direct { .. } => None,
        };
        let allowed = match route_says {
            Some(on) => on,
            None => upgrades
                .config
                .0
                .iter()
                .find(|(t, _)| t == name)
                .is_some_and(|(_, on)| *on),
        };
        if allowed {
            upgrades.total.inc();
            upgrades.active.inc();
            self.active = Some(ActiveUpgrade(upgrades.active.clone()));
            Decision::Allowed
        } else {
            upgrades.refused.inc();
            Decision::Refused
        }
    }

    /// A CONNECT the route terminates (`connect_config`): the proxy answers it and
    /// tunnels over TCP.
    pub fn terminates_connect(&self, action: &crate::config::ForwardAction) -> bool {
        self.kind == Kind::Connect
            && action
                .upgrades
                .as_ref()
                .is_some_and(|u| u.terminate_connect)
    }

    /// The `upgrade` value the upstream request carries (None for CONNECT).
    pub fn upstream_token(&self) -> Option<HeaderValue> {
        self.value.clone()
    }

    /// The upstream's answer: a `101` with its connection handed over becomes
    /// the tunnel (the response keeps `upgrade` and `connection` for an HTTP/1.1
    /// client; an HTTP/2 client gets `200` from [`Tunnel::take_h2`], as Envoy
    /// converts it, after the `101` was counted as Envoy counts it).
    /// Some when the upstream connection was taken for the tunnel (so it must not
    /// go back to the pool). Call before the hop-by-hop headers are stripped.
    pub fn on_upstream_response(
        &mut self,
        parts: &mut http::response::Parts,
        downstream: Version,
    ) -> Option<UpstreamUpgradeHeaders> {
        if parts.status != StatusCode::SWITCHING_PROTOCOLS {
            return None;
        }
        let upstream = parts.extensions.remove::<hyper::upgrade::OnUpgrade>()?;
        let tunnel = Tunnel {
            upstream: TunnelUpstream::Http(upstream),
            downstream_h2: self.h2.take(),
            _active: self.active.take(),
        };
        parts.extensions.insert(TunnelSlot::new(tunnel));
        let upgrade = parts.headers.get(header::UPGRADE).cloned();
        let connection = parts.headers.get(header::CONNECTION).cloned();
        let h1 = downstream != Version::HTTP_2;
        Some(UpstreamUpgradeHeaders {
            upgrade,
            connection,
            h1,
        })
    }

    /// The response to a CONNECT the route terminates, once `stream` (to the
    /// cluster's host) is open.
    pub fn connect_response(&mut self, stream: UpstreamStream) -> http::response::Parts {
        let tunnel = Tunnel {
            upstream: TunnelUpstream::Tcp(stream),
            downstream_h2: self.h2.take(),
            _active: self.active.take(),
        };
        let (mut parts, ()) = Response::new(()).into_parts();
        parts.extensions.insert(TunnelSlot::new(tunnel));
        parts
    }
}

/// An upstream `101` that became a tunnel: its `upgrade` and `connection`
/// headers, written back as they came after the hop-by-hop strip (for an
/// HTTP/1.1 client).
pub(crate) struct UpstreamUpgradeHeaders {
    upgrade: Option<HeaderValue>,
    connection: Option<HeaderValue>,
    h1: bool,
}

impl UpstreamUpgradeHeaders {
    pub fn restore(self, headers: &mut http::HeaderMap) {
        if !self.h1 {
            return;
        }
        if let Some(v) = self.upgrade {
            headers.insert(header::UPGRADE, v);
        }
        let connection = self
            .connection
            .unwrap_or_else(|| HeaderValue::from_static("upgrade"));
        headers.insert(header::CONNECTION, connection);
    }
}

/// An HTTP/1.1 upgrade request answered without switching (refused, no route,
/// a direct response, the upstream's own answer): the connection closes after
/// the response, as Envoy's codec closes it, so that bytes sent after the head
/// are never read as a request.
pub(crate) fn close_unless_switched(parts: &mut http::response::Parts) {
    if parts.extensions.get::<TunnelSlot>().is_none() {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// The upgrade headers an upstream request keeps (the router strips every
/// hop-by-hop header first).
pub(crate) fn restore_request_headers(headers: &mut http::HeaderMap, token: &HeaderValue) {
    headers.insert(header::UPGRADE, token.clone());
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// The upstream side of a tunnel.
enum TunnelUpstream {
    /// The HTTP/1.1 connection that answered `101`.
    Http(hyper::upgrade::OnUpgrade),
    /// The TCP connection of a terminated CONNECT.
    Tcp(UpstreamStream),
}

/// A tunnel waiting for its response head to be written downstream.
pub(crate) struct Tunnel {
    upstream: TunnelUpstream,
    downstream_h2: Option<hyper::upgrade::OnUpgrade>,
    _active: Option<ActiveUpgrade>,
}

/// The response extension carrying a [`Tunnel`] to the downstream codec
/// (extensions must be `Clone + Sync`; only upgrade responses carry one).
#[derive(Clone)]
struct TunnelSlot(Arc<Mutex<Option<Tunnel>>>);

impl TunnelSlot {
    fn new(t: Tunnel) -> Self {
        TunnelSlot(Arc::new(Mutex::new(Some(t))))
    }
}

impl Tunnel {
    /// The tunnel a response starts, if it starts one.
    pub fn take<B>(response: &mut Response<B>) -> Option<Self> {
        let slot = response.extensions_mut().remove::<TunnelSlot>()?;
        slot.0.lock().ok()?.take()
    }

    /// The tunnel a response to an HTTP/2 request starts, if it starts one: the
    /// upstream's `101` becomes `200` (what tells hyper the stream is a tunnel).
    pub fn take_h2<B>(response: &mut Response<B>) -> Option<Self> {
        let tunnel = Self::take(response)?;
        *response.status_mut() = StatusCode::OK;
        Some(tunnel)
    }

    /// Carries bytes both ways between `down` and the upstream. `half_close`:
    /// each side's end of stream is passed on, until both have ended (an HTTP/2
    /// stream's END_STREAM); otherwise the downstream's end of stream ends the
    /// tunnel at once, as Envoy's HTTP/1.1 codec treats a client's FIN.
    async fn splice<D: AsyncRead + AsyncWrite + Unpin>(self, down: &mut D, half_close: bool) {
        match self.upstream {
            TunnelUpstream::Http(on) => {
                if let Ok(up) = on.await {
                    let mut up = hyper_util::rt::TokioIo::new(up);
                    copy(down, &mut up, half_close).await;
                }
            }
            TunnelUpstream::Tcp(mut up) => copy(down, &mut up, half_close).await,
        }
    }

    /// The HTTP/2 side: the stream, once hyper has sent the response head.
    pub async fn run_h2(mut self) {
        let Some(on) = self.downstream_h2.take() else {
            return;
        };
        if let Ok(down) = on.await {
            let mut down = hyper_util::rt::TokioIo::new(down);
            self.splice(&mut down, true).await;
        }
    }

    /// The HTTP/1.1 side: writes the response head (no body framing: the bytes
    /// that follow are the tunnel's), then the connection is the tunnel. The
    /// connection is over when this returns.
    pub async fn run_h1(
        self,
        shared: &Shared,
        parts: &http::response::Parts,
        key_format: crate::config::HeaderKeyFormat,
    ) {
        let mut head = Vec::with_capacity(256);
        head.extend_from_slice(b"HTTP/1.1 ");
        head.extend_from_slice(parts.status.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
        head.extend_from_slice(b"\r\n");
        let mut dated = false;
        for (name, value) in &parts.headers {
            if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
                continue;
            }
            dated |= name == header::DATE;
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        if !dated {
            head.extend_from_slice(b"date: ");
            super::h1::head::extend_date(&mut head);
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        super::header_case::format_response_head(parts, key_format, &mut head, 0);
        let mut pos = 0;
        if std::future::poll_fn(|cx| shared.poll_write_all(cx, &head, &mut pos))
            .await
            .is_err()
        {
            return;
        }
        let mut down = H1Io { shared };
        self.splice(&mut down, false).await;
    }
}

async fn copy<D, U>(down: &mut D, up: &mut U, half_close: bool)
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    if half_close {
        let _ = tokio::io::copy_bidirectional(down, up).await;
        return;
    }
    let (mut down_r, mut down_w) = tokio::io::split(down);
    let (mut up_r, mut up_w) = tokio::io::split(up);
    tokio::select! {
        // The client's end (or an error) ends the tunnel: the upstream closes.
        _ = tokio::io::copy(&mut down_r, &mut up_w) => {}
        // The upstream's end: what it sent is written, then the connection ends.
        _ = tokio::io::copy(&mut up_r, &mut down_w) => {
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut down_w).await;
        }
    }
}

/// A downstream HTTP/1.1 connection as a byte stream: first what the codec has
/// buffered past the request head (bytes the client sent early), then the socket.
struct H1Io<'a> {
    shared: &'a Shared,
}

impl AsyncRead for H1Io<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let shared = self.shared;
        {
            let mut read = shared.read.borrow_mut();
            if let Some(inbuf) = read.buf.as_mut() {
                let pending = inbuf.pending();
                if !pending.is_empty() {
                    let n = pending.len().min(buf.remaining());
                    buf.put_slice(&pending[..n]);
                    inbuf.consume(n);
                    return Poll::Ready(Ok(()));
                }
                if let Some(b) = read.buf.take() {
                    b.release();
                }
            }
            if read.eof {
                return Poll::Ready(Ok(()));
            }
        }
        let n = std::task::ready!(super::h1::poll_read(
            &*shared.io,
            cx,
            buf.initialize_unfilled()
        ))?;
        buf.advance(n);
        shared.rx.add(n as u64);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H1Io<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let n = std::task::ready!(super::h1::poll_write(&*self.shared.io, cx, buf))?;
        self.shared.tx.add(n as u64);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.shared.io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.shared.io.poll_flush(cx))?;
        Poll::Ready(self.shared.io.shutdown_write())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, headers: &[(&'static str, &'static str)]) -> Request<()> {
        let mut req = Request::builder().method(method).uri("/ws");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(()).unwrap()
    }

    #[test]
    fn an_upgrade_needs_connection_upgrade() {
        let mut req = request(
            Method::GET,
            &[
                ("upgrade", "WebSocket"),
                ("connection", "keep-alive, Upgrade"),
            ],
        );
        let u = UpgradeRequest::detect(&mut req).unwrap();
        assert_eq!(u.kind, Kind::Token("websocket".into()));
        assert_eq!(u.upstream_token().unwrap(), "WebSocket");
        let mut plain = request(Method::GET, &[("upgrade", "websocket")]);
        assert!(UpgradeRequest::detect(&mut plain).is_none());
        let mut h2c = request(
            Method::GET,
            &[("upgrade", "h2c"), ("connection", "upgrade")],
        );
        assert!(UpgradeRequest::detect(&mut h2c).is_none());
        let mut none = request(Method::GET, &[]);
        assert!(UpgradeRequest::detect(&mut none).is_none());
    }

    #[test]
    fn extended_connect_becomes_the_http1_upgrade() {
        let mut req = request(Method::CONNECT, &[]);
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        let u = UpgradeRequest::detect(&mut req).unwrap();
        assert_eq!(u.kind, Kind::Token("websocket".into()));
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.headers()[header::UPGRADE], "websocket");
        assert_eq!(req.headers()[header::CONNECTION], "upgrade");
        assert!(req.extensions().get::<hyper::ext::Protocol>().is_none());
    }

    #[test]
    fn connect_is_its_own_upgrade_type() {
        let mut req = request(Method::CONNECT, &[]);
        let u = UpgradeRequest::detect(&mut req).unwrap();
        assert!(u.kind == Kind::Connect);
        assert_eq!(req.method(), Method::CONNECT);
        assert!(u.upstream_token().is_none());
    }
}
