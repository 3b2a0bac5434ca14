//! Request heads in, response heads out.
//!
//! A request head is parsed once, by `httparse`, and screened as Envoy's codec
//! screens it: `400 Bad Request` (with the reason as its body) for malformed heads,
//! both framings at once, bad `Transfer-Encoding` and (when so configured) header
//! names with underscores; `426 Upgrade Required` for HTTP/1.0, HTTP/0.9 and unknown
//! versions; `431` past 60 KiB of head or `max_headers_count` (100) headers. Heads
//! that stall get the 408 of the stream timer that fires. The head's bytes are
//! copied once into one `Bytes` that the URI and header values share. Responses are
//! written as hyper writes them (lowercase names, `content-length` when the body's
//! size is exact, else chunked, `date`).

use std::cell::RefCell;
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, StatusCode, Uri, Version};

use crate::config::{PreserveCase, UnderscoresAction};
use crate::http::header_case::{HeaderCase, RecordedCase};

/// Envoy's default `max_request_headers_kb`.
pub const MAX_HEAD: usize = 60 * 1024;
/// Envoy's default `max_headers_count`.
pub const MAX_HEADERS: usize = 100;

/// A request the codec answered itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub details: &'static str,
    /// The reply's body: the reason phrase for codec errors.
    pub body: &'static str,
    /// `%RESPONSE_FLAGS%`.
    pub flags: &'static str,
    pub cause: RefusalCause,
}

/// Why the codec answered: what the connection manager counts for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalCause {
    /// A malformed or refused head (`downstream_cx_protocol_error`).
    ProtocolError,
    /// A header name with an underscore under REJECT_REQUEST (also a protocol
    /// error, and `http1.requests_rejected_with_underscores_in_headers`).
    Underscore,
    /// A head that did not arrive in time: `request_headers_timeout`,
    /// `stream_idle_timeout`, `request_timeout` or `max_stream_duration`.
    HeaderTimeout,
    StreamIdle,
    RequestTimeout,
    MaxDuration,
}

impl Refusal {
    const fn new(status: u16, details: &'static str) -> Self {
        Refusal {
            status,
            details,
            body: reason(status),
            flags: "DPE",
            cause: RefusalCause::ProtocolError,
        }
    }

    /// A 408 for a head a stream timer cut short (Envoy's stream exists from the
    /// head's first byte).
    pub const fn timeout(cause: RefusalCause) -> Self {
        let (details, body, flags) = match cause {
            RefusalCause::StreamIdle => ("stream_idle_timeout", "stream timeout", "SI"),
            RefusalCause::RequestTimeout => ("request_overall_timeout", "request timeout", "-"),
            RefusalCause::MaxDuration => {
                ("max_duration_timeout", "downstream duration timeout", "-")
            }
            _ => ("request_header_timeout", "request header timeout", "-"),
        };
        Refusal {
            status: 408,
            details,
            body,
            flags,
            cause,
        }
    }

    /// The reply Envoy sends: for a codec error, the reason phrase as a text body.
    pub fn reply(self, server: &str) -> Vec<u8> {
        let body = self.body;
        let mut out = Vec::with_capacity(200);
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\ncontent-length: {}\r\ncontent-type: text/plain\r\ndate: ",
            self.status,
            reason(self.status),
            body.len()
        );
        extend_date(&mut out);
        let _ = write!(
            out,
            "\r\nserver: {server}\r\nconnection: close\r\n\r\n{body}"
        );
        out
    }

    pub fn body_len(self) -> u64 {
        self.body.len() as u64
    }
}

const fn reason(status: u16) -> &'static str {
    match status {
        408 => "Request Timeout",
        426 => "Upgrade Required",
        501 => "Not Implemented",
        431 => "Request Header Fields Too Large",
        _ => "Bad Request",
    }
}

/// What the connection manager's configuration asks of request heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadRules {
    /// `max_headers_count`.
    pub max_headers: usize,
    /// `headers_with_underscores_action`.
    pub underscores: UnderscoresAction,
    /// `max_request_headers_kb` in bytes.
    pub max_head: usize,
    /// `http_protocol_options.accept_http_10`.
    pub accept_http_10: bool,
    /// `http_protocol_options.allow_chunked_length`.
    pub allow_chunked_length: bool,
    /// `proxy_100_continue`: `Expect: 100-continue` is kept for the upstream.
    pub proxy_100_continue: bool,
    /// `http_protocol_options.header_key_format` preserve_case: the spelling of
    /// the request's header names is recorded for the upstream codec.
    pub preserve_case: Option<PreserveCase>,
}

impl Default for HeadRules {
    fn default() -> Self {
        HeadRules {
            max_headers: MAX_HEADERS,
            underscores: UnderscoresAction::Allow,
            max_head: MAX_HEAD,
            accept_http_10: false,
            allow_chunked_length: false,
            proxy_100_continue: false,
            preserve_case: None,
        }
    }
}

const CODEC_ERROR: Refusal = Refusal::new(400, "http1.codec_error");
const TOO_LARGE: Refusal = Refusal::new(431, "http1.headers_too_large");

/// How the request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// A parsed, accepted request head.
#[derive(Debug)]
pub struct Head {
    pub request: Request<()>,
    pub framing: Framing,
    pub keep_alive: bool,
    pub expect_continue: bool,
    /// Headers dropped for an underscore in their name (DROP_HEADER).
    pub dropped_underscores: u32,
}

#[derive(Debug)]
pub enum Parsed {
    /// More bytes are needed.
    Partial,
    /// A head of this many bytes.
    Head(Box<Head>, usize),
    Refused(Refusal),
}

/// Parses (and screens) the request head at the start of `buf`, by Envoy's defaults.
pub fn parse(buf: &[u8]) -> Parsed {
    parse_with(buf, HeadRules::default())
}

/// Parses (and screens) the request head at the start of `buf`.
pub fn parse_with(buf: &[u8], rules: HeadRules) -> Parsed {
    // Uninitialised slots, as hyper does: no 3 KiB of empty headers written per head.
    let mut headers =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    // More than the default only when configured so: those heads parse into the heap.
    let mut more = Vec::new();
    let slots = if rules.max_headers > MAX_HEADERS {
        more.resize_with(rules.max_headers, std::mem::MaybeUninit::uninit);
        &mut more[..]
    } else {
        &mut headers[..]
    };
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > rules.max_head => {
            return Parsed::Refused(TOO_LARGE);
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(e) => {
            // Decided on the whole head, as Envoy's codec does: its request line
            // first, then what httparse found.
            return match find(buf, b"\r\n\r\n") {
                None if buf.len() > rules.max_head => Parsed::Refused(TOO_LARGE),
                None => Parsed::Partial,
                Some(end) => Parsed::Refused(match screen_request_line(&buf[..end + 4]) {
                    Err(r) => r,
                    Ok(()) => match e {
                        httparse::Error::Version => Refusal::new(426, "http1.invalid_version"),
                        httparse::Error::TooManyHeaders => {
                            Refusal::new(431, "http1.too_many_headers")
                        }
                        _ => CODEC_ERROR,
                    },
                }),
            };
        }
    };
    if len > rules.max_head {
        return Parsed::Refused(TOO_LARGE);
    }
    if req.headers.len() > rules.max_headers {
        return Parsed::Refused(Refusal::new(431, "http1.too_many_headers"));
    }
    match build(buf, len, &req, rules) {
        Ok(head) => Parsed::Head(Box::new(head), len),
        Err(r) => Parsed::Refused(r),
    }
}

/// httparse tolerates some request lines Envoy's codec refuses, such as spaces
/// inside the target: a request line is exactly three tokens, and one without a
/// version is HTTP/0.9, which Envoy answers with 426.
fn screen_request_line(head: &[u8]) -> Result<(), Refusal> {
    let line_end = head
        .iter()
        .position(|b| *b == b'\r' || *b == b'\n')
        .unwrap_or(0);
    match head[..line_end].iter().filter(|b| **b == b' ').count() {
        2 => Ok(()),
        1 => Err(Refusal::new(426, "http1.invalid_version")),
        _ => Err(CODEC_ERROR),
    }
}

fn build(
    buf: &[u8],
    len: usize,
    req: &httparse::Request<'_, '_>,
    rules: HeadRules,
) -> Result<Head, Refusal> {
    let underscores = rules.underscores;
    screen_request_line(&buf[..len])?;
    // Envoy refuses HTTP/1.0 unless accept_http_10 is set.
    let version = match req.version {
        Some(1) => Version::HTTP_11,
        Some(0) if rules.accept_http_10 => Version::HTTP_10,
        _ => return Err(Refusal::new(426, "low_version")),
    };
    let raw = Bytes::copy_from_slice(&buf[..len]);
    let base = buf.as_ptr() as usize;
    let shared = |s: &[u8]| raw.slice_ref_at(s.as_ptr() as usize - base, s.len());

    let method =
        Method::from_bytes(req.method.unwrap_or_default().as_bytes()).map_err(|_| CODEC_ERROR)?;
    let path = req.path.unwrap_or_default();
    // `*` is a target of OPTIONS only.
    if path == "*" && method != Method::OPTIONS {
        return Err(CODEC_ERROR);
    }
    let mut uri = Uri::from_maybe_shared(shared(path.as_bytes())).map_err(|_| CODEC_ERROR)?;

    let mut map = HeaderMap::with_capacity(req.headers.len());
    let mut content_length: Option<u64> = None;
    let mut te = 0;
    let mut chunked = false;
    // HTTP/1.0 closes unless asked to keep the connection.
    let mut keep_alive = version == Version::HTTP_11;
    let mut expect_continue = false;
    let mut dropped_underscores = 0;
    // Only with preserve_case: the names are slices of the head's bytes.
    let mut case = rules.preserve_case.map(HeaderCase::new);
    for h in req.headers.iter() {
        if let Some(case) = case.as_mut() {
            case.record(shared(h.name.as_bytes()));
        }
        if underscores != UnderscoresAction::Allow && h.name.contains('_') {
            if underscores == UnderscoresAction::RejectRequest {
                return Err(Refusal {
                    cause: RefusalCause::Underscore,
                    ..Refusal::new(400, "http1.unexpected_underscore")
                });
            }
            dropped_underscores += 1;
            continue;
        }
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| CODEC_ERROR)?;
        let value = HeaderValue::from_maybe_shared(shared(h.value)).map_err(|_| CODEC_ERROR)?;
        match name {
            header::CONTENT_LENGTH => {
                let n = std::str::from_utf8(h.value)
                    .ok()
                    .map(str::trim)
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<u64>().ok());
                // Repeated Content-Length headers must agree (RFC 9110 §8.6).
                match n {
                    Some(n) if content_length.is_none_or(|prev| prev == n) => {
                        content_length = Some(n)
                    }
                    _ => return Err(Refusal::new(400, "http1.content_length_not_allowed")),
                }
            }
            header::TRANSFER_ENCODING => {
                // Envoy implements exactly one coding: `chunked`, alone.
                te += 1;
                chunked = te == 1 && trim(h.value).eq_ignore_ascii_case(b"chunked");
            }
            header::CONNECTION if has_token(h.value, b"close") => keep_alive = false,
            header::CONNECTION if has_token(h.value, b"keep-alive") => keep_alive = true,
            header::EXPECT if trim(h.value).eq_ignore_ascii_case(b"100-continue") => {
                expect_continue = true;
                // Envoy answers it itself and does not forward it, unless it is
                // to proxy the upstream's answer.
                if !rules.proxy_100_continue {
                    continue;
                }
            }
            _ => {}
        }
        map.append(name, value);
    }
    if te > 0 && content_length.is_some() {
        if !(chunked && rules.allow_chunked_length) {
            return Err(Refusal::new(
                400,
                "http1.content_length_and_chunked_not_allowed",
            ));
        }
        // The chunked framing wins; the length is not forwarded.
        map.remove(header::CONTENT_LENGTH);
    }
    if te > 0 && (!chunked || method == Method::CONNECT) {
        return Err(Refusal::new(501, "http1.invalid_transfer_encoding"));
    }
    // An absolute-form target names the host: it replaces `Host`, and the
    // request goes on with its path (Envoy's codec does the same).
    if uri.scheme().is_some()
        && let Some(authority) = uri.authority()
    {
        let host = HeaderValue::from_str(authority.as_str()).map_err(|_| CODEC_ERROR)?;
        map.insert(header::HOST, host);
        let origin = uri.path_and_query().map_or("/", |p| p.as_str());
        uri =
            Uri::try_from(if origin.is_empty() { "/" } else { origin }).map_err(|_| CODEC_ERROR)?;
    }
    let framing = if chunked {
        Framing::Chunked
    } else {
        match content_length {
            Some(n) if n > 0 => Framing::Length(n),
            _ => Framing::None,
        }
    };
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = map;
    if let Some(case) = case {
        request
            .extensions_mut()
            .insert(RecordedCase(std::sync::Arc::new(case)));
    }
    Ok(Head {
        request,
        framing,
        keep_alive,
        expect_continue,
        dropped_underscores,
    })
}

/// `Bytes::slice` by offset and length.
trait SliceAt {
    fn slice_ref_at(&self, offset: usize, len: usize) -> Bytes;
}

impl SliceAt for Bytes {
    fn slice_ref_at(&self, offset: usize, len: usize) -> Bytes {
        self.slice(offset..offset + len)
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

pub fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

/// The response body's length as the head announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// The body is over before it starts.
    Empty,
    Known(u64),
    Unknown,
}

/// How the response body goes out after its head.
#[derive(Debug, PartialEq, Eq)]
pub enum Encoder {
    /// No body bytes (HEAD, 204, 304, or empty).
    None,
    Length(u64),
    /// Chunked; trailers are sent only for the names the `trailer` header lists.
    Chunked(Option<Vec<HeaderName>>),
}

/// Writes the response head into `dst` as hyper writes it; the body's encoder and
/// whether the connection closes after this response.
pub fn encode_response(
    parts: &mut http::response::Parts,
    body: BodyLength,
    head_request: bool,
    keep_alive: bool,
    dst: &mut Vec<u8>,
) -> (Encoder, bool) {
    let status = parts.status;
    let mut last = !keep_alive;
    if last {
        match parts.headers.entry(header::CONNECTION) {
            header::Entry::Occupied(mut e) => {
                if !e.iter().any(|v| has_token(v.as_bytes(), b"close")) {
                    e.append(HeaderValue::from_static("close"));
                }
            }
            header::Entry::Vacant(e) => {
                e.insert(HeaderValue::from_static("close"));
            }
        }
    }
    if status == StatusCode::OK {
        dst.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        dst.extend_from_slice(b"HTTP/1.1 ");
        dst.extend_from_slice(status.as_str().as_bytes());
        dst.push(b' ');
        dst.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    let can_chunk = !head_request && can_have_content(status);
    let mut encoder = Encoder::Length(0);
    let mut wrote_len = false;
    let mut wrote_date = false;
    let mut trailer_names: Option<Vec<HeaderName>> = None;
    let mut previous: Option<&HeaderName> = None;
    for (name, value) in parts.headers.iter() {
        // A name's values follow each other; the joined ones are written at the first.
        let repeated = previous == Some(name);
        previous = Some(name);
        match *name {
            header::CONTENT_LENGTH => {
                if repeated || wrote_len {
                    continue;
                }
                match body {
                    BodyLength::Known(n) => encoder = Encoder::Length(n),
                    BodyLength::Unknown => {
                        match std::str::from_utf8(value.as_bytes())
                            .ok()
                            .and_then(|v| v.trim().parse().ok())
                        {
                            Some(n) => encoder = Encoder::Length(n),
                            None => continue,
                        }
                    }
                    BodyLength::Empty if !head_request => continue,
                    BodyLength::Empty => {}
                }
                wrote_len = true;
                write_header(dst, b"content-length", value.as_bytes());
            }
            header::TRANSFER_ENCODING => {
                if repeated || !can_chunk || wrote_len {
                    continue;
                }
                wrote_len = true;
                encoder = Encoder::Chunked(None);
                let joined = join(parts.headers.get_all(name).iter());
                let chunked_last = joined
                    .rsplit(|b| *b == b',')
                    .next()
                    .is_some_and(|t| trim(t).eq_ignore_ascii_case(b"chunked"));
                dst.extend_from_slice(b"transfer-encoding: ");
                dst.extend_from_slice(&joined);
                if !chunked_last {
                    dst.extend_from_slice(b", chunked");
                }
                dst.extend_from_slice(b"\r\n");
            }
            header::CONNECTION => {
                if repeated {
                    continue;
                }
                let joined = join(parts.headers.get_all(name).iter());
                if has_token(&joined, b"close") {
                    last = true;
                }
                write_header(dst, b"connection", &joined);
            }
            header::TRAILER => {
                if repeated || !can_chunk {
                    continue;
                }
                let joined = join(parts.headers.get_all(name).iter());
                if let Ok(text) = std::str::from_utf8(&joined) {
                    trailer_names.get_or_insert_with(Vec::new).extend(
                        text.split(',')
                            .filter_map(|s| HeaderName::from_bytes(s.trim().as_bytes()).ok()),
                    );
                }
                write_header(dst, b"trailer", &joined);
            }
            _ => {
                if *name == header::DATE {
                    wrote_date = true;
                }
                write_header(dst, name.as_str().as_bytes(), value.as_bytes());
            }
        }
    }
    if !wrote_len {
        encoder = match body {
            BodyLength::Unknown if can_chunk => {
                dst.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Encoder::Chunked(None)
            }
            BodyLength::Unknown => Encoder::None,
            BodyLength::Empty | BodyLength::Known(0) => {
                if !head_request && can_have_content(status) {
                    dst.extend_from_slice(b"content-length: 0\r\n");
                }
                Encoder::None
            }
            BodyLength::Known(n) => {
                if can_have_content(status) {
                    dst.extend_from_slice(b"content-length: ");
                    let _ = write!(dst, "{n}");
                    dst.extend_from_slice(b"\r\n");
                }
                Encoder::Length(n)
            }
        };
    }
    if let Encoder::Chunked(names) = &mut encoder {
        *names = trailer_names;
    }
    if !can_chunk || matches!(encoder, Encoder::Length(0)) {
        encoder = Encoder::None;
    }
    if !wrote_date {
        dst.extend_from_slice(b"date: ");
        extend_date(dst);
        dst.extend_from_slice(b"\r\n");
    }
    dst.extend_from_slice(b"\r\n");
    (encoder, last)
}

fn can_have_content(status: StatusCode) -> bool {
    !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

fn write_header(dst: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    dst.extend_from_slice(name);
    dst.extend_from_slice(b": ");
    dst.extend_from_slice(value);
    dst.extend_from_slice(b"\r\n");
}

fn join<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, v) in values.enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(v.as_bytes());
    }
    out
}

fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| trim(t).eq_ignore_ascii_case(token))
}

thread_local! {
    /// The `date` value, rendered once a second (as hyper caches it).
    static DATE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
}

pub fn extend_date(dst: &mut Vec<u8>) {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs || d.1.is_empty() {
            *d = (secs, httpdate::fmt_http_date(now));
        }
        dst.extend_from_slice(d.1.as_bytes());
    });
}
