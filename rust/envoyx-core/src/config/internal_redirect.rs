//! A route's `internal_redirect_policy` (and the deprecated
//! `internal_redirect_action` / `max_internal_redirects` it replaced, which Envoy
//! 1.40 still accepts with a warning), as Envoy's `InternalRedirectPolicyImpl`.

use http::HeaderName;

use super::reader::Obj;

const ALLOW_LISTED_ROUTES: &str =
    "envoy.extensions.internal_redirect.allow_listed_routes.v3.AllowListedRoutesConfig";
const PREVIOUS_ROUTES: &str =
    "envoy.extensions.internal_redirect.previous_routes.v3.PreviousRoutesConfig";
const SAFE_CROSS_SCHEME: &str =
    "envoy.extensions.internal_redirect.safe_cross_scheme.v3.SafeCrossSchemeConfig";

/// When a route follows an upstream's redirect itself instead of passing it on.
#[derive(Debug, Clone)]
pub struct InternalRedirectPolicy {
    /// `max_internal_redirects` (default 1): redirects one request may follow.
    pub max_internal_redirects: u32,
    /// `redirect_response_codes` as bits (1 << (code - 300)); default 302 only.
    /// Codes other than 301, 302, 303, 307 and 308 are dropped, as Envoy does.
    codes: u16,
    pub predicates: Vec<Predicate>,
    pub allow_cross_scheme_redirect: bool,
    /// `response_headers_to_copy`: copied from the redirect response onto the
    /// next request (removed from it when the response has none).
    pub response_headers_to_copy: Vec<HeaderName>,
    /// The route's own name (the `previous_routes` predicate keeps its state per
    /// route having the policy, as Envoy's keyed filter state).
    pub route_name: String,
}

/// An `envoy.internal_redirect_predicates` extension.
#[derive(Debug, Clone)]
pub enum Predicate {
    /// Only these target routes.
    AllowListedRoutes(Vec<String>),
    /// No target route twice (per route having the policy).
    PreviousRoutes,
    /// An http request is not redirected to https (Envoy's `safe_cross_scheme`:
    /// an https request may go to either).
    SafeCrossScheme,
}

impl InternalRedirectPolicy {
    pub fn redirects_on(&self, status: u16) -> bool {
        (300..316).contains(&status) && self.codes & (1 << (status - 300)) != 0
    }
}

/// `internal_redirect_policy` of a `route`, else the deprecated
/// `internal_redirect_action: HANDLE_INTERNAL_REDIRECT` with
/// `max_internal_redirects` (Envoy's `buildInternalRedirectPolicy`).
pub fn map_internal_redirect(
    route: &Obj<'_>,
    route_name: &str,
) -> Option<Box<InternalRedirectPolicy>> {
    // Read before the policy so that both are always read (a policy wins).
    let action = route.str("internal_redirect_action");
    let deprecated_max = route.u32("max_internal_redirects");
    if let Some(p) = route.obj("internal_redirect_policy") {
        return map_policy(&p, route_name).map(Box::new);
    }
    match action {
        Some("HANDLE_INTERNAL_REDIRECT") => Some(Box::new(InternalRedirectPolicy {
            max_internal_redirects: deprecated_max.unwrap_or(1),
            codes: 1 << 2,
            predicates: Vec::new(),
            allow_cross_scheme_redirect: false,
            response_headers_to_copy: Vec::new(),
            route_name: route_name.to_string(),
        })),
        None | Some("PASS_THROUGH_INTERNAL_REDIRECT") => None,
        Some(other) => {
            route.error("internal_redirect_action", format!("unknown value {other}"));
            None
        }
    }
}

fn map_policy(p: &Obj<'_>, route_name: &str) -> Option<InternalRedirectPolicy> {
    let max_internal_redirects = p.u32("max_internal_redirects").unwrap_or(1);
    let listed = p.raw("redirect_response_codes");
    let codes = match listed {
        None => 1 << 2,
        Some(serde_json::Value::Array(items)) if items.is_empty() => 1 << 2,
        Some(serde_json::Value::Array(items)) => {
            let mut bits = 0u16;
            for (i, item) in items.iter().enumerate() {
                match item.as_u64() {
                    Some(c @ (301 | 302 | 303 | 307 | 308)) => bits |= 1 << (c - 300),
                    Some(_) => {}
                    None => p.errors().push(
                        &format!("{}[{i}]", p.field_path("redirect_response_codes")),
                        "expected an unsigned integer",
                    ),
                }
            }
            bits
        }
        Some(_) => {
            p.error("redirect_response_codes", "expected a list");
            1 << 2
        }
    };
    let predicates = p
        .list("predicates")
        .iter()
        .filter_map(map_predicate)
        .collect();
    let mut response_headers_to_copy = Vec::new();
    for (i, name) in p
        .strings("response_headers_to_copy")
        .into_iter()
        .enumerate()
    {
        let path = format!("{}[{i}]", p.field_path("response_headers_to_copy"));
        // Envoy's `isModifiableHeader`.
        if name.starts_with(':') || name.eq_ignore_ascii_case("host") {
            p.errors().push(
                &path,
                ":-prefixed headers or Hosts may not be specified here.",
            );
            continue;
        }
        match HeaderName::try_from(name.to_ascii_lowercase()) {
            Ok(h) => response_headers_to_copy.push(h),
            Err(_) => p
                .errors()
                .push(&path, format!("invalid header name {name:?}")),
        }
    }
    Some(InternalRedirectPolicy {
        max_internal_redirects,
        codes,
        predicates,
        allow_cross_scheme_redirect: p.bool("allow_cross_scheme_redirect").unwrap_or(false),
        response_headers_to_copy,
        route_name: route_name.to_string(),
    })
}

/// One `predicates` entry (a `TypedExtensionConfig`): found by its `@type`, as
/// Envoy's `getAndCheckFactory`.
fn map_predicate(e: &Obj<'_>) -> Option<Predicate> {
    e.str("name");
    let tc = e.obj("typed_config").or_else(|| {
        e.error("typed_config", "is required");
        None
    })?;
    match tc.any_type() {
        Some(PREVIOUS_ROUTES) => Some(Predicate::PreviousRoutes),
        Some(SAFE_CROSS_SCHEME) => Some(Predicate::SafeCrossScheme),
        Some(ALLOW_LISTED_ROUTES) => Some(Predicate::AllowListedRoutes(
            tc.strings("allowed_route_names")
                .into_iter()
                .map(str::to_string)
                .collect(),
        )),
        other => {
            tc.error(
                "@type",
                format!(
                    "internal redirect predicate {} is not supported by envoyx",
                    other.unwrap_or_default()
                ),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::reader::Errors;

    fn policy(route: serde_json::Value) -> (Option<Box<InternalRedirectPolicy>>, Vec<String>) {
        let errors = Errors::default();
        let out = {
            let obj = Obj::new(&route, "route".into(), &errors).unwrap();
            let out = map_internal_redirect(&obj, "r");
            obj.str("cluster");
            out
        };
        (out, errors.into_vec())
    }

    #[test]
    fn defaults_follow_302_once() {
        let (p, errors) = policy(serde_json::json!({"internal_redirect_policy": {}}));
        assert!(errors.is_empty(), "{errors:?}");
        let p = p.unwrap();
        assert_eq!(p.max_internal_redirects, 1);
        assert!(p.redirects_on(302));
        assert!(!p.redirects_on(301) && !p.redirects_on(307));
    }

    #[test]
    fn codes_outside_envoys_set_are_dropped() {
        let (p, _) = policy(serde_json::json!({"internal_redirect_policy": {
            "redirect_response_codes": [301, 304, 308, 200]}}));
        let p = p.unwrap();
        assert!(p.redirects_on(301) && p.redirects_on(308));
        assert!(!p.redirects_on(304) && !p.redirects_on(302) && !p.redirects_on(200));
    }

    #[test]
    fn host_and_pseudo_headers_are_refused_by_path() {
        let (_, errors) = policy(serde_json::json!({"internal_redirect_policy": {
            "response_headers_to_copy": ["x-ok", "Host", ":path"]}}));
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].starts_with("route.internal_redirect_policy.response_headers_to_copy[1]")
        );
    }

    #[test]
    fn deprecated_action_with_its_max() {
        let (p, errors) = policy(serde_json::json!({
            "internal_redirect_action": "HANDLE_INTERNAL_REDIRECT", "max_internal_redirects": 3}));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(p.unwrap().max_internal_redirects, 3);
        let (p, errors) = policy(serde_json::json!({"max_internal_redirects": 3}));
        assert!(errors.is_empty() && p.is_none());
    }
}
