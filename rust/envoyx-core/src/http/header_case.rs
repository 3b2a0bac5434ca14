//! Envoy's HTTP/1 header key formatters (`header_key_format`), on both sides.
//!
//! A codec writes a message's header names with the message's own formatter when
//! it has one, else with its connection's encode-only formatter (Envoy's
//! `StreamEncoderImpl::encodeHeadersBase`):
//!
//! - `proper_case_words` is encode-only: the codec configured with it Proper-Cases
//!   every name it writes (the connection manager's: responses; a cluster's:
//!   requests) unless the message carries its own formatter.
//! - `preserve_case` is stateful: the codec configured with it remembers how the
//!   names it reads were spelled ([`HeaderCase`], Envoy's
//!   `PreserveCaseHeaderFormatter`) and attaches that to the message
//!   ([`RecordedCase`], an extension), so the codec on the other side writes them
//!   so — the connection manager's for requests, a cluster's for responses (with
//!   the reason phrase under `forward_reason_phrase`). Names the peer did not send
//!   are lowercase, or Proper-Cased under `formatter_type_on_envoy_headers`.
//!
//! The downstream codec (http/h1) records while it parses and formats the head it
//! encodes. Upstream, hyper's client holds names lowercase only, so
//! [`CaseIo`] sits under it on HTTP/1.1 connections: it rewrites the names of the
//! request head hyper writes (same length, so byte counts are unchanged) and
//! records the names of the response head hyper reads. With nothing configured it
//! costs one atomic load per read or write and no allocation.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::{HeaderKeyFormat, PreserveCase};

/// The spelling of the header names one HTTP/1 message arrived with.
#[derive(Debug, Default)]
pub struct HeaderCase {
    /// The first spelling of each name (Envoy keeps the first: `Foo` then `foo`
    /// are both written `Foo`).
    names: Vec<Bytes>,
    /// `formatter_type_on_envoy_headers: PROPER_CASE`: names not recorded are
    /// Proper-Cased.
    proper_case_others: bool,
    /// The response's reason phrase, under `forward_reason_phrase`.
    reason: Option<Bytes>,
}

impl HeaderCase {
    pub fn new(settings: PreserveCase) -> Self {
        HeaderCase {
            names: Vec::new(),
            proper_case_others: settings.proper_case_envoy_headers,
            reason: None,
        }
    }

    /// Remembers `name` as it was spelled, unless a spelling of it is known.
    pub fn record(&mut self, name: Bytes) {
        if !self.names.iter().any(|n| n.eq_ignore_ascii_case(&name)) {
            self.names.push(name);
        }
    }

    fn spelling(&self, name: &[u8]) -> Option<&[u8]> {
        self.names
            .iter()
            .find(|n| n.eq_ignore_ascii_case(name))
            .map(|n| &n[..])
    }

    /// The reason phrase to write instead of the status code's own.
    pub fn reason(&self) -> Option<&[u8]> {
        self.reason.as_deref().filter(|r| !r.is_empty())
    }
}

/// A message's [`HeaderCase`], in its extensions (shared by a request's tries).
#[derive(Debug, Clone)]
pub struct RecordedCase(pub Arc<HeaderCase>);

/// How the names of one head are written.
#[derive(Debug, Clone, Copy)]
pub enum KeyFormat<'a> {
    ProperCase,
    Preserve(&'a HeaderCase),
}

impl<'a> KeyFormat<'a> {
    /// The message's own formatter, else the codec's encode-only one (None:
    /// lowercase, as held).
    pub fn choose(recorded: Option<&'a RecordedCase>, configured: HeaderKeyFormat) -> Option<Self> {
        match (recorded, configured) {
            (Some(r), _) => Some(KeyFormat::Preserve(&r.0)),
            (None, HeaderKeyFormat::ProperCase) => Some(KeyFormat::ProperCase),
            (None, _) => None,
        }
    }

    fn apply(self, name: &mut [u8]) {
        match self {
            KeyFormat::ProperCase => proper_case(name),
            KeyFormat::Preserve(case) => match case.spelling(name) {
                Some(spelling) => name.copy_from_slice(spelling),
                None if case.proper_case_others => proper_case(name),
                None => {}
            },
        }
    }
}

/// Envoy's `ProperCaseHeaderKeyFormatter`: the first letter, and every letter
/// after a character that is neither a letter nor a digit, in upper case
/// (`x-b3-traceid` → `X-B3-Traceid`, `a_b.c` → `A_B.C`).
pub fn proper_case(name: &mut [u8]) {
    let mut capitalize = true;
    for c in name.iter_mut() {
        if capitalize && c.is_ascii_alphabetic() {
            c.make_ascii_uppercase();
        }
        capitalize = !c.is_ascii_alphanumeric();
    }
}

/// Rewrites in place the header names of the head at the start of `head` (a
/// start line, header lines, an empty line); bytes after the head are left.
pub fn format_head(head: &mut [u8], format: KeyFormat<'_>) {
    let Some(mut line) = find_crlf(head, 0).map(|e| e + 2) else {
        return;
    };
    while line < head.len() && !head[line..].starts_with(b"\r\n") {
        let Some(end) = find_crlf(head, line) else {
            return;
        };
        if let Some(colon) = head[line..end].iter().position(|b| *b == b':') {
            format.apply(&mut head[line..line + colon]);
        }
        line = end + 2;
    }
}

/// Envoy's header key formatters on the response head encoded at `start` of
/// `out` (downstream): the case the upstream's names came with (a cluster's
/// preserve_case, with its reason phrase), else the connection manager's
/// `proper_case_words`.
pub fn format_response_head(
    parts: &http::response::Parts,
    configured: HeaderKeyFormat,
    out: &mut Vec<u8>,
    start: usize,
) {
    let recorded = parts.extensions.get::<RecordedCase>();
    let Some(format) = KeyFormat::choose(recorded, configured) else {
        return;
    };
    format_head(&mut out[start..], format);
    if let Some(reason) = recorded.and_then(|r| r.0.reason()) {
        replace_reason(out, start, reason);
    }
}

/// Replaces the reason phrase of the status line at `start` of `out`.
pub fn replace_reason(out: &mut Vec<u8>, start: usize, reason: &[u8]) {
    // "HTTP/1.1 200 " is 13 bytes.
    let from = start + 13;
    if let Some(end) = find_crlf(out, start)
        && end >= from
    {
        out.splice(from..end, reason.iter().copied());
    }
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| p + from)
}

/// The largest response head recorded; a longer one is passed on unrecorded
/// (hyper refuses heads past its own limit anyway).
const MAX_RECORDED_HEAD: usize = 128 * 1024;

/// What one upstream HTTP/1.1 connection's [`CaseIo`] is asked to do for the
/// request in flight (armed by the pool before hyper writes the request).
#[derive(Debug, Default)]
pub struct CaseSlot {
    /// Something is armed or under way: the only thing read when nothing is.
    busy: AtomicBool,
    state: Mutex<SlotState>,
}

#[derive(Debug, Default)]
struct SlotState {
    /// The next request head's names are written so.
    write: Option<WriteFormat>,
    /// The rewritten head being written, and how much of it went out.
    pending: Option<(Vec<u8>, usize)>,
    /// The response head being read, to record its names.
    read: Option<(PreserveCase, Vec<u8>)>,
    recorded: Option<RecordedCase>,
}

#[derive(Debug)]
enum WriteFormat {
    ProperCase,
    Preserve(RecordedCase),
}

impl CaseSlot {
    /// Prepares the connection for `req`: its head is written with the request's
    /// recorded case, else the cluster's `proper_case_words`; the response's
    /// names are recorded under the cluster's `preserve_case`. Whether a
    /// response case will be recorded ([`CaseSlot::take_recorded`]).
    pub fn arm<B>(&self, req: &http::Request<B>, cluster: HeaderKeyFormat) -> bool {
        let write = match (req.extensions().get::<RecordedCase>(), cluster) {
            (Some(r), _) => Some(WriteFormat::Preserve(r.clone())),
            (None, HeaderKeyFormat::ProperCase) => Some(WriteFormat::ProperCase),
            (None, _) => None,
        };
        let read = cluster.preserve();
        if write.is_none() && read.is_none() {
            return false;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *state = SlotState {
            write,
            pending: None,
            read: read.map(|p| (p, Vec::new())),
            recorded: None,
        };
        self.busy.store(true, Ordering::Release);
        read.is_some()
    }

    /// The recorded case of the response head just read.
    pub fn take_recorded(&self) -> Option<RecordedCase> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.read = None;
        self.settle(&state);
        state.recorded.take()
    }

    fn settle(&self, state: &SlotState) {
        if state.write.is_none() && state.pending.is_none() && state.read.is_none() {
            self.busy.store(false, Ordering::Release);
        }
    }

    /// The bytes to write for `buf` (the start of what hyper writes): the
    /// rewritten head while one is due, else None (write `buf` itself).
    fn rewrite<'s>(state: &'s mut SlotState, buf: &[u8]) -> Option<&'s [u8]> {
        if state.pending.is_none()
            && let Some(format) = state.write.take()
        {
            // hyper encodes a request's head into one buffer: its end is in `buf`.
            let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
            let mut head = buf[..end].to_vec();
            match &format {
                WriteFormat::ProperCase => format_head(&mut head, KeyFormat::ProperCase),
                WriteFormat::Preserve(r) => format_head(&mut head, KeyFormat::Preserve(&r.0)),
            }
            state.pending = Some((head, 0));
        }
        let (head, sent) = state.pending.as_ref()?;
        let n = (head.len() - sent).min(buf.len());
        Some(&head[*sent..sent + n])
    }

    /// `n` bytes of the rewritten head went out.
    fn wrote(&self, state: &mut SlotState, n: usize) {
        if let Some((head, sent)) = state.pending.as_mut() {
            *sent += n;
            if *sent >= head.len() {
                state.pending = None;
                self.settle(state);
            }
        }
    }

    /// Bytes hyper read: the response head's names are recorded once it is whole
    /// (interim 1xx heads are skipped).
    fn observe(&self, data: &[u8]) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some((settings, buf)) = state.read.as_mut() else {
            return;
        };
        let searched = buf.len().saturating_sub(3);
        buf.extend_from_slice(data);
        let mut from = searched;
        loop {
            let Some(end) = buf[from..]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map(|p| p + from + 4)
            else {
                if buf.len() > MAX_RECORDED_HEAD {
                    state.read = None;
                    self.settle(&state);
                }
                return;
            };
            let head = &buf[..end];
            // Interim 1xx heads come before the response's own; a 101 is the
            // response (an upgrade: what follows is the tunnel's).
            if head.get(9) == Some(&b'1') && head.get(9..12) != Some(&b"101"[..]) {
                buf.drain(..end);
                from = 0;
                continue;
            }
            let case = record_response_head(head, *settings);
            state.recorded = Some(RecordedCase(Arc::new(case)));
            state.read = None;
            self.settle(&state);
            return;
        }
    }
}

/// The case of a response head's names (and its reason phrase, if forwarded).
fn record_response_head(head: &[u8], settings: PreserveCase) -> HeaderCase {
    let mut case = HeaderCase::new(settings);
    let mut lines = head.split(|b| *b == b'\n');
    if let Some(status) = lines.next()
        && settings.forward_reason_phrase
    {
        let status = status.strip_suffix(b"\r").unwrap_or(status);
        // "HTTP/1.1 200 Reason"
        if let Some(reason) = status.get(13..) {
            case.reason = Some(Bytes::copy_from_slice(reason));
        }
    }
    for line in lines {
        if let Some(colon) = line.iter().position(|b| *b == b':') {
            case.record(Bytes::copy_from_slice(&line[..colon]));
        }
    }
    case
}

/// An upstream HTTP/1.1 connection's stream, under hyper's client: rewrites
/// request heads and records response heads as its [`CaseSlot`] is armed.
#[derive(Debug)]
pub struct CaseIo<T> {
    inner: T,
    slot: Arc<CaseSlot>,
}

impl<T> CaseIo<T> {
    pub fn new(inner: T, slot: Arc<CaseSlot>) -> Self {
        CaseIo { inner, slot }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CaseIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.slot.busy.load(Ordering::Acquire)
            && let Poll::Ready(Ok(())) = polled
        {
            self.slot.observe(&buf.filled()[before..]);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CaseIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if !self.slot.busy.load(Ordering::Acquire) {
            return Pin::new(&mut self.inner).poll_write(cx, buf);
        }
        let this = &mut *self;
        let mut state = this.slot.state.lock().unwrap_or_else(|e| e.into_inner());
        let polled = match CaseSlot::rewrite(&mut state, buf) {
            Some(head) => Pin::new(&mut this.inner).poll_write(cx, head),
            None => return Pin::new(&mut this.inner).poll_write(cx, buf),
        };
        if let Poll::Ready(Ok(n)) = polled {
            this.slot.wrote(&mut state, n);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if !self.slot.busy.load(Ordering::Acquire) {
            return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        }
        // The head is hyper's first buffer: it goes alone.
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        self.poll_write(cx, first)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn formatted(head: &str, format: KeyFormat<'_>) -> String {
        let mut bytes = head.as_bytes().to_vec();
        format_head(&mut bytes, format);
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn proper_case_follows_envoy() {
        for (name, want) in [
            ("x-b3-traceid", "X-B3-Traceid"),
            ("a_b.c", "A_B.C"),
            ("1abc", "1abc"),
            ("content-type", "Content-Type"),
            ("x--y", "X--Y"),
        ] {
            let mut n = name.as_bytes().to_vec();
            proper_case(&mut n);
            assert_eq!(std::str::from_utf8(&n).unwrap(), want);
        }
    }

    #[test]
    fn preserve_keeps_the_first_spelling_and_formats_the_rest() {
        let mut case = HeaderCase::new(PreserveCase {
            forward_reason_phrase: false,
            proper_case_envoy_headers: true,
        });
        case.record(Bytes::from_static(b"X-Mixed"));
        case.record(Bytes::from_static(b"x-mixed"));
        case.record(Bytes::from_static(b"HOST"));
        let head = "GET / HTTP/1.1\r\nhost: a\r\nx-mixed: 1\r\nx-mixed: 2\r\nx-request-id: 3\r\n\r\nbody: x\r\n";
        assert_eq!(
            formatted(head, KeyFormat::Preserve(&case)),
            "GET / HTTP/1.1\r\nHOST: a\r\nX-Mixed: 1\r\nX-Mixed: 2\r\nX-Request-Id: 3\r\n\r\nbody: x\r\n"
        );
    }

    #[test]
    fn the_reason_phrase_is_replaced() {
        let mut out = b"xxHTTP/1.1 201 Created\r\na: b\r\n\r\n".to_vec();
        replace_reason(&mut out, 2, b"Very Created");
        assert_eq!(&out[..], b"xxHTTP/1.1 201 Very Created\r\na: b\r\n\r\n");
    }

    #[test]
    fn a_response_head_is_recorded_after_interim_ones() {
        let slot = CaseSlot::default();
        let req = http::Request::new(());
        let settings = PreserveCase {
            forward_reason_phrase: true,
            proper_case_envoy_headers: false,
        };
        assert!(slot.arm(&req, HeaderKeyFormat::PreserveCase(settings)));
        slot.observe(b"HTTP/1.1 100 Continue\r\nX-Early: 1\r\n\r\nHTTP/1.1 201 Very");
        slot.observe(b" Created\r\nX-Up: 1\r\nSet-Cookie: a\r\nset-cookie: b\r\n\r\nbody");
        let case = slot.take_recorded().unwrap();
        assert_eq!(case.0.reason(), Some(&b"Very Created"[..]));
        assert_eq!(case.0.names, vec!["X-Up", "Set-Cookie"]);
        assert!(!slot.busy.load(Ordering::Acquire));
        // A 101 is the response: the tunnel's bytes after it are not read as a head.
        assert!(slot.arm(&req, HeaderKeyFormat::PreserveCase(settings)));
        slot.observe(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n\x81\x00");
        let case = slot.take_recorded().unwrap();
        assert_eq!(case.0.names, vec!["Upgrade"]);
    }
}
