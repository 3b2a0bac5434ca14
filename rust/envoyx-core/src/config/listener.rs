//! Mapping a `Listener`: its filter chains (each with its match, transport socket
//! and terminal network filter), its default chain and its listener filters.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::matcher::map_cidrs;
use super::model::*;
use super::network::{HCM_TYPE, TCP_PROXY_TYPE, map_hcm, map_tcp_proxy};
use super::reader::Obj;
use super::tls::map_downstream_socket;

pub const TLS_INSPECTOR_TYPE: &str =
    "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector";
pub const ORIGINAL_DST_TYPE: &str = "envoy.extensions.filters.listener.original_dst.v3.OriginalDst";
pub const HTTP_INSPECTOR_TYPE: &str =
    "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector";

pub fn map_listener(l: &Obj<'_>) -> Option<ListenerConfig> {
    let address = map_address(&l.obj("address")?)?;
    let name = l
        .str("name")
        .map(str::to_string)
        .unwrap_or_else(|| address.to_string());
    let mut filter_chains = Vec::new();
    let mut ok = true;
    for chain in l.list("filter_chains") {
        match map_filter_chain(&chain) {
            Some(c) => filter_chains.push(c),
            None => ok = false,
        }
    }
    let default_filter_chain = match l.obj("default_filter_chain") {
        Some(d) => {
            let chain = map_filter_chain(&d);
            ok &= chain.is_some();
            chain
        }
        None => None,
    };
    if filter_chains.is_empty() && default_filter_chain.is_none() && ok {
        l.error(
            "filter_chains",
            "a listener needs at least one filter chain or a default_filter_chain",
        );
        return None;
    }
    check_distinct_matches(l, &filter_chains);
    let mut listener_filters = map_listener_filters(l);
    let use_original_dst = l.bool("use_original_dst").unwrap_or(false);
    if use_original_dst {
        // Envoy's `buildOriginalDstListenerFilter`: after the configured ones.
        listener_filters.push(ListenerFilterConfig {
            kind: ListenerFilterKind::OriginalDst,
            disabled: None,
        });
    }
    let bind_to_port = l.bool("bind_to_port").unwrap_or(true);
    let listener_filters_timeout = match l.duration("listener_filters_timeout") {
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
        None => Some(Duration::from_secs(15)),
    };
    let continue_on_listener_filters_timeout = l
        .bool("continue_on_listener_filters_timeout")
        .unwrap_or(false);
    // Greater than 0 (the schema checks it).
    let max_accepts_per_wakeup = l.u32("max_connections_to_accept_per_socket_event");
    // `traffic_direction` only labels the listener (Envoy's tracing and Istio read it);
    // kept in /config_dump, checked by the schema, no behaviour.
    l.str("traffic_direction");
    ok.then(|| ListenerConfig {
        name,
        address,
        filter_chains,
        default_filter_chain,
        listener_filters,
        use_original_dst,
        bind_to_port,
        listener_filters_timeout,
        continue_on_listener_filters_timeout,
        max_accepts_per_wakeup,
        raw: l.to_value(),
    })
}

fn map_filter_chain(chain: &Obj<'_>) -> Option<FilterChainConfig> {
    let name = chain.str("name").unwrap_or_default().to_string();
    let matcher = match chain.obj("filter_chain_match") {
        Some(m) => map_chain_match(&m)?,
        None => FilterChainMatch::default(),
    };
    let tls = match chain.obj("transport_socket") {
        Some(ts) => map_downstream_socket(&ts)?,
        None => None,
    };
    let handshake_timeout = chain
        .duration("transport_socket_connect_timeout")
        .filter(|d| !d.is_zero());
    let filters = chain.list("filters");
    if filters.len() != 1 {
        chain.error(
            "filters",
            "envoyx supports exactly one (terminal) network filter: http_connection_manager or tcp_proxy",
        );
        return None;
    }
    let f = &filters[0];
    f.str("name");
    let tc = f.obj("typed_config").or_else(|| {
        f.error("typed_config", "is required");
        None
    })?;
    let filter = match tc.any_type() {
        Some(HCM_TYPE) => NetworkFilter::Http(map_hcm(&tc)?),
        Some(TCP_PROXY_TYPE) => NetworkFilter::Tcp(map_tcp_proxy(&tc)?),
        Some(other) => {
            tc.error(
                "@type",
                format!("network filter {other} is not supported by envoyx"),
            );
            return None;
        }
        None => return None,
    };
    Some(FilterChainConfig {
        name,
        matcher,
        tls,
        handshake_timeout,
        filter,
        raw: chain.to_value(),
    })
}

fn map_chain_match(m: &Obj<'_>) -> Option<FilterChainMatch> {
    let mut out = FilterChainMatch::default();
    if let Some(p) = m.u32("destination_port") {
        match u16::try_from(p) {
            Ok(p) => out.destination_port = Some(p),
            Err(_) => m.error("destination_port", "must be at most 65535"),
        }
    }
    out.prefix_ranges = map_cidrs(m, "prefix_ranges");
    out.direct_source_prefix_ranges = map_cidrs(m, "direct_source_prefix_ranges");
    out.source_prefix_ranges = map_cidrs(m, "source_prefix_ranges");
    out.source_type = match m.str("source_type").unwrap_or("ANY") {
        "ANY" => SourceType::Any,
        "SAME_IP_OR_LOOPBACK" => SourceType::SameIpOrLoopback,
        "EXTERNAL" => SourceType::External,
        other => {
            m.error("source_type", format!("unknown value {other}"));
            SourceType::Any
        }
    };
    let ports = m.raw("source_ports").cloned();
    if let Some(serde_json::Value::Array(ports)) = ports {
        for (i, p) in ports.iter().enumerate() {
            match p.as_u64().and_then(|p| u16::try_from(p).ok()) {
                Some(p) => out.source_ports.push(p),
                None => m.errors().push(
                    &format!("{}[{i}]", m.field_path("source_ports")),
                    "expected a port",
                ),
            }
        }
    }
    for (i, name) in m.strings("server_names").into_iter().enumerate() {
        let name = name.to_ascii_lowercase();
        let wildcard_ok = match name.strip_prefix("*.") {
            Some(rest) => !rest.contains('*'),
            None => !name.contains('*'),
        };
        if !wildcard_ok {
            m.errors().push(
                &format!("{}[{i}]", m.field_path("server_names")),
                format!("{name:?}: only exact names and leading `*.` wildcards are allowed"),
            );
        }
        out.server_names.push(name);
    }
    out.transport_protocol = m
        .str("transport_protocol")
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    out.application_protocols = m
        .strings("application_protocols")
        .into_iter()
        .map(str::to_string)
        .collect();
    if m.has("address_suffix") || m.has("suffix_len") {
        m.raw("address_suffix");
        m.raw("suffix_len");
        m.errors().push(
            m.path(),
            "address_suffix and suffix_len are not supported by envoyx",
        );
    }
    Some(out)
}

/// Envoy refuses two chains with the same match: which would serve is undefined.
fn check_distinct_matches(l: &Obj<'_>, chains: &[FilterChainConfig]) {
    for (i, a) in chains.iter().enumerate() {
        if let Some(j) = chains[..i].iter().position(|b| b.matcher == a.matcher) {
            l.errors().push(
                &format!("{}[{i}]", l.field_path("filter_chains")),
                format!(
                    "multiple filter chains with the same matching rules are defined \
                     (filter_chains[{j}] and filter_chains[{i}])"
                ),
            );
        }
    }
}

fn map_listener_filters(l: &Obj<'_>) -> Vec<ListenerFilterConfig> {
    let mut out = Vec::new();
    for f in l.list("listener_filters") {
        f.str("name");
        let Some(tc) = f.obj("typed_config") else {
            f.error("typed_config", "is required by envoyx");
            continue;
        };
        let disabled = f.obj("filter_disabled").and_then(|p| map_predicate(&p));
        let kind = match tc.any_type() {
            Some(TLS_INSPECTOR_TYPE) => {
                // JA3/JA4 fingerprints feed filters envoyx does not have.
                for field in ["enable_ja3_fingerprinting", "enable_ja4_fingerprinting"] {
                    if tc.bool(field) == Some(true) {
                        tc.error(field, "not supported by envoyx");
                    }
                }
                if tc.has("initial_read_buffer_size") {
                    tc.u32("initial_read_buffer_size");
                }
                ListenerFilterKind::TlsInspector
            }
            Some(HTTP_INSPECTOR_TYPE) => ListenerFilterKind::HttpInspector,
            Some(ORIGINAL_DST_TYPE) => {
                // `traffic_type` picks the Windows redirect records only.
                if tc.has("traffic_type") {
                    tc.str("traffic_type");
                }
                ListenerFilterKind::OriginalDst
            }
            Some(other) => {
                tc.error(
                    "@type",
                    format!("listener filter {other} is not supported by envoyx"),
                );
                continue;
            }
            None => continue,
        };
        out.push(ListenerFilterConfig { kind, disabled });
    }
    out
}

/// `ListenerFilterChainMatchPredicate` (one rule of its oneof; the schema checks
/// that one is set).
fn map_predicate(p: &Obj<'_>) -> Option<ListenerFilterPredicate> {
    let rules = |field: &'static str| -> Option<Vec<ListenerFilterPredicate>> {
        let set = p.obj(field)?;
        set.list("rules").iter().map(map_predicate).collect()
    };
    if p.bool("any_match") == Some(true) {
        Some(ListenerFilterPredicate::Any)
    } else if let Some(not) = p.obj("not_match") {
        Some(ListenerFilterPredicate::Not(Box::new(map_predicate(&not)?)))
    } else if p.has("and_match") {
        rules("and_match").map(ListenerFilterPredicate::And)
    } else if p.has("or_match") {
        rules("or_match").map(ListenerFilterPredicate::Or)
    } else if let Some(range) = p.obj("destination_port_range") {
        // An `Int32Range`, compared as Envoy's matcher does, in unsigned 32 bits.
        let bound = |f: &'static str| match range.raw(f).map(|v| v.as_i64()) {
            Some(Some(n)) => n as i32 as u32,
            Some(None) => {
                range.error(f, "expected an integer");
                0
            }
            None => 0,
        };
        Some(ListenerFilterPredicate::DestinationPortRange {
            start: bound("start"),
            end: bound("end"),
        })
    } else {
        p.errors().push(p.path(), "a rule is required");
        None
    }
}

/// `envoy.config.core.v3.Address` with a `socket_address` holding an IP literal.
pub fn map_address(addr: &Obj<'_>) -> Option<SocketAddr> {
    let Some(sa) = addr.obj("socket_address") else {
        addr.errors()
            .push(addr.path(), "only socket_address is supported by envoyx");
        return None;
    };
    map_socket_address(&sa)
}

/// `envoy.config.core.v3.SocketAddress` holding an IP literal and a port.
pub fn map_socket_address(sa: &Obj<'_>) -> Option<SocketAddr> {
    if let Some(p) = sa.str("protocol")
        && p != "TCP"
    {
        sa.error(
            "protocol",
            format!("{p} listeners are not supported by envoyx"),
        );
    }
    let port = sa.u32("port_value").unwrap_or(0);
    let host = sa.str("address").unwrap_or("");
    let ip: IpAddr = match host.parse() {
        Ok(ip) => ip,
        Err(_) => {
            sa.error("address", format!("malformed IP address: {host}"));
            return None;
        }
    };
    sa.ignore(&["ipv4_compat"]);
    match u16::try_from(port) {
        Ok(port) => Some(SocketAddr::new(ip, port)),
        Err(_) => {
            sa.error("port_value", "port must be at most 65535");
            None
        }
    }
}
