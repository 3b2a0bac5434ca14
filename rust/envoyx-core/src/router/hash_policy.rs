//! A route's `hash_policy` (Envoy's `Http::HashPolicyImpl`): the request's hash
//! for the ring-hash and Maglev load balancers, from headers, a cookie (generated
//! with a `Set-Cookie` when it is missing and has a `ttl`), the client's IP or a
//! query parameter; several policies combined as Envoy combines them.

use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use xxhash_rust::xxh64::xxh64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashMethod {
    /// `header.header_name`: the values of the header, sorted, chained through
    /// xxHash64 (so their order does not matter).
    Header(HeaderName),
    /// `cookie`: the cookie's value; when missing and `ttl` is set, one is made
    /// for the connection and sent back with `Set-Cookie`.
    Cookie {
        name: String,
        path: String,
        ttl: Option<Duration>,
    },
    /// `connection_properties.source_ip`.
    SourceIp,
    /// `query_parameter.name`: its first value, as written in the path.
    QueryParameter(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashPolicy {
    /// Each method and whether it is `terminal`.
    pub methods: Vec<(HashMethod, bool)>,
}

/// What the hash policy made of one request.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestHash {
    pub hash: Option<u64>,
    /// A generated cookie for the response (`Set-Cookie`), as Envoy's router adds it.
    pub set_cookie: Option<HeaderValue>,
}

/// The request's parts a hash may use.
pub struct HashInput<'a> {
    pub headers: &'a HeaderMap,
    /// The path with its query.
    pub path: &'a str,
    pub peer: SocketAddr,
    /// The downstream connection's local address (part of a generated cookie).
    pub local: Option<SocketAddr>,
}

/// The hash of a request on a route (none without a `hash_policy`).
pub(crate) fn for_request(
    policy: Option<&HashPolicy>,
    headers: &HeaderMap,
    path: &str,
    peer: SocketAddr,
    local: Option<SocketAddr>,
) -> RequestHash {
    match policy {
        Some(policy) => policy.generate(&HashInput {
            headers,
            path,
            peer,
            local,
        }),
        None => RequestHash::default(),
    }
}

impl HashPolicy {
    pub fn generate(&self, input: &HashInput<'_>) -> RequestHash {
        let mut out = RequestHash::default();
        for (method, terminal) in &self.methods {
            if let Some(new) = method.evaluate(input, &mut out.set_cookie) {
                // Rotating the old value keeps two identical policies from
                // cancelling out (Envoy's combination).
                let old = out.hash.map_or(0, |h| h.rotate_left(1));
                out.hash = Some(old ^ new);
            }
            if *terminal && out.hash.is_some() {
                break;
            }
        }
        out
    }
}

impl HashMethod {
    fn evaluate(&self, input: &HashInput<'_>, set_cookie: &mut Option<HeaderValue>) -> Option<u64> {
        match self {
            HashMethod::Header(name) => {
                let mut values: Vec<&[u8]> = input
                    .headers
                    .get_all(name)
                    .iter()
                    .map(|v| v.as_bytes())
                    .collect();
                if values.is_empty() {
                    return None;
                }
                values.sort_unstable();
                Some(values.iter().fold(0, |seed, v| xxh64(v, seed)))
            }
            HashMethod::Cookie { name, path, ttl } => {
                if let Some(value) = cookie_value(input.headers, name) {
                    return Some(xxh64(value.as_bytes(), 0));
                }
                let ttl = (*ttl)?;
                // Envoy's router: the same value for every stream of a connection.
                let local = input.local.map(|a| a.to_string()).unwrap_or_default();
                let value = format!(
                    "{:016x}",
                    xxh64(format!("{}{local}", input.peer).as_bytes(), 0)
                );
                *set_cookie = HeaderValue::try_from(make_set_cookie(name, &value, path, ttl)).ok();
                Some(xxh64(value.as_bytes(), 0))
            }
            HashMethod::SourceIp => Some(xxh64(input.peer.ip().to_string().as_bytes(), 0)),
            HashMethod::QueryParameter(name) => {
                let query = input.path.split_once('?')?.1;
                let query = query.split_once('#').map_or(query, |(q, _)| q);
                query.split('&').find_map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (k == name).then(|| xxh64(v.as_bytes(), 0))
                })
            }
        }
    }
}

/// The first value of cookie `name` in the `Cookie` headers, unquoted (Envoy's
/// `Utility::parseCookieValue`).
fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim_start().split_once('=')?;
            if k != name {
                return None;
            }
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            Some(v)
        })
}

/// Envoy's `Utility::makeSetCookieValue` (HttpOnly, as Envoy's router sets it).
fn make_set_cookie(name: &str, value: &str, path: &str, max_age: Duration) -> String {
    let mut cookie = format!("{name}=\"{value}\"");
    if !max_age.is_zero() {
        cookie.push_str(&format!("; Max-Age={}", max_age.as_secs()));
    }
    if !path.is_empty() {
        cookie.push_str(&format!("; Path={path}"));
    }
    cookie.push_str("; HttpOnly");
    cookie
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(headers: &'a HeaderMap, path: &'a str) -> HashInput<'a> {
        HashInput {
            headers,
            path,
            peer: "10.0.0.1:5555".parse().unwrap(),
            local: Some("10.0.0.2:80".parse().unwrap()),
        }
    }

    fn policy(methods: Vec<(HashMethod, bool)>) -> HashPolicy {
        HashPolicy { methods }
    }

    #[test]
    fn header_values_hash_in_any_order() {
        let p = policy(vec![(
            HashMethod::Header(HeaderName::from_static("x-k")),
            false,
        )]);
        let mut a = HeaderMap::new();
        a.append("x-k", HeaderValue::from_static("foo"));
        a.append("x-k", HeaderValue::from_static("bar"));
        let mut b = HeaderMap::new();
        b.append("x-k", HeaderValue::from_static("bar"));
        b.append("x-k", HeaderValue::from_static("foo"));
        let ha = p.generate(&input(&a, "/")).hash;
        assert_eq!(ha, p.generate(&input(&b, "/")).hash);
        assert_eq!(ha, Some(xxh64(b"foo", xxh64(b"bar", 0))));
        // One value: plain xxHash64 with seed 0, as Envoy.
        let mut one = HeaderMap::new();
        one.insert("x-k", HeaderValue::from_static("abc"));
        assert_eq!(p.generate(&input(&one, "/")).hash, Some(xxh64(b"abc", 0)));
        assert_eq!(p.generate(&input(&HeaderMap::new(), "/")).hash, None);
    }

    #[test]
    fn policies_combine_by_rotation_and_terminal_stops() {
        let h = HashMethod::Header(HeaderName::from_static("x-k"));
        let mut headers = HeaderMap::new();
        headers.insert("x-k", HeaderValue::from_static("v"));
        let one = xxh64(b"v", 0);
        let twice = policy(vec![(h.clone(), false), (h.clone(), false)]);
        assert_eq!(
            twice.generate(&input(&headers, "/")).hash,
            Some(one.rotate_left(1) ^ one)
        );
        let terminal = policy(vec![(h.clone(), true), (HashMethod::SourceIp, false)]);
        assert_eq!(terminal.generate(&input(&headers, "/")).hash, Some(one));
        // A terminal policy without a value does not stop the others.
        let terminal = policy(vec![
            (HashMethod::Header(HeaderName::from_static("x-none")), true),
            (HashMethod::SourceIp, false),
        ]);
        assert_eq!(
            terminal.generate(&input(&headers, "/")).hash,
            Some(xxh64(b"10.0.0.1", 0))
        );
    }

    #[test]
    fn cookie_is_read_or_generated_with_a_ttl() {
        let cookie = |ttl| {
            policy(vec![(
                HashMethod::Cookie {
                    name: "sticky".into(),
                    path: "/".into(),
                    ttl,
                },
                false,
            )])
        };
        let mut headers = HeaderMap::new();
        headers.insert("cookie", HeaderValue::from_static("a=1; sticky=\"abc\""));
        let got = cookie(None).generate(&input(&headers, "/"));
        assert_eq!(got.hash, Some(xxh64(b"abc", 0)));
        assert_eq!(got.set_cookie, None);
        // Missing, no ttl: no hash.
        let none = cookie(None).generate(&input(&HeaderMap::new(), "/"));
        assert_eq!(none, RequestHash::default());
        let made = cookie(Some(Duration::from_secs(60))).generate(&input(&HeaderMap::new(), "/"));
        let value = format!("{:016x}", xxh64(b"10.0.0.1:555510.0.0.2:80", 0));
        assert_eq!(made.hash, Some(xxh64(value.as_bytes(), 0)));
        assert_eq!(
            made.set_cookie.unwrap(),
            format!("sticky=\"{value}\"; Max-Age=60; Path=/; HttpOnly")
        );
    }

    #[test]
    fn query_parameter_first_value() {
        let p = policy(vec![(HashMethod::QueryParameter("u".into()), false)]);
        let h = HeaderMap::new();
        assert_eq!(
            p.generate(&input(&h, "/p?a=1&u=x&u=y")).hash,
            Some(xxh64(b"x", 0))
        );
        assert_eq!(p.generate(&input(&h, "/p?a=1")).hash, None);
        assert_eq!(p.generate(&input(&h, "/p")).hash, None);
    }
}
