//! The admin endpoint on `admin.address`, with Envoy's paths and output formats.

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use regex::Regex;
use serde_json::{Value, json};

use crate::access_log::{AccessLogOptions, AccessLogger, LogRecord};
use crate::config::AccessLogConfig;
use crate::instance::{Instance, ServerState, VERSION};
use crate::listener::Listener;
use crate::upstream::Cluster;

pub async fn serve(shared: Arc<Instance>, listener: StdTcpListener, logs: Vec<AccessLogConfig>) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    // Only the control thread serves admin: one buffer (workers: 0) is enough.
    let options = AccessLogOptions {
        workers: 0,
        flush: shared.options.file_flush,
    };
    let grpc = crate::access_log::GrpcLogContext {
        clusters: &shared.clusters,
        store: &shared.store,
    };
    let loggers: Arc<Vec<Arc<AccessLogger>>> = Arc::new(
        logs.iter()
            .filter_map(|c| AccessLogger::open(c, options, Some(grpc)).ok())
            .collect(),
    );
    let cx_total = shared.store.counter("listener.admin.downstream_cx_total");
    let cx_active = shared.store.gauge("listener.admin.downstream_cx_active");
    let mut failures = crate::listener::AcceptFailures::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                failures.accepted();
                accepted
            }
            Err(e) => {
                tokio::time::sleep(failures.failed("admin", &e)).await;
                continue;
            }
        };
        cx_total.inc();
        cx_active.inc();
        let shared = shared.clone();
        let loggers = loggers.clone();
        let cx_active = cx_active.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let shared = shared.clone();
                let loggers = loggers.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req, peer, &loggers)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
            cx_active.dec();
        });
    }
}

fn handle(
    shared: &Instance,
    req: Request<Incoming>,
    peer: SocketAddr,
    loggers: &[Arc<AccessLogger>],
) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let (status, content_type, body) = route(shared, req.method(), &path, &query);
    let len = body.len();
    if !loggers.is_empty() {
        let record = LogRecord {
            start: Some(SystemTime::now()),
            method: req.method().to_string(),
            path: req.uri().to_string(),
            authority: req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("")
                .to_string(),
            request_headers: Some(req.headers().clone()),
            response_code: status.as_u16(),
            response_flags: "-",
            bytes_sent: len as u64,
            duration: started.elapsed(),
            protocol: "HTTP/1.1",
            downstream_remote: Some(peer),
            ..Default::default()
        };
        for l in loggers {
            l.log(&record);
        }
    }
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache, max-age=0"),
    );
    resp.headers_mut().insert(
        "x-content-type-options",
        header::HeaderValue::from_static("nosniff"),
    );
    resp
}

const TEXT: &str = "text/plain; charset=UTF-8";
const JSON: &str = "application/json";

/// Endpoints that change server state: Envoy requires POST for them.
const MUTATING: &[&str] = &[
    "/quitquitquit",
    "/healthcheck/fail",
    "/healthcheck/ok",
    "/drain_listeners",
    "/logging",
    "/reset_counters",
];

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| match kv.split_once('=') {
        Some((k, v)) if k == key => Some(v),
        None if kv == key => Some(""),
        _ => None,
    })
}

fn route(
    shared: &Instance,
    method: &Method,
    path: &str,
    query: &str,
) -> (StatusCode, &'static str, String) {
    if MUTATING.contains(&path)
        && method != Method::POST
        && !(path == "/logging" && query.is_empty())
    {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "This endpoint is only accessible via POST\n".into(),
        );
    }
    let json_format = query_param(query, "format") == Some("json");
    match path {
        "/" | "/help" => (StatusCode::OK, TEXT, help()),
        "/ready" => match shared.state() {
            ServerState::Live => (StatusCode::OK, TEXT, "LIVE\n".into()),
            ServerState::Draining => (StatusCode::SERVICE_UNAVAILABLE, TEXT, "DRAINING\n".into()),
            ServerState::Initializing => (
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                "INITIALIZING\n".into(),
            ),
            ServerState::Stopped => (StatusCode::SERVICE_UNAVAILABLE, TEXT, "STOPPED\n".into()),
        },
        "/server_info" => (StatusCode::OK, JSON, pretty(&server_info(shared))),
        "/certs" => (StatusCode::OK, JSON, pretty(&certs_json(shared))),
        "/stats" => {
            shared.refresh_gauges();
            let filter = match query_param(query, "filter").map(|f| Regex::new(&percent_decode(f)))
            {
                Some(Ok(re)) => Some(re),
                Some(Err(e)) => {
                    return (
                        StatusCode::BAD_REQUEST,
                        TEXT,
                        format!("Invalid re2 regex: {e}\n"),
                    );
                }
                None => None,
            };
            let used_only = query_param(query, "usedonly").is_some();
            if json_format {
                (
                    StatusCode::OK,
                    JSON,
                    pretty(&shared.store.render_json(filter.as_ref(), used_only)),
                )
            } else if query_param(query, "format") == Some("prometheus") {
                (StatusCode::OK, TEXT, shared.store.render_prometheus())
            } else {
                (
                    StatusCode::OK,
                    TEXT,
                    shared.store.render_text(filter.as_ref(), used_only),
                )
            }
        }
        "/stats/prometheus" => {
            shared.refresh_gauges();
            (StatusCode::OK, TEXT, shared.store.render_prometheus())
        }
        "/clusters" => {
            if json_format {
                (StatusCode::OK, JSON, pretty(&clusters_json(shared)))
            } else {
                (StatusCode::OK, TEXT, clusters_text(shared))
            }
        }
        "/listeners" => {
            if json_format {
                (StatusCode::OK, JSON, pretty(&listeners_json(shared)))
            } else {
                let mut out = String::new();
                for l in shared.listeners.active() {
                    let addr = l.address();
                    out.push_str(&format!("{}::{addr}\n", l.name));
                }
                (StatusCode::OK, TEXT, out)
            }
        }
        "/config_dump" => (StatusCode::OK, JSON, pretty(&config_dump(shared))),
        "/quitquitquit" => {
            shared.request_quit();
            (StatusCode::OK, TEXT, "OK\n".into())
        }
        "/healthcheck/fail" => {
            shared
                .healthcheck_failed
                .store(true, std::sync::atomic::Ordering::Relaxed);
            (StatusCode::OK, TEXT, "OK\n".into())
        }
        "/healthcheck/ok" => {
            shared
                .healthcheck_failed
                .store(false, std::sync::atomic::Ordering::Relaxed);
            (StatusCode::OK, TEXT, "OK\n".into())
        }
        "/drain_listeners" => {
            shared.drain();
            (StatusCode::OK, TEXT, "OK\n".into())
        }
        "/logging" => {
            if let Some(level) = query_param(query, "level") {
                match crate::log::Level::parse(level) {
                    Some(l) => crate::log::set_level(l),
                    None => {
                        return (
                            StatusCode::NOT_FOUND,
                            TEXT,
                            format!("error: unknown logger level {level}\n"),
                        );
                    }
                }
            }
            let name = crate::log::level().name();
            (
                StatusCode::OK,
                TEXT,
                format!(
                    "active loggers:\n  admin: {name}\n  conn_handler: {name}\n  main: {name}\n  router: {name}\n  upstream: {name}\n"
                ),
            )
        }
        _ => (
            StatusCode::NOT_FOUND,
            TEXT,
            format!("invalid path. admin commands are:\n{}", help()),
        ),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn help() -> String {
    [
        ("/", "print out list of admin commands"),
        ("/certs", "print certs on machine"),
        ("/clusters", "upstream cluster status"),
        ("/config_dump", "dump current Envoy configs"),
        ("/drain_listeners", "drain listeners"),
        (
            "/healthcheck/fail",
            "cause the server to fail health checks",
        ),
        ("/healthcheck/ok", "cause the server to pass health checks"),
        ("/listeners", "print listener info"),
        ("/logging", "query/change logging levels"),
        ("/quitquitquit", "exit the server"),
        (
            "/ready",
            "print server state, return 200 if LIVE, otherwise return 503",
        ),
        ("/server_info", "print server version/status information"),
        ("/stats", "print server stats"),
        (
            "/stats/prometheus",
            "print server stats in prometheus format",
        ),
    ]
    .iter()
    .map(|(p, d)| format!("  {p}: {d}\n"))
    .collect()
}

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

fn timestamp(t: SystemTime) -> String {
    let dt: chrono::DateTime<chrono::Utc> = t.into();
    dt.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

fn server_info(shared: &Instance) -> Value {
    let state = match shared.state() {
        ServerState::Live => "LIVE",
        ServerState::Draining => "DRAINING",
        ServerState::Initializing => "INITIALIZING",
        ServerState::Stopped => "DRAINING",
    };
    let uptime = format!("{}s", shared.started_at.elapsed().as_secs());
    json!({
        "version": format!("envoyx/{VERSION}/Clean/RELEASE/BoringSSL-free"),
        "state": state,
        "hot_restart_version": "disabled",
        "command_line_options": {
            "concurrency": shared.options.concurrency,
            "drain_time": format!("{}s", shared.options.drain_time.as_secs()),
            "file_flush_interval": proto_duration(shared.options.file_flush.interval),
            "mode": "Serve",
        },
        "node": shared.node,
        "uptime_current_epoch": uptime,
        "uptime_all_epochs": uptime,
    })
}

/// A `google.protobuf.Duration` in proto-JSON at millisecond precision: `10s`, `0.200s`.
fn proto_duration(d: std::time::Duration) -> String {
    match d.subsec_millis() {
        0 => format!("{}s", d.as_secs()),
        ms => format!("{}.{ms:03}s", d.as_secs()),
    }
}

fn with_type(raw: &Value, type_url: &str) -> Value {
    let mut obj = serde_json::Map::new();
    obj.insert(
        "@type".into(),
        Value::String(format!("type.googleapis.com/{type_url}")),
    );
    if let Value::Object(m) = raw {
        for (k, v) in m {
            obj.insert(k.clone(), v.clone());
        }
    }
    Value::Object(obj)
}

pub fn config_dump(shared: &Instance) -> Value {
    let ts = timestamp(shared.loaded_at);
    let cluster_entry = |c: &Arc<Cluster>| {
        let mut e = json!({
            "cluster": with_type(&c.raw, "envoy.config.cluster.v3.Cluster"),
            "last_updated": timestamp(c.origin.last_updated),
        });
        if c.origin.dynamic {
            e["version_info"] = json!(c.origin.version_info);
        }
        e
    };
    let clusters = shared.clusters.all();
    let static_clusters: Vec<Value> = clusters
        .iter()
        .filter(|c| !c.origin.dynamic)
        .map(cluster_entry)
        .collect();
    let dynamic_clusters: Vec<Value> = clusters
        .iter()
        .filter(|c| c.origin.dynamic)
        .map(cluster_entry)
        .collect();
    let warming_clusters: Vec<Value> = shared
        .clusters
        .warming()
        .iter()
        .map(cluster_entry)
        .collect();
    let mut clusters_dump = json!({
        "@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
        "static_clusters": static_clusters,
    });
    let cds_version = shared
        .clusters
        .cds_version
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if !cds_version.is_empty() {
        clusters_dump["version_info"] = json!(cds_version);
    }
    if !dynamic_clusters.is_empty() {
        clusters_dump["dynamic_active_clusters"] = json!(dynamic_clusters);
    }
    if !warming_clusters.is_empty() {
        clusters_dump["dynamic_warming_clusters"] = json!(warming_clusters);
    }

    let set = shared.listeners.snapshot();
    let state = |l: &Arc<Listener>| {
        json!({
            "version_info": l.origin.version_info,
            "listener": with_type(&l.raw, "envoy.config.listener.v3.Listener"),
            "last_updated": timestamp(l.origin.last_updated),
        })
    };
    let static_listeners: Vec<Value> = set
        .active
        .iter()
        .filter(|l| !l.origin.dynamic)
        .map(|l| json!({"listener": with_type(&l.raw, "envoy.config.listener.v3.Listener"), "last_updated": ts}))
        .collect();
    let mut dynamic_listeners: Vec<Value> = set
        .active
        .iter()
        .filter(|l| l.origin.dynamic)
        .map(|l| json!({"name": l.name, "active_state": state(l)}))
        .collect();
    for l in &set.warming {
        match dynamic_listeners
            .iter_mut()
            .find(|d| d["name"] == json!(l.name))
        {
            Some(d) => d["warming_state"] = state(l),
            None => dynamic_listeners.push(json!({"name": l.name, "warming_state": state(l)})),
        }
    }
    let mut listeners_dump = json!({
        "@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
        "static_listeners": static_listeners,
    });
    if !set.lds_version.is_empty() {
        listeners_dump["version_info"] = json!(set.lds_version);
    }
    if !dynamic_listeners.is_empty() {
        listeners_dump["dynamic_listeners"] = json!(dynamic_listeners);
    }
    let static_routes: Vec<Value> = set
        .active
        .iter()
        .filter(|l| !l.origin.dynamic)
        .flat_map(|l| l.chains.all())
        .filter_map(|chain| {
            chain
                .raw
                .pointer("/filters/0/typed_config/route_config")
                .map(|rc| json!({"route_config": with_type(rc, "envoy.config.route.v3.RouteConfiguration"), "last_updated": ts}))
        })
        .collect();
    drop(set);
    let dynamic_routes: Vec<Value> = {
        let routes = shared.listeners.routes();
        let mut names: Vec<&String> = routes.keys().collect();
        names.sort();
        names
            .into_iter()
            .map(|n| {
                let r = &routes[n];
                json!({
                    "version_info": r.origin.version_info,
                    "route_config": with_type(&r.raw, "envoy.config.route.v3.RouteConfiguration"),
                    "last_updated": timestamp(r.origin.last_updated),
                })
            })
            .collect()
    };
    let mut routes_dump = json!({
        "@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
        "static_route_configs": static_routes,
    });
    if !dynamic_routes.is_empty() {
        routes_dump["dynamic_route_configs"] = json!(dynamic_routes);
    }
    json!({"configs": [
        {
            "@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump",
            "bootstrap": shared.bootstrap_raw,
            "last_updated": ts,
        },
        clusters_dump,
        listeners_dump,
        scoped_routes_dump(shared),
        routes_dump,
        secrets_dump(shared),
    ]})
}

/// `ScopedRoutesConfigDump`: each connection manager's inline scopes, and the SRDS
/// scopes once an update came, under each `scoped_routes.name` that takes them.
fn scoped_routes_dump(shared: &Instance) -> Value {
    const SCOPE: &str = "envoy.config.route.v3.ScopedRouteConfiguration";
    let set = shared.listeners.snapshot();
    let mut inline = Vec::new();
    let mut srds_names: Vec<&str> = Vec::new();
    for l in &set.active {
        for scoped in l.http_managers().filter_map(|h| h.scoped.as_deref()) {
            match &scoped.inline {
                Some(raw) => inline.push(json!({
                    "name": scoped.name,
                    "scoped_route_configs": raw.iter().map(|s| with_type(s, SCOPE)).collect::<Vec<_>>(),
                    "last_updated": timestamp(l.origin.last_updated),
                })),
                None if !srds_names.contains(&scoped.name.as_str()) => {
                    srds_names.push(&scoped.name)
                }
                None => {}
            }
        }
    }
    let mut dump = json!({"@type": "type.googleapis.com/envoy.admin.v3.ScopedRoutesConfigDump"});
    if !inline.is_empty() {
        dump["inline_scoped_route_configs"] = json!(inline);
    }
    let scopes = shared.listeners.scopes();
    if let Some(origin) = scopes.origin.as_ref().filter(|_| !srds_names.is_empty()) {
        let configs: Vec<Value> = scopes
            .scopes
            .values()
            .map(|s| with_type(&s.raw, SCOPE))
            .collect();
        let dynamic: Vec<Value> = srds_names
            .iter()
            .map(|name| {
                let mut entry = json!({
                    "name": name,
                    "version_info": origin.version_info,
                    "last_updated": timestamp(origin.last_updated),
                });
                if !configs.is_empty() {
                    entry["scoped_route_configs"] = json!(configs);
                }
                entry
            })
            .collect();
        dump["dynamic_scoped_route_configs"] = json!(dynamic);
    }
    dump
}

/// `SecretsConfigDump`: static secrets, SDS secrets held, and those still awaited
/// (`version_info: uninitialized`), private keys redacted as Envoy does.
fn secrets_dump(shared: &Instance) -> Value {
    let entries = shared.clusters.secrets.entries();
    let mut names: Vec<&String> = entries.keys().collect();
    names.sort();
    let mut statics = Vec::new();
    let mut active = Vec::new();
    for name in names {
        let e = &entries[name];
        let mut secret = with_type(&e.raw, "envoy.extensions.transport_sockets.tls.v3.Secret");
        if let Some(key) = secret.pointer_mut("/tls_certificate/private_key") {
            *key = json!({"inline_string": "[redacted]"});
        }
        let entry = json!({
            "name": name,
            "last_updated": timestamp(e.last_updated),
            "secret": secret,
        });
        match &e.version_info {
            None => statics.push(entry),
            Some(v) => {
                let mut entry = entry;
                entry["version_info"] = json!(v);
                active.push(entry);
            }
        }
    }
    let mut wanted = shared.wanted_resources(crate::instance::ResourceKind::Secret);
    wanted.retain(|n| !entries.contains_key(n));
    let warming: Vec<Value> = wanted
        .iter()
        .map(|n| json!({"name": n, "version_info": "uninitialized"}))
        .collect();
    let mut dump = json!({"@type": "type.googleapis.com/envoy.admin.v3.SecretsConfigDump"});
    if !statics.is_empty() {
        dump["static_secrets"] = json!(statics);
    }
    if !active.is_empty() {
        dump["dynamic_active_secrets"] = json!(active);
    }
    if !warming.is_empty() {
        dump["dynamic_warming_secrets"] = json!(warming);
    }
    dump
}

/// `/certs`: each TLS context's trusted CAs and certificate chains, as Envoy
/// prints them (`envoy.admin.v3.Certificates`).
fn certs_json(shared: &Instance) -> Value {
    let details = |path: &str, der: &[u8]| -> Option<Value> {
        let info = crate::tls::peer::cert_info(der)?;
        let sans: Vec<Value> = info
            .uri_sans
            .iter()
            .map(|u| json!({"uri": u}))
            .chain(info.dns_sans.iter().map(|d| json!({"dns": d})))
            .collect();
        let at = |secs: i64| {
            chrono::DateTime::from_timestamp(secs, 0)
                .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                .unwrap_or_default()
        };
        Some(json!({
            "path": path,
            "serial_number": info.serial,
            "subject_alt_names": sans,
            "days_until_expiration": crate::tls::days_until_expiration(info.not_after).to_string(),
            "valid_from": at(info.not_before),
            "expiration_time": at(info.not_after),
        }))
    };
    let certificates: Vec<Value> = shared
        .cert_inventories()
        .iter()
        .map(|inv| {
            let ca: Vec<Value> = inv
                .cas
                .iter()
                .filter_map(|(path, der)| details(path, der))
                .collect();
            let chain: Vec<Value> = inv
                .chains
                .iter()
                .filter_map(|(path, chain)| chain.first().and_then(|leaf| details(path, leaf)))
                .collect();
            json!({"ca_cert": ca, "cert_chain": chain})
        })
        .collect();
    json!({ "certificates": certificates })
}

fn clusters_text(shared: &Instance) -> String {
    let mut out = String::new();
    for c in shared.clusters.all() {
        let n = &c.name;
        out.push_str(&format!("{n}::observability_name::{n}\n"));
        for prio in ["default_priority", "high_priority"] {
            out.push_str(&format!(
                "{n}::{prio}::max_connections::1024\n{n}::{prio}::max_pending_requests::1024\n{n}::{prio}::max_requests::1024\n{n}::{prio}::max_retries::3\n"
            ));
        }
        out.push_str(&format!("{n}::added_via_api::{}\n", c.origin.dynamic));
        for h in c.hosts.load().iter() {
            let a = h.address;
            let s = &h.stats;
            let loc = h.locality.as_deref();
            for (k, v) in [
                ("cx_active", s.cx_active().get().to_string()),
                ("cx_connect_fail", s.cx_connect_fail().get().to_string()),
                ("cx_total", s.cx_total().get().to_string()),
                ("rq_active", s.rq_active().get().to_string()),
                ("rq_error", s.rq_error().get().to_string()),
                ("rq_success", s.rq_success().get().to_string()),
                ("rq_timeout", s.rq_timeout().get().to_string()),
                ("rq_total", s.rq_total().get().to_string()),
                ("hostname", h.hostname.clone()),
                ("health_flags", health_flags_text(h.health_flags())),
                ("weight", h.weight().to_string()),
                ("region", loc.map_or_else(String::new, |l| l.region.clone())),
                ("zone", loc.map_or_else(String::new, |l| l.zone.clone())),
                (
                    "sub_zone",
                    loc.map_or_else(String::new, |l| l.sub_zone.clone()),
                ),
                ("canary", "false".into()),
                ("priority", h.priority().to_string()),
                ("success_rate", h.outlier.success_rate().to_string()),
                (
                    "local_origin_success_rate",
                    h.outlier.local_origin_success_rate().to_string(),
                ),
            ] {
                out.push_str(&format!("{n}::{a}::{k}::{v}\n"));
            }
        }
    }
    out
}

/// Envoy's `HostUtility::healthFlagsToString`: `healthy`, or each flag set as
/// `/name`, in the flags' order.
fn health_flags_text(flags: u32) -> String {
    use crate::upstream::health_flag as f;
    const NAMES: [(u32, &str); 10] = [
        (f::FAILED_ACTIVE_HC, "/failed_active_hc"),
        (f::FAILED_OUTLIER_CHECK, "/failed_outlier_check"),
        (f::FAILED_EDS_HEALTH, "/failed_eds_health"),
        (f::DEGRADED_ACTIVE_HC, "/degraded_active_hc"),
        (f::DEGRADED_EDS_HEALTH, "/degraded_eds_health"),
        (f::PENDING_DYNAMIC_REMOVAL, "/pending_dynamic_removal"),
        (f::PENDING_ACTIVE_HC, "/pending_active_hc"),
        (
            f::EXCLUDED_VIA_IMMEDIATE_HC_FAIL,
            "/excluded_via_immediate_hc_fail",
        ),
        (f::ACTIVE_HC_TIMEOUT, "/active_hc_timeout"),
        (f::EDS_STATUS_DRAINING, "/eds_status_draining"),
    ];
    let text: String = NAMES
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| *name)
        .collect();
    if text.is_empty() {
        "healthy".to_string()
    } else {
        text
    }
}

/// Envoy's `HostHealthStatus` (admin `ClusterStatus` JSON; false fields omitted).
fn health_status_json(flags: u32) -> Value {
    use crate::upstream::health_flag as f;
    let mut status = serde_json::Map::new();
    for (bit, name) in [
        (f::FAILED_ACTIVE_HC, "failed_active_health_check"),
        (f::FAILED_OUTLIER_CHECK, "failed_outlier_check"),
        (f::DEGRADED_ACTIVE_HC, "failed_active_degraded_check"),
        (f::PENDING_DYNAMIC_REMOVAL, "pending_dynamic_removal"),
        (f::PENDING_ACTIVE_HC, "pending_active_hc"),
        (
            f::EXCLUDED_VIA_IMMEDIATE_HC_FAIL,
            "excluded_via_immediate_hc_fail",
        ),
        (f::ACTIVE_HC_TIMEOUT, "active_hc_timeout"),
    ] {
        if flags & bit != 0 {
            status.insert(name.to_string(), json!(true));
        }
    }
    let eds = if flags & f::FAILED_EDS_HEALTH != 0 {
        "UNHEALTHY"
    } else if flags & f::EDS_STATUS_DRAINING != 0 {
        "DRAINING"
    } else if flags & f::DEGRADED_EDS_HEALTH != 0 {
        "DEGRADED"
    } else {
        "HEALTHY"
    };
    status.insert("eds_health_status".to_string(), json!(eds));
    Value::Object(status)
}

fn clusters_json(shared: &Instance) -> Value {
    let statuses: Vec<Value> = shared
        .clusters
        .all()
        .iter()
        .map(|c| {
            let hosts: Vec<Value> = c
                .hosts
                .load()
                .iter()
                .map(|h| {
                    let s = &h.stats;
                    let mut status = json!({
                        "address": {"socket_address": {"address": h.address.ip().to_string(), "port_value": h.address.port()}},
                        "stats": [
                            {"name": "cx_connect_fail", "value": s.cx_connect_fail().get().to_string()},
                            {"name": "cx_total", "value": s.cx_total().get().to_string()},
                            {"name": "rq_error", "value": s.rq_error().get().to_string()},
                            {"name": "rq_success", "value": s.rq_success().get().to_string()},
                            {"name": "rq_timeout", "value": s.rq_timeout().get().to_string()},
                            {"name": "rq_total", "value": s.rq_total().get().to_string()},
                            {"type": "GAUGE", "name": "cx_active", "value": s.cx_active().get().to_string()},
                            {"type": "GAUGE", "name": "rq_active", "value": s.rq_active().get().to_string()},
                        ],
                        "health_status": health_status_json(h.health_flags()),
                        "weight": h.weight(),
                        "hostname": h.hostname,
                        "locality": h.locality.as_deref().map_or_else(
                            || json!({}),
                            |l| json!({"region": l.region, "zone": l.zone, "sub_zone": l.sub_zone}),
                        ),
                    });
                    if h.priority() != 0 {
                        status["priority"] = json!(h.priority());
                    }
                    for (key, rate) in [
                        ("success_rate", h.outlier.success_rate()),
                        ("local_origin_success_rate", h.outlier.local_origin_success_rate()),
                    ] {
                        if rate >= 0.0 {
                            status[key] = json!({"value": rate});
                        }
                    }
                    status
                })
                .collect();
            json!({"name": c.name, "observability_name": c.name, "added_via_api": c.origin.dynamic, "host_statuses": hosts})
        })
        .collect();
    json!({ "cluster_statuses": statuses })
}

fn listeners_json(shared: &Instance) -> Value {
    let statuses: Vec<Value> = shared
        .listeners
        .active()
        .iter()
        .map(|l| {
            let addr = l.address();
            json!({
                "name": l.name,
                "local_address": {"socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}},
            })
        })
        .collect();
    json!({ "listener_statuses": statuses })
}
