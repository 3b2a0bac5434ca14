//! Internal redirects: a route's `internal_redirect_policy` makes the router follow
//! an upstream's 3xx itself (Envoy's `Filter::setupRedirect`,
//! `convertRequestHeadersForInternalRedirect` and the stream's `recreateStream`).
//! The request goes through route selection again with the `Location`'s host and
//! path; the client sees only the last response. Only routes with a policy come
//! here: the others never build any of this.

use http::header::{self, HeaderValue};

use super::filter::{Router, RouterOutcome};
use crate::access_log::LogRecord;
use crate::config::internal_redirect::{InternalRedirectPolicy, Predicate};
use crate::http::body::{ProxyBody, ReplayBuffer};
use crate::per_worker::LocalHandle;
use crate::router::route_match::RouteRequest;
use crate::upstream::Cluster;

pub static X_ENVOY_ORIGINAL_URL: http::HeaderName =
    http::HeaderName::from_static("x-envoy-original-url");

/// What one request carries from redirect to redirect (Envoy keeps it in the
/// stream's filter state, which outlives `recreateStream`).
#[derive(Default)]
pub(crate) struct Chain {
    /// Redirects followed so far (`num_internal_redirects`).
    followed: u32,
    /// The `previous_routes` predicate's state: per route having the policy, the
    /// target routes it already redirected to.
    previous_routes: Vec<(String, Vec<String>)>,
}

/// A redirect to follow: the next request, and what it goes through again.
pub(crate) struct Next {
    pub parts: http::request::Parts,
    pub body: ProxyBody,
    /// The new `:authority` and `:path`.
    pub authority: String,
    pub path: String,
    pub scheme: String,
    pub chain: Chain,
    /// The redirect response, for the access-log line of the request it ends
    /// (None: the stream keeps no record).
    pub logged: Option<(u16, http::HeaderMap)>,
}

/// The redirect response and the request as the try sent it upstream (Envoy
/// edits the downstream headers in place: the next request starts from them).
pub(super) struct Candidate<'a> {
    pub policy: &'a InternalRedirectPolicy,
    pub status: u16,
    pub response: &'a http::HeaderMap,
    pub sent: Option<http::request::Parts>,
    pub replay: Option<&'a ReplayBuffer>,
    pub downstream_is_http: bool,
    pub chain: Option<Box<Chain>>,
}

impl Router<'_, '_> {
    /// Whether to follow the upstream's redirect (None: it passes through to the
    /// client unchanged), counting the outcome as Envoy does.
    pub(super) fn accept_redirect(
        &self,
        c: Candidate<'_>,
        cluster: &LocalHandle<Cluster>,
    ) -> Option<Box<Next>> {
        let next = self.convert(c);
        if next.is_some() {
            cluster
                .stats
                .upstream_internal_redirect_succeeded_total
                .inc();
        } else {
            cluster.stats.upstream_internal_redirect_failed_total.inc();
        }
        next
    }

    fn convert(&self, c: Candidate<'_>) -> Option<Box<Next>> {
        // Only a request received whole, its body kept (Envoy: the downstream
        // request ended and its buffer never overflowed).
        let body_kept = match c.replay {
            None => true,
            Some(r) => futures_util::FutureExt::now_or_never(r.fill()) == Some(true),
        };
        if !body_kept {
            return None;
        }
        let location = c.response.get(header::LOCATION)?;
        let mut sent = c.sent?;
        let stats = &self.conn.hcm.stats;
        let Some(url) = location.to_str().ok().and_then(AbsoluteUrl::parse) else {
            stats.passthrough_internal_redirect_bad_location.inc();
            return None;
        };
        let policy = c.policy;
        let target_is_http = url.scheme.eq_ignore_ascii_case("http");
        if !policy.allow_cross_scheme_redirect && c.downstream_is_http != target_is_http {
            stats.passthrough_internal_redirect_unsafe_scheme.inc();
            return None;
        }
        let mut chain = c.chain.map(|b| *b).unwrap_or_default();
        if chain.followed >= policy.max_internal_redirects {
            stats.passthrough_internal_redirect_too_many_redirects.inc();
            return None;
        }
        // The URL the request had (after the route's rewrites, as Envoy's headers
        // are by now), for `x-envoy-original-url`.
        let original_host = sent
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| sent.uri.authority().map(|a| a.as_str()))
            .unwrap_or(self.authority)
            .to_string();
        let original_path = sent
            .uri
            .path_and_query()
            .map_or(self.path, |p| p.as_str())
            .to_string();
        let headers = &mut sent.headers;
        for name in &policy.response_headers_to_copy {
            headers.remove(name);
            for v in c.response.get_all(name) {
                headers.append(name.clone(), v.clone());
            }
        }
        let route = self.routes.find(&RouteRequest::new(
            url.host,
            url.path,
            &sent.method,
            url.scheme,
            &sent.headers,
        ));
        let Some(route) = route else {
            stats.passthrough_internal_redirect_no_route.inc();
            return None;
        };
        for predicate in &policy.predicates {
            let accepted = match predicate {
                Predicate::AllowListedRoutes(names) => names.contains(&route.name),
                // Envoy's: an https request may go anywhere, an http one only to http.
                Predicate::SafeCrossScheme => !c.downstream_is_http || target_is_http,
                Predicate::PreviousRoutes => chain.insert_previous(&policy.route_name, &route.name),
            };
            if !accepted {
                stats.passthrough_internal_redirect_predicate.inc();
                return None;
            }
        }
        let mut body = match c.replay {
            Some(r) => r.body(),
            None => ProxyBody::Empty,
        };
        // RFC 7231 6.4.4: a 303 is followed with a GET and no body.
        if c.status == 303 && sent.method != http::Method::GET && sent.method != http::Method::HEAD
        {
            sent.method = http::Method::GET;
            sent.headers.remove(header::CONTENT_LENGTH);
            sent.headers.remove(header::TRANSFER_ENCODING);
            body = ProxyBody::Empty;
        }
        chain.followed += 1;
        let scheme = if c.downstream_is_http {
            "http"
        } else {
            "https"
        };
        if let Ok(v) = HeaderValue::from_str(&format!("{scheme}://{original_host}{original_path}"))
        {
            sent.headers.insert(X_ENVOY_ORIGINAL_URL.clone(), v);
        }
        if let Ok(v) = HeaderValue::from_str(url.host) {
            sent.headers.insert(header::HOST, v);
        }
        sent.uri = url.path.parse().ok()?;
        Some(Box::new(Next {
            parts: sent,
            body,
            authority: url.host.to_string(),
            path: url.path.to_string(),
            scheme: url.scheme.to_ascii_lowercase(),
            chain,
            logged: self
                .record
                .is_some()
                .then(|| (c.status, c.response.clone())),
        }))
    }
}

impl Chain {
    /// `previous_routes`: false when `target` was already a target of `owner`'s
    /// redirects (else it is one now).
    fn insert_previous(&mut self, owner: &str, target: &str) -> bool {
        let seen = match self.previous_routes.iter_mut().find(|(o, _)| o == owner) {
            Some((_, seen)) => seen,
            None => {
                self.previous_routes.push((owner.to_string(), Vec::new()));
                &mut self.previous_routes.last_mut().expect("just pushed").1
            }
        };
        if seen.iter().any(|s| s == target) {
            return false;
        }
        seen.push(target.to_string());
        true
    }
}

/// A `Location` that is an absolute URL (Envoy's `Utility::Url::initialize`):
/// scheme and authority required; the fragment is dropped.
struct AbsoluteUrl<'a> {
    scheme: &'a str,
    host: &'a str,
    path: &'a str,
}

impl<'a> AbsoluteUrl<'a> {
    fn parse(s: &'a str) -> Option<Self> {
        let s = s.split('#').next().unwrap_or_default();
        let (scheme, rest) = s.split_once("://")?;
        let mut chars = scheme.chars();
        if !chars.next()?.is_ascii_alphabetic()
            || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        {
            return None;
        }
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (host, path) = rest.split_at(end);
        if host.is_empty()
            || s.bytes()
                .any(|b| b <= b' ' || b == 0x7f || b == b'"' || b == b'<' || b == b'>')
            || host.parse::<http::uri::Authority>().is_err()
        {
            return None;
        }
        Some(AbsoluteUrl {
            scheme,
            host,
            path: if path.is_empty() { "/" } else { path },
        })
    }
}

/// Follows the redirects a request's routes accept, each through route selection
/// again (Envoy's recreated stream); returns the outcome of the last hop.
pub(super) async fn follow(
    router: Router<'_, '_>,
    first: Box<Next>,
    version: http::Version,
) -> RouterOutcome {
    let Router {
        conn,
        record,
        bytes_received,
        upgrade,
        routes,
        redirected_to,
        ..
    } = router;
    let mut next = first;
    loop {
        let Next {
            parts,
            body,
            authority,
            path,
            scheme,
            chain,
            logged,
        } = *next;
        let route = routes.find(&RouteRequest::new(
            &authority,
            &path,
            &parts.method,
            &scheme,
            &parts.headers,
        ));
        // Envoy's recreated stream is a new downstream request to its stats.
        let stats = &conn.hcm.stats;
        stats.downstream_rq_total.inc();
        if version == http::Version::HTTP_2 {
            stats.downstream_rq_http2_total.inc();
        } else {
            stats.downstream_rq_http1_total.inc();
        }
        *redirected_to = route;
        // Envoy ends the redirected stream (its access-log line, with the
        // headers already rewritten for the next request) and starts another.
        if let (Some(old), Some((status, headers))) = (record.take(), logged) {
            let mut line = *old;
            line.method = parts.method.as_str().to_string();
            line.path.clone_from(&path);
            line.authority.clone_from(&authority);
            line.request_headers = Some(parts.headers.clone());
            line.response_code = status;
            line.response_code_details = "internal_redirect";
            line.response_headers = Some(headers);
            line.bytes_received = bytes_received.get();
            line.duration = line
                .start
                .and_then(|s| s.elapsed().ok())
                .unwrap_or_default();
            for logger in &conn.hcm.access_logs {
                logger.log(&line);
            }
            *record = Some(Box::new(LogRecord {
                start: Some(std::time::SystemTime::now()),
                protocol: line.protocol,
                downstream_remote: line.downstream_remote,
                downstream_local: line.downstream_local,
                response_flags: "-",
                downstream_tls: line.downstream_tls.take(),
                ..Default::default()
            }));
        }
        // The final route's response headers may need a record the first
        // route's did not.
        if record.is_none()
            && route.is_some_and(|r| r.header_mutations.as_ref().is_some_and(|m| m.has_response))
        {
            *record = Some(Box::new(LogRecord {
                start: Some(std::time::SystemTime::now()),
                protocol: crate::http::headers::protocol_name(version),
                downstream_remote: Some(conn.peer),
                downstream_local: conn.local,
                response_flags: "-",
                downstream_tls: conn.tls.clone(),
                ..Default::default()
            }));
        }
        if let Some(r) = record.as_mut() {
            r.method = parts.method.as_str().to_string();
            r.path.clone_from(&path);
            r.authority.clone_from(&authority);
            r.request_headers = Some(parts.headers.clone());
            r.route_name = route.map(|r| r.name.clone()).unwrap_or_default();
            r.upstream_host = None;
            r.upstream_cluster = None;
        }
        let hop = Router {
            conn,
            record: &mut *record,
            bytes_received,
            upgrade: &mut *upgrade,
            routes,
            // The next route's weighted entry is picked by the router (its entry's
            // header mutations and filter configs do not apply to a redirect).
            weighted: None,
            authority: &authority,
            path: &path,
            // Only this loop sets it (a hop's own redirect comes back here).
            redirected_to: &mut None,
        };
        match hop
            .decode_hop(route, parts, body, None, Some(Box::new(chain)))
            .await
        {
            RouterOutcome::InternalRedirect(n) => next = n,
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        let u = AbsoluteUrl::parse("http://b.example:8080/x/y?q=1#frag").unwrap();
        assert_eq!(
            (u.scheme, u.host, u.path),
            ("http", "b.example:8080", "/x/y?q=1")
        );
        let u = AbsoluteUrl::parse("https://b").unwrap();
        assert_eq!((u.scheme, u.host, u.path), ("https", "b", "/"));
        assert!(AbsoluteUrl::parse("/relative").is_none());
        assert!(AbsoluteUrl::parse("http:///nohost").is_none());
        assert!(AbsoluteUrl::parse("http://a b/").is_none());
        assert!(AbsoluteUrl::parse("").is_none());
    }

    #[test]
    fn previous_routes_per_owner() {
        let mut c = Chain::default();
        assert!(c.insert_previous("a", "b"));
        assert!(!c.insert_previous("a", "b"));
        assert!(c.insert_previous("b", "b"));
    }
}
