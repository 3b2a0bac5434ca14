//! Per-host stats (`/clusters`: `cx_total`, `rq_active`, …) in per-worker rows.
//!
//! Every request writes several of them, so a single atomic per stat would be a
//! cache line both workers write per request. Instead each worker writes its own
//! cache-line row (a plain load and store: it is the row's only writer), other
//! threads share row 0 (`fetch_add`), and a read sums the rows. No registry entry
//! and one small allocation per host: an EDS update may bring thousands of hosts.

use std::sync::atomic::{AtomicI64, Ordering};

use crate::per_worker;

/// The host stats, by their index in a row.
const CX_TOTAL: usize = 0;
const CX_ACTIVE: usize = 1;
const CX_CONNECT_FAIL: usize = 2;
const RQ_TOTAL: usize = 3;
const RQ_ACTIVE: usize = 4;
const RQ_SUCCESS: usize = 5;
const RQ_ERROR: usize = 6;
const RQ_TIMEOUT: usize = 7;

/// One thread's cells of every host stat: one cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Row([AtomicI64; 8]);

#[derive(Debug)]
pub struct HostStats {
    rows: Box<[Row]>,
}

impl HostStats {
    /// Stats with a row per shard (`workers + 1`, see [`per_worker::shard`]).
    pub fn new(shards: usize) -> Self {
        HostStats {
            rows: (0..shards.max(1)).map(|_| Row::default()).collect(),
        }
    }

    fn add(&self, stat: usize, n: i64) {
        let shard = per_worker::shard();
        match self.rows.get(shard) {
            // A worker's own row: it is the only writer.
            Some(row) if shard != 0 => {
                let cell = &row.0[stat];
                cell.store(cell.load(Ordering::Relaxed) + n, Ordering::Relaxed);
            }
            _ => {
                self.rows[0].0[stat].fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    fn sum(&self, stat: usize) -> i64 {
        self.rows
            .iter()
            .map(|r| r.0[stat].load(Ordering::Relaxed))
            .sum()
    }
}

/// One host stat of a host.
pub struct HostStat<'a> {
    stats: &'a HostStats,
    index: usize,
}

impl HostStat<'_> {
    pub fn inc(&self) {
        self.stats.add(self.index, 1);
    }
    pub fn dec(&self) {
        self.stats.add(self.index, -1);
    }
    pub fn get(&self) -> i64 {
        self.stats.sum(self.index)
    }
}

macro_rules! host_stats {
    ($($name:ident = $index:ident),* $(,)?) => {
        impl HostStats {
            $(
                pub fn $name(&self) -> HostStat<'_> {
                    HostStat { stats: self, index: $index }
                }
            )*
        }
    };
}

host_stats! {
    cx_total = CX_TOTAL,
    cx_active = CX_ACTIVE,
    cx_connect_fail = CX_CONNECT_FAIL,
    rq_total = RQ_TOTAL,
    rq_active = RQ_ACTIVE,
    rq_success = RQ_SUCCESS,
    rq_error = RQ_ERROR,
    rq_timeout = RQ_TIMEOUT,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_write_their_rows_and_reads_sum_them() {
        let stats = std::sync::Arc::new(HostStats::new(3));
        let threads: Vec<_> = (0..3)
            .map(|i| {
                let stats = stats.clone();
                std::thread::spawn(move || {
                    // Workers 0 and 1 have rows; "worker 7" falls back to row 0.
                    per_worker::enter([0, 1, 7][i]);
                    for _ in 0..1000 {
                        stats.rq_total().inc();
                        stats.rq_active().inc();
                    }
                    for _ in 0..1000 {
                        stats.rq_active().dec();
                    }
                })
            })
            .collect();
        for _ in 0..500 {
            stats.rq_total().inc();
        }
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(stats.rq_total().get(), 3500);
        assert_eq!(stats.rq_active().get(), 0);
        assert_eq!(stats.cx_total().get(), 0);
    }
}
