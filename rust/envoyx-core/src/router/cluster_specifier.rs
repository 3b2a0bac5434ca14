//! The cluster of one request when its route names it by header
//! (`cluster_header`) or by weight (`weighted_clusters`), as Envoy's
//! `RouteEntryImplBase::clusterEntry` picks it.

use std::borrow::Cow;

use http::HeaderMap;

use crate::config::route_action::{ClusterSpecifier, WeightedClusters};

/// The cluster picked for a request, and the picked weighted entry's own
/// `host_rewrite_literal`.
pub struct Picked<'h, 's> {
    /// "" when the request names none (its header is missing): cluster not found.
    pub cluster: Cow<'h, str>,
    pub host_rewrite: Option<&'s str>,
}

pub fn pick<'h, 's: 'h>(spec: &'s ClusterSpecifier, headers: &'h HeaderMap) -> Picked<'h, 's> {
    match spec {
        ClusterSpecifier::Header(name) => Picked {
            cluster: first_value(headers, name),
            host_rewrite: None,
        },
        ClusterSpecifier::Weighted(w) => {
            let entry = &w.clusters[w.index(headers, rand::random::<u64>())];
            let cluster = match (&entry.cluster_header, &entry.name) {
                (Some(h), _) => first_value(headers, h),
                (None, Some(name)) => Cow::Borrowed(name.as_str()),
                (None, None) => Cow::Borrowed(""),
            };
            Picked {
                cluster,
                host_rewrite: entry.host_rewrite.as_deref(),
            }
        }
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
