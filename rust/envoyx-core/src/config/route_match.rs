//! A route's `match`: which requests a route takes.

use regex::Regex;

use super::matcher::map_safe_regex;
use super::reader::Obj;

#[derive(Debug)]
pub struct RouteMatch {
    pub path: PathMatch,
    /// `case_sensitive` (default true; regexes are not affected, as in Envoy).
    pub case_sensitive: bool,
}

#[derive(Debug)]
pub enum PathMatch {
    /// `match.prefix`.
    Prefix(String),
    /// `match.path`: the whole path without the query string.
    Path(String),
    /// `match.safe_regex.regex`, anchored: it must match the whole path without query.
    Regex(Regex),
    /// `match.connect_matcher`: CONNECT requests (looked up with an empty path,
    /// since they have none), and only those.
    Connect,
}

/// `match`.
pub fn map_route_match(m: &Obj<'_>) -> Option<RouteMatch> {
    let case_sensitive = m.bool("case_sensitive").unwrap_or(true);
    let path = if let Some(p) = m.str("prefix") {
        PathMatch::Prefix(p.to_string())
    } else if let Some(p) = m.str("path") {
        PathMatch::Path(p.to_string())
    } else if let Some(sr) = m.obj("safe_regex") {
        PathMatch::Regex(map_safe_regex(&sr)?)
    } else if m.obj("connect_matcher").is_some() {
        PathMatch::Connect
    } else {
        m.errors().push(
            m.path(),
            "one of prefix, path, safe_regex or connect_matcher is required by envoyx",
        );
        return None;
    };
    Some(RouteMatch {
        path,
        case_sensitive,
    })
}
