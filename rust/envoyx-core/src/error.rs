//! The core's one error type; the bindings map it to Python in one place.

use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration cannot be served; every problem, each with its field path.
    #[error("{}", .0.join("\n"))]
    Config(Vec<String>),
    /// A listener or the admin endpoint could not bind (Envoy's wording).
    #[error("cannot bind '{address}': {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Any other I/O failure, with what was being done.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The server is not in a state that allows the call.
    #[error("{0}")]
    State(String),
}

pub type Result<T> = std::result::Result<T, Error>;
