//! The server instance (Envoy's `Server::Instance`): what the admin endpoint, the
//! workers and the Python handle share — stats, the cluster and listener managers,
//! the server state — and the application of xDS resources.
//!
//! Lock rule (DESIGN.md §2): no lock of the instance is held while Python code runs
//! (listeners, with their Python filters, are built before the apply lock is taken),
//! and the bindings release the GIL around every call that can wait for one.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use serde_json::Value;
use tokio::sync::watch;

use crate::config::{RouteConfig, bootstrap as map};
use crate::listener_manager::ListenerManager;
pub use crate::options::{ServerOptions, VERSION};
use crate::stats::{Gauge, StatStore};
use crate::upstream::ClusterManager;

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
    ScopedRouteConfiguration,
    Cluster,
    ClusterLoadAssignment,
    Secret,
}

impl ResourceKind {
    pub fn from_type_url(url: &str) -> Option<Self> {
        Some(match url.rsplit('/').next().unwrap_or(url) {
            "envoy.config.listener.v3.Listener" => ResourceKind::Listener,
            "envoy.config.route.v3.RouteConfiguration" => ResourceKind::RouteConfiguration,
            "envoy.config.route.v3.ScopedRouteConfiguration" => {
                ResourceKind::ScopedRouteConfiguration
            }
            "envoy.config.cluster.v3.Cluster" => ResourceKind::Cluster,
            "envoy.config.endpoint.v3.ClusterLoadAssignment" => ResourceKind::ClusterLoadAssignment,
            "envoy.extensions.transport_sockets.tls.v3.Secret" => ResourceKind::Secret,
            _ => return None,
        })
    }
}

pub struct Instance {
    pub store: Arc<StatStore>,
    pub clusters: Arc<ClusterManager>,
    pub listeners: ListenerManager,
    /// Serialises configuration changes (never held while Python runs).
    apply_lock: Mutex<()>,
    pub bootstrap_raw: Value,
    pub node: Value,
    pub options: ServerOptions,
    pub started_at: Instant,
    pub loaded_at: SystemTime,
    state: AtomicU8,
    pub healthcheck_failed: AtomicBool,
    pub(crate) stop_tx: watch::Sender<bool>,
    /// Set by `/quitquitquit` or `stop()`; `wait()` blocks on it.
    pub(crate) quit: (Mutex<bool>, Condvar),
    pub admin_address: Mutex<Option<SocketAddr>>,
    uptime: Gauge,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Instance {
    pub(crate) fn new(
        store: Arc<StatStore>,
        clusters: Arc<ClusterManager>,
        listeners: ListenerManager,
        bootstrap_raw: Value,
        node: Value,
        options: ServerOptions,
    ) -> Arc<Self> {
        store
            .gauge("server.concurrency")
            .set(options.concurrency as i64);
        let instance = Arc::new(Instance {
            uptime: store.gauge("server.uptime"),
            store,
            clusters,
            listeners,
            apply_lock: Mutex::new(()),
            bootstrap_raw,
            node,
            options,
            started_at: Instant::now(),
            loaded_at: SystemTime::now(),
            state: AtomicU8::new(ServerState::Initializing as u8),
            healthcheck_failed: AtomicBool::new(false),
            stop_tx: watch::channel(false).0,
            quit: (Mutex::new(false), Condvar::new()),
            admin_address: Mutex::new(None),
        });
        instance.set_state(ServerState::Initializing);
        instance.refresh_gauges();
        instance
    }

    pub fn state(&self) -> ServerState {
        match self.state.load(Ordering::Relaxed) {
            0 => ServerState::Initializing,
            1 => ServerState::Live,
            2 => ServerState::Draining,
            _ => ServerState::Stopped,
        }
    }

    pub(crate) fn set_state(&self, s: ServerState) {
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

    /// Serialises a change of configuration (xDS apply, worker start).
    pub(crate) fn apply_guard(&self) -> MutexGuard<'_, ()> {
        lock(&self.apply_lock)
    }

    /// Stops accepting everywhere; connections close once their requests finish.
    pub fn drain(&self) {
        if self.state() == ServerState::Live {
            self.set_state(ServerState::Draining);
        }
        self.listeners.drain_all();
    }

    /// Asks the owner of the handle to stop (what `/quitquitquit` does).
    pub fn request_quit(&self) {
        self.drain();
        let (flag, cv) = &self.quit;
        *lock(flag) = true;
        cv.notify_all();
    }

    /// Gauges computed when read.
    /// The certificates of every TLS context (listeners' and clusters').
    pub fn cert_inventories(&self) -> Vec<Arc<crate::tls::secrets::CertInventory>> {
        let set = self.listeners.snapshot();
        let listeners = set.active.iter().chain(&set.warming).flat_map(|l| {
            l.tls_contexts()
                .map(|t| t.config.certs())
                .collect::<Vec<_>>()
        });
        let clusters = self
            .clusters
            .all()
            .into_iter()
            .filter_map(|c| c.tls.as_ref().map(|t| t.config.certs()));
        listeners.chain(clusters).collect()
    }

    pub fn refresh_gauges(&self) {
        self.uptime.set(self.started_at.elapsed().as_secs() as i64);
        // Envoy's server.days_until_first_cert_expiring (int max without any).
        let first = self
            .cert_inventories()
            .iter()
            .flat_map(|inv| {
                inv.chains
                    .iter()
                    .flat_map(|(_, chain)| chain.iter())
                    .chain(inv.cas.iter().map(|(_, ca)| ca))
                    .filter_map(|der| crate::tls::peer::cert_info(der))
                    .map(|info| crate::tls::days_until_expiration(info.not_after))
                    .collect::<Vec<_>>()
            })
            .min();
        self.store
            .gauge("server.days_until_first_cert_expiring")
            .set(first.unwrap_or(i64::from(i32::MAX)));
        let set = self.listeners.snapshot();
        self.store
            .gauge("listener_manager.total_listeners_active")
            .set(set.active.len() as i64);
        self.store
            .gauge("listener_manager.total_listeners_warming")
            .set(set.warming.len() as i64);
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
                let _apply = self.apply_guard();
                rejected.extend(self.clusters.apply(upserts, removed, version));
            }
            ResourceKind::ClusterLoadAssignment => {
                let mut upserts = Vec::new();
                for (name, doc) in parsed {
                    match map::map_load_assignment_resource(&doc) {
                        Ok((_, assignment)) => upserts.push((name, assignment)),
                        Err(errs) => rejected.push((name, errs.join("; "))),
                    }
                }
                let _apply = self.apply_guard();
                self.clusters.apply_endpoints(upserts, removed);
            }
            ResourceKind::RouteConfiguration => {
                let _apply = self.apply_guard();
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
                self.listeners.apply_routes(upserts, removed, version);
            }
            ResourceKind::ScopedRouteConfiguration => {
                let mut upserts = Vec::new();
                for (name, doc) in parsed {
                    match map::map_scoped_route_resource(&doc) {
                        Ok(s) if s.name != name => rejected.push((
                            name,
                            format!(
                                "resource name does not match scoped route configuration name '{}'",
                                s.name
                            ),
                        )),
                        Ok(s) => upserts.push(s),
                        Err(errs) => rejected.push((name, errs.join("; "))),
                    }
                }
                // One bad scope refuses the whole update, as Envoy's SRDS does.
                if rejected.is_empty() {
                    let _apply = self.apply_guard();
                    rejected.extend(self.listeners.apply_scopes(upserts, removed, version));
                } else {
                    let why = "another scope of the update was rejected".to_string();
                    rejected.extend(upserts.into_iter().map(|s| (s.name, why.clone())));
                }
            }
            ResourceKind::Listener => {
                // Built (Python filters included) with no lock held.
                let mut built = Vec::new();
                for (name, doc) in parsed {
                    match self
                        .listeners
                        .build(&name, &doc, version, &self.clusters, &self.options)
                    {
                        Ok(Some(b)) => built.push(b),
                        Ok(None) => {}
                        Err(e) => rejected.push((name, e)),
                    }
                }
                let _apply = self.apply_guard();
                rejected.extend(self.listeners.install(built, removed, version));
            }
            ResourceKind::Secret => {
                let mut upserts = Vec::new();
                for (name, doc) in parsed {
                    match map::map_secret_resource(&doc) {
                        Ok((n, secret)) if n == name => upserts.push((name, secret, doc)),
                        Ok((n, _)) => rejected.push((
                            name,
                            format!("resource name does not match secret name '{n}'"),
                        )),
                        Err(errs) => rejected.push((name, errs.join("; "))),
                    }
                }
                let _apply = self.apply_guard();
                let mut names: Vec<String> = upserts.iter().map(|(n, _, _)| n.clone()).collect();
                names.extend(removed.iter().cloned());
                let secrets = &self.clusters.secrets;
                secrets.apply(upserts, removed, version);
                rejected.extend(self.listeners.secrets_changed(&names, secrets));
                // The `sds.<name>.*` stats are the xDS client's (Python).
                rejected.extend(self.clusters.secrets_changed(&names));
            }
        }
        self.refresh_gauges();
        rejected
    }

    /// Certificate files of SDS secrets replaced on disk (see `tls::files`): the
    /// secrets are reloaded and the TLS contexts using them rebuilt. Called once a
    /// second by the control thread.
    pub fn poll_secret_files(&self) {
        let secrets = &self.clusters.secrets;
        let (reloads, failures) = secrets.files.poll(&secrets.entries());
        let failed = |name: &str, why: &str| {
            crate::log!(
                Warn,
                "secret",
                "Failed to reload certificates of secret '{name}': {why}"
            );
            self.store
                .counter(&format!("sds.{name}.key_rotation_failed"))
                .inc();
        };
        for (name, why) in &failures {
            failed(name, why);
        }
        if reloads.is_empty() {
            return;
        }
        let _apply = self.apply_guard();
        let mut names = Vec::new();
        for r in reloads {
            match map::map_secret_resource(&r.resource) {
                Ok((_, mut secret)) => {
                    // Read inline, from these files (admin `/certs` names them).
                    let file = |field: &str| {
                        r.files
                            .iter()
                            .find(|(f, _)| f == field)
                            .map(|(_, path)| path.clone())
                    };
                    match &mut secret {
                        crate::config::SecretConfig::TlsCertificate(c) => {
                            if let Some(f) = file("certificate_chain") {
                                c.source = f;
                            }
                        }
                        crate::config::SecretConfig::ValidationContext(v) => {
                            if let Some(f) = file("trusted_ca") {
                                v.ca_source = f;
                            }
                        }
                    }
                    if let Some(entry) = secrets.reload(&r.name, &r.entry, secret) {
                        crate::log!(
                            Info,
                            "secret",
                            "secret '{}': certificate files changed, reloaded",
                            r.name
                        );
                        secrets.files.reloaded(&r.name, entry);
                        names.push(r.name);
                    }
                }
                Err(errs) => {
                    failed(&r.name, &errs.join("; "));
                    secrets.files.reload_failed(&r.name);
                }
            }
        }
        if names.is_empty() {
            return;
        }
        let mut rejected = self.listeners.secrets_changed(&names, secrets);
        rejected.extend(self.clusters.secrets_changed(&names));
        for (name, why) in rejected {
            failed(&name, &why);
            secrets.files.reload_failed(&name);
        }
    }

    /// With `validate_clusters`, the first route naming a cluster that does not exist.
    fn unknown_clusters(&self, rc: &RouteConfig) -> Option<String> {
        if !rc.validate_clusters {
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
                crate::config::RouteAction::Forward(f) => f
                    .named_clusters()
                    .into_iter()
                    .find(|(_, name, _)| !known(name))
                    .map(|(_, name, what)| format!("route: unknown {what} '{name}'")),
                _ => None,
            })
    }

    /// Names of resources the core waits for: RDS route configurations named by
    /// listeners, EDS services of clusters.
    pub fn wanted_resources(&self, kind: ResourceKind) -> Vec<String> {
        let mut names: Vec<String> = match kind {
            ResourceKind::RouteConfiguration => self.listeners.wanted_routes(),
            ResourceKind::ClusterLoadAssignment => self.clusters.wanted_eds_services(),
            ResourceKind::Secret => {
                let mut names = self.listeners.wanted_secrets();
                names.extend(self.clusters.wanted_secrets());
                names
            }
            ResourceKind::Listener
            | ResourceKind::Cluster
            | ResourceKind::ScopedRouteConfiguration => Vec::new(),
        };
        names.sort();
        names.dedup();
        names
    }
}
