//! `MAGLEV` (Envoy's `OriginalMaglevTable`), built exactly as Envoy builds it so
//! that a hash reaches the same host: hosts sorted by address; each has an offset
//! `xxHash64(address) % size` and a skip `xxHash64(address, seed 1) % (size - 1) + 1`
//! and takes slots of its permutation in turn, as often as its share allows; a
//! request goes to `table[hash % size]`.

use std::net::SocketAddr;

use xxhash_rust::xxh64::xxh64;

use super::LoadBalancer;

pub struct Maglev {
    /// Host index per slot.
    table: Vec<u32>,
}

impl Maglev {
    /// `weights`: (address, host index, normalized share); `table_size` a prime.
    pub fn new(weights: &[(SocketAddr, usize, f64)], table_size: u64) -> Self {
        if weights.is_empty() {
            return Maglev { table: Vec::new() };
        }
        struct Entry {
            index: u32,
            offset: u64,
            skip: u64,
            weight: f64,
            target: f64,
            next: u64,
        }
        let mut sorted: Vec<(String, u32, f64)> = weights
            .iter()
            .map(|&(a, i, w)| (a.to_string(), i as u32, w))
            .collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let max_weight = weights.iter().map(|w| w.2).fold(0.0, f64::max);
        let mut entries: Vec<Entry> = sorted
            .iter()
            .map(|(key, index, weight)| Entry {
                index: *index,
                offset: xxh64(key.as_bytes(), 0) % table_size,
                skip: xxh64(key.as_bytes(), 1) % (table_size - 1) + 1,
                weight: *weight,
                target: 0.0,
                next: 0,
            })
            .collect();
        const EMPTY: u32 = u32::MAX;
        let mut table = vec![EMPTY; table_size as usize];
        let permutation = |e: &Entry| ((e.offset + e.skip * e.next) % table_size) as usize;
        let mut filled = 0u64;
        let mut iteration = 1u32;
        while filled < table_size {
            for e in entries.iter_mut() {
                if filled >= table_size {
                    break;
                }
                // A host of the largest share takes a slot every round; one of a
                // third of it every third round.
                if f64::from(iteration) * e.weight < e.target {
                    continue;
                }
                e.target += max_weight;
                let mut c = permutation(e);
                while table[c] != EMPTY {
                    e.next += 1;
                    c = permutation(e);
                }
                table[c] = e.index;
                e.next += 1;
                filled += 1;
            }
            iteration += 1;
        }
        Maglev { table }
    }
}

impl LoadBalancer for Maglev {
    fn choose(&self, hash: u64, attempt: u32) -> usize {
        if self.table.is_empty() {
            return 0;
        }
        let mut hash = hash;
        if attempt > 0 {
            // Envoy: flip many bits so that retries spread over hosts.
            hash ^= u64::from(attempt).wrapping_neg();
        }
        self.table[(hash % self.table.len() as u64) as usize] as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::lb::normalized_weights;
    use crate::upstream::lb::tests::{hosts, weighted};

    #[test]
    fn slots_follow_weights() {
        let m = Maglev::new(&normalized_weights(&weighted(&[1, 3]), false), 65537);
        let ones = m.table.iter().filter(|&&i| i == 0).count();
        assert!((16_000..17_000).contains(&ones), "{ones}");
    }

    #[test]
    fn about_one_nth_of_keys_move_when_a_host_goes() {
        let hs = hosts(5);
        let full = Maglev::new(&normalized_weights(&hs, false), 65537);
        let fewer = Maglev::new(&normalized_weights(&hs[..4], false), 65537);
        let moved = (0..65537u64)
            .filter(|&h| full.choose(h, 0) != fewer.choose(h, 0))
            .count();
        // 1/5 must move; Maglev moves a little more than that.
        assert!((13_000..17_000).contains(&moved), "{moved}");
    }
}
