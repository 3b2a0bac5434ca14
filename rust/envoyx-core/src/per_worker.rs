//! What per-worker state needs: which worker a thread is, and handles that keep a
//! worker's use of shared objects off the cache lines other workers write.
//!
//! Per-worker state that other threads must read (stats shards, access-log
//! buffers) is indexed by [`shard`]: worker `i` owns slot `i + 1`; every other
//! thread (the control thread, admin, Python callers) shares slot 0.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

thread_local! {
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Marks the calling thread as worker `index`; called once when a worker starts.
pub fn enter(index: usize) {
    WORKER.with(|w| w.set(Some(index)));
}

/// The slot of per-worker state this thread writes: `index + 1` on worker
/// `index`, 0 elsewhere. Structures sized with `workers + 1` slots hold all.
#[inline]
pub fn shard() -> usize {
    WORKER.with(|w| w.get().map_or(0, |i| i + 1))
}

/// A worker's handle on an object shared by every worker (a route table, a
/// cluster): cloned per request with a plain count, so that the shared `Arc`'s
/// count — a cache line all workers write — moves only when the worker takes a new
/// object, not per request. (An `Rc` around an `Arc` is exactly the point here.)
#[allow(clippy::redundant_allocation)]
pub struct LocalHandle<T>(Rc<Arc<T>>);

impl<T> LocalHandle<T> {
    pub fn new(shared: Arc<T>) -> Self {
        LocalHandle(Rc::new(shared))
    }

    /// The shared object itself.
    pub fn shared(&self) -> &Arc<T> {
        &self.0
    }

    /// Whether both are handles on the same object.
    pub fn same(&self, other: &Arc<T>) -> bool {
        Arc::ptr_eq(&self.0, other)
    }

    /// Whether both handles are the same handle.
    pub fn ptr_eq(a: &Self, b: &Self) -> bool {
        Rc::ptr_eq(&a.0, &b.0)
    }
}

impl<T> Clone for LocalHandle<T> {
    fn clone(&self) -> Self {
        LocalHandle(self.0.clone())
    }
}

impl<T> std::ops::Deref for LocalHandle<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_have_their_own_slot() {
        assert_eq!(shard(), 0);
        std::thread::spawn(|| {
            enter(3);
            assert_eq!(shard(), 4);
        })
        .join()
        .unwrap();
        assert_eq!(shard(), 0);
    }
}
