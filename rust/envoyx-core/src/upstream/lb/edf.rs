//! Envoy's earliest-deadline-first scheduler (`EdfScheduler`): each entry is due
//! every `1 / weight`; the earliest deadline is picked (ties by insertion order)
//! and re-added with its weight at that moment. Weighted round robin and weighted
//! least request use it; a pick is O(log n).

use std::cell::RefCell;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

#[derive(Debug, Clone, Copy)]
struct Entry {
    deadline: f64,
    order: u64,
    index: usize,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        self.deadline
            .total_cmp(&other.deadline)
            .then(self.order.cmp(&other.order))
    }
}

#[derive(Debug)]
struct State {
    queue: BinaryHeap<Reverse<Entry>>,
    now: f64,
    next_order: u64,
}

#[derive(Debug)]
pub struct Edf {
    state: RefCell<State>,
}

impl Edf {
    /// Entries `0..weights.len()`, then `skip` picks, so that workers (each with
    /// its own scheduler) do not start in step (Envoy's `createWithPicks`).
    pub fn new(weights: &[f64], skip: usize) -> Self {
        let mut state = State {
            queue: BinaryHeap::new(),
            now: 0.0,
            next_order: 0,
        };
        let entries: Vec<_> = weights
            .iter()
            .enumerate()
            .map(|(index, w)| {
                let order = state.next_order;
                state.next_order += 1;
                Reverse(Entry {
                    deadline: 1.0 / w,
                    order,
                    index,
                })
            })
            .collect();
        state.queue = BinaryHeap::from(entries);
        let edf = Edf {
            state: RefCell::new(state),
        };
        for _ in 0..skip {
            edf.pick(|i| weights[i]);
        }
        edf
    }

    /// The entry due first; it is re-added with `weight(index)`.
    pub fn pick(&self, weight: impl Fn(usize) -> f64) -> usize {
        let mut s = self.state.borrow_mut();
        let Some(Reverse(mut top)) = s.queue.pop() else {
            return 0;
        };
        s.now = top.deadline;
        top.deadline = s.now + 1.0 / weight(top.index);
        top.order = s.next_order;
        s.next_order += 1;
        let index = top.index;
        s.queue.push(Reverse(top));
        index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_in_proportion_to_weight_and_interleaves() {
        let w = [1.0, 2.0, 4.0];
        let edf = Edf::new(&w, 0);
        let picks: Vec<usize> = (0..7).map(|_| edf.pick(|i| w[i])).collect();
        let count = |i| picks.iter().filter(|&&p| p == i).count();
        assert_eq!((count(0), count(1), count(2)), (1, 2, 4));
        // The heaviest host does not get its share in one run.
        assert_eq!(&picks[..2], &[2, 1]);
    }
}
