//! HTTP: the connection manager (per listener), the downstream connection, the
//! active stream of each request with its filters, local replies, and the body
//! types they stream. The router filter that ends each stream is in
//! [`crate::router`].

pub(crate) mod active_stream;
pub mod body;
pub(crate) mod connection;
pub mod connection_manager;
mod downstream;
pub mod filter;
mod filtering;
pub mod h1;
pub mod header_case;
pub mod headers;
pub mod internal_request;
pub mod local_reply;
pub(crate) mod native;
pub mod path_normalization;
pub(crate) mod upgrade;

pub use connection_manager::HttpConnectionManager;
pub use downstream::{serve_tcp, serve_tls};
