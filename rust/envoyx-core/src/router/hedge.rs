//! Hedged tries (`hedge_policy.hedge_on_per_try_timeout`, or an internal request's
//! `x-envoy-hedge-on-per-try-timeout: true`), as Envoy's router makes them
//! (`Filter::onSoftPerTryTimeout`): when a try's per-try timeout fires, the try is
//! not reset; a retry starts beside it whenever one is left (whatever `retry_on`
//! says: there was no failure to classify), and the first response that is not
//! retried wins — the other tries are reset. A retriable outcome that cannot be
//! retried (a try already hedged, no retry left, the breaker full) is dropped
//! while other tries are still out, and answers the request only when it is the
//! last.
//!
//! The sequential retry loop in [`super::filter`] stays the path of every other
//! request: hedging needs several tries in flight, which costs a set of futures.

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use futures_util::stream::{FuturesUnordered, StreamExt};
use http::header::{self, HeaderValue};

use super::filter::{Hedged, Router, RouterOutcome, X_ENVOY_ATTEMPT_COUNT, clone_head, within};
use super::retry_state::{BackOff, RetryDecision, RetryState};
use super::upstream_request::{TryFailure, TryResponse};
use crate::config::circuit_breakers::Priority;
use crate::http::body::ProxyBody;
use crate::per_worker::LocalHandle;
use crate::upstream::lb::LbContext;
use crate::upstream::resource_manager::ResourceGuard;
use crate::upstream::{Cluster, Host};

type TryFuture<'a> = Pin<Box<dyn Future<Output = (usize, Result<TryResponse, TryFailure>)> + 'a>>;
type TimerFuture = Pin<Box<dyn Future<Output = usize>>>;

/// One try in flight (or ended).
struct Try<'a> {
    live: bool,
    /// Its per-try timeout fired and a hedge was considered: its own retriable
    /// outcome is not retried again.
    hedged: bool,
    /// Its place in the cluster's `max_retries`, for a try that is a retry.
    _retry_slot: Option<ResourceGuard<'a>>,
}

/// What to do with a try's outcome.
enum Verdict {
    /// The request's answer.
    Answer,
    /// Retriable, and a retry is scheduled.
    Retry,
    /// Retriable but not retried: dropped while other tries are out.
    CouldNotRetry,
    /// Retriable, but the cluster's `max_retries` refused the retry (`UO`); as
    /// `CouldNotRetry` otherwise.
    Overflow,
}

impl Router<'_, '_> {
    pub(super) async fn decode_hedged(&mut self, h: Hedged<'_>) -> RouterOutcome {
        let Hedged {
            cluster,
            upstream,
            timeouts,
            rewrite,
            deadline,
            per_try,
            mut retry,
            hash,
            set_cookie,
            replay,
            mut body,
            parts,
            sni,
            include_attempt_count,
            logged,
        } = h;
        let router = self;
        let stats = &cluster.stats;
        let mut tries: Vec<Try<'_>> = Vec::new();
        let mut sends: FuturesUnordered<TryFuture<'_>> = FuturesUnordered::new();
        let mut timers: FuturesUnordered<TimerFuture> = FuturesUnordered::new();
        let mut previous_hosts: Vec<LocalHandle<Host>> = Vec::new();
        // The scheduled retry (a back-off, then a try) and its `max_retries` slot;
        // a newer decision replaces it, as Envoy's `resetRetry` does.
        let mut pending: Option<(Pin<Box<tokio::time::Sleep>>, ResourceGuard<'_>)> = None;
        let mut exhausted = false;
        let mut start_slot: Option<ResourceGuard<'_>> = None;
        let mut start_now = true;
        loop {
            if start_now {
                start_now = false;
                let attempt = tries.len() as u32 + 1;
                let context = LbContext {
                    previous_hosts: if retry.avoids_previous_hosts() {
                        &previous_hosts
                    } else {
                        &[]
                    },
                    host_selection_attempts: retry.host_selection_max_attempts().saturating_add(1),
                    hash,
                    headers: Some(&parts.headers),
                    restored_local_address: router
                        .conn
                        .local
                        .filter(|_| router.conn.local_restored),
                };
                match upstream.choose_host(&context) {
                    Ok(host) => {
                        if let Some(r) = router.record.as_mut() {
                            host.record_in(r);
                        }
                        let mut try_parts = clone_head(&parts);
                        if include_attempt_count {
                            try_parts
                                .headers
                                .insert(X_ENVOY_ATTEMPT_COUNT.clone(), HeaderValue::from(attempt));
                        }
                        let try_body = match &replay {
                            Some(r) => r.body(),
                            None => body.take().unwrap_or(ProxyBody::Empty),
                        };
                        let index = tries.len();
                        tries.push(Try {
                            live: true,
                            hedged: false,
                            _retry_slot: start_slot.take(),
                        });
                        previous_hosts.push(host.clone());
                        // The route's timeout bounds every try; the per-try timeout
                        // only starts a hedge.
                        let wait = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                        let sni = sni.clone();
                        let expected = (attempt > 1)
                            .then(|| timeouts.expected_for_retry(deadline))
                            .flatten();
                        sends.push(Box::pin(async move {
                            let sent = upstream
                                .send(&host, sni, try_parts, try_body, wait, |p, h2| {
                                    rewrite.apply_for_try(p, h2, &host.hostname, expected);
                                    if let Some(l) = logged {
                                        l.capture(&p.headers);
                                    }
                                })
                                .await;
                            (index, sent)
                        }));
                        timers.push(Box::pin(async move {
                            tokio::time::sleep(per_try).await;
                            index
                        }));
                    }
                    Err(failure) if sends.is_empty() => {
                        let attempt = tries.len() as u32;
                        return router.failure(failure, cluster, timeouts, attempt, exhausted);
                    }
                    // Other tries are still out: this retry is lost, they go on.
                    Err(_) => {}
                }
            }
            let event = tokio::select! {
                Some((index, sent)) = sends.next() => Event::Done(index, sent),
                Some(index) = timers.next() => Event::PerTryTimeout(index),
                _ = async { pending.as_mut().expect("guarded").0.as_mut().await },
                    if pending.is_some() => Event::StartRetry,
                _ = sleep_until(deadline) => Event::Deadline,
            };
            match event {
                Event::StartRetry => {
                    let (_, slot) = pending.take().expect("a scheduled retry");
                    if let Some(r) = &replay
                        && !r.is_complete()
                        && !matches!(within(deadline, r.fill()).await, Some(true))
                    {
                        // The body cannot be sent again: no retry after all.
                        drop(slot);
                        if sends.is_empty() {
                            let attempt = tries.len() as u32;
                            return router.route_timeout(cluster, timeouts, attempt, exhausted);
                        }
                        continue;
                    }
                    start_slot = Some(slot);
                    start_now = true;
                }
                Event::Deadline => {
                    let attempt = tries.len() as u32;
                    return router.route_timeout(cluster, timeouts, attempt, false);
                }
                Event::PerTryTimeout(index) => {
                    let t = &mut tries[index];
                    if !t.live {
                        continue;
                    }
                    // Not counted in `upstream_rq_per_try_timeout`: nothing was reset
                    // (Envoy counts only the per-try timeouts that end a try).
                    t.hedged = true;
                    // Envoy starts the per-try timer once the request is whole; a
                    // body still arriving is not hedged (one reader at a time).
                    if replay.as_ref().is_some_and(|r| !r.is_complete()) {
                        continue;
                    }
                    let decision = retry.on_hedge();
                    let verdict = schedule(
                        decision,
                        cluster,
                        upstream.priority,
                        &mut retry,
                        &mut pending,
                        &mut exhausted,
                    );
                    if let (Verdict::Overflow, Some(r)) = (verdict, router.record.as_mut()) {
                        r.response_flags = "UO";
                    }
                }
                Event::Done(index, sent) => {
                    tries[index].live = false;
                    let hedged = tries[index].hedged;
                    let verdict = match &sent {
                        Ok(TryResponse { response, .. }) => {
                            let (status, headers) =
                                (response.status().as_u16(), response.headers());
                            if hedged {
                                if retry.would_retry_response(status, headers) {
                                    Verdict::CouldNotRetry
                                } else {
                                    Verdict::Answer
                                }
                            } else {
                                let decision = retry.on_response(status, headers);
                                let verdict = schedule(
                                    decision,
                                    cluster,
                                    upstream.priority,
                                    &mut retry,
                                    &mut pending,
                                    &mut exhausted,
                                );
                                if let Verdict::Retry = verdict {
                                    stats.retry_response(status);
                                }
                                verdict
                            }
                        }
                        Err(TryFailure::Timeout) => {
                            // Only the route's timeout bounds a hedged try.
                            let attempt = tries.len() as u32;
                            return router.route_timeout(cluster, timeouts, attempt, false);
                        }
                        Err(failure) => match failure.reset_kind() {
                            None => Verdict::CouldNotRetry,
                            Some(_) if hedged => Verdict::CouldNotRetry,
                            Some(kind) => {
                                let decision = retry.on_reset(kind);
                                schedule(
                                    decision,
                                    cluster,
                                    upstream.priority,
                                    &mut retry,
                                    &mut pending,
                                    &mut exhausted,
                                )
                            }
                        },
                    };
                    if let (Verdict::Overflow, Some(r)) = (&verdict, router.record.as_mut()) {
                        r.response_flags = "UO";
                    }
                    let others_out = !sends.is_empty() || pending.is_some();
                    match verdict {
                        Verdict::Retry => continue,
                        Verdict::CouldNotRetry | Verdict::Overflow if others_out => continue,
                        Verdict::CouldNotRetry | Verdict::Overflow | Verdict::Answer => {}
                    }
                    let attempt = tries.len() as u32;
                    return match sent {
                        Ok(resp) => {
                            if retry.retries > 0 && !exhausted {
                                stats.upstream_rq_retry_success.inc();
                            }
                            let mut outcome = router.upstream_response(
                                resp, cluster, timeouts, deadline, attempt, exhausted,
                            );
                            if let (RouterOutcome::Upstream(up), Some(cookie)) =
                                (&mut outcome, set_cookie)
                            {
                                up.parts.headers.append(header::SET_COOKIE, cookie);
                            }
                            outcome
                        }
                        Err(failure) => {
                            router.failure(failure, cluster, timeouts, attempt, exhausted)
                        }
                    };
                }
            }
        }
    }
}

// One event at a time, moved straight into its handler: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Event {
    Done(usize, Result<TryResponse, TryFailure>),
    PerTryTimeout(usize),
    StartRetry,
    Deadline,
}

/// Acts on a retry decision: a retry is scheduled after its back-off when the
/// cluster's `max_retries` has room (it replaces a retry already scheduled).
fn schedule<'c>(
    decision: RetryDecision,
    cluster: &'c LocalHandle<Cluster>,
    priority: Priority,
    retry: &mut RetryState,
    pending: &mut Option<(Pin<Box<tokio::time::Sleep>>, ResourceGuard<'c>)>,
    exhausted: &mut bool,
) -> Verdict {
    let stats = &cluster.stats;
    match decision {
        RetryDecision::No => Verdict::Answer,
        RetryDecision::LimitExceeded => {
            stats.upstream_rq_retry_limit_exceeded.inc();
            *exhausted = true;
            Verdict::CouldNotRetry
        }
        RetryDecision::Yes(back_off) => {
            // A replaced retry gives its slot back first.
            *pending = None;
            match cluster.resources.try_acquire_retry(priority) {
                Some(slot) => {
                    stats.upstream_rq_retry.inc();
                    match back_off {
                        BackOff::Exponential(_) => {
                            stats.upstream_rq_retry_backoff_exponential.inc()
                        }
                        BackOff::RateLimited(_) => {
                            stats.upstream_rq_retry_backoff_ratelimited.inc()
                        }
                    }
                    *pending = Some((Box::pin(tokio::time::sleep(back_off.delay())), slot));
                    Verdict::Retry
                }
                None => {
                    retry.refused();
                    Verdict::Overflow
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
