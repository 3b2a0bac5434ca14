//! Route tables compiled when configuration is applied; a request only does lookups.
//!
//! Virtual host selection follows Envoy's precedence: an exact domain, then the
//! longest `*.suffix` wildcard, then the longest `prefix.*` wildcard, then `*`.
//! Within a virtual host the first matching route wins. Domains may name a port
//! (`example.com:8080`): then only a Host with that port matches them, unless the
//! route configuration's `ignore_port_in_host_matching` drops the request's port.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::route_action::ClusterSpecifier;
use crate::config::route_match::StripHostPort;
use crate::config::{RouteAction, RouteConfig, RouteEntry, VirtualHostConfig};

use super::route_match::RouteRequest;

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
    /// `ignore_port_in_host_matching`.
    ignore_port: bool,
    /// Every cluster the routes name, once each; a route's `cluster_slot` indexes it.
    pub cluster_names: Vec<String>,
    /// `internal_only_headers`, removed by the connection manager from requests that
    /// are not internal, with Envoy's other control headers.
    pub internal_only_headers: Vec<http::HeaderName>,
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
            ignore_port: config.ignore_port_in_host_matching,
            cluster_names: Vec::new(),
            internal_only_headers: config.internal_only_headers,
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
            let mut slot_of = |name: &str| {
                *slots.entry(name.to_string()).or_insert_with(|| {
                    table.cluster_names.push(name.to_string());
                    table.cluster_names.len() - 1
                })
            };
            for route in &mut routes {
                if let RouteAction::Forward(f) = &mut route.action {
                    f.cluster_slot = slot_of(&f.cluster);
                    // Weighted entries that name their cluster find it as a plain
                    // `cluster` does; `cluster_header` names stay per request.
                    if let Some(ClusterSpecifier::Weighted(w)) = f.cluster_specifier.as_deref_mut()
                    {
                        for entry in &mut w.clusters {
                            if let Some(name) = &entry.name {
                                entry.cluster_slot = slot_of(name);
                            }
                        }
                    }
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
            validate_clusters: false,
            ignore_port_in_host_matching: false,
            internal_only_headers: Vec::new(),
            raw: serde_json::Value::Null,
        })
    }

    /// The virtual host for a `Host`/`:authority` value.
    pub fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        let host = if self.ignore_port {
            port_start(host).map_or(host, |at| &host[..at])
        } else {
            host
        };
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

    /// The first route of the request's virtual host that matches it.
    pub fn find(&self, req: &RouteRequest<'_>) -> Option<&RouteEntry> {
        let vhost = self.virtual_host(req.authority)?;
        vhost.routes.iter().find(|r| r.route_match.matches(req))
    }
}

/// Where the port of a `Host` value starts (its `:`), if it has one: Envoy's
/// `HeaderUtility::getPortStart` (an IPv6 literal's colons are inside `[]`).
fn port_start(host: &str) -> Option<usize> {
    let colon = host.rfind(':')?;
    match host.rfind(']') {
        Some(v6_end) if v6_end > colon => None,
        _ => Some(colon),
    }
}

/// The connection manager's `strip_matching_host_port` / `strip_any_host_port`
/// (Envoy's `HeaderUtility::stripPortFromHost`): the host without its port, or
/// None when nothing is stripped. CONNECT keeps its port (RFC 2817).
pub fn strip_host_port<'h>(
    mode: StripHostPort,
    host: &'h str,
    method: &http::Method,
    listener_port: Option<u16>,
) -> Option<&'h str> {
    if mode == StripHostPort::No || method == http::Method::CONNECT {
        return None;
    }
    let at = port_start(host)?;
    let port: u32 = host[at + 1..].parse().ok()?;
    if mode == StripHostPort::Matching && Some(port) != listener_port.map(u32::from) {
        return None;
    }
    Some(&host[..at])
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
                conditions: None,
            },
            action: RouteAction::Forward(ForwardAction {
                cluster: cluster.into(),
                ..Default::default()
            }),
            filter_overrides: Vec::new(),
            header_mutations: None,
            metadata: None,
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
        table_with(vhosts, false)
    }

    fn table_with(vhosts: Vec<VirtualHostConfig>, ignore_port: bool) -> Arc<RouteTable> {
        RouteTable::new(RouteConfig {
            name: "t".into(),
            virtual_hosts: vhosts,
            validate_clusters: false,
            ignore_port_in_host_matching: ignore_port,
            internal_only_headers: Vec::new(),
            raw: serde_json::Value::Null,
        })
    }

    #[test]
    fn domains_with_ports() {
        let vhosts = || {
            vec![
                vhost("default", &["*"]),
                vhost("with_port", &["example.com:8080"]),
                vhost("without_port", &["example.com"]),
                vhost("wild_port", &["*.example.com:8080"]),
                vhost("v6", &["[::1]:8080"]),
            ]
        };
        let t = table(vhosts());
        let name = |t: &RouteTable, h: &str| t.virtual_host(h).map(|v| v.name.clone());
        assert_eq!(name(&t, "example.com:8080").as_deref(), Some("with_port"));
        assert_eq!(name(&t, "example.com").as_deref(), Some("without_port"));
        assert_eq!(name(&t, "example.com:9090").as_deref(), Some("default"));
        assert_eq!(name(&t, "a.example.com:8080").as_deref(), Some("wild_port"));
        assert_eq!(name(&t, "[::1]:8080").as_deref(), Some("v6"));
        let t = table_with(vhosts(), true);
        assert_eq!(
            name(&t, "example.com:9090").as_deref(),
            Some("without_port")
        );
        assert_eq!(name(&t, "[::1]").as_deref(), Some("default"));
    }

    #[test]
    fn stripping_host_ports() {
        let get = http::Method::GET;
        let s = |mode, host, port| strip_host_port(mode, host, &get, port);
        assert_eq!(s(StripHostPort::Any, "a.com:81", Some(80)), Some("a.com"));
        assert_eq!(s(StripHostPort::Matching, "a.com:81", Some(80)), None);
        assert_eq!(
            s(StripHostPort::Matching, "a.com:80", Some(80)),
            Some("a.com")
        );
        assert_eq!(s(StripHostPort::Any, "[::1]", None), None);
        assert_eq!(s(StripHostPort::Any, "[::1]:5", None), Some("[::1]"));
        assert_eq!(s(StripHostPort::Any, "a.com:x", None), None);
        assert_eq!(s(StripHostPort::No, "a.com:1", None), None);
        let connect = http::Method::CONNECT;
        assert_eq!(
            strip_host_port(StripHostPort::Any, "a:1", &connect, None),
            None
        );
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
        let headers = http::HeaderMap::new();
        let cluster = |p: &str| {
            let req = RouteRequest::new("h", p, &http::Method::GET, "http", &headers);
            t.find(&req).and_then(cluster_of).map(str::to_string)
        };
        assert_eq!(cluster("/exact").as_deref(), Some("path"));
        assert_eq!(cluster("/exact?x=1").as_deref(), Some("path"));
        assert_eq!(cluster("/exactly"), None);
        assert_eq!(cluster("/re/123?q").as_deref(), Some("regex"));
        assert_eq!(cluster("/re/12a"), None);
        assert_eq!(cluster("/api/v1").as_deref(), Some("prefix"));
        assert_eq!(cluster("/other"), None);
    }

    #[test]
    fn weighted_entries_share_the_cluster_slots_of_plain_clusters() {
        use crate::config::route_action::{ClusterWeight, WeightedClusters};
        let entry = |name: Option<&str>| ClusterWeight {
            name: name.map(str::to_string),
            cluster_header: name
                .is_none()
                .then(|| http::HeaderName::from_static("x-cluster")),
            weight: 1,
            host_rewrite: None,
            cluster_slot: usize::MAX,
            header_mutations: None,
            filter_overrides: Vec::new(),
        };
        let mut weighted = route(PathMatch::Prefix("/w".into()), "");
        if let RouteAction::Forward(f) = &mut weighted.action {
            f.cluster_specifier = Some(Box::new(ClusterSpecifier::Weighted(WeightedClusters {
                clusters: vec![entry(Some("a")), entry(Some("b")), entry(None)],
                total_weight: 3,
                header_name: None,
            })));
        }
        let t = table(vec![VirtualHostConfig {
            name: "v".into(),
            domains: vec!["*".into()],
            routes: vec![route(PathMatch::Prefix("/a".into()), "a"), weighted],
        }]);
        let RouteAction::Forward(f) = &t.vhosts[0].routes[1].action else {
            panic!("a forwarding route")
        };
        let Some(ClusterSpecifier::Weighted(w)) = f.cluster_specifier.as_deref() else {
            panic!("weighted clusters")
        };
        let slots: Vec<usize> = w.clusters.iter().map(|c| c.cluster_slot).collect();
        // `a` shares the plain route's slot; `b` gets its own; a `cluster_header`
        // entry gets none (its name is the request's).
        assert_eq!(t.cluster_names[slots[0]], "a");
        assert_eq!(t.cluster_names[slots[1]], "b");
        assert_eq!(slots[2], usize::MAX);
        assert_eq!(t.cluster_names.iter().filter(|n| *n == "a").count(), 1);
    }
}
