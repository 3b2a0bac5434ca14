//! TLS on rustls (with ring) through tokio-rustls: the server side of a listener's
//! filter chain ([`server`]), the client side of a cluster ([`client`]), the
//! checks of a peer's certificate ([`verify`]), SDS secrets ([`secrets`]) and the
//! `ssl.*` stats ([`stats`]). No TLS or X.509 parsing of envoyx's own: rustls reads
//! ClientHellos and records, webpki verifies chains, x509-parser reads SANs.

pub mod client;
pub mod params;
pub mod secrets;
pub mod server;
pub mod stats;
pub mod transport;
pub mod verify;

pub use client::ClientTlsContext;
pub use secrets::SecretStore;
pub use server::{PeerTls, ServerTlsContext};
pub use stats::SslStats;
pub use transport::TlsTransport;
