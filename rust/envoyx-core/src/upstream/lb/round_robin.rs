//! `ROUND_ROBIN`: each worker walks the host list from a random start, as Envoy's
//! workers do (so that workers do not all hit the first host together).

use std::cell::Cell;

use super::{LbContext, LoadBalancer};
use crate::per_worker::LocalHandle;
use crate::upstream::Host;

pub struct RoundRobin {
    next: Cell<usize>,
}

impl RoundRobin {
    pub fn new() -> Self {
        RoundRobin {
            next: Cell::new(rand::random::<u32>() as usize),
        }
    }
}

impl Default for RoundRobin {
    fn default() -> Self {
        Self::new()
    }
}

impl LoadBalancer for RoundRobin {
    fn choose(&self, hosts: &[LocalHandle<Host>], context: &LbContext<'_>) -> usize {
        // At most one lap to find a host no earlier try used.
        for _ in 0..hosts.len() {
            let i = self.next.get();
            self.next.set(i.wrapping_add(1));
            if !context.avoids(&hosts[i % hosts.len()]) {
                return i % hosts.len();
            }
        }
        self.next.get() % hosts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::lb::tests::hosts;

    #[test]
    fn alternates() {
        let hs = hosts(2);
        let lb = RoundRobin::new();
        let picks: Vec<_> = (0..4)
            .map(|_| hs[lb.choose(&hs, &LbContext::default())].address)
            .collect();
        assert_ne!(picks[0], picks[1]);
        assert_eq!(picks[0], picks[2]);
        assert_eq!(picks[1], picks[3]);
    }

    #[test]
    fn skips_previous_hosts() {
        let hs = hosts(3);
        let lb = RoundRobin::new();
        let previous = [hs[0].clone(), hs[1].clone()];
        let context = LbContext {
            previous_hosts: &previous,
        };
        for _ in 0..10 {
            assert_eq!(lb.choose(&hs, &context), 2);
        }
    }
}
