//! Load balancers, one file per policy behind one trait (Envoy's
//! `load_balancing_policies/<policy>/`). Each worker holds its own instance per
//! cluster ([`crate::upstream::WorkerPools`]), so their state needs no lock.

mod least_request;
mod round_robin;

use std::rc::Rc;

pub use least_request::LeastRequest;
pub use round_robin::RoundRobin;

use super::Host;
use crate::config::LbPolicy;
use crate::per_worker::LocalHandle;

/// What a request tells the load balancer (Envoy's `LoadBalancerContext`).
#[derive(Default)]
pub struct LbContext<'a> {
    /// Hosts earlier tries of this request went to; a policy avoids them while
    /// another host is there (`retry_host_predicate: previous_hosts`).
    pub previous_hosts: &'a [LocalHandle<Host>],
}

impl LbContext<'_> {
    fn avoids(&self, host: &LocalHandle<Host>) -> bool {
        self.previous_hosts.iter().any(|h| h.same(host.shared()))
    }
}

/// A load-balancing policy's per-worker state.
pub trait LoadBalancer {
    /// The index in `hosts` (never empty) of the host for one try of a request.
    fn choose(&self, hosts: &[LocalHandle<Host>], context: &LbContext<'_>) -> usize;
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

    use crate::per_worker::LocalHandle;
    use crate::upstream::Host;

    /// `n` hosts on 127.0.0.1:1.. for policy tests.
    pub fn hosts(n: u16) -> Vec<LocalHandle<Host>> {
        (1..=n)
            .map(|port| {
                LocalHandle::new(Arc::new(Host::new(
                    ([127, 0, 0, 1], port).into(),
                    String::new(),
                    1,
                )))
            })
            .collect()
    }
}
