//! `LEAST_REQUEST` with Envoy's default `choice_count` of 2: the less busy of two
//! random hosts ("power of two choices"), busy meaning active requests.

use super::{LbContext, LoadBalancer};
use crate::per_worker::LocalHandle;
use crate::upstream::Host;

pub struct LeastRequest;

impl LoadBalancer for LeastRequest {
    fn choose(&self, hosts: &[LocalHandle<Host>], context: &LbContext<'_>) -> usize {
        if hosts.len() == 1 {
            return 0;
        }
        let pick = || {
            let a = rand::random_range(0..hosts.len());
            let b = (a + rand::random_range(1..hosts.len())) % hosts.len();
            if hosts[b].stats.rq_active().get() < hosts[a].stats.rq_active().get() {
                b
            } else {
                a
            }
        };
        let mut host = pick();
        for _ in 0..hosts.len() {
            if !context.avoids(&hosts[host]) {
                break;
            }
            host = pick();
        }
        host
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
            hs[0].stats.rq_active().inc();
        }
        for _ in 0..100 {
            assert_eq!(LeastRequest.choose(&hs, &LbContext::default()), 1);
        }
    }
}
