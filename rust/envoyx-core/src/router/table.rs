//! Route tables compiled when configuration is applied; a request only does lookups.
//!
//! Virtual host selection follows Envoy's precedence: an exact domain, then the
//! longest `*.suffix` wildcard, then the longest `prefix.*` wildcard, then `*`.
//! Within a virtual host the first matching route wins.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{RouteAction, RouteConfig, RouteEntry, VirtualHostConfig};

#[derive(Debug)]
pub struct VirtualHost {
    pub name: String,
    pub routes: Vec<RouteEntry>,
}

#[derive(Debug)]
pub struct RouteTable {
    pub name: String,
    vhosts: Vec<VirtualHost>,
    exact: HashMap<String, usize>,
    /// `*.example.com` as `.example.com` → vhost, grouped by suffix length, longest
    /// first: a lookup costs one hash probe per distinct length, as in Envoy.
    suffixes: WildcardTable,
    /// `example.*` as `example.` → vhost, grouped the same way.
    prefixes: WildcardTable,
    default: Option<usize>,
    /// Every cluster the routes name, once each; a route's `cluster_slot` indexes it.
    pub cluster_names: Vec<String>,
}

impl RouteTable {
    pub fn new(config: RouteConfig) -> Arc<Self> {
        let mut table = RouteTable {
            name: config.name,
            vhosts: Vec::with_capacity(config.virtual_hosts.len()),
            exact: HashMap::new(),
            suffixes: WildcardTable::default(),
            prefixes: WildcardTable::default(),
            default: None,
            cluster_names: Vec::new(),
        };
        let mut slots: HashMap<String, usize> = HashMap::new();
        for (
            i,
            VirtualHostConfig {
                name,
                domains,
                routes,
            },
        ) in config.virtual_hosts.into_iter().enumerate()
        {
            for d in domains {
                if d == "*" {
                    table.default = Some(i);
                } else if let Some(suffix) = d.strip_prefix('*') {
                    table.suffixes.insert(suffix, i);
                } else if let Some(prefix) = d.strip_suffix('*') {
                    table.prefixes.insert(prefix, i);
                } else {
                    table.exact.insert(d, i);
                }
            }
            let mut routes = routes;
            for route in &mut routes {
                if let RouteAction::Forward(f) = &mut route.action {
                    f.cluster_slot = *slots.entry(f.cluster.clone()).or_insert_with(|| {
                        table.cluster_names.push(f.cluster.clone());
                        table.cluster_names.len() - 1
                    });
                }
            }
            table.vhosts.push(VirtualHost { name, routes });
        }
        Arc::new(table)
    }

    /// A table without virtual hosts (every request gets 404), for an RDS listener
    /// until its route configuration arrives.
    pub fn empty(name: &str) -> Arc<Self> {
        RouteTable::new(RouteConfig {
            name: name.to_string(),
            virtual_hosts: Vec::new(),
            validate_clusters: None,
            raw: serde_json::Value::Null,
        })
    }

    /// The virtual host for a `Host`/`:authority` value.
    pub fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        let lowered;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        let index = self
            .exact
            .get(host)
            .copied()
            .or_else(|| self.suffixes.find(host, |len| host.get(host.len() - len..)))
            .or_else(|| self.prefixes.find(host, |len| host.get(..len)))
            .or(self.default)?;
        Some(&self.vhosts[index])
    }

    /// The first route of the selected virtual host matching `path` (with its query).
    pub fn find(&self, host: &str, path: &str) -> Option<&RouteEntry> {
        let vhost = self.virtual_host(host)?;
        vhost.routes.iter().find(|r| r.route_match.matches(path))
    }
}

/// Wildcard domains by the length of their fixed part, longest length first.
#[derive(Debug, Default)]
struct WildcardTable(Vec<(usize, HashMap<String, usize>)>);

impl WildcardTable {
    fn insert(&mut self, fixed: &str, vhost: usize) {
        let len = fixed.len();
        let pos = match self.0.binary_search_by(|(l, _)| len.cmp(l)) {
            Ok(pos) => pos,
            Err(pos) => {
                self.0.insert(pos, (len, HashMap::new()));
                pos
            }
        };
        // The first virtual host naming a domain keeps it (duplicates are rejected
        // when the configuration is mapped).
        self.0[pos].1.entry(fixed.to_string()).or_insert(vhost);
    }

    /// `part(len)` cuts the host's candidate fixed part; the wildcard itself must
    /// match at least one character, so the host must be longer than `len`.
    fn find<'h>(&self, host: &'h str, part: impl Fn(usize) -> Option<&'h str>) -> Option<usize> {
        self.0
            .iter()
            .filter(|(len, _)| host.len() > *len)
            .find_map(|(len, map)| part(*len).and_then(|p| map.get(p)).copied())
    }
}

/// The upstream cluster a route forwards to, if it forwards.
pub fn cluster_of(route: &RouteEntry) -> Option<&str> {
    match &route.action {
        RouteAction::Forward(f) => Some(&f.cluster),
        RouteAction::Direct { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ForwardAction, PathMatch, RouteMatch};

    fn route(m: PathMatch, cluster: &str) -> RouteEntry {
        RouteEntry {
            name: String::new(),
            route_match: RouteMatch {
                path: m,
                case_sensitive: true,
            },
            action: RouteAction::Forward(ForwardAction {
                cluster: cluster.into(),
                cluster_slot: 0,
                timeout: None,
                expected_timeout: None,
                prefix_rewrite: None,
                host_rewrite: None,
                retry_policy: None,
                hedge_policy: Default::default(),
                include_attempt_count_in_request: false,
                include_attempt_count_in_response: false,
                retry_buffer_limit: 0,
                idle_timeout: None,
                upgrades: None,
                hash_policy: None,
                stream_duration: None,
            }),
            filter_overrides: Vec::new(),
        }
    }

    fn vhost(name: &str, domains: &[&str]) -> VirtualHostConfig {
        VirtualHostConfig {
            name: name.into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            routes: vec![route(PathMatch::Prefix("/".into()), name)],
        }
    }

    fn table(vhosts: Vec<VirtualHostConfig>) -> Arc<RouteTable> {
        RouteTable::new(RouteConfig {
            name: "t".into(),
            virtual_hosts: vhosts,
            validate_clusters: None,
            raw: serde_json::Value::Null,
        })
    }

    #[test]
    fn domain_precedence_exact_suffix_prefix_default() {
        let t = table(vec![
            vhost("default", &["*"]),
            vhost("prefix", &["api.*"]),
            vhost("short_suffix", &["*.com"]),
            vhost("suffix", &["*.example.com"]),
            vhost("exact", &["api.example.com"]),
        ]);
        let name = |h: &str| t.virtual_host(h).map(|v| v.name.clone());
        assert_eq!(name("api.example.com").as_deref(), Some("exact"));
        assert_eq!(name("API.Example.com").as_deref(), Some("exact"));
        assert_eq!(name("www.example.com").as_deref(), Some("suffix"));
        assert_eq!(name("www.other.com").as_deref(), Some("short_suffix"));
        assert_eq!(name("api.other.org").as_deref(), Some("prefix"));
        assert_eq!(name("something.else").as_deref(), Some("default"));
        // A wildcard must match at least one character.
        assert_eq!(name(".example.com").as_deref(), Some("short_suffix"));
    }

    #[test]
    fn no_default_means_no_virtual_host() {
        let t = table(vec![vhost("exact", &["a.b"])]);
        assert!(t.virtual_host("c.d").is_none());
    }

    #[test]
    fn first_matching_route_wins() {
        let t = table(vec![VirtualHostConfig {
            name: "v".into(),
            domains: vec!["*".into()],
            routes: vec![
                route(PathMatch::Path("/exact".into()), "path"),
                route(
                    PathMatch::Regex(regex::Regex::new("^(?:/re/[0-9]+)$").unwrap()),
                    "regex",
                ),
                route(PathMatch::Prefix("/api".into()), "prefix"),
            ],
        }]);
        let cluster = |p: &str| t.find("h", p).and_then(cluster_of).map(str::to_string);
        assert_eq!(cluster("/exact").as_deref(), Some("path"));
        assert_eq!(cluster("/exact?x=1").as_deref(), Some("path"));
        assert_eq!(cluster("/exactly"), None);
        assert_eq!(cluster("/re/123?q").as_deref(), Some("regex"));
        assert_eq!(cluster("/re/12a"), None);
        assert_eq!(cluster("/api/v1").as_deref(), Some("prefix"));
        assert_eq!(cluster("/other"), None);
    }
}
