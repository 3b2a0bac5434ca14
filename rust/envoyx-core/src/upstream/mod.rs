//! Upstreams: clusters, hosts, worker-local connection pools and load balancers.

pub mod cluster;
mod connect;
pub mod health_check;
pub mod host;
pub mod host_stats;
pub mod lb;
pub mod outlier;
pub mod pool;
pub mod resource_manager;

pub use cluster::{Cluster, ClusterManager, Host, HostHealth, health_flag};
pub use connect::{ConnectError, UpstreamStream, connect};
pub use pool::WorkerPools;
