//! One downstream HTTP/1.1 connection: heads are read (with a buffer only while
//! bytes are there), each request runs as an [`ActiveStream`], its response is
//! written, and the next (maybe pipelined) request follows, in order.

use std::future::{Future, poll_fn};
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Response};
use http_body::{Body, Frame};
use tokio::sync::watch;

use super::body::{InBuf, Shared};
use super::buffers;
use super::head::{self, BodyLength, Encoder, Head, HeadRules, Parsed, Refusal, RefusalCause};
use crate::config::HeaderKeyFormat;
use crate::http::active_stream::{ActiveStream, StreamBody};
use crate::http::body::{BodyError, PeerBody};
use crate::http::connection::DownstreamConnection;
use crate::http::header_case::{self, KeyFormat};

/// hyper's default: a head must arrive whole within this time of its first byte,
/// when none of Envoy's stream timers is configured.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Response bytes gathered before they are written even though more are ready.
const WRITE_HIGH: usize = 64 * 1024;

/// Serves the connection until it closes, fails, refuses a request or drains.
/// `drain` is only read: the task this runs in must be woken when it changes
/// (the worker's connection task waits on it for the drain deadline).
pub async fn serve(
    conn: Rc<DownstreamConnection>,
    shared: Rc<Shared>,
    drain: watch::Receiver<bool>,
) {
    // Until a request begins, Envoy has no codec: its timers then close at once.
    let mut first = true;
    loop {
        let head = match next_head(&conn, &shared, &drain, first).await {
            Next::Head(h) => h,
            Next::Refused(refusal) => {
                // Boxed: rare, and its write state would enlarge every connection.
                Box::pin(refuse(&conn, &shared, refusal)).await;
                return;
            }
            Next::Closed(how) => {
                Box::pin(close(&conn, &shared, how)).await;
                return;
            }
        };
        first = false;
        match Box::pin(exchange(&conn, &shared, head, &drain)).await {
            Close::Keep if !*drain.borrow() => {}
            how => {
                Box::pin(close(&conn, &shared, how)).await;
                return;
            }
        }
    }
}

enum Next {
    Head(Box<Head>),
    Refused(Refusal),
    Closed(Close),
}

/// How a connection ends (or not) after a request or a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    Keep,
    /// The peer left or the connection failed.
    Peer,
    /// The peer asked for it (`connection: close`), or there was nothing to say.
    Now,
    /// envoyx decided (a drain, a timeout, a refused or cut-short request):
    /// Envoy's delayed close lets the peer close first, so that it reads the
    /// last response before a reset could destroy it.
    Delayed,
}

/// A clean end: TLS sends close_notify (without it a client drops its session
/// ticket as if the connection had been cut), TCP a FIN. A delayed close first
/// waits up to `delayed_close_timeout` for the peer's end, its bytes discarded,
/// as Envoy's does.
async fn close(conn: &DownstreamConnection, shared: &Shared, how: Close) {
    if how == Close::Delayed
        && let Some(wait) = conn.hcm.limits.delayed_close_timeout
        && !shared.read.borrow().eof
    {
        let deadline = tokio::time::Instant::now() + wait;
        let mut scratch = [0u8; 512];
        loop {
            let readable = poll_fn(|cx| shared.io.poll_read_ready(cx).map(|r| r.is_ok()));
            match tokio::time::timeout_at(deadline, readable).await {
                Err(_) => {
                    conn.hcm.stats.downstream_cx_delayed_close_timeout.inc();
                    break;
                }
                Ok(false) => break,
                Ok(true) => match shared.io.try_read(&mut scratch) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                },
            }
        }
    }
    let _ = shared.io.shutdown_write();
}

/// What ends a wait for the next request: Envoy's connection idle timer,
/// `max_connection_duration`, or the end of the drain either started.
#[derive(Debug, Clone, Copy)]
enum IdleWake {
    Idle,
    Duration,
    Drained,
}

fn idle_deadline(conn: &DownstreamConnection, idle_start: Instant) -> Option<(Instant, IdleWake)> {
    let limits = &conn.hcm.limits;
    if let Some(began) = conn.drain_started.get() {
        return Some((began + limits.drain_timeout, IdleWake::Drained));
    }
    let mut next = limits
        .idle_timeout
        .map(|t| (idle_start + t, IdleWake::Idle));
    if let Some(max) = limits.max_connection_duration {
        let at = conn.started + max;
        if next.is_none_or(|(n, _)| at < n) {
            next = Some((at, IdleWake::Duration));
        }
    }
    next
}

/// The next request head: parsed from bytes already read (pipelining), or read.
async fn next_head(
    conn: &DownstreamConnection,
    shared: &Rc<Shared>,
    drain: &watch::Receiver<bool>,
    first: bool,
) -> Next {
    let rules = conn.head_rules();
    let idle_start = Instant::now();
    loop {
        match parse_buffered(shared, rules) {
            Some(Parsed::Head(head, _)) => return Next::Head(head),
            Some(Parsed::Refused(r)) => return Next::Refused(r),
            Some(Parsed::Partial) => return Box::pin(rest_of_head(conn, shared, rules)).await,
            None => {}
        }
        // Idle: no buffer is held while waiting, and no waiter on the drain
        // signal either: the worker's task waits for it (its drain deadline) and
        // is woken with this future, which then sees the signal.
        let readable = poll_fn(|cx| {
            if *drain.borrow() {
                return Poll::Ready(false);
            }
            shared.io.poll_read_ready(cx).map(|r| r.is_ok())
        });
        let readable = match idle_deadline(conn, idle_start) {
            None => readable.await,
            Some((at, wake)) => match tokio::time::timeout_at(at.into(), readable).await {
                Ok(r) => r,
                Err(_) => {
                    match wake {
                        IdleWake::Idle => {
                            conn.hcm.stats.downstream_cx_idle_timeout.inc();
                            conn.start_drain();
                        }
                        IdleWake::Duration => conn.check_duration(),
                        IdleWake::Drained => return Next::Closed(Close::Delayed),
                    }
                    if first {
                        return Next::Closed(Close::Now);
                    }
                    continue;
                }
            },
        };
        if !readable {
            return Next::Closed(Close::Now);
        }
        let mut read = shared.read.borrow_mut();
        let read = &mut *read;
        let buf = read.buf.get_or_insert_with(InBuf::new);
        let Some(space) = buf.space_mut() else {
            return Next::Closed(Close::Now);
        };
        match shared.io.try_read(space) {
            Ok(0) => return Next::Closed(Close::Peer),
            Ok(n) => {
                buf.advance(n);
                shared.rx.add(n as u64);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Next::Closed(Close::Peer),
        }
    }
}

/// Parses what the buffer holds; None (and the buffer given back) when it holds
/// nothing.
fn parse_buffered(shared: &Shared, rules: HeadRules) -> Option<Parsed> {
    let mut read = shared.read.borrow_mut();
    let buf = read.buf.as_mut()?;
    if buf.pending().is_empty() {
        if let Some(b) = read.buf.take() {
            b.release();
        }
        return None;
    }
    let parsed = head::parse_with(buf.pending(), rules);
    if let Parsed::Head(_, len) = &parsed {
        buf.consume(*len);
    }
    Some(parsed)
}

/// The deadline of a head that came in parts: Envoy's stream timers run from
/// its first byte (None: envoyx's own limit, when no timer is configured).
fn head_deadline(
    limits: &crate::config::HcmLimits,
    begun: Instant,
    last_read: Instant,
) -> (Instant, Option<RefusalCause>) {
    let mut next: Option<(Instant, Option<RefusalCause>)> = None;
    let mut consider = |at: Instant, cause| {
        if next.is_none_or(|(n, _)| at < n) {
            next = Some((at, Some(cause)));
        }
    };
    if let Some(t) = limits.request_headers_timeout {
        consider(begun + t, RefusalCause::HeaderTimeout);
    }
    if let Some(t) = limits.stream_idle_timeout {
        consider(last_read + t, RefusalCause::StreamIdle);
    }
    if let Some(t) = limits.request_timeout {
        consider(begun + t, RefusalCause::RequestTimeout);
    }
    if let Some(t) = limits.max_stream_duration {
        consider(begun + t, RefusalCause::MaxDuration);
    }
    next.unwrap_or((begun + HEADER_READ_TIMEOUT, None))
}

/// The rest of a head that came in parts, within the stream's timers.
async fn rest_of_head(conn: &DownstreamConnection, shared: &Rc<Shared>, rules: HeadRules) -> Next {
    let limits = &conn.hcm.limits;
    let begun = Instant::now();
    let mut last_read = begun;
    loop {
        let (at, cause) = head_deadline(limits, begun, last_read);
        let fill = poll_fn(|cx| {
            let mut read = shared.read.borrow_mut();
            shared.poll_fill(&mut read, cx)
        });
        match tokio::time::timeout_at(at.into(), fill).await {
            Ok(Ok(n)) if n > 0 => {
                if limits.stream_idle_timeout.is_some() {
                    last_read = Instant::now();
                }
            }
            Ok(_) => return Next::Closed(Close::Peer),
            Err(_) => {
                return match cause {
                    Some(cause) => Next::Refused(Refusal::timeout(cause)),
                    None => Next::Closed(Close::Now),
                };
            }
        }
        match parse_buffered(shared, rules) {
            Some(Parsed::Head(head, _)) => return Next::Head(head),
            Some(Parsed::Refused(r)) => return Next::Refused(r),
            _ => {}
        }
    }
}

/// Envoy's reply to a refused head; the connection then closes.
async fn refuse(conn: &DownstreamConnection, shared: &Shared, refusal: Refusal) {
    conn.screen.refusals.borrow_mut().push(refusal);
    let mut reply = refusal.reply(conn.hcm.server_name());
    if conn.hcm.limits.header_key_format == HeaderKeyFormat::ProperCase {
        header_case::format_head(&mut reply, KeyFormat::ProperCase);
    }
    let mut pos = 0;
    let _ = poll_fn(|cx| shared.poll_write_all(cx, &reply, &mut pos)).await;
    if let Some(b) = shared.read.borrow_mut().buf.take() {
        b.release();
    }
    close(conn, shared, Close::Delayed).await;
}

/// One request and its response; whether (and how) the connection ends.
async fn exchange(
    conn: &Rc<DownstreamConnection>,
    shared: &Rc<Shared>,
    head: Box<Head>,
    drain: &watch::Receiver<bool>,
) -> Close {
    let Head {
        request,
        framing,
        keep_alive,
        expect_continue,
        dropped_underscores,
    } = *head;
    if dropped_underscores > 0 {
        conn.hcm
            .stats
            .http1_dropped_headers_with_underscores
            .add(u64::from(dropped_underscores));
    }
    let head_request = request.method() == Method::HEAD;
    let http10 = request.version() == http::Version::HTTP_10;
    // proxy_100_continue: the client's `100 Continue` waits for the upstream's.
    let continue_gate = (expect_continue
        && conn.hcm.limits.proxy_100_continue
        && framing != super::head::Framing::None)
        .then(std::sync::Arc::<crate::upstream::ContinueGate>::default);
    let body = shared.begin_body(framing, expect_continue, continue_gate.clone());
    if expect_continue && framing != super::head::Framing::None && continue_gate.is_none() {
        // The `100 Continue` envoyx owes (sent once the body is read; Envoy
        // sends it at once) counts as a 1xx response, as in Envoy.
        conn.hcm.stats.response_class(100);
    }
    let mut request = request.map(|()| PeerBody::Http1(body));
    if let Some(gate) = continue_gate {
        request.extensions_mut().insert(gate);
    }
    // Boxed on its own (it is large): this future stays small, so that neither
    // boxing it nor selecting on the stream copies the stream's state.
    let run = Box::pin(ActiveStream::run(conn.clone(), request));
    let response = tokio::select! {
        biased;
        r = run => r,
        () = peer_gone(shared) => return Close::Peer,
    };
    if shared.read.borrow().eof {
        // The peer left while its request was read: the response is dropped.
        return Close::Peer;
    }
    conn.check_duration();
    let mut response = response;
    if let Some(tunnel) = crate::http::upgrade::Tunnel::take(&mut response) {
        // An upgrade (101) or a terminated CONNECT (200): the connection is the
        // tunnel's from here, and closes with it.
        let (parts, body) = response.into_parts();
        drop(body);
        tunnel
            .run_h1(shared, &parts, conn.hcm.limits.header_key_format)
            .await;
        return Close::Now;
    }
    // Envoy closes after a response that came before the request's end, and
    // once its drain started (idle timeout, max duration, max requests).
    let ours = conn.draining() || !shared.read.borrow().body_over();
    let keeps = keep_alive && !ours && !*drain.borrow();
    let mut response = response;
    if http10 && keeps {
        // HTTP/1.0 closes by default: a kept connection is announced.
        response.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("keep-alive"),
        );
    }
    let written = write_response(
        shared,
        response,
        head_request,
        keeps,
        conn.hcm.limits.header_key_format,
    );
    let keep = tokio::select! {
        biased;
        k = written => k,
        () = peer_gone(shared) => false,
    };
    let read = shared.read.borrow();
    if keep && read.body_over() && !matches!(read.body, super::body::BodyState::Failed(_)) {
        Close::Keep
    } else if read.eof {
        Close::Peer
    } else if !keep_alive || conn.max_requests_reached() {
        // Envoy skips the delay when the stream itself asked for the close.
        Close::Now
    } else {
        Close::Delayed
    }
}

/// Resolves when the peer closes while a request is served. Watches only once the
/// request body is over (until then its reader reads); bytes of a pipelined
/// request are kept in the buffer and stop the watch.
fn peer_gone(shared: &Shared) -> impl Future<Output = ()> + '_ {
    poll_fn(move |cx| {
        let mut read = shared.read.borrow_mut();
        if read.eof {
            return Poll::Ready(());
        }
        if !read.body_over() {
            read.waiter = Some(cx.waker().clone());
            return Poll::Pending;
        }
        if read.ahead {
            return Poll::Pending;
        }
        match shared.poll_fill(&mut read, cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                read.eof = true;
                Poll::Ready(())
            }
            Poll::Ready(Ok(_)) => {
                read.ahead = true;
                Poll::Pending
            }
        }
    })
}

/// Writes the response (head, then its body as it streams); whether the
/// connection may carry another request.
async fn write_response(
    shared: &Shared,
    response: Response<StreamBody>,
    head_request: bool,
    keep_alive: bool,
    key_format: HeaderKeyFormat,
) -> bool {
    let (mut parts, body) = response.into_parts();
    let length = if body.is_end_stream() {
        BodyLength::Empty
    } else {
        match body.size_hint().exact() {
            Some(n) => BodyLength::Known(n),
            None => BodyLength::Unknown,
        }
    };
    shared.read.borrow_mut().expect_continue = None;
    let mut out = Out {
        buf: buffers::take_write(),
        pos: 0,
    };
    let start = out.buf.len();
    let (encoder, last) =
        head::encode_response(&mut parts, length, head_request, keep_alive, &mut out.buf);
    header_case::format_response_head(&parts, key_format, &mut out.buf, start);
    drop(parts);
    let ok = match encoder {
        Encoder::None => {
            drop(body);
            out.flush(shared).await
        }
        encoder => write_body(shared, body, encoder, &mut out).await,
    };
    buffers::give_write(out.buf);
    ok && !last
}

/// Response bytes waiting to be written.
struct Out {
    buf: Vec<u8>,
    pos: usize,
}

impl Out {
    fn poll_flush(&mut self, shared: &Shared, cx: &mut std::task::Context<'_>) -> Poll<bool> {
        let r = std::task::ready!(shared.poll_write_all(cx, &self.buf, &mut self.pos));
        self.buf.clear();
        self.pos = 0;
        Poll::Ready(r.is_ok())
    }

    async fn flush(&mut self, shared: &Shared) -> bool {
        poll_fn(|cx| self.poll_flush(shared, cx)).await
    }
}

enum Polled {
    Frame(Option<Result<Frame<Bytes>, BodyError>>),
    WriteFailed,
}

async fn write_body(shared: &Shared, body: StreamBody, encoder: Encoder, out: &mut Out) -> bool {
    let mut body = std::pin::pin!(body);
    let (mut left, trailer_names) = match encoder {
        Encoder::Length(n) => (Some(n), None),
        Encoder::Chunked(names) => (None, names),
        Encoder::None => (Some(0), None),
    };
    let mut trailers: Option<HeaderMap> = None;
    loop {
        // While the body has nothing ready, what is gathered goes out.
        let polled = poll_fn(|cx| match body.as_mut().poll_frame(cx) {
            Poll::Ready(f) => Poll::Ready(Polled::Frame(f)),
            Poll::Pending => {
                if out.pos < out.buf.len()
                    && let Poll::Ready(false) = out.poll_flush(shared, cx)
                {
                    return Poll::Ready(Polled::WriteFailed);
                }
                Poll::Pending
            }
        })
        .await;
        let frame = match polled {
            Polled::WriteFailed => return false,
            Polled::Frame(None) => break,
            Polled::Frame(Some(Err(_))) => return false,
            Polled::Frame(Some(Ok(frame))) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                if data.is_empty() {
                    continue;
                }
                match left.as_mut() {
                    Some(n) => {
                        let take = (*n).min(data.len() as u64) as usize;
                        out.buf.extend_from_slice(&data[..take]);
                        *n -= take as u64;
                        if take < data.len() {
                            // Longer than its content-length: cut, and close.
                            let _ = out.flush(shared).await;
                            return false;
                        }
                    }
                    None => {
                        use std::io::Write;
                        let _ = write!(out.buf, "{:X}\r\n", data.len());
                        out.buf.extend_from_slice(&data);
                        out.buf.extend_from_slice(b"\r\n");
                    }
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
        if out.buf.len() - out.pos >= WRITE_HIGH && !out.flush(shared).await {
            return false;
        }
    }
    match left {
        // Shorter than its content-length: the peer cannot tell where it ends.
        Some(n) if n > 0 => {
            let _ = out.flush(shared).await;
            false
        }
        Some(_) => out.flush(shared).await,
        None => {
            out.buf.extend_from_slice(b"0\r\n");
            if let (Some(t), Some(allowed)) = (trailers, trailer_names) {
                for (name, value) in t.iter() {
                    if allowed.contains(name) {
                        out.buf.extend_from_slice(name.as_str().as_bytes());
                        out.buf.extend_from_slice(b": ");
                        out.buf.extend_from_slice(value.as_bytes());
                        out.buf.extend_from_slice(b"\r\n");
                    }
                }
            }
            out.buf.extend_from_slice(b"\r\n");
            out.flush(shared).await
        }
    }
}
