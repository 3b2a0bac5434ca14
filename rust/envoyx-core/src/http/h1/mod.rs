//! envoyx's HTTP/1.1 server codec for downstream connections, on `httparse`.
//!
//! Why envoyx owns it: hyper's HTTP/1 server keeps an 8 KiB read buffer and a write
//! buffer per connection for the connection's whole life, and its connection
//! future is large; idle keep-alive connections cost ≈ 20 KiB each. Here an idle
//! connection waits for readability holding no buffer; buffers come from a
//! per-worker free list when bytes arrive and go back when the request head is
//! parsed and nothing is pending. The head is parsed once (and screened for
//! Envoy's codec replies in the same pass), its bytes shared by the URI and
//! header values. Model: Pingora's `pingora-core/src/protocols/http/v1/server.rs`.

mod body;
mod buffers;
mod conn;
pub mod head;
pub mod transport;

pub use body::RequestBody;
pub(crate) use body::{InBuf, Shared};
pub(crate) use conn::serve;
pub use head::Refusal;
pub use transport::{Transport, poll_read, poll_write};

#[cfg(test)]
mod tests;
