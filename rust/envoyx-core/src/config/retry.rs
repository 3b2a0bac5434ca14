//! A route's resilience settings: `retry_policy` (route or virtual host),
//! `hedge_policy`, and the header matchers retries use, as Envoy's
//! `envoy.config.route.v3.RetryPolicy` / `HedgePolicy` define them.

use std::time::Duration;

use super::matcher::{StringMatcher, map_string_matcher};
use super::reader::Obj;

/// The `retry_on` conditions (Envoy's `RetryPolicy::RETRY_ON_*` bits).
pub mod retry_on {
    pub const FIVE_XX: u32 = 1 << 0;
    pub const GATEWAY_ERROR: u32 = 1 << 1;
    pub const CONNECT_FAILURE: u32 = 1 << 2;
    pub const RETRIABLE_4XX: u32 = 1 << 3;
    pub const REFUSED_STREAM: u32 = 1 << 4;
    pub const RETRIABLE_STATUS_CODES: u32 = 1 << 5;
    pub const RESET: u32 = 1 << 6;
    pub const RETRIABLE_HEADERS: u32 = 1 << 7;
    pub const ENVOY_RATE_LIMITED: u32 = 1 << 8;
    pub const RESET_BEFORE_REQUEST: u32 = 1 << 9;
    pub const GRPC_CANCELLED: u32 = 1 << 10;
    pub const GRPC_DEADLINE_EXCEEDED: u32 = 1 << 11;
    pub const GRPC_RESOURCE_EXHAUSTED: u32 = 1 << 12;
    pub const GRPC_UNAVAILABLE: u32 = 1 << 13;
    pub const GRPC_INTERNAL: u32 = 1 << 14;
    pub const GRPC_ANY: u32 = GRPC_CANCELLED
        | GRPC_DEADLINE_EXCEEDED
        | GRPC_RESOURCE_EXHAUSTED
        | GRPC_UNAVAILABLE
        | GRPC_INTERNAL;

    /// The bit of one HTTP `retry_on` name (`x-envoy-retry-on` too).
    pub fn http(name: &str) -> Option<u32> {
        Some(match name {
            "5xx" => FIVE_XX,
            "gateway-error" => GATEWAY_ERROR,
            "connect-failure" => CONNECT_FAILURE,
            "retriable-4xx" => RETRIABLE_4XX,
            "refused-stream" => REFUSED_STREAM,
            "retriable-status-codes" => RETRIABLE_STATUS_CODES,
            "reset" => RESET,
            "reset-before-request" => RESET_BEFORE_REQUEST,
            "retriable-headers" => RETRIABLE_HEADERS,
            "envoy-ratelimited" => ENVOY_RATE_LIMITED,
            _ => return None,
        })
    }

    /// The bit of one gRPC `retry_on` name (`x-envoy-retry-grpc-on` too).
    pub fn grpc(name: &str) -> Option<u32> {
        Some(match name {
            "cancelled" => GRPC_CANCELLED,
            "deadline-exceeded" => GRPC_DEADLINE_EXCEEDED,
            "resource-exhausted" => GRPC_RESOURCE_EXHAUSTED,
            "unavailable" => GRPC_UNAVAILABLE,
            "internal" => GRPC_INTERNAL,
            _ => return None,
        })
    }

    /// The bits of a comma-separated list (a request header's value): names Envoy
    /// does not know are skipped, as Envoy skips them.
    pub fn parse_header(value: &str, one: fn(&str) -> Option<u32>) -> u32 {
        value
            .split(',')
            .filter_map(|n| one(n.trim()))
            .fold(0, |acc, bit| acc | bit)
    }
}

/// A header condition of a retry policy (`envoy.config.route.v3.HeaderMatcher`,
/// the forms retries use).
#[derive(Debug, Clone)]
pub struct HeaderCondition {
    pub name: http::HeaderName,
    pub test: HeaderTest,
    /// `invert_match`.
    pub invert: bool,
}

#[derive(Debug, Clone)]
pub enum HeaderTest {
    /// `present_match`: the header is there (true) or absent (false).
    Present(bool),
    /// `string_match` on the value.
    Value(StringMatcher),
}

impl HeaderCondition {
    pub fn matches(&self, headers: &http::HeaderMap) -> bool {
        let value = headers.get(&self.name);
        let hit = match &self.test {
            HeaderTest::Present(want) => value.is_some() == *want,
            HeaderTest::Value(m) => value
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| m.matches(v)),
        };
        hit != self.invert
    }
}

/// `envoy.config.route.v3.RetryPolicy` with Envoy's defaults.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// `retry_on`: [`retry_on`] bits.
    pub retry_on: u32,
    /// `num_retries` (default 1).
    pub num_retries: u32,
    /// `per_try_timeout` (none: only the route timeout applies).
    pub per_try_timeout: Option<Duration>,
    /// `per_try_idle_timeout`.
    pub per_try_idle_timeout: Option<Duration>,
    /// `retry_back_off.base_interval` (default 25 ms).
    pub base_interval: Duration,
    /// `retry_back_off.max_interval` (default 10 × base).
    pub max_interval: Duration,
    /// `retry_host_predicate` has `previous_hosts`: a retry avoids hosts tried.
    pub avoid_previous_hosts: bool,
    /// `host_selection_retry_max_attempts` (default 1).
    pub host_selection_max_attempts: u32,
    /// `retriable_status_codes`.
    pub retriable_status_codes: Vec<u16>,
    /// `retriable_headers`: a response matching one is retried (`retriable-headers`).
    pub retriable_headers: Vec<HeaderCondition>,
    /// `retriable_request_headers`: only a request matching one is retried.
    pub retriable_request_headers: Vec<HeaderCondition>,
    /// `rate_limited_retry_back_off`: a retried response's reset header sets the
    /// back-off before the next try.
    pub rate_limited_back_off: Option<RateLimitedBackOff>,
}

/// `RetryPolicy.RateLimitedRetryBackOff`: the first of `reset_headers` present in a
/// retried response, when it parses and is at most `max_interval`, sets the next
/// back-off (Envoy's `JitteredLowerBoundBackOffStrategy`: between it and 1.5× it).
#[derive(Debug, Clone)]
pub struct RateLimitedBackOff {
    pub reset_headers: Vec<(http::HeaderName, ResetFormat)>,
    /// `max_interval` (default 300 s).
    pub max_interval: Duration,
}

/// `RetryPolicy.ResetHeaderFormat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetFormat {
    /// Seconds to wait.
    Seconds,
    /// The Unix time (seconds) to wait until.
    UnixTimestamp,
}

impl RateLimitedBackOff {
    /// The interval the response's reset headers ask for (Envoy's
    /// `RetryStateImpl::parseResetInterval`): only the first value of a header is
    /// read, a timestamp in the past or an interval above `max_interval` is skipped.
    pub fn interval(&self, headers: &http::HeaderMap) -> Option<Duration> {
        self.reset_headers.iter().find_map(|(name, format)| {
            let secs: u64 = headers.get(name)?.to_str().ok()?.parse().ok()?;
            let interval = match format {
                ResetFormat::Seconds => Duration::from_secs(secs),
                ResetFormat::UnixTimestamp => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .ok()?
                        .as_secs();
                    Duration::from_secs(secs.checked_sub(now)?)
                }
            };
            (interval <= self.max_interval).then_some(interval)
        })
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retry_on: 0,
            num_retries: 1,
            per_try_timeout: None,
            per_try_idle_timeout: None,
            base_interval: Duration::from_millis(25),
            max_interval: Duration::from_millis(250),
            avoid_previous_hosts: false,
            host_selection_max_attempts: 1,
            retriable_status_codes: Vec::new(),
            retriable_headers: Vec::new(),
            retriable_request_headers: Vec::new(),
            rate_limited_back_off: None,
        }
    }
}

/// `envoy.config.route.v3.HedgePolicy`.
#[derive(Debug, Clone, Copy, Default)]
pub struct HedgePolicy {
    /// `hedge_on_per_try_timeout`: on a per-try timeout a retry is sent while the
    /// first try goes on; the first response to arrive wins.
    pub on_per_try_timeout: bool,
}

const PREVIOUS_HOSTS: &str = "envoy.retry_host_predicates.previous_hosts";
const PREVIOUS_HOSTS_TYPE: &str =
    "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate";

pub fn map_retry_policy(p: &Obj<'_>) -> RetryPolicy {
    let mut policy = RetryPolicy::default();
    if let Some(on) = p.str("retry_on") {
        for name in on.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match retry_on::http(name).or_else(|| retry_on::grpc(name)) {
                Some(bit) => policy.retry_on |= bit,
                None if name == "http3-post-connect-failure" => p.error(
                    "retry_on",
                    "http3-post-connect-failure is not supported by envoyx (no HTTP/3)",
                ),
                // Envoy skips names it does not know; envoyx refuses them so that a
                // misspelt condition is not silently never retried.
                None => p.error("retry_on", format!("unknown retry condition {name:?}")),
            }
        }
    }
    if let Some(n) = p.u32("num_retries") {
        policy.num_retries = n;
    }
    policy.per_try_timeout = p.duration("per_try_timeout").filter(|d| !d.is_zero());
    policy.per_try_idle_timeout = p.duration("per_try_idle_timeout").filter(|d| !d.is_zero());
    if let Some(b) = p.obj("retry_back_off") {
        match b.duration("base_interval") {
            Some(base) if !base.is_zero() => {
                policy.base_interval = base;
                policy.max_interval = base * 10;
            }
            Some(_) => b.error("base_interval", "must be greater than 0s"),
            None => b.error("base_interval", "is required"),
        }
        if let Some(max) = b.duration("max_interval") {
            if max < policy.base_interval {
                b.error(
                    "max_interval",
                    "must be greater than or equal to the base_interval",
                );
            } else {
                policy.max_interval = max;
            }
        }
    }
    for pred in p.list("retry_host_predicate") {
        let name = pred.str("name").unwrap_or_default();
        // Envoy finds the predicate by its typed_config's type, which it requires.
        let Some(typed) = pred.obj("typed_config") else {
            pred.error("typed_config", "is required");
            continue;
        };
        if name == PREVIOUS_HOSTS && typed.any_type() == Some(PREVIOUS_HOSTS_TYPE) {
            policy.avoid_previous_hosts = true;
        } else {
            pred.error(
                "name",
                format!("retry host predicate {name:?} is not supported by envoyx (only {PREVIOUS_HOSTS})"),
            );
        }
    }
    if let Some(n) = p.u64("host_selection_retry_max_attempts") {
        policy.host_selection_max_attempts = n.clamp(1, u64::from(u32::MAX)) as u32;
    }
    if let Some(codes) = p.raw("retriable_status_codes").and_then(|v| v.as_array()) {
        for c in codes {
            match c.as_u64().and_then(|c| u16::try_from(c).ok()) {
                Some(c) => policy.retriable_status_codes.push(c),
                None => p.error("retriable_status_codes", format!("not a status code: {c}")),
            }
        }
    }
    policy.retriable_headers = p
        .list("retriable_headers")
        .iter()
        .filter_map(map_header_condition)
        .collect();
    policy.retriable_request_headers = p
        .list("retriable_request_headers")
        .iter()
        .filter_map(map_header_condition)
        .collect();
    policy.rate_limited_back_off = p
        .obj("rate_limited_retry_back_off")
        .map(|r| map_rate_limited_back_off(&r));
    policy
}

fn map_rate_limited_back_off(r: &Obj<'_>) -> RateLimitedBackOff {
    let mut reset_headers = Vec::new();
    for h in r.list("reset_headers") {
        let name = h.str("name").unwrap_or_default();
        let format = match h.str("format") {
            None | Some("SECONDS") => ResetFormat::Seconds,
            Some("UNIX_TIMESTAMP") => ResetFormat::UnixTimestamp,
            Some(other) => {
                h.error("format", format!("unknown reset header format {other:?}"));
                continue;
            }
        };
        match http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
            Ok(n) => reset_headers.push((n, format)),
            Err(_) => h.error("name", format!("invalid header name {name:?}")),
        }
    }
    if reset_headers.is_empty() {
        r.error("reset_headers", "must have at least 1 item");
    }
    let max_interval = match r.duration("max_interval") {
        Some(d) if d.is_zero() => {
            r.error("max_interval", "must be greater than 0s");
            d
        }
        Some(d) => d,
        None => Duration::from_secs(300),
    };
    RateLimitedBackOff {
        reset_headers,
        max_interval,
    }
}

pub fn map_hedge_policy(h: &Obj<'_>) -> HedgePolicy {
    if let Some(n) = h.u32("initial_requests")
        && n != 1
    {
        h.error("initial_requests", "only 1 is supported by envoyx");
    }
    if h.obj("additional_request_chance").is_some() {
        h.error(
            "additional_request_chance",
            "not supported by envoyx (Envoy does not implement it either)",
        );
    }
    HedgePolicy {
        on_per_try_timeout: h.bool("hedge_on_per_try_timeout").unwrap_or(false),
    }
}

/// `envoy.config.route.v3.HeaderMatcher` in the forms a retry policy uses: `name`
/// with `string_match` or `present_match`, and `invert_match`.
pub fn map_header_condition(m: &Obj<'_>) -> Option<HeaderCondition> {
    let name = m.str("name").unwrap_or_default();
    let Ok(name) = http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) else {
        m.error("name", format!("invalid header name {name:?}"));
        return None;
    };
    let test = if let Some(sm) = m.obj("string_match") {
        HeaderTest::Value(map_string_matcher(&sm)?)
    } else if let Some(p) = m.bool("present_match") {
        HeaderTest::Present(p)
    } else {
        // Envoy: a matcher with no condition matches a present header.
        HeaderTest::Present(true)
    };
    Some(HeaderCondition {
        name,
        test,
        invert: m.bool("invert_match").unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::reader::Errors;

    fn map(doc: serde_json::Value) -> (RetryPolicy, Vec<String>) {
        let errors = Errors::default();
        let policy = {
            let obj = Obj::new(&doc, "retry_policy".into(), &errors).unwrap();
            map_retry_policy(&obj)
        };
        (policy, errors.into_vec())
    }

    #[test]
    fn defaults_are_envoys() {
        let (p, errors) = map(serde_json::json!({"retry_on": "5xx"}));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(p.retry_on, retry_on::FIVE_XX);
        assert_eq!(p.num_retries, 1);
        assert_eq!(p.base_interval, Duration::from_millis(25));
        assert_eq!(p.max_interval, Duration::from_millis(250));
    }

    #[test]
    fn unknown_conditions_and_predicates_are_refused_by_name() {
        let (_, errors) = map(serde_json::json!({
            "retry_on": "5xx,bogus,http3-post-connect-failure",
            "retry_host_predicate": [{"name": "envoy.retry_host_predicates.omit_canary_hosts",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.omit_canary_hosts.v3.OmitCanaryHostsPredicate"}}],
            "retry_priority": {"name": "x"}
        }));
        let text = errors.join("\n");
        assert!(text.contains("unknown retry condition \"bogus\""), "{text}");
        assert!(text.contains("http3-post-connect-failure"), "{text}");
        assert!(text.contains("omit_canary_hosts"), "{text}");
        assert!(
            text.contains("retry_policy.retry_priority: not supported"),
            "{text}"
        );
    }

    #[test]
    fn rate_limited_back_off_reads_the_first_usable_reset_header() {
        let (p, errors) = map(serde_json::json!({
            "retry_on": "retriable-status-codes",
            "rate_limited_retry_back_off": {
                "reset_headers": [
                    {"name": "Retry-After"},
                    {"name": "x-ratelimit-reset", "format": "UNIX_TIMESTAMP"}
                ],
                "max_interval": "10s"
            }
        }));
        assert!(errors.is_empty(), "{errors:?}");
        let rl = p.rate_limited_back_off.unwrap();
        let mut h = http::HeaderMap::new();
        assert_eq!(rl.interval(&h), None);
        // Above max_interval: skipped, the next header is read.
        h.insert("retry-after", "60".parse().unwrap());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        h.insert("x-ratelimit-reset", (now + 3).to_string().parse().unwrap());
        let got = rl.interval(&h).unwrap();
        assert!(
            got <= Duration::from_secs(3) && got >= Duration::from_secs(2),
            "{got:?}"
        );
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(rl.interval(&h), Some(Duration::from_secs(2)));
        // A timestamp in the past gives nothing.
        h.remove("retry-after");
        h.insert("x-ratelimit-reset", "1000".parse().unwrap());
        assert_eq!(rl.interval(&h), None);
        let (_, errors) = map(serde_json::json!({
            "retry_on": "5xx",
            "rate_limited_retry_back_off": {"reset_headers": []}
        }));
        assert!(
            errors
                .join("")
                .contains("reset_headers: must have at least 1 item"),
            "{errors:?}"
        );
    }

    #[test]
    fn header_values_skip_unknown_names() {
        assert_eq!(
            retry_on::parse_header("5xx, nope ,reset", retry_on::http),
            retry_on::FIVE_XX | retry_on::RESET
        );
        assert_eq!(
            retry_on::parse_header("cancelled,unavailable", retry_on::grpc),
            retry_on::GRPC_CANCELLED | retry_on::GRPC_UNAVAILABLE
        );
    }
}
