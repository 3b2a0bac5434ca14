//! Upstreams: clusters, hosts, worker-local connection pools and load balancing.

pub mod cluster;
pub mod pool;

pub use cluster::{Cluster, ClusterManager, Host};
pub use pool::WorkerPools;
