//! The request body of a request that may be retried. Each try streams it from
//! the downstream as before, while what passes is kept (up to the route's
//! `per_request_buffer_limit_bytes`) so that a retry sends it again — Envoy's
//! router buffers it the same way. Beyond the limit nothing more is kept and the
//! request is no longer retried, as in Envoy.

use std::cell::RefCell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::http::body::{BodyError, ProxyBody};

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
}

impl Shared {
    fn poll_source(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let polled = Pin::new(&mut self.source).poll_frame(cx);
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
        })))
    }

    /// The body for one try: what was kept, then the rest of the downstream body.
    pub fn body(&self) -> ProxyBody {
        ProxyBody::Replay(ReplayBody {
            shared: self.clone(),
            next: 0,
            trailers_sent: false,
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
}

/// One try's view of the [`ReplayBuffer`].
pub struct ReplayBody {
    shared: ReplayBuffer,
    /// The index of the next kept frame this try sends.
    next: usize,
    trailers_sent: bool,
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
mod tests {
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
