//! `cargo test --release -p envoyx-core --quiet -- --ignored lb_bench --nocapture`:
//! the cost of one host pick per policy (through the worker's priority set, as a
//! request pays it) with 10, 1,000 and 10,000 hosts, and the build time of the
//! ring-hash ring and the Maglev table for 10,000 hosts. Figures go to
//! docs/benchmarks.md; they measure, they assert nothing.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use super::{LbContext, Maglev, PrioritySet, RingHash, normalized_weights};
use crate::config::{LbConfig, LbPolicy};
use crate::per_worker::LocalHandle;
use crate::upstream::Host;
use crate::upstream::cluster::HostSpec;

fn hosts(n: usize, weighted: bool) -> Vec<Arc<Host>> {
    (0..n)
        .map(|i| {
            let spec = HostSpec {
                weight: if weighted { 1 + (i % 5) as u32 } else { 1 },
                ..HostSpec::plain(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 80).into())
            };
            Arc::new(Host::from_spec(&spec, 1))
        })
        .collect()
}

#[test]
#[ignore = "benchmark: run with --ignored lb_bench --nocapture"]
fn lb_bench() {
    let policies = [
        ("ROUND_ROBIN", LbPolicy::RoundRobin, false),
        ("ROUND_ROBIN weighted", LbPolicy::RoundRobin, true),
        (
            "LEAST_REQUEST",
            LbPolicy::LeastRequest {
                choice_count: 2,
                active_request_bias: 1.0,
            },
            false,
        ),
        (
            "LEAST_REQUEST weighted",
            LbPolicy::LeastRequest {
                choice_count: 2,
                active_request_bias: 1.0,
            },
            true,
        ),
        ("RANDOM", LbPolicy::Random, false),
        (
            "RING_HASH",
            LbPolicy::RingHash {
                minimum_ring_size: 1024,
                maximum_ring_size: 8 << 20,
            },
            false,
        ),
        ("MAGLEV", LbPolicy::Maglev { table_size: 65537 }, false),
    ];
    println!("| policy | 10 hosts | 1,000 hosts | 10,000 hosts |");
    println!("|---|---|---|---|");
    for (name, policy, weighted) in policies {
        let mut row = format!("| {name} |");
        for n in [10, 1_000, 10_000] {
            let config = LbConfig {
                policy,
                ..LbConfig::default()
            };
            let set = PrioritySet::new(&hosts(n, weighted), config, 140, Default::default());
            // The first pick builds the balancer; not counted.
            let _ = set.choose(&LbContext::default());
            let picks = 1_000_000u64;
            let start = Instant::now();
            for i in 0..picks {
                let context = LbContext {
                    hash: Some(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                    ..LbContext::default()
                };
                black_box(set.choose(&context));
            }
            let ns = start.elapsed().as_nanos() as f64 / picks as f64;
            row.push_str(&format!(" {ns:.0} ns |"));
        }
        println!("{row}");
    }
    let many: Vec<LocalHandle<Host>> = hosts(10_000, false)
        .into_iter()
        .map(LocalHandle::new)
        .collect();
    let weights = normalized_weights(&many, false);
    let start = Instant::now();
    black_box(RingHash::new(&weights, 1024, 8 << 20));
    println!("ring hash build, 10,000 hosts: {:.1} ms", ms(start));
    let start = Instant::now();
    black_box(Maglev::new(&weights, 65537));
    println!(
        "maglev build (65,537 slots), 10,000 hosts: {:.1} ms",
        ms(start)
    );
    let start = Instant::now();
    black_box(Maglev::new(&weights, 5_000_011));
    println!(
        "maglev build (5,000,011 slots), 10,000 hosts: {:.1} ms",
        ms(start)
    );
    let all = hosts(10_000, true);
    let start = Instant::now();
    let set = PrioritySet::new(&all, LbConfig::default(), 140, Default::default());
    let _ = set.choose(&LbContext::default());
    println!(
        "host-set rebuild + weighted round-robin scheduler, 10,000 hosts: {:.1} ms",
        ms(start)
    );
}

fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1000.0
}
