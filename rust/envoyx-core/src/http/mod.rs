//! HTTP: the connection manager, the router and the body types they stream.

pub mod body;
pub mod connection_manager;
pub mod filter;
mod filtering;
pub mod framing_guard;

pub use connection_manager::HttpConnectionManager;
