//! HTTP/1 request screening in front of hyper, so that malformed requests get the
//! replies Envoy gives.
//!
//! hyper answers a request it cannot parse with a bare `400` (no body), silently drops
//! `Content-Length` when `Transfer-Encoding` is also present, and accepts HTTP/1.0
//! and oversized heads. Envoy answers `400 Bad Request` with a body for malformed
//! heads and for both framings at once, `426 Upgrade Required` for HTTP/1.0 and
//! other versions, and `431` past 60 KiB of headers. The guard watches the downstream
//! bytes on their way into hyper, follows request framing (heads, fixed and chunked
//! bodies) and, when a head must be refused and no request is in flight, writes
//! Envoy's reply itself and gives hyper end-of-stream. Refusals are recorded in
//! [`ConnectionScreen`] for the connection manager's stats and access log.

use std::cell::{Cell, RefCell};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Envoy's default `max_request_headers_kb`.
const MAX_HEAD: usize = 60 * 1024;
/// Envoy's default `max_headers_count`.
const MAX_HEADERS: usize = 100;

#[derive(Debug)]
enum State {
    Head,
    Fixed(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd(u8),
    Trailers,
    /// HTTP/2, an upgrade, or a refused request: stop watching.
    Off,
}

/// A request the guard answered itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub details: &'static str,
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self.status {
            400 => "Bad Request",
            426 => "Upgrade Required",
            431 => "Request Header Fields Too Large",
            _ => "Bad Request",
        }
    }

    /// The reply Envoy sends for a codec error: the reason phrase as a text body.
    fn reply(self, server: &str) -> Vec<u8> {
        let body = self.reason();
        let date = httpdate::fmt_http_date(std::time::SystemTime::now());
        format!(
            "HTTP/1.1 {} {body}\r\ncontent-length: {}\r\ncontent-type: text/plain\r\ndate: {date}\r\nserver: {server}\r\nconnection: close\r\n\r\n{body}",
            self.status,
            body.len()
        )
        .into_bytes()
    }

    pub fn body_len(self) -> u64 {
        self.reason().len() as u64
    }
}

/// What the guard and the connection's request handler share.
#[derive(Debug, Default)]
pub struct ConnectionScreen {
    /// Requests handed to the service and not yet finished; the guard only answers
    /// by itself when nothing is in flight, so replies stay in order.
    pub in_flight: Cell<u32>,
    pub refusals: RefCell<Vec<Refusal>>,
}

pub struct FramingGuard<T> {
    inner: T,
    state: State,
    /// The bytes of a head that is not complete yet: hyper sees a head only whole,
    /// once it has been checked.
    pending: Vec<u8>,
    /// A line of chunked framing being read (sizes and trailers pass through).
    line: Vec<u8>,
    /// Checked bytes waiting to be handed to hyper.
    out: Vec<u8>,
    out_pos: usize,
    screen: Rc<ConnectionScreen>,
    server_name: String,
    /// Envoy's reply being written, and how much of it is out.
    reply: Option<(Vec<u8>, usize)>,
    /// Hyper sees end-of-stream once `out` is drained.
    eof: bool,
}

/// What one read turned into.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// Every byte may go to hyper where it is.
    InPlace,
    /// Hand hyper these bytes instead (a head was held back, or released whole).
    Release(Vec<u8>),
    /// A head must be refused: `before` may still go to hyper; `everything` is all
    /// the bytes, for when hyper has to deal with the head itself.
    Refuse {
        before: Vec<u8>,
        everything: Vec<u8>,
        refusal: Refusal,
    },
}

impl<T> FramingGuard<T> {
    pub fn new(inner: T, screen: Rc<ConnectionScreen>, server_name: &str) -> Self {
        FramingGuard {
            inner,
            state: State::Head,
            pending: Vec::new(),
            line: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            screen,
            server_name: server_name.to_string(),
            reply: None,
            eof: false,
        }
    }

    fn process(&mut self, data: &[u8]) -> Outcome {
        // Created at the first head byte: from then on every byte of the read is
        // copied, so that a held-back head can be released in order.
        let mut release: Option<Vec<u8>> = None;
        let mut pos = 0;
        while pos < data.len() {
            let rest = &data[pos..];
            match &mut self.state {
                State::Off => {
                    if let Some(r) = release.as_mut() {
                        r.extend_from_slice(rest);
                    }
                    break;
                }
                State::Head if self.pending.is_empty() && release.is_none() => {
                    // The fast path: a whole head in this read is checked where it
                    // lies and left in hyper's buffer (no copy, no allocation).
                    if rest.starts_with(b"PRI * HTTP/2") {
                        self.state = State::Off;
                        break;
                    }
                    let Some(end) = find(rest, b"\r\n\r\n").map(|p| p + 4) else {
                        // Split across reads: held back from here on.
                        release = Some(data[..pos].to_vec());
                        continue;
                    };
                    match screen_head(&rest[..end]) {
                        Ok(next) => {
                            self.state = next;
                            pos += end;
                        }
                        Err(refusal) => {
                            return self.refuse(
                                data[..pos].to_vec(),
                                rest,
                                0,
                                refusal.status,
                                refusal.details,
                            );
                        }
                    }
                }
                State::Head => {
                    let released = release.get_or_insert_with(|| data[..pos].to_vec());
                    if self.pending.is_empty() && rest.starts_with(b"PRI * HTTP/2") {
                        self.state = State::Off;
                        released.extend_from_slice(rest);
                        break;
                    }
                    let held_before = self.pending.len();
                    let search_from = held_before.saturating_sub(3);
                    self.pending.extend_from_slice(rest);
                    let Some(end) = find(&self.pending[search_from..], b"\r\n\r\n")
                        .map(|p| search_from + p + 4)
                    else {
                        if self.pending.len() > MAX_HEAD {
                            let before = std::mem::take(released);
                            return self.refuse(
                                before,
                                rest,
                                held_before,
                                431,
                                "http1.headers_too_large",
                            );
                        }
                        break;
                    };
                    match screen_head(&self.pending[..end]) {
                        Ok(next) => self.state = next,
                        Err(refusal) => {
                            let before = std::mem::take(released);
                            return self.refuse(
                                before,
                                rest,
                                held_before,
                                refusal.status,
                                refusal.details,
                            );
                        }
                    }
                    released.extend_from_slice(&self.pending[..end]);
                    // Given back, not kept: an idle connection holds no buffer.
                    self.pending = Vec::new();
                    pos += end - held_before;
                }
                State::Fixed(n) => {
                    let take = (*n).min(rest.len() as u64) as usize;
                    *n -= take as u64;
                    if *n == 0 {
                        self.state = State::Head;
                    }
                    if let Some(r) = release.as_mut() {
                        r.extend_from_slice(&rest[..take]);
                    }
                    pos += take;
                }
                State::ChunkSize | State::Trailers => {
                    let take = rest
                        .iter()
                        .position(|b| *b == b'\n')
                        .map_or(rest.len(), |nl| nl + 1);
                    self.line.extend_from_slice(&rest[..take]);
                    if let Some(r) = release.as_mut() {
                        r.extend_from_slice(&rest[..take]);
                    }
                    pos += take;
                    if self.line.last() != Some(&b'\n') {
                        if self.line.len() > MAX_HEAD {
                            self.state = State::Off;
                        }
                        continue;
                    }
                    let line = std::mem::take(&mut self.line);
                    let line = trim_crlf(&line);
                    if matches!(self.state, State::Trailers) {
                        if line.is_empty() {
                            self.state = State::Head;
                        }
                        continue;
                    }
                    let hex = line.split(|b| *b == b';').next().unwrap_or_default();
                    // A bad chunk size is hyper's to refuse: its request is in flight.
                    match std::str::from_utf8(hex)
                        .ok()
                        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
                    {
                        Some(0) => self.state = State::Trailers,
                        Some(n) => self.state = State::ChunkData(n),
                        None => self.state = State::Off,
                    }
                }
                State::ChunkData(n) => {
                    let take = (*n).min(rest.len() as u64) as usize;
                    *n -= take as u64;
                    if *n == 0 {
                        self.state = State::ChunkDataEnd(2);
                    }
                    if let Some(r) = release.as_mut() {
                        r.extend_from_slice(&rest[..take]);
                    }
                    pos += take;
                }
                State::ChunkDataEnd(left) => {
                    let take = (*left as usize).min(rest.len());
                    *left -= take as u8;
                    if *left == 0 {
                        self.state = State::ChunkSize;
                    }
                    if let Some(r) = release.as_mut() {
                        r.extend_from_slice(&rest[..take]);
                    }
                    pos += take;
                }
            }
        }
        match release {
            None => Outcome::InPlace,
            Some(r) => Outcome::Release(r),
        }
    }

    /// `rest` is the read from the refused head's first byte in it on; the head's
    /// first `held_before` bytes came with earlier reads.
    fn refuse(
        &mut self,
        before: Vec<u8>,
        rest: &[u8],
        held_before: usize,
        status: u16,
        details: &'static str,
    ) -> Outcome {
        self.state = State::Off;
        let mut everything = before.clone();
        everything.extend_from_slice(&self.pending[..held_before]);
        everything.extend_from_slice(rest);
        self.pending = Vec::new();
        Outcome::Refuse {
            before,
            everything,
            refusal: Refusal { status, details },
        }
    }
}

/// Checks one whole request head as Envoy's codec would; the framing state that
/// follows it, or the refusal.
fn screen_head(head: &[u8]) -> Result<State, Refusal> {
    // httparse tolerates some request lines Envoy's codec refuses, such as
    // spaces inside the target: a request line is exactly three tokens, and
    // one without a version is HTTP/0.9, which Envoy answers with 426.
    let line_end = head.iter().position(|b| *b == b'\r').unwrap_or(0);
    match head[..line_end].iter().filter(|b| **b == b' ').count() {
        2 => {}
        1 => {
            return Err(Refusal {
                status: 426,
                details: "http1.invalid_version",
            });
        }
        _ => {
            return Err(Refusal {
                status: 400,
                details: "http1.codec_error",
            });
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(Refusal {
                status: 400,
                details: "http1.codec_error",
            });
        }
        Err(httparse::Error::Version) => {
            return Err(Refusal {
                status: 426,
                details: "http1.invalid_version",
            });
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal {
                status: 431,
                details: "http1.too_many_headers",
            });
        }
        Err(_) => {
            return Err(Refusal {
                status: 400,
                details: "http1.codec_error",
            });
        }
    }

    // Envoy refuses HTTP/1.0 unless accept_http_10 is set.
    if req.version == Some(0) {
        return Err(Refusal {
            status: 426,
            details: "low_version",
        });
    }
    let mut content_length: Option<u64> = None;
    let mut te = false;
    let mut chunked = false;
    let mut upgrade = req.method == Some("CONNECT");
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            match std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
            {
                // Repeated Content-Length headers must agree (RFC 9110 §8.6).
                Some(n) if content_length.is_none_or(|prev| prev == n) => content_length = Some(n),
                _ => {
                    return Err(Refusal {
                        status: 400,
                        details: "http1.content_length_not_allowed",
                    });
                }
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te = true;
            chunked = h
                .value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|last| trim(last).eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if te && content_length.is_some() {
        return Err(Refusal {
            status: 400,
            details: "http1.content_length_and_chunked_not_allowed",
        });
    }
    if te && !chunked {
        return Err(Refusal {
            status: 400,
            details: "http1.invalid_transfer_encoding",
        });
    }
    Ok(if upgrade {
        State::Off
    } else if chunked {
        State::ChunkSize
    } else {
        match content_length {
            Some(n) if n > 0 => State::Fixed(n),
            _ => State::Head,
        }
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn trim(b: &[u8]) -> &[u8] {
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

fn trim_crlf(b: &[u8]) -> &[u8] {
    let b = b.strip_suffix(b"\n").unwrap_or(b);
    b.strip_suffix(b"\r").unwrap_or(b)
}

impl<T: AsyncWrite + Unpin> FramingGuard<T> {
    /// Writes out the pending reply; Ready once all of it is written.
    fn poll_reply(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, written)) = &mut self.reply {
            if *written == bytes.len() {
                self.reply = None;
                break;
            }
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]) {
                Poll::Ready(Ok(0)) => {
                    self.reply = None;
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(e)) => {
                    self.reply = None;
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for FramingGuard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out = Vec::new();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // Our reply goes out before hyper learns the stream ended.
                return match this.poll_reply(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(_) => Poll::Ready(Ok(())),
                };
            }
            let before = buf.filled().len();
            match Pin::new(&mut this.inner).poll_read(cx, buf) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            if buf.filled().len() == before
                || (matches!(this.state, State::Off) && this.pending.is_empty())
            {
                return Poll::Ready(Ok(()));
            }
            let outcome = this.process(&buf.filled()[before..]);
            match outcome {
                Outcome::InPlace => return Poll::Ready(Ok(())),
                Outcome::Release(bytes) => {
                    buf.set_filled(before);
                    this.out = bytes;
                    this.out_pos = 0;
                    // An empty release means the whole read was a partial head: read on.
                }
                Outcome::Refuse {
                    before: ok,
                    everything,
                    refusal,
                } => {
                    buf.set_filled(before);
                    if this.screen.in_flight.get() > 0 {
                        // A response is still on its way: let hyper refuse the request
                        // itself rather than answer out of order.
                        this.out = everything;
                    } else {
                        this.screen.refusals.borrow_mut().push(refusal);
                        this.reply = Some((refusal.reply(&this.server_name), 0));
                        this.out = ok;
                        this.eof = true;
                    }
                    this.out_pos = 0;
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FramingGuard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.reply.is_some() {
            match this.poll_reply(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(_) => {}
            }
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> FramingGuard<()> {
        FramingGuard::new((), Rc::new(ConnectionScreen::default()), "envoy")
    }

    /// Feeds reads; returns what hyper would have seen and the refusal, if any.
    fn run(chunks: &[&[u8]]) -> (Vec<u8>, Option<u16>) {
        let mut g = guard();
        let mut seen = Vec::new();
        for c in chunks {
            match g.process(c) {
                Outcome::InPlace => seen.extend_from_slice(c),
                Outcome::Release(b) => seen.extend(b),
                Outcome::Refuse {
                    before, refusal, ..
                } => {
                    seen.extend(before);
                    return (seen, Some(refusal.status));
                }
            }
        }
        (seen, None)
    }

    #[test]
    fn refuses_both_framings_in_either_order() {
        let (seen, r) = run(&[b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"]);
        assert_eq!((seen.len(), r), (0, Some(400)));
        let (_, r) =
            run(&[b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"]);
        assert_eq!(r, Some(400));
    }

    #[test]
    fn everything_arrives_in_order_across_reads() {
        let body_looks_like_a_head: &[u8] =
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let first = format!(
            "POST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            body_looks_like_a_head.len()
        );
        let chunks: Vec<&[u8]> = vec![
            &first.as_bytes()[..7],
            &first.as_bytes()[7..],
            &body_looks_like_a_head[..10],
            &body_looks_like_a_head[10..],
            b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
            b"lo\r\n0\r\n\r\nGET /c HTTP/1.1\r\nHost: x\r\n\r",
            b"\n",
        ];
        let (seen, r) = run(&chunks);
        assert_eq!(r, None);
        assert_eq!(seen, chunks.concat());
    }

    #[test]
    fn a_partial_head_is_held_back() {
        let mut g = guard();
        assert_eq!(
            g.process(b"GET /a b c HTTP/1.1\r\nhos"),
            Outcome::Release(Vec::new())
        );
        assert!(matches!(
            g.process(b"t: x\r\n\r\n"),
            Outcome::Refuse {
                refusal: Refusal { status: 400, .. },
                ..
            }
        ));
    }

    #[test]
    fn requests_before_a_refused_one_still_go_through() {
        let (seen, r) = run(&[b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\n"]);
        assert_eq!(seen, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(r, Some(400));
    }

    #[test]
    fn versions_and_sizes() {
        assert_eq!(run(&[b"GET / HTTP/1.0\r\n", b"\r\n"]).1, Some(426));
        assert_eq!(run(&[b"GET / HTTP/9.9\r\n\r\n"]).1, Some(426));
        assert_eq!(run(&[b"GET /\r\nhost: x\r\n\r\n"]).1, Some(426));
        assert_eq!(
            run(&[b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab"]).1,
            Some(400)
        );
        assert_eq!(
            run(&[b"GET /a b c HTTP/1.1\r\nhost: x\r\n\r\n"]).1,
            Some(400)
        );
        let mut big = b"GET / HTTP/1.1\r\nx: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEAD + 1));
        assert_eq!(run(&[&big]).1, Some(431));
    }

    #[test]
    fn whole_heads_and_bodies_pass_in_place() {
        let mut g = guard();
        assert_eq!(
            g.process(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n"),
            Outcome::InPlace
        );
        assert_eq!(g.process(b"0123456789"), Outcome::InPlace);
        assert_eq!(
            g.process(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\nGET /b HTTP/1.1\r\nhost: x\r\n\r\n"),
            Outcome::InPlace
        );
        assert!(g.pending.capacity() == 0 && g.out.capacity() == 0);
    }

    #[test]
    fn a_whole_head_then_a_partial_one_releases_both_in_order() {
        let mut g = guard();
        let first: &[u8] = b"GET /a HTTP/1.1\r\nhost: x\r\n\r\nGET /b HT";
        assert_eq!(
            g.process(first),
            Outcome::Release(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n".to_vec())
        );
        assert_eq!(
            g.process(b"TP/1.1\r\nhost: x\r\n\r\n"),
            Outcome::Release(b"GET /b HTTP/1.1\r\nhost: x\r\n\r\n".to_vec())
        );
        assert_eq!(g.pending.capacity(), 0);
    }

    #[test]
    fn http2_preface_turns_the_guard_off() {
        let (seen, r) = run(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"GARBAGE\r\n\r\n"]);
        assert_eq!(r, None);
        assert_eq!(seen.len(), 35);
    }
}
