//! Load balancers, one file per policy behind one trait (Envoy's
//! `load_balancing_policies/<policy>/`). Each worker holds its own instance per
//! cluster ([`crate::upstream::WorkerPools`]), so their state needs no lock.

mod least_request;
mod round_robin;

use std::rc::Rc;
use std::sync::Arc;

pub use least_request::LeastRequest;
pub use round_robin::RoundRobin;

use super::Host;
use crate::config::LbPolicy;

/// What a request tells the load balancer (Envoy's `LoadBalancerContext`).
#[derive(Default)]
pub struct LbContext<'a> {
    /// Hosts earlier tries of this request went to; a policy avoids them while
    /// another host is there (`retry_host_predicate: previous_hosts`).
    pub previous_hosts: &'a [Arc<Host>],
}

impl LbContext<'_> {
    fn avoids(&self, host: &Arc<Host>) -> bool {
        self.previous_hosts.iter().any(|h| Arc::ptr_eq(h, host))
    }
}

/// A load-balancing policy's per-worker state.
pub trait LoadBalancer {
    /// A host of `hosts` (never empty) for one try of a request.
    fn choose(&self, hosts: &[Arc<Host>], context: &LbContext<'_>) -> Arc<Host>;
}

/// A fresh per-worker balancer for a cluster's policy.
pub fn for_policy(policy: LbPolicy) -> Rc<dyn LoadBalancer> {
    match policy {
        LbPolicy::RoundRobin => Rc::new(RoundRobin::new()),
        LbPolicy::LeastRequest => Rc::new(LeastRequest),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use crate::upstream::Host;

    /// `n` hosts on 127.0.0.1:1.. for policy tests.
    pub fn hosts(n: u16) -> Vec<Arc<Host>> {
        (1..=n)
            .map(|port| Arc::new(Host::new(([127, 0, 0, 1], port).into(), String::new())))
            .collect()
    }
}
