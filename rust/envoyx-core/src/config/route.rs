//! Route configurations (`RouteConfiguration`, inline or over RDS): virtual hosts,
//! their routes and what each route does. A route's match is in
//! [`super::route_match`], its action in [`super::route_action`].

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::model::FilterOverride;
use super::network::{
    FILTER_CONFIG_TYPE, PYTHON_FILTER_TYPE, TYPED_STRUCT_TYPE, UDPA_TYPED_STRUCT_TYPE,
};
use super::reader::Obj;
use super::retry::{map_hedge_policy, map_retry_policy};
use super::route_action::{RouteDefaults, map_direct_response, map_forward_action};
use super::route_match::{RouteMatch, map_route_match};

#[derive(Debug)]
pub struct RouteConfig {
    /// `name`.
    pub name: String,
    /// `virtual_hosts`.
    pub virtual_hosts: Vec<VirtualHostConfig>,
    /// `validate_clusters`: refuse routes naming unknown clusters. Envoy's default
    /// is on for static route configurations and off for RDS.
    pub validate_clusters: Option<bool>,
    pub raw: Value,
}

#[derive(Debug)]
pub struct VirtualHostConfig {
    pub name: String,
    /// `domains`: exact, `*.suffix`, `prefix.*` or `*`, lower-cased.
    pub domains: Vec<String>,
    pub routes: Vec<RouteEntry>,
}

#[derive(Debug)]
pub struct RouteEntry {
    pub name: String,
    /// `match`.
    pub route_match: RouteMatch,
    pub action: RouteAction,
    /// `typed_per_filter_config` of the route, over its virtual host's, by filter name.
    pub filter_overrides: Vec<(String, FilterOverride)>,
}

// Built once per configuration and only read by reference while routing: the
// size of the forwarding variant costs nothing per request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum RouteAction {
    /// `route`.
    Forward(ForwardAction),
    /// `direct_response`.
    Direct { status: u16, body: Option<String> },
}

#[derive(Debug)]
pub struct ForwardAction {
    /// `route.cluster`.
    pub cluster: String,
    /// The index of `cluster` among the cluster names of the compiled route table
    /// ([`crate::router::RouteTable::cluster_names`]), set when it is compiled, so
    /// that a request finds its cluster without hashing the name.
    pub cluster_slot: usize,
    /// `route.timeout` (default 15 s; zero disables).
    pub timeout: Option<Duration>,
    /// `x-envoy-expected-rq-timeout-ms` for `timeout`, made once here rather than
    /// formatted for every request.
    pub expected_timeout: Option<http::HeaderValue>,
    /// `route.prefix_rewrite`.
    pub prefix_rewrite: Option<String>,
    /// `route.host_rewrite_literal`.
    pub host_rewrite: Option<String>,
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
    /// `route.hash_policy`: the request's hash for ring hash and Maglev.
    pub hash_policy: Option<Arc<crate::router::hash_policy::HashPolicy>>,
    /// `route.upgrade_configs` (None: the connection manager's decide).
    pub upgrades: Option<Box<super::upgrade::RouteUpgrades>>,
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

/// `typed_per_filter_config`: per filter name, disabled or a config override.
fn map_filter_overrides(owner: &Obj<'_>) -> Vec<(String, FilterOverride)> {
    let mut out = Vec::new();
    for (name, any) in owner.entries("typed_per_filter_config") {
        match any.any_type() {
            Some(FILTER_CONFIG_TYPE) => {
                // `is_optional` only matters for filters envoyx does not know, which it rejects.
                any.ignore(&["is_optional"]);
                if any.raw("config").is_some() {
                    any.error(
                        "config",
                        "not supported by envoyx (use a TypedStruct override)",
                    );
                }
                if any.bool("disabled") == Some(true) {
                    out.push((name.to_string(), FilterOverride::Disabled));
                }
            }
            Some(TYPED_STRUCT_TYPE | UDPA_TYPED_STRUCT_TYPE) => {
                let type_url = any.str("type_url").unwrap_or_default();
                if type_url != PYTHON_FILTER_TYPE {
                    any.error(
                        "type_url",
                        format!("{type_url:?} is not supported by envoyx"),
                    );
                    continue;
                }
                let Some(value) = any.obj("value") else {
                    any.error("value", "is required: {config: ...}");
                    continue;
                };
                let config = value.raw("config").cloned().unwrap_or(Value::Null);
                out.push((
                    name.to_string(),
                    FilterOverride::Config(config.to_string().into()),
                ));
            }
            Some(other) => any.error(
                "@type",
                format!("per-filter config {other} is not supported by envoyx"),
            ),
            None => {}
        }
    }
    out
}

pub fn map_route_config(rc: &Obj<'_>) -> Option<RouteConfig> {
    let name = rc.str("name").unwrap_or_default().to_string();
    let vhosts: Vec<VirtualHostConfig> = rc
        .list("virtual_hosts")
        .iter()
        .filter_map(map_virtual_host)
        .collect();
    let mut seen = HashSet::new();
    for (i, vh) in vhosts.iter().enumerate() {
        for d in &vh.domains {
            if !seen.insert(d.clone()) {
                rc.error(
                    &format!("virtual_hosts[{i}].domains"),
                    format!(
                        "Only unique values for domains are permitted. Duplicate entry of domain {d} in route {name}"
                    ),
                );
            }
        }
    }
    Some(RouteConfig {
        name,
        virtual_hosts: vhosts,
        validate_clusters: rc.bool("validate_clusters"),
        raw: rc.to_value(),
    })
}

fn map_virtual_host(vh: &Obj<'_>) -> Option<VirtualHostConfig> {
    let name = vh.str("name").unwrap_or_default().to_string();
    let domains: Vec<String> = vh
        .strings("domains")
        .iter()
        .map(|d| d.to_ascii_lowercase())
        .collect();
    if domains.is_empty() {
        vh.error("domains", "must have at least one domain");
    }
    for d in &domains {
        if d.len() > 1 && d[1..d.len() - 1].contains('*') {
            vh.error("domains", format!("invalid wildcard domain {d}"));
        }
    }
    let vhost_overrides = map_filter_overrides(vh);
    let inherited = RouteDefaults {
        retry_policy: vh
            .obj("retry_policy")
            .map(|p| std::sync::Arc::new(map_retry_policy(&p))),
        hedge_policy: vh.obj("hedge_policy").map(|h| map_hedge_policy(&h)),
        include_attempt_count_in_request: vh.bool("include_request_attempt_count").unwrap_or(false),
        include_attempt_count_in_response: vh
            .bool("include_attempt_count_in_response")
            .unwrap_or(false),
        buffer_limit: vh.u32("per_request_buffer_limit_bytes"),
    };
    let mut routes: Vec<RouteEntry> = vh
        .list("routes")
        .iter()
        .filter_map(|r| map_route(r, &inherited))
        .collect();
    for route in &mut routes {
        for (name, o) in &vhost_overrides {
            if !route.filter_overrides.iter().any(|(n, _)| n == name) {
                route.filter_overrides.push((name.clone(), o.clone()));
            }
        }
    }
    Some(VirtualHostConfig {
        name,
        domains,
        routes,
    })
}

fn map_route(r: &Obj<'_>, inherited: &RouteDefaults) -> Option<RouteEntry> {
    let name = r.str("name").unwrap_or_default().to_string();
    let m = r.obj("match").or_else(|| {
        r.error("match", "is required");
        None
    })?;
    let route_match = map_route_match(&m)?;
    let action = if let Some(route) = r.obj("route") {
        RouteAction::Forward(map_forward_action(&route, r, inherited)?)
    } else if let Some(dr) = r.obj("direct_response") {
        map_direct_response(&dr)
    } else {
        r.errors().push(
            r.path(),
            "a route needs `route` or `direct_response` (others are not supported by envoyx)",
        );
        return None;
    };
    Some(RouteEntry {
        name,
        route_match,
        action,
        filter_overrides: map_filter_overrides(r),
    })
}
