//! Load balancers, one file per policy behind one trait (Envoy's
//! `load_balancing_policies/<policy>/`). Each worker builds its own balancers per
//! cluster when the cluster's hosts or their health change
//! ([`priority_set::PrioritySet`], held by [`crate::upstream::WorkerPools`]), so a
//! pick takes no lock and does no work proportional to the number of hosts.

#[cfg(test)]
mod bench;
mod edf;
mod least_request;
mod maglev;
pub mod priority_set;
mod random;
mod ring_hash;
mod round_robin;

pub use least_request::LeastRequest;
pub use maglev::Maglev;
pub use priority_set::PrioritySet;
pub use random::Random;
pub use ring_hash::RingHash;
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
    /// How many picks may be made to avoid them (Envoy: the retry policy's
    /// `host_selection_retry_max_attempts` + 1); the last pick stands.
    pub host_selection_attempts: u32,
    /// The route's `hash_policy` result (`computeHashKey`): ring hash and Maglev
    /// map it to a host; without one they pick at random, as Envoy's do.
    pub hash: Option<u64>,
    /// The downstream request's headers (Envoy's `downstreamHeaders()`): an
    /// `ORIGINAL_DST` cluster's `use_http_header` reads its destination there.
    pub headers: Option<&'a http::HeaderMap>,
    /// The downstream connection's local address when a listener filter restored
    /// it to the original destination: an `ORIGINAL_DST` cluster's host when no
    /// header names one.
    pub restored_local_address: Option<std::net::SocketAddr>,
}

impl LbContext<'_> {
    fn avoids(&self, host: &LocalHandle<Host>) -> bool {
        self.previous_hosts.iter().any(|h| h.same(host.shared()))
    }
}

/// A policy's picker over one set of hosts (the healthy, degraded or all hosts of
/// one priority, or of one locality), built when that set changes.
pub trait LoadBalancer {
    /// The index of a host in the set it was built over. `hash`: the request's
    /// hash or a random number; `attempt`: 0 first, then 1, 2, … while the
    /// previous pick was one the request avoids.
    fn choose(&self, hash: u64, attempt: u32) -> usize;
}

/// The policy's balancer over `hosts` (never empty).
pub fn build(policy: &LbPolicy, hosts: &[LocalHandle<Host>]) -> Box<dyn LoadBalancer> {
    match *policy {
        LbPolicy::RoundRobin => Box::new(RoundRobin::new(hosts)),
        LbPolicy::LeastRequest {
            choice_count,
            active_request_bias,
        } => Box::new(LeastRequest::new(hosts, choice_count, active_request_bias)),
        LbPolicy::Random => Box::new(Random::new(hosts.len())),
        LbPolicy::RingHash {
            minimum_ring_size,
            maximum_ring_size,
        } => Box::new(RingHash::new(
            &normalized_weights(hosts, false),
            minimum_ring_size,
            maximum_ring_size,
        )),
        LbPolicy::Maglev { table_size } => {
            Box::new(Maglev::new(&normalized_weights(hosts, false), table_size))
        }
    }
}

/// Whether the policy hashes the request (Envoy's thread-aware balancers): the
/// hash then also chooses the priority, and localities weigh in through
/// [`normalized_weights`] rather than a locality pick.
pub fn is_hashing(policy: &LbPolicy) -> bool {
    matches!(policy, LbPolicy::RingHash { .. } | LbPolicy::Maglev { .. })
}

/// Envoy's `normalizeWeights`: each host's share of the whole (summing to 1),
/// from its weight and, with locality weighting, its locality's weight. Hosts of a
/// zero-weight locality get no share. Returns (host address, share) in host order.
pub fn normalized_weights(
    hosts: &[LocalHandle<Host>],
    locality_weighted: bool,
) -> Vec<(std::net::SocketAddr, usize, f64)> {
    let flat = |members: &[usize], locality_share: f64, out: &mut Vec<_>| {
        let sum: u64 = members.iter().map(|&i| u64::from(hosts[i].weight())).sum();
        for &i in members {
            let w = f64::from(hosts[i].weight()) * locality_share / sum as f64;
            if w > 0.0 {
                out.push((hosts[i].address, i, w));
            }
        }
    };
    let mut out = Vec::with_capacity(hosts.len());
    let localities = if locality_weighted {
        group_by_locality(hosts)
    } else {
        Vec::new()
    };
    let total: u64 = localities.iter().map(|(w, _)| u64::from(*w)).sum();
    if total == 0 {
        let all: Vec<usize> = (0..hosts.len()).collect();
        flat(&all, 1.0, &mut out);
    } else {
        for (w, members) in &localities {
            flat(members, f64::from(*w) / total as f64, &mut out);
        }
    }
    out
}

/// The hosts' localities in order of first appearance: (locality weight, member
/// indices).
pub fn group_by_locality(hosts: &[LocalHandle<Host>]) -> Vec<(u32, Vec<usize>)> {
    let mut groups: Vec<(Option<&crate::config::Locality>, u32, Vec<usize>)> = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let loc = h.locality.as_deref();
        match groups.iter_mut().find(|(l, _, _)| *l == loc) {
            Some(g) => g.2.push(i),
            None => groups.push((loc, h.locality_weight(), vec![i])),
        }
    }
    groups.into_iter().map(|(_, w, m)| (w, m)).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use crate::per_worker::LocalHandle;
    use crate::upstream::Host;
    use crate::upstream::cluster::HostSpec;

    /// `n` hosts on 127.0.0.1:1.. for policy tests.
    pub fn hosts(n: u16) -> Vec<LocalHandle<Host>> {
        weighted(&vec![1; n as usize])
    }

    /// Hosts on 127.0.0.1:1.. with these weights.
    pub fn weighted(weights: &[u32]) -> Vec<LocalHandle<Host>> {
        weights
            .iter()
            .zip(1..)
            .map(|(w, port)| {
                let spec = HostSpec {
                    weight: *w,
                    ..HostSpec::plain(([127, 0, 0, 1], port).into())
                };
                LocalHandle::new(Arc::new(Host::from_spec(&spec, 1)))
            })
            .collect()
    }

    /// How often each host is picked in `n` picks.
    pub fn counts(lb: &dyn super::LoadBalancer, hosts: usize, n: usize) -> Vec<usize> {
        let mut c = vec![0; hosts];
        for _ in 0..n {
            c[lb.choose(rand::random(), 0)] += 1;
        }
        c
    }
}
