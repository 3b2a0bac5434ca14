//! Listeners: the runtime form of a Listener resource, its sockets and its stats.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener as StdTcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde_json::Value;
use socket2::{Domain, Socket, Type};
use tokio::sync::watch;

use crate::access_log::{AccessLogOptions, FlushSettings};
use crate::config::{
    FilterChainConfig, ListenerConfig, ListenerFilterConfig, NetworkFilter, RouteSource,
};
use crate::error::{Error, Result};
use crate::http::HttpConnectionManager;
use crate::http::filter::FilterFactory;
use crate::stats::{Counter, Gauge, StatStore};
use crate::tcp::TcpProxy;
use crate::tls::{ServerTlsContext, SslStats};
use crate::upstream::ClusterManager;
use crate::upstream::cluster::Origin;

pub mod filter_chain;
pub mod inspect;
mod serve;

pub use filter_chain::{ChainFilter, FilterChain, FilterChains};
pub use serve::serve_connection;

/// `listener.<address>.*`.
pub struct ListenerStats {
    pub downstream_cx_total: Counter,
    pub downstream_cx_active: Gauge,
    pub downstream_cx_destroy: Counter,
    /// A connection no filter chain matched (closed at once).
    pub no_filter_chain_match: Counter,
    /// Listener filters that did not finish within `listener_filters_timeout`.
    pub downstream_pre_cx_timeout: Counter,
    /// TLS handshakes that did not finish within `transport_socket_connect_timeout`.
    pub downstream_cx_transport_socket_connect_timeout: Counter,
    /// `listener.<address>.worker_<i>.downstream_cx_{total,active}`.
    pub per_worker: Vec<(Counter, Gauge)>,
}

pub struct Listener {
    pub name: String,
    pub configured: SocketAddr,
    pub bound: Mutex<Option<SocketAddr>>,
    pub chains: FilterChains,
    pub listener_filters: Vec<ListenerFilterConfig>,
    /// `use_original_dst`: a connection whose original destination was restored
    /// goes to the listener on that address, if there is one (Envoy's
    /// `hand_off_restored_destination_connections`).
    pub hand_off_restored_destination: bool,
    /// `bind_to_port`: false for a listener reached only by such a hand-off.
    pub bind_to_port: bool,
    pub listener_filters_timeout: Option<Duration>,
    pub continue_on_listener_filters_timeout: bool,
    /// `max_connections_to_accept_per_socket_event`: the accept loop yields to the
    /// worker's other tasks after every this many accepted connections.
    pub max_accepts_per_wakeup: Option<u32>,
    pub inspector_stats: inspect::InspectorStats,
    pub stats: ListenerStats,
    pub origin: Origin,
    /// Fired to stop accepting new connections.
    pub stop_accepting: watch::Sender<bool>,
    /// Fired to close gracefully the connections not yet in a filter chain (and,
    /// with each chain's own signal, all of them): removal or replacement.
    pub drain: watch::Sender<bool>,
    /// Sockets bound (one per worker), not yet listening, while the listener warms.
    pub sockets: Mutex<Vec<Socket>>,
    pub raw: Value,
}

/// Envoy's stat-name form of an address: `127.0.0.1_10000`, `[__1]_10000`.
pub fn address_stat_name(addr: &SocketAddr) -> String {
    addr.to_string().replace(':', "_")
}

/// What building a listener's objects needs besides its configuration.
pub struct BuildContext<'a> {
    pub clusters: &'a Arc<ClusterManager>,
    pub store: &'a Arc<StatStore>,
    pub workers: usize,
    pub filter_factory: Option<&'a dyn FilterFactory>,
    pub file_flush: FlushSettings,
}

impl Listener {
    /// Builds the runtime objects of a listener; binds nothing. `previous`: the
    /// listener it replaces, whose unchanged filter chains it takes over (with
    /// their connections, objects and drain signals), as Envoy's in-place filter
    /// chain update does.
    pub fn build(
        config: ListenerConfig,
        cx: &BuildContext<'_>,
        origin: Origin,
        previous: Option<&Listener>,
    ) -> Result<Arc<Self>> {
        let prefix = format!("listener.{}.", address_stat_name(&config.address));
        // One set of ssl.* stats per listener, as Envoy names them.
        let ssl_stats = SslStats::new(cx.store, &prefix, "server");
        let name = config.name.clone();
        let build_chain = |chain: FilterChainConfig| -> Result<Arc<FilterChain>> {
            let same = previous.and_then(|p| {
                p.chains
                    .all()
                    .find(|c| c.raw == chain.raw && c.name == chain.name)
            });
            match same {
                Some(same) => Ok(same.clone()),
                None => build_chain(&name, chain, cx, &ssl_stats),
            }
        };
        let chains = FilterChains {
            chains: config
                .filter_chains
                .into_iter()
                .map(build_chain)
                .collect::<Result<_>>()?,
            default: config.default_filter_chain.map(build_chain).transpose()?,
        };
        let store = cx.store;
        Ok(Arc::new(Listener {
            stats: ListenerStats {
                downstream_cx_total: store.counter(&format!("{prefix}downstream_cx_total")),
                downstream_cx_active: store.gauge(&format!("{prefix}downstream_cx_active")),
                downstream_cx_destroy: store.counter(&format!("{prefix}downstream_cx_destroy")),
                no_filter_chain_match: store.counter(&format!("{prefix}no_filter_chain_match")),
                downstream_pre_cx_timeout: store
                    .counter(&format!("{prefix}downstream_pre_cx_timeout")),
                downstream_cx_transport_socket_connect_timeout: store.counter(&format!(
                    "{prefix}downstream_cx_transport_socket_connect_timeout"
                )),
                per_worker: (0..cx.workers.max(1))
                    .map(|i| {
                        (
                            store.counter(&format!("{prefix}worker_{i}.downstream_cx_total")),
                            store.gauge(&format!("{prefix}worker_{i}.downstream_cx_active")),
                        )
                    })
                    .collect(),
            },
            inspector_stats: inspect::InspectorStats::new(store),
            name: config.name,
            configured: config.address,
            bound: Mutex::new(None),
            chains,
            listener_filters: config.listener_filters,
            hand_off_restored_destination: config.use_original_dst,
            bind_to_port: config.bind_to_port,
            listener_filters_timeout: config.listener_filters_timeout,
            continue_on_listener_filters_timeout: config.continue_on_listener_filters_timeout,
            max_accepts_per_wakeup: config.max_accepts_per_wakeup,
            origin,
            stop_accepting: watch::channel(false).0,
            drain: watch::channel(false).0,
            sockets: Mutex::new(Vec::new()),
            raw: config.raw,
        }))
    }

    /// The HTTP connection managers of its chains.
    pub fn http_managers(&self) -> impl Iterator<Item = &Arc<HttpConnectionManager>> {
        self.chains.all().filter_map(|c| match &c.filter {
            ChainFilter::Http(hcm) => Some(hcm),
            ChainFilter::Tcp(_) => None,
        })
    }

    /// The TLS contexts of its chains.
    pub fn tls_contexts(&self) -> impl Iterator<Item = &Arc<ServerTlsContext>> {
        self.chains.all().filter_map(|c| c.tls.as_ref())
    }

    /// The RDS route configurations this listener waits for.
    pub fn rds_names(&self) -> impl Iterator<Item = &str> {
        self.http_managers().filter_map(|h| h.rds_name.as_deref())
    }

    /// Whether a connection manager of it takes its scopes from SRDS.
    pub fn uses_srds(&self) -> bool {
        self.http_managers()
            .any(|h| h.scoped.as_deref().is_some_and(|s| s.is_srds()))
    }

    /// Stops accepting and drains every connection (removal, or a replacement that
    /// changes more than its filter chains).
    pub fn retire(&self) {
        self.stop_accepting.send_replace(true);
        self.drain.send_replace(true);
        for chain in self.chains.all() {
            chain.drain.send_replace(true);
        }
    }

    /// Whether a listener resource (its address and document) differs from this
    /// one only in its filter chains: then an update keeps the unchanged chains.
    pub fn updates_in_place(&self, address: SocketAddr, raw: &Value) -> bool {
        let strip = |raw: &Value| {
            let mut v = raw.clone();
            if let Some(o) = v.as_object_mut() {
                o.remove("filter_chains");
                o.remove("default_filter_chain");
            }
            v
        };
        self.configured == address && strip(&self.raw) == strip(raw)
    }

    /// Envoy's in-place filter chain update: `next` differs from this listener only
    /// in its filter chains. This one stops accepting; the connections of chains
    /// `next` has unchanged go on, those of changed or removed chains drain.
    /// Returns false (and does nothing) when more than the chains changed.
    pub fn retire_in_place(&self, next: &Listener) -> bool {
        if !self.updates_in_place(next.configured, &next.raw) {
            return false;
        }
        self.stop_accepting.send_replace(true);
        for chain in self.chains.all() {
            if !next.chains.all().any(|n| Arc::ptr_eq(n, chain)) {
                chain.drain.send_replace(true);
            }
        }
        true
    }

    /// Whether an SDS secret it needs has not arrived.
    pub fn waits_for_secrets(&self) -> bool {
        self.tls_contexts().any(|t| t.config.is_warming())
    }

    /// Binds one `SO_REUSEPORT` socket per worker (port 0 is resolved by the
    /// first), without listening: a warming listener refuses connections, as in
    /// Envoy, until [`listen`] on activation. A `bind_to_port: false` listener
    /// binds nothing.
    pub fn bind(&self, workers: usize) -> Result<Vec<Socket>> {
        if !self.bind_to_port {
            return Ok(Vec::new());
        }
        let first = bind_socket(self.configured, true)?;
        let actual = first
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or_else(|| Error::Bind {
                address: self.configured,
                source: std::io::Error::other("no local address"),
            })?;
        let mut sockets = vec![first];
        for _ in 1..workers.max(1) {
            sockets.push(bind_socket(actual, true)?);
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

/// The active listeners by address, as every worker sees them: where a
/// `use_original_dst` listener hands a connection whose original destination it
/// restored (Envoy's `ConnectionHandlerImpl::getBalancedHandlerByAddress`).
/// Published by the listener manager with each new listener set.
#[derive(Default)]
pub struct ListenersByAddress(ArcSwap<HashMap<SocketAddr, Arc<Listener>>>);

impl ListenersByAddress {
    pub fn publish<'a>(&self, active: impl Iterator<Item = &'a Arc<Listener>>) {
        let map = active.map(|l| (l.address(), l.clone())).collect();
        self.0.store(Arc::new(map));
    }

    /// The listener on `address`, else the one on the wildcard address of its
    /// family and port; a listener that stopped accepting takes nothing.
    pub fn find(&self, address: SocketAddr) -> Option<Arc<Listener>> {
        let map = self.0.load();
        let any: IpAddr = match address {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        [address, SocketAddr::new(any, address.port())]
            .iter()
            .filter_map(|a| map.get(a))
            .find(|l| !*l.stop_accepting.borrow())
            .cloned()
    }
}

/// A connection's share of its listener's `downstream_cx_*` stats (the worker's
/// too), from when the listener takes it until it closes. A connection handed
/// off by a `use_original_dst` listener counts on the listener that serves it,
/// as in Envoy, where only that one makes a connection of the socket.
pub struct ListenerConnectionStats {
    listener: Arc<Listener>,
    worker_active: Gauge,
}

impl ListenerConnectionStats {
    /// Counts a connection on `listener`, from the worker this runs on.
    pub fn open(listener: &Arc<Listener>) -> Self {
        let stats = &listener.stats;
        stats.downstream_cx_total.inc();
        stats.downstream_cx_active.inc();
        // Worker `i` writes shard `i + 1` (per_worker).
        let worker = crate::per_worker::shard().saturating_sub(1);
        let (worker_total, worker_active) =
            stats.per_worker[worker.min(stats.per_worker.len() - 1)].clone();
        worker_total.inc();
        worker_active.inc();
        ListenerConnectionStats {
            listener: listener.clone(),
            worker_active,
        }
    }
}

impl Drop for ListenerConnectionStats {
    fn drop(&mut self) {
        self.listener.stats.downstream_cx_active.dec();
        self.worker_active.dec();
        self.listener.stats.downstream_cx_destroy.inc();
    }
}

/// A listening socket on `addr`.
pub fn bind(addr: SocketAddr, reuse_port: bool) -> Result<StdTcpListener> {
    listen(bind_socket(addr, reuse_port)?, addr)
}

/// Starts listening on a bound socket.
pub fn listen(socket: Socket, addr: SocketAddr) -> Result<StdTcpListener> {
    let err = |source| Error::Bind {
        address: addr,
        source,
    };
    socket.listen(1024).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    Ok(socket.into())
}

fn bind_socket(addr: SocketAddr, reuse_port: bool) -> Result<Socket> {
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
    Ok(socket)
}

/// Whether a listener's configuration names an RDS route table (for warming).
pub fn uses_rds(config: &ListenerConfig) -> bool {
    config.chains().any(
        |c| matches!(&c.filter, NetworkFilter::Http(h) if matches!(h.routes, RouteSource::Rds(_))),
    )
}

/// Builds one filter chain: its TLS context and its network filter.
fn build_chain(
    listener: &str,
    config: FilterChainConfig,
    cx: &BuildContext<'_>,
    ssl_stats: &SslStats,
) -> Result<Arc<FilterChain>> {
    let log_options = AccessLogOptions {
        workers: cx.workers,
        flush: cx.file_flush,
    };
    let access_log_error = |source| Error::Io {
        context: format!("listener '{listener}': cannot open access log"),
        source,
    };
    let tls = match config.tls {
        Some(tls) => Some(Arc::new(
            ServerTlsContext::new(tls, &cx.clusters.secrets, ssl_stats.clone())
                .map_err(|e| Error::Config(vec![e]))?,
        )),
        None => None,
    };
    let filter = match config.filter {
        NetworkFilter::Http(hcm) => {
            let filters = match (hcm.http_filters.is_empty(), cx.filter_factory) {
                (true, _) => None,
                (false, Some(factory)) => Some(
                    factory
                        .build(&hcm.http_filters, cx.store)
                        .map_err(Error::Config)?,
                ),
                (false, None) => {
                    return Err(Error::Config(
                        hcm.http_filters
                            .iter()
                            .map(|f| {
                                format!("{}: Python filters need envoyx's Python runtime", f.path)
                            })
                            .collect(),
                    ));
                }
            };
            ChainFilter::Http(
                HttpConnectionManager::new(
                    hcm,
                    cx.clusters.clone(),
                    cx.store,
                    filters,
                    log_options,
                )
                .map_err(access_log_error)?,
            )
        }
        NetworkFilter::Tcp(tcp) => ChainFilter::Tcp(
            TcpProxy::new(tcp, cx.clusters.clone(), cx.store, log_options)
                .map_err(access_log_error)?,
        ),
    };
    Ok(Arc::new(FilterChain {
        name: config.name,
        matcher: config.matcher,
        tls,
        handshake_timeout: config.handshake_timeout,
        filter,
        raw: config.raw,
        drain: watch::channel(false).0,
    }))
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
