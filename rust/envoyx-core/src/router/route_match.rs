//! Matching a request against a route's `match`.

use std::cell::Cell;

use http::{HeaderMap, Method};

use crate::config::route_match::{
    HeaderMatchKind, HeaderMatcher, HeaderSource, MatchConditions, QueryMatchKind,
    QueryParameterMatcher, RewriteSegment, UriTemplate,
};
use crate::config::{PathMatch, RouteMatch};

/// What route selection reads of a request: borrowed, nothing copied.
pub struct RouteRequest<'a> {
    /// `:authority` (or `Host`).
    pub authority: &'a str,
    /// `:path`: the path with its query.
    pub path: &'a str,
    pub method: &'a Method,
    /// `:scheme`.
    pub scheme: &'a str,
    pub headers: &'a HeaderMap,
    /// The downstream TLS session (None: plaintext), for `tls_context`.
    pub tls: Option<&'a crate::tls::PeerTls>,
    /// Envoy draws one random value per stream for every `runtime_fraction` of the
    /// lookup; drawn here on first use.
    random: Cell<Option<u64>>,
}

impl<'a> RouteRequest<'a> {
    pub fn new(
        authority: &'a str,
        path: &'a str,
        method: &'a Method,
        scheme: &'a str,
        headers: &'a HeaderMap,
    ) -> Self {
        RouteRequest {
            authority,
            path,
            method,
            scheme,
            headers,
            tls: None,
            random: Cell::new(None),
        }
    }

    /// The request came over this downstream TLS session.
    pub fn with_tls(mut self, tls: Option<&'a crate::tls::PeerTls>) -> Self {
        self.tls = tls;
        self
    }

    fn random(&self) -> u64 {
        match self.random.get() {
            Some(r) => r,
            None => {
                let r = rand::random();
                self.random.set(Some(r));
                r
            }
        }
    }

    /// The path without query and fragment (Envoy's `removeQueryAndFragment`).
    fn path_only(&self) -> &'a str {
        let end = self.path.find(['?', '#']).unwrap_or(self.path.len());
        &self.path[..end]
    }

    fn query(&self) -> Option<&'a str> {
        self.path.split_once('?').map(|(_, q)| q)
    }

    /// A pseudo-header's value; None for a regular header.
    fn pseudo(&self, source: &HeaderSource) -> Option<&'a str> {
        match source {
            HeaderSource::Authority => Some(self.authority),
            HeaderSource::Path => Some(self.path),
            HeaderSource::Method => Some(self.method.as_str()),
            HeaderSource::Scheme => Some(self.scheme),
            HeaderSource::OtherPseudo | HeaderSource::Header(_) => None,
        }
    }
}

impl RouteMatch {
    /// Whether `req` takes this route: its path, then (only if the route has any)
    /// its other conditions.
    pub fn matches(&self, req: &RouteRequest<'_>) -> bool {
        self.path_matches(req) && self.conditions.as_deref().is_none_or(|c| c.matches(req))
    }

    fn path_matches(&self, req: &RouteRequest<'_>) -> bool {
        let eq = |a: &str, b: &str| {
            if self.case_sensitive {
                a == b
            } else {
                a.eq_ignore_ascii_case(b)
            }
        };
        match &self.path {
            PathMatch::Prefix(prefix) => {
                req.path.get(..prefix.len()).is_some_and(|p| eq(p, prefix))
            }
            PathMatch::Path(exact) => eq(req.path_only(), exact),
            PathMatch::Regex(re) => re.is_match(req.path_only()),
            PathMatch::PathSeparatedPrefix(prefix) => {
                let path = req.path_only();
                path.get(..prefix.len()).is_some_and(|p| eq(p, prefix))
                    && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/'))
            }
            PathMatch::Template(t) => t.regex.is_match(req.path_only()),
            PathMatch::Connect => req.path.is_empty(),
        }
    }
}

impl MatchConditions {
    fn matches(&self, req: &RouteRequest<'_>) -> bool {
        // Envoy's order: runtime, headers, query parameters, gRPC.
        if let Some(f) = &self.runtime_fraction {
            let runtime = crate::runtime::snapshot();
            if !runtime.feature_enabled(
                f.runtime_key.as_deref(),
                f.numerator,
                f.denominator,
                req.random(),
            ) {
                return false;
            }
        }
        if !self.headers.iter().all(|h| h.matches(req)) {
            return false;
        }
        if !self.query_parameters.is_empty() {
            let query = req.query();
            if !self.query_parameters.iter().all(|q| q.matches(query)) {
                return false;
            }
        }
        if self.grpc && !is_grpc(req) {
            return false;
        }
        // Envoy's `evaluateTlsContextMatch`, last as in its `matchRoute`.
        self.tls_context.is_none_or(|t| {
            let presented = req.tls.is_some_and(|s| s.peer_presented());
            let validated = req.tls.is_some_and(|s| s.peer_validated);
            t.presented.is_none_or(|p| p == presented) && t.validated.is_none_or(|v| v == validated)
        })
    }
}

/// Envoy's `Grpc::Common::isGrpcRequestHeaders`: `application/grpc`, or
/// `application/grpc+subtype` (not `application/grpc-web`, nor with parameters).
fn is_grpc(req: &RouteRequest<'_>) -> bool {
    is_grpc_content_type(req.headers)
}

/// Whether a request's `content-type` makes it gRPC, as Envoy decides it (for
/// route matching and for its local replies alike).
pub fn is_grpc_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.as_bytes().strip_prefix(b"application/grpc"))
        .is_some_and(|rest| matches!(rest.first(), None | Some(b'+')))
}

impl HeaderMatcher {
    /// Envoy 1.40 compares each value of a repeated header on its own: the header
    /// matches when one of its values does (then `invert_match` applies), so
    /// nothing is joined or copied.
    pub fn matches(&self, req: &RouteRequest<'_>) -> bool {
        let matched = match &self.name {
            HeaderSource::Header(name) => {
                let mut values = req.headers.get_all(name).iter().peekable();
                if values.peek().is_none() {
                    return self.missing();
                }
                if let HeaderMatchKind::Present(present) = self.kind {
                    return present != self.invert;
                }
                values.any(|v| self.value_matches(&String::from_utf8_lossy(v.as_bytes())))
            }
            source => match (req.pseudo(source), &self.kind) {
                (None, _) => return self.missing(),
                (Some(_), HeaderMatchKind::Present(present)) => return *present != self.invert,
                (Some(v), _) => self.value_matches(v),
            },
        };
        matched != self.invert
    }

    /// A header the request does not have: it fails even an inverted matcher, as
    /// in Envoy, unless it is treated as empty.
    fn missing(&self) -> bool {
        match self.kind {
            // Absent: matches `present_match: false`, inverted or not as asked.
            HeaderMatchKind::Present(present) => present == self.invert,
            _ if self.treat_missing_as_empty => self.value_matches("") != self.invert,
            _ => false,
        }
    }

    fn value_matches(&self, value: &str) -> bool {
        match &self.kind {
            HeaderMatchKind::String(m) => m.matches(value),
            HeaderMatchKind::LegacyExact(expected) => expected.is_empty() || value == expected,
            HeaderMatchKind::Range { start, end } => value
                .trim_matches(|c: char| c.is_ascii_whitespace())
                .parse::<i64>()
                .is_ok_and(|n| n >= *start && n < *end),
            HeaderMatchKind::Present(_) => true,
        }
    }
}

impl QueryParameterMatcher {
    /// Against the raw query (no percent-decoding, as Envoy): the first parameter
    /// named so decides.
    fn matches(&self, query: Option<&str>) -> bool {
        let value = query.and_then(|q| {
            q.split('&').find_map(|param| match param.split_once('=') {
                Some((k, v)) if k == self.name => Some(v),
                None if param == self.name => Some(""),
                _ => None,
            })
        });
        match (&self.kind, value) {
            (QueryMatchKind::Present(p), v) => v.is_some() == *p,
            (_, None) => false,
            (QueryMatchKind::Exists, Some(_)) => true,
            (QueryMatchKind::String(m), Some(v)) => m.matches(v),
        }
    }
}

impl UriTemplate {
    /// The route's `path_rewrite_policy` applied to `path` (its query kept), or None
    /// when the route has none (or, as in Envoy, the path does not match: the
    /// request keeps its path).
    pub fn rewrite(&self, path: &str) -> Option<String> {
        let segments = self.rewrite.as_ref()?;
        let end = path.find(['?', '#']).unwrap_or(path.len());
        let captures = self.regex.captures(&path[..end])?;
        let mut out = String::with_capacity(path.len());
        for s in segments {
            match s {
                RewriteSegment::Literal(l) => out.push_str(l),
                RewriteSegment::Variable(i) => {
                    out.push_str(captures.get(*i).map_or("", |m| m.as_str()))
                }
            }
        }
        out.push_str(&path[end..]);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::matcher::{StringMatcher, StringPattern};
    use crate::config::route_match::{MatchConditions, RuntimeFraction};

    fn req<'a>(path: &'a str, headers: &'a HeaderMap) -> RouteRequest<'a> {
        RouteRequest::new("example.com", path, &Method::GET, "http", headers)
    }

    fn only_path(path: PathMatch, case_sensitive: bool) -> RouteMatch {
        RouteMatch {
            path,
            case_sensitive,
            conditions: None,
        }
    }

    fn with(conditions: MatchConditions) -> RouteMatch {
        RouteMatch {
            path: PathMatch::Prefix("/".into()),
            case_sensitive: true,
            conditions: Some(Box::new(conditions)),
        }
    }

    fn header(name: &str, kind: HeaderMatchKind, invert: bool, empty: bool) -> HeaderMatcher {
        HeaderMatcher {
            name: match name {
                ":method" => HeaderSource::Method,
                ":authority" => HeaderSource::Authority,
                n => HeaderSource::Header(n.parse().unwrap()),
            },
            kind,
            invert,
            treat_missing_as_empty: empty,
        }
    }

    fn exact(v: &str) -> HeaderMatchKind {
        HeaderMatchKind::String(StringMatcher {
            pattern: StringPattern::Exact(v.into()),
            ignore_case: false,
        })
    }

    #[test]
    fn case_insensitive_prefix() {
        let m = only_path(PathMatch::Prefix("/API".into()), false);
        let h = HeaderMap::new();
        assert!(m.matches(&req("/api/x", &h)));
        assert!(!m.matches(&req("/ap", &h)));
    }

    #[test]
    fn path_separated_prefix() {
        let m = only_path(PathMatch::PathSeparatedPrefix("/api".into()), true);
        let h = HeaderMap::new();
        assert!(m.matches(&req("/api", &h)));
        assert!(m.matches(&req("/api/v1", &h)));
        assert!(m.matches(&req("/api?x=1", &h)));
        assert!(!m.matches(&req("/apiv1", &h)));
        assert!(!m.matches(&req("/API", &h)));
        let m = only_path(PathMatch::PathSeparatedPrefix("/api".into()), false);
        assert!(m.matches(&req("/API/x", &h)));
    }

    #[test]
    fn header_matchers_invert_and_missing() {
        let mut h = HeaderMap::new();
        h.append("x-a", "1".parse().unwrap());
        h.append("x-a", "2".parse().unwrap());
        let m = |hm| {
            with(MatchConditions {
                headers: vec![hm],
                ..Default::default()
            })
        };
        // Each value of a repeated header is compared on its own.
        assert!(!m(header("x-a", exact("1,2"), false, false)).matches(&req("/", &h)));
        assert!(m(header("x-a", exact("2"), false, false)).matches(&req("/", &h)));
        assert!(!m(header("x-a", exact("2"), true, false)).matches(&req("/", &h)));
        // Missing: false even inverted, unless treated as empty.
        assert!(!m(header("x-b", exact("v"), true, false)).matches(&req("/", &h)));
        assert!(m(header("x-b", exact("v"), true, true)).matches(&req("/", &h)));
        assert!(m(header("x-b", exact(""), false, true)).matches(&req("/", &h)));
        assert!(
            m(header("x-b", HeaderMatchKind::Present(false), false, false)).matches(&req("/", &h))
        );
        assert!(
            !m(header("x-a", HeaderMatchKind::Present(true), true, false)).matches(&req("/", &h))
        );
        assert!(m(header(":method", exact("GET"), false, false)).matches(&req("/", &h)));
        assert!(
            m(header(
                "x-a",
                HeaderMatchKind::LegacyExact(String::new()),
                false,
                false
            ))
            .matches(&req("/", &h))
        );
        h.insert("x-n", " -5 ".parse().unwrap());
        let range = |s, e| HeaderMatchKind::Range { start: s, end: e };
        assert!(m(header("x-n", range(-10, -4), false, false)).matches(&req("/", &h)));
        assert!(!m(header("x-n", range(-4, 10), false, false)).matches(&req("/", &h)));
        assert!(m(header("x-a", range(0, 10), false, false)).matches(&req("/", &h)));
        assert!(!m(header("x-a", range(3, 10), false, false)).matches(&req("/", &h)));
    }

    #[test]
    fn query_parameters_are_raw_and_first_wins() {
        let q = |name: &str, kind| QueryParameterMatcher {
            name: name.into(),
            kind,
        };
        let s = |v: &str| {
            QueryMatchKind::String(StringMatcher {
                pattern: StringPattern::Exact(v.into()),
                ignore_case: false,
            })
        };
        assert!(q("a", s("1")).matches(Some("a=1&a=2")));
        assert!(!q("a", s("2")).matches(Some("a=1&a=2")));
        assert!(q("a", s("x%20y")).matches(Some("a=x%20y")));
        assert!(q("flag", QueryMatchKind::Exists).matches(Some("b=1&flag")));
        assert!(q("flag", s("")).matches(Some("flag")));
        assert!(!q("flag", QueryMatchKind::Exists).matches(None));
        assert!(q("flag", QueryMatchKind::Present(false)).matches(Some("flagx=1")));
    }

    #[test]
    fn runtime_fraction_default_values() {
        let h = HeaderMap::new();
        let f = |n| {
            with(MatchConditions {
                runtime_fraction: Some(RuntimeFraction {
                    numerator: n,
                    denominator: 100,
                    runtime_key: Some("not.in.the.runtime".into()),
                }),
                ..Default::default()
            })
        };
        assert!(f(100).matches(&req("/", &h)));
        assert!(!f(0).matches(&req("/", &h)));
    }

    #[test]
    fn grpc_content_types() {
        let m = with(MatchConditions {
            grpc: true,
            ..Default::default()
        });
        let mut h = HeaderMap::new();
        assert!(!m.matches(&req("/", &h)));
        for (ct, ok) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("application/grpc;x=y", false),
            ("application/grpc-web", false),
            ("application/json", false),
        ] {
            h.insert("content-type", ct.parse().unwrap());
            assert_eq!(m.matches(&req("/", &h)), ok, "{ct}");
        }
    }

    #[test]
    fn uri_template_rewrite_keeps_the_query() {
        let t = UriTemplate {
            template: "/{lang}/static/{file=**}".into(),
            regex: regex::Regex::new(&format!(
                "^(?:{})$",
                crate::config::route_match::uri_template_regex("/{lang}/static/{file=**}").unwrap()
            ))
            .unwrap(),
            rewrite: Some(vec![
                RewriteSegment::Literal("/assets/".into()),
                RewriteSegment::Variable(2),
                RewriteSegment::Literal("/".into()),
                RewriteSegment::Variable(1),
            ]),
        };
        assert_eq!(
            t.rewrite("/en/static/css/a.css?v=1").as_deref(),
            Some("/assets/css/a.css/en?v=1")
        );
        assert_eq!(t.rewrite("/nope"), None);
    }
}
