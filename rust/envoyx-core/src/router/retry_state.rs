//! A request's retry state (Envoy's `RetryStateImpl`): the route's policy merged
//! with the request's `x-envoy-retry-*` headers (present only on internal
//! requests: see [`crate::http::internal_request`]), what a try's outcome means
//! for a retry, how many are left, and the jittered back-off between them.

use std::time::Duration;

use http::HeaderMap;
use http::header::HeaderName;

use crate::config::retry::{RetryPolicy, retry_on};
use crate::http::headers::{GRPC_STATUS, X_ENVOY_OVERLOADED};

pub static X_ENVOY_RETRY_ON: HeaderName = HeaderName::from_static("x-envoy-retry-on");
pub static X_ENVOY_RETRY_GRPC_ON: HeaderName = HeaderName::from_static("x-envoy-retry-grpc-on");
pub static X_ENVOY_MAX_RETRIES: HeaderName = HeaderName::from_static("x-envoy-max-retries");
pub static X_ENVOY_RETRIABLE_STATUS_CODES: HeaderName =
    HeaderName::from_static("x-envoy-retriable-status-codes");
pub static X_ENVOY_RETRIABLE_HEADER_NAMES: HeaderName =
    HeaderName::from_static("x-envoy-retriable-header-names");
pub static X_ENVOY_RATELIMITED: HeaderName = HeaderName::from_static("x-envoy-ratelimited");

/// Why a try produced no response, as a retry sees it (Envoy's reset reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetKind {
    /// No connection could be had (connect failure or connect timeout).
    ConnectFailure,
    /// The upstream reset or closed the stream before response headers.
    Reset,
    /// The upstream refused the HTTP/2 stream (`REFUSED_STREAM`).
    RefusedStream,
    /// The per-try timeout fired before response headers.
    PerTryTimeout,
}

/// The wait before a retry, and where it came from (each kind has its stat).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackOff {
    /// Envoy's jittered exponential back-off (`upstream_rq_retry_backoff_exponential`).
    Exponential(Duration),
    /// A reset header of the response under `rate_limited_retry_back_off`
    /// (`upstream_rq_retry_backoff_ratelimited`).
    RateLimited(Duration),
}

impl BackOff {
    pub fn delay(self) -> Duration {
        match self {
            BackOff::Exponential(d) | BackOff::RateLimited(d) => d,
        }
    }
}

/// The decision on a try's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Not a retriable outcome: it is the request's answer.
    No,
    /// Retry after this back-off.
    Yes(BackOff),
    /// Retriable, but the retries are used up (`URX`).
    LimitExceeded,
}

pub struct RetryState {
    retry_on: u32,
    remaining: u32,
    retriable_status_codes: Vec<u16>,
    /// `x-envoy-retriable-header-names`: names whose presence makes a response
    /// retriable, besides the policy's `retriable_headers`.
    retriable_header_names: Vec<HeaderName>,
    policy: Option<std::sync::Arc<RetryPolicy>>,
    /// Envoy's `JitteredExponentialBackOffStrategy`: the next back-off is random
    /// below this, which doubles up to `max_interval`.
    next_interval: Duration,
    max_interval: Duration,
    /// Retries done so far.
    pub retries: u32,
}

impl RetryState {
    /// The request's retry state, or None when nothing can be retried. Reads and
    /// removes the `x-envoy-retry-*` request headers, as Envoy does.
    pub fn new(
        policy: Option<&std::sync::Arc<RetryPolicy>>,
        headers: &mut HeaderMap,
    ) -> Option<Self> {
        let has_headers =
            headers.contains_key(&X_ENVOY_RETRY_ON) || headers.contains_key(&X_ENVOY_RETRY_GRPC_ON);
        if policy.is_none_or(|p| p.retry_on == 0) && !has_headers {
            // Still consumed, so the upstream never sees them.
            headers.remove(&X_ENVOY_MAX_RETRIES);
            headers.remove(&X_ENVOY_RETRIABLE_STATUS_CODES);
            headers.remove(&X_ENVOY_RETRIABLE_HEADER_NAMES);
            return None;
        }
        let defaults = RetryPolicy::default();
        let p = policy.map_or(&defaults, |p| &**p);
        let mut on = p.retry_on;
        let text =
            |h: Option<http::HeaderValue>| h.and_then(|v| v.to_str().ok().map(str::to_string));
        if let Some(v) = text(headers.remove(&X_ENVOY_RETRY_ON)) {
            on |= retry_on::parse_header(&v, retry_on::http);
        }
        if let Some(v) = text(headers.remove(&X_ENVOY_RETRY_GRPC_ON)) {
            on |= retry_on::parse_header(&v, retry_on::grpc);
        }
        let mut remaining = p.num_retries;
        if let Some(n) =
            text(headers.remove(&X_ENVOY_MAX_RETRIES)).and_then(|v| v.trim().parse().ok())
            && on != 0
        {
            remaining = n;
        }
        let mut codes = p.retriable_status_codes.clone();
        if let Some(v) = text(headers.remove(&X_ENVOY_RETRIABLE_STATUS_CODES)) {
            codes.extend(v.split(',').filter_map(|c| c.trim().parse::<u16>().ok()));
        }
        let names = text(headers.remove(&X_ENVOY_RETRIABLE_HEADER_NAMES))
            .map(|v| {
                v.split(',')
                    .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
                    .collect()
            })
            .unwrap_or_default();
        if on == 0 {
            return None;
        }
        // `retriable_request_headers`: only a matching request is retried.
        if !p.retriable_request_headers.is_empty()
            && !p
                .retriable_request_headers
                .iter()
                .any(|m| m.matches(headers))
        {
            return None;
        }
        Some(RetryState {
            retry_on: on,
            remaining,
            retriable_status_codes: codes,
            retriable_header_names: names,
            next_interval: p.base_interval,
            max_interval: p.max_interval,
            policy: policy.cloned(),
            retries: 0,
        })
    }

    /// Whether the route's policy avoids hosts earlier tries went to.
    pub fn avoids_previous_hosts(&self) -> bool {
        self.policy.as_ref().is_some_and(|p| p.avoid_previous_hosts)
    }

    /// How often a host pick may be redone to avoid a previous host.
    pub fn host_selection_max_attempts(&self) -> u32 {
        self.policy
            .as_ref()
            .map_or(1, |p| p.host_selection_max_attempts)
    }

    /// The decision on a response (its status and headers).
    pub fn on_response(&mut self, status: u16, headers: &HeaderMap) -> RetryDecision {
        let retriable = self.would_retry_response(status, headers);
        let decision = self.decide(retriable);
        // A rate-limited back-off replaces this one wait; the exponential one is
        // not advanced (Envoy keeps the two strategies apart).
        let rate_limited = match decision {
            RetryDecision::Yes(_) => self
                .policy
                .as_ref()
                .and_then(|p| p.rate_limited_back_off.as_ref())
                .and_then(|r| r.interval(headers))
                .filter(|i| i.as_millis() > 1),
            _ => None,
        };
        match rate_limited {
            Some(min) => {
                let min = min.as_millis() as u64;
                RetryDecision::Yes(BackOff::RateLimited(Duration::from_millis(
                    min + rand::random::<u64>() % (min >> 1),
                )))
            }
            None => decision,
        }
    }

    /// The decision on a try that ended without a response.
    pub fn on_reset(&mut self, kind: ResetKind) -> RetryDecision {
        let on = self.retry_on;
        let retriable = match kind {
            ResetKind::ConnectFailure => {
                on & (retry_on::CONNECT_FAILURE
                    | retry_on::FIVE_XX
                    | retry_on::GATEWAY_ERROR
                    | retry_on::RESET
                    | retry_on::RESET_BEFORE_REQUEST)
                    != 0
            }
            ResetKind::Reset | ResetKind::PerTryTimeout => {
                on & (retry_on::FIVE_XX | retry_on::GATEWAY_ERROR | retry_on::RESET) != 0
            }
            ResetKind::RefusedStream => {
                on & (retry_on::REFUSED_STREAM
                    | retry_on::FIVE_XX
                    | retry_on::GATEWAY_ERROR
                    | retry_on::RESET)
                    != 0
            }
        };
        self.decide(retriable)
    }

    /// A hedged retry on a per-try timeout: made whenever a retry is left.
    pub fn on_hedge(&mut self) -> RetryDecision {
        self.decide(true)
    }

    /// The retry just decided was refused (the cluster's `max_retries` or retry
    /// budget): it is not made, so it does not count as one.
    pub fn refused(&mut self) {
        self.retries = self.retries.saturating_sub(1);
    }

    fn decide(&mut self, retriable: bool) -> RetryDecision {
        if !retriable {
            return RetryDecision::No;
        }
        if self.remaining == 0 {
            return RetryDecision::LimitExceeded;
        }
        self.remaining -= 1;
        self.retries += 1;
        RetryDecision::Yes(BackOff::Exponential(self.next_back_off()))
    }

    fn next_back_off(&mut self) -> Duration {
        let interval = self.next_interval;
        self.next_interval = if interval > self.max_interval / 2 {
            self.max_interval
        } else {
            interval * 2
        };
        let ms = interval.as_millis().max(1) as u64;
        let jittered = rand::random::<u64>() % ms;
        Duration::from_millis(jittered).min(self.max_interval)
    }

    /// Whether a response is retriable under the policy (nothing is counted).
    pub fn would_retry_response(&self, status: u16, headers: &HeaderMap) -> bool {
        let on = self.retry_on;
        // A shed or rate-limited answer from another Envoy is not retried, unless
        // the policy asks for rate-limited ones.
        if headers.contains_key(&X_ENVOY_OVERLOADED) {
            return false;
        }
        if headers.contains_key(&X_ENVOY_RATELIMITED) {
            return on & retry_on::ENVOY_RATE_LIMITED != 0;
        }
        if on & retry_on::FIVE_XX != 0 && (500..600).contains(&status) {
            return true;
        }
        if on & retry_on::GATEWAY_ERROR != 0 && matches!(status, 502..=504) {
            return true;
        }
        if on & retry_on::RETRIABLE_4XX != 0 && status == 409 {
            return true;
        }
        if on & retry_on::RETRIABLE_STATUS_CODES != 0
            && self.retriable_status_codes.contains(&status)
        {
            return true;
        }
        if on & retry_on::RETRIABLE_HEADERS != 0 {
            let by_policy = self
                .policy
                .as_ref()
                .is_some_and(|p| p.retriable_headers.iter().any(|m| m.matches(headers)));
            let by_name = self
                .retriable_header_names
                .iter()
                .any(|n| headers.contains_key(n));
            if by_policy || by_name {
                return true;
            }
        }
        if on & retry_on::GRPC_ANY != 0
            && let Some(code) = headers
                .get(&GRPC_STATUS)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok())
        {
            let bit = match code {
                1 => retry_on::GRPC_CANCELLED,
                4 => retry_on::GRPC_DEADLINE_EXCEEDED,
                8 => retry_on::GRPC_RESOURCE_EXHAUSTED,
                13 => retry_on::GRPC_INTERNAL,
                14 => retry_on::GRPC_UNAVAILABLE,
                _ => 0,
            };
            if on & bit != 0 {
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn state(on: u32, n: u32, headers: &mut HeaderMap) -> Option<RetryState> {
        let p = Arc::new(RetryPolicy {
            retry_on: on,
            num_retries: n,
            ..Default::default()
        });
        RetryState::new(Some(&p), headers)
    }

    #[test]
    fn five_xx_retries_responses_and_resets_until_the_limit() {
        let mut s = state(retry_on::FIVE_XX, 2, &mut HeaderMap::new()).unwrap();
        assert!(matches!(
            s.on_response(503, &HeaderMap::new()),
            RetryDecision::Yes(_)
        ));
        assert!(matches!(
            s.on_reset(ResetKind::ConnectFailure),
            RetryDecision::Yes(_)
        ));
        assert_eq!(
            s.on_response(500, &HeaderMap::new()),
            RetryDecision::LimitExceeded
        );
        assert_eq!(s.on_response(200, &HeaderMap::new()), RetryDecision::No);
    }

    #[test]
    fn gateway_error_is_502_to_504_only() {
        let mut s = state(retry_on::GATEWAY_ERROR, 5, &mut HeaderMap::new()).unwrap();
        assert_eq!(s.on_response(500, &HeaderMap::new()), RetryDecision::No);
        assert!(matches!(
            s.on_response(502, &HeaderMap::new()),
            RetryDecision::Yes(_)
        ));
    }

    #[test]
    fn connect_failure_alone_does_not_retry_resets() {
        let mut s = state(retry_on::CONNECT_FAILURE, 5, &mut HeaderMap::new()).unwrap();
        assert_eq!(s.on_reset(ResetKind::Reset), RetryDecision::No);
        assert_eq!(s.on_response(503, &HeaderMap::new()), RetryDecision::No);
        assert!(matches!(
            s.on_reset(ResetKind::ConnectFailure),
            RetryDecision::Yes(_)
        ));
    }

    #[test]
    fn headers_add_conditions_and_set_the_limit() {
        let mut h = HeaderMap::new();
        h.insert(&X_ENVOY_RETRY_ON, "retriable-status-codes".parse().unwrap());
        h.insert(&X_ENVOY_RETRIABLE_STATUS_CODES, "418".parse().unwrap());
        h.insert(&X_ENVOY_MAX_RETRIES, "3".parse().unwrap());
        let mut s = RetryState::new(None, &mut h).unwrap();
        assert!(h.is_empty(), "the headers are consumed: {h:?}");
        for _ in 0..3 {
            assert!(matches!(
                s.on_response(418, &HeaderMap::new()),
                RetryDecision::Yes(_)
            ));
        }
        assert_eq!(
            s.on_response(418, &HeaderMap::new()),
            RetryDecision::LimitExceeded
        );
    }

    #[test]
    fn an_overloaded_answer_is_never_retried() {
        let mut s = state(retry_on::FIVE_XX, 5, &mut HeaderMap::new()).unwrap();
        let mut h = HeaderMap::new();
        h.insert(&X_ENVOY_OVERLOADED, "true".parse().unwrap());
        assert_eq!(s.on_response(503, &h), RetryDecision::No);
    }

    #[test]
    fn grpc_status_in_headers_is_retried_by_name() {
        let mut s = state(retry_on::GRPC_UNAVAILABLE, 5, &mut HeaderMap::new()).unwrap();
        let mut h = HeaderMap::new();
        h.insert(&GRPC_STATUS, "14".parse().unwrap());
        assert!(matches!(s.on_response(200, &h), RetryDecision::Yes(_)));
        h.insert(&GRPC_STATUS, "13".parse().unwrap());
        assert_eq!(s.on_response(200, &h), RetryDecision::No);
    }

    #[test]
    fn back_off_is_jittered_below_a_doubling_interval() {
        let p = Arc::new(RetryPolicy {
            retry_on: retry_on::FIVE_XX,
            num_retries: 10,
            base_interval: Duration::from_millis(10),
            max_interval: Duration::from_millis(35),
            ..Default::default()
        });
        let mut s = RetryState::new(Some(&p), &mut HeaderMap::new()).unwrap();
        let bounds = [10, 20, 35, 35];
        for bound in bounds {
            match s.on_reset(ResetKind::Reset) {
                RetryDecision::Yes(BackOff::Exponential(d)) => {
                    assert!(d < Duration::from_millis(bound), "{d:?} {bound}")
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
