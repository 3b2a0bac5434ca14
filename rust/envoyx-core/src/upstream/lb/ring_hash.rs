//! `RING_HASH` (Envoy's `RingHashLoadBalancer::Ring`), built exactly as Envoy
//! builds it so that a hash reaches the same host: each host gets
//! `scale * share` entries hashed with xxHash64 from `"<address>_<i>"`, running
//! sums carrying the fractions from host to host, sorted by hash; a request's
//! hash takes the first entry at or after it (Envoy's port of ketama's search).

use std::net::SocketAddr;

use xxhash_rust::xxh64::xxh64;

use super::LoadBalancer;

pub struct RingHash {
    /// (hash, host index), sorted by hash.
    ring: Vec<(u64, u32)>,
}

impl RingHash {
    /// `weights`: (address, host index, normalized share), in host order.
    pub fn new(
        weights: &[(SocketAddr, usize, f64)],
        min_ring_size: u64,
        max_ring_size: u64,
    ) -> Self {
        if weights.is_empty() {
            return RingHash { ring: Vec::new() };
        }
        let min_weight = weights.iter().map(|w| w.2).fold(f64::INFINITY, f64::min);
        let scale =
            ((min_weight * min_ring_size as f64).ceil() / min_weight).min(max_ring_size as f64);
        let mut ring = Vec::with_capacity(scale.ceil() as usize);
        let mut key = String::with_capacity(64);
        let (mut current, mut target) = (0.0f64, 0.0f64);
        for &(address, index, weight) in weights {
            key.clear();
            use std::fmt::Write;
            let _ = write!(key, "{address}_");
            let prefix = key.len();
            target += scale * weight;
            let mut i = 0u64;
            while current < target {
                key.truncate(prefix);
                let _ = write!(key, "{i}");
                ring.push((xxh64(key.as_bytes(), 0), index as u32));
                i += 1;
                current += 1.0;
            }
        }
        ring.sort_unstable_by_key(|e| e.0);
        RingHash { ring }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.ring.len()
    }
}

impl LoadBalancer for RingHash {
    fn choose(&self, h: u64, attempt: u32) -> usize {
        let ring = &self.ring;
        if ring.is_empty() {
            return 0;
        }
        // ketama_get_server, as Envoy has it (signed indices on purpose).
        let (mut low, mut high) = (0i64, ring.len() as i64);
        let mut mid;
        loop {
            mid = (low + high) / 2;
            if mid == ring.len() as i64 {
                mid = 0;
                break;
            }
            let midval = ring[mid as usize].0;
            let midval1 = if mid == 0 {
                0
            } else {
                ring[mid as usize - 1].0
            };
            if h <= midval && h > midval1 {
                break;
            }
            if midval < h {
                low = mid + 1;
            } else {
                high = mid - 1;
            }
            if low > high {
                mid = 0;
                break;
            }
        }
        // A retry that must avoid the host moves along the ring.
        let at = (mid as usize + attempt as usize) % ring.len();
        ring[at].1 as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::lb::normalized_weights;
    use crate::upstream::lb::tests::{hosts, weighted};

    fn ring(weights: &[u32], min: u64) -> RingHash {
        RingHash::new(&normalized_weights(&weighted(weights), false), min, 8 << 20)
    }

    #[test]
    fn sizes_as_envoy() {
        assert_eq!(ring(&[1, 1, 1, 1], 1024).len(), 1024);
        // The lightest host gets a whole number of entries: 1/6 → 171, ×6.
        assert_eq!(ring(&[1, 2, 3], 1024).len(), 1026);
        assert_eq!(ring(&[1; 3], 1024).len(), 1026);
        let capped = RingHash::new(&normalized_weights(&hosts(4), false), 1024, 6);
        assert_eq!(capped.len(), 6);
    }

    #[test]
    fn same_key_same_host_and_about_one_nth_moves() {
        let hs = hosts(5);
        let full = RingHash::new(&normalized_weights(&hs, false), 1024, 8 << 20);
        let fewer = RingHash::new(&normalized_weights(&hs[..4], false), 1024, 8 << 20);
        let mut moved = 0;
        for k in 0..10_000u64 {
            let h = xxh64(&k.to_le_bytes(), 0);
            let a = full.choose(h, 0);
            assert_eq!(a, full.choose(h, 0));
            if a != fewer.choose(h, 0) {
                moved += 1;
            }
        }
        // The keys of the host that left (1/5), and a few more: the other hosts'
        // entry counts change with the ring's scale, as in Envoy.
        assert!((1_500..3_000).contains(&moved), "{moved}");
    }

    #[test]
    fn search_wraps_past_the_last_entry() {
        let r = ring(&[1, 1], 4);
        assert_eq!(r.choose(u64::MAX, 0), r.ring[0].1 as usize);
        assert_eq!(r.choose(0, 0), r.ring[0].1 as usize);
        assert_eq!(r.choose(r.ring[1].0, 0), r.ring[1].1 as usize);
    }
}
