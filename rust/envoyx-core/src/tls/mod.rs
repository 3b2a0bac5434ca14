//! TLS on rustls (with ring) through tokio-rustls: the server side of a listener's
//! filter chain ([`server`]), the client side of a cluster ([`client`]), the
//! checks of a peer's certificate ([`verify`]), SDS secrets ([`secrets`]) and the
//! `ssl.*` stats ([`stats`]). No TLS or X.509 parsing of envoyx's own: rustls reads
//! ClientHellos and records, webpki verifies chains, x509-parser reads SANs.

pub mod client;
pub mod files;
pub mod params;
pub mod peer;
pub mod secret_entry;
pub mod secrets;
pub mod server;
pub mod stats;
pub mod transport;
pub mod verify;

pub use client::ClientTlsContext;
pub use peer::PeerTls;
pub use secrets::SecretStore;
pub use server::ServerTlsContext;
pub use stats::SslStats;
pub use transport::TlsTransport;

/// Days until a certificate expires (0 once it has), as Envoy counts them.
pub fn days_until_expiration(not_after: i64) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    ((not_after - now) / 86_400).max(0)
}
