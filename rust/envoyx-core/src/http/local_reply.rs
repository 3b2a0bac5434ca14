//! A response envoyx generates itself, as Envoy's `sendLocalReply` does: no route,
//! direct responses, upstream failures, filter replies, codec errors.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};

pub struct LocalReply {
    pub status: StatusCode,
    pub body: Bytes,
    /// `%RESPONSE_FLAGS%` (`NR`, `UH`, `UF`, …).
    pub flags: &'static str,
    /// `%RESPONSE_CODE_DETAILS%`.
    pub details: &'static str,
    /// Headers a filter asked for, written over the defaults.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The whole header map, when response hooks have edited it.
    pub edited_headers: Option<HeaderMap>,
    /// Close the downstream connection after this reply (codec errors).
    pub close_connection: bool,
    /// The `grpc-status` of this reply to a gRPC request, when not the one
    /// Envoy derives from the HTTP status.
    pub grpc_status: Option<u8>,
}

impl LocalReply {
    pub fn new(
        status: u16,
        body: impl Into<Bytes>,
        flags: &'static str,
        details: &'static str,
    ) -> Self {
        LocalReply {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body: body.into(),
            flags,
            details,
            headers: Vec::new(),
            edited_headers: None,
            close_connection: false,
            grpc_status: None,
        }
    }
}

/// Envoy's `Grpc::Utility::httpToGrpcStatus`: the `grpc-status` of a local reply
/// to a gRPC request.
pub fn http_to_grpc_status(status: u16) -> u8 {
    match status {
        400 => 13,                   // INTERNAL
        401 => 16,                   // UNAUTHENTICATED
        403 => 7,                    // PERMISSION_DENIED
        404 => 12,                   // UNIMPLEMENTED
        429 | 502 | 503 | 504 => 14, // UNAVAILABLE
        _ => 2,                      // UNKNOWN
    }
}

/// A `grpc-message` value: the text percent-encoded as the gRPC spec asks
/// (everything outside printable ASCII, and `%`).
pub fn grpc_message(text: &[u8]) -> String {
    let mut out = String::with_capacity(text.len());
    for &b in text {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
    }
    out
}
