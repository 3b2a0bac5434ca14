//! The cluster of one request when its route names it by header
//! (`cluster_header`) or by weight (`weighted_clusters`), as Envoy's
//! `RouteEntryImplBase::clusterEntry` picks it.

use std::borrow::Cow;

use http::HeaderMap;

use crate::config::route_action::{ClusterSpecifier, ClusterWeight, WeightedClusters};
use crate::config::{ForwardAction, RouteAction, RouteEntry};

/// The weighted cluster entry of a request on `route` (None: the route has no
/// `weighted_clusters`). Envoy picks it with the route, before the filters run:
/// the entry's `typed_per_filter_config` applies to them.
pub fn pick_weighted<'r>(route: &'r RouteEntry, headers: &HeaderMap) -> Option<&'r ClusterWeight> {
    let RouteAction::Forward(action) = &route.action else {
        return None;
    };
    match action.cluster_specifier.as_deref()? {
        ClusterSpecifier::Weighted(w) => Some(&w.clusters[w.index(headers, rand::random::<u64>())]),
        ClusterSpecifier::Header(_) => None,
    }
}

/// Where the router finds a request's cluster.
pub enum ClusterChoice<'h, 's> {
    /// A name known when the route table was compiled: its slot there.
    Slot(usize, &'s str),
    /// A name the request gives (`cluster_header`), looked up by name; "" when
    /// the header is missing (cluster not found).
    Named(Cow<'h, str>),
}

/// The cluster of a request on `action`, with `entry` its picked weighted
/// cluster (see [`pick_weighted`]).
pub fn choose<'h, 's: 'h>(
    action: &'s ForwardAction,
    entry: Option<&'s ClusterWeight>,
    headers: &'h HeaderMap,
) -> ClusterChoice<'h, 's> {
    let entry = match (action.cluster_specifier.as_deref(), entry) {
        (None, _) => return ClusterChoice::Slot(action.cluster_slot, &action.cluster),
        (Some(ClusterSpecifier::Header(name)), _) => {
            return ClusterChoice::Named(first_value(headers, name));
        }
        (Some(ClusterSpecifier::Weighted(_)), Some(entry)) => entry,
        // Picked here when the stream did not (it always does before its filters).
        (Some(ClusterSpecifier::Weighted(w)), None) => {
            &w.clusters[w.index(headers, rand::random::<u64>())]
        }
    };
    match (&entry.cluster_header, &entry.name) {
        (Some(h), _) => ClusterChoice::Named(first_value(headers, h)),
        (None, Some(name)) => ClusterChoice::Slot(entry.cluster_slot, name),
        (None, None) => ClusterChoice::Named(Cow::Borrowed("")),
    }
}

/// The first value of an (untrusted) header, as Envoy reads a cluster header.
fn first_value<'a>(headers: &'a HeaderMap, name: &http::HeaderName) -> Cow<'a, str> {
    Cow::Borrowed(
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(""),
    )
}

impl WeightedClusters {
    /// The index of the entry whose weight interval holds the request's value:
    /// `header_name`'s value when it is one integer, else `random`, modulo the
    /// total weight (Envoy's `pickWeightedCluster`).
    pub fn index(&self, headers: &HeaderMap, random: u64) -> usize {
        let from_header = self.header_name.as_ref().and_then(|name| {
            let mut values = headers.get_all(name).iter();
            let first = values.next()?;
            if values.next().is_some() {
                // Several values would pick inconsistently: Envoy ignores them.
                return None;
            }
            first.to_str().ok()?.trim().parse::<u64>().ok()
        });
        let selected = from_header.unwrap_or(random) % self.total_weight;
        let mut end = 0;
        for (i, c) in self.clusters.iter().enumerate() {
            end += c.weight;
            if selected < end {
                return i;
            }
        }
        self.clusters.len() - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::route_action::ClusterWeight;

    fn weighted(weights: &[u64]) -> WeightedClusters {
        WeightedClusters {
            clusters: weights
                .iter()
                .enumerate()
                .map(|(i, w)| ClusterWeight {
                    name: Some(format!("c{i}")),
                    cluster_header: None,
                    weight: *w,
                    host_rewrite: None,
                    cluster_slot: 0,
                    header_mutations: None,
                    filter_overrides: Vec::new(),
                })
                .collect(),
            total_weight: weights.iter().sum(),
            header_name: Some(http::HeaderName::from_static("x-pick")),
        }
    }

    #[test]
    fn intervals_follow_the_weights_in_order() {
        let w = weighted(&[1, 0, 3]);
        let none = HeaderMap::new();
        let picks: Vec<usize> = (0..8).map(|r| w.index(&none, r)).collect();
        assert_eq!(picks, [0, 2, 2, 2, 0, 2, 2, 2]);
    }

    #[test]
    fn header_value_replaces_the_random_value_when_single_and_numeric() {
        let w = weighted(&[1, 1]);
        let mut h = HeaderMap::new();
        h.insert("x-pick", "1".parse().unwrap());
        assert_eq!(w.index(&h, 0), 1);
        h.insert("x-pick", "abc".parse().unwrap());
        assert_eq!(w.index(&h, 0), 0);
        h.insert("x-pick", "1".parse().unwrap());
        h.append("x-pick", "1".parse().unwrap());
        assert_eq!(w.index(&h, 0), 0, "several values: the random value");
    }
}
