//! A downstream connection (Envoy's `ConnectionManagerImpl` per connection): the
//! codec (HTTP/1.1, HTTP/2 or both by preface), per-connection stats, drain, and
//! one [`ActiveStream`] per request. Generic over the byte stream, so TLS plugs in
//! under it unchanged.

use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use super::active_stream::{ActiveStream, StreamBody};
use super::body::PeerBody;
use super::connection::DownstreamConnection;
use super::connection_manager::HttpConnectionManager;
use super::h1::head::RefusalCause;
use super::h1::{self, Transport};
use crate::access_log::LogRecord;
use crate::config::{CodecType, UnderscoresAction};
use crate::io::{CountedIo, LocalExec, Rewind};
use crate::tls::{PeerTls, TlsTransport};
use crate::upstream::WorkerPools;

/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the transport below the codec says about the connection.
#[derive(Default)]
pub struct TransportInfo {
    /// The local address the peer connected to.
    pub local: Option<SocketAddr>,
    /// Whether `local` is an original destination a listener filter restored.
    pub local_restored: bool,
    /// Bytes a listener filter already read, served first.
    pub prefix: Vec<u8>,
    /// The TLS session's facts (None: plaintext).
    pub tls: Option<Arc<PeerTls>>,
}

/// Serves one downstream plaintext connection of an HTTP filter chain until it
/// closes or `drain` fires. The connection's objects are made before the future,
/// so that it holds them once.
pub fn serve_tcp(
    hcm: Arc<HttpConnectionManager>,
    pools: Rc<WorkerPools>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    restored_local: Option<SocketAddr>,
    prefix: Vec<u8>,
    drain: watch::Receiver<bool>,
) -> impl Future<Output = ()> + 'static {
    let _ = stream.set_nodelay(true);
    let info = TransportInfo {
        local: restored_local.or_else(|| stream.local_addr().ok()),
        local_restored: restored_local.is_some(),
        prefix,
        tls: None,
    };
    serve(hcm, pools, stream, peer, info, drain)
}

/// Serves a downstream connection over an established TLS session.
pub fn serve_tls(
    hcm: Arc<HttpConnectionManager>,
    pools: Rc<WorkerPools>,
    stream: TlsTransport,
    peer: SocketAddr,
    tls: PeerTls,
    drain: watch::Receiver<bool>,
) -> impl Future<Output = ()> + 'static {
    let _ = stream.tcp().set_nodelay(true);
    let info = TransportInfo {
        local: stream.tcp().local_addr().ok(),
        // Not carried through the TLS path yet (docs/config-support.md).
        local_restored: false,
        prefix: Vec::new(),
        tls: Some(Arc::new(tls)),
    };
    serve(hcm, pools, stream, peer, info, drain)
}

pub(crate) fn serve<S>(
    hcm: Arc<HttpConnectionManager>,
    pools: Rc<WorkerPools>,
    stream: S,
    peer: SocketAddr,
    info: TransportInfo,
    drain: watch::Receiver<bool>,
) -> impl Future<Output = ()> + 'static
where
    S: Transport + AsyncRead + AsyncWrite + Unpin + 'static,
{
    let stats = &hcm.stats;
    stats.downstream_cx_total.inc();
    stats.downstream_cx_active.inc();
    if info.tls.is_some() {
        stats.downstream_cx_ssl_total.inc();
        stats.downstream_cx_ssl_active.inc();
    }
    // Closes the connection's books even when the worker drops the future (a
    // drain deadline), not only when the codec returns.
    let mut conn = DownstreamConnection::new(hcm, pools, peer, info.local, info.tls);
    conn.local_restored = info.local_restored;
    let books = ConnectionBooks(Rc::new(conn));
    let first = (!info.prefix.is_empty()).then(|| h1::InBuf::from_prefix(info.prefix));
    serve_connection(books, stream, first, drain)
}

async fn serve_connection<S>(
    books: ConnectionBooks,
    stream: S,
    first: Option<h1::InBuf>,
    drain: watch::Receiver<bool>,
) where
    S: Transport + AsyncRead + AsyncWrite + Unpin + 'static,
{
    let conn = books.0.clone();
    let stats = &conn.hcm.stats;
    let rx = stats.downstream_cx_rx_bytes_total.clone();
    let tx = stats.downstream_cx_tx_bytes_total.clone();
    // ALPN decides for AUTO when TLS negotiated a protocol, as in Envoy.
    let negotiated = conn.tls.as_ref().and_then(|t| t.alpn.as_deref());
    let codec = match (conn.hcm.codec, negotiated) {
        (CodecType::Auto, Some("h2")) => CodecType::Http2,
        (CodecType::Auto, Some("http/1.1" | "http/1.0")) => CodecType::Http1,
        (codec, _) => codec,
    };
    match codec {
        CodecType::Http1 => {
            let shared = Rc::new(h1::Shared::new(Box::new(stream), rx, tx, first));
            h1::serve(conn, shared, drain).await;
        }
        CodecType::Http2 => {
            let prefix = first.map(|f| {
                let p = f.pending().to_vec();
                f.release();
                p
            });
            let io = CountedIo::new(stream, rx, tx);
            Box::pin(serve_h2(
                conn,
                Rewind::new(prefix.unwrap_or_default(), io),
                drain,
            ))
            .await;
        }
        CodecType::Auto => {
            // The first bytes say which protocol: HTTP/2's preface, or HTTP/1.1.
            let Some(first) = Box::pin(sniff(&conn, &stream, first, &rx, &drain)).await else {
                return;
            };
            if first.pending().starts_with(H2_PREFACE) {
                let prefix = first.pending().to_vec();
                first.release();
                let io = Rewind::new(prefix, CountedIo::new(stream, rx, tx));
                Box::pin(serve_h2(conn, io, drain)).await;
            } else {
                let shared = Rc::new(h1::Shared::new(Box::new(stream), rx, tx, Some(first)));
                h1::serve(conn, shared, drain).await;
            }
        }
    }
    drop(books);
}

/// Reads until the bytes are not a prefix of HTTP/2's preface, or are all of it.
/// None when the peer leaves first.
/// Like the HTTP/1.1 codec's idle wait, it reads the drain signal without a waiter
/// of its own (the worker's connection task is woken by it).
/// Envoy's idle timer and `max_connection_duration` close a connection that never
/// sent a byte.
async fn sniff<S: Transport>(
    conn: &DownstreamConnection,
    stream: &S,
    first: Option<h1::InBuf>,
    rx: &crate::stats::Counter,
    drain: &watch::Receiver<bool>,
) -> Option<h1::InBuf> {
    let limits = &conn.hcm.limits;
    let idle = limits.idle_timeout.map(|t| (conn.started + t, true));
    let duration = limits
        .max_connection_duration
        .map(|t| (conn.started + t, false));
    let deadline = match (idle, duration) {
        (Some(i), Some(d)) => Some(if d.0 < i.0 { d } else { i }),
        (i, d) => i.or(d),
    };
    let mut buf: Option<h1::InBuf> = first;
    loop {
        if let Some(b) = &buf {
            let p = b.pending();
            let n = p.len().min(H2_PREFACE.len());
            if !p.is_empty() && (p[..n] != H2_PREFACE[..n] || n == H2_PREFACE.len()) {
                return buf;
            }
        }
        let readable = poll_fn(|cx| {
            if *drain.borrow() {
                return std::task::Poll::Ready(false);
            }
            stream.poll_read_ready(cx).map(|r| r.is_ok())
        });
        let readable = match deadline {
            None => readable.await,
            Some((at, idle)) => match tokio::time::timeout_at(at.into(), readable).await {
                Ok(r) => r,
                Err(_) => {
                    if idle {
                        conn.hcm.stats.downstream_cx_idle_timeout.inc();
                    } else {
                        conn.check_duration();
                    }
                    false
                }
            },
        };
        if !readable {
            break;
        }
        let b = buf.get_or_insert_with(h1::InBuf::new);
        let space = b.space_mut()?;
        match stream.try_read(space) {
            Ok(0) => break,
            Ok(n) => {
                b.advance(n);
                rx.add(n as u64);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
    }
    if let Some(b) = buf {
        b.release();
    }
    None
}

/// The header-list limit hyper's codec announces and enforces (its own default is
/// 16 KiB, below Envoy's 60 KiB). Envoy announces none and resets a stream over
/// `max_request_headers_kb` in its own check, which envoyx repeats after the codec:
/// twice that limit plus RFC 9113's 32 bytes per header leaves every request near
/// the limit to that check; only one far beyond it gets hyper's 431.
fn h2_header_list_limit(limits: &crate::config::HcmLimits) -> u32 {
    let per_header = 32 * (limits.max_headers_count + 8);
    u32::try_from(limits.max_request_headers_bytes * 2 + per_header).unwrap_or(u32::MAX)
}

/// HTTP/2 by hyper.
async fn serve_h2<S>(
    conn: Rc<DownstreamConnection>,
    io: Rewind<CountedIo<S>>,
    mut drain: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let hcm = conn.hcm.clone();
    let service = StreamService(conn.clone());
    let mut builder = hyper::server::conn::http2::Builder::new(LocalExec);
    builder.timer(TokioTimer::new());
    let limits = &hcm.limits;
    builder
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .initial_stream_window_size(limits.h2_initial_stream_window_size)
        .initial_connection_window_size(limits.h2_initial_connection_window_size)
        .max_header_list_size(h2_header_list_limit(limits));
    if limits.h2_allow_connect {
        // SETTINGS_ENABLE_CONNECT_PROTOCOL: WebSocket over HTTP/2 (RFC 8441).
        builder.enable_connect_protocol();
    }
    let served = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(served);
    let result = tokio::select! {
        r = served.as_mut() => r,
        _ = drain.wait_for(|d| *d) => {
            served.as_mut().graceful_shutdown();
            served.await
        }
        () = h2_drain(&conn) => {
            // hyper's graceful shutdown: GOAWAY with the last stream id after a
            // PING, then the close once the open streams finish.
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if result.is_err() && conn.protocol.get().is_none() {
        hcm.stats.downstream_cx_protocol_error.inc();
    }
}

/// Resolves when Envoy's drain sequence starts on an HTTP/2 connection: its idle
/// timer (no stream for `idle_timeout`), `max_connection_duration`, or
/// `max_requests_per_connection` (which starts it when a stream begins).
async fn h2_drain(conn: &DownstreamConnection) {
    let limits = &conn.hcm.limits;
    loop {
        if conn.draining() {
            return;
        }
        let now = Instant::now();
        let mut next = limits.idle_timeout.map(|t| {
            // Busy: look again a whole timeout later (a stream ending meanwhile
            // moves `idle_since`, which the next look sees).
            let since = if conn.screen.in_flight.get() > 0 {
                now
            } else {
                conn.idle_since.get()
            };
            (since + t, true)
        });
        if let Some(max) = limits.max_connection_duration {
            let at = conn.started + max;
            if next.is_none_or(|(n, _)| at < n) {
                next = Some((at, false));
            }
        }
        let started = poll_fn(|cx| {
            if conn.draining() {
                return std::task::Poll::Ready(());
            }
            conn.drain_waker.set(Some(cx.waker().clone()));
            std::task::Poll::Pending
        });
        let Some((at, idle)) = next else {
            return started.await;
        };
        if tokio::time::timeout_at(at.into(), started).await.is_ok() {
            return;
        }
        if !idle {
            conn.check_duration();
        } else if conn.screen.in_flight.get() == 0
            && conn.idle_since.get() + limits.idle_timeout.unwrap_or_default() <= Instant::now()
        {
            conn.hcm.stats.downstream_cx_idle_timeout.inc();
            conn.start_drain();
        }
    }
}

/// The end of a downstream connection: refused requests recorded, gauges closed.
struct ConnectionBooks(Rc<DownstreamConnection>);

impl Drop for ConnectionBooks {
    fn drop(&mut self) {
        let conn = &self.0;
        let stats = &conn.hcm.stats;
        record_refusals(conn);
        if conn.tls.is_some() {
            stats.downstream_cx_ssl_active.dec();
        }
        match conn.protocol.get() {
            Some(Version::HTTP_2) => stats.downstream_cx_http2_active.dec(),
            Some(_) => stats.downstream_cx_http1_active.dec(),
            None => {}
        }
        stats.downstream_cx_active.dec();
        stats.downstream_cx_destroy.inc();
    }
}

/// Stats and access log lines for the requests the codec refused.
fn record_refusals(conn: &DownstreamConnection) {
    let hcm = &conn.hcm;
    for refusal in conn.screen.refusals.borrow().iter() {
        let stats = &hcm.stats;
        match refusal.cause {
            RefusalCause::ProtocolError => stats.downstream_cx_protocol_error.inc(),
            RefusalCause::Underscore => {
                stats.downstream_cx_protocol_error.inc();
                stats
                    .http1_requests_rejected_with_underscores_in_headers
                    .inc();
            }
            RefusalCause::HeaderTimeout => stats.downstream_rq_header_timeout.inc(),
            RefusalCause::StreamIdle => stats.downstream_rq_idle_timeout.inc(),
            RefusalCause::RequestTimeout => stats.downstream_rq_timeout.inc(),
            RefusalCause::MaxDuration => stats.downstream_rq_max_duration_reached.inc(),
        }
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
            response_flags: refusal.flags,
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

/// An HTTP/2 request the codec refuses (`headers_with_underscores_action`
/// REJECT_REQUEST, more than `max_headers_count` headers): hyper resets the
/// stream with INTERNAL_ERROR, as Envoy's codec does.
#[derive(Debug, thiserror::Error)]
#[error("http2 request refused: {0}")]
struct StreamRefused(&'static str);

impl hyper::service::Service<Request<Incoming>> for StreamService {
    type Response = Response<StreamBody>;
    type Error = StreamRefused;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, StreamRefused>>>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let conn = self.0.clone();
        if let Err(refused) = screen_h2_headers(&conn, req.headers_mut()) {
            return Box::pin(std::future::ready(Err(refused)));
        }
        Box::pin(async move {
            let mut response = ActiveStream::run(conn, req.map(PeerBody::Hyper)).await;
            if let Some(tunnel) = crate::http::upgrade::Tunnel::take_h2(&mut response) {
                // The stream is the tunnel's once hyper has sent this response.
                tokio::task::spawn_local(tunnel.run_h2());
            }
            Ok(response)
        })
    }
}

/// Envoy's HTTP/2 codec checks of a request's headers (the HTTP/1 codec makes
/// them as it parses).
fn screen_h2_headers(
    conn: &DownstreamConnection,
    headers: &mut http::HeaderMap,
) -> Result<(), StreamRefused> {
    let limits = &conn.hcm.limits;
    // Envoy counts the four request pseudo-headers, which hyper keeps apart.
    if headers.len() + 4 > limits.max_headers_count {
        return Err(StreamRefused("too many headers"));
    }
    // `max_request_headers_kb` when set (hyper's own limit stands otherwise):
    // the bytes of the names and values, as Envoy's codec counts them.
    if limits.max_request_headers_bytes != crate::http::h1::head::MAX_HEAD
        && headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len())
            .sum::<usize>()
            > limits.max_request_headers_bytes
    {
        return Err(StreamRefused("headers too large"));
    }
    if limits.headers_with_underscores != UnderscoresAction::Allow {
        let names: Vec<_> = headers
            .keys()
            .filter(|n| n.as_str().contains('_'))
            .cloned()
            .collect();
        if names.is_empty() {
            return Ok(());
        }
        let stats = &conn.hcm.stats;
        if limits.headers_with_underscores == UnderscoresAction::RejectRequest {
            stats
                .http2_requests_rejected_with_underscores_in_headers
                .inc();
            return Err(StreamRefused("header name contains underscores"));
        }
        for name in names {
            let n = headers.get_all(&name).iter().count();
            stats.http2_dropped_headers_with_underscores.add(n as u64);
            headers.remove(&name);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// What an idle connection's task holds besides its buffers (none when idle).
    #[test]
    fn connection_future_is_small() {
        fn size<A, B, C, D, E, G, F>(_: fn(A, B, C, D, E, G) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        fn size4<A, B, C, D, F>(_: fn(A, B, C, D) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let n = size(super::serve::<tokio::net::TcpStream>)
            .max(size4(super::serve_connection::<tokio::net::TcpStream>));
        eprintln!("downstream connection future: {n} bytes");
        assert!(n <= 768, "{n}");
    }
}
