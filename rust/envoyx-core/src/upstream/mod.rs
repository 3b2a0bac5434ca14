//! Upstreams: clusters, hosts, worker-local connection pools and load balancers.

pub mod cluster;
mod connect;
pub mod health_check;
pub mod host;
pub mod host_stats;
pub mod lb;
pub mod original_dst;
pub mod outlier;
pub mod pool;
pub mod resource_manager;

pub use cluster::{Cluster, ClusterManager, Host, HostHealth, health_flag};
pub(crate) use connect::connect_tcp;
pub use connect::{ConnectError, UpstreamStream, connect};
pub use pool::WorkerPools;

/// A downstream HTTP/1.1 request's `100 Continue` under `proxy_100_continue`: owed
/// to the client only once the upstream answers `100 Continue` (hyper's client
/// reports it through `on_informational`, on its own thread of control, hence the
/// atomics). Carried in the request's extensions from the codec to the upstream.
#[derive(Debug, Default)]
pub struct ContinueGate {
    open: std::sync::atomic::AtomicBool,
    waker: futures_util::task::AtomicWaker,
}

impl ContinueGate {
    pub fn open(&self) {
        self.open.store(true, std::sync::atomic::Ordering::Release);
        self.waker.wake();
    }

    /// Whether the upstream said `100 Continue`; otherwise `cx` is woken when it does.
    pub fn poll_open(&self, cx: &std::task::Context<'_>) -> bool {
        if self.open.load(std::sync::atomic::Ordering::Acquire) {
            return true;
        }
        self.waker.register(cx.waker());
        self.open.load(std::sync::atomic::Ordering::Acquire)
    }
}
