//! `LEAST_REQUEST` with Envoy's default `choice_count` of 2: the less busy of two
//! random hosts ("power of two choices"), busy meaning active requests.

use std::sync::Arc;

use super::{LbContext, LoadBalancer};
use crate::upstream::Host;

pub struct LeastRequest;

impl LoadBalancer for LeastRequest {
    fn choose(&self, hosts: &[Arc<Host>], context: &LbContext<'_>) -> Arc<Host> {
        if hosts.len() == 1 {
            return hosts[0].clone();
        }
        let pick = || {
            let a = rand::random_range(0..hosts.len());
            let b = (a + rand::random_range(1..hosts.len())) % hosts.len();
            let (ha, hb) = (&hosts[a], &hosts[b]);
            if hb.stats.rq_active.get() < ha.stats.rq_active.get() {
                hb
            } else {
                ha
            }
        };
        let mut host = pick();
        for _ in 0..hosts.len() {
            if !context.avoids(host) {
                break;
            }
            host = pick();
        }
        host.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::lb::tests::hosts;

    #[test]
    fn avoids_the_busier_host() {
        let hs = hosts(2);
        for _ in 0..5 {
            hs[0].stats.rq_active.inc();
        }
        for _ in 0..100 {
            assert_eq!(
                LeastRequest.choose(&hs, &LbContext::default()).address,
                hs[1].address
            );
        }
    }
}
