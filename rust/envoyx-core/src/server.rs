//! The server: listeners bound with SO_REUSEPORT, one current-thread tokio runtime per
//! worker, a control thread for admin and DNS, and drain/stop.

use std::cell::Cell;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use socket2::{Domain, Socket, Type};
use tokio::sync::{Notify, watch};

use crate::config::{AdminConfig, Bootstrap, NetworkFilter};
use crate::error::{Error, Result};
use crate::http::HttpConnectionManager;
use crate::stats::{Counter, Gauge, StatStore};
use crate::tcp::TcpProxy;
use crate::upstream::{ClusterManager, WorkerPools};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// `--concurrency`: number of workers (at least 1).
    pub concurrency: usize,
    /// `--drain-time-s`: how long in-flight requests may take once stop begins.
    pub drain_time: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            concurrency: std::thread::available_parallelism().map_or(1, |n| n.get()),
            drain_time: Duration::from_secs(600),
        }
    }
}

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
    pub raw: Value,
}

/// Envoy's stat-name form of an address: `127.0.0.1_10000`, `[__1]_10000`.
pub fn address_stat_name(addr: &SocketAddr) -> String {
    addr.to_string().replace(':', "_")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ServerState {
    Initializing = 0,
    Live = 1,
    Draining = 2,
    Stopped = 3,
}

/// What the admin endpoint and the handle share.
pub struct Shared {
    pub store: Arc<StatStore>,
    pub clusters: Arc<ClusterManager>,
    pub listeners: Vec<Arc<Listener>>,
    pub bootstrap_raw: Value,
    pub node: Value,
    pub options: ServerOptions,
    pub started_at: Instant,
    pub loaded_at: SystemTime,
    state: AtomicU8,
    pub healthcheck_failed: AtomicBool,
    drain_tx: watch::Sender<bool>,
    stop_tx: watch::Sender<bool>,
    /// Set by `/quitquitquit` or `stop()`; `wait()` blocks on it.
    quit: (Mutex<bool>, Condvar),
    pub admin_address: Mutex<Option<SocketAddr>>,
    uptime: Gauge,
}

impl Shared {
    pub fn state(&self) -> ServerState {
        match self.state.load(Ordering::Relaxed) {
            0 => ServerState::Initializing,
            1 => ServerState::Live,
            2 => ServerState::Draining,
            _ => ServerState::Stopped,
        }
    }

    fn set_state(&self, s: ServerState) {
        self.state.store(s as u8, Ordering::Relaxed);
        self.store.gauge("server.state").set(match s {
            ServerState::Live => 0,
            ServerState::Draining => 1,
            ServerState::Initializing => 3,
            ServerState::Stopped => 2,
        });
        self.store
            .gauge("server.live")
            .set(i64::from(s == ServerState::Live));
    }

    /// Stops accepting everywhere; connections close once their requests finish.
    pub fn drain(&self) {
        if self.state() == ServerState::Live {
            self.set_state(ServerState::Draining);
        }
        self.drain_tx.send_replace(true);
    }

    /// Asks the owner of the handle to stop (what `/quitquitquit` does).
    pub fn request_quit(&self) {
        self.drain();
        let (lock, cv) = &self.quit;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }

    /// Gauges computed when read.
    pub fn refresh_gauges(&self) {
        self.uptime.set(self.started_at.elapsed().as_secs() as i64);
    }
}

pub struct Server {
    shared: Arc<Shared>,
    admin: Option<AdminConfig>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    started: AtomicBool,
}

impl Server {
    /// Builds every runtime object of a mapped bootstrap; binds nothing yet.
    pub fn new(bootstrap: Bootstrap, options: ServerOptions) -> Result<Self> {
        let store = StatStore::new();
        let clusters = Arc::new(ClusterManager::new(&bootstrap.clusters, &store));
        let mut listeners = Vec::new();
        for l in bootstrap.listeners {
            let filter = match l.filter {
                NetworkFilter::Http(hcm) => ListenerFilter::Http(
                    HttpConnectionManager::new(hcm, clusters.clone(), &store).map_err(
                        |source| Error::Io {
                            context: format!("listener '{}': cannot open access log", l.name),
                            source,
                        },
                    )?,
                ),
                NetworkFilter::Tcp(tcp) => ListenerFilter::Tcp(
                    TcpProxy::new(tcp, clusters.clone(), &store).map_err(|source| Error::Io {
                        context: format!("listener '{}': cannot open access log", l.name),
                        source,
                    })?,
                ),
            };
            let prefix = format!("listener.{}.", address_stat_name(&l.address));
            listeners.push(Arc::new(Listener {
                stats: ListenerStats {
                    downstream_cx_total: store.counter(&format!("{prefix}downstream_cx_total")),
                    downstream_cx_active: store.gauge(&format!("{prefix}downstream_cx_active")),
                    downstream_cx_destroy: store.counter(&format!("{prefix}downstream_cx_destroy")),
                    per_worker: (0..options.concurrency.max(1))
                        .map(|i| {
                            (
                                store.counter(&format!("{prefix}worker_{i}.downstream_cx_total")),
                                store.gauge(&format!("{prefix}worker_{i}.downstream_cx_active")),
                            )
                        })
                        .collect(),
                },
                name: l.name,
                configured: l.address,
                bound: Mutex::new(None),
                filter,
                raw: l.raw,
            }));
        }
        store
            .gauge("listener_manager.total_listeners_active")
            .set(listeners.len() as i64);
        store
            .counter("listener_manager.listener_added")
            .add(listeners.len() as u64);
        store
            .gauge("server.concurrency")
            .set(options.concurrency as i64);
        let uptime = store.gauge("server.uptime");
        let shared = Arc::new(Shared {
            clusters,
            listeners,
            bootstrap_raw: bootstrap.raw,
            node: bootstrap.node,
            options,
            started_at: Instant::now(),
            loaded_at: SystemTime::now(),
            state: AtomicU8::new(ServerState::Initializing as u8),
            healthcheck_failed: AtomicBool::new(false),
            drain_tx: watch::channel(false).0,
            stop_tx: watch::channel(false).0,
            quit: (Mutex::new(false), Condvar::new()),
            admin_address: Mutex::new(None),
            uptime,
            store,
        });
        shared.set_state(ServerState::Initializing);
        Ok(Server {
            shared,
            admin: bootstrap.admin,
            threads: Mutex::new(Vec::new()),
            started: AtomicBool::new(false),
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Binds the admin endpoint and every listener, resolves DNS clusters once, and
    /// starts the workers. Returns once everything accepts connections.
    pub fn start(&self) -> Result<()> {
        if self.started.swap(true, Ordering::SeqCst) {
            return Err(Error::State("server already started".into()));
        }
        let shared = self.shared.clone();
        let workers = shared.options.concurrency.max(1);
        let admin_listener = match &self.admin {
            Some(admin) => {
                let l = bind(admin.address, false)?;
                *shared
                    .admin_address
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = l.local_addr().ok();
                Some(l)
            }
            None => None,
        };
        // One socket per worker per listener; port 0 is resolved by the first bind.
        let mut sockets: Vec<Vec<StdTcpListener>> = (0..workers).map(|_| Vec::new()).collect();
        for listener in &shared.listeners {
            let first = bind(listener.configured, true)?;
            let actual = first.local_addr().map_err(|source| Error::Bind {
                address: listener.configured,
                source,
            })?;
            *listener.bound.lock().unwrap_or_else(|e| e.into_inner()) = Some(actual);
            sockets[0].push(first);
            for worker_sockets in sockets.iter_mut().skip(1) {
                worker_sockets.push(bind(actual, true)?);
            }
        }

        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let admin_config = self.admin.as_ref().map(|a| a.access_logs.clone());
        let control_shared = shared.clone();
        let control = std::thread::Builder::new()
            .name("envoyx-main".into())
            .spawn(move || control_thread(control_shared, admin_listener, admin_config, ready_tx))
            .map_err(|source| Error::Io {
                context: "cannot start the control thread".into(),
                source,
            })?;
        let mut threads = vec![control];
        // Workers start after DNS clusters have their first answer, as Envoy's
        // cluster warming does before listeners serve.
        let _ = ready_rx.recv_timeout(Duration::from_secs(10));
        for (i, worker_sockets) in sockets.into_iter().enumerate() {
            let shared = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("envoyx-wrk-{i}"))
                .spawn(move || worker_thread(shared, i, worker_sockets))
                .map_err(|source| Error::Io {
                    context: "cannot start a worker thread".into(),
                    source,
                })?;
            threads.push(t);
        }
        shared
            .store
            .gauge("listener_manager.workers_started")
            .set(1);
        shared.set_state(ServerState::Live);
        crate::log!(
            Info,
            "main",
            "starting main dispatch loop with {workers} workers"
        );
        *self.threads.lock().unwrap_or_else(|e| e.into_inner()) = threads;
        Ok(())
    }

    /// Stops accepting; open connections close as their requests finish.
    pub fn drain(&self) {
        self.shared.drain();
    }

    /// Drains, waits (up to drain time) for in-flight requests, joins every thread.
    pub fn stop(&self) {
        self.shared.drain();
        self.shared.stop_tx.send_replace(true);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
        self.shared.set_state(ServerState::Stopped);
        let (lock, cv) = &self.shared.quit;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }

    /// Blocks until the server is asked to quit (or `timeout` passes); stops it then.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let (lock, cv) = &self.shared.quit;
        let mut quit = lock.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = timeout.map(|t| Instant::now() + t);
        while !*quit {
            match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return false;
                    }
                    quit = cv
                        .wait_timeout(quit, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                None => quit = cv.wait(quit).unwrap_or_else(|e| e.into_inner()),
            }
        }
        drop(quit);
        if self.shared.state() != ServerState::Stopped {
            self.stop();
        }
        true
    }

    pub fn running(&self) -> bool {
        matches!(
            self.shared.state(),
            ServerState::Live | ServerState::Draining
        )
    }

    pub fn listener_addresses(&self) -> Vec<(String, SocketAddr)> {
        self.shared
            .listeners
            .iter()
            .map(|l| {
                let bound = *l.bound.lock().unwrap_or_else(|e| e.into_inner());
                (l.name.clone(), bound.unwrap_or(l.configured))
            })
            .collect()
    }

    pub fn admin_address(&self) -> Option<SocketAddr> {
        *self
            .shared
            .admin_address
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.started.load(Ordering::SeqCst) && self.shared.state() != ServerState::Stopped {
            self.stop();
        }
    }
}

fn bind(addr: SocketAddr, reuse_port: bool) -> Result<StdTcpListener> {
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

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn control_thread(
    shared: Arc<Shared>,
    admin: Option<StdTcpListener>,
    admin_logs: Option<Vec<crate::config::AccessLogConfig>>,
    ready: std::sync::mpsc::Sender<()>,
) {
    let rt = current_thread_runtime();
    rt.block_on(async move {
        // First DNS answers before workers serve; then refresh in the background.
        let dns: Vec<_> = shared
            .clusters
            .all()
            .iter()
            .filter(|c| c.is_dns())
            .cloned()
            .collect();
        futures_util::future::join_all(dns.iter().map(|c| c.resolve())).await;
        let _ = ready.send(());
        for cluster in dns {
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(cluster.dns_refresh_rate).await;
                    cluster.resolve().await;
                }
            });
        }
        if let Some(listener) = admin {
            let logs = admin_logs.unwrap_or_default();
            tokio::spawn(crate::admin::serve(shared.clone(), listener, logs));
        }
        let mut stop = shared.stop_tx.subscribe();
        let _ = stop.wait_for(|s| *s).await;
    });
}

/// Counts a worker's open connections so that stop can wait for them.
#[derive(Default)]
struct ConnectionTracker {
    open: Cell<usize>,
    closed: Notify,
}

struct TrackedConnection(Rc<ConnectionTracker>);

impl TrackedConnection {
    fn new(t: &Rc<ConnectionTracker>) -> Self {
        t.open.set(t.open.get() + 1);
        TrackedConnection(t.clone())
    }
}

impl Drop for TrackedConnection {
    fn drop(&mut self) {
        self.0.open.set(self.0.open.get() - 1);
        if self.0.open.get() == 0 {
            self.0.closed.notify_waiters();
        }
    }
}

fn worker_thread(shared: Arc<Shared>, worker: usize, sockets: Vec<StdTcpListener>) {
    let rt = current_thread_runtime();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let pools = WorkerPools::new();
        let tracker = Rc::new(ConnectionTracker::default());
        for (listener, socket) in shared.listeners.iter().zip(sockets) {
            let socket = match tokio::net::TcpListener::from_std(socket) {
                Ok(s) => s,
                Err(e) => {
                    crate::log!(Error, "main", "listener '{}': {e}", listener.name);
                    continue;
                }
            };
            tokio::task::spawn_local(accept_loop(
                worker,
                listener.clone(),
                socket,
                pools.clone(),
                tracker.clone(),
                shared.drain_tx.subscribe(),
            ));
        }
        let mut stop = shared.stop_tx.subscribe();
        let _ = stop.wait_for(|s| *s).await;
        // In-flight requests may finish within the drain time; then the runtime
        // is dropped, which closes whatever is left.
        let deadline = tokio::time::Instant::now() + shared.options.drain_time;
        while tracker.open.get() > 0 {
            let closed = tracker.closed.notified();
            if tokio::time::timeout_at(deadline, closed).await.is_err() {
                break;
            }
        }
    });
}

async fn accept_loop(
    worker: usize,
    listener: Arc<Listener>,
    socket: tokio::net::TcpListener,
    pools: Rc<WorkerPools>,
    tracker: Rc<ConnectionTracker>,
    mut drain: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            r = socket.accept() => r,
            _ = drain.wait_for(|d| *d) => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                crate::log!(
                    Warn,
                    "conn_handler",
                    "listener '{}': accept failed: {e}",
                    listener.name
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let stats = &listener.stats;
        stats.downstream_cx_total.inc();
        stats.downstream_cx_active.inc();
        let (worker_total, worker_active) = stats.per_worker[worker].clone();
        worker_total.inc();
        worker_active.inc();
        let guard = TrackedConnection::new(&tracker);
        let listener = listener.clone();
        let pools = pools.clone();
        let drain = drain.clone();
        tokio::task::spawn_local(async move {
            match &listener.filter {
                ListenerFilter::Http(hcm) => hcm.clone().serve(pools, stream, peer, drain).await,
                ListenerFilter::Tcp(tcp) => tcp.clone().serve(pools, stream, peer, drain).await,
            }
            listener.stats.downstream_cx_active.dec();
            worker_active.dec();
            listener.stats.downstream_cx_destroy.inc();
            drop(guard);
        });
    }
}
