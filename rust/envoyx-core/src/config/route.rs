//! Route configurations (`RouteConfiguration`, inline or over RDS): virtual hosts,
//! their routes and what each route does. A route's match is in
//! [`super::route_match`], its action in [`super::route_action`].

use std::collections::HashSet;
use std::sync::Arc;

use http::HeaderName;
use serde_json::Value;

pub use super::filter_override::FilterOverride;
use super::filter_override::map_filter_overrides;
use super::header_mutation::{HeaderMutations, RouteHeaderMutations, map_header_mutations};
use super::matcher::{StringMatcher, StringPattern};
use super::native_filters::{CorsPolicy, NativeOverride, map_cors_policy};
use super::reader::Obj;
use super::retry::{map_hedge_policy, map_retry_policy};
use super::route_action::{
    DEFAULT_MAX_DIRECT_BODY, MirrorPolicy, Redirect, RouteAction, RouteDefaults,
    map_direct_response, map_forward_action, map_mirror_policy, map_redirect,
};
use super::route_match::{
    HeaderMatchKind, HeaderMatcher, HeaderSource, MatchConditions, PathMatch, RouteMatch,
    map_path_rewrite_policy, map_route_match,
};

#[derive(Debug)]
pub struct RouteConfig {
    /// `name`.
    pub name: String,
    /// `virtual_hosts`.
    pub virtual_hosts: Vec<VirtualHostConfig>,
    /// `validate_clusters`: refuse routes naming unknown clusters. Unset, Envoy's
    /// default is on for a table inline in a connection manager and off for RDS,
    /// resolved when the table is mapped.
    pub validate_clusters: bool,
    /// `ignore_port_in_host_matching`: virtual hosts are selected by the host
    /// without its port.
    pub ignore_port_in_host_matching: bool,
    /// `internal_only_headers`: removed from every request that is not internal.
    pub internal_only_headers: Vec<HeaderName>,
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
    /// `request_headers_to_add` and kin of the route, its virtual host and its
    /// route configuration, in Envoy's order; None when none is set.
    pub header_mutations: Option<Arc<RouteHeaderMutations>>,
    /// `metadata` (`%METADATA(ROUTE:...)%`).
    pub metadata: Option<Arc<super::metadata::Metadata>>,
}

/// The header mutations a virtual host hands its routes: the route
/// configuration's and its own, and their order.
struct InheritedMutations {
    route_config: Option<Arc<HeaderMutations>>,
    virtual_host: Option<Arc<HeaderMutations>>,
    most_specific_wins: bool,
}

/// What a route configuration gives each of its virtual hosts.
struct ConfigDefaults<'a> {
    /// `max_direct_response_body_size_bytes`.
    max_direct_body: u32,
    /// `request_mirror_policies`, for routes and virtual hosts without their own.
    mirrors: &'a [MirrorPolicy],
    /// The route configuration's header mutations.
    mutations: &'a Option<Arc<HeaderMutations>>,
    /// `most_specific_header_mutations_wins`.
    most_specific_wins: bool,
}

/// A `route_config` inline in a connection manager.
pub fn map_inline_route_config(rc: &Obj<'_>) -> Option<RouteConfig> {
    map_route_config(rc, true)
}

/// An RDS `RouteConfiguration` resource.
pub fn map_rds_route_config(rc: &Obj<'_>) -> Option<RouteConfig> {
    map_route_config(rc, false)
}

/// `validate_clusters_default`: Envoy's default for where the table comes from.
fn map_route_config(rc: &Obj<'_>, validate_clusters_default: bool) -> Option<RouteConfig> {
    let name = rc.str("name").unwrap_or_default().to_string();
    let max_direct_body = rc
        .u32("max_direct_response_body_size_bytes")
        .unwrap_or(DEFAULT_MAX_DIRECT_BODY);
    let mirrors: Vec<MirrorPolicy> = rc
        .list("request_mirror_policies")
        .iter()
        .filter_map(map_mirror_policy)
        .collect();
    let route_config_mutations = map_header_mutations(rc);
    let most_specific_wins = rc
        .bool("most_specific_header_mutations_wins")
        .unwrap_or(false);
    let config = ConfigDefaults {
        max_direct_body,
        mirrors: &mirrors,
        mutations: &route_config_mutations,
        most_specific_wins,
    };
    // As a virtual host's: checked and kept in /config_dump, read by nothing else.
    super::metadata::map_metadata(rc);
    let vhosts: Vec<VirtualHostConfig> = rc
        .list("virtual_hosts")
        .iter()
        .filter_map(|vh| map_virtual_host(vh, &config))
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
        validate_clusters: rc
            .bool("validate_clusters")
            .unwrap_or(validate_clusters_default),
        ignore_port_in_host_matching: rc.bool("ignore_port_in_host_matching").unwrap_or(false),
        internal_only_headers: rc
            .strings("internal_only_headers")
            .iter()
            .enumerate()
            .filter_map(|(i, h)| match HeaderName::from_bytes(h.as_bytes()) {
                Ok(name) => Some(name),
                Err(_) => {
                    rc.error(
                        &format!("internal_only_headers[{i}]"),
                        format!("{h:?} is not a valid header name"),
                    );
                    None
                }
            })
            .collect(),
        raw: rc.to_value(),
    })
}

fn map_virtual_host(vh: &Obj<'_>, config: &ConfigDefaults<'_>) -> Option<VirtualHostConfig> {
    let name = vh.str("name").unwrap_or_default().to_string();
    // Checked, and kept in /config_dump: Envoy reads a virtual host's metadata only in
    // %METADATA(VIRTUAL_HOST:...)% and filters, which envoyx does not have.
    super::metadata::map_metadata(vh);
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
    // The deprecated `cors` field (Envoy 1.40 still reads it, with a warning).
    let vhost_cors = vh.obj("cors").map(|c| map_cors_policy(&c));
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
        mirrors: {
            let own: Vec<MirrorPolicy> = vh
                .list("request_mirror_policies")
                .iter()
                .filter_map(map_mirror_policy)
                .collect();
            if own.is_empty() {
                config.mirrors.to_vec()
            } else {
                own
            }
        },
        max_direct_body: config.max_direct_body,
    };
    let mutations = InheritedMutations {
        route_config: config.mutations.clone(),
        virtual_host: map_header_mutations(vh),
        most_specific_wins: config.most_specific_wins,
    };
    let mut routes: Vec<RouteEntry> = map_require_tls(vh).into_iter().collect();
    routes.extend(
        vh.list("routes")
            .iter()
            .filter_map(|r| map_route(r, &inherited, &mutations)),
    );
    for route in &mut routes {
        legacy_cors(route, vhost_cors.as_ref());
        for (name, o) in &vhost_overrides {
            match route.filter_overrides.iter_mut().find(|(n, _)| n == name) {
                None => route.filter_overrides.push((name.clone(), o.clone())),
                // A route's CORS policy reads its virtual host's for the fields it
                // leaves unset (Envoy's filter walks both), merged once here.
                Some((_, FilterOverride::Native(NativeOverride::Cors(own)))) => {
                    if let FilterOverride::Native(NativeOverride::Cors(vhost)) = o {
                        *own = Arc::new(own.over(vhost));
                    }
                }
                Some(_) => {}
            }
        }
    }
    Some(VirtualHostConfig {
        name,
        domains,
        routes,
    })
}

/// `require_tls`: Envoy's `SslRedirectRoute`, checked before the virtual host's
/// routes — a request whose `x-forwarded-proto` is not `https` (with `EXTERNAL_ONLY`:
/// and which is not `x-envoy-internal: true`) gets a 301 to `https://` + Host + path.
/// Compiled as a first route of the virtual host, so hosts without it pay nothing.
fn map_require_tls(vh: &Obj<'_>) -> Option<RouteEntry> {
    let external_only = match vh.str("require_tls")? {
        "NONE" => return None,
        "EXTERNAL_ONLY" => true,
        "ALL" => false,
        other => {
            vh.error("require_tls", format!("unknown value {other}"));
            return None;
        }
    };
    let not_equal = |name: &'static str, value: &str, missing_as_empty: bool| HeaderMatcher {
        name: HeaderSource::Header(HeaderName::from_static(name)),
        kind: HeaderMatchKind::String(StringMatcher {
            pattern: StringPattern::Exact(value.to_string()),
            ignore_case: false,
        }),
        invert: true,
        treat_missing_as_empty: missing_as_empty,
    };
    // The connection manager always sets x-forwarded-proto before routing.
    let mut headers = vec![not_equal("x-forwarded-proto", "https", false)];
    if external_only {
        headers.push(not_equal("x-envoy-internal", "true", true));
    }
    Some(RouteEntry {
        name: String::new(),
        route_match: RouteMatch {
            path: PathMatch::Prefix(String::new()),
            case_sensitive: true,
            conditions: Some(Box::new(MatchConditions {
                headers,
                ..Default::default()
            })),
        },
        action: RouteAction::Direct {
            status: 301,
            body: None,
            redirect: Some(Box::new(Redirect {
                ssl_redirect: true,
                ..Default::default()
            })),
        },
        filter_overrides: Vec::new(),
        header_mutations: None,
        metadata: None,
    })
}

/// `decorator`: Envoy uses it only for tracing (the span's name and the
/// `x-envoy-decorator-operation` header it propagates), and only when the connection
/// manager has `tracing`, which envoyx refuses — so, as in Envoy without tracing, it
/// changes nothing. Checked as Envoy checks it.
fn map_decorator(r: &Obj<'_>) {
    if let Some(d) = r.obj("decorator") {
        if d.str("operation").unwrap_or_default().is_empty() {
            d.error("operation", "must not be empty");
        }
        d.bool("propagate");
    }
}

fn map_route(
    r: &Obj<'_>,
    inherited: &RouteDefaults,
    mutations: &InheritedMutations,
) -> Option<RouteEntry> {
    let name = r.str("name").unwrap_or_default().to_string();
    let header_mutations = RouteHeaderMutations::new(
        map_header_mutations(r).as_ref(),
        mutations.virtual_host.as_ref(),
        mutations.route_config.as_ref(),
        mutations.most_specific_wins,
    );
    let m = r.obj("match").or_else(|| {
        r.error("match", "is required");
        None
    })?;
    let mut route_match = map_route_match(&m)?;
    let mut route_cors = None;
    let action = if let Some(route) = r.obj("route") {
        route_cors = route.obj("cors").map(|c| map_cors_policy(&c));
        map_path_rewrite_policy(&route, &mut route_match);
        RouteAction::Forward(map_forward_action(&route, r, inherited)?)
    } else if let Some(dr) = r.obj("direct_response") {
        map_direct_response(&dr, inherited.max_direct_body)
    } else if let Some(rd) = r.obj("redirect") {
        map_redirect(&rd)
    } else {
        r.errors().push(
            r.path(),
            "a route needs `route`, `redirect` or `direct_response` (others are not supported by envoyx)",
        );
        return None;
    };
    map_decorator(r);
    let mut filter_overrides = map_filter_overrides(r);
    if let Some(cors) = route_cors {
        filter_overrides.push((
            LEGACY_CORS.to_string(),
            FilterOverride::Native(NativeOverride::Cors(Arc::new(cors))),
        ));
    }
    Some(RouteEntry {
        name,
        route_match,
        action,
        filter_overrides,
        header_mutations,
        metadata: super::metadata::map_metadata(r),
    })
}

/// The key under which a route keeps the policy of the deprecated `cors` fields
/// (its action's over its virtual host's): not a filter name, which is never empty.
/// The CORS filter reads it only when neither level has a `typed_per_filter_config`
/// policy, as Envoy's does.
pub const LEGACY_CORS: &str = "";

fn legacy_cors(route: &mut RouteEntry, vhost: Option<&CorsPolicy>) {
    let Some(vhost) = vhost else { return };
    match route
        .filter_overrides
        .iter_mut()
        .find(|(n, _)| n == LEGACY_CORS)
    {
        Some((_, FilterOverride::Native(NativeOverride::Cors(own)))) => {
            *own = Arc::new(own.over(vhost));
        }
        _ => route.filter_overrides.push((
            LEGACY_CORS.to_string(),
            FilterOverride::Native(NativeOverride::Cors(Arc::new(vhost.clone()))),
        )),
    }
}
