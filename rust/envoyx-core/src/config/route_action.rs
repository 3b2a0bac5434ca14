//! A route's action: `route` (forward to a cluster, with its timeouts, retries,
//! rewrites and hashing) or `direct_response`.

use std::time::Duration;

use super::reader::Obj;
use super::retry::{HedgePolicy, RetryPolicy, map_hedge_policy, map_retry_policy};
use super::route::{ForwardAction, RouteAction, RouteStreamDuration};

/// What a virtual host gives the routes that do not set it themselves.
pub struct RouteDefaults {
    pub retry_policy: Option<std::sync::Arc<RetryPolicy>>,
    pub hedge_policy: Option<HedgePolicy>,
    pub include_attempt_count_in_request: bool,
    pub include_attempt_count_in_response: bool,
    pub buffer_limit: Option<u32>,
}

/// Envoy's default `per_connection_buffer_limit_bytes`, which bounds a request's
/// body kept for retries when no `per_request_buffer_limit_bytes` is set.
const DEFAULT_BUFFER_LIMIT: u32 = 1024 * 1024;

/// `route`: the forwarding action of route `r`.
pub fn map_forward_action(
    route: &Obj<'_>,
    r: &Obj<'_>,
    inherited: &RouteDefaults,
) -> Option<ForwardAction> {
    let Some(cluster) = route.str("cluster") else {
        route.error(
            "cluster",
            "is required (other cluster specifiers are not supported by envoyx)",
        );
        return None;
    };
    let timeout = match route.duration("timeout") {
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
        None => Some(Duration::from_secs(15)),
    };
    Some(ForwardAction {
        cluster: cluster.to_string(),
        cluster_slot: 0,
        timeout,
        expected_timeout: timeout.map(|t| http::HeaderValue::from(t.as_millis() as u64)),
        prefix_rewrite: route.str("prefix_rewrite").map(str::to_string),
        host_rewrite: route.str("host_rewrite_literal").map(str::to_string),
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
        stream_duration: route
            .obj("max_stream_duration")
            .map(|m| RouteStreamDuration {
                max: m.duration("max_stream_duration"),
                grpc_header_max: m.duration("grpc_timeout_header_max"),
                grpc_header_offset: m.duration("grpc_timeout_header_offset"),
            }),
        hash_policy: map_hash_policies(&route.list("hash_policy")),
        upgrades: super::upgrade::map_route_upgrades(route),
    })
}

/// `direct_response`: a status and an optional body, answered without an upstream.
pub fn map_direct_response(dr: &Obj<'_>) -> RouteAction {
    let status = dr.u32("status").unwrap_or(200);
    if !(200..=599).contains(&status) {
        dr.error("status", "must be in [200, 599]");
    }
    let body = dr.obj("body").and_then(|b| {
        if let Some(s) = b.str("inline_string") {
            Some(s.to_string())
        } else {
            b.errors()
                .push(b.path(), "only inline_string is supported by envoyx");
            None
        }
    });
    RouteAction::Direct {
        status: status as u16,
        body,
    }
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
