//! Body types that stream straight through the proxy.

use std::cell::{Cell, RefCell};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::h1::RequestBody as H1RequestBody;

/// Why a body stream failed: hyper's error (HTTP/2 downstream, upstream bodies) or
/// the HTTP/1 codec's (a malformed or cut-short request body).
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error("downstream request body: {0}")]
    Http1(&'static str),
    /// The route timeout (or the per-try idle timeout) fired while the upstream's
    /// response body was streaming.
    #[error("upstream response timeout")]
    UpstreamTimeout,
    /// A stream timer ended the response mid-body (the stream is reset).
    #[error("downstream stream timeout: {0}")]
    StreamTimeout(&'static str),
}

/// A body as it arrives from a peer: hyper's `Incoming` (HTTP/2 downstream, every
/// upstream response) or a downstream HTTP/1.1 request body read by envoyx's codec.
#[derive(Debug)]
pub enum PeerBody {
    Hyper(Incoming),
    /// A downstream HTTP/2 request body its stream's timers watch.
    Watched(Incoming, Rc<StreamWatch>),
    Http1(H1RequestBody),
    /// An upstream response body under the route's timeouts.
    Timed(Box<TimedBody>),
    /// A body whose frames a native filter sees as they pass (gRPC message counts).
    Inspected(Box<InspectedBody>),
}

/// What sees the frames of an [`InspectedBody`].
pub trait FrameInspector {
    fn frame(&mut self, frame: &Frame<Bytes>);
}

/// A body streamed unchanged, each frame shown to an inspector on the way.
pub struct InspectedBody {
    pub inner: PeerBody,
    pub inspector: Box<dyn FrameInspector>,
}

impl std::fmt::Debug for InspectedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("InspectedBody").field(&self.inner).finish()
    }
}

/// An upstream response body that must end by the route's deadline and may not
/// stall longer than the per-try idle timeout (Envoy's router keeps both timers
/// until the response is complete).
#[derive(Debug)]
pub struct TimedBody {
    inner: Incoming,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    idle: Option<(std::time::Duration, Pin<Box<tokio::time::Sleep>>)>,
}

impl TimedBody {
    /// `inner` with the timers that apply, or as it is when none does.
    pub fn wrap(
        inner: Incoming,
        deadline: Option<tokio::time::Instant>,
        idle: Option<std::time::Duration>,
    ) -> PeerBody {
        if (deadline.is_none() && idle.is_none()) || inner.is_end_stream() {
            return PeerBody::Hyper(inner);
        }
        PeerBody::Timed(Box::new(TimedBody {
            inner,
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            idle: idle.map(|t| (t, Box::pin(tokio::time::sleep(t)))),
        }))
    }

    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(frame) = polled {
            if let Some((t, sleep)) = self.idle.as_mut() {
                sleep.as_mut().reset(tokio::time::Instant::now() + *t);
            }
            return Poll::Ready(frame.map(|r| r.map_err(BodyError::Hyper)));
        }
        let expired = self
            .deadline
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready())
            || self
                .idle
                .as_mut()
                .is_some_and(|(_, s)| s.as_mut().poll(cx).is_ready());
        if expired {
            return Poll::Ready(Some(Err(BodyError::UpstreamTimeout)));
        }
        Poll::Pending
    }
}

/// What a downstream stream's timers read of its request body: when it last moved
/// and whether it is whole. Only streams with a timer have one.
#[derive(Debug)]
pub struct StreamWatch {
    pub last_activity: Cell<Instant>,
    pub request_complete: Cell<bool>,
}

impl StreamWatch {
    pub fn new(request_complete: bool) -> Self {
        StreamWatch {
            last_activity: Cell::new(Instant::now()),
            request_complete: Cell::new(request_complete),
        }
    }

    /// The request body moved (and maybe ended).
    pub fn touch(&self, end: bool) {
        self.last_activity.set(Instant::now());
        if end {
            self.request_complete.set(true);
        }
    }
}

impl PeerBody {
    /// The body, reporting its progress to `watch` as it streams.
    pub fn watched(self, watch: &Rc<StreamWatch>) -> Self {
        match self {
            PeerBody::Hyper(b) => PeerBody::Watched(b, watch.clone()),
            PeerBody::Http1(mut b) => {
                b.watch(watch.clone());
                PeerBody::Http1(b)
            }
            other => other,
        }
    }
}

impl From<Incoming> for PeerBody {
    fn from(b: Incoming) -> Self {
        PeerBody::Hyper(b)
    }
}

impl Body for PeerBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            PeerBody::Hyper(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BodyError::Hyper))),
            PeerBody::Watched(b, watch) => {
                let polled = Pin::new(&mut *b).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(_))) => watch.touch(b.is_end_stream()),
                    Poll::Ready(None) => watch.touch(true),
                    _ => {}
                }
                polled.map(|f| f.map(|r| r.map_err(BodyError::Hyper)))
            }
            PeerBody::Http1(b) => Pin::new(b).poll_frame(cx),
            PeerBody::Timed(b) => b.poll_frame(cx),
            PeerBody::Inspected(b) => {
                let polled = Pin::new(&mut b.inner).poll_frame(cx);
                if let Poll::Ready(Some(Ok(frame))) = &polled {
                    b.inspector.frame(frame);
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            PeerBody::Hyper(b) | PeerBody::Watched(b, _) => b.is_end_stream(),
            PeerBody::Http1(b) => b.is_end_stream(),
            PeerBody::Timed(b) => b.inner.is_end_stream(),
            PeerBody::Inspected(b) => b.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            PeerBody::Hyper(b) | PeerBody::Watched(b, _) => b.size_hint(),
            PeerBody::Http1(b) => b.size_hint(),
            PeerBody::Timed(b) => b.inner.size_hint(),
            PeerBody::Inspected(b) => b.inner.size_hint(),
        }
    }
}

/// A request or response body as the proxy forwards it: nothing, fixed bytes (local
/// replies), or the peer's body streamed frame by frame (counted when asked).
#[derive(Debug)]
pub enum ProxyBody {
    Empty,
    Full(Option<Bytes>),
    Stream(PeerBody),
    Counted(PeerBody, Rc<Cell<u64>>),
    /// A body a filter buffered (and maybe replaced), then its trailers.
    Buffered(Option<Bytes>, Option<HeaderMap>),
    /// One try's copy of a request body kept for retries.
    Replay(ReplayBody),
}

impl ProxyBody {
    pub fn text(s: impl Into<Bytes>) -> Self {
        let b: Bytes = s.into();
        if b.is_empty() {
            ProxyBody::Empty
        } else {
            ProxyBody::Full(Some(b))
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Buffered(data, trailers) => {
                if let Some(d) = data.take().filter(|d| !d.is_empty()) {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            ProxyBody::Stream(inner) => Pin::new(inner).poll_frame(cx),
            ProxyBody::Replay(inner) => Pin::new(inner).poll_frame(cx),
            ProxyBody::Counted(inner, count) => {
                let polled = Pin::new(inner).poll_frame(cx);
                if let Poll::Ready(Some(Ok(frame))) = &polled
                    && let Some(data) = frame.data_ref()
                {
                    count.set(count.get() + data.len() as u64);
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Buffered(data, trailers) => {
                data.as_ref().is_none_or(Bytes::is_empty) && trailers.is_none()
            }
            ProxyBody::Stream(inner) | ProxyBody::Counted(inner, _) => inner.is_end_stream(),
            ProxyBody::Replay(inner) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            // Not exact when trailers follow: HTTP/1 must then send it chunked.
            ProxyBody::Buffered(data, trailers) => {
                let len = data.as_ref().map_or(0, |b| b.len() as u64);
                if trailers.is_some() {
                    let mut hint = SizeHint::new();
                    hint.set_lower(len);
                    hint
                } else {
                    SizeHint::with_exact(len)
                }
            }
            ProxyBody::Stream(inner) | ProxyBody::Counted(inner, _) => inner.size_hint(),
            ProxyBody::Replay(inner) => inner.size_hint(),
        }
    }
}

/// How a response stream ended, reported once to its [`ResponseBody`]'s callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// Every frame was sent.
    Complete,
    /// The upstream failed mid-body.
    UpstreamError,
    /// The route's timeout fired mid-body (`UT`).
    UpstreamTimeout,
    /// The downstream went away before the end (the body was dropped).
    DownstreamGone,
}

type OnEnd = Box<dyn FnOnce(StreamEnd, u64)>;

/// The downstream response body: forwards `inner` and, when the stream ends (or is
/// dropped), calls `on_end` with the outcome and the body bytes sent. That is where
/// the access log is written, stats are finished and pooled connections return.
pub struct ResponseBody {
    inner: ProxyBody,
    bytes: u64,
    on_end: Option<OnEnd>,
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("inner", &self.inner)
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl ResponseBody {
    pub fn new(inner: ProxyBody, on_end: Option<OnEnd>) -> Self {
        let mut body = ResponseBody {
            inner,
            bytes: 0,
            on_end,
        };
        // A body that is empty from the start ends now: hyper may never poll it.
        if body.inner.is_end_stream() {
            body.finish(StreamEnd::Complete);
        }
        body
    }

    fn finish(&mut self, end: StreamEnd) {
        if let Some(f) = self.on_end.take() {
            f(end, self.bytes);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
                if this.inner.is_end_stream() {
                    this.finish(StreamEnd::Complete);
                }
            }
            Poll::Ready(Some(Err(BodyError::UpstreamTimeout))) => {
                this.finish(StreamEnd::UpstreamTimeout)
            }
            Poll::Ready(Some(Err(_))) => this.finish(StreamEnd::UpstreamError),
            Poll::Ready(None) => this.finish(StreamEnd::Complete),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        self.finish(StreamEnd::DownstreamGone);
    }
}

// -- The replay buffer of a request that may be retried ------------------------------
//
// The request body of a request that may be retried. Each try streams it from
// the downstream as before, while what passes is kept (up to the route's
// `per_request_buffer_limit_bytes`) so that a retry sends it again — Envoy's
// router buffers it the same way. Beyond the limit nothing more is kept and the
// request is no longer retried, as in Envoy.

struct Shared {
    /// The downstream body, read from by whichever try is at its live edge.
    source: ProxyBody,
    /// The data frames read so far (all of them unless `overflowed`).
    kept: Vec<Bytes>,
    kept_bytes: usize,
    trailers: Option<HeaderMap>,
    limit: usize,
    overflowed: bool,
    failed: bool,
    ended: bool,
    /// Readers waiting on the source besides the last one to poll it (the source
    /// keeps one waker): woken when it yields, so that two readers at the live
    /// edge at once (a try and a mirror) both go on.
    waiting: Vec<std::task::Waker>,
}

impl Shared {
    fn poll_source(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let polled = Pin::new(&mut self.source).poll_frame(cx);
        if polled.is_pending() {
            if !self.waiting.iter().any(|w| w.will_wake(cx.waker())) {
                self.waiting.push(cx.waker().clone());
            }
        } else {
            for w in self.waiting.drain(..) {
                w.wake();
            }
        }
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !self.overflowed && self.kept_bytes + data.len() <= self.limit {
                        self.kept_bytes += data.len();
                        self.kept.push(data.clone());
                    } else {
                        self.overflowed = true;
                        self.kept = Vec::new();
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    self.trailers = Some(t.clone());
                }
            }
            Poll::Ready(Some(Err(_))) => self.failed = true,
            Poll::Ready(None) => self.ended = true,
            Poll::Pending => {}
        }
        polled
    }
}

/// The buffer shared by a request's tries.
#[derive(Clone)]
pub struct ReplayBuffer(Rc<RefCell<Shared>>);

impl ReplayBuffer {
    pub fn new(source: ProxyBody, limit: u32) -> Self {
        let ended = source.is_end_stream();
        ReplayBuffer(Rc::new(RefCell::new(Shared {
            source,
            kept: Vec::new(),
            kept_bytes: 0,
            trailers: None,
            limit: limit as usize,
            overflowed: false,
            failed: false,
            ended,
            waiting: Vec::new(),
        })))
    }

    /// The body for one try: what was kept, then the rest of the downstream body.
    pub fn body(&self) -> ProxyBody {
        ProxyBody::Replay(ReplayBody {
            shared: self.clone(),
            next: 0,
            trailers_sent: false,
            abandon_on_overflow: false,
        })
    }

    /// Reads the rest of the downstream body into the buffer (a retry needs the
    /// whole request); false when it cannot be sent again (over the limit, or the
    /// downstream body failed).
    pub async fn fill(&self) -> bool {
        std::future::poll_fn(|cx| {
            let mut s = self.0.borrow_mut();
            while !s.ended && !s.failed && !s.overflowed {
                match s.poll_source(cx) {
                    Poll::Ready(Some(Ok(_))) => {}
                    Poll::Ready(_) => break,
                    Poll::Pending => return Poll::Pending,
                }
            }
            Poll::Ready(s.ended && !s.failed && !s.overflowed)
        })
        .await
    }

    /// Whether the whole body is kept (a hedged try may then run beside the first).
    pub fn is_complete(&self) -> bool {
        let s = self.0.borrow();
        s.ended && !s.failed && !s.overflowed
    }

    /// The body for a mirrored (shadow) request: like a try's, but it fails once
    /// the body outgrew the limit, since a reader behind the live edge could then
    /// miss bytes (Envoy abandons the shadow too).
    pub fn shadow_body(&self) -> ProxyBody {
        ProxyBody::Replay(ReplayBody {
            shared: self.clone(),
            next: 0,
            trailers_sent: false,
            abandon_on_overflow: true,
        })
    }
}

/// One try's view of the [`ReplayBuffer`].
pub struct ReplayBody {
    shared: ReplayBuffer,
    /// The index of the next kept frame this try sends.
    next: usize,
    trailers_sent: bool,
    /// A shadow's body: fails once the buffer overflowed.
    abandon_on_overflow: bool,
}

impl std::fmt::Debug for ReplayBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayBody")
            .field("next", &self.next)
            .finish()
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let mut s = this.shared.0.borrow_mut();
        if this.abandon_on_overflow && s.overflowed {
            return Poll::Ready(Some(Err(BodyError::Http1(
                "request body over the buffer limit of a mirrored request",
            ))));
        }
        if !s.overflowed && this.next < s.kept.len() {
            this.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(s.kept[this.next - 1].clone()))));
        }
        if s.ended {
            if !this.trailers_sent
                && let Some(t) = s.trailers.clone()
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            return Poll::Ready(None);
        }
        let polled = s.poll_source(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if frame.is_data() && !s.overflowed {
                this.next = s.kept.len();
            } else if frame.is_trailers() {
                this.trailers_sent = true;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let s = self.shared.0.borrow();
        s.ended
            && (s.overflowed || self.next >= s.kept.len())
            && (self.trailers_sent || s.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let s = self.shared.0.borrow();
        let kept: u64 = if s.overflowed {
            0
        } else {
            s.kept[self.next.min(s.kept.len())..]
                .iter()
                .map(|b| b.len() as u64)
                .sum()
        };
        if s.ended {
            return SizeHint::with_exact(kept);
        }
        let rest = s.source.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(kept + rest.lower());
        if let Some(upper) = rest.upper() {
            hint.set_upper(kept + upper);
        }
        hint
    }
}

#[cfg(test)]
mod replay_tests {
    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn a_retry_sends_the_same_bytes_again() {
        let buffer = ReplayBuffer::new(ProxyBody::Full(Some(Bytes::from_static(b"hello"))), 100);
        let first = buffer.body().collect().await.ok().unwrap().to_bytes();
        assert_eq!(first, "hello");
        assert!(buffer.fill().await);
        let second = buffer.body().collect().await.ok().unwrap().to_bytes();
        assert_eq!(second, "hello");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_not_replayable() {
        let buffer = ReplayBuffer::new(ProxyBody::Full(Some(Bytes::from_static(b"hello"))), 3);
        let first = buffer.body().collect().await.ok().unwrap().to_bytes();
        assert_eq!(first, "hello", "the first try still gets all of it");
        assert!(!buffer.fill().await);
    }

    #[tokio::test]
    async fn fill_reads_what_the_first_try_never_read() {
        let buffer = ReplayBuffer::new(ProxyBody::Full(Some(Bytes::from_static(b"abc"))), 100);
        drop(buffer.body());
        assert!(buffer.fill().await);
        assert!(buffer.is_complete());
        let again = buffer.body().collect().await.ok().unwrap().to_bytes();
        assert_eq!(again, "abc");
    }
}
