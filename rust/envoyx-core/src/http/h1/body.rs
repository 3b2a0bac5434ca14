//! The connection's read side, shared by the connection and the body of its
//! current request, and that body: Content-Length or chunked (with trailers),
//! decoded from the connection's read buffer as the body's reader (the upstream
//! request) polls it, so bodies stream and are never buffered whole.

use std::cell::{Cell, RefCell};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use http_body::{Body, Frame, SizeHint};

use super::buffers;
use super::head::{Framing, MAX_HEAD, MAX_HEADERS, find};
use super::transport::{self, Transport};
use crate::http::body::{BodyError, StreamWatch};
use crate::stats::Counter;

/// Bytes read and not yet consumed: `bytes[start..end]`.
#[derive(Debug)]
pub struct InBuf {
    bytes: Vec<u8>,
    start: usize,
    end: usize,
}

impl InBuf {
    pub fn new() -> Self {
        InBuf {
            bytes: buffers::take_read(),
            start: 0,
            end: 0,
        }
    }

    /// Bytes a listener filter read before the codec started, as if it had.
    pub fn from_prefix(mut bytes: Vec<u8>) -> Self {
        let end = bytes.len();
        bytes.resize(end.max(buffers::READ_SIZE), 0);
        InBuf {
            bytes,
            start: 0,
            end,
        }
    }

    pub fn pending(&self) -> &[u8] {
        &self.bytes[self.start..self.end]
    }

    pub fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Room to read into: compacted, and grown (up to a head's limit) when full.
    pub fn space_mut(&mut self) -> Option<&mut [u8]> {
        if self.end == self.bytes.len() {
            if self.start > 0 {
                self.bytes.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.bytes.len() <= MAX_HEAD + 1024 {
                let len = self.bytes.len() * 2;
                self.bytes.resize(len, 0);
            } else {
                return None;
            }
        }
        Some(&mut self.bytes[self.end..])
    }

    /// `n` bytes were read into [`Self::space_mut`].
    pub fn advance(&mut self, n: usize) {
        self.end += n;
    }

    pub fn release(self) {
        buffers::give_read(self.bytes);
    }
}

/// Where the current request's body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyState {
    Done,
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers,
    Failed(&'static str),
}

/// The read side of the connection.
pub struct ReadSide {
    /// None while idle (no buffer held).
    pub buf: Option<InBuf>,
    pub body: BodyState,
    /// The peer ended its side (or the connection failed).
    pub eof: bool,
    /// `100 Continue` is owed once the body is first read: bytes already written.
    pub expect_continue: Option<usize>,
    /// Under `proxy_100_continue` the `100 Continue` is owed only once the upstream
    /// answered one; until then the body is read without it.
    pub continue_gate: Option<std::sync::Arc<crate::upstream::ContinueGate>>,
    /// The connection waits for the body to end (to watch the peer again).
    pub waiter: Option<Waker>,
    /// Bytes beyond the current request were read (a pipelined request).
    pub ahead: bool,
}

/// What the connection and its current request body share.
pub struct Shared {
    pub io: Box<dyn Transport>,
    pub rx: Counter,
    pub tx: Counter,
    pub read: RefCell<ReadSide>,
    /// The request the current body belongs to; older bodies read nothing.
    pub request_seq: Cell<u64>,
}

impl Shared {
    pub fn new(io: Box<dyn Transport>, rx: Counter, tx: Counter, buf: Option<InBuf>) -> Self {
        Shared {
            io,
            rx,
            tx,
            read: RefCell::new(ReadSide {
                buf,
                body: BodyState::Done,
                eof: false,
                expect_continue: None,
                continue_gate: None,
                waiter: None,
                ahead: false,
            }),
            request_seq: Cell::new(0),
        }
    }

    /// Reads more into the buffer (taking one if needed); Ok(0) at end of stream.
    pub fn poll_fill(&self, read: &mut ReadSide, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let buf = read.buf.get_or_insert_with(InBuf::new);
        let Some(space) = buf.space_mut() else {
            return Poll::Ready(Err(io::ErrorKind::OutOfMemory.into()));
        };
        let n = std::task::ready!(transport::poll_read(&*self.io, cx, space))?;
        buf.advance(n);
        if n == 0 {
            read.eof = true;
        }
        self.rx.add(n as u64);
        Poll::Ready(Ok(n))
    }

    /// Writes all of `buf[*pos..]`, advancing `pos`.
    pub fn poll_write_all(
        &self,
        cx: &mut Context<'_>,
        buf: &[u8],
        pos: &mut usize,
    ) -> Poll<io::Result<()>> {
        while *pos < buf.len() {
            let n = std::task::ready!(transport::poll_write(&*self.io, cx, &buf[*pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.tx.add(n as u64);
            *pos += n;
        }
        self.io.poll_flush(cx)
    }

    /// Starts the body of a new request; the body handle for it.
    pub fn begin_body(
        self: &Rc<Self>,
        framing: Framing,
        expect_continue: bool,
        continue_gate: Option<std::sync::Arc<crate::upstream::ContinueGate>>,
    ) -> RequestBody {
        let seq = self.request_seq.get() + 1;
        self.request_seq.set(seq);
        let mut read = self.read.borrow_mut();
        // Watch the peer again during this request (a pipelined one may have
        // stopped the watch during the last).
        read.ahead = false;
        read.body = match framing {
            Framing::None => BodyState::Done,
            Framing::Length(n) => BodyState::Length(n),
            Framing::Chunked => BodyState::ChunkSize,
        };
        read.expect_continue = (expect_continue && read.body != BodyState::Done).then_some(0);
        read.continue_gate = continue_gate;
        RequestBody {
            shared: (read.body != BodyState::Done).then(|| self.clone()),
            watch: None,
            seq,
            exact: match framing {
                Framing::None => Some(0),
                Framing::Length(n) => Some(n),
                Framing::Chunked => None,
            },
        }
    }
}

impl ReadSide {
    pub fn body_over(&self) -> bool {
        matches!(self.body, BodyState::Done | BodyState::Failed(_))
    }

    fn end_body(&mut self, state: BodyState) {
        self.body = state;
        if let Some(w) = self.waiter.take() {
            w.wake();
        }
    }
}

/// A downstream HTTP/1.1 request body.
pub struct RequestBody {
    /// None for a request without a body.
    shared: Option<Rc<Shared>>,
    seq: u64,
    /// The declared length (Content-Length), None when chunked.
    exact: Option<u64>,
    /// The stream's timers, told as the body moves.
    watch: Option<Rc<StreamWatch>>,
}

impl RequestBody {
    pub(crate) fn watch(&mut self, watch: Rc<StreamWatch>) {
        self.watch = Some(watch);
    }

    fn touch(&self, end: bool) {
        if let Some(w) = &self.watch {
            w.touch(end);
        }
    }
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody")
            .field("seq", &self.seq)
            .field("exact", &self.exact)
            .finish()
    }
}

/// One decoding step.
pub(super) enum Step {
    Frame(Frame<Bytes>),
    NeedMore,
    End,
    Fail(&'static str),
}

/// Decodes what the buffer holds of the body.
pub(super) fn decode(read: &mut ReadSide) -> Step {
    loop {
        let state = read.body;
        let Some(buf) = read.buf.as_mut() else {
            return match state {
                BodyState::Done => Step::End,
                BodyState::Failed(e) => Step::Fail(e),
                _ => Step::NeedMore,
            };
        };
        let p = buf.pending();
        match state {
            BodyState::Done => return Step::End,
            BodyState::Failed(e) => return Step::Fail(e),
            BodyState::Length(n) | BodyState::ChunkData(n) => {
                if p.is_empty() {
                    return Step::NeedMore;
                }
                let take = n.min(p.len() as u64) as usize;
                let data = Bytes::copy_from_slice(&p[..take]);
                buf.consume(take);
                let left = n - take as u64;
                let next = match (state, left) {
                    (BodyState::Length(_), 0) => BodyState::Done,
                    (BodyState::Length(_), l) => BodyState::Length(l),
                    (_, 0) => BodyState::ChunkDataEnd,
                    (_, l) => BodyState::ChunkData(l),
                };
                if next == BodyState::Done {
                    read.end_body(next);
                } else {
                    read.body = next;
                }
                return Step::Frame(Frame::data(data));
            }
            BodyState::ChunkSize => {
                let Some(nl) = p.iter().position(|b| *b == b'\n') else {
                    if p.len() > 4096 {
                        return fail(read, "chunk size line too long");
                    }
                    return Step::NeedMore;
                };
                let size = chunk_size(&p[..nl]);
                buf.consume(nl + 1);
                match size {
                    Some(0) => read.body = BodyState::Trailers,
                    Some(n) => read.body = BodyState::ChunkData(n),
                    None => return fail(read, "invalid chunk size"),
                }
            }
            BodyState::ChunkDataEnd => {
                if p.len() < 2 {
                    if p.first().is_some_and(|b| *b != b'\r') {
                        return fail(read, "invalid chunk end");
                    }
                    return Step::NeedMore;
                }
                if &p[..2] != b"\r\n" {
                    return fail(read, "invalid chunk end");
                }
                buf.consume(2);
                read.body = BodyState::ChunkSize;
            }
            BodyState::Trailers => {
                if p.starts_with(b"\r\n") {
                    buf.consume(2);
                    read.end_body(BodyState::Done);
                    return Step::End;
                }
                if p.len() < 2 {
                    return Step::NeedMore;
                }
                let Some(end) = find(p, b"\r\n\r\n") else {
                    if p.len() > MAX_HEAD {
                        return fail(read, "trailers too large");
                    }
                    return Step::NeedMore;
                };
                let trailers = parse_trailers(&p[..end + 4]);
                buf.consume(end + 4);
                return match trailers {
                    Some(t) => {
                        read.end_body(BodyState::Done);
                        Step::Frame(Frame::trailers(t))
                    }
                    None => fail(read, "invalid trailers"),
                };
            }
        }
    }
}

fn fail(read: &mut ReadSide, why: &'static str) -> Step {
    read.end_body(BodyState::Failed(why));
    Step::Fail(why)
}

/// `1a;ext=1\r` → 26: hex digits, then optional whitespace and extensions, CRLF.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r")?;
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if digits == 0 || digits > 16 {
        return None;
    }
    let rest = &line[digits..];
    let rest_ok = rest.iter().find(|b| **b != b' ' && **b != b'\t');
    if rest_ok.is_some_and(|b| *b != b';') {
        return None;
    }
    let hex = std::str::from_utf8(&line[..digits]).ok()?;
    u64::from_str_radix(hex, 16).ok()
}

fn parse_trailers(block: &[u8]) -> Option<HeaderMap> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::parse_headers(block, &mut headers) {
        Ok(httparse::Status::Complete((_, parsed))) => {
            let mut map = HeaderMap::with_capacity(parsed.len());
            for h in parsed {
                let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
                let value = HeaderValue::from_bytes(h.value).ok()?;
                map.append(name, value);
            }
            Some(map)
        }
        _ => None,
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let Some(shared) = this.shared.as_ref() else {
            return Poll::Ready(None);
        };
        if shared.request_seq.get() != this.seq {
            this.shared = None;
            return Poll::Ready(None);
        }
        let mut read = shared.read.borrow_mut();
        let gate_closed = read
            .continue_gate
            .as_ref()
            .is_some_and(|gate| read.expect_continue == Some(0) && !gate.poll_open(cx));
        if let Some(written) = read.expect_continue.as_mut().filter(|_| !gate_closed) {
            const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
            match shared.poll_write_all(cx, CONTINUE, written) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) => read.expect_continue = None,
                Poll::Ready(Err(_)) => {
                    read.expect_continue = None;
                    read.eof = true;
                    read.end_body(BodyState::Failed("connection failed"));
                }
            }
        }
        loop {
            match decode(&mut read) {
                Step::Frame(f) => {
                    this.touch(read.body == BodyState::Done);
                    return Poll::Ready(Some(Ok(f)));
                }
                Step::End => {
                    drop(read);
                    this.touch(true);
                    this.shared = None;
                    return Poll::Ready(None);
                }
                Step::Fail(why) => return Poll::Ready(Some(Err(BodyError::Http1(why)))),
                Step::NeedMore => match shared.poll_fill(&mut read, cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(n)) if n > 0 => {}
                    Poll::Ready(Ok(_)) => {
                        read.end_body(BodyState::Failed("connection closed mid-body"));
                    }
                    Poll::Ready(Err(_)) => {
                        read.eof = true;
                        read.end_body(BodyState::Failed("connection failed mid-body"));
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.shared {
            None => true,
            Some(s) => s.request_seq.get() != self.seq || s.read.borrow().body == BodyState::Done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.shared, self.exact) {
            (None, _) => SizeHint::with_exact(0),
            (Some(s), Some(_)) => match s.read.borrow().body {
                BodyState::Length(n) => SizeHint::with_exact(n),
                _ => SizeHint::with_exact(0),
            },
            (Some(_), None) => SizeHint::default(),
        }
    }
}
