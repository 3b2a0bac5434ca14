//! Listeners: the runtime form of a Listener resource, its sockets and its stats.

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use socket2::{Domain, Socket, Type};
use tokio::sync::watch;

use crate::access_log::{AccessLogOptions, FlushSettings};
use crate::config::{ListenerConfig, NetworkFilter, RouteSource};
use crate::error::{Error, Result};
use crate::http::HttpConnectionManager;
use crate::http::filter::FilterFactory;
use crate::stats::{Counter, Gauge, StatStore};
use crate::tcp::TcpProxy;
use crate::upstream::ClusterManager;
use crate::upstream::cluster::Origin;

pub enum ListenerFilter {
    Http(Arc<HttpConnectionManager>),
    Tcp(Arc<TcpProxy>),
}

/// `listener.<address>.*`.
pub struct ListenerStats {
    pub downstream_cx_total: Counter,
    pub downstream_cx_active: Gauge,
    pub downstream_cx_destroy: Counter,
    /// `listener.<address>.worker_<i>.downstream_cx_{total,active}`.
    pub per_worker: Vec<(Counter, Gauge)>,
}

pub struct Listener {
    pub name: String,
    pub configured: SocketAddr,
    pub bound: Mutex<Option<SocketAddr>>,
    pub filter: ListenerFilter,
    pub stats: ListenerStats,
    pub origin: Origin,
    /// Fired to stop accepting and close this listener's connections gracefully.
    pub drain: watch::Sender<bool>,
    /// Sockets bound (one per worker) while the listener warms.
    pub sockets: Mutex<Vec<StdTcpListener>>,
    pub raw: Value,
}

/// Envoy's stat-name form of an address: `127.0.0.1_10000`, `[__1]_10000`.
pub fn address_stat_name(addr: &SocketAddr) -> String {
    addr.to_string().replace(':', "_")
}

impl Listener {
    /// Builds the runtime objects of a listener; binds nothing.
    pub fn build(
        config: ListenerConfig,
        clusters: &Arc<ClusterManager>,
        store: &Arc<StatStore>,
        workers: usize,
        origin: Origin,
        filter_factory: Option<&dyn FilterFactory>,
        file_flush: FlushSettings,
    ) -> Result<Arc<Self>> {
        let log_options = AccessLogOptions {
            workers,
            flush: file_flush,
        };
        let access_log_error = |source| Error::Io {
            context: format!("listener '{}': cannot open access log", config.name),
            source,
        };
        let filter = match config.filter {
            NetworkFilter::Http(hcm) => {
                let filters = match (hcm.http_filters.is_empty(), filter_factory) {
                    (true, _) => None,
                    (false, Some(factory)) => Some(
                        factory
                            .build(&hcm.http_filters, store)
                            .map_err(Error::Config)?,
                    ),
                    (false, None) => {
                        return Err(Error::Config(
                            hcm.http_filters
                                .iter()
                                .map(|f| {
                                    format!(
                                        "{}: Python filters need envoyx's Python runtime",
                                        f.path
                                    )
                                })
                                .collect(),
                        ));
                    }
                };
                ListenerFilter::Http(
                    HttpConnectionManager::new(hcm, clusters.clone(), store, filters, log_options)
                        .map_err(access_log_error)?,
                )
            }
            NetworkFilter::Tcp(tcp) => ListenerFilter::Tcp(
                TcpProxy::new(tcp, clusters.clone(), store, log_options)
                    .map_err(access_log_error)?,
            ),
        };
        let prefix = format!("listener.{}.", address_stat_name(&config.address));
        Ok(Arc::new(Listener {
            stats: ListenerStats {
                downstream_cx_total: store.counter(&format!("{prefix}downstream_cx_total")),
                downstream_cx_active: store.gauge(&format!("{prefix}downstream_cx_active")),
                downstream_cx_destroy: store.counter(&format!("{prefix}downstream_cx_destroy")),
                per_worker: (0..workers.max(1))
                    .map(|i| {
                        (
                            store.counter(&format!("{prefix}worker_{i}.downstream_cx_total")),
                            store.gauge(&format!("{prefix}worker_{i}.downstream_cx_active")),
                        )
                    })
                    .collect(),
            },
            name: config.name,
            configured: config.address,
            bound: Mutex::new(None),
            filter,
            origin,
            drain: watch::channel(false).0,
            sockets: Mutex::new(Vec::new()),
            raw: config.raw,
        }))
    }

    /// The RDS route configuration this listener waits for, if any.
    pub fn rds_name(&self) -> Option<&str> {
        match &self.filter {
            ListenerFilter::Http(hcm) => hcm.rds_name.as_deref(),
            ListenerFilter::Tcp(_) => None,
        }
    }

    /// Binds one `SO_REUSEPORT` socket per worker; port 0 is resolved by the first.
    pub fn bind(&self, workers: usize) -> Result<Vec<StdTcpListener>> {
        let first = bind(self.configured, true)?;
        let actual = first.local_addr().map_err(|source| Error::Bind {
            address: self.configured,
            source,
        })?;
        let mut sockets = vec![first];
        for _ in 1..workers.max(1) {
            sockets.push(bind(actual, true)?);
        }
        *self.bound.lock().unwrap_or_else(|e| e.into_inner()) = Some(actual);
        Ok(sockets)
    }

    pub fn address(&self) -> SocketAddr {
        self.bound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or(self.configured)
    }
}

pub fn bind(addr: SocketAddr, reuse_port: bool) -> Result<StdTcpListener> {
    let err = |source| Error::Bind {
        address: addr,
        source,
    };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    if reuse_port {
        socket.set_reuse_port(true).map_err(err)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true).map_err(err)?;
    }
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(1024).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    Ok(socket.into())
}

/// Whether a listener's configuration names an RDS route table (for warming).
pub fn uses_rds(config: &ListenerConfig) -> bool {
    matches!(&config.filter, NetworkFilter::Http(h) if matches!(h.routes, RouteSource::Rds(_)))
}

/// What an accept loop does when accept fails (out of file descriptors and the
/// like, which repeat until a descriptor is free): back off instead of spinning,
/// and log the first failure of a streak and then once a second, not every retry.
#[derive(Default)]
pub struct AcceptFailures {
    streak: u32,
}

impl AcceptFailures {
    const RETRY: std::time::Duration = std::time::Duration::from_millis(10);
    /// Retries between two log lines of one streak (about a second).
    const LOG_EVERY: u32 = 100;

    /// Logs (when due) and gives how long to wait before accepting again.
    pub fn failed(&mut self, listener: &str, e: &std::io::Error) -> std::time::Duration {
        if self.streak % Self::LOG_EVERY == 0 {
            crate::log!(
                Warn,
                "conn_handler",
                "listener '{listener}': accept failed ({} in a row): {e}",
                self.streak + 1
            );
        }
        self.streak = self.streak.saturating_add(1);
        Self::RETRY
    }

    pub fn accepted(&mut self) {
        self.streak = 0;
    }
}
