//! envoyx-core: the data plane of envoyx, an Envoy-compatible proxy.
//!
//! Pure Rust, no Python: the configuration model mapped from Envoy's v3 proto-JSON
//! ([`config`]), compiled route tables ([`router`]), the HTTP connection manager and
//! router ([`http`]), the TCP proxy ([`tcp`]), clusters and worker-local pools
//! ([`upstream`]), stats with Envoy's names ([`stats`]), access logs, the admin
//! endpoint and the [`server::Server`] that binds and runs it all.

pub mod access_log;
pub mod admin;
pub mod config;
pub mod error;
pub mod http;
pub mod io;
pub mod log;
pub mod router;
pub mod server;
pub mod stats;
pub mod tcp;
pub mod upstream;

pub use error::{Error, Result};
pub use server::{Server, ServerOptions};

/// Maps a canonical proto-JSON bootstrap text; every error found, with its path.
pub fn load_bootstrap(json: &str) -> Result<config::Bootstrap> {
    let doc: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| Error::Config(vec![format!("invalid JSON: {e}")]))?;
    config::map_bootstrap(&doc).map_err(Error::Config)
}
