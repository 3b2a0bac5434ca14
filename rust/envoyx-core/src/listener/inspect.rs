//! Listener filters: what a new connection's first bytes say before a filter
//! chain is chosen. `tls_inspector` hands the bytes to rustls' `Acceptor`, which
//! reads the ClientHello (SNI, ALPN); `http_inspector` looks for an HTTP/1.x
//! request line or HTTP/2's preface. The bytes read are kept and replayed to the
//! chain chosen: a TLS chain continues the handshake from the ClientHello rustls
//! read, a plaintext chain (an HTTP codec, or a TCP proxy passing TLS through)
//! gets them as the first bytes of the stream.

use std::io;

use rustls::server::{Accepted, Acceptor};
use tokio::net::TcpStream;

use crate::config::{ListenerFilterConfig, ListenerFilterKind};
use crate::stats::{Counter, StatStore};

/// Envoy's tls_inspector limit on a ClientHello.
const MAX_CLIENT_HELLO: usize = 64 * 1024;
/// How much of a plaintext connection http_inspector reads for the request line.
const MAX_HTTP_INSPECT: usize = 8 * 1024;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the listener filters found, and the bytes they read.
#[derive(Default)]
pub struct Inspected {
    /// Bytes read from the socket so far, to be replayed.
    pub prefix: Vec<u8>,
    /// `tls` once a ClientHello is seen; `raw_buffer` otherwise.
    pub tls: bool,
    pub server_name: Option<String>,
    pub application_protocols: Vec<String>,
    /// The ClientHello as rustls read it, for a TLS chain to continue from.
    pub client_hello: Option<Accepted>,
    /// The original destination the `original_dst` filter restored.
    pub original_dst: Option<std::net::SocketAddr>,
}

impl Inspected {
    pub fn transport_protocol(&self) -> &'static str {
        if self.tls { "tls" } else { "raw_buffer" }
    }
}

/// Envoy's `tls_inspector.*` and `http_inspector.*` stats (global, like Envoy's).
pub struct InspectorStats {
    pub tls_found: Counter,
    pub tls_not_found: Counter,
    pub sni_found: Counter,
    pub sni_not_found: Counter,
    pub alpn_found: Counter,
    pub alpn_not_found: Counter,
    pub client_hello_too_large: Counter,
    pub http10_found: Counter,
    pub http11_found: Counter,
    pub http2_found: Counter,
    pub http_not_found: Counter,
}

impl InspectorStats {
    pub fn new(store: &StatStore) -> Self {
        InspectorStats {
            tls_found: store.counter("tls_inspector.tls_found"),
            tls_not_found: store.counter("tls_inspector.tls_not_found"),
            sni_found: store.counter("tls_inspector.sni_found"),
            sni_not_found: store.counter("tls_inspector.sni_not_found"),
            alpn_found: store.counter("tls_inspector.alpn_found"),
            alpn_not_found: store.counter("tls_inspector.alpn_not_found"),
            client_hello_too_large: store.counter("tls_inspector.client_hello_too_large"),
            http10_found: store.counter("http_inspector.http10_found"),
            http11_found: store.counter("http_inspector.http11_found"),
            http2_found: store.counter("http_inspector.http2_found"),
            http_not_found: store.counter("http_inspector.http_not_found"),
        }
    }
}

/// Why inspection ended the connection.
#[derive(Debug)]
pub enum InspectError {
    /// The peer closed or the socket failed.
    Closed,
    /// A ClientHello beyond Envoy's limit.
    TooLarge,
}

/// Runs the listener filters in order, but those whose `filter_disabled`
/// matches the local address (as restored so far; `accepted_on` else). Partial
/// results stay in `out` when the caller's timeout cuts this short.
pub async fn run(
    stream: &TcpStream,
    accepted_on: std::net::SocketAddr,
    filters: &[ListenerFilterConfig],
    stats: &InspectorStats,
    out: &mut Inspected,
) -> Result<(), InspectError> {
    for f in filters {
        if let Some(disabled) = &f.disabled
            && disabled.matches(out.original_dst.unwrap_or(accepted_on))
        {
            continue;
        }
        match f.kind {
            ListenerFilterKind::TlsInspector => {
                read_client_hello(stream, Some(stats), out).await?;
            }
            ListenerFilterKind::HttpInspector if !out.tls => {
                http_inspector(stream, stats, out).await?;
            }
            ListenerFilterKind::HttpInspector => {}
            ListenerFilterKind::OriginalDst => out.original_dst = original_dst(stream),
        }
    }
    Ok(())
}

/// Reads more bytes into `prefix`; Err when the peer is gone.
async fn read_more(stream: &TcpStream, prefix: &mut Vec<u8>) -> Result<usize, InspectError> {
    let mut chunk = [0u8; 4096];
    loop {
        stream.readable().await.map_err(|_| InspectError::Closed)?;
        match stream.try_read(&mut chunk) {
            Ok(0) => return Err(InspectError::Closed),
            Ok(n) => {
                prefix.extend_from_slice(&chunk[..n]);
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return Err(InspectError::Closed),
        }
    }
}

/// Reads a ClientHello into `out` (bytes, SNI, ALPN), or finds the bytes are not
/// TLS. `stats` is None when a TLS chain reads it without a tls_inspector.
pub async fn read_client_hello(
    stream: &TcpStream,
    stats: Option<&InspectorStats>,
    out: &mut Inspected,
) -> Result<(), InspectError> {
    let count = |c: fn(&InspectorStats) -> &Counter| {
        if let Some(s) = stats {
            c(s).inc();
        }
    };
    let mut acceptor = Acceptor::default();
    let mut fed = 0;
    loop {
        // A TLS record of a handshake starts with 0x16 and a 3.x version.
        if let Some(&first) = out.prefix.first()
            && (first != 0x16 || out.prefix.get(1).is_some_and(|&v| v != 3))
        {
            count(|s| &s.tls_not_found);
            return Ok(());
        }
        if fed < out.prefix.len() {
            let mut rest = &out.prefix[fed..];
            while !rest.is_empty() {
                match acceptor.read_tls(&mut rest) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            fed = out.prefix.len() - rest.len();
            match acceptor.accept() {
                Ok(Some(accepted)) => {
                    let hello = accepted.client_hello();
                    out.tls = true;
                    count(|s| &s.tls_found);
                    match hello.server_name() {
                        Some(sni) => {
                            count(|s| &s.sni_found);
                            out.server_name = Some(sni.to_ascii_lowercase());
                        }
                        None => count(|s| &s.sni_not_found),
                    }
                    match hello.alpn() {
                        Some(protocols) => {
                            count(|s| &s.alpn_found);
                            out.application_protocols = protocols
                                .map(|p| String::from_utf8_lossy(p).into_owned())
                                .collect();
                        }
                        None => count(|s| &s.alpn_not_found),
                    }
                    out.client_hello = Some(accepted);
                    return Ok(());
                }
                Ok(None) => {}
                Err(_) => {
                    count(|s| &s.tls_not_found);
                    return Ok(());
                }
            }
        }
        if out.prefix.len() >= MAX_CLIENT_HELLO {
            count(|s| &s.client_hello_too_large);
            return Err(InspectError::TooLarge);
        }
        read_more(stream, &mut out.prefix).await?;
    }
}

async fn http_inspector(
    stream: &TcpStream,
    stats: &InspectorStats,
    out: &mut Inspected,
) -> Result<(), InspectError> {
    loop {
        match classify_http(&out.prefix) {
            HttpGuess::Need => {}
            HttpGuess::Found(protocol) => {
                match protocol {
                    "h2c" => stats.http2_found.inc(),
                    "http/1.0" => stats.http10_found.inc(),
                    _ => stats.http11_found.inc(),
                }
                out.application_protocols = vec![protocol.to_string()];
                return Ok(());
            }
            HttpGuess::NotHttp => {
                stats.http_not_found.inc();
                return Ok(());
            }
        }
        if out.prefix.len() >= MAX_HTTP_INSPECT {
            stats.http_not_found.inc();
            return Ok(());
        }
        read_more(stream, &mut out.prefix).await?;
    }
}

#[derive(Debug, PartialEq, Eq)]
enum HttpGuess {
    Need,
    Found(&'static str),
    NotHttp,
}

/// HTTP/2's preface, or an HTTP/1.x request line.
fn classify_http(b: &[u8]) -> HttpGuess {
    let n = b.len().min(H2_PREFACE.len());
    if b[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            HttpGuess::Found("h2c")
        } else {
            HttpGuess::Need
        };
    }
    let Some(end) = b.windows(2).position(|w| w == b"\r\n") else {
        // A method is a token: anything else cannot start a request line.
        let token = b
            .iter()
            .take_while(|&&c| c != b' ')
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(c));
        return if token {
            HttpGuess::Need
        } else {
            HttpGuess::NotHttp
        };
    };
    let line = &b[..end];
    let mut parts = line.split(|&c| c == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return HttpGuess::NotHttp;
    };
    if method.is_empty() || target.is_empty() {
        return HttpGuess::NotHttp;
    }
    match version {
        b"HTTP/1.1" => HttpGuess::Found("http/1.1"),
        b"HTTP/1.0" => HttpGuess::Found("http/1.0"),
        _ => HttpGuess::NotHttp,
    }
}

/// Envoy's `Network::Utility::getOriginalDst`: the destination before an iptables
/// REDIRECT / DNAT (`SO_ORIGINAL_DST`, `IP6T_SO_ORIGINAL_DST`); None when the kernel
/// knows none (no conntrack entry: the socket was not redirected), and then Envoy
/// leaves the local address as it is.
fn original_dst(stream: &TcpStream) -> Option<std::net::SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    let local = stream.local_addr().ok()?;
    if local.is_ipv4() {
        let sin = getsockopt(stream, sockopt::OriginalDst).ok()?;
        let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        Some(std::net::SocketAddr::from((ip, u16::from_be(sin.sin_port))))
    } else {
        let sin6 = getsockopt(stream, sockopt::Ip6tOriginalDst).ok()?;
        let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
        Some(std::net::SocketAddr::from((
            ip,
            u16::from_be(sin6.sin6_port),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_inspector_classifies_request_lines_and_the_preface() {
        assert_eq!(
            classify_http(b"GET / HTTP/1.1\r\n"),
            HttpGuess::Found("http/1.1")
        );
        assert_eq!(
            classify_http(b"GET / HTTP/1.0\r\nHost"),
            HttpGuess::Found("http/1.0")
        );
        assert_eq!(classify_http(H2_PREFACE), HttpGuess::Found("h2c"));
        assert_eq!(classify_http(b"PRI * HT"), HttpGuess::Need);
        assert_eq!(classify_http(b"GET /long"), HttpGuess::Need);
        assert_eq!(classify_http(b"\x16\x03\x01"), HttpGuess::NotHttp);
        assert_eq!(classify_http(b"GET / SPDY/3\r\n"), HttpGuess::NotHttp);
    }
}
