//! Path rewriting shared by forwarding routes and redirects, and the `location`
//! of a redirect (Envoy's `RouteEntryImplBase::newUri`).

use crate::config::PathMatch;
use crate::config::route_action::{PathRewrite, Redirect};

/// The path without its query and fragment (Envoy's `removeQueryAndFragment`).
pub fn path_only(path: &str) -> &str {
    match path.find(['?', '#']) {
        Some(i) => &path[..i],
        None => path,
    }
}

/// How much of `path` the route's match covers (Envoy's `matched_path`): the
/// prefix or exact path, else the whole path without its query.
fn matched_len(matched: &PathMatch, path: &str) -> usize {
    let len = match matched {
        PathMatch::Prefix(p) | PathMatch::Path(p) | PathMatch::PathSeparatedPrefix(p) => p.len(),
        PathMatch::Regex(_) | PathMatch::Template(_) | PathMatch::Connect => path_only(path).len(),
    };
    len.min(path.len())
}

/// The path after `rewrite` (None: unchanged).
pub fn rewrite_path(rewrite: &PathRewrite, matched: &PathMatch, path: &str) -> Option<String> {
    match rewrite {
        PathRewrite::Prefix(p) => {
            let n = matched_len(matched, path);
            Some(format!("{p}{}", &path[n..]))
        }
        PathRewrite::Regex(re) => {
            let just = path_only(path);
            Some(format!("{}{}", re.replace_all(just), &path[just.len()..]))
        }
    }
}

/// What a redirect needs to know of the request.
pub struct RequestUrl<'a> {
    /// The request's scheme (`:scheme`, else the connection's).
    pub scheme: &'a str,
    /// `x-forwarded-proto` as the connection manager leaves it.
    pub forwarded_proto: &'a str,
    /// `Host` / `:authority`.
    pub host: &'a str,
    /// The path with its query.
    pub path: &'a str,
}

/// The `location` of a redirect (or of a 201/3xx direct response).
pub fn location(r: &Redirect, matched: &PathMatch, req: &RequestUrl<'_>) -> String {
    if r.ssl_redirect {
        return format!("https://{}{}", req.host, req.path);
    }
    let scheme = r.scheme.as_deref().unwrap_or(req.scheme);
    let port = r.port.as_deref().unwrap_or("");
    let host = match &r.host {
        Some(h) => h.as_str(),
        None => request_host(req, scheme, port),
    };
    // The redirect's own rewrite of the request's path comes first.
    let rewritten = match &r.rewrite {
        Some(PathRewrite::Regex(re)) => {
            let just = path_only(req.path);
            let replaced = re.replace_all(just);
            // An empty result counts as no rewrite, as in Envoy.
            (!replaced.is_empty()).then(|| format!("{replaced}{}", &req.path[just.len()..]))
        }
        Some(rw) => rewrite_path(rw, matched, req.path),
        None => None,
    };
    let current = rewritten.as_deref().unwrap_or(req.path);
    let mut path = match &r.path {
        // A query in path_redirect wins over the request's and is never stripped.
        Some(p) if r.path_has_query => p.clone(),
        Some(p) => match current.find('?') {
            Some(q) => format!("{p}{}", &current[q..]),
            None => p.clone(),
        },
        None => current.to_string(),
    };
    if !path.starts_with('/') {
        path.insert(0, '/');
    }
    if !r.path_has_query
        && r.strip_query
        && let Some(q) = path.find('?')
    {
        path.truncate(q);
    }
    format!("{scheme}://{host}{port}{path}")
}

/// The request's host for the redirect: without its port when a new port is
/// set, or when the scheme changes and the port was the old scheme's default
/// (Envoy's `processRequestHost`).
fn request_host<'a>(req: &RequestUrl<'a>, new_scheme: &str, new_port: &str) -> &'a str {
    let host = req.host;
    if host.is_empty() {
        return host;
    }
    let port_start = if host.starts_with('[') {
        host.rfind("]:").map(|i| i + 1)
    } else {
        host.rfind(':')
    };
    let Some(i) = port_start else {
        return host;
    };
    let port = &host[i..];
    let proto = req.forwarded_proto;
    let mut remove = !new_port.is_empty();
    if new_scheme != proto {
        remove |= proto == "https" && port == ":443";
        remove |= proto == "http" && port == ":80";
    }
    if remove { &host[..i] } else { host }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(host: &'a str, path: &'a str) -> RequestUrl<'a> {
        RequestUrl {
            scheme: "http",
            forwarded_proto: "http",
            host,
            path,
        }
    }

    #[test]
    fn https_redirect_drops_the_default_port() {
        let r = Redirect {
            scheme: Some("https".into()),
            ..Default::default()
        };
        let m = PathMatch::Prefix("/".into());
        assert_eq!(
            location(&r, &m, &req("a.com:80", "/x?y")),
            "https://a.com/x?y"
        );
        assert_eq!(
            location(&r, &m, &req("a.com:8080", "/x")),
            "https://a.com:8080/x"
        );
    }

    #[test]
    fn path_redirect_keeps_or_replaces_the_query() {
        let m = PathMatch::Prefix("/".into());
        let keep = Redirect {
            path: Some("/new".into()),
            ..Default::default()
        };
        assert_eq!(
            location(&keep, &m, &req("h", "/old?q=1")),
            "http://h/new?q=1"
        );
        let strip = Redirect {
            path: Some("/new".into()),
            strip_query: true,
            ..Default::default()
        };
        assert_eq!(location(&strip, &m, &req("h", "/old?q=1")), "http://h/new");
        let own = Redirect {
            path: Some("/new?a=b".into()),
            path_has_query: true,
            strip_query: true,
            ..Default::default()
        };
        assert_eq!(
            location(&own, &m, &req("h", "/old?q=1")),
            "http://h/new?a=b"
        );
    }
}
