//! The listener manager (Envoy's `ListenerManagerImpl`): active and warming
//! listeners, the RDS route configurations they share, and the hand-off of a warm
//! listener's sockets to the workers.
//!
//! Readers (admin, `Server.stats()`, `config_dump`) load immutable snapshots and
//! never wait for a writer. Writers are serialised by the caller ([`Instance::apply`]
//! holds its apply lock) and publish a new snapshot. Listeners (and their Python
//! filters, whose construction needs the GIL) are built *before* any lock is taken:
//! a thread holding the GIL may be waiting for one of these locks.
//!
//! [`Instance::apply`]: crate::instance::Instance::apply

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::config::scoped_route::{ScopeConfig, ScopeRoute};
use crate::config::{RouteConfig, bootstrap as map};
use crate::listener::{BuildContext, Listener, ListenersByAddress};
use crate::options::ServerOptions;
use crate::router::RouteTable;
use crate::stats::StatStore;
use crate::upstream::ClusterManager;
use crate::upstream::cluster::Origin;

/// A worker's instructions from the control side.
pub enum WorkerCommand {
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
#[derive(Default, Clone)]
pub struct ListenerSet {
    pub active: Vec<Arc<Listener>>,
    /// Waiting for their route configuration (RDS) before they serve.
    pub warming: Vec<Arc<Listener>>,
    pub lds_version: String,
}

pub type RouteSet = HashMap<String, Arc<DynamicRoutes>>;

/// The scopes received over SRDS (`ScopedRouteConfiguration`), shared by every
/// connection manager with `scoped_rds`: over ADS they all take the one wildcard
/// subscription's resources, as Envoy's do.
#[derive(Default, Clone)]
pub struct ScopeSet {
    /// By name (Envoy dumps them in name order).
    pub scopes: BTreeMap<String, Arc<DynamicScope>>,
    /// Of the last update applied; None until the first answer (listeners with
    /// `scoped_rds` warm until then).
    pub origin: Option<Origin>,
}

pub struct DynamicScope {
    pub key: Vec<String>,
    /// `route_configuration_name`: its table comes by RDS.
    pub route: String,
    pub raw: Value,
}

/// A listener resource built and bound, not yet installed.
pub struct BuiltListener {
    listener: Arc<Listener>,
}

pub struct ListenerManager {
    listeners: ArcSwap<ListenerSet>,
    /// The active listeners by address, republished with every set: the
    /// workers' hand-off targets for `use_original_dst` listeners.
    pub by_address: Arc<ListenersByAddress>,
    routes: ArcSwap<RouteSet>,
    scopes: ArcSwap<ScopeSet>,
    /// One command channel per worker, set once the workers exist. Listeners
    /// activated before are queued in the channel until the worker runs.
    workers: Mutex<Vec<mpsc::UnboundedSender<WorkerCommand>>>,
    store: Arc<StatStore>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ListenerManager {
    pub fn new(active: Vec<Arc<Listener>>, store: &Arc<StatStore>) -> Self {
        store
            .counter("listener_manager.listener_added")
            .add(active.len() as u64);
        let by_address = Arc::new(ListenersByAddress::default());
        by_address.publish(active.iter());
        ListenerManager {
            listeners: ArcSwap::from_pointee(ListenerSet {
                active,
                ..Default::default()
            }),
            by_address,
            routes: ArcSwap::from_pointee(RouteSet::new()),
            scopes: ArcSwap::from_pointee(ScopeSet::default()),
            workers: Mutex::new(Vec::new()),
            store: store.clone(),
        }
    }

    /// Publishes a new listener set (and its listeners by address).
    fn store(&self, set: ListenerSet) {
        self.by_address.publish(set.active.iter());
        self.listeners.store(Arc::new(set));
    }

    /// The current listeners; a snapshot, never blocked by a writer.
    pub fn snapshot(&self) -> Arc<ListenerSet> {
        self.listeners.load_full()
    }

    /// The current RDS route configurations.
    pub fn routes(&self) -> Arc<RouteSet> {
        self.routes.load_full()
    }

    /// The current SRDS scopes.
    pub fn scopes(&self) -> Arc<ScopeSet> {
        self.scopes.load_full()
    }

    pub fn active(&self) -> Vec<Arc<Listener>> {
        self.listeners.load().active.clone()
    }

    /// Installs the workers' command channels (once, when they are created).
    pub fn set_workers(&self, senders: Vec<mpsc::UnboundedSender<WorkerCommand>>) {
        *lock(&self.workers) = senders;
    }

    /// Stops every active listener accepting; their connections drain.
    pub fn drain_all(&self) {
        for l in &self.listeners.load().active {
            l.retire();
        }
    }

    /// Maps, builds (Python filters included) and binds a listener resource. Takes
    /// no lock of the manager: call it before serialising the apply.
    pub fn build(
        &self,
        name: &str,
        doc: &Value,
        version: &str,
        clusters: &Arc<ClusterManager>,
        options: &ServerOptions,
    ) -> Result<Option<BuiltListener>, String> {
        let workers = options.concurrency.max(1);
        let config = map::map_listener_resource(doc).map_err(|e| e.join("; "))?;
        if config.name != name {
            return Err(format!(
                "resource name does not match listener name '{}'",
                config.name
            ));
        }
        // A State-of-the-World response repeats unchanged listeners: leave them be.
        if self
            .listeners
            .load()
            .active
            .iter()
            .any(|l| l.name == name && l.raw == config.raw)
        {
            return Ok(None);
        }
        if let Some(err) = address_clash(&self.listeners.load(), name, config.address) {
            return Err(err);
        }
        let cx = BuildContext {
            clusters,
            store: &self.store,
            workers,
            filter_factory: options.filter_factory.as_deref(),
            file_flush: options.file_flush,
        };
        let set = self.listeners.load();
        // Unchanged filter chains carry over only when nothing but chains changed.
        let previous = set
            .active
            .iter()
            .find(|l| l.name == name && l.updates_in_place(config.address, &config.raw));
        let listener = Listener::build(
            config,
            &cx,
            Origin::dynamic(version),
            previous.map(|l| &**l),
        )
        .map_err(|e| e.to_string())?;
        // Bind now, as Envoy does, so that a port in use is refused (NACKed) at once.
        let sockets = listener.bind(workers).map_err(|e| e.to_string())?;
        *lock(&listener.sockets) = sockets;
        Ok(Some(BuiltListener { listener }))
    }

    /// Installs built listeners and removes the named ones; the caller serialises
    /// applies. A listener whose routes are there activates at once, otherwise it
    /// warms until they arrive.
    pub fn install(
        &self,
        built: Vec<BuiltListener>,
        removed: &[String],
        version: &str,
    ) -> Vec<(String, String)> {
        let mut rejected = Vec::new();
        let mut set = (**self.listeners.load()).clone();
        let routes = self.routes.load();
        let scopes = self.scopes.load();
        for BuiltListener { listener } in built {
            // Checked again: an earlier listener of the same update may take the address.
            if let Some(err) = address_clash(&set, &listener.name, listener.configured) {
                rejected.push((listener.name.clone(), err));
                continue;
            }
            let warm = self.ready(&listener, &routes, &scopes);
            set.warming.retain(|l| l.name != listener.name);
            if warm {
                self.activate(&mut set, listener);
            } else {
                set.warming.push(listener);
            }
        }
        for name in removed {
            if let Some(pos) = set.active.iter().position(|l| &l.name == name) {
                let old = set.active.remove(pos);
                old.retire();
                self.store
                    .counter("listener_manager.listener_removed")
                    .inc();
            }
            set.warming.retain(|l| &l.name != name);
        }
        set.lds_version = version.to_string();
        self.store(set);
        rejected
    }

    /// Whether a listener has what it waits for (its RDS route tables, its SRDS
    /// scopes and their tables, which it then takes; its SDS secrets).
    fn ready(&self, listener: &Listener, routes: &RouteSet, scopes: &ScopeSet) -> bool {
        let mut ready = !listener.waits_for_secrets();
        for hcm in listener.http_managers() {
            if let Some(rds) = &hcm.rds_name {
                match routes.get(rds) {
                    Some(r) => hcm.routes.store(r.table.clone()),
                    None => ready = false,
                }
            }
            if let Some(scoped) = hcm.scoped.as_deref().filter(|s| s.is_srds()) {
                let complete = scopes.origin.is_some()
                    && scopes
                        .scopes
                        .values()
                        .all(|s| routes.contains_key(&s.route));
                if complete {
                    take_scopes(scoped, routes, scopes);
                } else {
                    ready = false;
                }
            }
        }
        ready
    }

    /// Hands a warm listener's sockets to the workers and retires the listener it
    /// replaces (same name), which drains.
    fn activate(&self, set: &mut ListenerSet, listener: Arc<Listener>) {
        let sockets = std::mem::take(&mut *lock(&listener.sockets));
        let address = listener.address();
        let sockets =
            sockets
                .into_iter()
                .filter_map(|s| match crate::listener::listen(s, address) {
                    Ok(l) => Some(l),
                    Err(e) => {
                        crate::log!(Error, "main", "listener '{}': {e}", listener.name);
                        None
                    }
                });
        for (worker, socket) in lock(&self.workers).iter().zip(sockets) {
            let _ = worker.send(WorkerCommand::Listen(listener.clone(), socket));
        }
        set.warming.retain(|l| !Arc::ptr_eq(l, &listener));
        if let Some(pos) = set.active.iter().position(|l| l.name == listener.name) {
            let old = std::mem::replace(&mut set.active[pos], listener.clone());
            if old.retire_in_place(&listener) {
                self.store
                    .counter("listener_manager.listener_in_place_updated")
                    .inc();
            } else {
                old.retire();
            }
            self.store
                .counter("listener_manager.listener_modified")
                .inc();
        } else {
            set.active.push(listener);
            self.store.counter("listener_manager.listener_added").inc();
        }
    }

    /// Installs RDS route configurations: every listener naming one gets the new
    /// table, and listeners warming for it activate. The caller serialises applies.
    pub fn apply_routes(&self, upserts: Vec<RouteConfig>, removed: &[String], version: &str) {
        let mut routes = (**self.routes.load()).clone();
        let mut set = (**self.listeners.load()).clone();
        for rc in upserts {
            let name = rc.name.clone();
            let raw = rc.raw.clone();
            if routes.get(&name).is_some_and(|r| r.raw == raw) {
                continue;
            }
            let table = RouteTable::new(rc);
            let scoped_uses = self.scopes.load().scopes.values().any(|s| s.route == name);
            // Envoy's `http.<stat_prefix>.rds.<name>.config_reload`: once per stat
            // prefix (Envoy's connection managers share one subscription per name).
            let mut reloaded = std::collections::BTreeSet::new();
            for l in set.active.iter().chain(&set.warming) {
                for hcm in l.http_managers() {
                    if hcm.rds_name.as_deref() == Some(name.as_str()) {
                        hcm.routes.store(table.clone());
                        reloaded.insert(&hcm.stat_prefix);
                    } else if scoped_uses && hcm.scoped.as_deref().is_some_and(|s| s.is_srds()) {
                        reloaded.insert(&hcm.stat_prefix);
                    }
                }
            }
            for prefix in reloaded {
                let stat = |s: &str| format!("http.{prefix}.rds.{name}.{s}");
                self.store.counter(&stat("config_reload")).inc();
                self.store
                    .gauge(&stat("config_reload_time_ms"))
                    .set(unix_ms());
                self.store.counter(&stat("update_empty")); // xDS never hands one over
            }
            routes.insert(
                name.clone(),
                Arc::new(DynamicRoutes {
                    table,
                    origin: Origin::dynamic(version),
                    raw,
                }),
            );
        }
        // Active listeners' scopes take their new tables; warming ones take them
        // when they activate.
        let scopes = self.scopes.load();
        for l in &set.active {
            for scoped in l.http_managers().filter_map(|h| h.scoped.as_deref()) {
                if scoped.is_srds() {
                    take_scopes(scoped, &routes, &scopes);
                }
            }
        }
        self.routes.store(Arc::new(routes));
        self.activate_ready(&mut set);
        // Removing a route configuration leaves listeners with the table they have,
        // as Envoy does; it only stops being offered to new listeners.
        let mut routes = (**self.routes.load()).clone();
        for name in removed {
            routes.remove(name);
        }
        self.routes.store(Arc::new(routes));
        self.store(set);
    }

    /// Installs SRDS scopes (Envoy's `ScopedRdsConfigSubscription::onConfigUpdate`):
    /// removals, then additions and changes, as one update. Two scopes with one key
    /// refuse the whole update, as Envoy does. Every connection manager with
    /// `scoped_rds` takes the new scopes; a scope whose table has not come yet
    /// answers 404 until it does (active listeners do not wait for it).
    pub fn apply_scopes(
        &self,
        upserts: Vec<ScopeConfig>,
        removed: &[String],
        version: &str,
    ) -> Vec<(String, String)> {
        let mut scopes = (**self.scopes.load()).clone();
        for name in removed {
            scopes.scopes.remove(name);
        }
        let names: Vec<String> = upserts.iter().map(|s| s.name.clone()).collect();
        for scope in upserts {
            let ScopeRoute::Rds(route) = scope.route else {
                continue; // SRDS scopes are mapped with route_configuration_name only
            };
            scopes.scopes.insert(
                scope.name,
                Arc::new(DynamicScope {
                    key: scope.key,
                    route,
                    raw: scope.raw,
                }),
            );
        }
        let mut by_key: HashMap<&[String], &str> = HashMap::new();
        for (name, scope) in &scopes.scopes {
            if let Some(first) = by_key.insert(&scope.key, name) {
                let why = format!(
                    "scope key conflict found, first scope is '{first}', second scope is '{name}'"
                );
                return names.into_iter().map(|n| (n, why.clone())).collect();
            }
        }
        scopes.origin = Some(Origin::dynamic(version));
        let mut set = (**self.listeners.load()).clone();
        let routes = self.routes.load();
        // Counted once per stat name: Envoy's managers with the same SRDS source
        // share one subscription.
        let mut reloaded = std::collections::HashSet::new();
        for l in set.active.iter().chain(&set.warming) {
            let active = set.active.iter().any(|a| Arc::ptr_eq(a, l));
            for hcm in l.http_managers() {
                let Some(scoped) = hcm.scoped.as_deref().filter(|s| s.is_srds()) else {
                    continue;
                };
                if let Some(stats) = &scoped.stats
                    && reloaded.insert((&hcm.stat_prefix, &scoped.name))
                {
                    stats.config_reload.inc();
                    stats.config_reload_time_ms.set(unix_ms());
                }
                if active {
                    take_scopes(scoped, &routes, &scopes);
                }
            }
        }
        self.scopes.store(Arc::new(scopes));
        self.activate_ready(&mut set);
        self.listeners.store(Arc::new(set));
        Vec::new()
    }

    /// Activates the warming listeners that have what they wait for.
    fn activate_ready(&self, set: &mut ListenerSet) {
        let routes = self.routes.load();
        let scopes = self.scopes.load();
        let now_warm: Vec<Arc<Listener>> = set
            .warming
            .iter()
            .filter(|l| self.ready(l, &routes, &scopes))
            .cloned()
            .collect();
        for l in now_warm {
            self.activate(set, l);
        }
    }

    /// SDS secrets changed: every TLS context naming one is rebuilt (new
    /// handshakes use it), and listeners waiting for them activate. Returns the
    /// secrets a context refused (name, why). The caller serialises applies.
    pub fn secrets_changed(
        &self,
        names: &[String],
        secrets: &crate::tls::SecretStore,
    ) -> Vec<(String, String)> {
        let mut rejected = Vec::new();
        let mut set = (**self.listeners.load()).clone();
        for l in set.active.iter().chain(&set.warming) {
            for tls in l.tls_contexts() {
                if let Some(name) = names.iter().find(|n| tls.config.uses_secret(n)) {
                    match tls.refresh(secrets) {
                        Ok(()) if tls.config.current().is_some() => {
                            tls.stats.context_update_by_sds.inc();
                        }
                        Ok(()) => {}
                        Err(e) => rejected.push((name.clone(), e)),
                    }
                }
            }
        }
        self.activate_ready(&mut set);
        self.store(set);
        rejected
    }

    /// SDS secrets named by active or warming listeners.
    pub fn wanted_secrets(&self) -> Vec<String> {
        let set = self.listeners.load();
        set.active
            .iter()
            .chain(&set.warming)
            .flat_map(|l| l.tls_contexts())
            .flat_map(|t| {
                t.config
                    .dynamic_secrets()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// RDS route configurations named by active or warming listeners, and by the
    /// SRDS scopes when a listener uses them.
    pub fn wanted_routes(&self) -> Vec<String> {
        let set = self.listeners.load();
        let listeners = || set.active.iter().chain(&set.warming);
        let mut names: Vec<String> = listeners()
            .flat_map(|l| l.rds_names().map(str::to_string).collect::<Vec<_>>())
            .collect();
        if listeners().any(|l| l.uses_srds()) {
            names.extend(self.scopes.load().scopes.values().map(|s| s.route.clone()));
        }
        names
    }
}

/// Now, in milliseconds since the epoch (Envoy's `config_reload_time_ms`).
fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A `scoped_rds` connection manager's scopes from the SRDS scopes and the RDS
/// tables: a scope whose table has not come has an empty one (404), as Envoy's
/// `NullConfigImpl`.
fn take_scopes(scoped: &crate::router::scoped::ScopedRoutes, routes: &RouteSet, scopes: &ScopeSet) {
    use crate::router::scoped::{Scope, ScopeTable};
    let list = scopes
        .scopes
        .iter()
        .map(|(name, s)| Scope {
            name: name.clone(),
            key: s.key.clone(),
            table: routes
                .get(&s.route)
                .map_or_else(|| RouteTable::empty(&s.route), |r| r.table.clone()),
        })
        .collect();
    scoped
        .table
        .store(ScopeTable::new(scoped.builder.clone(), list));
    if let Some(stats) = &scoped.stats {
        let n = scopes.scopes.len() as i64;
        stats.all_scopes.set(n);
        stats.active_scopes.set(n);
    }
}

/// Another listener on the same configured address (port 0 never clashes).
fn address_clash(set: &ListenerSet, name: &str, address: SocketAddr) -> Option<String> {
    set.active
        .iter()
        .chain(&set.warming)
        .find(|l| l.name != name && address.port() != 0 && l.address() == address)
        .map(|other| {
            format!(
                "error adding listener '{name}': has duplicate address '{address}' as existing listener '{}'",
                other.name
            )
        })
}
