//! Detects HTTP/1.1 requests that carry both `Content-Length` and
//! `Transfer-Encoding`, which Envoy answers with 400 (RFC 9112 §6.1 allows either
//! rejecting them or dropping `Content-Length`; hyper silently does the latter and
//! gives no sign of it). The guard watches the downstream bytes on their way into
//! hyper, follows request framing (heads, fixed and chunked bodies) and records the
//! index of every offending request on the connection; the connection manager checks
//! that index when hyper hands it the request.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Heads larger than this are not tracked (hyper rejects them itself).
const MAX_HEAD: usize = 64 * 1024;

#[derive(Debug)]
enum State {
    Head,
    Fixed(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd(u8),
    Trailers,
    /// HTTP/2, an upgrade, or something unparsable: stop watching.
    Off,
}

/// Shared between the guard (writer) and the connection's service (reader).
#[derive(Debug, Default)]
pub struct FramingViolations {
    /// Indexes (0-based, per connection) of requests with both framings.
    both_framings: RefCell<VecDeque<u64>>,
}

impl FramingViolations {
    /// Whether request number `index` of the connection carried both framings.
    pub fn take(&self, index: u64) -> bool {
        let mut q = self.both_framings.borrow_mut();
        while q.front().is_some_and(|i| *i < index) {
            q.pop_front();
        }
        if q.front() == Some(&index) {
            q.pop_front();
            true
        } else {
            false
        }
    }
}

pub struct FramingGuard<T> {
    inner: T,
    state: State,
    buf: Vec<u8>,
    requests: u64,
    violations: Rc<FramingViolations>,
}

impl<T> FramingGuard<T> {
    pub fn new(inner: T, violations: Rc<FramingViolations>) -> Self {
        FramingGuard {
            inner,
            state: State::Head,
            buf: Vec::new(),
            requests: 0,
            violations,
        }
    }

    fn observe(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Off => return,
                State::Head => {
                    if self.requests == 0
                        && self.buf.is_empty()
                        && data.starts_with(b"PRI * HTTP/2")
                    {
                        self.state = State::Off;
                        return;
                    }
                    // Accumulate until the blank line that ends the head.
                    let start = self.buf.len().saturating_sub(3);
                    self.buf.extend_from_slice(data);
                    let Some(end) = find(&self.buf[start..], b"\r\n\r\n").map(|p| start + p + 4)
                    else {
                        if self.buf.len() > MAX_HEAD {
                            self.state = State::Off;
                        }
                        return;
                    };
                    let consumed_from_data = end - (self.buf.len() - data.len());
                    self.on_head(end);
                    self.buf.clear();
                    data = &data[consumed_from_data..];
                }
                State::Fixed(n) => {
                    let take = (*n).min(data.len() as u64);
                    *n -= take;
                    data = &data[take as usize..];
                    if *n == 0 {
                        self.state = State::Head;
                    }
                }
                State::ChunkSize | State::Trailers => {
                    let Some(nl) = data.iter().position(|b| *b == b'\n') else {
                        self.buf.extend_from_slice(data);
                        if self.buf.len() > MAX_HEAD {
                            self.state = State::Off;
                        }
                        return;
                    };
                    self.buf.extend_from_slice(&data[..=nl]);
                    data = &data[nl + 1..];
                    let line = std::mem::take(&mut self.buf);
                    let line = trim_crlf(&line);
                    if matches!(self.state, State::Trailers) {
                        if line.is_empty() {
                            self.state = State::Head;
                        }
                        continue;
                    }
                    let hex = line.split(|b| *b == b';').next().unwrap_or_default();
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
                    let take = (*n).min(data.len() as u64);
                    *n -= take;
                    data = &data[take as usize..];
                    if *n == 0 {
                        self.state = State::ChunkDataEnd(2);
                    }
                }
                State::ChunkDataEnd(left) => {
                    let take = (*left as usize).min(data.len());
                    *left -= take as u8;
                    data = &data[take..];
                    if *left == 0 {
                        self.state = State::ChunkSize;
                    }
                }
            }
        }
    }

    fn on_head(&mut self, end: usize) {
        let index = self.requests;
        self.requests += 1;
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(
            req.parse(&self.buf[..end]),
            Ok(httparse::Status::Complete(_))
        ) {
            self.state = State::Off;
            return;
        }
        let mut content_length: Option<u64> = None;
        let mut te = false;
        let mut chunked = false;
        let mut upgrade = req.method == Some("CONNECT");
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                content_length = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok());
                if content_length.is_none() {
                    self.state = State::Off;
                    return;
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
            self.violations.both_framings.borrow_mut().push_back(index);
            // hyper closes the connection after such a request; nothing more to track.
            self.state = State::Off;
            return;
        }
        self.state = if upgrade {
            State::Off
        } else if chunked {
            State::ChunkSize
        } else {
            match content_length {
                Some(n) if n > 0 => State::Fixed(n),
                _ => State::Head,
            }
        };
    }
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

impl<T: AsyncRead + Unpin> AsyncRead for FramingGuard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled
            && !matches!(this.state, State::Off)
        {
            this.observe(&buf.filled()[before..]);
        }
        polled
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

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> (Vec<u64>, u64) {
        let v = Rc::new(FramingViolations::default());
        let mut g = FramingGuard::new((), v.clone());
        for c in chunks {
            g.observe(c);
        }
        let found = v.both_framings.borrow().iter().copied().collect();
        (found, g.requests)
    }

    #[test]
    fn flags_both_framings_in_either_order() {
        let (v, _) = run(&[b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"]);
        assert_eq!(v, vec![0]);
        let (v, _) =
            run(&[b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"]);
        assert_eq!(v, vec![0]);
    }

    #[test]
    fn follows_fixed_and_chunked_bodies_across_reads() {
        let body_looks_like_a_head: &[u8] =
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let first = format!(
            "POST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            body_looks_like_a_head.len()
        );
        let (v, n) = run(&[
            first.as_bytes(),
            &body_looks_like_a_head[..10],
            &body_looks_like_a_head[10..],
            b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
            b"lo\r\n0\r\n\r\nGET /c HTTP/1.1\r\nHost: x\r\n\r",
            b"\n",
        ]);
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(n, 3);
    }

    #[test]
    fn http2_preface_turns_the_guard_off() {
        let (v, n) = run(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]);
        assert!(v.is_empty());
        assert_eq!(n, 0);
    }

    #[test]
    fn take_matches_the_request_index() {
        let v = FramingViolations::default();
        v.both_framings.borrow_mut().push_back(2);
        assert!(!v.take(0));
        assert!(!v.take(1));
        assert!(v.take(2));
        assert!(!v.take(3));
    }
}
