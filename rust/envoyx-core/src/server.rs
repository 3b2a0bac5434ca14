//! The server handle and its threads: the control thread (admin, DNS), one worker
//! thread per `--concurrency` ([`crate::worker`]), start, drain, stop and wait. What
//! the threads share is the [`Instance`]; listeners and routes are the
//! [`ListenerManager`]'s.

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::config::{AdminConfig, Bootstrap};
use crate::error::{Error, Result};
use crate::instance::lock;
pub use crate::instance::{Instance, ResourceKind, ServerOptions, ServerState, VERSION};
use crate::listener::{BuildContext, Listener, bind, listen};
use crate::listener_manager::ListenerManager;
use crate::stats::StatStore;
use crate::tls::SecretStore;
use crate::upstream::ClusterManager;
use crate::upstream::cluster::Origin;

pub struct Server {
    instance: Arc<Instance>,
    admin: Option<AdminConfig>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    started: AtomicBool,
}

impl Server {
    /// Builds every runtime object of a mapped bootstrap; binds nothing yet.
    pub fn new(bootstrap: Bootstrap, options: ServerOptions) -> Result<Self> {
        // Envoy's runtime is the process's: the last server built sets it.
        crate::runtime::install(bootstrap.runtime);
        crate::access_log::set_local_node(&bootstrap.node);
        let store = StatStore::with_workers(options.concurrency.max(1));
        let secrets = Arc::new(SecretStore::new(bootstrap.secrets));
        let clusters =
            ClusterManager::new(&bootstrap.clusters, &store, secrets).map_err(Error::Config)?;
        clusters.set_event_logs(
            crate::upstream::outlier::event_log::EventLogs::open(
                bootstrap.outlier_event_log_path.as_deref(),
                options.file_flush,
            )
            .map_err(|e| Error::Config(vec![e]))?,
        );
        let workers = options.concurrency.max(1);
        let cx = BuildContext {
            clusters: &clusters,
            store: &store,
            workers,
            filter_factory: options.filter_factory.as_deref(),
            file_flush: options.file_flush,
        };
        let mut active = Vec::new();
        for l in bootstrap.listeners {
            active.push(Listener::build(l, &cx, Origin::bootstrap(), None)?);
        }
        let listeners = ListenerManager::new(active, &store);
        let instance = Instance::new(
            store,
            clusters,
            listeners,
            bootstrap.raw,
            bootstrap.node,
            options,
        );
        Ok(Server {
            instance,
            admin: bootstrap.admin,
            threads: Mutex::new(Vec::new()),
            started: AtomicBool::new(false),
        })
    }

    pub fn instance(&self) -> &Arc<Instance> {
        &self.instance
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
        let instance = self.instance.clone();
        let workers = instance.options.concurrency.max(1);
        let admin_listener = match &self.admin {
            Some(admin) => {
                let l = bind(admin.address, false)?;
                *lock(&instance.admin_address) = l.local_addr().ok();
                Some(l)
            }
            None => None,
        };

        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let admin_config = self.admin.as_ref().map(|a| a.access_logs.clone());
        let control_instance = instance.clone();
        let control = std::thread::Builder::new()
            .name("envoyx-main".into())
            .spawn(move || control_thread(control_instance, admin_listener, admin_config, ready_tx))
            .map_err(|source| Error::Io {
                context: "cannot start the control thread".into(),
                source,
            })?;
        let mut threads = vec![control];
        // Workers start after DNS clusters have their first answer, as Envoy's
        // cluster warming does before listeners serve.
        let _ = ready_rx.recv_timeout(Duration::from_secs(10));

        // One socket per worker per active listener, all bound before anything
        // serves so that a port in use fails start. Under the apply lock, so that a
        // listener applied meanwhile is either in this set or sent to the workers'
        // channels, which exist from here on.
        let mut receivers = Vec::new();
        let mut sockets: Vec<Vec<(Arc<Listener>, StdTcpListener)>> =
            (0..workers).map(|_| Vec::new()).collect();
        {
            let _apply = instance.apply_guard();
            for listener in &instance.listeners.active() {
                let bound = listener.bind(workers)?;
                let address = listener.address();
                for (i, socket) in bound.into_iter().enumerate() {
                    sockets[i].push((listener.clone(), listen(socket, address)?));
                }
            }
            // Port-0 listeners are found by their bound port from here on.
            let active = instance.listeners.active();
            instance.listeners.by_address.publish(active.iter());
            let mut senders = Vec::new();
            for _ in 0..workers {
                let (tx, rx) = mpsc::unbounded_channel();
                senders.push(tx);
                receivers.push(rx);
            }
            instance.listeners.set_workers(senders);
        }
        for (i, (worker_sockets, rx)) in sockets.into_iter().zip(receivers).enumerate() {
            let instance = instance.clone();
            let t = std::thread::Builder::new()
                .name(format!("envoyx-wrk-{i}"))
                .spawn(move || crate::worker::run(instance, i, worker_sockets, rx))
                .map_err(|source| Error::Io {
                    context: "cannot start a worker thread".into(),
                    source,
                })?;
            threads.push(t);
        }
        instance
            .store
            .gauge("listener_manager.workers_started")
            .set(1);
        if live {
            instance.set_state(ServerState::Live);
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
        if self.instance.state() == ServerState::Initializing {
            self.instance.set_state(ServerState::Live);
        }
    }

    /// Applies xDS resources of one kind (see [`Instance::apply`]).
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
        Ok(self.instance.apply(kind, resources, removed, version))
    }

    /// Stops accepting; open connections close as their requests finish.
    pub fn drain(&self) {
        self.instance.drain();
    }

    /// Drains, waits (up to drain time) for in-flight requests, joins every thread.
    pub fn stop(&self) {
        self.instance.drain();
        self.instance.stop_tx.send_replace(true);
        let threads = std::mem::take(&mut *lock(&self.threads));
        for t in threads {
            let _ = t.join();
        }
        // Workers render access-log lines into buffers; with the workers
        // stopped, write what they left before stop returns.
        crate::access_log::flush_all();
        self.instance.set_state(ServerState::Stopped);
        let (flag, cv) = &self.instance.quit;
        *lock(flag) = true;
        cv.notify_all();
    }

    /// Blocks until the server is asked to quit (or `timeout` passes); stops it then.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let (flag, cv) = &self.instance.quit;
        let mut quit = lock(flag);
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
        if self.instance.state() != ServerState::Stopped {
            self.stop();
        }
        true
    }

    pub fn running(&self) -> bool {
        matches!(
            self.instance.state(),
            ServerState::Live | ServerState::Draining
        )
    }

    pub fn listener_addresses(&self) -> Vec<(String, SocketAddr)> {
        self.instance
            .listeners
            .active()
            .iter()
            .map(|l| (l.name.clone(), l.address()))
            .collect()
    }

    pub fn admin_address(&self) -> Option<SocketAddr> {
        *lock(&self.instance.admin_address)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.started.load(Ordering::SeqCst) && self.instance.state() != ServerState::Stopped {
            self.stop();
        }
    }
}

fn control_thread(
    instance: Arc<Instance>,
    admin: Option<StdTcpListener>,
    admin_logs: Option<Vec<crate::config::AccessLogConfig>>,
    ready: std::sync::mpsc::Sender<()>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    instance
        .clusters
        .set_control(rt.handle().clone(), crate::upstream::health_check::start);
    rt.block_on(async move {
        // First DNS answers before workers serve; then refresh in the background.
        crate::upstream::cluster::resolve_static_dns(&instance.clusters).await;
        if let Some(listener) = admin {
            let logs = admin_logs.unwrap_or_default();
            tokio::spawn(crate::admin::serve(instance.clone(), listener, logs));
        }
        // Clusters warm until their first health checks, as in Envoy (admin answers meanwhile).
        crate::upstream::health_check::start_bootstrap(&instance.clusters).await;
        let _ = ready.send(());
        // Certificate files of SDS secrets, watched for replacement (tls::files).
        let files_instance = instance.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                files_instance.poll_secret_files();
            }
        });
        let mut stop = instance.stop_tx.subscribe();
        let _ = stop.wait_for(|s| *s).await;
    });
}
