//! Mapping a canonical proto-JSON `envoy.config.bootstrap.v3.Bootstrap` onto the model.
//!
//! The Python layer has already validated the document against Envoy's schema, so the
//! errors found here are about what envoyx implements (unsupported fields, reported
//! by [`Obj`]'s drop) and about meaning (unknown cluster references, duplicate names,
//! invalid regexes). All of them are collected and returned together.

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use serde_json::Value;

use super::header_key_format::map_header_key_format;
use super::listener::{map_address, map_listener};
use super::model::*;
use super::network::{DEFAULT_ACCESS_LOG_FORMAT, map_access_log};
use super::reader::{Errors, Obj};
use super::route::{RouteConfig, map_rds_route_config};
use super::route_action::RouteAction;
use super::scoped_route::{ScopeRoute, ScopesSource};
use super::tls::{map_secret, map_upstream_socket};

pub const HTTP_PROTOCOL_OPTIONS_TYPE: &str =
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const HTTP_PROTOCOL_OPTIONS_KEY: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// Maps a bootstrap document; `Err` holds every problem found.
pub fn map_bootstrap(doc: &Value) -> Result<Bootstrap, Vec<String>> {
    let errors = Errors::default();
    let bootstrap = {
        let Some(root) = Obj::new(doc, String::new(), &errors) else {
            return Err(errors.into_vec());
        };
        map_root(&root)
    };
    if errors.is_empty() {
        Ok(bootstrap)
    } else {
        Err(errors.into_vec())
    }
}

fn map_root(root: &Obj<'_>) -> Bootstrap {
    let node = root
        .raw("node")
        .cloned()
        .unwrap_or(Value::Object(Default::default()));
    let admin = root.obj("admin").and_then(|a| map_admin(&a));
    let outlier_event_log_path = root
        .obj("cluster_manager")
        .and_then(|cm| map_cluster_manager(&cm));
    let mut listeners = Vec::new();
    let mut clusters = Vec::new();
    let mut secrets = Vec::new();
    if let Some(sr) = root.obj("static_resources") {
        secrets = sr
            .list("secrets")
            .iter()
            .filter_map(|s| map_secret(s).map(|(name, secret)| (name, secret, s.to_value())))
            .collect();
        clusters = sr.list("clusters").iter().filter_map(map_cluster).collect();
        listeners = sr
            .list("listeners")
            .iter()
            .filter_map(map_listener)
            .collect();
        check_references(&sr, &listeners, &clusters);
        check_secret_references(&sr, &listeners, &clusters, &secrets);
    }
    // Accepted without effect: they only tune Envoy's own internals or name things
    // that envoyx reports itself; documented in docs/config-support.md.
    let runtime = root
        .obj("layered_runtime")
        .map(|lr| crate::runtime::map_layered_runtime(&lr))
        .unwrap_or_default();
    root.ignore(&["stats_flush_interval", "overload_manager"]);
    // Read and validated by the Python xDS client (python/envoyx/xds), which feeds
    // the resources it receives to `Server::apply`.
    root.ignore(&["dynamic_resources"]);
    Bootstrap {
        node,
        admin,
        listeners,
        clusters,
        secrets,
        runtime,
        outlier_event_log_path,
        raw: root.to_value(),
    }
}

/// `cluster_manager`: envoyx reads only `outlier_detection.event_log_path` (the
/// file of outlier ejection events); everything else in it stays refused.
fn map_cluster_manager(cm: &Obj<'_>) -> Option<String> {
    let od = cm.obj("outlier_detection")?;
    od.str("event_log_path")
        .filter(|p| !p.is_empty())
        .map(str::to_string)
}

/// Static secrets named by TLS contexts must exist (dynamic ones come over SDS),
/// and names are unique.
fn check_secret_references(
    sr: &Obj<'_>,
    listeners: &[ListenerConfig],
    clusters: &[ClusterConfig],
    secrets: &[(String, SecretConfig, Value)],
) {
    let mut names = HashSet::new();
    for (i, (name, _, _)) in secrets.iter().enumerate() {
        if !names.insert(name.as_str()) {
            sr.errors().push(
                &format!("static_resources.secrets[{i}].name"),
                format!("duplicate static secret name {name}"),
            );
        }
    }
    let check = |path: String, common: &CommonTlsConfig| {
        for s in common.secrets() {
            if !s.dynamic && !names.contains(s.name.as_str()) {
                sr.errors()
                    .push(&path, format!("Unknown static secret: {}", s.name));
            }
        }
    };
    for (i, l) in listeners.iter().enumerate() {
        for (j, chain) in l.filter_chains.iter().enumerate() {
            if let Some(tls) = &chain.tls {
                check(
                    format!("static_resources.listeners[{i}].filter_chains[{j}].transport_socket"),
                    &tls.common,
                );
            }
        }
        if let Some(tls) = l.default_filter_chain.as_ref().and_then(|c| c.tls.as_ref()) {
            check(
                format!("static_resources.listeners[{i}].default_filter_chain.transport_socket"),
                &tls.common,
            );
        }
    }
    for (i, c) in clusters.iter().enumerate() {
        if let Some(tls) = &c.tls {
            check(
                format!("static_resources.clusters[{i}].transport_socket"),
                &tls.common,
            );
        }
    }
}

fn check_references(sr: &Obj<'_>, listeners: &[ListenerConfig], clusters: &[ClusterConfig]) {
    let mut names = HashSet::new();
    for (i, c) in clusters.iter().enumerate() {
        if !names.insert(c.name.as_str()) {
            sr.errors().push(
                &format!("static_resources.clusters[{i}].name"),
                format!("cluster manager: duplicate cluster '{}'", c.name),
            );
        }
    }
    let mut listener_names = HashSet::new();
    let mut addresses = HashSet::new();
    for (i, l) in listeners.iter().enumerate() {
        let path = format!("static_resources.listeners[{i}]");
        if !listener_names.insert(l.name.as_str()) {
            sr.errors().push(
                &format!("{path}.name"),
                format!(
                    "error adding listener: duplicate listener '{}' found",
                    l.name
                ),
            );
        }
        if l.address.port() != 0 && !addresses.insert(l.address) {
            sr.errors().push(
                &format!("{path}.address"),
                format!(
                    "error adding listener '{}': address {} is already used by another listener",
                    l.name, l.address
                ),
            );
        }
        let chains = l
            .filter_chains
            .iter()
            .enumerate()
            .map(|(j, c)| (format!("{path}.filter_chains[{j}]"), c))
            .chain(
                l.default_filter_chain
                    .iter()
                    .map(|c| (format!("{path}.default_filter_chain"), c)),
            );
        for (cpath, chain) in chains {
            check_chain_references(
                sr,
                &names,
                &format!("{cpath}.filters[0].typed_config"),
                chain,
            );
        }
    }
}

/// A static route configuration's routes name known clusters (unless it says
/// `validate_clusters: false`).
fn check_route_references(sr: &Obj<'_>, names: &HashSet<&str>, at: &str, rc: &RouteConfig) {
    if !rc.validate_clusters {
        return;
    }
    for (v, vh) in rc.virtual_hosts.iter().enumerate() {
        for (r, route) in vh.routes.iter().enumerate() {
            let RouteAction::Forward(fwd) = &route.action else {
                continue;
            };
            for (field, name, what) in fwd.named_clusters() {
                if !names.contains(name) {
                    sr.errors().push(
                        &format!("{at}.virtual_hosts[{v}].routes[{r}].{field}"),
                        format!("route: unknown {what} '{name}'"),
                    );
                }
            }
        }
    }
}

fn check_chain_references(
    sr: &Obj<'_>,
    names: &HashSet<&str>,
    fpath: &str,
    chain: &FilterChainConfig,
) {
    match &chain.filter {
        NetworkFilter::Http(hcm) => match &hcm.routes {
            RouteSource::Inline(rc) => {
                check_route_references(sr, names, &format!("{fpath}.route_config"), rc)
            }
            RouteSource::Scoped(scoped) => {
                let ScopesSource::Inline(scopes) = &scoped.scopes else {
                    return;
                };
                let list = format!(
                    "{fpath}.scoped_routes.scoped_route_configurations_list.scoped_route_configurations"
                );
                for (i, scope) in scopes.iter().enumerate() {
                    if let ScopeRoute::Inline(rc) = &scope.route {
                        let at = format!("{list}[{i}].route_configuration");
                        check_route_references(sr, names, &at, rc);
                    }
                }
            }
            RouteSource::Rds(_) => {}
        },
        NetworkFilter::Tcp(tcp) => {
            if !names.contains(tcp.cluster.as_str()) {
                sr.errors().push(
                    &format!("{fpath}.cluster"),
                    format!("tcp proxy: unknown cluster '{}'", tcp.cluster),
                );
            }
        }
    }
}

fn map_admin(admin: &Obj<'_>) -> Option<AdminConfig> {
    let access_logs = admin
        .list("access_log")
        .iter()
        .filter_map(map_access_log)
        .collect();
    // `access_log_path` is Envoy's deprecated spelling of an admin file log.
    let mut access_logs: Vec<AccessLogConfig> = access_logs;
    if let Some(path) = admin.str("access_log_path") {
        access_logs.push(AccessLogConfig {
            sink: AccessLogSink::File(path.to_string()),
            format: AccessLogFormat::Text(DEFAULT_ACCESS_LOG_FORMAT.to_string()),
        });
    }
    let address = match admin.obj("address") {
        Some(a) => map_address(&a)?,
        None => {
            admin.error("address", "is required");
            return None;
        }
    };
    Some(AdminConfig {
        address,
        access_logs,
    })
}

fn map_cluster(c: &Obj<'_>) -> Option<ClusterConfig> {
    let name = c.str("name").unwrap_or_default().to_string();
    if name.is_empty() {
        c.error("name", "is required");
    }
    let discovery = match c.str("type").unwrap_or("STATIC") {
        "STATIC" => DiscoveryType::Static,
        "STRICT_DNS" => DiscoveryType::StrictDns,
        "LOGICAL_DNS" => DiscoveryType::LogicalDns,
        "EDS" => DiscoveryType::Eds,
        "ORIGINAL_DST" => DiscoveryType::OriginalDst,
        other => {
            c.error(
                "type",
                format!("{other} clusters are not supported by envoyx yet"),
            );
            return None;
        }
    };
    let original_dst = (discovery == DiscoveryType::OriginalDst).then(|| map_original_dst(c));
    let lb = map_lb_config(c, original_dst.is_some());
    let connect_timeout = c
        .duration("connect_timeout")
        .unwrap_or(Duration::from_secs(5));
    let dns_refresh_rate = c
        .duration("dns_refresh_rate")
        .unwrap_or(Duration::from_secs(5));
    let dns_lookup_family = match c.str("dns_lookup_family").unwrap_or("AUTO") {
        "AUTO" => DnsLookupFamily::Auto,
        "V4_ONLY" => DnsLookupFamily::V4Only,
        "V6_ONLY" => DnsLookupFamily::V6Only,
        "V4_PREFERRED" => DnsLookupFamily::V4Preferred,
        "ALL" => DnsLookupFamily::All,
        other => {
            c.error("dns_lookup_family", format!("unknown value {other}"));
            DnsLookupFamily::Auto
        }
    };
    let mut protocol = UpstreamProtocol::Http1;
    let mut pool = PoolSettings::default();
    // (auto_sni, auto_san_validation) of upstream_http_protocol_options.
    let mut auto_sni = (false, false);
    if let Some(u) = c.obj("upstream_http_protocol_options") {
        map_upstream_http_options(&u, &mut auto_sni);
    }
    // The deprecated cluster-level spellings, then the extension's (which wins).
    if let Some(common) = c.obj("common_http_protocol_options") {
        map_common_http_options(&common, &mut pool);
    }
    if let Some(n) = c.u32("max_requests_per_connection") {
        pool.max_requests_per_connection = (n > 0).then_some(n);
    }
    if let Some(h1) = c.obj("http_protocol_options") {
        pool.header_key_format = map_header_key_format(&h1);
    }
    if let Some(h2) = c.obj("http2_protocol_options") {
        drop(h2);
        protocol = UpstreamProtocol::Http2;
    }
    for (key, opts) in c.entries("typed_extension_protocol_options") {
        if key != HTTP_PROTOCOL_OPTIONS_KEY || opts.any_type() != Some(HTTP_PROTOCOL_OPTIONS_TYPE) {
            opts.errors().push(
                opts.path(),
                format!("protocol options {key} are not supported by envoyx"),
            );
            continue;
        }
        if let Some(common) = opts.obj("common_http_protocol_options") {
            map_common_http_options(&common, &mut pool);
        }
        if let Some(u) = opts.obj("upstream_http_protocol_options") {
            map_upstream_http_options(&u, &mut auto_sni);
        }
        if let Some(auto) = opts.obj("auto_config") {
            if let Some(h1) = auto.obj("http_protocol_options") {
                pool.header_key_format = map_header_key_format(&h1);
            }
            if let Some(h2) = auto.obj("http2_protocol_options") {
                drop(h2);
            }
            protocol = UpstreamProtocol::Auto;
        } else if let Some(downstream) = opts.obj("use_downstream_protocol_config") {
            // The options of each protocol apply to the connections of that one.
            if let Some(h1) = downstream.obj("http_protocol_options") {
                pool.header_key_format = map_header_key_format(&h1);
            }
            if let Some(h2) = downstream.obj("http2_protocol_options") {
                drop(h2);
            }
            protocol = UpstreamProtocol::Downstream;
        } else if let Some(explicit) = opts.obj("explicit_http_config") {
            if let Some(h1) = explicit.obj("http_protocol_options") {
                pool.header_key_format = map_header_key_format(&h1);
                protocol = UpstreamProtocol::Http1;
            } else if let Some(h2) = explicit.obj("http2_protocol_options") {
                drop(h2);
                protocol = UpstreamProtocol::Http2;
            } else {
                explicit.errors().push(
                    explicit.path(),
                    "only HTTP/1.1 or HTTP/2 are supported by envoyx",
                );
            }
        } else {
            opts.errors().push(
                opts.path(),
                "envoyx supports explicit_http_config, use_downstream_protocol_config and auto_config only",
            );
        }
    }
    let mut eds_service_name = None;
    if discovery == DiscoveryType::Eds {
        let service = c.obj("eds_cluster_config").and_then(|e| {
            // The config source is the Python xDS client's business.
            e.raw("eds_config");
            e.str("service_name").map(str::to_string)
        });
        eds_service_name = Some(service.unwrap_or_else(|| name.clone()));
    }
    let assignment = match c.obj("load_assignment") {
        Some(la) => map_load_assignment(&la, discovery == DiscoveryType::Static),
        None => LoadAssignment {
            endpoints: Vec::new(),
            overprovisioning_factor: DEFAULT_OVERPROVISIONING_FACTOR,
        },
    };
    let endpoints = assignment.endpoints;
    let tls = match c.obj("transport_socket") {
        Some(ts) => map_upstream_socket(&ts)?.map(|mut tls| {
            (tls.auto_sni, tls.auto_san_validation) = auto_sni;
            tls
        }),
        None => None,
    };
    if tls.is_some() && protocol == UpstreamProtocol::Downstream {
        // Each connection would offer its own ALPN: one TLS context per protocol.
        c.error(
            "typed_extension_protocol_options",
            "use_downstream_protocol_config with a transport_socket is not supported by envoyx",
        );
    }
    let upstream_bind = c
        .obj("upstream_bind_config")
        .and_then(|b| map_bind_config(&b));
    if tls.is_none() && protocol == UpstreamProtocol::Auto {
        // Envoy negotiates by ALPN, which needs TLS; in plaintext it speaks HTTP/1.1.
        protocol = UpstreamProtocol::Http1;
    }
    let (health_checks, outlier_detection, ignore_health_on_host_removal) =
        super::health_check::map_cluster_health(c);
    if discovery == DiscoveryType::LogicalDns && endpoints.len() != 1 {
        c.error(
            "load_assignment",
            "LOGICAL_DNS clusters must have a single locality_lb_endpoint and a single lb_endpoint",
        );
    }
    let stat_name = match c.str("alt_stat_name") {
        Some(alt) if !alt.is_empty() => alt.to_string(),
        _ => name.clone(),
    };
    Some(ClusterConfig {
        name,
        stat_name,
        metadata: super::metadata::map_metadata(c),
        discovery,
        connect_timeout,
        endpoints,
        protocol,
        upstream_bind,
        dns_refresh_rate,
        dns_lookup_family,
        lb,
        overprovisioning_factor: assignment.overprovisioning_factor,
        eds_service_name,
        pool,
        tls,
        health_checks,
        outlier_detection,
        ignore_health_on_host_removal,
        circuit_breakers: super::circuit_breakers::map_circuit_breakers(c),
        original_dst,
        raw: c.to_value(),
    })
}

/// An `ORIGINAL_DST` cluster's settings, with the checks of Envoy's
/// `OriginalDstClusterFactory::createClusterImpl` (its `lb_policy` is checked by
/// [`map_lb_config`]).
fn map_original_dst(c: &Obj<'_>) -> OriginalDstConfig {
    if c.has("load_assignment") {
        c.error(
            "load_assignment",
            "ORIGINAL_DST clusters must have no load assignment configured",
        );
    }
    // Their checkers and detector follow the configured hosts: on-demand hosts
    // would go unchecked.
    for field in ["health_checks", "outlier_detection"] {
        if c.has(field) {
            c.error(field, "not supported by envoyx on ORIGINAL_DST clusters");
        }
    }
    let mut config = OriginalDstConfig {
        http_header_name: None,
        upstream_port_override: None,
        cleanup_interval: c
            .duration("cleanup_interval")
            .unwrap_or(Duration::from_secs(5)),
    };
    let Some(o) = c.obj("original_dst_lb_config") else {
        return config;
    };
    let name = o.str("http_header_name").unwrap_or_default();
    if o.bool("use_http_header").unwrap_or(false) {
        let name = if name.is_empty() {
            "x-envoy-original-dst-host"
        } else {
            name
        };
        match http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
            Ok(h) => config.http_header_name = Some(h),
            Err(_) => o.error("http_header_name", "is not a valid header name"),
        }
    } else if !name.is_empty() {
        o.error(
            "http_header_name",
            format!(
                "ORIGINAL_DST cluster: invalid config http_header_name={name} and use_http_header \
                 is false. Set use_http_header to true if http_header_name is desired."
            ),
        );
    }
    // A `google.protobuf.UInt32Value`: a plain number in JSON and YAML.
    if let Some(port) = o.u32("upstream_port_override") {
        match u16::try_from(port) {
            Ok(p) => config.upstream_port_override = Some(p),
            Err(_) => o.error("upstream_port_override", "must be a port number"),
        }
    }
    config
}

/// `envoy.config.core.v3.BindConfig` of a cluster: `source_address` and
/// `freebind`; socket options and extra source addresses are refused by the reader.
fn map_bind_config(b: &Obj<'_>) -> Option<UpstreamBindConfig> {
    let Some(sa) = b.obj("source_address") else {
        b.error("source_address", "is required by envoyx");
        return None;
    };
    let source = super::listener::map_socket_address(&sa)?;
    Some(UpstreamBindConfig {
        source,
        freebind: b.bool("freebind").unwrap_or(false),
    })
}

/// `envoy.config.core.v3.UpstreamHttpProtocolOptions`: (auto_sni, auto_san_validation).
fn map_upstream_http_options(u: &Obj<'_>, auto: &mut (bool, bool)) {
    if let Some(b) = u.bool("auto_sni") {
        auto.0 = b;
    }
    if let Some(b) = u.bool("auto_san_validation") {
        auto.1 = b;
    }
    if u.has("override_auto_sni_header") {
        u.raw("override_auto_sni_header");
        u.error("override_auto_sni_header", "not supported by envoyx");
    }
}

/// `envoy.config.core.v3.HttpProtocolOptions` of an upstream: the fields envoyx
/// implements; any other set field is refused by the reader.
fn map_common_http_options(o: &Obj<'_>, pool: &mut PoolSettings) {
    if let Some(t) = o.duration("idle_timeout") {
        pool.idle_timeout = (!t.is_zero()).then_some(t);
    }
    if let Some(n) = o.u32("max_requests_per_connection") {
        pool.max_requests_per_connection = (n > 0).then_some(n);
    }
}

/// Envoy's `ring_hash_lb_config` limits: the ring has at most 8M entries.
const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;
const LB_POLICY_PREFIX: &str = "envoy.extensions.load_balancing_policies.";

/// `lb_policy` with its `*_lb_config`, or `load_balancing_policy`, and
/// `common_lb_config`. Fields left unread (slow start, zone-aware routing, subsets,
/// `hash_balance_factor`, …) are refused by name.
fn map_lb_config(c: &Obj<'_>, original_dst: bool) -> LbConfig {
    let mut lb = LbConfig::default();
    if original_dst {
        // The cluster picks its hosts; Envoy accepts no other policy for it.
        let policy = c.str("lb_policy").unwrap_or("ROUND_ROBIN");
        if policy != "CLUSTER_PROVIDED" || c.has("load_balancing_policy") {
            c.error(
                "lb_policy",
                format!(
                    "LB policy {policy} is not valid for Cluster type ORIGINAL_DST. Only \
                     'CLUSTER_PROVIDED' is allowed with cluster type 'ORIGINAL_DST'"
                ),
            );
        }
    }
    if let Some(common) = c.obj("common_lb_config") {
        if let Some(t) = common.obj("healthy_panic_threshold") {
            lb.healthy_panic_threshold = percent(&t, 50);
        }
        if let Some(lw) = common.obj("locality_weighted_lb_config") {
            drop(lw);
            lb.locality_weighted = true;
        }
        if let Some(b) = common.bool("close_connections_on_host_set_change") {
            lb.close_connections_on_host_set_change = b;
        }
    }
    if let Some(policy) = c.obj("load_balancing_policy") {
        if c.has("lb_policy") {
            c.str("lb_policy");
        }
        let policies = policy.list("policies");
        let Some(first) = policies.first() else {
            policy.error("policies", "is required");
            return lb;
        };
        // Envoy uses the first policy it knows; it knows every one envoyx does, so
        // the others are never used.
        for other in &policies[1..] {
            other.ignore(&["typed_extension_config"]);
        }
        if let Some(tec) = first.obj("typed_extension_config") {
            tec.str("name");
            if let Some(tc) = tec.obj("typed_config") {
                if let Some(p) = map_typed_lb_policy(&tc, &mut lb.locality_weighted) {
                    lb.policy = p;
                }
            }
        }
        return lb;
    }
    lb.policy = match c.str("lb_policy").unwrap_or("ROUND_ROBIN") {
        "ROUND_ROBIN" => LbPolicy::RoundRobin,
        // An ORIGINAL_DST cluster's own balancer (`upstream::original_dst`) picks.
        "CLUSTER_PROVIDED" if original_dst => LbPolicy::RoundRobin,
        "LEAST_REQUEST" => {
            let (mut choice_count, mut active_request_bias) = (2, 1.0);
            if let Some(cfg) = c.obj("least_request_lb_config") {
                (choice_count, active_request_bias) = map_least_request(&cfg);
            }
            LbPolicy::LeastRequest {
                choice_count,
                active_request_bias,
            }
        }
        "RANDOM" => LbPolicy::Random,
        "RING_HASH" => match c.obj("ring_hash_lb_config") {
            Some(cfg) => map_ring_hash(&cfg),
            None => map_ring_hash_sizes(None, None),
        },
        "MAGLEV" => LbPolicy::Maglev {
            table_size: match c.obj("maglev_lb_config") {
                Some(cfg) => map_maglev_table_size(&cfg),
                None => DEFAULT_MAGLEV_TABLE_SIZE,
            },
        },
        other => {
            c.error("lb_policy", format!("{other} is not supported by envoyx"));
            LbPolicy::RoundRobin
        }
    };
    lb
}

pub const DEFAULT_MAGLEV_TABLE_SIZE: u64 = 65537;

/// A `google.protobuf.Percent` (`{value}`) as Envoy rounds it to an integer.
fn percent(p: &Obj<'_>, default: u32) -> u32 {
    match p.raw("value").and_then(Value::as_f64) {
        Some(v) if (0.0..=100.0).contains(&v) => v.round() as u32,
        Some(_) => {
            p.error("value", "must be in [0, 100]");
            default
        }
        None => 0,
    }
}

/// `load_balancing_policy.policies[0].typed_extension_config.typed_config`.
fn map_typed_lb_policy(tc: &Obj<'_>, locality_weighted: &mut bool) -> Option<LbPolicy> {
    let ty = tc.any_type().unwrap_or_default();
    let Some(name) = ty.strip_prefix(LB_POLICY_PREFIX) else {
        tc.error(
            "@type",
            format!("load balancing policy {ty} is not supported by envoyx"),
        );
        return None;
    };
    let mut locality = |tc: &Obj<'_>, field: &'static str| {
        if let Some(l) = tc.obj(field) {
            if field == "locality_lb_config" {
                if let Some(lw) = l.obj("locality_weighted_lb_config") {
                    drop(lw);
                    *locality_weighted = true;
                }
            } else {
                *locality_weighted = true;
            }
        }
    };
    match name {
        "round_robin.v3.RoundRobin" => {
            locality(tc, "locality_lb_config");
            Some(LbPolicy::RoundRobin)
        }
        "random.v3.Random" => {
            locality(tc, "locality_lb_config");
            Some(LbPolicy::Random)
        }
        "least_request.v3.LeastRequest" => {
            locality(tc, "locality_lb_config");
            let (choice_count, active_request_bias) = map_least_request(tc);
            Some(LbPolicy::LeastRequest {
                choice_count,
                active_request_bias,
            })
        }
        "ring_hash.v3.RingHash" => {
            locality(tc, "locality_weighted_lb_config");
            Some(map_ring_hash(tc))
        }
        "maglev.v3.Maglev" => {
            locality(tc, "locality_weighted_lb_config");
            Some(LbPolicy::Maglev {
                table_size: map_maglev_table_size(tc),
            })
        }
        _ => {
            tc.error(
                "@type",
                format!("load balancing policy {ty} is not supported by envoyx"),
            );
            None
        }
    }
}

/// `choice_count` (default 2, at least 2) and `active_request_bias` (a
/// RuntimeDouble; envoyx has no runtime, so its default value applies).
fn map_least_request(cfg: &Obj<'_>) -> (u32, f64) {
    let choice_count = match cfg.u32("choice_count") {
        Some(n) if n < 2 => {
            cfg.error("choice_count", "must be at least 2");
            2
        }
        Some(n) => n,
        None => 2,
    };
    let mut bias = 1.0;
    if let Some(b) = cfg.obj("active_request_bias") {
        b.ignore(&["runtime_key"]);
        match b.raw("default_value").map(Value::as_f64) {
            Some(Some(v)) if v >= 0.0 => bias = v,
            Some(_) => b.error("default_value", "must be a non-negative number"),
            None => bias = 0.0,
        }
    }
    (choice_count, bias)
}

fn map_ring_hash(cfg: &Obj<'_>) -> LbPolicy {
    match cfg.str("hash_function") {
        None | Some("XX_HASH") => {}
        Some(other) => cfg.error(
            "hash_function",
            format!("{other} is not supported by envoyx (XX_HASH is)"),
        ),
    }
    map_ring_hash_sizes(
        Some(cfg).zip(cfg.u64("minimum_ring_size")),
        Some(cfg).zip(cfg.u64("maximum_ring_size")),
    )
}

fn map_ring_hash_sizes<'o, 'a>(
    min: Option<(&'o Obj<'a>, u64)>,
    max: Option<(&'o Obj<'a>, u64)>,
) -> LbPolicy {
    let minimum_ring_size = min.map_or(1024, |(_, v)| v);
    let maximum_ring_size = max.map_or(MAX_RING_SIZE, |(_, v)| v);
    for (field, v) in [("minimum_ring_size", min), ("maximum_ring_size", max)] {
        if let Some((cfg, n)) = v
            && (n == 0 || n > MAX_RING_SIZE)
        {
            cfg.error(field, format!("must be in [1, {MAX_RING_SIZE}]"));
        }
    }
    if minimum_ring_size > maximum_ring_size
        && let Some((cfg, _)) = min
    {
        cfg.error(
            "minimum_ring_size",
            format!("ring hash: minimum_ring_size ({minimum_ring_size}) > maximum_ring_size ({maximum_ring_size})"),
        );
    }
    LbPolicy::RingHash {
        minimum_ring_size: minimum_ring_size.clamp(1, MAX_RING_SIZE),
        maximum_ring_size: maximum_ring_size.clamp(1, MAX_RING_SIZE),
    }
}

fn map_maglev_table_size(cfg: &Obj<'_>) -> u64 {
    match cfg.u64("table_size") {
        Some(n) if !(2..=5_000_011).contains(&n) || !is_prime(n) => {
            cfg.error(
                "table_size",
                "The table size of maglev must be prime number (at most 5000011)",
            );
            DEFAULT_MAGLEV_TABLE_SIZE
        }
        Some(n) => n,
        None => DEFAULT_MAGLEV_TABLE_SIZE,
    }
}

fn is_prime(n: u64) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)
}

/// `envoy.config.endpoint.v3.ClusterLoadAssignment` endpoints (a cluster's
/// `load_assignment`, or an EDS resource). `ip_only`: addresses must be IP literals.
fn map_load_assignment(la: &Obj<'_>, ip_only: bool) -> LoadAssignment {
    let mut endpoints = Vec::new();
    la.str("cluster_name");
    let mut overprovisioning_factor = DEFAULT_OVERPROVISIONING_FACTOR;
    if let Some(policy) = la.obj("policy") {
        // A UInt32Value: a plain number in proto-JSON.
        match policy.u32("overprovisioning_factor") {
            Some(0) => policy.error("overprovisioning_factor", "must be greater than 0"),
            Some(v) => overprovisioning_factor = v,
            None => {}
        }
    }
    let mut priorities = Vec::new();
    for locality in la.list("endpoints") {
        let priority = locality.u32("priority").unwrap_or(0);
        priorities.push(priority);
        let locality_weight = locality.u32("load_balancing_weight").unwrap_or(0);
        let place = locality.obj("locality").map(|l| {
            std::sync::Arc::new(Locality {
                region: l.str("region").unwrap_or_default().to_string(),
                zone: l.str("zone").unwrap_or_default().to_string(),
                sub_zone: l.str("sub_zone").unwrap_or_default().to_string(),
            })
        });
        for lb in locality.list("lb_endpoints") {
            let weight = match lb.u32("load_balancing_weight") {
                Some(0) => {
                    lb.error("load_balancing_weight", "must be at least 1");
                    1
                }
                Some(v) => v,
                None => 1,
            };
            let health = match lb.str("health_status").unwrap_or("UNKNOWN") {
                "UNHEALTHY" | "TIMEOUT" => EdsHealth::Unhealthy,
                "DRAINING" => EdsHealth::Draining,
                "DEGRADED" => EdsHealth::Degraded,
                _ => EdsHealth::Healthy,
            };
            let Some(ep) = lb.obj("endpoint") else {
                lb.error("endpoint", "is required");
                continue;
            };
            let Some(addr) = ep.obj("address") else {
                ep.error("address", "is required");
                continue;
            };
            let Some(sa) = addr.obj("socket_address") else {
                addr.errors()
                    .push(addr.path(), "only socket_address is supported by envoyx");
                continue;
            };
            let host = sa.str("address").unwrap_or_default().to_string();
            let port = sa.u32("port_value").unwrap_or(0);
            if ip_only && host.parse::<IpAddr>().is_err() {
                sa.error(
                        "address",
                        format!("malformed IP address: {host}. Consider setting resolver_name or setting cluster type to 'STRICT_DNS' or 'LOGICAL_DNS'"),
                    );
                continue;
            }
            let Ok(port) = u16::try_from(port) else {
                sa.error("port_value", "port must be at most 65535");
                continue;
            };
            endpoints.push(EndpointConfig {
                address: host,
                port,
                weight,
                priority,
                locality: place.clone(),
                locality_weight,
                health,
                metadata: super::metadata::map_metadata(&lb),
            });
        }
    }
    check_priorities(la, priorities);
    LoadAssignment {
        endpoints,
        overprovisioning_factor,
    }
}

/// Envoy refuses a gap in the priorities (0, 1, 3).
fn check_priorities(la: &Obj<'_>, mut priorities: Vec<u32>) {
    priorities.sort_unstable();
    priorities.dedup();
    if priorities.iter().enumerate().any(|(i, p)| *p as usize != i) {
        la.error(
            "endpoints",
            "Unexpected non-consecutive priority: priorities must start at 0 and have no gaps",
        );
    }
}

fn map_resource<T>(doc: &Value, f: impl FnOnce(&Obj<'_>) -> Option<T>) -> Result<T, Vec<String>> {
    let errors = Errors::default();
    let mapped = match Obj::new(doc, String::new(), &errors) {
        Some(obj) => f(&obj),
        None => None,
    };
    match mapped {
        Some(v) if errors.is_empty() => Ok(v),
        _ => {
            let mut errs = errors.into_vec();
            if errs.is_empty() {
                errs.push("invalid resource".to_string());
            }
            Err(errs)
        }
    }
}

/// One `envoy.config.listener.v3.Listener` resource (LDS).
pub fn map_listener_resource(doc: &Value) -> Result<ListenerConfig, Vec<String>> {
    map_resource(doc, map_listener)
}

/// An SDS `Secret` resource: its name and content.
pub fn map_secret_resource(doc: &Value) -> Result<(String, SecretConfig), Vec<String>> {
    map_resource(doc, map_secret)
}

/// One `envoy.config.cluster.v3.Cluster` resource (CDS).
pub fn map_cluster_resource(doc: &Value) -> Result<ClusterConfig, Vec<String>> {
    map_resource(doc, map_cluster)
}

/// One `envoy.config.route.v3.RouteConfiguration` resource (RDS).
pub fn map_route_config_resource(doc: &Value) -> Result<RouteConfig, Vec<String>> {
    map_resource(doc, map_rds_route_config)
}

/// One `envoy.config.route.v3.ScopedRouteConfiguration` resource (SRDS).
pub fn map_scoped_route_resource(
    doc: &Value,
) -> Result<super::scoped_route::ScopeConfig, Vec<String>> {
    map_resource(doc, |s| {
        super::scoped_route::map_scope(s, super::scoped_route::ScopeOrigin::Srds)
    })
}

/// One `envoy.config.endpoint.v3.ClusterLoadAssignment` resource (EDS):
/// its `cluster_name` and endpoints (IP literals, as Envoy requires).
pub fn map_load_assignment_resource(doc: &Value) -> Result<(String, LoadAssignment), Vec<String>> {
    if let Some(fast) = plain_load_assignment(doc) {
        return Ok(fast);
    }
    map_load_assignment_resource_checked(doc)
}

/// The common shape of a large EDS update — only `cluster_name` and plain
/// `endpoint.address.socket_address {address, port_value}` entries with IP
/// literals — read without the field-tracking reader (no path strings per
/// element). Anything else returns None and goes through the checked mapping,
/// which reports every problem with its path.
fn plain_load_assignment(doc: &Value) -> Option<(String, LoadAssignment)> {
    fn only<'v>(v: &'v Value, allowed: &[&str]) -> Option<&'v serde_json::Map<String, Value>> {
        let m = v.as_object()?;
        m.keys().all(|k| allowed.contains(&k.as_str())).then_some(m)
    }
    let cla = only(doc, &["cluster_name", "endpoints"])?;
    let name = match cla.get("cluster_name") {
        Some(n) => n.as_str()?.to_string(),
        None => String::new(),
    };
    let mut endpoints = Vec::new();
    for locality in cla
        .get("endpoints")
        .map_or(Some(&Vec::new()), Value::as_array)?
    {
        let locality = only(locality, &["lb_endpoints"])?;
        for lb in locality
            .get("lb_endpoints")
            .map_or(Some(&Vec::new()), Value::as_array)?
        {
            let endpoint = only(lb, &["endpoint"])?.get("endpoint")?;
            let address = only(endpoint, &["address"])?.get("address")?;
            let sa = only(address, &["socket_address"])?.get("socket_address")?;
            let sa = only(sa, &["address", "port_value"])?;
            let host = sa.get("address")?.as_str()?;
            host.parse::<IpAddr>().ok()?;
            let port = match sa.get("port_value") {
                Some(p) => u16::try_from(p.as_u64()?).ok()?,
                None => 0,
            };
            endpoints.push(EndpointConfig {
                address: host.to_string(),
                port,
                ..EndpointConfig::default()
            });
        }
    }
    Some((
        name,
        LoadAssignment {
            endpoints,
            overprovisioning_factor: DEFAULT_OVERPROVISIONING_FACTOR,
        },
    ))
}

fn map_load_assignment_resource_checked(
    doc: &Value,
) -> Result<(String, LoadAssignment), Vec<String>> {
    map_resource(doc, |la| {
        let name = la
            .raw("cluster_name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let assignment = map_load_assignment(la, true);
        Some((name, assignment))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HeaderKeyFormat;
    use crate::config::network::*;
    use serde_json::json;

    fn front_proxy(route: Value) -> Value {
        json!({
            "static_resources": {
                "listeners": [{
                    "name": "l",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": format!("type.googleapis.com/{HCM_TYPE}"),
                            "stat_prefix": "ingress",
                            "route_config": {"name": "local", "virtual_hosts": [
                                {"name": "all", "domains": ["*"], "routes": [route]}
                            ]},
                            "http_filters": [{"name": "envoy.filters.http.router",
                                "typed_config": {"@type": format!("type.googleapis.com/{ROUTER_TYPE}")}}]
                        }
                    }]}]
                }],
                "clusters": [{
                    "name": "backend",
                    "type": "STATIC",
                    "connect_timeout": "0.25s",
                    "load_assignment": {"cluster_name": "backend", "endpoints": [{"lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 8080}}}}
                    ]}]}
                }]
            }
        })
    }

    #[test]
    fn plain_and_checked_load_assignments_agree() {
        let plain = json!({"cluster_name": "c", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "10.0.0.1", "port_value": 80}}}}
        ]}]});
        let fast = plain_load_assignment(&plain).unwrap();
        let checked = map_load_assignment_resource_checked(&plain).unwrap();
        assert_eq!(format!("{fast:?}"), format!("{checked:?}"));
        // Anything unusual takes the checked path and its errors.
        let weighted = json!({"cluster_name": "c", "endpoints": [{"priority": 1, "lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "10.0.0.1", "port_value": 80}}},
             "load_balancing_weight": 3, "health_status": "DEGRADED"}
        ]}, {"lb_endpoints": []}], "policy": {"overprovisioning_factor": 200}});
        assert!(plain_load_assignment(&weighted).is_none());
        let (_, la) = map_load_assignment_resource(&weighted).unwrap();
        assert_eq!(la.overprovisioning_factor, 200);
        let ep = &la.endpoints[0];
        assert_eq!(
            (ep.weight, ep.priority, ep.health),
            (3, 1, EdsHealth::Degraded)
        );
        let metadata = json!({"cluster_name": "c", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "10.0.0.1", "port_value": 80}}},
             "metadata": {"typed_filter_metadata": {"x": {}}}}
        ]}]});
        let errs = map_load_assignment_resource(&metadata).unwrap_err();
        assert_eq!(
            errs,
            vec![
                "endpoints[0].lb_endpoints[0].metadata.typed_filter_metadata: not supported by envoyx"
            ]
        );
        // A gap in the priorities is refused, as Envoy does.
        let gap = json!({"cluster_name": "c", "endpoints": [{"priority": 1, "lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "10.0.0.1", "port_value": 80}}}}
        ]}]});
        assert!(map_load_assignment_resource(&gap).unwrap_err()[0].contains("non-consecutive"));
    }

    fn cluster_with(extra: Value) -> Result<ClusterConfig, Vec<String>> {
        let mut c = json!({"name": "c", "type": "STATIC", "connect_timeout": "1s"});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        map_cluster_resource(&c)
    }

    #[test]
    fn maps_lb_policies_with_envoys_defaults() {
        let lb = |extra| cluster_with(extra).unwrap().lb;
        assert_eq!(lb(json!({})), LbConfig::default());
        assert_eq!(
            lb(json!({"lb_policy": "LEAST_REQUEST"})).policy,
            LbPolicy::LeastRequest {
                choice_count: 2,
                active_request_bias: 1.0
            }
        );
        assert_eq!(
            lb(json!({"lb_policy": "LEAST_REQUEST", "least_request_lb_config": {
                "choice_count": 3, "active_request_bias": {"default_value": 0.5, "runtime_key": "k"}}}))
            .policy,
            LbPolicy::LeastRequest {
                choice_count: 3,
                active_request_bias: 0.5
            }
        );
        assert_eq!(
            lb(json!({"lb_policy": "RING_HASH"})).policy,
            LbPolicy::RingHash {
                minimum_ring_size: 1024,
                maximum_ring_size: 8 << 20
            }
        );
        assert_eq!(
            lb(json!({"lb_policy": "MAGLEV", "maglev_lb_config": {"table_size": "101"}})).policy,
            LbPolicy::Maglev { table_size: 101 }
        );
        let common = lb(json!({"lb_policy": "RANDOM", "common_lb_config": {
            "healthy_panic_threshold": {"value": 25.4},
            "locality_weighted_lb_config": {},
            "close_connections_on_host_set_change": true}}));
        assert_eq!(
            common,
            LbConfig {
                policy: LbPolicy::Random,
                healthy_panic_threshold: 25,
                locality_weighted: true,
                close_connections_on_host_set_change: true
            }
        );
        let typed = |t: &str, cfg: Value| {
            let mut tc = json!({"@type": format!("type.googleapis.com/envoy.extensions.load_balancing_policies.{t}")});
            for (k, v) in cfg.as_object().unwrap() {
                tc[k] = v.clone();
            }
            json!({"load_balancing_policy": {"policies": [{"typed_extension_config": {
                "name": "x", "typed_config": tc}}]}})
        };
        assert_eq!(
            lb(typed("maglev.v3.Maglev", json!({"table_size": 131}))).policy,
            LbPolicy::Maglev { table_size: 131 }
        );
        assert_eq!(
            lb(typed(
                "ring_hash.v3.RingHash",
                json!({"minimum_ring_size": 16})
            ))
            .policy,
            LbPolicy::RingHash {
                minimum_ring_size: 16,
                maximum_ring_size: 8 << 20
            }
        );
        let rr = lb(typed(
            "round_robin.v3.RoundRobin",
            json!({"locality_lb_config": {"locality_weighted_lb_config": {}}}),
        ));
        assert!(rr.locality_weighted && rr.policy == LbPolicy::RoundRobin);
    }

    #[test]
    fn lb_mistakes_and_unsupported_fields_are_named() {
        let errs = |extra| cluster_with(extra).unwrap_err();
        assert_eq!(
            errs(json!({"lb_policy": "MAGLEV", "maglev_lb_config": {"table_size": 100}})),
            vec![
                "maglev_lb_config.table_size: The table size of maglev must be prime number (at most 5000011)"
            ]
        );
        assert_eq!(
            errs(json!({"lb_policy": "RING_HASH", "ring_hash_lb_config": {
                "minimum_ring_size": 2048, "maximum_ring_size": 1024}})),
            vec![
                "ring_hash_lb_config.minimum_ring_size: ring hash: minimum_ring_size (2048) > maximum_ring_size (1024)"
            ]
        );
        assert_eq!(
            errs(
                json!({"lb_policy": "RING_HASH", "ring_hash_lb_config": {"hash_function": "MURMUR_HASH_2"}})
            ),
            vec![
                "ring_hash_lb_config.hash_function: MURMUR_HASH_2 is not supported by envoyx (XX_HASH is)"
            ]
        );
        assert_eq!(
            errs(
                json!({"lb_policy": "ROUND_ROBIN", "round_robin_lb_config": {"slow_start_config": {}}})
            ),
            vec!["round_robin_lb_config: not supported by envoyx"]
        );
        assert_eq!(
            errs(json!({"common_lb_config": {"zone_aware_lb_config": {}}})),
            vec!["common_lb_config.zone_aware_lb_config: not supported by envoyx"]
        );
        assert_eq!(
            errs(json!({"lb_policy": "CLUSTER_PROVIDED"})),
            vec!["lb_policy: CLUSTER_PROVIDED is not supported by envoyx"]
        );
    }

    #[test]
    fn maps_a_front_proxy() {
        let doc = front_proxy(json!({"match": {"prefix": "/"}, "route": {"cluster": "backend"}}));
        let b = map_bootstrap(&doc).unwrap();
        assert_eq!(b.listeners.len(), 1);
        assert_eq!(b.clusters[0].connect_timeout, Duration::from_millis(250));
        let NetworkFilter::Http(hcm) = &b.listeners[0].filter_chains[0].filter else {
            panic!("expected an HTTP listener")
        };
        assert_eq!(hcm.stat_prefix, "ingress");
        assert_eq!(hcm.codec, CodecType::Auto);
    }

    fn with_http_filters(route: Value, filters: Value) -> Value {
        let mut doc = front_proxy(route);
        doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            ["http_filters"] = filters;
        doc
    }

    fn python_filter(name: &str, value: Value) -> Value {
        json!({"name": name, "typed_config": {
            "@type": format!("type.googleapis.com/{TYPED_STRUCT_TYPE}"),
            "type_url": PYTHON_FILTER_TYPE, "value": value}})
    }

    fn router() -> Value {
        json!({"name": "envoy.filters.http.router",
            "typed_config": {"@type": format!("type.googleapis.com/{ROUTER_TYPE}")}})
    }

    #[test]
    fn maps_python_filters_and_per_route_overrides() {
        let route = json!({"match": {"prefix": "/"}, "route": {"cluster": "backend"},
            "typed_per_filter_config": {
                "auth": {"@type": format!("type.googleapis.com/{FILTER_CONFIG_TYPE}"), "disabled": true},
                "tag": {"@type": format!("type.googleapis.com/{TYPED_STRUCT_TYPE}"),
                    "type_url": PYTHON_FILTER_TYPE, "value": {"config": {"k": 1}}}}});
        let filters = json!([
            python_filter(
                "auth",
                json!({"module": "m", "class": "C", "timeout": "0.5s",
                "error_status": 503.0, "max_request_bytes": 10.0, "config": {"x": "y"}})
            ),
            python_filter("tag", json!({"object": "tagger"})),
            router(),
        ]);
        let b = map_bootstrap(&with_http_filters(route, filters)).unwrap();
        let NetworkFilter::Http(hcm) = &b.listeners[0].filter_chains[0].filter else {
            panic!("expected an HTTP listener")
        };
        let [auth, tag] = &hcm.http_filters[..] else {
            panic!("two Python filters expected: {:?}", hcm.http_filters)
        };
        assert_eq!(
            (auth.module.as_deref(), auth.class.as_deref()),
            (Some("m"), Some("C"))
        );
        assert_eq!(auth.settings.timeout, Duration::from_millis(500));
        assert_eq!(auth.settings.error_status, 503);
        assert_eq!(auth.settings.max_request_bytes, 10);
        assert_eq!(auth.settings.max_response_bytes, 1 << 20);
        assert_eq!(auth.config, json!({"x": "y"}));
        assert_eq!(tag.object.as_deref(), Some("tagger"));
        let RouteSource::Inline(rc) = &hcm.routes else {
            panic!("inline routes expected")
        };
        let overrides = &rc.virtual_hosts[0].routes[0].filter_overrides;
        assert!(
            matches!(&overrides[..], [(a, crate::config::FilterOverride::Disabled), (t, crate::config::FilterOverride::Config(c))]
            if a == "auth" && t == "tag" && &**c == r#"{"k":1}"#),
            "{overrides:?}"
        );
    }

    #[test]
    fn python_filter_mistakes_are_named_with_their_paths() {
        let route = json!({"match": {"prefix": "/"}, "route": {"cluster": "backend"}});
        let filters = json!([
            router(),
            python_filter("a", json!({"module": "m", "class": "C", "bogus": 1})),
            python_filter("b", json!({"module": "m"})),
        ]);
        let errs = map_bootstrap(&with_http_filters(route, filters)).unwrap_err();
        let hcm = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config";
        let expected = [
            format!("{hcm}.http_filters[0].name: the router must be the last HTTP filter"),
            format!("{hcm}.http_filters[1].typed_config.value.bogus: not supported by envoyx"),
            format!("{hcm}.http_filters[2].typed_config.value: needs `module` and `class`"),
            format!(
                "{hcm}.http_filters[2].name: the last HTTP filter must be envoy.filters.http.router"
            ),
        ];
        for e in &expected {
            assert!(
                errs.iter().any(|got| got.starts_with(e.as_str())),
                "{e} not in {errs:#?}"
            );
        }
        assert_eq!(errs.len(), expected.len(), "{errs:#?}");
    }

    #[test]
    fn python_filter_settings_are_checked() {
        let route = json!({"match": {"prefix": "/"}, "route": {"cluster": "backend"}});
        let filters = json!([
            python_filter(
                "a",
                json!({"module": "m", "class": "C", "error_status": 700.0,
                "timeout": "0s", "max_request_bytes": 1.5})
            ),
            router(),
        ]);
        let errs = map_bootstrap(&with_http_filters(route.clone(), filters)).unwrap_err();
        let value = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config\
            .http_filters[0].typed_config.value";
        let mut expected = vec![
            format!("{value}.error_status: must be in [200, 599]"),
            format!("{value}.timeout: must be greater than 0s"),
            format!("{value}.max_request_bytes: expected a whole non-negative number"),
        ];
        expected.sort();
        let mut errs = errs;
        errs.sort();
        assert_eq!(errs, expected);
        // The TypedStruct of udpa (older control planes) is accepted the same way.
        let udpa = json!([{"name": "a", "typed_config": {
            "@type": format!("type.googleapis.com/{UDPA_TYPED_STRUCT_TYPE}"),
            "type_url": PYTHON_FILTER_TYPE, "value": {"object": "o"}}}, router()]);
        let b = map_bootstrap(&with_http_filters(route, udpa)).unwrap();
        let NetworkFilter::Http(hcm) = &b.listeners[0].filter_chains[0].filter else {
            panic!("expected an HTTP listener")
        };
        assert_eq!(hcm.http_filters[0].object.as_deref(), Some("o"));
    }

    #[test]
    fn unknown_cluster_is_named_with_its_path() {
        let doc = front_proxy(json!({"match": {"prefix": "/"}, "route": {"cluster": "nope"}}));
        let errs = map_bootstrap(&doc).unwrap_err();
        assert_eq!(errs.len(), 1);
        assert!(errs[0].starts_with("static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0].routes[0].route.cluster: route: unknown cluster 'nope'"), "{errs:?}");
    }

    #[test]
    fn unsupported_fields_are_all_reported() {
        let doc = front_proxy(json!({
            "match": {"prefix": "/"},
            "route": {"cluster": "backend", "retry_policy": {"retry_priority": {"name": "p"}}},
            "tracing": {}
        }));
        let errs = map_bootstrap(&doc).unwrap_err();
        let base = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0].routes[0]";
        assert!(
            errs.contains(&format!("{base}.tracing: not supported by envoyx")),
            "{errs:?}"
        );
        assert!(
            errs.contains(&format!(
                "{base}.route.retry_policy.retry_priority: not supported by envoyx"
            )),
            "{errs:?}"
        );
    }

    #[test]
    fn invalid_regex_is_rejected() {
        let doc = front_proxy(
            json!({"match": {"safe_regex": {"regex": "(["}}, "route": {"cluster": "backend"}}),
        );
        let errs = map_bootstrap(&doc).unwrap_err();
        assert!(
            errs[0].contains("safe_regex.regex: invalid regex"),
            "{errs:?}"
        );
    }

    #[test]
    fn duplicate_clusters_are_rejected() {
        let mut doc =
            front_proxy(json!({"match": {"prefix": "/"}, "route": {"cluster": "backend"}}));
        let c = doc["static_resources"]["clusters"][0].clone();
        doc["static_resources"]["clusters"]
            .as_array_mut()
            .unwrap()
            .push(c);
        let errs = map_bootstrap(&doc).unwrap_err();
        assert_eq!(
            errs,
            vec!["static_resources.clusters[1].name: cluster manager: duplicate cluster 'backend'"]
        );
    }

    #[test]
    fn http2_upstream_from_protocol_options() {
        let mut doc =
            front_proxy(json!({"match": {"prefix": "/"}, "route": {"cluster": "backend"}}));
        doc["static_resources"]["clusters"][0]["typed_extension_protocol_options"] = json!({
            HTTP_PROTOCOL_OPTIONS_KEY: {
                "@type": format!("type.googleapis.com/{HTTP_PROTOCOL_OPTIONS_TYPE}"),
                "explicit_http_config": {"http2_protocol_options": {}}
            }
        });
        let b = map_bootstrap(&doc).unwrap();
        assert_eq!(b.clusters[0].protocol, UpstreamProtocol::Http2);
    }

    #[test]
    fn header_key_format_of_a_cluster_in_each_place() {
        let proper = json!({"header_key_format": {"proper_case_words": {}}});
        let places = [
            json!({"explicit_http_config": {"http_protocol_options": proper}}),
            json!({"auto_config": {"http_protocol_options": proper}}),
        ];
        for place in places {
            let mut doc =
                front_proxy(json!({"match": {"prefix": "/"}, "route": {"cluster": "backend"}}));
            let mut opts = place.clone();
            opts["@type"] = json!(format!("type.googleapis.com/{HTTP_PROTOCOL_OPTIONS_TYPE}"));
            doc["static_resources"]["clusters"][0]["typed_extension_protocol_options"] =
                json!({ HTTP_PROTOCOL_OPTIONS_KEY: opts });
            let b = map_bootstrap(&doc).unwrap();
            assert_eq!(
                b.clusters[0].pool.header_key_format,
                HeaderKeyFormat::ProperCase,
                "{place}"
            );
        }
        let mut doc =
            front_proxy(json!({"match": {"prefix": "/"}, "route": {"cluster": "backend"}}));
        doc["static_resources"]["clusters"][0]["http_protocol_options"] = proper;
        let b = map_bootstrap(&doc).unwrap();
        assert_eq!(
            b.clusters[0].pool.header_key_format,
            HeaderKeyFormat::ProperCase
        );
        // Other fields of a cluster's Http1ProtocolOptions stay refused.
        doc["static_resources"]["clusters"][0]["http_protocol_options"] =
            json!({"enable_trailers": true});
        let errors = map_bootstrap(&doc).unwrap_err();
        assert!(
            format!("{errors:?}").contains("http_protocol_options.enable_trailers: not supported"),
            "{errors:?}"
        );
    }

    #[test]
    fn maps_original_dst_clusters_with_envoys_checks() {
        let od = |extra: Value| {
            let mut c = json!({"type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED"});
            for (k, v) in extra.as_object().unwrap() {
                c[k] = v.clone();
            }
            cluster_with(c)
        };
        let c = od(json!({})).unwrap();
        assert_eq!(c.discovery, DiscoveryType::OriginalDst);
        assert_eq!(
            c.original_dst,
            Some(OriginalDstConfig {
                http_header_name: None,
                upstream_port_override: None,
                cleanup_interval: Duration::from_secs(5),
            })
        );
        let c = od(
            json!({"cleanup_interval": "0.5s", "original_dst_lb_config": {
            "use_http_header": true, "upstream_port_override": 8080}}),
        )
        .unwrap()
        .original_dst
        .unwrap();
        assert_eq!(
            c.http_header_name.as_ref().map(|h| h.as_str()),
            Some("x-envoy-original-dst-host")
        );
        assert_eq!(c.upstream_port_override, Some(8080));
        assert_eq!(c.cleanup_interval, Duration::from_millis(500));
        let c = od(json!({"original_dst_lb_config": {
            "use_http_header": true, "http_header_name": "X-Dst"}}))
        .unwrap()
        .original_dst
        .unwrap();
        assert_eq!(c.http_header_name.unwrap().as_str(), "x-dst");
        assert_eq!(
            od(json!({"original_dst_lb_config": {"http_header_name": "x-dst"}})).unwrap_err(),
            vec![
                "original_dst_lb_config.http_header_name: ORIGINAL_DST cluster: invalid config \
                 http_header_name=x-dst and use_http_header is false. Set use_http_header to \
                 true if http_header_name is desired."
            ]
        );
        assert_eq!(
            od(json!({"lb_policy": "ROUND_ROBIN"})).unwrap_err(),
            vec![
                "lb_policy: LB policy ROUND_ROBIN is not valid for Cluster type ORIGINAL_DST. \
                 Only 'CLUSTER_PROVIDED' is allowed with cluster type 'ORIGINAL_DST'"
            ]
        );
        assert!(
            od(json!({"load_assignment": {"cluster_name": "c", "endpoints": []}}))
                .unwrap_err()
                .contains(
                    &"load_assignment: ORIGINAL_DST clusters must have no load assignment \
                     configured"
                        .to_string()
                )
        );
        assert!(od(json!({"outlier_detection": {}})).unwrap_err().contains(
            &"outlier_detection: not supported by envoyx on ORIGINAL_DST clusters".to_string()
        ));
        // Another cluster type still refuses the policy.
        assert_eq!(
            cluster_with(json!({"lb_policy": "CLUSTER_PROVIDED"})).unwrap_err(),
            vec!["lb_policy: CLUSTER_PROVIDED is not supported by envoyx"]
        );
    }
}

#[cfg(test)]
mod sidecar_tests {
    use super::*;
    use serde_json::json;

    /// A tcp_proxy listener to an ORIGINAL_DST cluster, with `listener` and
    /// `cluster` fields added.
    fn sidecar(listener: Value, cluster: Value) -> Bootstrap {
        let mut doc = json!({"static_resources": {
            "listeners": [{
                "name": "l",
                "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15001}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                        "stat_prefix": "p", "cluster": "c"}}]}]
            }],
            "clusters": [{"name": "c", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED"}]
        }});
        let extend = |target: &mut Value, extra: Value| {
            let extra = extra.as_object().unwrap().clone();
            target.as_object_mut().unwrap().extend(extra);
        };
        extend(&mut doc["static_resources"]["listeners"][0], listener);
        extend(&mut doc["static_resources"]["clusters"][0], cluster);
        map_bootstrap(&doc).unwrap()
    }

    #[test]
    fn use_original_dst_adds_the_filter_last_and_bind_to_port() {
        let inspector = json!({"name": "i", "typed_config": {"@type": format!("type.googleapis.com/{}", super::super::listener::HTTP_INSPECTOR_TYPE)},
        "filter_disabled": {"or_match": {"rules": [
            {"destination_port_range": {"start": 15006, "end": 15007}},
            {"and_match": {"rules": [{"any_match": true}, {"not_match": {"destination_port_range": {"start": 1, "end": 80}}}]}}
        ]}}});
        let b = sidecar(
            json!({"use_original_dst": true, "bind_to_port": false, "listener_filters": [inspector]}),
            json!({}),
        );
        let l = &b.listeners[0];
        assert!(l.use_original_dst && !l.bind_to_port);
        let kinds: Vec<_> = l.listener_filters.iter().map(|f| f.kind).collect();
        assert_eq!(
            kinds,
            [
                ListenerFilterKind::HttpInspector,
                ListenerFilterKind::OriginalDst
            ]
        );
        let disabled = l.listener_filters[0].disabled.as_ref().unwrap();
        let at = |port: u16| disabled.matches(std::net::SocketAddr::from(([10, 0, 0, 1], port)));
        assert!(at(15006));
        assert!(!at(79));
        assert!(at(80));
        assert!(l.listener_filters[1].disabled.is_none());
        let plain = sidecar(json!({}), json!({}));
        assert!(!plain.listeners[0].use_original_dst && plain.listeners[0].bind_to_port);
    }

    #[test]
    fn bind_config_and_downstream_protocol() {
        let b = sidecar(
            json!({}),
            json!({
                "upstream_bind_config": {"source_address": {"address": "127.0.0.6", "port_value": 0}, "freebind": true},
                "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "use_downstream_protocol_config": {"http_protocol_options": {}, "http2_protocol_options": {}}
                }}
            }),
        );
        let c = &b.clusters[0];
        assert_eq!(
            c.upstream_bind,
            Some(UpstreamBindConfig {
                source: "127.0.0.6:0".parse().unwrap(),
                freebind: true
            })
        );
        assert_eq!(c.protocol, UpstreamProtocol::Downstream);
        assert_eq!(c.protocol.http2_for(http::Version::HTTP_2), Some(true));
        assert_eq!(c.protocol.http2_for(http::Version::HTTP_10), Some(false));
    }
}
