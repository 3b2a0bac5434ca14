//! `envoy.filters.http.fault`: delays and aborts injected into requests, as Envoy's
//! `source/extensions/filters/http/fault/fault_filter.cc` does (its decisions, runtime
//! keys, request headers, stats and response flags).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use http::header::HeaderName;

use super::{Decode, DecodeRequest, NativeFilter};
use crate::config::native_filters::{
    AbortSource, DelaySource, FaultConfig, NativeOverride, Percent,
};
use crate::http::local_reply::LocalReply;
use crate::runtime::{Runtime, RuntimeValue};
use crate::stats::{Counter, Gauge, StatStore};

static DELAY_REQUEST: HeaderName = HeaderName::from_static("x-envoy-fault-delay-request");
static DELAY_REQUEST_PERCENTAGE: HeaderName =
    HeaderName::from_static("x-envoy-fault-delay-request-percentage");
static ABORT_REQUEST: HeaderName = HeaderName::from_static("x-envoy-fault-abort-request");
static ABORT_GRPC_REQUEST: HeaderName = HeaderName::from_static("x-envoy-fault-abort-grpc-request");
static ABORT_REQUEST_PERCENTAGE: HeaderName =
    HeaderName::from_static("x-envoy-fault-abort-request-percentage");
static DOWNSTREAM_SERVICE_NODE: HeaderName =
    HeaderName::from_static("x-envoy-downstream-service-node");
static DOWNSTREAM_SERVICE_CLUSTER: HeaderName =
    HeaderName::from_static("x-envoy-downstream-service-cluster");

/// `<prefix>fault.*`, Envoy's `ALL_FAULT_FILTER_STATS`.
struct FaultStats {
    aborts_injected: Counter,
    delays_injected: Counter,
    faults_overflow: Counter,
    active_faults: Gauge,
    /// For `<prefix>fault.<downstream cluster>.{delays,aborts}_injected`, made
    /// when a request names its cluster.
    store: Arc<StatStore>,
    prefix: String,
}

pub(crate) struct FaultFilter {
    config: Arc<FaultConfig>,
    stats: FaultStats,
}

/// One request's share of `fault.active_faults` (Envoy counts at most one per
/// request): given back when dropped.
pub(crate) struct ActiveFault(Gauge);

impl Drop for ActiveFault {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The first value of a header as a number (`absl::SimpleAtoi`: surrounding
/// blanks allowed).
fn header_number(headers: &HeaderMap, name: &HeaderName) -> Option<u64> {
    let v = headers.get(name)?.to_str().ok()?.trim();
    v.strip_prefix('+').unwrap_or(v).parse().ok()
}

fn runtime_integer(runtime: &Runtime, key: &str, default: u64) -> u64 {
    match runtime.get(key) {
        Some(RuntimeValue::Uint(v)) => *v,
        _ => default,
    }
}

/// Envoy's `HeaderPercentageProvider`: the header's numerator, capped by the
/// configured one, over the configured denominator.
fn percentage(configured: Percent, headers: &HeaderMap, header: &HeaderName) -> Percent {
    match header_number(headers, header).and_then(|n| u32::try_from(n).ok()) {
        Some(n) => Percent {
            numerator: u64::from(n).min(configured.numerator),
            denominator: configured.denominator,
        },
        None => configured,
    }
}

/// The request's runtime keys when it names its downstream cluster
/// (`x-envoy-downstream-service-cluster`): they replace the filter's.
struct DownstreamKeys {
    cluster: String,
}

impl DownstreamKeys {
    fn key(&self, what: &str) -> String {
        format!("fault.http.{}.{what}", self.cluster)
    }
}

impl FaultFilter {
    pub fn new(config: Arc<FaultConfig>, store: &Arc<StatStore>, prefix: &str) -> FaultFilter {
        let prefix = format!("{prefix}fault.");
        let c = |s: &str| store.counter(&format!("{prefix}{s}"));
        // Registered as Envoy does, although envoyx refuses `response_rate_limit`.
        c("response_rl_injected");
        FaultFilter {
            config,
            stats: FaultStats {
                aborts_injected: c("aborts_injected"),
                delays_injected: c("delays_injected"),
                faults_overflow: c("faults_overflow"),
                active_faults: store.gauge(&format!("{prefix}active_faults")),
                store: store.clone(),
                prefix,
            },
        }
    }

    fn settings<'a>(&'a self, over: Option<&'a NativeOverride>) -> &'a FaultConfig {
        match over {
            Some(NativeOverride::Fault(c)) => c,
            _ => &self.config,
        }
    }

    /// Envoy's `tryIncActiveFaults`: one active fault per request, refused past
    /// `max_active_faults` (a fuzzy limit, as Envoy's).
    fn try_activate(&self, settings: &FaultConfig, cx: &mut DecodeRequest<'_>) -> bool {
        if cx.state.as_ref().is_some_and(|s| s.fault.is_some()) {
            return true;
        }
        let max = runtime_integer(
            &crate::runtime::snapshot(),
            &settings.runtime.max_active_faults,
            settings.max_active_faults.unwrap_or(u64::MAX),
        );
        if self.stats.active_faults.get().max(0) as u64 >= max {
            self.stats.faults_overflow.inc();
            return false;
        }
        self.stats.active_faults.inc();
        cx.state().fault = Some(ActiveFault(self.stats.active_faults.clone()));
        true
    }

    fn downstream_keys(&self, headers: &HeaderMap) -> Option<DownstreamKeys> {
        let v = headers.get(&DOWNSTREAM_SERVICE_CLUSTER)?;
        Some(DownstreamKeys {
            cluster: String::from_utf8_lossy(v.as_bytes()).into_owned(),
        })
    }

    fn count_downstream(&self, settings: &FaultConfig, keys: Option<&DownstreamKeys>, what: &str) {
        if let Some(k) = keys
            && !k.cluster.is_empty()
            && !settings.disable_downstream_cluster_stats
        {
            let name = format!("{}{}.{what}", self.stats.prefix, k.cluster);
            self.stats.store.counter(&name).inc();
        }
    }

    /// Envoy's `delayDuration`: the delay if it is enabled for this request.
    fn delay(
        &self,
        settings: &FaultConfig,
        headers: &HeaderMap,
        keys: Option<&DownstreamKeys>,
    ) -> Option<Duration> {
        let delay = settings.delay.as_ref()?;
        let runtime = crate::runtime::snapshot();
        let pct = percentage(delay.percentage, headers, &DELAY_REQUEST_PERCENTAGE);
        let key = match keys {
            Some(k) => Cow::Owned(k.key("delay.fixed_delay_percent")),
            None => Cow::Borrowed(settings.runtime.delay_percent.as_str()),
        };
        if !runtime.feature_enabled(Some(&*key), pct.numerator, pct.denominator, rand::random()) {
            return None;
        }
        let configured = match delay.source {
            DelaySource::Fixed(d) => d.as_millis() as u64,
            DelaySource::Header => header_number(headers, &DELAY_REQUEST)?,
        };
        let mut ms = runtime_integer(&runtime, &settings.runtime.delay_duration, configured);
        if let Some(k) = keys {
            ms = runtime_integer(&runtime, &k.key("delay.fixed_duration_ms"), ms);
        }
        (ms > 0).then(|| Duration::from_millis(ms))
    }

    /// Envoy's `abortStatus`: the HTTP status (and gRPC status) of an abort, if
    /// one is enabled for this request.
    fn abort_status(
        &self,
        settings: &FaultConfig,
        headers: &HeaderMap,
        keys: Option<&DownstreamKeys>,
    ) -> Option<(u16, Option<u64>)> {
        let abort = settings.abort.as_ref()?;
        let runtime = crate::runtime::snapshot();
        let pct = percentage(abort.percentage, headers, &ABORT_REQUEST_PERCENTAGE);
        let key = match keys {
            Some(k) => Cow::Owned(k.key("abort.abort_percent")),
            None => Cow::Borrowed(settings.runtime.abort_percent.as_str()),
        };
        if !runtime.feature_enabled(Some(&*key), pct.numerator, pct.denominator, rand::random()) {
            return None;
        }
        let http = match abort.source {
            AbortSource::Http(s) => Some(u64::from(s)),
            AbortSource::Grpc(_) => None,
            AbortSource::Header => {
                header_number(headers, &ABORT_REQUEST).filter(|c| (200..600).contains(c))
            }
        };
        if let Some(configured) = http {
            // Envoy reads the runtime's status without checking it either.
            let status = match keys {
                Some(k) => runtime_integer(&runtime, &k.key("abort.http_status"), configured),
                None => runtime_integer(&runtime, &settings.runtime.abort_http_status, configured),
            };
            return Some((status as u16, None));
        }
        let grpc = match abort.source {
            AbortSource::Grpc(s) => s,
            AbortSource::Header => header_number(headers, &ABORT_GRPC_REQUEST)?,
            AbortSource::Http(_) => return None,
        };
        let status = match keys {
            Some(k) => runtime_integer(&runtime, &k.key("abort.grpc_status"), grpc),
            None => runtime_integer(&runtime, &settings.runtime.abort_grpc_status, grpc),
        };
        Some((200, Some(status)))
    }

    fn abort(
        &self,
        settings: &FaultConfig,
        keys: Option<&DownstreamKeys>,
        (status, grpc): (u16, Option<u64>),
        delayed: bool,
    ) -> LocalReply {
        self.count_downstream(settings, keys, "aborts_injected");
        self.stats.aborts_injected.inc();
        let flags = if delayed { "DI,FI" } else { "FI" };
        let mut reply = LocalReply::new(status, "fault filter abort", flags, "fault_filter_abort");
        reply.grpc_status = grpc.map(|g| g.min(u64::from(u8::MAX)) as u8);
        reply
    }

    /// Whether the fault applies to this request at all: the route's cluster, the
    /// downstream node, the header matchers.
    fn applies(&self, settings: &FaultConfig, cx: &DecodeRequest<'_>) -> bool {
        if let Some(cluster) = &settings.upstream_cluster
            && cx.route_cluster() != cluster
        {
            return false;
        }
        if !settings.downstream_nodes.is_empty() {
            let Some(node) = cx.req.headers.get(&DOWNSTREAM_SERVICE_NODE) else {
                return false;
            };
            if !settings
                .downstream_nodes
                .iter()
                .any(|n| n.as_bytes() == node.as_bytes())
            {
                return false;
            }
        }
        settings.headers.iter().all(|h| h.matches(&cx.req))
    }
}

impl NativeFilter for FaultFilter {
    fn decode_headers(&self, cx: &mut DecodeRequest<'_>, over: Option<&NativeOverride>) -> Decode {
        let settings = self.settings(over);
        if !self.applies(settings, cx) {
            return Decode::Continue;
        }
        let headers = cx.req.headers;
        let keys = self.downstream_keys(headers);
        if let Some(d) = self.delay(settings, headers, keys.as_ref())
            && self.try_activate(settings, cx)
        {
            self.count_downstream(settings, keys.as_ref(), "delays_injected");
            self.stats.delays_injected.inc();
            return Decode::Delay(d);
        }
        if let Some(status) = self.abort_status(settings, headers, keys.as_ref())
            && self.try_activate(settings, cx)
        {
            return Decode::Reply(self.abort(settings, keys.as_ref(), status, false));
        }
        Decode::Continue
    }

    fn after_delay(
        &self,
        cx: &mut DecodeRequest<'_>,
        over: Option<&NativeOverride>,
    ) -> Option<LocalReply> {
        let settings = self.settings(over);
        let headers = cx.req.headers;
        let keys = self.downstream_keys(headers);
        if let Some(status) = self.abort_status(settings, headers, keys.as_ref()) {
            return Some(self.abort(settings, keys.as_ref(), status, true));
        }
        // The delay is over and no other fault is active: no longer counted.
        if let Some(state) = cx.state.as_mut() {
            state.fault = None;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn header_numbers_read_the_first_value_as_simple_atoi() {
        let h = headers(&[("x-envoy-fault-delay-request", " +25 ")]);
        assert_eq!(header_number(&h, &DELAY_REQUEST), Some(25));
        let h = headers(&[("x-envoy-fault-delay-request", "1.5")]);
        assert_eq!(header_number(&h, &DELAY_REQUEST), None);
        let h = headers(&[
            ("x-envoy-fault-delay-request", "7"),
            ("x-envoy-fault-delay-request", "9"),
        ]);
        assert_eq!(header_number(&h, &DELAY_REQUEST), Some(7));
    }

    #[test]
    fn a_header_percentage_lowers_never_raises() {
        let configured = Percent {
            numerator: 40,
            denominator: 10_000,
        };
        let name = &ABORT_REQUEST_PERCENTAGE;
        let low = headers(&[("x-envoy-fault-abort-request-percentage", "5")]);
        assert_eq!(percentage(configured, &low, name).numerator, 5);
        assert_eq!(percentage(configured, &low, name).denominator, 10_000);
        let high = headers(&[("x-envoy-fault-abort-request-percentage", "90")]);
        assert_eq!(percentage(configured, &high, name), configured);
        let bad = headers(&[("x-envoy-fault-abort-request-percentage", "x")]);
        assert_eq!(percentage(configured, &bad, name), configured);
    }
}
