//! Matching a request against a route's `match`.

use crate::config::{PathMatch, RouteMatch};

impl RouteMatch {
    /// Whether a request for `path_and_query` takes this route.
    pub fn matches(&self, path_and_query: &str) -> bool {
        let path = path_and_query
            .split_once('?')
            .map_or(path_and_query, |(p, _)| p);
        match &self.path {
            PathMatch::Prefix(prefix) => {
                if self.case_sensitive {
                    path_and_query.starts_with(prefix.as_str())
                } else {
                    path_and_query.len() >= prefix.len()
                        && path_and_query.as_bytes()[..prefix.len()]
                            .eq_ignore_ascii_case(prefix.as_bytes())
                }
            }
            PathMatch::Path(exact) => {
                if self.case_sensitive {
                    path == exact
                } else {
                    path.eq_ignore_ascii_case(exact)
                }
            }
            PathMatch::Regex(re) => re.is_match(path),
            PathMatch::Connect => path_and_query.is_empty(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_insensitive_prefix() {
        let m = RouteMatch {
            path: PathMatch::Prefix("/API".into()),
            case_sensitive: false,
        };
        assert!(m.matches("/api/x"));
        assert!(!m.matches("/ap"));
    }
}
