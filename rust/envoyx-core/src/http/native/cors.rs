//! `envoy.filters.http.cors`: preflight replies and the CORS headers of responses,
//! as Envoy's `source/extensions/filters/http/cors/cors_filter.cc` (the policy is
//! the route's `typed_per_filter_config`, over its virtual host's).

use std::sync::Arc;

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method};

use super::{Decode, DecodeRequest, NativeFilter};
use crate::config::native_filters::{CorsPolicy, NativeOverride, RuntimePercent};
use crate::config::route::LEGACY_CORS;
use crate::config::{FilterOverride, RouteAction};
use crate::http::local_reply::LocalReply;
use crate::stats::{Counter, StatStore};

static ACCESS_CONTROL_REQUEST_PRIVATE_NETWORK: HeaderName =
    HeaderName::from_static("access-control-request-private-network");
static ACCESS_CONTROL_ALLOW_PRIVATE_NETWORK: HeaderName =
    HeaderName::from_static("access-control-allow-private-network");

pub(crate) struct CorsFilter {
    origin_valid: Counter,
    origin_invalid: Counter,
}

/// What a CORS request leaves for its response: the accepted origin and the policy.
pub(crate) struct Latched {
    origin: HeaderValue,
    policy: Arc<CorsPolicy>,
}

impl Latched {
    /// Envoy's `encodeHeaders`: the origin, credentials and exposed headers.
    pub fn encode_headers(&self, headers: &mut HeaderMap) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, self.origin.clone());
        if self.policy.allow_credentials == Some(true) {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(v) = &self.policy.expose_headers {
            headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
        }
    }
}

fn runtime_enabled(p: &RuntimePercent) -> bool {
    crate::runtime::snapshot().feature_enabled(
        p.runtime_key.as_deref(),
        p.default.numerator,
        p.default.denominator,
        rand::random(),
    )
}

impl CorsFilter {
    pub fn new(store: &StatStore, prefix: &str) -> CorsFilter {
        CorsFilter {
            origin_valid: store.counter(&format!("{prefix}cors.origin_valid")),
            origin_invalid: store.counter(&format!("{prefix}cors.origin_invalid")),
        }
    }
}

fn origin_allowed(policy: &CorsPolicy, origin: &str) -> bool {
    policy
        .allow_origins
        .iter()
        .flatten()
        .any(|m| m.matches("*") || m.matches(origin))
}

impl NativeFilter for CorsFilter {
    fn decode_headers(&self, cx: &mut DecodeRequest<'_>, over: Option<&NativeOverride>) -> Decode {
        // Without a policy on the route (or its virtual host) the filter is off; so
        // it is on direct responses and redirects (they have no route entry in Envoy).
        let Some(route) = cx
            .route
            .filter(|r| matches!(r.action, RouteAction::Forward(_)))
        else {
            return Decode::Continue;
        };
        let policy = match over {
            Some(NativeOverride::Cors(p)) => p,
            // No `typed_per_filter_config` policy: the deprecated `cors` fields'.
            _ => match route
                .filter_overrides
                .iter()
                .find(|(n, _)| n == LEGACY_CORS)
            {
                Some((_, FilterOverride::Native(NativeOverride::Cors(p)))) => p,
                _ => return Decode::Continue,
            },
        };
        let enabled = policy.filter_enabled.as_ref().is_none_or(runtime_enabled);
        let shadow = policy.shadow_enabled.as_ref().is_some_and(runtime_enabled);
        if !enabled && !shadow {
            return Decode::Continue;
        }
        let headers = cx.req.headers;
        let Some(origin) = headers.get(header::ORIGIN).filter(|o| !o.is_empty()) else {
            return Decode::Continue;
        };
        let allowed = origin_allowed(policy, &String::from_utf8_lossy(origin.as_bytes()));
        if allowed {
            self.origin_valid.inc();
        } else {
            self.origin_invalid.inc();
        }
        if !enabled {
            // Shadow mode: counted, nothing changed.
            return Decode::Continue;
        }
        if allowed {
            cx.state().cors = Some(Latched {
                origin: origin.clone(),
                policy: policy.clone(),
            });
        }
        if cx.req.method != Method::OPTIONS {
            return Decode::Continue;
        }
        let Some(request_method) = headers
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .filter(|m| !m.is_empty())
        else {
            return Decode::Continue;
        };
        if !allowed && policy.forward_not_matching_preflights.unwrap_or(true) {
            return Decode::Continue;
        }
        // A preflight: answered here with 200 and no body; the response step
        // (`encode_headers`) adds the origin, credentials and exposed headers.
        let mut reply = LocalReply::new(200, bytes::Bytes::new(), "-", "cors_response");
        let mut set = |name: HeaderName, v: Option<HeaderValue>| {
            if let Some(v) = v {
                reply.headers.push((name, v));
            }
        };
        if allowed {
            set(header::ACCESS_CONTROL_ALLOW_ORIGIN, Some(origin.clone()));
        }
        if policy.allow_credentials == Some(true) {
            set(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                Some(HeaderValue::from_static("true")),
            );
        }
        match &policy.allow_methods {
            Some(m) if m == "*" => set(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                Some(request_method.clone()),
            ),
            m => set(header::ACCESS_CONTROL_ALLOW_METHODS, m.clone()),
        }
        match &policy.allow_headers {
            Some(h) if h == "*" => set(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                Some(
                    headers
                        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
                        .cloned()
                        .unwrap_or_else(|| HeaderValue::from_static("")),
                ),
            ),
            h => set(header::ACCESS_CONTROL_ALLOW_HEADERS, h.clone()),
        }
        set(header::ACCESS_CONTROL_MAX_AGE, policy.max_age.clone());
        if policy.allow_private_network_access == Some(true)
            && headers
                .get(&ACCESS_CONTROL_REQUEST_PRIVATE_NETWORK)
                .is_some_and(|v| v == "true")
        {
            set(
                ACCESS_CONTROL_ALLOW_PRIVATE_NETWORK.clone(),
                Some(HeaderValue::from_static("true")),
            );
        }
        Decode::Reply(reply)
    }
}
