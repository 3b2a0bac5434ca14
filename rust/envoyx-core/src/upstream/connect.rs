//! Opening an upstream connection: TCP within the cluster's `connect_timeout`, then
//! the cluster's transport socket (a TLS handshake when it has one), with Envoy's
//! connection stats. A connection counts as connected once its handshake is done,
//! as in Envoy, so a failed handshake is a connect failure.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::cluster::{Cluster, Host};

/// Why no connection could be had; each maps to Envoy's reset reason text.
#[derive(Debug)]
pub enum ConnectError {
    Timeout,
    /// The connection closed before it could carry the request.
    Closed,
    Io(std::io::Error),
    /// The TLS handshake failed (Envoy's transport failure reason).
    Tls(String),
    Handshake(hyper::Error),
}

impl ConnectError {
    /// Envoy's `reset reason` / `transport failure reason` wording.
    pub fn reset_reason(&self) -> String {
        match self {
            ConnectError::Timeout => "connection timeout".to_string(),
            ConnectError::Closed => "connection termination".to_string(),
            // Envoy 1.40 names only the reason in the reply body; the transport
            // failure goes to %UPSTREAM_TRANSPORT_FAILURE_REASON%.
            ConnectError::Io(_) => "remote connection failure".to_string(),
            // Envoy 1.40 names only the reason in the reply; the TLS error goes
            // to %UPSTREAM_TRANSPORT_FAILURE_REASON%.
            ConnectError::Tls(_) => "remote connection failure".to_string(),
            ConnectError::Handshake(e) => {
                format!("connection failure, transport failure reason: {e}")
            }
        }
    }

    pub fn transport_failure(&self) -> String {
        match self {
            ConnectError::Timeout => "connection timeout".to_string(),
            ConnectError::Closed => "connection termination".to_string(),
            ConnectError::Io(e) => format!("delayed connect error: {}", io_reason(e)),
            ConnectError::Tls(reason) => reason.clone(),
            ConnectError::Handshake(e) => e.to_string(),
        }
    }
}

/// The strerror text without Rust's " (os error N)" suffix, as Envoy prints it.
fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// An upstream byte stream: plain TCP or TLS over it.
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl UpstreamStream {
    /// Whether ALPN chose HTTP/2.
    pub fn negotiated_h2(&self) -> bool {
        match self {
            UpstreamStream::Plain(_) => false,
            UpstreamStream::Tls(s) => s.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }
}

/// A TCP connection to `address`, from the cluster's `upstream_bind_config`
/// source address when it has one.
pub(crate) async fn connect_tcp(cluster: &Cluster, address: SocketAddr) -> io::Result<TcpStream> {
    let Some(bind) = &cluster.upstream_bind else {
        return TcpStream::connect(address).await;
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_nonblocking(true)?;
    if bind.freebind {
        if bind.source.is_ipv4() {
            socket.set_freebind_v4(true)?;
        } else {
            socket.set_freebind_v6(true)?;
        }
    }
    if let Err(e) = socket.bind(&bind.source.into()) {
        cluster.stats.bind_errors.inc();
        return Err(e);
    }
    tokio::net::TcpSocket::from_std_stream(socket.into())
        .connect(address)
        .await
}

/// Connects to `host` for `cluster`; `sni` is the name the TLS handshake sends.
pub async fn connect(
    cluster: &Cluster,
    host: &Arc<Host>,
    sni: Option<&str>,
) -> Result<UpstreamStream, ConnectError> {
    let stats = &cluster.stats;
    stats.upstream_cx_total.inc();
    host.stats.cx_total().inc();
    let started = Instant::now();
    let failed = || {
        stats.upstream_cx_connect_fail.inc();
        host.stats.cx_connect_fail().inc();
    };
    let deadline = tokio::time::Instant::now() + cluster.connect_timeout;
    let tcp = match tokio::time::timeout_at(deadline, connect_tcp(cluster, host.address)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            failed();
            return Err(ConnectError::Io(e));
        }
        Err(_) => {
            failed();
            stats.upstream_cx_connect_timeout.inc();
            return Err(ConnectError::Timeout);
        }
    };
    let _ = tcp.set_nodelay(true);
    let stream = match &cluster.tls {
        None => UpstreamStream::Plain(tcp),
        Some(tls) => {
            match tokio::time::timeout_at(deadline, tls.connect(tcp, sni, host.address)).await {
                Ok(Ok(s)) => UpstreamStream::Tls(Box::new(s)),
                Ok(Err(reason)) => {
                    failed();
                    return Err(ConnectError::Tls(reason));
                }
                Err(_) => {
                    failed();
                    stats.upstream_cx_connect_timeout.inc();
                    return Err(ConnectError::Timeout);
                }
            }
        }
    };
    stats
        .upstream_cx_connect_ms
        .record(started.elapsed().as_millis() as u64);
    Ok(stream)
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
