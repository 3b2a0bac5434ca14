//! A worker's view of a cluster's hosts by priority (Envoy's `PrioritySet` and
//! `LoadBalancerBase`): each priority's healthy, degraded and all hosts; the share
//! of requests each priority takes from its health and the overprovisioning
//! factor (spill-over to the next priority); panic mode below
//! `healthy_panic_threshold`; locality weighting. Built when the host list or the
//! hosts' health change; a pick is then a few array lookups and the policy's pick.

use std::cell::OnceCell;
use std::sync::Arc;

use super::{LbContext, LoadBalancer, build, group_by_locality, is_hashing};
use crate::config::LbConfig;
use crate::per_worker::LocalHandle;
use crate::stats::Counter;
use crate::upstream::{Host, HostHealth};

/// Which hosts of a priority a pick uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Healthy = 0,
    Degraded = 1,
    /// Panic mode: every host, healthy or not.
    All = 2,
}

/// Hosts and their balancer (built on first use).
struct HostSource {
    hosts: Vec<LocalHandle<Host>>,
    lb: OnceCell<Picker>,
}

enum Picker {
    Plain(Box<dyn LoadBalancer>),
    /// `locality_weighted_lb_config`: a locality by its effective weight, then a
    /// host of it. (index map into `hosts`, balancer) per locality.
    Localities {
        edf: super::edf::Edf,
        weights: Vec<f64>,
        localities: Vec<(Vec<usize>, Box<dyn LoadBalancer>)>,
    },
}

struct Priority {
    sources: [HostSource; 3],
    panic: bool,
}

pub struct PrioritySet {
    config: LbConfig,
    /// `cluster.<name>.lb_healthy_panic`.
    panic_counter: Counter,
    priorities: Vec<Priority>,
    healthy_load: Vec<u32>,
    degraded_load: Vec<u32>,
    /// The load assignment's, for priority loads and effective locality weights.
    overprovisioning_factor: u32,
}

impl PrioritySet {
    pub fn new(
        hosts: &[Arc<Host>],
        config: LbConfig,
        overprovisioning_factor: u32,
        panic_counter: Counter,
    ) -> Self {
        let levels = hosts
            .iter()
            .map(|h| h.priority() as usize + 1)
            .max()
            .unwrap_or(0);
        let mut priorities: Vec<Priority> = (0..levels)
            .map(|_| Priority {
                sources: std::array::from_fn(|_| HostSource {
                    hosts: Vec::new(),
                    lb: OnceCell::new(),
                }),
                panic: false,
            })
            .collect();
        for h in hosts {
            let p = &mut priorities[h.priority() as usize];
            let handle = LocalHandle::new(h.clone());
            match h.health() {
                HostHealth::Healthy => p.sources[Source::Healthy as usize]
                    .hosts
                    .push(handle.clone()),
                HostHealth::Degraded => p.sources[Source::Degraded as usize]
                    .hosts
                    .push(handle.clone()),
                HostHealth::Unhealthy => {}
            }
            p.sources[Source::All as usize].hosts.push(handle);
        }
        let mut set = PrioritySet {
            config,
            panic_counter,
            priorities,
            healthy_load: vec![0; levels],
            degraded_load: vec![0; levels],
            overprovisioning_factor,
        };
        set.compute_loads();
        set
    }

    fn counts(&self, p: usize) -> (u64, u64, u64) {
        let s = &self.priorities[p].sources;
        (
            s[Source::Healthy as usize].hosts.len() as u64,
            s[Source::Degraded as usize].hosts.len() as u64,
            s[Source::All as usize].hosts.len() as u64,
        )
    }

    /// Envoy's `recalculatePerPriorityState` and `recalculatePerPriorityPanic`.
    fn compute_loads(&mut self) {
        let levels = self.priorities.len();
        if levels == 0 {
            return;
        }
        let factor = u64::from(self.overprovisioning_factor);
        let availability = |n: u64, total: u64| {
            (factor * n)
                .checked_div(total)
                .map_or(0, |a| a.min(100) as u32)
        };
        let health: Vec<u32> = (0..levels)
            .map(|p| {
                let (h, _, t) = self.counts(p);
                availability(h, t)
            })
            .collect();
        let degraded: Vec<u32> = (0..levels)
            .map(|p| {
                let (_, d, t) = self.counts(p);
                availability(d, t)
            })
            .collect();
        let total_availability = health.iter().chain(&degraded).sum::<u32>().min(100);
        if total_availability > 0 {
            let (first_healthy, left) =
                distribute(&mut self.healthy_load, &health, 100, total_availability);
            let (first_degraded, left) =
                distribute(&mut self.degraded_load, &degraded, left, total_availability);
            if left != 0 {
                match (first_healthy, first_degraded) {
                    (Some(p), _) => self.healthy_load[p] += left,
                    (None, Some(p)) => self.degraded_load[p] += left,
                    (None, None) => {}
                }
            }
        }
        let threshold = u64::from(self.config.healthy_panic_threshold.min(100));
        if threshold == 0 && total_availability == 0 {
            self.healthy_load[0] = 100;
            return;
        }
        for p in 0..levels {
            let (h, d, t) = self.counts(p);
            // Envoy compares percentages as doubles: (h + d) / t < threshold.
            let in_panic = t == 0 || ((h + d) as f64 * 100.0 / t as f64) < threshold as f64;
            self.priorities[p].panic = total_availability == 0 || in_panic;
        }
        if total_availability == 0 {
            // Total panic: load by host count.
            let total: u64 = (0..levels).map(|p| self.counts(p).2).sum();
            let mut left = 100u32;
            let mut first = None;
            for p in 0..levels {
                let n = self.counts(p).2;
                if first.is_none() && n != 0 {
                    first = Some(p);
                }
                let load = (100 * n).checked_div(total).unwrap_or(0) as u32;
                self.healthy_load[p] = load;
                self.degraded_load[p] = 0;
                left -= load;
            }
            self.healthy_load[first.unwrap_or(0)] += left;
        }
    }

    /// A host for one try, or None when the cluster has none.
    pub fn choose(&self, context: &LbContext<'_>) -> Option<LocalHandle<Host>> {
        if self.priorities.is_empty() {
            return None;
        }
        let hashing = is_hashing(&self.config.policy);
        let hash = match context.hash {
            Some(h) if hashing => h,
            _ => rand::random(),
        };
        let (priority, degraded) = self.choose_priority(hash);
        let p = &self.priorities[priority];
        let source = if p.panic {
            self.panic_counter.inc();
            Source::All
        } else if degraded && !hashing {
            Source::Degraded
        } else {
            // A ring or table holds a priority's healthy hosts only (all of them
            // in panic), whichever share chose the priority: Envoy's
            // `ThreadAwareLoadBalancerBase::refresh`.
            Source::Healthy
        };
        let src = &p.sources[source as usize];
        if src.hosts.is_empty() {
            return None;
        }
        let picker = src.lb.get_or_init(|| self.picker(&src.hosts, source, p));
        let attempts = if context.previous_hosts.is_empty() {
            1
        } else {
            context.host_selection_attempts.max(1)
        };
        let mut host = 0;
        for attempt in 0..attempts {
            host = match picker {
                Picker::Plain(lb) => lb.choose(hash, attempt),
                Picker::Localities {
                    edf,
                    weights,
                    localities,
                } => {
                    let (members, lb) = &localities[edf.pick(|i| weights[i])];
                    members[lb.choose(hash, attempt)]
                }
            };
            if !context.avoids(&src.hosts[host]) {
                break;
            }
        }
        Some(src.hosts[host].clone())
    }

    /// Envoy's `choosePriority`: `hash % 100` through the healthy loads, then the
    /// degraded ones; (priority, whether degraded).
    fn choose_priority(&self, hash: u64) -> (usize, bool) {
        let h = (hash % 100 + 1) as u32;
        let mut sum = 0;
        for (p, load) in self.healthy_load.iter().enumerate() {
            sum += load;
            if h <= sum {
                return (p, false);
            }
        }
        for (p, load) in self.degraded_load.iter().enumerate() {
            sum += load;
            if h <= sum {
                return (p, true);
            }
        }
        (0, false)
    }

    fn picker(&self, hosts: &[LocalHandle<Host>], source: Source, p: &Priority) -> Picker {
        let policy = &self.config.policy;
        if !self.config.locality_weighted {
            return Picker::Plain(build(policy, hosts));
        }
        if is_hashing(policy) {
            // Locality weights scale the hosts' shares of the ring or table.
            let weights = super::normalized_weights(hosts, true);
            return Picker::Plain(match *policy {
                crate::config::LbPolicy::RingHash {
                    minimum_ring_size,
                    maximum_ring_size,
                } => Box::new(super::RingHash::new(
                    &weights,
                    minimum_ring_size,
                    maximum_ring_size,
                )),
                crate::config::LbPolicy::Maglev { table_size } => {
                    Box::new(super::Maglev::new(&weights, table_size))
                }
                _ => unreachable!("is_hashing"),
            });
        }
        if source == Source::All {
            // Envoy skips locality weighting in panic mode.
            return Picker::Plain(build(policy, hosts));
        }
        // Effective locality weight: its weight × min(1, factor × eligible / all).
        let all = group_by_locality(&p.sources[Source::All as usize].hosts);
        let mut weights = Vec::new();
        let mut localities = Vec::new();
        for (w, members) in group_by_locality(hosts) {
            let locality = hosts[members[0]].locality.clone();
            let total = all
                .iter()
                .find(|(_, m)| p.sources[Source::All as usize].hosts[m[0]].locality == locality)
                .map_or(members.len(), |(_, m)| m.len());
            let ratio = (f64::from(self.overprovisioning_factor) / 100.0 * members.len() as f64
                / total as f64)
                .min(1.0);
            let effective = f64::from(w) * ratio;
            if effective > 0.0 {
                let member_hosts: Vec<LocalHandle<Host>> =
                    members.iter().map(|&i| hosts[i].clone()).collect();
                weights.push(effective);
                localities.push((members, build(policy, &member_hosts)));
            }
        }
        if localities.is_empty() {
            return Picker::Plain(build(policy, hosts));
        }
        Picker::Localities {
            edf: super::edf::Edf::new(&weights, rand::random_range(0..weights.len())),
            weights,
            localities,
        }
    }
}

/// Envoy's `distributeLoad`: as much load as each priority's availability allows,
/// highest priority first; (first available priority, load left).
fn distribute(
    load: &mut [u32],
    availability: &[u32],
    mut total: u32,
    normalized_total: u32,
) -> (Option<usize>, u32) {
    let mut first = None;
    for (p, a) in availability.iter().enumerate() {
        if first.is_none() && *a > 0 {
            first = Some(p);
        }
        load[p] = total.min(a * 100 / normalized_total);
        total -= load[p];
    }
    (first, total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EdsHealth, LbPolicy};
    use crate::upstream::cluster::HostSpec;
    use crate::upstream::health_flag;

    fn hosts(specs: &[(u32, EdsHealth)]) -> Vec<Arc<Host>> {
        specs
            .iter()
            .zip(1..)
            .map(|((priority, health), port)| {
                Arc::new(Host::from_spec(
                    &HostSpec {
                        priority: *priority,
                        health: *health,
                        ..HostSpec::plain(([127, 0, 0, 1], port).into())
                    },
                    1,
                ))
            })
            .collect()
    }

    fn set(hosts: &[Arc<Host>]) -> PrioritySet {
        PrioritySet::new(hosts, LbConfig::default(), 140, Counter::default())
    }

    use EdsHealth::{Degraded as D, Healthy as H, Unhealthy as U};

    #[test]
    fn spill_over_follows_the_overprovisioning_factor() {
        // P0: 1 of 2 healthy → 70% availability, the rest spills to P1.
        let s = set(&hosts(&[(0, H), (0, U), (1, H)]));
        assert_eq!(s.healthy_load, vec![70, 30]);
        // 3 of 4 healthy: 105% capped → all on P0.
        let s = set(&hosts(&[(0, H), (0, H), (0, H), (0, U), (1, H)]));
        assert_eq!(s.healthy_load, vec![100, 0]);
        // P0 all unhealthy → P1 takes everything.
        let s = set(&hosts(&[(0, U), (0, U), (1, H)]));
        assert_eq!(s.healthy_load, vec![0, 100]);
        assert!(!s.priorities[1].panic);
        for _ in 0..50 {
            assert_eq!(s.choose(&LbContext::default()).unwrap().priority(), 1);
        }
    }

    #[test]
    fn degraded_hosts_take_what_healthy_ones_cannot() {
        let s = set(&hosts(&[(0, H), (0, D), (0, D), (0, D)]));
        // Healthy: 140 × 1/4 = 35; degraded: min(100, 140 × 3/4) = 100 → 65 left.
        assert_eq!((s.healthy_load[0], s.degraded_load[0]), (35, 65));
    }

    #[test]
    fn panic_below_the_threshold_uses_every_host() {
        let hs = hosts(&[(0, H), (0, U), (0, U)]);
        let s = set(&hs);
        assert!(s.priorities[0].panic);
        let picked: std::collections::HashSet<_> = (0..200)
            .map(|_| s.choose(&LbContext::default()).unwrap().address)
            .collect();
        assert_eq!(picked.len(), 3);
        // Threshold 0: never panic; only the healthy host.
        let config = LbConfig {
            healthy_panic_threshold: 0,
            ..LbConfig::default()
        };
        let s = PrioritySet::new(&hs, config, 140, Counter::default());
        assert!(!s.priorities[0].panic);
        for _ in 0..50 {
            assert_eq!(
                s.choose(&LbContext::default()).unwrap().address,
                hs[0].address
            );
        }
        // All unhealthy everywhere: total panic, load by host count.
        let hs = hosts(&[(0, U), (1, U), (1, U), (1, U)]);
        let s = set(&hs);
        assert_eq!(s.healthy_load, vec![25, 75]);
        assert!(s.priorities.iter().all(|p| p.panic));
    }

    #[test]
    fn active_health_check_flags_count_too() {
        let hs = hosts(&[(0, H), (0, H), (1, H)]);
        hs[0].set_health_flag(health_flag::FAILED_ACTIVE_HC);
        hs[1].set_health_flag(health_flag::FAILED_OUTLIER_CHECK);
        let s = set(&hs);
        assert_eq!(s.healthy_load, vec![0, 100]);
    }

    #[test]
    fn hash_chooses_priority_and_host_for_hashing_policies() {
        let hs = hosts(&[(0, H), (0, H), (0, H)]);
        let config = LbConfig {
            policy: LbPolicy::Maglev { table_size: 65537 },
            ..LbConfig::default()
        };
        let s = PrioritySet::new(&hs, config, 140, Counter::default());
        let ctx = LbContext {
            hash: Some(12345),
            ..LbContext::default()
        };
        let first = s.choose(&ctx).unwrap().address;
        for _ in 0..20 {
            assert_eq!(s.choose(&ctx).unwrap().address, first);
        }
    }

    #[test]
    fn locality_weights_split_the_load() {
        let loc = |zone: &str, weight| {
            (
                Some(Arc::new(crate::config::Locality {
                    zone: zone.into(),
                    ..Default::default()
                })),
                weight,
            )
        };
        let specs = [loc("a", 1), loc("b", 3), loc("b", 3)];
        let hs: Vec<Arc<Host>> = specs
            .iter()
            .zip(1..)
            .map(|((l, w), port)| {
                Arc::new(Host::from_spec(
                    &HostSpec {
                        locality: l.clone(),
                        locality_weight: *w,
                        ..HostSpec::plain(([127, 0, 0, 1], port).into())
                    },
                    1,
                ))
            })
            .collect();
        let config = LbConfig {
            locality_weighted: true,
            ..LbConfig::default()
        };
        let s = PrioritySet::new(&hs, config, 140, Counter::default());
        let a = (0..4000)
            .filter(|_| s.choose(&LbContext::default()).unwrap().address == hs[0].address)
            .count();
        assert!((990..=1010).contains(&a), "{a}");
    }

    #[test]
    fn previous_hosts_are_avoided() {
        let hs = hosts(&[(0, H), (0, H), (0, H)]);
        let s = set(&hs);
        let previous = [
            LocalHandle::new(hs[0].clone()),
            LocalHandle::new(hs[1].clone()),
        ];
        // Round robin: three picks always reach the host not tried yet.
        let ctx = LbContext {
            previous_hosts: &previous,
            host_selection_attempts: 3,
            ..LbContext::default()
        };
        for _ in 0..10 {
            assert_eq!(s.choose(&ctx).unwrap().address, hs[2].address);
        }
        // One pick (host_selection_retry_max_attempts 0): the pick stands even
        // when it is a previous host, as in Envoy.
        let once = LbContext {
            host_selection_attempts: 1,
            ..ctx
        };
        let repeats = (0..9)
            .filter(|_| s.choose(&once).unwrap().address != hs[2].address)
            .count();
        assert_eq!(repeats, 6);
    }
}
