//! Scoped routes at run time (Envoy's `ScopedConfigImpl`): the request's scope key,
//! built from its headers, picks the route table. Only connection managers with
//! `scoped_routes` reach this file; the others keep their one table.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderMap;
use serde_json::Value;

use super::RouteTable;
use crate::config::scoped_route::{
    Extract, HeaderValueExtractor, ScopeConfig, ScopeKeyBuilder, ScopeRoute, ScopedRoutesConfig,
    ScopesSource,
};
use crate::stats::{Counter, Gauge, StatStore};

/// A connection manager's `scoped_routes`, at run time.
pub struct ScopedRoutes {
    /// `scoped_routes.name`.
    pub name: String,
    pub builder: Arc<ScopeKeyBuilder>,
    /// The scopes in force: SRDS replaces them (and RDS their tables).
    pub table: ArcSwap<ScopeTable>,
    /// Inline scopes as configured (`/config_dump`); None for SRDS.
    pub inline: Option<Vec<Value>>,
    /// `http.<stat_prefix>.scoped_rds.<name>.*` that the core keeps (the
    /// subscription's `update_*` counters are the xDS client's); SRDS only.
    pub stats: Option<SrdsStats>,
}

/// Envoy's `ALL_SCOPED_RDS_STATS`.
pub struct SrdsStats {
    pub config_reload: Counter,
    pub config_reload_time_ms: Gauge,
    pub all_scopes: Gauge,
    pub active_scopes: Gauge,
}

impl ScopedRoutes {
    pub fn new(config: ScopedRoutesConfig, store: &StatStore, stat_prefix: &str) -> Self {
        let builder = Arc::new(config.key_builder);
        let (scopes, inline, stats) = match config.scopes {
            ScopesSource::Inline(scopes) => {
                let raw = scopes.iter().map(|s| s.raw.clone()).collect();
                let scopes = scopes
                    .into_iter()
                    .map(
                        |ScopeConfig {
                             name, key, route, ..
                         }| Scope {
                            name,
                            key,
                            table: match route {
                                ScopeRoute::Inline(rc) => RouteTable::new(rc),
                                ScopeRoute::Rds(name) => RouteTable::empty(&name),
                            },
                        },
                    )
                    .collect();
                (scopes, Some(raw), None)
            }
            ScopesSource::Srds => {
                let prefix = format!("http.{stat_prefix}.scoped_rds.{}.", config.name);
                let c = |n: &str| store.counter(&format!("{prefix}{n}"));
                let g = |n: &str| store.gauge(&format!("{prefix}{n}"));
                // Registered at zero as Envoy shows them: no on-demand scope, no
                // empty update (the xDS client never hands one over).
                g("on_demand_scopes");
                c("update_empty");
                let stats = SrdsStats {
                    config_reload: c("config_reload"),
                    config_reload_time_ms: g("config_reload_time_ms"),
                    all_scopes: g("all_scopes"),
                    active_scopes: g("active_scopes"),
                };
                (Vec::new(), None, Some(stats))
            }
        };
        ScopedRoutes {
            name: config.name,
            table: ArcSwap::new(ScopeTable::new(builder.clone(), scopes)),
            builder,
            inline,
            stats,
        }
    }

    /// Whether the scopes come by SRDS.
    pub fn is_srds(&self) -> bool {
        self.inline.is_none()
    }
}

/// One scope: its key and its route table.
#[derive(Debug)]
pub struct Scope {
    pub name: String,
    pub key: Vec<String>,
    /// The scope's route table; an empty one while its RDS table has not arrived
    /// (Envoy's `NullConfigImpl`: every request gets 404).
    pub table: Arc<RouteTable>,
}

/// A connection manager's scopes, compiled: looked up by the hash of a key.
#[derive(Debug)]
pub struct ScopeTable {
    builder: Arc<ScopeKeyBuilder>,
    scopes: Vec<Scope>,
    by_key: HashMap<u64, usize>,
    /// The table of a request whose key matches no scope (or cannot be built).
    none: Arc<RouteTable>,
}

impl ScopeTable {
    /// Scopes with the same key: the later one wins, as Envoy's
    /// `addOrUpdateRoutingScopes` leaves it (SRDS refuses such updates earlier).
    pub fn new(builder: Arc<ScopeKeyBuilder>, scopes: Vec<Scope>) -> Arc<Self> {
        let by_key = scopes
            .iter()
            .enumerate()
            .map(|(i, s)| (key_hash(s.key.iter().map(|k| k.as_bytes())), i))
            .collect();
        Arc::new(ScopeTable {
            builder,
            scopes,
            by_key,
            none: RouteTable::empty(""),
        })
    }

    pub fn scopes(&self) -> &[Scope] {
        &self.scopes
    }

    /// The route table for a request's headers.
    pub fn find(&self, headers: &HeaderMap) -> &Arc<RouteTable> {
        self.scope(headers).map_or(&self.none, |s| &s.table)
    }

    /// The scope whose key the headers build, if any.
    pub fn scope(&self, headers: &HeaderMap) -> Option<&Scope> {
        let fragments = &self.builder.fragments;
        let mut hasher = DefaultHasher::new();
        for f in fragments {
            fragment(f, headers)?.hash(&mut hasher);
        }
        let scope = &self.scopes[*self.by_key.get(&hasher.finish())?];
        // The hash picked it; the key decides (Envoy trusts the 64-bit hash alone).
        let same = scope.key.len() == fragments.len()
            && fragments
                .iter()
                .zip(&scope.key)
                .all(|(f, k)| fragment(f, headers) == Some(k.as_bytes()));
        same.then_some(scope)
    }
}

/// The hash of a key's fragments, as [`ScopeTable::scope`] computes it.
fn key_hash<'k>(fragments: impl Iterator<Item = &'k [u8]>) -> u64 {
    let mut hasher = DefaultHasher::new();
    for f in fragments {
        f.hash(&mut hasher);
    }
    hasher.finish()
}

/// One fragment of the key (Envoy's `HeaderValueExtractorImpl::computeFragment`):
/// the header's first value, split by `element_separator`; the element at `index`,
/// or the value of the first `key<separator>value` element whose key matches. None
/// when the header is absent or nothing matches: then no scope does.
fn fragment<'h>(f: &'h HeaderValueExtractor, headers: &'h HeaderMap) -> Option<&'h [u8]> {
    let value = headers.get(&f.name)?.as_bytes();
    let sep = f.element_separator.as_bytes();
    match &f.extract {
        Extract::Index(index) if sep.is_empty() => (*index == 0).then_some(value),
        Extract::Index(index) => split(value, sep).nth(*index),
        Extract::Element { key, separator } => {
            let kv = |element: &'h [u8]| {
                // absl::StrSplit(element, MaxSplits(separator, 1)): no separator
                // gives the whole element as the key and an empty value.
                let (k, v) = match find(element, separator.as_bytes()) {
                    Some(at) => (&element[..at], &element[at + separator.len()..]),
                    None => (element, &element[element.len()..]),
                };
                (k == key.as_bytes()).then_some(v)
            };
            if sep.is_empty() {
                kv(value)
            } else {
                split(value, sep).find_map(kv)
            }
        }
    }
}

/// `value` split at every `sep` (absl::StrSplit by a string: empty pieces kept).
fn split<'v>(value: &'v [u8], sep: &'v [u8]) -> impl Iterator<Item = &'v [u8]> {
    let mut rest = Some(value);
    std::iter::from_fn(move || {
        let r = rest?;
        match find(r, sep) {
            Some(at) => {
                rest = Some(&r[at + sep.len()..]);
                Some(&r[..at])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extractor(name: &str, sep: &str, extract: Extract) -> HeaderValueExtractor {
        HeaderValueExtractor {
            name: http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            element_separator: sep.into(),
            extract,
        }
    }

    fn table(fragments: Vec<HeaderValueExtractor>, keys: &[(&str, &[&str])]) -> Arc<ScopeTable> {
        let scopes = keys
            .iter()
            .map(|(name, key)| Scope {
                name: name.to_string(),
                key: key.iter().map(|k| k.to_string()).collect(),
                table: RouteTable::empty(name),
            })
            .collect();
        ScopeTable::new(Arc::new(ScopeKeyBuilder { fragments }), scopes)
    }

    fn pick(t: &ScopeTable, headers: &[(&str, &str)]) -> Option<String> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        t.scope(&map).map(|s| s.name.clone())
    }

    #[test]
    fn fragments_by_element_and_index_in_order() {
        let element = Extract::Element {
            key: "bar".into(),
            separator: "=".into(),
        };
        let t = table(
            vec![
                extractor("x-foo", ";", element),
                extractor("x-baz", ",", Extract::Index(1)),
            ],
            &[("ab", &["a", "b"]), ("ba", &["b", "a"])],
        );
        let p = |h: &[(&str, &str)]| pick(&t, h);
        assert_eq!(
            p(&[("x-foo", "x=1;bar=a"), ("x-baz", "q,b")]).as_deref(),
            Some("ab")
        );
        assert_eq!(
            p(&[("x-foo", "bar=b"), ("x-baz", "q,a,z")]).as_deref(),
            Some("ba")
        );
        // The order of the fragments counts.
        assert_eq!(p(&[("x-foo", "bar=b"), ("x-baz", "q,b")]), None);
        // A missing header or element builds no key.
        assert_eq!(p(&[("x-foo", "bar=a")]), None);
        assert_eq!(p(&[("x-foo", "bar=a"), ("x-baz", "q")]), None);
        // Only the first value of a header counts; elements are not trimmed.
        assert_eq!(
            p(&[("x-foo", "bar=a"), ("x-foo", "bar=b"), ("x-baz", "q,b")]).as_deref(),
            Some("ab")
        );
        assert_eq!(p(&[("x-foo", "x=1; bar=a"), ("x-baz", "q,b")]), None);
        // The value is what follows the first separator.
        assert_eq!(p(&[("x-foo", "bar=a=c"), ("x-baz", "q,b")]), None);
    }

    #[test]
    fn a_whole_value_and_empty_elements() {
        let t = table(
            vec![extractor("x-k", "", Extract::Index(0))],
            &[("whole", &["a,b"]), ("empty", &[""])],
        );
        assert_eq!(pick(&t, &[("x-k", "a,b")]).as_deref(), Some("whole"));
        assert_eq!(pick(&t, &[("x-k", "")]).as_deref(), Some("empty"));
        let t = table(
            vec![extractor("x-k", ",", Extract::Index(2))],
            &[("third", &[""])],
        );
        assert_eq!(pick(&t, &[("x-k", "a,b,")]).as_deref(), Some("third"));
        assert_eq!(pick(&t, &[("x-k", "a,b")]), None);
        // An element without its separator is a key with an empty value.
        let element = Extract::Element {
            key: "k".into(),
            separator: "=".into(),
        };
        let t = table(vec![extractor("x-k", ";", element)], &[("bare", &[""])]);
        assert_eq!(pick(&t, &[("x-k", "a=1;k")]).as_deref(), Some("bare"));
    }
}
