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

pub use crate::config::local_reply::{
    BodyFormat, BodyFormatKind, BodyText, Comparison, HeaderValueMatch, LOCAL_REPLY_BODY,
    LocalReplyConfig, ReplyFilter, ReplyMapper,
};

impl BodyText {
    pub fn parse(s: &str) -> Result<Self, String> {
        s.split(LOCAL_REPLY_BODY)
            .map(crate::access_log::Format::parse)
            .collect::<Result<Vec<_>, _>>()
            .map(BodyText)
    }

    fn render(&self, record: &crate::access_log::LogRecord, body: &[u8], out: &mut String) {
        for (i, f) in self.0.iter().enumerate() {
            if i > 0 {
                out.push_str(&String::from_utf8_lossy(body));
            }
            f.render(record, out);
        }
    }
}

impl ReplyFilter {
    fn matches(&self, status: u16, flags: &str, request: Option<&HeaderMap>) -> bool {
        match self {
            ReplyFilter::Status(cmp, value) => match cmp {
                Comparison::Eq => status == *value,
                Comparison::Ge => status >= *value,
                Comparison::Le => status <= *value,
                Comparison::Ne => status != *value,
            },
            ReplyFilter::Flags(wanted) => {
                let set: Vec<&str> = flags.split(',').filter(|f| *f != "-").collect();
                if wanted.is_empty() {
                    !set.is_empty()
                } else {
                    wanted.iter().any(|w| set.contains(&w.as_str()))
                }
            }
            ReplyFilter::Header {
                name,
                matcher,
                invert,
            } => {
                let value = request
                    .and_then(|h| h.get(name))
                    .and_then(|v| v.to_str().ok());
                let hit = match (matcher, value) {
                    (HeaderValueMatch::Present(p), v) => v.is_some() == *p,
                    (_, None) => false,
                    (HeaderValueMatch::Exact(e), Some(v)) => v == e,
                    (HeaderValueMatch::Prefix(e), Some(v)) => v.starts_with(e.as_str()),
                    (HeaderValueMatch::Suffix(e), Some(v)) => v.ends_with(e.as_str()),
                    (HeaderValueMatch::Contains(e), Some(v)) => v.contains(e.as_str()),
                };
                hit != *invert
            }
            ReplyFilter::And(all) => all.iter().all(|f| f.matches(status, flags, request)),
            ReplyFilter::Or(any) => any.iter().any(|f| f.matches(status, flags, request)),
        }
    }
}

impl LocalReplyConfig {
    /// Whether rendering needs the request's record (its headers).
    pub fn needs_record(&self) -> bool {
        self.body_format.is_some() || !self.mappers.is_empty()
    }

    /// Rewrites `reply` and its `headers` as Envoy's `LocalReplyImpl::rewrite`.
    /// `record` describes the request (its response code is set here).
    pub fn rewrite(
        &self,
        reply: &mut LocalReply,
        headers: &mut HeaderMap,
        record: &mut crate::access_log::LogRecord,
    ) {
        let status = reply.status.as_u16();
        let mut format = self.body_format.as_ref();
        for mapper in &self.mappers {
            if !mapper
                .filter
                .matches(status, reply.flags, record.request_headers.as_ref())
            {
                continue;
            }
            if let Some(body) = &mapper.body {
                reply.body = body.clone();
            }
            for (name, value, append) in &mapper.headers_to_add {
                if *append {
                    headers.append(name.clone(), value.clone());
                } else {
                    headers.insert(name.clone(), value.clone());
                }
            }
            if let Some(code) = mapper.status_code
                && let Ok(s) = StatusCode::from_u16(code)
            {
                reply.status = s;
            }
            if mapper.body_format_override.is_some() {
                format = mapper.body_format_override.as_ref();
            }
            break;
        }
        let Some(format) = format else {
            return;
        };
        record.response_code = reply.status.as_u16();
        record.response_flags = reply.flags;
        record.response_code_details = reply.details;
        let mut out = String::new();
        match &format.kind {
            BodyFormatKind::Text(t) => t.render(record, &reply.body, &mut out),
            BodyFormatKind::Json(fields) => {
                let mut map = serde_json::Map::new();
                for (k, t) in fields {
                    let mut v = String::new();
                    t.render(record, &reply.body, &mut v);
                    map.insert(k.clone(), serde_json::Value::String(v));
                }
                out = serde_json::Value::Object(map).to_string();
                out.push('\n');
            }
        }
        reply.body = Bytes::from(out);
        headers.insert(http::header::CONTENT_TYPE, format.content_type.clone());
    }
}
