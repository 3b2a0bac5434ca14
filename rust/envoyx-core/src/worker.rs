//! A worker: one thread, one current-thread tokio runtime, its own accept loops,
//! upstream pools and load-balancer state (Envoy's worker model, DESIGN.md §2).

use std::cell::Cell;
use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};

use crate::instance::Instance;
use crate::listener::{AcceptFailures, Listener, ListenerConnectionStats, ListenersByAddress};
use crate::listener_manager::WorkerCommand;
use crate::upstream::WorkerPools;

/// Runs worker `index` until the server stops: accepts on the sockets it is given
/// (at start and later through `commands`), then lets its connections finish
/// within the drain time.
pub(crate) fn run(
    instance: Arc<Instance>,
    index: usize,
    sockets: Vec<(Arc<Listener>, StdTcpListener)>,
    mut commands: mpsc::UnboundedReceiver<WorkerCommand>,
) {
    crate::per_worker::enter(index);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let worker = Rc::new(Worker {
            pools: WorkerPools::new(),
            connections: Rc::default(),
            drain_time: instance.options.drain_time,
            listeners: instance.listeners.by_address.clone(),
        });
        let listen = |listener: Arc<Listener>, socket: StdTcpListener| {
            match tokio::net::TcpListener::from_std(socket) {
                Ok(s) => {
                    tokio::task::spawn_local(worker.clone().accept_loop(listener, s));
                }
                Err(e) => crate::log!(Error, "main", "listener '{}': {e}", listener.name),
            }
        };
        for (listener, socket) in sockets {
            listen(listener, socket);
        }
        let mut stop = instance.stop_tx.subscribe();
        // Pool upkeep: connections idle past their timeout, or to clusters and
        // hosts that are gone, are closed on this beat (so within a second of it).
        let mut upkeep = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(WorkerCommand::Listen(listener, socket)) => listen(listener, socket),
                    None => break,
                },
                _ = upkeep.tick() => worker.pools.maintain(&instance.clusters.live_ids()),
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        // In-flight requests may finish within the drain time; then the runtime
        // is dropped, which closes whatever is left.
        let deadline = tokio::time::Instant::now() + instance.options.drain_time;
        while worker.connections.open.get() > 0 {
            let closed = worker.connections.closed.notified();
            if tokio::time::timeout_at(deadline, closed).await.is_err() {
                break;
            }
        }
    });
}

/// What one worker owns.
struct Worker {
    pools: Rc<WorkerPools>,
    connections: Rc<ConnectionTracker>,
    /// How long a draining listener's connections may live on (`--drain-time-s`).
    drain_time: Duration,
    /// Where a `use_original_dst` listener hands its connections.
    listeners: Arc<ListenersByAddress>,
}

impl Worker {
    async fn accept_loop(self: Rc<Self>, listener: Arc<Listener>, socket: tokio::net::TcpListener) {
        let mut stop = listener.stop_accepting.subscribe();
        let mut failures = AcceptFailures::default();
        let mut accepted_since_yield = 0u32;
        loop {
            // Envoy accepts at most this many connections per socket event and takes
            // the rest on a later loop iteration: here, after every `max` accepts the
            // worker's other tasks run before the next.
            if let Some(max) = listener.max_accepts_per_wakeup {
                accepted_since_yield += 1;
                if accepted_since_yield > max {
                    accepted_since_yield = 1;
                    tokio::task::yield_now().await;
                }
            }
            let accepted = tokio::select! {
                r = socket.accept() => r,
                _ = stop.wait_for(|d| *d) => return,
            };
            match accepted {
                Ok((stream, peer)) => {
                    failures.accepted();
                    self.spawn_connection(&listener, stream, peer);
                }
                Err(e) => tokio::time::sleep(failures.failed(&listener.name, &e)).await,
            }
        }
    }

    fn spawn_connection(&self, listener: &Arc<Listener>, stream: TcpStream, peer: SocketAddr) {
        // A listener that may hand the connection off counts it only once it
        // knows which listener serves it (serve.rs).
        let stats = (!listener.hand_off_restored_destination)
            .then(|| ListenerConnectionStats::open(listener));
        let guard = TrackedConnection::new(&self.connections);
        let pools = self.pools.clone();
        let drain_time = self.drain_time;
        // Built here, not inside the task: the task then holds the connection's
        // future once, not also the arguments it was made from. It says which drain
        // signal the connection follows (its chain's; on the general path the
        // listener's until a chain is chosen is followed inside).
        let (served, drain) = crate::listener::serve_connection(
            listener,
            &self.listeners,
            pools,
            stream,
            peer,
            drain_time,
        );
        // A draining connection gets the drain time to finish gracefully; then it
        // is closed (Envoy's --drain-time-s).
        let mut deadline = drain;
        let drained = async move {
            let _ = deadline.wait_for(|d| *d).await;
            // Boxed: a timer is large, and idle connections wait here too.
            Box::pin(tokio::time::sleep(drain_time)).await;
        };
        tokio::task::spawn_local(ConnectionTask {
            served,
            drained,
            _books: TaskBooks {
                _stats: stats,
                _guard: guard,
            },
        });
    }
}

pin_project_lite::pin_project! {
    /// A connection's task: its listener's protocol, cut short once the drain time
    /// has passed. A plain struct rather than an async block, which would hold the
    /// connection's future twice (as captured and as selected on).
    struct ConnectionTask<F, D> {
        #[pin]
        served: F,
        #[pin]
        drained: D,
        _books: TaskBooks,
    }
}

impl<F: Future<Output = ()>, D: Future<Output = ()>> Future for ConnectionTask<F, D> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.served.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        this.drained.poll(cx)
    }
}

/// A connection's listener stats and the worker's count of it, closed when its
/// task ends or is dropped.
struct TaskBooks {
    _stats: Option<ListenerConnectionStats>,
    _guard: TrackedConnection,
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
