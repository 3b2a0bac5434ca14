//! The configuration of the HTTP filters envoyx implements in Rust (Envoy's own
//! extensions, as control planes such as Istio put them in every connection manager):
//! `envoy.filters.http.fault` (`HTTPFault`), `envoy.filters.http.cors` (`Cors`,
//! with a `CorsPolicy` per virtual host or route) and `envoy.filters.http.grpc_stats`
//! (`FilterConfig`). Their runtime is `http/native/`.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

use super::matcher::{StringMatcher, map_string_matcher};
use super::reader::Obj;
use super::route_match::{HeaderMatcher, map_fractional_percent, map_header_matcher};

/// A connection manager's native filters, in order.
#[derive(Debug, Clone, Default)]
pub struct NativeFilterSpecs(pub Vec<NativeFilterSpec>);

/// One native filter of a connection manager's `http_filters`, in order.
#[derive(Debug, Clone)]
pub struct NativeFilterSpec {
    /// The HTTP filter's `name`, the key of `typed_per_filter_config`.
    pub name: String,
    pub kind: NativeFilterKind,
}

#[derive(Debug, Clone)]
pub enum NativeFilterKind {
    Fault(Arc<FaultConfig>),
    /// The filter has no settings of its own: policies come from routes.
    Cors,
    GrpcStats(Arc<GrpcStatsConfig>),
}

/// `envoy.extensions.filters.http.grpc_stats.v3.FilterConfig`.
#[derive(Debug, Clone, Default)]
pub struct GrpcStatsConfig {
    /// `stats_for_all_methods` (default false): every method gets its own stats.
    pub stats_for_all_methods: bool,
    /// `individual_method_stats_allowlist`: (service, method) pairs with stats of
    /// their own; other gRPC calls count under the cluster's `grpc.` alone.
    pub allowlist: Vec<(String, String)>,
    /// `replace_dots_in_grpc_service_name` (with `stats_for_all_methods`).
    pub replace_dots_in_service_name: bool,
}

/// The gRPC stats filter's `typed_config`.
pub fn map_grpc_stats(tc: &Obj<'_>) -> GrpcStatsConfig {
    tc.str("@type");
    // The filter state holds the call's message counts for other filters and
    // access-log operators to read; envoyx has none that read filter state
    // (`%FILTER_STATE%` is refused), so there is nothing to write it for.
    tc.bool("emit_filter_state");
    if tc.bool("enable_upstream_stats") == Some(true) {
        tc.error(
            "enable_upstream_stats",
            "not supported by envoyx (no per-method upstream_rq_time)",
        );
    }
    let mut allowlist = Vec::new();
    if let Some(list) = tc.obj("individual_method_stats_allowlist") {
        for service in list.list("services") {
            let name = service.str("name").unwrap_or_default();
            for method in service.strings("method_names") {
                allowlist.push((name.to_string(), method.to_string()));
            }
        }
    }
    GrpcStatsConfig {
        stats_for_all_methods: tc.bool("stats_for_all_methods").unwrap_or(false),
        allowlist,
        replace_dots_in_service_name: tc
            .bool("replace_dots_in_grpc_service_name")
            .unwrap_or(false),
    }
}

/// A route's (or virtual host's) `typed_per_filter_config` for a native filter.
#[derive(Debug, Clone)]
pub enum NativeOverride {
    /// `HTTPFault`: replaces the filter's settings on the route (most specific wins).
    Fault(Arc<FaultConfig>),
    /// `CorsPolicy`: the route's, with its virtual host's fields under it.
    Cors(Arc<CorsPolicy>),
}

/// `envoy.type.v3.FractionalPercent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percent {
    pub numerator: u64,
    pub denominator: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DelaySource {
    /// `fixed_delay`, in whole milliseconds as Envoy reads it.
    Fixed(Duration),
    /// `header_delay`: `x-envoy-fault-delay-request` in milliseconds.
    Header,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AbortSource {
    Http(u16),
    Grpc(u64),
    /// `header_abort`: `x-envoy-fault-abort-request` / `x-envoy-fault-abort-grpc-request`.
    Header,
}

#[derive(Debug, Clone)]
pub struct FaultDelay {
    pub source: DelaySource,
    /// `percentage` (unset: 0 %, as the proto's default).
    pub percentage: Percent,
}

#[derive(Debug, Clone)]
pub struct FaultAbort {
    pub source: AbortSource,
    pub percentage: Percent,
}

/// `envoy.extensions.filters.http.fault.v3.HTTPFault`.
#[derive(Debug)]
pub struct FaultConfig {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
    /// `upstream_cluster`: only requests routed to it (empty: all).
    pub upstream_cluster: Option<String>,
    /// `headers`: every matcher must match.
    pub headers: Vec<HeaderMatcher>,
    /// `downstream_nodes`: `x-envoy-downstream-service-node` must be one of them.
    pub downstream_nodes: Vec<String>,
    /// `max_active_faults` (unset: unlimited).
    pub max_active_faults: Option<u64>,
    /// Envoy's runtime keys (`*_runtime`, or their `fault.http.*` defaults).
    pub runtime: FaultRuntimeKeys,
    /// `disable_downstream_cluster_stats`.
    pub disable_downstream_cluster_stats: bool,
}

#[derive(Debug, Clone)]
pub struct FaultRuntimeKeys {
    pub delay_percent: String,
    pub abort_percent: String,
    pub delay_duration: String,
    pub abort_http_status: String,
    pub abort_grpc_status: String,
    pub max_active_faults: String,
}

fn percentage(o: &Obj<'_>) -> Percent {
    let (numerator, denominator) = o
        .obj("percentage")
        .map(|p| map_fractional_percent(&p))
        .unwrap_or((0, 100));
    Percent {
        numerator,
        denominator,
    }
}

/// `HTTPFault`, from the filter's `typed_config` or a route's override.
pub fn map_fault(tc: &Obj<'_>) -> FaultConfig {
    tc.str("@type");
    let delay = tc.obj("delay").and_then(|d| {
        let source = if let Some(fixed) = d.duration("fixed_delay") {
            // Envoy reads the duration in whole milliseconds (PROTOBUF_GET_MS_REQUIRED).
            DelaySource::Fixed(Duration::from_millis(fixed.as_millis() as u64))
        } else if d.obj("header_delay").is_some() {
            DelaySource::Header
        } else {
            d.errors()
                .push(d.path(), "one of fixed_delay or header_delay is required");
            return None;
        };
        Some(FaultDelay {
            source,
            percentage: percentage(&d),
        })
    });
    let abort = tc.obj("abort").and_then(|a| {
        let source = if let Some(s) = a.u32("http_status") {
            if !(200..600).contains(&s) {
                a.error("http_status", "must be in [200, 600)");
            }
            AbortSource::Http(s as u16)
        } else if let Some(s) = a.u32("grpc_status") {
            AbortSource::Grpc(u64::from(s))
        } else if a.obj("header_abort").is_some() {
            AbortSource::Header
        } else {
            a.errors().push(
                a.path(),
                "one of http_status, grpc_status or header_abort is required",
            );
            return None;
        };
        Some(FaultAbort {
            source,
            percentage: percentage(&a),
        })
    });
    let key = |field: &'static str, default: &str| {
        tc.str(field)
            .filter(|k| !k.is_empty())
            .unwrap_or(default)
            .to_string()
    };
    FaultConfig {
        delay,
        abort,
        upstream_cluster: tc
            .str("upstream_cluster")
            .filter(|c| !c.is_empty())
            .map(str::to_string),
        headers: tc
            .list("headers")
            .iter()
            .filter_map(map_header_matcher)
            .collect(),
        downstream_nodes: tc
            .strings("downstream_nodes")
            .iter()
            .map(|s| s.to_string())
            .collect(),
        max_active_faults: tc.u32("max_active_faults").map(u64::from),
        runtime: FaultRuntimeKeys {
            delay_percent: key(
                "delay_percent_runtime",
                "fault.http.delay.fixed_delay_percent",
            ),
            abort_percent: key("abort_percent_runtime", "fault.http.abort.abort_percent"),
            delay_duration: key(
                "delay_duration_runtime",
                "fault.http.delay.fixed_duration_ms",
            ),
            abort_http_status: key("abort_http_status_runtime", "fault.http.abort.http_status"),
            abort_grpc_status: key("abort_grpc_status_runtime", "fault.http.abort.grpc_status"),
            max_active_faults: key("max_active_faults_runtime", "fault.http.max_active_faults"),
        },
        disable_downstream_cluster_stats: tc
            .bool("disable_downstream_cluster_stats")
            .unwrap_or(false),
    }
}

/// `envoy.extensions.filters.http.cors.v3.CorsPolicy`. Every field is optional so
/// that a route's policy can fall back to its virtual host's, field by field, as
/// Envoy's filter reads them.
#[derive(Debug, Clone, Default)]
pub struct CorsPolicy {
    /// `allow_origin_string_match` (None: unset, falls back).
    pub allow_origins: Option<Vec<StringMatcher>>,
    /// `allow_methods`, `allow_headers`, `expose_headers`, `max_age`: header values
    /// made once, when the configuration is applied.
    pub allow_methods: Option<HeaderValue>,
    pub allow_headers: Option<HeaderValue>,
    pub expose_headers: Option<HeaderValue>,
    pub max_age: Option<HeaderValue>,
    pub allow_credentials: Option<bool>,
    pub allow_private_network_access: Option<bool>,
    pub forward_not_matching_preflights: Option<bool>,
    /// `filter_enabled` (unset: enabled). Not inherited: the most specific policy's.
    pub filter_enabled: Option<RuntimePercent>,
    /// `shadow_enabled` (unset: off). Not inherited either.
    pub shadow_enabled: Option<RuntimePercent>,
}

/// `envoy.config.core.v3.RuntimeFractionalPercent`.
#[derive(Debug, Clone)]
pub struct RuntimePercent {
    pub default: Percent,
    pub runtime_key: Option<String>,
}

fn runtime_percent(o: &Obj<'_>) -> RuntimePercent {
    let (numerator, denominator) = o
        .obj("default_value")
        .map(|d| map_fractional_percent(&d))
        .unwrap_or((0, 100));
    RuntimePercent {
        default: Percent {
            numerator,
            denominator,
        },
        runtime_key: o
            .str("runtime_key")
            .filter(|k| !k.is_empty())
            .map(str::to_string),
    }
}

pub fn map_cors_policy(p: &Obj<'_>) -> CorsPolicy {
    p.str("@type");
    let text = |field: &'static str| {
        let v = p.str(field).filter(|s| !s.is_empty())?;
        HeaderValue::from_str(v)
            .map_err(|_| p.error(field, "is not a valid header value"))
            .ok()
    };
    let origins: Vec<StringMatcher> = p
        .list("allow_origin_string_match")
        .iter()
        .filter_map(map_string_matcher)
        .collect();
    CorsPolicy {
        allow_origins: (!origins.is_empty()).then_some(origins),
        allow_methods: text("allow_methods"),
        allow_headers: text("allow_headers"),
        expose_headers: text("expose_headers"),
        max_age: text("max_age"),
        allow_credentials: p.bool("allow_credentials"),
        allow_private_network_access: p.bool("allow_private_network_access"),
        forward_not_matching_preflights: p.bool("forward_not_matching_preflights"),
        filter_enabled: p.obj("filter_enabled").map(|o| runtime_percent(&o)),
        shadow_enabled: p.obj("shadow_enabled").map(|o| runtime_percent(&o)),
    }
}

impl CorsPolicy {
    /// This (a route's) policy over `under` (its virtual host's): each field is the
    /// first policy's that sets it, except whether the filter is enabled, which
    /// is the route's alone (Envoy's `CorsFilter::enabled()` reads the first policy).
    pub fn over(&self, under: &CorsPolicy) -> CorsPolicy {
        CorsPolicy {
            allow_origins: self
                .allow_origins
                .clone()
                .or_else(|| under.allow_origins.clone()),
            allow_methods: self
                .allow_methods
                .clone()
                .or_else(|| under.allow_methods.clone()),
            allow_headers: self
                .allow_headers
                .clone()
                .or_else(|| under.allow_headers.clone()),
            expose_headers: self
                .expose_headers
                .clone()
                .or_else(|| under.expose_headers.clone()),
            max_age: self.max_age.clone().or_else(|| under.max_age.clone()),
            allow_credentials: self.allow_credentials.or(under.allow_credentials),
            allow_private_network_access: self
                .allow_private_network_access
                .or(under.allow_private_network_access),
            forward_not_matching_preflights: self
                .forward_not_matching_preflights
                .or(under.forward_not_matching_preflights),
            filter_enabled: self.filter_enabled.clone(),
            shadow_enabled: self.shadow_enabled.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_policy_falls_back_to_its_virtual_host_field_by_field() {
        let vhost = CorsPolicy {
            allow_methods: Some(HeaderValue::from_static("GET")),
            max_age: Some(HeaderValue::from_static("60")),
            allow_credentials: Some(true),
            filter_enabled: Some(RuntimePercent {
                default: Percent {
                    numerator: 0,
                    denominator: 100,
                },
                runtime_key: None,
            }),
            ..CorsPolicy::default()
        };
        let route = CorsPolicy {
            allow_methods: Some(HeaderValue::from_static("PUT")),
            allow_credentials: Some(false),
            ..CorsPolicy::default()
        };
        let merged = route.over(&vhost);
        assert_eq!(merged.allow_methods.unwrap(), "PUT");
        assert_eq!(merged.max_age.unwrap(), "60");
        assert_eq!(merged.allow_credentials, Some(false));
        // Whether the filter is on is the route's alone (unset: on).
        assert!(merged.filter_enabled.is_none());
    }
}
