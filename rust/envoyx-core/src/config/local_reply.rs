//! `local_reply_config` as configured: how a connection manager's local replies
//! are mapped and formatted. Applying it to a reply is the connection manager's
//! (`crate::http::local_reply`).

use bytes::Bytes;
use http::{HeaderName, HeaderValue};

/// `local_reply_config`, compiled: the first mapper whose filter matches a
/// local reply rewrites its status, body and headers (and may name its own
/// body format); then the body format renders the body (Envoy's
/// `LocalReplyImpl::rewrite`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalReplyConfig {
    pub mappers: Vec<ReplyMapper>,
    pub body_format: Option<BodyFormat>,
}

/// One `mappers[]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplyMapper {
    pub filter: ReplyFilter,
    pub status_code: Option<u16>,
    pub body: Option<Bytes>,
    pub body_format_override: Option<BodyFormat>,
    /// `headers_to_add`: (name, value, append).
    pub headers_to_add: Vec<(HeaderName, HeaderValue, bool)>,
}

/// The `AccessLogFilter` subset Envoy's local replies are mapped by.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyFilter {
    /// `status_code_filter`: the reply's status compared with a value.
    Status(Comparison, u16),
    /// `response_flag_filter`: any of these flags (empty: any flag at all).
    Flags(Vec<String>),
    /// `header_filter`: a request header's presence or value.
    Header {
        name: HeaderName,
        matcher: HeaderValueMatch,
        invert: bool,
    },
    And(Vec<ReplyFilter>),
    Or(Vec<ReplyFilter>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Eq,
    Ge,
    Le,
    Ne,
}

/// A `header_filter`'s value test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderValueMatch {
    Present(bool),
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
}

/// `body_format` / `body_format_override` (a `SubstitutionFormatString`):
/// text or JSON fields, each split at `%LOCAL_REPLY_BODY%`.
#[derive(Debug, Clone, PartialEq)]
pub struct BodyFormat {
    pub kind: BodyFormatKind,
    /// `content_type` (default `text/plain`, JSON `application/json`).
    pub content_type: HeaderValue,
}

#[derive(Debug, Clone, PartialEq)]
pub enum BodyFormatKind {
    Text(BodyText),
    Json(Vec<(String, BodyText)>),
}

/// A format string with the reply's body where `%LOCAL_REPLY_BODY%` stood.
#[derive(Debug, Clone, PartialEq)]
pub struct BodyText(pub(crate) Vec<crate::access_log::Format>);

pub const LOCAL_REPLY_BODY: &str = "%LOCAL_REPLY_BODY%";
