//! `ROUND_ROBIN` (Envoy's `RoundRobinLoadBalancer`): in turn from a random start
//! when the hosts' weights are equal; by the EDF scheduler when they differ, so
//! each host gets its weight's share, interleaved. Each worker has its own state.

use std::cell::Cell;

use super::LoadBalancer;
use super::edf::Edf;
use crate::per_worker::LocalHandle;
use crate::upstream::Host;

pub enum RoundRobin {
    Unweighted { next: Cell<usize>, len: usize },
    Weighted { edf: Edf, weights: Vec<f64> },
}

impl RoundRobin {
    pub fn new(hosts: &[LocalHandle<Host>]) -> Self {
        let start = rand::random::<u32>() as usize;
        let first = hosts.first().map_or(1, |h| h.weight());
        if hosts.iter().all(|h| h.weight() == first) {
            return RoundRobin::Unweighted {
                next: Cell::new(start),
                len: hosts.len(),
            };
        }
        let weights: Vec<f64> = hosts.iter().map(|h| f64::from(h.weight())).collect();
        RoundRobin::Weighted {
            edf: Edf::new(&weights, start % hosts.len()),
            weights,
        }
    }
}

impl LoadBalancer for RoundRobin {
    fn choose(&self, _hash: u64, _attempt: u32) -> usize {
        match self {
            RoundRobin::Unweighted { next, len } => {
                let i = next.get();
                next.set(i.wrapping_add(1));
                i % len
            }
            RoundRobin::Weighted { edf, weights } => edf.pick(|i| weights[i]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::lb::tests::{counts, hosts, weighted};

    #[test]
    fn alternates() {
        let hs = hosts(2);
        let lb = RoundRobin::new(&hs);
        let picks: Vec<_> = (0..4).map(|_| lb.choose(0, 0)).collect();
        assert_ne!(picks[0], picks[1]);
        assert_eq!(picks[0], picks[2]);
        assert_eq!(picks[1], picks[3]);
    }

    #[test]
    fn weighted_shares_are_exact_over_a_cycle() {
        let hs = weighted(&[1, 2, 3]);
        let lb = RoundRobin::new(&hs);
        assert_eq!(counts(&lb, 3, 600), vec![100, 200, 300]);
    }
}
