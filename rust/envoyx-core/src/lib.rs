//! envoyx-core: the data plane of envoyx, an Envoy-compatible proxy.
//!
//! Pure Rust, no Python: the configuration model mapped from Envoy's v3 proto-JSON
//! ([`config`]), compiled route tables ([`router`]), the HTTP connection manager and
//! router ([`http`]), the TCP proxy ([`tcp`]), clusters and worker-local pools
//! ([`upstream`]), stats with Envoy's names ([`stats`]), access logs, the admin
//! endpoint and the [`server::Server`] that binds and runs it all.

pub mod access_log;
pub mod admin;
pub mod config;
pub mod error;
pub mod http;
pub mod instance;
pub mod io;
pub mod listener;
pub mod listener_manager;
pub mod log;
pub mod options;
pub mod per_worker;
pub mod router;
pub mod runtime;
pub mod server;
pub mod stats;
pub mod tcp;
pub mod tls;
pub mod upstream;
pub mod worker;

pub use error::{Error, Result};
pub use server::{Server, ServerOptions};

/// Maps a canonical proto-JSON bootstrap text; every error found, with its path.
pub fn load_bootstrap(json: &str) -> Result<config::Bootstrap> {
    let doc: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| Error::Config(vec![format!("invalid JSON: {e}")]))?;
    config::map_bootstrap(&doc).map_err(Error::Config)
}

/// The configuration as the core holds it once mapped, in Rust's `Debug` form: a whole
/// bootstrap (`kind` `"bootstrap"`) or one xDS resource (`"listener"`, `"cluster"`,
/// `"route_configuration"`). Tests compare two documents' effect with it: a field left
/// unset against Envoy's documented default written out must map to the same thing.
pub fn describe(kind: &str, json: &str) -> Result<String> {
    let doc: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| Error::Config(vec![format!("invalid JSON: {e}")]))?;
    let described = match kind {
        "bootstrap" => config::map_bootstrap(&doc).map(|m| format!("{m:#?}")),
        "listener" => config::bootstrap::map_listener_resource(&doc).map(|m| format!("{m:#?}")),
        "cluster" => config::bootstrap::map_cluster_resource(&doc).map(|m| format!("{m:#?}")),
        "route_configuration" => {
            config::bootstrap::map_route_config_resource(&doc).map(|m| format!("{m:#?}"))
        }
        other => {
            return Err(Error::Config(vec![format!(
                "describe: unknown kind {other:?}"
            )]));
        }
    };
    described.map_err(Error::Config)
}

/// Times route selection of one listener's route table: nanoseconds per lookup of
/// (`authority`, `path`) over `iterations` lookups. For the micro-benchmarks; the
/// table is compiled exactly as the server compiles it.
pub fn route_match_ns(
    bootstrap_json: &str,
    listener: &str,
    authority: &str,
    path: &str,
    iterations: u64,
) -> Result<(f64, Option<String>)> {
    let bootstrap = load_bootstrap(bootstrap_json)?;
    let Some(l) = bootstrap.listeners.into_iter().find(|l| l.name == listener) else {
        return Err(Error::State(format!("no listener named '{listener}'")));
    };
    let Some(chain) = l.filter_chains.into_iter().next() else {
        return Err(Error::State(format!(
            "listener '{listener}' has no filter chain"
        )));
    };
    let config::NetworkFilter::Http(hcm) = chain.filter else {
        return Err(Error::State(format!(
            "listener '{listener}' is not an HTTP listener"
        )));
    };
    let config::RouteSource::Inline(route_config) = hcm.routes else {
        return Err(Error::State(format!(
            "listener '{listener}' takes its routes from RDS"
        )));
    };
    let table = router::RouteTable::new(route_config);
    let headers = ::http::HeaderMap::new();
    let method = ::http::Method::GET;
    let request =
        router::route_match::RouteRequest::new(authority, path, &method, "http", &headers);
    let matched = table.find(&request).map(|r| {
        router::cluster_of(r)
            .unwrap_or("<direct_response>")
            .to_string()
    });
    let iterations = iterations.max(1);
    let started = std::time::Instant::now();
    for _ in 0..iterations {
        let request = router::route_match::RouteRequest::new(
            std::hint::black_box(authority),
            std::hint::black_box(path),
            &method,
            "http",
            &headers,
        );
        std::hint::black_box(table.find(&request));
    }
    Ok((
        started.elapsed().as_nanos() as f64 / iterations as f64,
        matched,
    ))
}
