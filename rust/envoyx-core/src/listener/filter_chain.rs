//! A listener's filter chains (Envoy's `FilterChainManagerImpl`): each chain's
//! transport socket and terminal network filter, and the choice of a chain for a
//! new connection in Envoy's order of criteria — destination port, destination
//! IP, server name, transport protocol, application protocols, direct source IP,
//! source type, source IP, source port. At each criterion the most specific
//! matching value wins and the others drop out, with no backtracking, as in
//! Envoy's match tree; empty criteria match anything, least specifically.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::config::{CidrRange, FilterChainMatch, SourceType};
use crate::http::HttpConnectionManager;
use crate::tcp::TcpProxy;
use crate::tls::ServerTlsContext;

/// A chain's terminal network filter.
pub enum ChainFilter {
    Http(Arc<HttpConnectionManager>),
    Tcp(Arc<TcpProxy>),
}

pub struct FilterChain {
    pub name: String,
    pub matcher: FilterChainMatch,
    pub tls: Option<Arc<ServerTlsContext>>,
    /// `transport_socket_connect_timeout`.
    pub handshake_timeout: Option<Duration>,
    pub filter: ChainFilter,
    pub raw: Value,
    /// Fired when this chain's connections must drain: the listener is removed or
    /// replaced, or an LDS update changed this chain (Envoy's in-place filter chain
    /// update drains only the chains that changed).
    pub drain: tokio::sync::watch::Sender<bool>,
}

/// What a new connection offers to the match.
pub struct ConnectionFacts<'a> {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub server_name: Option<&'a str>,
    pub transport_protocol: &'a str,
    pub application_protocols: &'a [String],
}

pub struct FilterChains {
    pub chains: Vec<Arc<FilterChain>>,
    pub default: Option<Arc<FilterChain>>,
}

impl FilterChains {
    /// Every chain, the default one last.
    pub fn all(&self) -> impl Iterator<Item = &Arc<FilterChain>> {
        self.chains.iter().chain(&self.default)
    }

    /// The only chain when there is nothing to choose from (no criteria at all).
    pub fn single(&self) -> Option<&Arc<FilterChain>> {
        match (&self.chains[..], &self.default) {
            ([only], None) if only.matcher == FilterChainMatch::default() => Some(only),
            ([], Some(default)) => Some(default),
            _ => None,
        }
    }

    pub fn select(&self, facts: &ConnectionFacts<'_>) -> Option<&Arc<FilterChain>> {
        let mut candidates: Vec<&Arc<FilterChain>> = self.chains.iter().collect();
        let criteria: [&Criterion<'_>; 9] = [
            &|m| match m.destination_port {
                None => Some(0),
                Some(p) => (p == facts.local.port()).then_some(1),
            },
            &|m| cidr_score(&m.prefix_ranges, facts.local),
            &|m| server_name_score(&m.server_names, facts.server_name),
            &|m| match &m.transport_protocol {
                None => Some(0),
                Some(t) => (t == facts.transport_protocol).then_some(1),
            },
            // The client's order decides: the chain with its first protocol wins.
            &|m| {
                if m.application_protocols.is_empty() {
                    return Some(0);
                }
                let offered = facts.application_protocols;
                offered
                    .iter()
                    .position(|p| m.application_protocols.contains(p))
                    .map(|i| (offered.len() - i) as u32)
            },
            &|m| cidr_score(&m.direct_source_prefix_ranges, facts.remote),
            &|m| source_type_score(m.source_type, facts),
            &|m| cidr_score(&m.source_prefix_ranges, facts.remote),
            &|m| {
                if m.source_ports.is_empty() {
                    Some(0)
                } else {
                    m.source_ports.contains(&facts.remote.port()).then_some(1)
                }
            },
        ];
        for score in criteria {
            let scored: Vec<(u32, &Arc<FilterChain>)> = candidates
                .iter()
                .filter_map(|c| score(&c.matcher).map(|s| (s, *c)))
                .collect();
            let Some(best) = scored.iter().map(|(s, _)| *s).max() else {
                candidates.clear();
                break;
            };
            candidates = scored
                .into_iter()
                .filter(|(s, _)| *s == best)
                .map(|(_, c)| c)
                .collect();
        }
        candidates.first().copied().or(self.default.as_ref())
    }
}

/// How specifically a chain's match meets one criterion: None when it does not,
/// 0 for an empty (any) value, more for more specific values.
type Criterion<'a> = dyn Fn(&FilterChainMatch) -> Option<u32> + 'a;

/// 0 for no ranges, 1 + the longest matching prefix, None when none matches.
fn cidr_score(ranges: &[CidrRange], addr: SocketAddr) -> Option<u32> {
    if ranges.is_empty() {
        return Some(0);
    }
    ranges
        .iter()
        .filter(|r| r.contains(addr.ip()))
        .map(|r| 1 + u32::from(r.prefix_len))
        .max()
}

/// Exact names beat `*.suffix` wildcards, longer suffixes beat shorter ones.
fn server_name_score(names: &[String], sni: Option<&str>) -> Option<u32> {
    if names.is_empty() {
        return Some(0);
    }
    let sni = sni?;
    names
        .iter()
        .filter_map(|n| match n.strip_prefix('*') {
            // `*.example.com` covers any name ending in `.example.com`.
            Some(suffix) => (sni.len() > suffix.len() && sni.ends_with(suffix))
                .then_some(1 + suffix.len() as u32),
            None => (n == sni).then_some(u32::MAX),
        })
        .max()
}

fn source_type_score(t: SourceType, facts: &ConnectionFacts<'_>) -> Option<u32> {
    let local = facts.remote.ip().is_loopback() || facts.remote.ip() == facts.local.ip();
    match t {
        SourceType::Any => Some(0),
        SourceType::SameIpOrLoopback => local.then_some(1),
        SourceType::External => (!local).then_some(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(name: &str, m: FilterChainMatch) -> Arc<FilterChain> {
        // A TCP proxy needs a cluster manager; the match never looks at the filter.
        let store = crate::stats::StatStore::new();
        let cm = crate::upstream::ClusterManager::new(&[], &store, Default::default()).unwrap();
        let tcp = TcpProxy::new(
            crate::config::TcpProxyConfig {
                stat_prefix: name.into(),
                cluster: "c".into(),
                access_logs: vec![],
            },
            cm,
            &store,
            crate::access_log::AccessLogOptions {
                workers: 1,
                flush: Default::default(),
            },
        )
        .unwrap();
        Arc::new(FilterChain {
            name: name.into(),
            matcher: m,
            tls: None,
            handshake_timeout: None,
            filter: ChainFilter::Tcp(tcp),
            raw: Value::Null,
            drain: tokio::sync::watch::channel(false).0,
        })
    }

    fn facts<'a>(sni: Option<&'a str>, tp: &'a str, alpn: &'a [String]) -> ConnectionFacts<'a> {
        ConnectionFacts {
            local: "127.0.0.1:443".parse().unwrap(),
            remote: "127.0.0.1:5000".parse().unwrap(),
            server_name: sni,
            transport_protocol: tp,
            application_protocols: alpn,
        }
    }

    #[test]
    fn most_specific_server_name_then_transport_then_default() {
        let chains = FilterChains {
            chains: vec![
                chain(
                    "wild",
                    FilterChainMatch {
                        server_names: vec!["*.example.com".into()],
                        ..Default::default()
                    },
                ),
                chain(
                    "exact",
                    FilterChainMatch {
                        server_names: vec!["api.example.com".into()],
                        ..Default::default()
                    },
                ),
                chain(
                    "deeper",
                    FilterChainMatch {
                        server_names: vec!["*.eu.example.com".into()],
                        ..Default::default()
                    },
                ),
                chain(
                    "plain",
                    FilterChainMatch {
                        transport_protocol: Some("raw_buffer".into()),
                        ..Default::default()
                    },
                ),
            ],
            default: Some(chain("default", FilterChainMatch::default())),
        };
        let pick = |sni, tp| chains.select(&facts(sni, tp, &[])).map(|c| c.name.clone());
        assert_eq!(
            pick(Some("api.example.com"), "tls").as_deref(),
            Some("exact")
        );
        assert_eq!(
            pick(Some("www.example.com"), "tls").as_deref(),
            Some("wild")
        );
        assert_eq!(
            pick(Some("a.b.example.com"), "tls").as_deref(),
            Some("wild")
        );
        assert_eq!(
            pick(Some("x.eu.example.com"), "tls").as_deref(),
            Some("deeper")
        );
        assert_eq!(pick(None, "raw_buffer").as_deref(), Some("plain"));
        // No name, TLS: the name-less chains remain, none takes tls → default.
        assert_eq!(pick(None, "tls").as_deref(), Some("default"));
        // A name none of the chains has: only the name-less chain is left.
        assert_eq!(
            pick(Some("other.org"), "raw_buffer").as_deref(),
            Some("plain")
        );
    }

    #[test]
    fn longest_prefix_and_application_protocols() {
        let r = |a: &str, l| CidrRange {
            address: a.parse().unwrap(),
            prefix_len: l,
        };
        let chains = FilterChains {
            chains: vec![
                chain(
                    "wide",
                    FilterChainMatch {
                        source_prefix_ranges: vec![r("127.0.0.0", 8)],
                        ..Default::default()
                    },
                ),
                chain(
                    "narrow",
                    FilterChainMatch {
                        source_prefix_ranges: vec![r("127.0.0.1", 32)],
                        application_protocols: vec!["h2".into()],
                        ..Default::default()
                    },
                ),
            ],
            default: None,
        };
        let h2 = vec!["h2".to_string()];
        let pick = |alpn: &[String]| {
            chains
                .select(&facts(None, "tls", alpn))
                .map(|c| c.name.clone())
        };
        // application_protocols is decided before source ranges: with h2 the
        // narrow chain wins; without, only the wide chain is left.
        assert_eq!(pick(&h2).as_deref(), Some("narrow"));
        assert_eq!(pick(&[]).as_deref(), Some("wide"));
    }
}
