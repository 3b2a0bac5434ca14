//! A cluster's `circuit_breakers` (`envoy.config.cluster.v3.CircuitBreakers`):
//! the limits of each routing priority, with Envoy's defaults.

use super::reader::Obj;

/// `envoy.config.core.v3.RoutingPriority`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Priority {
    #[default]
    Default,
    High,
}

impl Priority {
    /// The name in stats (`circuit_breakers.default.*`, `circuit_breakers.high.*`).
    pub fn stat_name(self) -> &'static str {
        match self {
            Priority::Default => "default",
            Priority::High => "high",
        }
    }

    /// Reads a `RoutingPriority` enum field (`DEFAULT` when unset).
    pub fn read(o: &Obj<'_>, field: &'static str) -> Priority {
        match o.str(field).unwrap_or("DEFAULT") {
            "DEFAULT" => Priority::Default,
            "HIGH" => Priority::High,
            other => {
                o.error(field, format!("unknown value {other}"));
                Priority::Default
            }
        }
    }
}

/// `retry_budget`: retries allowed as a share of the active and pending requests
/// (in use when `budget_percent` or `min_retry_concurrency` is set).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudget {
    /// `budget_percent.value` (default 20 %).
    pub budget_percent: f64,
    /// `min_retry_concurrency` (default 3): allowed whatever the share gives.
    pub min_retry_concurrency: u32,
}

/// The limits of one priority (`Thresholds`, Envoy's defaults when unset).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// `max_connections` (default 1024).
    pub max_connections: u64,
    /// `max_pending_requests` (default 1024).
    pub max_pending_requests: u64,
    /// `max_requests` (default 1024).
    pub max_requests: u64,
    /// `max_retries` (default 3); not used while a retry budget is set.
    pub max_retries: u64,
    pub retry_budget: Option<RetryBudget>,
    /// `track_remaining`: publish the `remaining_*` gauges.
    pub track_remaining: bool,
    /// `per_host_thresholds[].max_connections` of this priority (default: no limit).
    pub max_connections_per_host: Option<u64>,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            retry_budget: None,
            track_remaining: false,
            max_connections_per_host: None,
        }
    }
}

/// The thresholds of both priorities.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CircuitBreakers {
    pub default: Thresholds,
    pub high: Thresholds,
}

impl CircuitBreakers {
    pub fn get(&self, priority: Priority) -> &Thresholds {
        match priority {
            Priority::Default => &self.default,
            Priority::High => &self.high,
        }
    }

    fn get_mut(&mut self, priority: Priority) -> &mut Thresholds {
        match priority {
            Priority::Default => &mut self.default,
            Priority::High => &mut self.high,
        }
    }
}

/// The cluster's `circuit_breakers` (Envoy's defaults when absent). As in Envoy,
/// the first `thresholds` (and `per_host_thresholds`) entry of a priority is
/// used and later ones of the same priority are ignored. Of a per-host entry
/// only `max_connections` is read (the only per-host limit Envoy enforces);
/// other fields there are refused.
pub fn map_circuit_breakers(cluster: &Obj<'_>) -> CircuitBreakers {
    let mut breakers = CircuitBreakers::default();
    let Some(cb) = cluster.obj("circuit_breakers") else {
        return breakers;
    };
    let mut seen = [false; 2];
    for t in cb.list("thresholds") {
        let priority = Priority::read(&t, "priority");
        let thresholds = map_thresholds(&t);
        if !std::mem::replace(&mut seen[priority as usize], true) {
            *breakers.get_mut(priority) = thresholds;
        }
    }
    let mut seen = [false; 2];
    for t in cb.list("per_host_thresholds") {
        let priority = Priority::read(&t, "priority");
        let max = t.u32("max_connections").map(u64::from);
        if !std::mem::replace(&mut seen[priority as usize], true) {
            breakers.get_mut(priority).max_connections_per_host = max;
        }
    }
    breakers
}

fn map_thresholds(t: &Obj<'_>) -> Thresholds {
    let d = Thresholds::default();
    let limit = |field, default| t.u32(field).map_or(default, u64::from);
    // As in Envoy, the budget replaces max_retries only when one of its fields
    // is set (an empty `retry_budget` changes nothing).
    let retry_budget = t.obj("retry_budget").and_then(|b| {
        let percent = b.obj("budget_percent").map(|p| match p.raw("value") {
            None => 0.0,
            Some(v) => v.as_f64().unwrap_or_else(|| {
                p.error("value", "expected a number");
                0.0
            }),
        });
        let min = b.u32("min_retry_concurrency");
        (percent.is_some() || min.is_some()).then(|| RetryBudget {
            budget_percent: percent.unwrap_or(20.0),
            min_retry_concurrency: min.unwrap_or(3),
        })
    });
    Thresholds {
        max_connections: limit("max_connections", d.max_connections),
        max_pending_requests: limit("max_pending_requests", d.max_pending_requests),
        max_requests: limit("max_requests", d.max_requests),
        max_retries: limit("max_retries", d.max_retries),
        retry_budget,
        track_remaining: t.bool("track_remaining").unwrap_or(false),
        max_connections_per_host: None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::reader::Errors;

    fn map(v: serde_json::Value) -> (CircuitBreakers, Vec<String>) {
        let errors = Errors::default();
        let breakers = {
            let o = Obj::new(&v, "clusters[0]".into(), &errors).unwrap();
            map_circuit_breakers(&o)
        };
        (breakers, errors.into_vec())
    }

    #[test]
    fn defaults_when_absent() {
        let (b, errors) = map(json!({}));
        assert!(errors.is_empty());
        assert_eq!(b.default, Thresholds::default());
        assert_eq!(b.high.max_connections, 1024);
        assert_eq!(b.high.max_retries, 3);
    }

    #[test]
    fn first_thresholds_of_a_priority_win() {
        let (b, errors) = map(json!({"circuit_breakers": {
            "thresholds": [
                {"max_connections": 1, "max_pending_requests": 2, "track_remaining": true},
                {"priority": "HIGH", "max_requests": 7,
                 "retry_budget": {"budget_percent": {"value": 50.0}}},
                {"max_connections": 9}
            ],
            "per_host_thresholds": [{"priority": "HIGH", "max_connections": 4}]
        }}));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(b.default.max_connections, 1);
        assert_eq!(b.default.max_pending_requests, 2);
        assert_eq!(b.default.max_requests, 1024);
        assert!(b.default.track_remaining);
        assert_eq!(b.default.max_connections_per_host, None);
        assert_eq!(b.high.max_requests, 7);
        assert_eq!(
            b.high.retry_budget,
            Some(RetryBudget {
                budget_percent: 50.0,
                min_retry_concurrency: 3
            })
        );
        assert_eq!(b.high.max_connections_per_host, Some(4));
    }

    #[test]
    fn empty_retry_budget_keeps_max_retries() {
        let (b, errors) = map(json!({"circuit_breakers": {"thresholds": [
            {"retry_budget": {}, "max_retries": 5},
            {"priority": "HIGH", "retry_budget": {"min_retry_concurrency": 1}}
        ]}}));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(b.default.retry_budget, None);
        assert_eq!(b.default.max_retries, 5);
        assert_eq!(
            b.high.retry_budget,
            Some(RetryBudget {
                budget_percent: 20.0,
                min_retry_concurrency: 1
            })
        );
    }

    #[test]
    fn what_envoyx_does_not_limit_is_refused_by_name() {
        let (_, errors) = map(json!({"circuit_breakers": {
            "thresholds": [{"max_connection_pools": 2}],
            "per_host_thresholds": [{"max_connections": 1, "max_requests": 3}]
        }}));
        assert_eq!(
            errors,
            vec![
                "clusters[0].circuit_breakers.thresholds[0].max_connection_pools: not supported by envoyx",
                "clusters[0].circuit_breakers.per_host_thresholds[0].max_requests: not supported by envoyx",
            ]
        );
    }
}
