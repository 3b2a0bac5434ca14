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
        }
    }
}
