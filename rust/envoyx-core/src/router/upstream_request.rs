//! One try of a request against one upstream host (Envoy's `UpstreamRequest`):
//! host choice through the load balancer, pool acquire, send, the per-try timer,
//! and the cluster and host stats of the try. Retries, shadowing and hedging loop
//! over tries here, not in the connection manager.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;

use crate::config::circuit_breakers::Priority;
use crate::http::body::{ProxyBody, StreamEnd};
use crate::per_worker::LocalHandle;
use crate::upstream::ConnectError;
use crate::upstream::health_check;
use crate::upstream::lb::LbContext;
use crate::upstream::outlier::{self, LocalOriginEvent};
use crate::upstream::pool::{AcquireError, Sender};
use crate::upstream::{Cluster, Host, WorkerPools};

/// Why a try produced no response.
pub enum TryFailure {
    /// The cluster has no host (`UH`).
    NoHealthyUpstream,
    /// No connection could be had (`UF`).
    Connect(ConnectError),
    /// A circuit breaker refused the request (`UO`): `max_pending_requests` or
    /// `max_requests` was reached. Never retried, as in Envoy.
    Overflow,
    /// The downstream request body failed while being sent (a downstream codec
    /// error, not the upstream's fault).
    DownstreamBody,
    /// The upstream reset or closed before response headers (`UC`).
    Reset(hyper::Error),
    /// No response headers within the try's timeout (`UT`); whether it was the
    /// route's or the per-try one is the router's to say.
    Timeout,
}

/// A response whose body is still to be streamed, and the try it belongs to.
pub struct TryResponse {
    pub response: Response<Incoming>,
    pub handle: UpstreamHandle,
    pub service_time: Duration,
}

/// A try of one request on one cluster from one worker.
pub struct UpstreamRequest<'a> {
    /// The worker's handle on the cluster (an `Rc`: cloning it per try touches no
    /// reference count another worker writes).
    pub cluster: &'a LocalHandle<Cluster>,
    pub pools: &'a Rc<WorkerPools>,
    /// The route's `priority`: whose connections and circuit breakers.
    pub priority: Priority,
}

impl UpstreamRequest<'_> {
    /// The host for this try, by the cluster's load balancer.
    pub fn choose_host(&self, context: &LbContext<'_>) -> Result<LocalHandle<Host>, TryFailure> {
        self.pools
            .choose_host(self.cluster, context)
            .ok_or_else(|| {
                self.cluster.stats.upstream_cx_none_healthy.inc();
                TryFailure::NoHealthyUpstream
            })
    }

    /// Sends the request to `host` and waits (up to `timeout`) for the response
    /// headers. `prepare` edits the request once the connection's protocol is
    /// known (its form of the target and `Host`).
    pub async fn send(
        &self,
        host: &LocalHandle<Host>,
        sni: Option<Arc<str>>,
        mut parts: http::request::Parts,
        body: ProxyBody,
        timeout: Option<Duration>,
        prepare: impl FnOnce(&mut http::request::Parts, bool),
    ) -> Result<TryResponse, TryFailure> {
        let cluster = self.cluster;
        let stats = &cluster.stats;
        // The timeout runs from here: a request waiting for a connection (pending
        // behind a circuit breaker) times out as in Envoy.
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let acquired = self.pools.acquire(
            cluster.shared(),
            host.shared(),
            sni.clone(),
            self.priority,
            parts.version,
        );
        let acquired = match deadline {
            Some(d) => tokio::time::timeout_at(d, acquired).await,
            None => Ok(acquired.await),
        };
        let mut sender = match acquired {
            Err(_elapsed) => return Err(TryFailure::Timeout),
            Ok(Ok(s)) => s,
            Ok(Err(AcquireError::Overflow)) => return Err(TryFailure::Overflow),
            Ok(Err(AcquireError::Connect(e))) => {
                outlier::put_result(cluster, host.shared(), LocalOriginEvent::ConnectFailed);
                host.stats.rq_error().inc();
                stats.upstream_rq_pending_failure_eject.inc();
                return Err(TryFailure::Connect(e));
            }
        };
        outlier::put_result(cluster, host.shared(), LocalOriginEvent::ConnectSuccess);
        // Counted once the request has a connection, as Envoy's pool does.
        stats.upstream_rq_total.inc();
        host.stats.rq_total().inc();
        let h2 = sender.is_http2();
        prepare(&mut parts, h2);
        parts.version = if h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        stats.upstream_rq_active.inc();
        host.stats.rq_active().inc();
        // Dropped on every early return below, which ends the try's active counts.
        let mut handle = UpstreamHandle {
            cluster: cluster.clone(),
            host: host.clone(),
            pools: self.pools.clone(),
            sender: None,
            sni,
            priority: self.priority,
        };
        let sent_at = Instant::now();
        let sent = sender.send(Request::from_parts(parts, body));
        let response = match deadline {
            Some(d) => tokio::time::timeout_at(d, sent).await,
            None => Ok(sent.await),
        };
        let response = match response {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) if e.is_user() => return Err(TryFailure::DownstreamBody),
            Ok(Err(e)) => {
                outlier::put_result(cluster, host.shared(), LocalOriginEvent::ConnectFailed);
                host.stats.rq_error().inc();
                stats.upstream_rq_rx_reset.inc();
                return Err(TryFailure::Reset(e));
            }
            Err(_elapsed) => {
                outlier::put_result(cluster, host.shared(), LocalOriginEvent::Timeout);
                host.stats.rq_timeout().inc();
                return Err(TryFailure::Timeout);
            }
        };
        let service_time = sent_at.elapsed();
        stats
            .upstream_rq_time
            .record(service_time.as_millis() as u64);
        // The response counters are the router's: a retried response is counted
        // as `retry.upstream_rq_<code>` instead, as in Envoy.
        let status = response.status().as_u16();
        outlier::put_http_response_code(cluster, host.shared(), status);
        health_check::check_immediate_fail(cluster, host.shared(), response.headers());
        if status < 500 {
            host.stats.rq_success().inc();
        } else {
            host.stats.rq_error().inc();
        }
        handle.sender = Some(sender);
        Ok(TryResponse {
            response,
            handle,
            service_time,
        })
    }
}

/// A try in flight: holds its connection (an HTTP/2 stream's lease, or the
/// HTTP/1.1 connection that returns to the pool when the response completed) and
/// its `upstream_rq_active` count, which ends when the handle drops.
pub struct UpstreamHandle {
    cluster: LocalHandle<Cluster>,
    host: LocalHandle<Host>,
    pools: Rc<WorkerPools>,
    sender: Option<Sender>,
    /// The pool key's SNI and priority, to return the connection to its pool.
    sni: Option<Arc<str>>,
    priority: Priority,
}

impl TryFailure {
    /// The failure as a retry policy sees it (None: never retried).
    pub fn reset_kind(&self) -> Option<super::retry_state::ResetKind> {
        use super::retry_state::ResetKind;
        match self {
            // Envoy never retries an overflow.
            TryFailure::NoHealthyUpstream | TryFailure::DownstreamBody | TryFailure::Overflow => {
                None
            }
            TryFailure::Connect(_) => Some(ResetKind::ConnectFailure),
            TryFailure::Reset(e) => Some(if is_refused_stream(e) {
                ResetKind::RefusedStream
            } else {
                ResetKind::Reset
            }),
            TryFailure::Timeout => Some(ResetKind::PerTryTimeout),
        }
    }
}

/// Whether the upstream refused the HTTP/2 stream (`REFUSED_STREAM`).
fn is_refused_stream(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = err.source();
    }
    false
}

impl UpstreamHandle {
    /// The response will not be read to its end: the connection is not reused.
    pub fn forgo_reuse(&mut self) {
        self.sender = None;
    }

    /// The response stream ended (the active counts end when the handle drops).
    pub fn finish(mut self, end: StreamEnd) {
        match end {
            StreamEnd::Complete => {
                if let Some(Sender::Http1(conn)) = self.sender.take() {
                    self.pools.release(
                        self.cluster.shared(),
                        self.host.shared(),
                        self.sni.take(),
                        self.priority,
                        conn,
                    );
                }
            }
            StreamEnd::UpstreamError => self.cluster.stats.upstream_rq_rx_reset.inc(),
            StreamEnd::UpstreamTimeout => self.cluster.stats.upstream_rq_timeout.inc(),
            StreamEnd::DownstreamGone => {}
        }
    }
}

impl Drop for UpstreamHandle {
    fn drop(&mut self) {
        self.cluster.stats.upstream_rq_active.dec();
        self.host.stats.rq_active().dec();
    }
}
