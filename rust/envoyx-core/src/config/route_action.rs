//! A route's action: `route` (forward to a cluster, with its timeouts, retries,
//! rewrites, hashing and mirrors), `redirect` or `direct_response`.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::HeaderName;
use regex::Regex;

use super::filter_override::{FilterOverride, map_filter_overrides};
use super::header_mutation::{HeaderMutations, map_header_mutations};
use super::reader::Obj;
use super::retry::{HedgePolicy, RetryPolicy, map_hedge_policy, map_retry_policy};

// Built once per configuration and only read by reference while routing: the
// size of the forwarding variant costs nothing per request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum RouteAction {
    /// `route`.
    Forward(ForwardAction),
    /// `direct_response`, or `redirect` (a direct response with a `location`, as
    /// Envoy treats it).
    Direct {
        status: u16,
        body: Option<bytes::Bytes>,
        /// How `location` is made: `redirect`, or a 201/3xx `direct_response`.
        redirect: Option<Box<Redirect>>,
    },
}

#[derive(Debug, Default)]
pub struct ForwardAction {
    /// `route.cluster` ("" with `cluster_header` or `weighted_clusters`).
    pub cluster: String,
    /// The index of `cluster` among the cluster names of the compiled route table
    /// ([`crate::router::RouteTable::cluster_names`]), set when it is compiled, so
    /// that a request finds its cluster without hashing the name.
    pub cluster_slot: usize,
    /// `route.cluster_header` or `route.weighted_clusters` (None: `cluster`).
    pub cluster_specifier: Option<Box<ClusterSpecifier>>,
    /// `route.cluster_not_found_response_code` (503, 404 or 500).
    pub cluster_not_found_status: u16,
    /// `route.timeout` (default 15 s; zero disables).
    pub timeout: Option<Duration>,
    /// `x-envoy-expected-rq-timeout-ms` for `timeout`, made once here rather than
    /// formatted for every request.
    pub expected_timeout: Option<http::HeaderValue>,
    /// `route.prefix_rewrite` or `route.regex_rewrite`.
    pub path_rewrite: Option<Box<PathRewrite>>,
    /// `route.host_rewrite_literal`, `host_rewrite_header`, `host_rewrite_path_regex`
    /// or `auto_host_rewrite`.
    pub host_rewrite: Option<Box<HostRewrite>>,
    /// `route.append_x_forwarded_host`.
    pub append_x_forwarded_host: bool,
    /// `route.request_mirror_policies`, else the virtual host's, else the route
    /// configuration's.
    pub mirrors: Vec<MirrorPolicy>,
    /// `route.retry_policy`, else the virtual host's.
    pub retry_policy: Option<std::sync::Arc<super::retry::RetryPolicy>>,
    /// `route.hedge_policy`, else the virtual host's.
    pub hedge_policy: super::retry::HedgePolicy,
    /// The virtual host's `include_request_attempt_count`: `x-envoy-attempt-count`
    /// on each try's request.
    pub include_attempt_count_in_request: bool,
    /// The virtual host's `include_attempt_count_in_response`.
    pub include_attempt_count_in_response: bool,
    /// `per_request_buffer_limit_bytes` (route, else virtual host; default 1 MiB,
    /// Envoy's listener buffer limit): how much request body is kept for a retry.
    pub retry_buffer_limit: u32,
    /// `route.idle_timeout`: replaces the connection manager's
    /// `stream_idle_timeout` for this route (Some(None): `0s`, disabled).
    pub idle_timeout: Option<Option<Duration>>,
    /// `route.max_stream_duration`.
    pub stream_duration: Option<RouteStreamDuration>,
    /// The deprecated `max_grpc_timeout` (and `grpc_timeout_offset`), which Istio
    /// still sends; None when unset or when `max_stream_duration` is set (Envoy then
    /// uses its new timeouts and ignores them).
    pub grpc_timeout: Option<GrpcRouteTimeout>,
    /// `route.priority`: the circuit breakers and connection pools of this
    /// priority (DEFAULT or HIGH).
    pub priority: crate::config::circuit_breakers::Priority,
    /// `route.hash_policy`: the request's hash for ring hash and Maglev.
    pub hash_policy: Option<Arc<crate::router::hash_policy::HashPolicy>>,
    /// `route.upgrade_configs` (None: the connection manager's decide).
    pub upgrades: Option<Box<super::upgrade::RouteUpgrades>>,
    /// `route.internal_redirect_policy` (or the deprecated `internal_redirect_action`).
    pub internal_redirect: Option<Box<super::internal_redirect::InternalRedirectPolicy>>,
}

/// `RouteAction.MaxStreamDuration`: the route's limit on a stream's duration,
/// which replaces the connection manager's (`0s`: none), and for gRPC requests
/// the `grpc-timeout` header's (capped by `grpc_timeout_header_max`, zero: no cap).
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteStreamDuration {
    pub max: Option<Duration>,
    pub grpc_header_max: Option<Duration>,
    pub grpc_header_offset: Option<Duration>,
}

impl ForwardAction {
    /// The clusters this action names in its configuration (for
    /// `validate_clusters`), each with the field naming it and Envoy's message.
    pub fn named_clusters(&self) -> Vec<(String, &str, &'static str)> {
        let mut out = Vec::new();
        match self.cluster_specifier.as_deref() {
            None => out.push((
                "route.cluster".to_string(),
                self.cluster.as_str(),
                "cluster",
            )),
            Some(ClusterSpecifier::Weighted(w)) => {
                for (i, c) in w.clusters.iter().enumerate() {
                    if let Some(name) = &c.name {
                        out.push((
                            format!("route.weighted_clusters.clusters[{i}].name"),
                            name.as_str(),
                            "weighted cluster",
                        ));
                    }
                }
            }
            Some(ClusterSpecifier::Header(_)) => {}
        }
        for (i, m) in self.mirrors.iter().enumerate() {
            if let MirrorCluster::Name(name) = &m.cluster {
                out.push((
                    format!("route.request_mirror_policies[{i}].cluster"),
                    name.as_str(),
                    "shadow cluster",
                ));
            }
        }
        out
    }
}

/// What a virtual host gives the routes that do not set it themselves.
pub struct RouteDefaults {
    pub retry_policy: Option<std::sync::Arc<RetryPolicy>>,
    pub hedge_policy: Option<HedgePolicy>,
    pub include_attempt_count_in_request: bool,
    pub include_attempt_count_in_response: bool,
    pub buffer_limit: Option<u32>,
    /// `request_mirror_policies` of the virtual host, else of the route configuration.
    pub mirrors: Vec<MirrorPolicy>,
    /// The route configuration's `max_direct_response_body_size_bytes`.
    pub max_direct_body: u32,
}

/// Envoy's default `max_direct_response_body_size_bytes`.
pub const DEFAULT_MAX_DIRECT_BODY: u32 = 4096;

/// Envoy's default `per_connection_buffer_limit_bytes`, which bounds a request's
/// body kept for retries when no `per_request_buffer_limit_bytes` is set.
const DEFAULT_BUFFER_LIMIT: u32 = 1024 * 1024;

/// How a forwarding route names its cluster, besides a plain `cluster`.
#[derive(Debug)]
pub enum ClusterSpecifier {
    /// `cluster_header`: the request header's (first) value names the cluster.
    Header(HeaderName),
    /// `weighted_clusters`.
    Weighted(WeightedClusters),
}

/// `max_grpc_timeout` / `grpc_timeout_offset`: a gRPC request's route timeout is its
/// `grpc-timeout` (none: infinity) less the offset (when that leaves some), capped at
/// `max` (zero: no cap) — Envoy's `FilterUtility::finalTimeout`.
#[derive(Debug, Clone, Copy)]
pub struct GrpcRouteTimeout {
    pub max: Duration,
    pub offset: Option<Duration>,
}

impl GrpcRouteTimeout {
    /// The route timeout for a request with `grpc-timeout` `header` (None: infinity).
    pub fn timeout(&self, header: Option<Duration>) -> Option<Duration> {
        let mut t = header.unwrap_or_default();
        if let Some(offset) = self.offset
            && offset < t
        {
            t -= offset;
        }
        if !self.max.is_zero() && (t.is_zero() || t > self.max) {
            t = self.max;
        }
        (!t.is_zero()).then_some(t)
    }
}

/// `route.weighted_clusters`: one of the clusters by weight, per request.
#[derive(Debug)]
pub struct WeightedClusters {
    pub clusters: Vec<ClusterWeight>,
    /// The sum of the weights (`total_weight` is deprecated and ignored by Envoy).
    pub total_weight: u64,
    /// `header_name`: a request header whose integer value replaces the random value.
    pub header_name: Option<HeaderName>,
}

#[derive(Debug)]
pub struct ClusterWeight {
    /// `name`, or None with `cluster_header`.
    pub name: Option<String>,
    /// `cluster_header`: the header naming the cluster when this entry is picked.
    pub cluster_header: Option<HeaderName>,
    pub weight: u64,
    /// `host_rewrite_literal` of this entry (over the route's).
    pub host_rewrite: Option<String>,
    /// The index of `name` among the route table's cluster names (as a plain
    /// `cluster`'s [`ForwardAction::cluster_slot`]), set when the table is compiled.
    pub cluster_slot: usize,
    /// `request_headers_to_add` and kin of this entry: Envoy's
    /// `WeightedClusterEntry` evaluates them before the route's levels.
    pub header_mutations: Option<Arc<HeaderMutations>>,
    /// `typed_per_filter_config` of this entry: the most specific for a request
    /// that picked it (over the route's and its virtual host's).
    pub filter_overrides: Vec<(String, FilterOverride)>,
}

/// `route.prefix_rewrite` or `route.regex_rewrite` (Envoy allows one).
#[derive(Debug)]
pub enum PathRewrite {
    /// Replaces the matched part of the path (Envoy's `matched_path`).
    Prefix(String),
    /// Replaces every match in the path without its query.
    Regex(RegexRewrite),
}

/// A `RegexMatchAndSubstitute`, with the substitution in the regex crate's syntax.
#[derive(Debug)]
pub struct RegexRewrite {
    pub regex: Regex,
    pub substitution: String,
}

impl RegexRewrite {
    pub fn replace_all(&self, input: &str) -> String {
        self.regex
            .replace_all(input, self.substitution.as_str())
            .into_owned()
    }
}

/// The route's rewrite of the upstream `Host` (Envoy's precedence: literal,
/// header, path regex; `auto_host_rewrite` when the host has a hostname).
#[derive(Debug)]
pub enum HostRewrite {
    Literal(String),
    Header(HeaderName),
    PathRegex(RegexRewrite),
    Auto,
}

/// `RequestMirrorPolicy`: a copy of the request to another cluster, not waited for.
#[derive(Debug, Clone)]
pub struct MirrorPolicy {
    pub cluster: MirrorCluster,
    /// `runtime_fraction.default_value` as (numerator, denominator); None: always.
    pub fraction: Option<(u64, u64)>,
    /// `disable_shadow_host_suffix_append`.
    pub keep_host: bool,
}

#[derive(Debug, Clone)]
pub enum MirrorCluster {
    Name(String),
    Header(HeaderName),
}

/// `redirect`, or the `location` of a 201/3xx `direct_response`.
#[derive(Debug, Default)]
pub struct Redirect {
    /// `scheme_redirect`, or `https` for `https_redirect`.
    pub scheme: Option<String>,
    pub host: Option<String>,
    /// `:port` of `port_redirect`.
    pub port: Option<String>,
    pub path: Option<String>,
    pub path_has_query: bool,
    /// `prefix_rewrite` or `regex_rewrite` of the redirect.
    pub rewrite: Option<PathRewrite>,
    pub strip_query: bool,
    /// The virtual host's `require_tls`: `https://` + Host + path as they are (Envoy's
    /// `SslRedirector`; no port handling, unlike `https_redirect`).
    pub ssl_redirect: bool,
}

/// `route`: the forwarding action of route `r`.
pub fn map_forward_action(
    route: &Obj<'_>,
    r: &Obj<'_>,
    inherited: &RouteDefaults,
) -> Option<ForwardAction> {
    let (cluster, specifier) = map_cluster_specifier(route)?;
    let timeout = match route.duration("timeout") {
        // With `max_stream_duration` Envoy uses its new timeouts: the route has no
        // `timeout` at all (Envoy's `usingNewTimeouts`).
        _ if route.has("max_stream_duration") => None,
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
        None => Some(Duration::from_secs(15)),
    };
    let cluster_not_found_status = match route.str("cluster_not_found_response_code") {
        None | Some("SERVICE_UNAVAILABLE") => 503,
        Some("NOT_FOUND") => 404,
        Some("INTERNAL_SERVER_ERROR") => 500,
        Some(other) => {
            route.error(
                "cluster_not_found_response_code",
                format!("unknown code {other}"),
            );
            503
        }
    };
    let prefix_rewrite = route.str("prefix_rewrite").filter(|p| !p.is_empty());
    let regex_rewrite = route
        .obj("regex_rewrite")
        .and_then(|rr| map_regex_rewrite(&rr));
    if prefix_rewrite.is_some() && route.has("regex_rewrite") {
        route.error(
            "regex_rewrite",
            "Specify only one of prefix_rewrite, regex_rewrite or path_rewrite_policy",
        );
    }
    let path_rewrite = match (prefix_rewrite, regex_rewrite) {
        (Some(p), _) => Some(Box::new(PathRewrite::Prefix(p.to_string()))),
        (None, Some(re)) => Some(Box::new(PathRewrite::Regex(re))),
        (None, None) => None,
    };
    let mirrors = {
        let list = route.list("request_mirror_policies");
        if list.is_empty() {
            inherited.mirrors.clone()
        } else {
            list.iter().filter_map(map_mirror_policy).collect()
        }
    };
    Some(ForwardAction {
        cluster,
        cluster_slot: 0,
        cluster_specifier: specifier.map(Box::new),
        cluster_not_found_status,
        timeout,
        expected_timeout: timeout.map(|t| http::HeaderValue::from(t.as_millis() as u64)),
        path_rewrite,
        host_rewrite: map_host_rewrite(route).map(Box::new),
        append_x_forwarded_host: route.bool("append_x_forwarded_host").unwrap_or(false),
        mirrors,
        retry_policy: route
            .obj("retry_policy")
            .map(|p| std::sync::Arc::new(map_retry_policy(&p)))
            .or_else(|| inherited.retry_policy.clone()),
        hedge_policy: route
            .obj("hedge_policy")
            .map(|h| map_hedge_policy(&h))
            .or(inherited.hedge_policy)
            .unwrap_or_default(),
        include_attempt_count_in_request: inherited.include_attempt_count_in_request,
        include_attempt_count_in_response: inherited.include_attempt_count_in_response,
        retry_buffer_limit: r
            .u32("per_request_buffer_limit_bytes")
            .or(inherited.buffer_limit)
            .unwrap_or(DEFAULT_BUFFER_LIMIT),
        idle_timeout: route
            .duration("idle_timeout")
            .map(|d| (!d.is_zero()).then_some(d)),
        grpc_timeout: {
            let max = route.duration("max_grpc_timeout");
            let offset = route.duration("grpc_timeout_offset");
            match max {
                Some(max) if !route.has("max_stream_duration") => {
                    Some(GrpcRouteTimeout { max, offset })
                }
                _ => None,
            }
        },
        stream_duration: route
            .obj("max_stream_duration")
            .map(|m| RouteStreamDuration {
                max: m.duration("max_stream_duration"),
                grpc_header_max: m.duration("grpc_timeout_header_max"),
                grpc_header_offset: m.duration("grpc_timeout_header_offset"),
            }),
        hash_policy: map_hash_policies(&route.list("hash_policy")),
        priority: super::circuit_breakers::Priority::read(route, "priority"),
        upgrades: super::upgrade::map_route_upgrades(route),
        internal_redirect: super::internal_redirect::map_internal_redirect(
            route,
            r.str("name").unwrap_or_default(),
        ),
    })
}

/// `cluster`, `cluster_header` or `weighted_clusters` (exactly one, as Envoy's
/// oneof): the plain cluster's name ("" otherwise) and the other specifiers.
fn map_cluster_specifier(route: &Obj<'_>) -> Option<(String, Option<ClusterSpecifier>)> {
    if let Some(cluster) = route.str("cluster") {
        return Some((cluster.to_string(), None));
    }
    if let Some(name) = route.str("cluster_header") {
        let header = header_name(route, "cluster_header", name)?;
        return Some((String::new(), Some(ClusterSpecifier::Header(header))));
    }
    if let Some(wc) = route.obj("weighted_clusters") {
        return map_weighted_clusters(&wc)
            .map(|w| (String::new(), Some(ClusterSpecifier::Weighted(w))));
    }
    route.error(
        "cluster",
        "one of cluster, cluster_header or weighted_clusters is required (others are not supported by envoyx)",
    );
    None
}

fn map_weighted_clusters(wc: &Obj<'_>) -> Option<WeightedClusters> {
    // Deprecated; Envoy 1.40 accepts it and uses the sum of the weights instead.
    wc.ignore(&["total_weight"]);
    let random_header = match wc.str("header_name").filter(|h| !h.is_empty()) {
        Some(h) => Some(header_name(wc, "header_name", h)?),
        None => None,
    };
    let mut clusters = Vec::new();
    for c in wc.list("clusters") {
        let name = c.str("name").filter(|n| !n.is_empty());
        let cluster_header = match c.str("cluster_header").filter(|h| !h.is_empty()) {
            Some(h) => Some(header_name(&c, "cluster_header", h)?),
            None => None,
        };
        match (&name, &cluster_header) {
            (Some(_), Some(_)) => {
                c.errors().push(
                    c.path(),
                    "Only one of name or cluster_header can be specified",
                );
            }
            (None, None) => c.errors().push(
                c.path(),
                "At least one of name or cluster_header need to be specified",
            ),
            _ => {}
        }
        // Read before `weight` is checked: one error for an entry, not one more
        // for each of its fields left unread.
        let header_mutations = map_header_mutations(&c);
        let filter_overrides = map_filter_overrides(&c);
        let Some(weight) = c.u32("weight") else {
            c.error("weight", "Field 'weight' is missing");
            continue;
        };
        clusters.push(ClusterWeight {
            name: name.map(str::to_string),
            cluster_header,
            weight: u64::from(weight),
            host_rewrite: c
                .str("host_rewrite_literal")
                .filter(|h| !h.is_empty())
                .map(str::to_string),
            cluster_slot: 0,
            header_mutations,
            filter_overrides,
        });
    }
    let total_weight: u64 = clusters.iter().map(|c| c.weight).sum();
    if total_weight == 0 {
        wc.error(
            "clusters",
            "Sum of weights in the weighted_cluster must be greater than 0.",
        );
        return None;
    }
    Some(WeightedClusters {
        clusters,
        total_weight,
        header_name: random_header,
    })
}

fn header_name(owner: &Obj<'_>, field: &str, name: &str) -> Option<HeaderName> {
    match HeaderName::try_from(name.to_ascii_lowercase()) {
        Ok(h) => Some(h),
        Err(_) => {
            owner.error(field, format!("invalid header name {name:?}"));
            None
        }
    }
}

/// `host_rewrite_literal`, `auto_host_rewrite`, `host_rewrite_header`,
/// `host_rewrite_path_regex` (a oneof in Envoy's proto).
fn map_host_rewrite(route: &Obj<'_>) -> Option<HostRewrite> {
    if let Some(h) = route.str("host_rewrite_literal").filter(|h| !h.is_empty()) {
        return Some(HostRewrite::Literal(h.to_string()));
    }
    if let Some(h) = route.str("host_rewrite_header").filter(|h| !h.is_empty()) {
        return header_name(route, "host_rewrite_header", h).map(HostRewrite::Header);
    }
    if let Some(rr) = route.obj("host_rewrite_path_regex") {
        return map_regex_rewrite(&rr).map(HostRewrite::PathRegex);
    }
    route
        .bool("auto_host_rewrite")
        .unwrap_or(false)
        .then_some(HostRewrite::Auto)
}

/// A `RegexMatchAndSubstitute`: the pattern unanchored (it replaces every match),
/// the substitution's `\N` group references in the regex crate's `${N}` form.
pub fn map_regex_rewrite(rr: &Obj<'_>) -> Option<RegexRewrite> {
    let substitution = rr.str("substitution").unwrap_or_default();
    let pattern = rr.obj("pattern").or_else(|| {
        rr.error("pattern", "is required");
        None
    })?;
    let re = pattern.str("regex").unwrap_or_default();
    if let Some(g) = pattern.obj("google_re2") {
        g.ignore(&["max_program_size"]);
    }
    let regex = match Regex::new(re) {
        Ok(r) => r,
        Err(e) => {
            pattern.error("regex", format!("invalid regex '{re}': {e}"));
            return None;
        }
    };
    Some(RegexRewrite {
        regex,
        substitution: re2_substitution(substitution),
    })
}

/// RE2's rewrite string (`\0`..`\9`, `\\`) in the regex crate's syntax.
fn re2_substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.peek() {
                Some(d) if d.is_ascii_digit() => {
                    out.push_str(&format!("${{{d}}}"));
                    chars.next();
                }
                Some('\\') => {
                    out.push('\\');
                    chars.next();
                }
                _ => out.push('\\'),
            },
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

/// One `request_mirror_policies` entry.
pub fn map_mirror_policy(m: &Obj<'_>) -> Option<MirrorPolicy> {
    let cluster = m.str("cluster").filter(|c| !c.is_empty());
    let header = m.str("cluster_header").filter(|c| !c.is_empty());
    let cluster = match (cluster, header) {
        (Some(c), Some(h)) => {
            m.errors().push(
                m.path(),
                format!(
                    "Only one of cluster '{c}' or cluster_header '{h}' in request mirror policy can be specified"
                ),
            );
            return None;
        }
        (Some(c), None) => MirrorCluster::Name(c.to_string()),
        (None, Some(h)) => MirrorCluster::Header(header_name(m, "cluster_header", h)?),
        (None, None) => {
            m.errors().push(
                m.path(),
                "Exactly one of cluster or cluster_header in request mirror policy need to be specified",
            );
            return None;
        }
    };
    // Tracing is not part of envoyx: only Envoy's default (true) is accepted.
    if m.bool("trace_sampled") == Some(false) {
        m.error(
            "trace_sampled",
            "false is not supported by envoyx (no tracing)",
        );
    }
    let fraction = m.obj("runtime_fraction").map(|rf| {
        let dv = rf.obj("default_value");
        let numerator = dv.as_ref().and_then(|d| d.u32("numerator")).unwrap_or(0);
        let denominator = match dv.as_ref().and_then(|d| d.str("denominator")) {
            None | Some("HUNDRED") => 100,
            Some("TEN_THOUSAND") => 10_000,
            Some("MILLION") => 1_000_000,
            Some(other) => {
                rf.error("default_value.denominator", format!("unknown {other}"));
                100
            }
        };
        (u64::from(numerator), denominator)
    });
    Some(MirrorPolicy {
        cluster,
        fraction,
        keep_host: m.bool("disable_shadow_host_suffix_append").unwrap_or(false),
    })
}

/// `redirect`.
pub fn map_redirect(rd: &Obj<'_>) -> RouteAction {
    let status = match rd.str("response_code") {
        None | Some("MOVED_PERMANENTLY") => 301,
        Some("FOUND") => 302,
        Some("SEE_OTHER") => 303,
        Some("TEMPORARY_REDIRECT") => 307,
        Some("PERMANENT_REDIRECT") => 308,
        Some(other) => {
            rd.error("response_code", format!("unknown code {other}"));
            301
        }
    };
    let scheme = rd
        .str("scheme_redirect")
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .or_else(|| {
            rd.bool("https_redirect")
                .unwrap_or(false)
                .then(|| "https".to_string())
        });
    let path = rd
        .str("path_redirect")
        .filter(|p| !p.is_empty())
        .map(str::to_string);
    let rewrite = if let Some(p) = rd.str("prefix_rewrite").filter(|p| !p.is_empty()) {
        Some(PathRewrite::Prefix(p.to_string()))
    } else {
        rd.obj("regex_rewrite")
            .and_then(|rr| map_regex_rewrite(&rr))
            .map(PathRewrite::Regex)
    };
    let redirect = Redirect {
        scheme,
        host: rd
            .str("host_redirect")
            .filter(|h| !h.is_empty())
            .map(str::to_string),
        port: rd
            .u32("port_redirect")
            .filter(|p| *p != 0)
            .map(|p| format!(":{p}")),
        path_has_query: path.as_deref().is_some_and(|p| p.contains('?')),
        path,
        rewrite,
        strip_query: rd.bool("strip_query").unwrap_or(false),
        ssl_redirect: false,
    };
    RouteAction::Direct {
        status,
        body: None,
        redirect: Some(Box::new(redirect)),
    }
}

/// `direct_response`: a status and an optional body, answered without an
/// upstream. A 201 or 3xx answer carries a `location` (the request's URL), as
/// Envoy's does.
pub fn map_direct_response(dr: &Obj<'_>, max_body: u32) -> RouteAction {
    let status = dr.u32("status").unwrap_or(200);
    if !(200..=599).contains(&status) {
        dr.error("status", "must be in [200, 599]");
    }
    let body = dr.obj("body").and_then(|b| map_body(&b, max_body));
    RouteAction::Direct {
        status: status as u16,
        body,
        redirect: (status == 201 || (300..400).contains(&status))
            .then(|| Box::new(Redirect::default())),
    }
}

/// A direct response's `DataSource` body, bounded by the route configuration's
/// `max_direct_response_body_size_bytes`.
fn map_body(b: &Obj<'_>, max: u32) -> Option<Bytes> {
    let max = max as usize;
    if let Some(filename) = b.str("filename") {
        let data = match std::fs::read(filename) {
            Ok(d) => d,
            Err(_) => {
                b.error("filename", format!("file {filename} does not exist"));
                return None;
            }
        };
        if data.len() > max {
            b.error(
                "filename",
                format!(
                    "file {filename} size is {} bytes; maximum is {max} (max_direct_response_body_size_bytes)",
                    data.len()
                ),
            );
            return None;
        }
        return Some(Bytes::from(data));
    }
    let (field, data) = if let Some(s) = b.str("inline_bytes") {
        match base64::engine::general_purpose::STANDARD.decode(s) {
            Ok(d) => ("inline_bytes", Bytes::from(d)),
            Err(e) => {
                b.error("inline_bytes", format!("invalid base64: {e}"));
                return None;
            }
        }
    } else if let Some(s) = b.str("inline_string") {
        ("inline_string", Bytes::copy_from_slice(s.as_bytes()))
    } else {
        // `environment_variable` (and anything newer) is left unread: refused by name.
        return None;
    };
    if data.len() > max {
        b.error(
            field,
            format!(
                "response body size is {} bytes; maximum is {max} (max_direct_response_body_size_bytes)",
                data.len()
            ),
        );
        return None;
    }
    Some(data)
}

/// `route.hash_policy`: None when empty (no hash: consistent-hash policies pick
/// at random, as Envoy's do).
fn map_hash_policies(
    list: &[Obj<'_>],
) -> Option<std::sync::Arc<crate::router::hash_policy::HashPolicy>> {
    use crate::router::hash_policy::{HashMethod, HashPolicy};
    let mut methods = Vec::new();
    for hp in list {
        let terminal = hp.bool("terminal").unwrap_or(false);
        let method = if let Some(h) = hp.obj("header") {
            let name = h.str("header_name").unwrap_or_default();
            match http::HeaderName::try_from(name.to_ascii_lowercase()) {
                Ok(name) => HashMethod::Header(name),
                Err(_) => {
                    h.error("header_name", format!("invalid header name {name:?}"));
                    continue;
                }
            }
        } else if let Some(c) = hp.obj("cookie") {
            HashMethod::Cookie {
                name: c.str("name").unwrap_or_default().to_string(),
                path: c.str("path").unwrap_or_default().to_string(),
                ttl: c.duration("ttl"),
            }
        } else if let Some(cp) = hp.obj("connection_properties") {
            if !cp.bool("source_ip").unwrap_or(false) {
                // Envoy adds no method for `source_ip: false`.
                continue;
            }
            HashMethod::SourceIp
        } else if let Some(q) = hp.obj("query_parameter") {
            HashMethod::QueryParameter(q.str("name").unwrap_or_default().to_string())
        } else {
            // `filter_state` (and anything newer) is left unread: refused by name.
            continue;
        };
        methods.push((method, terminal));
    }
    (!methods.is_empty()).then(|| std::sync::Arc::new(HashPolicy { methods }))
}
