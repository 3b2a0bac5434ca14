//! Which thread is running: a worker (with its index) or any other thread.
//!
//! Per-worker state that other threads must read (stats shards, access-log
//! buffers) is indexed by [`shard`]: worker `i` owns slot `i + 1`; every other
//! thread (the control thread, admin, Python callers) shares slot 0.

use std::cell::Cell;

thread_local! {
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Marks the calling thread as worker `index`; called once when a worker starts.
pub fn enter(index: usize) {
    WORKER.with(|w| w.set(Some(index)));
}

/// The calling thread's worker index, if it is a worker.
pub fn current() -> Option<usize> {
    WORKER.with(Cell::get)
}

/// The slot of per-worker state this thread writes: `index + 1` on worker
/// `index`, 0 elsewhere. Structures sized with `workers + 1` slots hold all.
#[inline]
pub fn shard() -> usize {
    WORKER.with(|w| w.get().map_or(0, |i| i + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_have_their_own_slot() {
        assert_eq!(shard(), 0);
        std::thread::spawn(|| {
            enter(3);
            assert_eq!(current(), Some(3));
            assert_eq!(shard(), 4);
        })
        .join()
        .unwrap();
        assert_eq!(current(), None);
    }
}
