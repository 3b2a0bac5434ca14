//! `LEAST_REQUEST` (Envoy's `LeastRequestLoadBalancer`). Equal weights: the host
//! with the fewest active requests among `choice_count` random picks (with
//! replacement; ties keep the earlier pick). Unequal weights: the EDF scheduler
//! with each host's weight divided by `(active_requests + 1)^active_request_bias`
//! when it is re-added.

use std::rc::Rc;

use super::LoadBalancer;
use super::edf::Edf;
use crate::per_worker::LocalHandle;
use crate::upstream::Host;

pub struct LeastRequest {
    hosts: Rc<[LocalHandle<Host>]>,
    choice_count: u32,
    active_request_bias: f64,
    /// Some when the weights differ.
    edf: Option<Edf>,
}

impl LeastRequest {
    pub fn new(hosts: &[LocalHandle<Host>], choice_count: u32, active_request_bias: f64) -> Self {
        let hosts: Rc<[LocalHandle<Host>]> = hosts.iter().cloned().collect();
        let first = hosts.first().map_or(1, |h| h.weight());
        let mut lb = LeastRequest {
            hosts,
            choice_count,
            active_request_bias,
            edf: None,
        };
        if !lb.hosts.iter().all(|h| h.weight() == first) {
            let weights: Vec<f64> = (0..lb.hosts.len()).map(|i| lb.weight(i)).collect();
            lb.edf = Some(Edf::new(&weights, rand::random_range(0..lb.hosts.len())));
        }
        lb
    }

    /// Envoy's `hostWeight`: the host's weight scaled down by its active requests.
    fn weight(&self, i: usize) -> f64 {
        let host = &self.hosts[i];
        let weight = f64::from(host.weight());
        let active = host.stats.rq_active().get() as f64 + 1.0;
        if self.active_request_bias == 1.0 {
            weight / active
        } else if self.active_request_bias == 0.0 {
            weight
        } else {
            weight / active.powf(self.active_request_bias)
        }
    }
}

impl LoadBalancer for LeastRequest {
    fn choose(&self, _hash: u64, _attempt: u32) -> usize {
        if let Some(edf) = &self.edf {
            return edf.pick(|i| self.weight(i));
        }
        let len = self.hosts.len();
        let mut best = rand::random_range(0..len);
        for _ in 1..self.choice_count {
            let other = rand::random_range(0..len);
            if self.hosts[other].stats.rq_active().get() < self.hosts[best].stats.rq_active().get()
            {
                best = other;
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::lb::tests::{counts, hosts, weighted};

    #[test]
    fn avoids_the_busier_host() {
        let hs = hosts(2);
        for _ in 0..5 {
            hs[0].stats.rq_active().inc();
        }
        let lb = LeastRequest::new(&hs, 2, 1.0);
        // Host 0 wins only when both picks are host 0 (1 in 4).
        let c = counts(&lb, 2, 4000);
        assert!((800..1200).contains(&c[0]), "{c:?}");
        // With every host among the choices, the idle one always wins.
        let lb = LeastRequest::new(&hs, 100, 1.0);
        assert_eq!(counts(&lb, 2, 100), vec![0, 100]);
    }

    #[test]
    fn weighted_scales_by_active_requests() {
        let hs = weighted(&[1, 2]);
        let lb = LeastRequest::new(&hs, 2, 1.0);
        // Idle: by weight.
        let c = counts(&lb, 2, 3000);
        assert!((900..1100).contains(&c[0]), "{c:?}");
        // Host 1 busy with 3 requests: weight 2/4 against 1/1.
        for _ in 0..3 {
            hs[1].stats.rq_active().inc();
        }
        let c = counts(&lb, 2, 3000);
        assert!((1900..2100).contains(&c[0]), "{c:?}");
        // Bias 0: weights only.
        let lb = LeastRequest::new(&hs, 2, 0.0);
        let c = counts(&lb, 2, 3000);
        assert!((900..1100).contains(&c[0]), "{c:?}");
    }
}
