//! Scoped routes: the connection manager's `scoped_routes`
//! (`envoy.extensions.filters.network.http_connection_manager.v3.ScopedRoutes`) and
//! the `envoy.config.route.v3.ScopedRouteConfiguration` resources it uses, inline or
//! over SRDS. A request's scope key is built from its headers by the key builder's
//! fragments; the scope whose `key` equals it gives the route configuration.
//! Envoy's semantics: `source/common/router/scoped_config_impl.cc`, `scoped_rds.cc`.

use http::HeaderName;
use serde_json::Value;

use super::reader::Obj;
use super::route::{RouteConfig, map_inline_route_config};

/// `scoped_routes` of a connection manager.
#[derive(Debug)]
pub struct ScopedRoutesConfig {
    /// `name`: the scoped route set's name (`/config_dump`, the SRDS stat prefix
    /// `http.<stat_prefix>.scoped_rds.<name>.`).
    pub name: String,
    pub key_builder: ScopeKeyBuilder,
    pub scopes: ScopesSource,
}

#[derive(Debug)]
pub enum ScopesSource {
    /// `scoped_route_configurations_list`: each scope with its inline route table.
    Inline(Vec<ScopeConfig>),
    /// `scoped_rds`: the scopes arrive as ScopedRouteConfiguration resources, their
    /// route tables by RDS (`rds_config_source`, read by the Python xDS client).
    Srds,
}

/// `scope_key_builder`: one fragment per `fragments` entry, in order.
#[derive(Debug, Clone)]
pub struct ScopeKeyBuilder {
    pub fragments: Vec<HeaderValueExtractor>,
}

/// `fragments[].header_value_extractor`.
#[derive(Debug, Clone)]
pub struct HeaderValueExtractor {
    /// `name`: the header whose first value is read.
    pub name: HeaderName,
    /// `element_separator`: splits the value into elements (empty: one element).
    pub element_separator: String,
    pub extract: Extract,
}

#[derive(Debug, Clone)]
pub enum Extract {
    /// `index`: the element at this position.
    Index(usize),
    /// `element`: the value of the first element `<key><separator><value>`.
    Element { key: String, separator: String },
}

/// One `ScopedRouteConfiguration`.
#[derive(Debug)]
pub struct ScopeConfig {
    pub name: String,
    /// `key.fragments[].string_key`, in order.
    pub key: Vec<String>,
    pub route: ScopeRoute,
    /// The resource as given (`/config_dump`).
    pub raw: Value,
}

#[derive(Debug)]
pub enum ScopeRoute {
    /// `route_configuration` (inline scopes only).
    Inline(RouteConfig),
    /// `route_configuration_name` (SRDS scopes only), fetched by RDS.
    Rds(String),
}

/// Where a scope's route table comes from: Envoy refuses the other one in each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeOrigin {
    Inline,
    Srds,
}

pub fn map_scoped_routes(sr: &Obj<'_>) -> Option<ScopedRoutesConfig> {
    let name = sr.str("name").unwrap_or_default().to_string();
    let key_builder = sr
        .obj("scope_key_builder")
        .and_then(|b| map_key_builder(&b));
    if key_builder.is_none() && !sr.has("scope_key_builder") {
        sr.error("scope_key_builder", "is required");
    }
    // The route tables of SRDS scopes are the Python xDS client's to fetch.
    sr.raw("rds_config_source");
    let scopes = if let Some(list) = sr.obj("scoped_route_configurations_list") {
        let scopes: Vec<ScopeConfig> = list
            .list("scoped_route_configurations")
            .iter()
            .filter_map(|s| map_scope(s, ScopeOrigin::Inline))
            .collect();
        ScopesSource::Inline(scopes)
    } else if let Some(srds) = sr.obj("scoped_rds") {
        // `srds_resources_locator` (xdstp collections) is not read: refused.
        srds.raw("scoped_rds_config_source");
        ScopesSource::Srds
    } else {
        sr.error(
            "scoped_route_configurations_list",
            "one of scoped_route_configurations_list or scoped_rds is required",
        );
        return None;
    };
    Some(ScopedRoutesConfig {
        name,
        key_builder: key_builder?,
        scopes,
    })
}

fn map_key_builder(b: &Obj<'_>) -> Option<ScopeKeyBuilder> {
    let fragments: Vec<Option<HeaderValueExtractor>> = b
        .list("fragments")
        .iter()
        .map(|f| {
            let Some(h) = f.obj("header_value_extractor") else {
                f.error("header_value_extractor", "is required");
                return None;
            };
            map_header_value_extractor(&h)
        })
        .collect();
    if fragments.is_empty() {
        b.error("fragments", "needs at least one fragment");
        return None;
    }
    Some(ScopeKeyBuilder {
        fragments: fragments.into_iter().collect::<Option<_>>()?,
    })
}

fn map_header_value_extractor(h: &Obj<'_>) -> Option<HeaderValueExtractor> {
    let header = h.str("name").unwrap_or_default();
    // Envoy looks the header up lower-cased (`LowerCaseString`).
    let name = match HeaderName::from_bytes(header.to_ascii_lowercase().as_bytes()) {
        Ok(n) => n,
        Err(_) => {
            h.error("name", format!("'{header}' is not a header name"));
            return None;
        }
    };
    let element_separator = h.str("element_separator").unwrap_or_default().to_string();
    let extract = if let Some(index) = h.u32("index") {
        if index != 0 && element_separator.is_empty() {
            h.error("index", "Index > 0 for empty string element separator.");
            return None;
        }
        Extract::Index(index as usize)
    } else if let Some(e) = h.obj("element") {
        Extract::Element {
            key: e.str("key").unwrap_or_default().to_string(),
            separator: e.str("separator").unwrap_or_default().to_string(),
        }
    } else {
        h.error("index", "HeaderValueExtractor extract_type not set.");
        return None;
    };
    Some(HeaderValueExtractor {
        name,
        element_separator,
        extract,
    })
}

/// One `ScopedRouteConfiguration`, inline in `scoped_route_configurations_list` or an
/// SRDS resource; each takes its route table from its own field, as Envoy requires.
pub fn map_scope(s: &Obj<'_>, origin: ScopeOrigin) -> Option<ScopeConfig> {
    let name = s.str("name").unwrap_or_default().to_string();
    if s.bool("on_demand") == Some(true) {
        s.error("on_demand", "not supported by envoyx");
    }
    let key: Vec<String> = s
        .obj("key")
        .map(|k| {
            k.list("fragments")
                .iter()
                .map(|f| f.str("string_key").unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    if key.is_empty() {
        s.error("key", "needs at least one fragment");
    }
    let route = match origin {
        ScopeOrigin::Inline => {
            if s.str("route_configuration_name")
                .is_some_and(|n| !n.is_empty())
            {
                s.error(
                    "route_configuration_name",
                    "Fetching routes via RDS (route_configuration_name) is not supported with inline scoped routes.",
                );
                return None;
            }
            let Some(rc) = s.obj("route_configuration") else {
                s.error(
                    "route_configuration",
                    "You must specify a route_configuration with inline scoped routes.",
                );
                return None;
            };
            ScopeRoute::Inline(map_inline_route_config(&rc)?)
        }
        // `route_configuration` is not read: Envoy ignores it in an SRDS scope and
        // fetches `route_configuration_name`, so envoyx refuses it.
        ScopeOrigin::Srds => match s.str("route_configuration_name") {
            Some(n) if !n.is_empty() => ScopeRoute::Rds(n.to_string()),
            _ => {
                s.error(
                    "route_configuration_name",
                    "route_configuration_name is empty.",
                );
                return None;
            }
        },
    };
    Some(ScopeConfig {
        name,
        key,
        route,
        raw: s.to_value(),
    })
}
