//! The server: listeners bound with SO_REUSEPORT, one current-thread tokio runtime per
//! worker, a control thread for admin and DNS, configuration applied while serving
//! (xDS or `Server.update`), and drain/stop.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use tokio::sync::{Notify, mpsc, watch};

use crate::access_log::FlushSettings;
use crate::config::{AdminConfig, Bootstrap, RouteConfig};
use crate::error::{Error, Result};
use crate::http::filter::FilterFactory;
use crate::listener::{Listener, ListenerFilter, bind};
use crate::router::RouteTable;
use crate::stats::{Gauge, StatStore};
use crate::upstream::cluster::Origin;
use crate::upstream::{ClusterManager, WorkerPools};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Clone)]
pub struct ServerOptions {
    /// `--concurrency`: number of workers (at least 1).
    pub concurrency: usize,
    /// `--drain-time-s`: how long in-flight requests may take once stop begins.
    pub drain_time: Duration,
    /// Builds the chains of `envoyx.filters.http.python` filters (the Python
    /// bindings give one); without it such filters are a configuration error.
    pub filter_factory: Option<Arc<dyn FilterFactory>>,
    /// `--file-flush-interval-msec` and `--file-flush-min-size-kb`: when access
    /// logs write their buffered lines.
    pub file_flush: FlushSettings,
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("concurrency", &self.concurrency)
            .field("drain_time", &self.drain_time)
            .field("filter_factory", &self.filter_factory.is_some())
            .field("file_flush", &self.file_flush)
            .finish()
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            concurrency: std::thread::available_parallelism().map_or(1, |n| n.get()),
            drain_time: Duration::from_secs(600),
            filter_factory: None,
            file_flush: FlushSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ServerState {
    Initializing = 0,
    Live = 1,
    Draining = 2,
    Stopped = 3,
}

/// The xDS resource types the core applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceKind {
    Listener,
    RouteConfiguration,
    Cluster,
    ClusterLoadAssignment,
}

impl ResourceKind {
    pub fn from_type_url(url: &str) -> Option<Self> {
        Some(match url.rsplit('/').next().unwrap_or(url) {
            "envoy.config.listener.v3.Listener" => ResourceKind::Listener,
            "envoy.config.route.v3.RouteConfiguration" => ResourceKind::RouteConfiguration,
            "envoy.config.cluster.v3.Cluster" => ResourceKind::Cluster,
            "envoy.config.endpoint.v3.ClusterLoadAssignment" => ResourceKind::ClusterLoadAssignment,
            _ => return None,
        })
    }
}

/// A worker's instructions from the control side.
enum WorkerCommand {
    /// Start accepting on this worker's socket of a listener.
    Listen(Arc<Listener>, StdTcpListener),
}

/// A route configuration received over RDS, shared by every listener naming it.
pub struct DynamicRoutes {
    pub table: Arc<RouteTable>,
    pub origin: Origin,
    pub raw: Value,
}

/// Active and warming listeners (static ones are active from the start).
#[derive(Default)]
pub struct ListenerSet {
    pub active: Vec<Arc<Listener>>,
    /// Waiting for their route configuration (RDS) before they serve.
    pub warming: Vec<Arc<Listener>>,
    pub lds_version: String,
}

/// What the admin endpoint, the workers and the handle share.
pub struct Shared {
    pub store: Arc<StatStore>,
    pub clusters: Arc<ClusterManager>,
    pub listeners: Mutex<ListenerSet>,
    pub routes: Mutex<HashMap<String, DynamicRoutes>>,
    workers: Mutex<Vec<mpsc::UnboundedSender<WorkerCommand>>>,
    /// Serialises configuration changes.
    apply_lock: Mutex<()>,
    pub bootstrap_raw: Value,
    pub node: Value,
    pub options: ServerOptions,
    pub started_at: Instant,
    pub loaded_at: SystemTime,
    state: AtomicU8,
    pub healthcheck_failed: AtomicBool,
    stop_tx: watch::Sender<bool>,
    /// Set by `/quitquitquit` or `stop()`; `wait()` blocks on it.
    quit: (Mutex<bool>, Condvar),
    pub admin_address: Mutex<Option<SocketAddr>>,
    uptime: Gauge,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
        for l in &lock(&self.listeners).active {
            l.drain.send_replace(true);
        }
    }

    /// Asks the owner of the handle to stop (what `/quitquitquit` does).
    pub fn request_quit(&self) {
        self.drain();
        let (flag, cv) = &self.quit;
        *lock(flag) = true;
        cv.notify_all();
    }

    /// Gauges computed when read.
    pub fn refresh_gauges(&self) {
        self.uptime.set(self.started_at.elapsed().as_secs() as i64);
        let set = lock(&self.listeners);
        self.store
            .gauge("listener_manager.total_listeners_active")
            .set(set.active.len() as i64);
        self.store
            .gauge("listener_manager.total_listeners_warming")
            .set(set.warming.len() as i64);
    }

    pub fn active_listeners(&self) -> Vec<Arc<Listener>> {
        lock(&self.listeners).active.clone()
    }

    /// Hands a warm listener's sockets to the workers and retires the listener it
    /// replaces (same name), which drains.
    fn activate(&self, set: &mut ListenerSet, listener: Arc<Listener>) {
        let sockets = std::mem::take(&mut *lock(&listener.sockets));
        let workers = lock(&self.workers);
        for (worker, socket) in workers.iter().zip(sockets) {
            let _ = worker.send(WorkerCommand::Listen(listener.clone(), socket));
        }
        drop(workers);
        set.warming.retain(|l| !Arc::ptr_eq(l, &listener));
        if let Some(pos) = set.active.iter().position(|l| l.name == listener.name) {
            let old = std::mem::replace(&mut set.active[pos], listener);
            old.drain.send_replace(true);
            self.store
                .counter("listener_manager.listener_modified")
                .inc();
        } else {
            set.active.push(listener);
            self.store.counter("listener_manager.listener_added").inc();
        }
    }

    /// Applies xDS resources of one kind; returns the rejected ones with why.
    /// Valid resources are applied even when others are rejected.
    pub fn apply(
        &self,
        kind: ResourceKind,
        resources: Vec<(String, String)>,
        removed: &[String],
        version: &str,
    ) -> Vec<(String, String)> {
        let _apply = lock(&self.apply_lock);
        let mut rejected = Vec::new();
        let mut parsed = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (name, json) in resources {
            if !seen.insert(name.clone()) {
                rejected.push((name, "duplicate resource name in one update".to_string()));
                continue;
            }
            match serde_json::from_str::<Value>(&json) {
                Ok(doc) => parsed.push((name, doc)),
                Err(e) => rejected.push((name, format!("invalid JSON: {e}"))),
            }
        }
        use crate::config::bootstrap as map;
        match kind {
            ResourceKind::Cluster => {
                let mut upserts = Vec::new();
                for (name, doc) in parsed {
                    match map::map_cluster_resource(&doc) {
                        Ok(c) if c.name == name => upserts.push(c),
                        Ok(c) => rejected.push((
                            name,
                            format!("resource name does not match cluster name '{}'", c.name),
                        )),
                        Err(errs) => rejected.push((name, errs.join("; "))),
                    }
                }
                self.clusters.apply(upserts, removed, version);
            }
            ResourceKind::ClusterLoadAssignment => {
                let mut upserts = Vec::new();
                for (name, doc) in parsed {
                    match map::map_load_assignment_resource(&doc) {
                        Ok((_, endpoints)) => {
                            let addrs = endpoints
                                .iter()
                                .filter_map(|e| {
                                    e.address.parse().ok().map(|ip| SocketAddr::new(ip, e.port))
                                })
                                .collect();
                            upserts.push((name, addrs));
                        }
                        Err(errs) => rejected.push((name, errs.join("; "))),
                    }
                }
                self.clusters.apply_endpoints(upserts, removed);
            }
            ResourceKind::RouteConfiguration => {
                let mut upserts: Vec<RouteConfig> = Vec::new();
                for (name, doc) in parsed {
                    match map::map_route_config_resource(&doc) {
                        Ok(rc) if rc.name != name => rejected.push((
                            name,
                            format!(
                                "resource name does not match route configuration name '{}'",
                                rc.name
                            ),
                        )),
                        Ok(rc) => match self.unknown_clusters(&rc) {
                            Some(err) => rejected.push((name, err)),
                            None => upserts.push(rc),
                        },
                        Err(errs) => rejected.push((name, errs.join("; "))),
                    }
                }
                self.apply_routes(upserts, removed, version);
            }
            ResourceKind::Listener => {
                for (name, doc) in parsed {
                    if let Err(e) = self.apply_listener(&name, &doc, version) {
                        rejected.push((name, e));
                    }
                }
                let mut set = lock(&self.listeners);
                for name in removed {
                    if let Some(pos) = set.active.iter().position(|l| &l.name == name) {
                        let old = set.active.remove(pos);
                        old.drain.send_replace(true);
                        self.store
                            .counter("listener_manager.listener_removed")
                            .inc();
                    }
                    set.warming.retain(|l| &l.name != name);
                }
                set.lds_version = version.to_string();
            }
        }
        self.refresh_gauges();
        rejected
    }

    fn apply_listener(
        &self,
        name: &str,
        doc: &Value,
        version: &str,
    ) -> std::result::Result<(), String> {
        let config =
            crate::config::bootstrap::map_listener_resource(doc).map_err(|e| e.join("; "))?;
        if config.name != name {
            return Err(format!(
                "resource name does not match listener name '{}'",
                config.name
            ));
        }
        let mut set = lock(&self.listeners);
        // A State-of-the-World response repeats unchanged listeners: leave them be.
        if set
            .active
            .iter()
            .any(|l| l.name == name && l.raw == config.raw)
        {
            return Ok(());
        }
        if let Some(other) =
            set.active.iter().chain(&set.warming).find(|l| {
                l.name != name && config.address.port() != 0 && l.address() == config.address
            })
        {
            return Err(format!(
                "error adding listener '{name}': has duplicate address '{}' as existing listener '{}'",
                config.address, other.name
            ));
        }
        let workers = self.options.concurrency.max(1);
        let listener = Listener::build(
            config,
            &self.clusters,
            &self.store,
            workers,
            Origin::dynamic(version),
            self.options.filter_factory.as_deref(),
            self.options.file_flush,
        )
        .map_err(|e| e.to_string())?;
        // Bind now, as Envoy does, so that a port in use is refused (NACKed) at once.
        let sockets = listener.bind(workers).map_err(|e| e.to_string())?;
        *lock(&listener.sockets) = sockets;
        let warm = match listener.rds_name() {
            None => true,
            Some(rds) => match lock(&self.routes).get(rds) {
                Some(routes) => {
                    if let ListenerFilter::Http(hcm) = &listener.filter {
                        hcm.routes.store(routes.table.clone());
                    }
                    true
                }
                None => false,
            },
        };
        set.warming.retain(|l| l.name != name);
        if warm {
            self.activate(&mut set, listener);
        } else {
            set.warming.push(listener);
        }
        Ok(())
    }

    /// With `validate_clusters`, the first route naming a cluster that does not exist.
    fn unknown_clusters(&self, rc: &RouteConfig) -> Option<String> {
        if rc.validate_clusters != Some(true) {
            return None;
        }
        let known = |name: &str| {
            self.clusters.get(name).is_some()
                || self.clusters.warming().iter().any(|c| c.name == name)
        };
        rc.virtual_hosts
            .iter()
            .flat_map(|vh| &vh.routes)
            .find_map(|r| match &r.action {
                crate::config::RouteAction::Forward(f) if !known(&f.cluster) => {
                    Some(format!("route: unknown cluster '{}'", f.cluster))
                }
                _ => None,
            })
    }

    fn apply_routes(&self, upserts: Vec<RouteConfig>, removed: &[String], version: &str) {
        let mut routes = lock(&self.routes);
        let mut set = lock(&self.listeners);
        for rc in upserts {
            let name = rc.name.clone();
            let raw = rc.raw.clone();
            if routes.get(&name).is_some_and(|r| r.raw == raw) {
                continue;
            }
            let table = RouteTable::new(rc);
            for l in set.active.iter().chain(&set.warming) {
                if let ListenerFilter::Http(hcm) = &l.filter
                    && hcm.rds_name.as_deref() == Some(name.as_str())
                {
                    hcm.routes.store(table.clone());
                }
            }
            routes.insert(
                name.clone(),
                DynamicRoutes {
                    table,
                    origin: Origin::dynamic(version),
                    raw,
                },
            );
            let now_warm: Vec<Arc<Listener>> = set
                .warming
                .iter()
                .filter(|l| l.rds_name() == Some(name.as_str()))
                .cloned()
                .collect();
            for l in now_warm {
                self.activate(&mut set, l);
            }
        }
        // Removing a route configuration leaves listeners with the table they have,
        // as Envoy does; it only stops being offered to new listeners.
        for name in removed {
            routes.remove(name);
        }
    }

    /// Names of resources the core waits for: RDS route configurations named by
    /// listeners, EDS services of clusters.
    pub fn wanted_resources(&self, kind: ResourceKind) -> Vec<String> {
        let mut names: Vec<String> = match kind {
            ResourceKind::RouteConfiguration => {
                let set = lock(&self.listeners);
                set.active
                    .iter()
                    .chain(&set.warming)
                    .filter_map(|l| l.rds_name().map(str::to_string))
                    .collect()
            }
            ResourceKind::ClusterLoadAssignment => self.clusters.wanted_eds_services(),
            ResourceKind::Listener | ResourceKind::Cluster => Vec::new(),
        };
        names.sort();
        names.dedup();
        names
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
        let clusters = ClusterManager::new(&bootstrap.clusters, &store);
        let workers = options.concurrency.max(1);
        let mut active = Vec::new();
        for l in bootstrap.listeners {
            active.push(Listener::build(
                l,
                &clusters,
                &store,
                workers,
                Origin::bootstrap(),
                options.filter_factory.as_deref(),
                options.file_flush,
            )?);
        }
        store
            .counter("listener_manager.listener_added")
            .add(active.len() as u64);
        store
            .gauge("server.concurrency")
            .set(options.concurrency as i64);
        let uptime = store.gauge("server.uptime");
        let shared = Arc::new(Shared {
            clusters,
            listeners: Mutex::new(ListenerSet {
                active,
                ..Default::default()
            }),
            routes: Mutex::new(HashMap::new()),
            workers: Mutex::new(Vec::new()),
            apply_lock: Mutex::new(()),
            bootstrap_raw: bootstrap.raw,
            node: bootstrap.node,
            options,
            started_at: Instant::now(),
            loaded_at: SystemTime::now(),
            state: AtomicU8::new(ServerState::Initializing as u8),
            healthcheck_failed: AtomicBool::new(false),
            stop_tx: watch::channel(false).0,
            quit: (Mutex::new(false), Condvar::new()),
            admin_address: Mutex::new(None),
            uptime,
            store,
        });
        shared.set_state(ServerState::Initializing);
        shared.refresh_gauges();
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
        self.start_with(true)
    }

    /// Like [`Server::start`]; with `live: false` the server stays INITIALIZING
    /// (admin `/ready` answers 503) until [`Server::mark_live`], as Envoy does while
    /// its xDS initial fetch is in progress.
    pub fn start_with(&self, live: bool) -> Result<()> {
        if self.started.swap(true, Ordering::SeqCst) {
            return Err(Error::State("server already started".into()));
        }
        let shared = self.shared.clone();
        let workers = shared.options.concurrency.max(1);
        let admin_listener = match &self.admin {
            Some(admin) => {
                let l = bind(admin.address, false)?;
                *lock(&shared.admin_address) = l.local_addr().ok();
                Some(l)
            }
            None => None,
        };
        // One socket per worker per listener, all bound before anything serves so
        // that a port in use fails start.
        let listeners = shared.active_listeners();
        let mut sockets: Vec<Vec<(Arc<Listener>, StdTcpListener)>> =
            (0..workers).map(|_| Vec::new()).collect();
        for listener in &listeners {
            for (i, socket) in listener.bind(workers)?.into_iter().enumerate() {
                sockets[i].push((listener.clone(), socket));
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
        let mut senders = Vec::new();
        for (i, worker_sockets) in sockets.into_iter().enumerate() {
            let shared = shared.clone();
            let (tx, rx) = mpsc::unbounded_channel();
            senders.push(tx);
            let t = std::thread::Builder::new()
                .name(format!("envoyx-wrk-{i}"))
                .spawn(move || worker_thread(shared, i, worker_sockets, rx))
                .map_err(|source| Error::Io {
                    context: "cannot start a worker thread".into(),
                    source,
                })?;
            threads.push(t);
        }
        *lock(&shared.workers) = senders;
        shared
            .store
            .gauge("listener_manager.workers_started")
            .set(1);
        if live {
            shared.set_state(ServerState::Live);
        }
        crate::log!(
            Info,
            "main",
            "starting main dispatch loop with {workers} workers"
        );
        *lock(&self.threads) = threads;
        Ok(())
    }

    /// Ends initialization: `/ready` answers LIVE.
    pub fn mark_live(&self) {
        if self.shared.state() == ServerState::Initializing {
            self.shared.set_state(ServerState::Live);
        }
    }

    /// Applies xDS resources of one kind (see [`Shared::apply`]).
    pub fn apply(
        &self,
        kind: ResourceKind,
        resources: Vec<(String, String)>,
        removed: &[String],
        version: &str,
    ) -> Result<Vec<(String, String)>> {
        if !self.started.load(Ordering::SeqCst) {
            return Err(Error::State(
                "the server must be started before resources are applied".into(),
            ));
        }
        Ok(self.shared.apply(kind, resources, removed, version))
    }

    /// Stops accepting; open connections close as their requests finish.
    pub fn drain(&self) {
        self.shared.drain();
    }

    /// Drains, waits (up to drain time) for in-flight requests, joins every thread.
    pub fn stop(&self) {
        self.shared.drain();
        self.shared.stop_tx.send_replace(true);
        let threads = std::mem::take(&mut *lock(&self.threads));
        for t in threads {
            let _ = t.join();
        }
        // Workers render access-log lines into buffers; with the workers
        // stopped, write what they left before stop returns.
        crate::access_log::flush_all();
        self.shared.set_state(ServerState::Stopped);
        let (flag, cv) = &self.shared.quit;
        *lock(flag) = true;
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
            .active_listeners()
            .iter()
            .map(|l| (l.name.clone(), l.address()))
            .collect()
    }

    pub fn admin_address(&self) -> Option<SocketAddr> {
        *lock(&self.shared.admin_address)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.started.load(Ordering::SeqCst) && self.shared.state() != ServerState::Stopped {
            self.stop();
        }
    }
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
    shared.clusters.set_control_runtime(rt.handle().clone());
    rt.block_on(async move {
        // First DNS answers before workers serve; then refresh in the background.
        crate::upstream::cluster::resolve_static_dns(&shared.clusters).await;
        let _ = ready.send(());
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

fn worker_thread(
    shared: Arc<Shared>,
    worker: usize,
    sockets: Vec<(Arc<Listener>, StdTcpListener)>,
    mut commands: mpsc::UnboundedReceiver<WorkerCommand>,
) {
    crate::worker::enter(worker);
    let rt = current_thread_runtime();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let pools = WorkerPools::new();
        let tracker = Rc::new(ConnectionTracker::default());
        let listen = |listener: Arc<Listener>, socket: StdTcpListener| {
            match tokio::net::TcpListener::from_std(socket) {
                Ok(s) => {
                    tokio::task::spawn_local(accept_loop(
                        worker,
                        listener,
                        s,
                        pools.clone(),
                        tracker.clone(),
                    ));
                }
                Err(e) => crate::log!(Error, "main", "listener '{}': {e}", listener.name),
            }
        };
        for (listener, socket) in sockets {
            listen(listener, socket);
        }
        let mut stop = shared.stop_tx.subscribe();
        // Idle connections to clusters that were removed or replaced are closed
        // on this beat.
        let mut prune = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(WorkerCommand::Listen(listener, socket)) => listen(listener, socket),
                    None => break,
                },
                _ = prune.tick() => pools.prune(&shared.clusters.live_ids()),
                _ = stop.wait_for(|s| *s) => break,
            }
        }
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
) {
    let mut drain = listener.drain.subscribe();
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
