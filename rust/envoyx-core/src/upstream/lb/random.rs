//! `RANDOM` (Envoy's `RandomLoadBalancer`): uniform over the hosts; Envoy ignores
//! host weights here, and so does envoyx.

use super::LoadBalancer;

pub struct Random {
    len: usize,
}

impl Random {
    pub fn new(len: usize) -> Self {
        Random { len }
    }
}

impl LoadBalancer for Random {
    fn choose(&self, _hash: u64, _attempt: u32) -> usize {
        rand::random_range(0..self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::lb::tests::counts;

    #[test]
    fn uniform() {
        let c = counts(&Random::new(4), 4, 40_000);
        assert!(c.iter().all(|&n| (9_000..11_000).contains(&n)), "{c:?}");
    }
}
