//! Stats with Envoy's names and meanings, and Envoy's three admin renderings.
//!
//! Handles are created (and their Prometheus name and tags computed) when
//! configuration is applied; the request path only touches relaxed atomics.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use regex::Regex;
use serde_json::{Value, json};

#[derive(Clone, Debug, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Clone, Debug, Default)]
pub struct Gauge(Arc<AtomicI64>);

impl Gauge {
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    #[inline]
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Envoy's default histogram bucket bounds, in milliseconds.
pub const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
const QUANTILES: [f64; 10] = [0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0];

#[derive(Debug, Default)]
pub struct HistogramData {
    /// Count of samples ≤ each bound (not cumulative); the last slot is +Inf.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    count: AtomicU64,
    sum: AtomicU64,
}

#[derive(Clone, Debug, Default)]
pub struct Histogram(Arc<HistogramData>);

impl Histogram {
    /// Records one sample in milliseconds.
    pub fn record(&self, ms: u64) {
        let v = ms as f64;
        let i = BUCKETS
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(BUCKETS.len());
        self.0.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.0.count.fetch_add(1, Ordering::Relaxed);
        self.0.sum.fetch_add(ms, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.0.count.load(Ordering::Relaxed)
    }

    fn cumulative(&self) -> Vec<u64> {
        let mut acc = 0;
        self.0
            .buckets
            .iter()
            .map(|b| {
                acc += b.load(Ordering::Relaxed);
                acc
            })
            .collect()
    }

    /// Quantile estimates by linear interpolation inside a bucket.
    fn quantiles(&self) -> Option<Vec<f64>> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let cum = self.cumulative();
        Some(
            QUANTILES
                .iter()
                .map(|q| {
                    let rank = (q * count as f64).max(1.0);
                    let i = cum
                        .iter()
                        .position(|c| *c as f64 >= rank)
                        .unwrap_or(cum.len() - 1);
                    let lo = if i == 0 { 0.0 } else { BUCKETS[i - 1] };
                    let hi = if i < BUCKETS.len() { BUCKETS[i] } else { lo };
                    let below = if i == 0 { 0 } else { cum[i - 1] };
                    let in_bucket = (cum[i] - below).max(1) as f64;
                    lo + (hi - lo) * ((rank - below as f64) / in_bucket).clamp(0.0, 1.0)
                })
                .collect(),
        )
    }
}

#[derive(Clone, Debug)]
pub enum Metric {
    Counter(Counter),
    Gauge(Gauge),
    Histogram(Histogram),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl Metric {
    pub fn kind(&self) -> MetricKind {
        match self {
            Metric::Counter(_) => MetricKind::Counter,
            Metric::Gauge(_) => MetricKind::Gauge,
            Metric::Histogram(_) => MetricKind::Histogram,
        }
    }
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

#[derive(Debug)]
struct Entry {
    metric: Metric,
    prom_name: String,
    tags: Vec<(Cow<'static, str>, String)>,
}

/// The process-wide stat registry, shared by every worker.
#[derive(Debug, Default)]
pub struct StatStore {
    entries: Mutex<BTreeMap<String, Entry>>,
}

impl StatStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn get_or_insert(&self, name: &str, make: impl FnOnce() -> Metric) -> Metric {
        self.get_or_insert_with(name, make, || {
            let (prom_name, tags) = prometheus_name(name);
            (
                prom_name,
                tags.into_iter()
                    .map(|(k, v)| (Cow::Borrowed(k), v))
                    .collect(),
            )
        })
    }

    fn get_or_insert_with(
        &self,
        name: &str,
        make: impl FnOnce() -> Metric,
        naming: impl FnOnce() -> (String, Vec<(Cow<'static, str>, String)>),
    ) -> Metric {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = entries.get(name) {
            return e.metric.clone();
        }
        let metric = make();
        let (prom_name, tags) = naming();
        entries.insert(
            name.to_string(),
            Entry {
                metric: metric.clone(),
                prom_name,
                tags,
            },
        );
        metric
    }

    pub fn counter(&self, name: &str) -> Counter {
        match self.get_or_insert(name, || Metric::Counter(Counter::default())) {
            Metric::Counter(c) => c,
            _ => Counter::default(),
        }
    }

    pub fn gauge(&self, name: &str) -> Gauge {
        match self.get_or_insert(name, || Metric::Gauge(Gauge::default())) {
            Metric::Gauge(g) => g,
            _ => Gauge::default(),
        }
    }

    pub fn histogram(&self, name: &str) -> Histogram {
        match self.get_or_insert(name, || Metric::Histogram(Histogram::default())) {
            Metric::Histogram(h) => h,
            _ => Histogram::default(),
        }
    }

    /// A stat declared with explicit tags (by a Python filter): `base.k1.v1...` in
    /// `/stats`, `envoy_<base>{k1="v1",...}` in Prometheus, as Envoy names stats
    /// created with tags. `Err` names the kind a stat of that name already has.
    pub fn tagged(
        &self,
        kind: MetricKind,
        base: &str,
        tags: &[(String, String)],
    ) -> Result<Metric, MetricKind> {
        let mut name = base.to_string();
        for (k, v) in tags {
            name.push('.');
            name.push_str(k);
            name.push('.');
            name.push_str(v);
        }
        let make = || match kind {
            MetricKind::Counter => Metric::Counter(Counter::default()),
            MetricKind::Gauge => Metric::Gauge(Gauge::default()),
            MetricKind::Histogram => Metric::Histogram(Histogram::default()),
        };
        let metric = self.get_or_insert_with(&name, make, || {
            let labels = tags
                .iter()
                .map(|(k, v)| (Cow::Owned(sanitize(k)), v.clone()))
                .collect();
            (format!("envoy_{}", sanitize(base)), labels)
        });
        if metric.kind() == kind {
            Ok(metric)
        } else {
            Err(metric.kind())
        }
    }

    /// Counters and gauges by name (histograms excluded).
    pub fn values(&self) -> BTreeMap<String, i64> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .iter()
            .filter_map(|(name, e)| match &e.metric {
                Metric::Counter(c) => Some((name.clone(), c.get() as i64)),
                Metric::Gauge(g) => Some((name.clone(), g.get())),
                Metric::Histogram(_) => None,
            })
            .collect()
    }

    /// `/stats` text: `name: value` sorted, then histograms.
    pub fn render_text(&self, filter: Option<&Regex>, used_only: bool) -> String {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        let keep = |name: &str| filter.is_none_or(|f| f.is_match(name));
        for (name, e) in entries.iter().filter(|(n, _)| keep(n)) {
            match &e.metric {
                Metric::Counter(c) if !used_only || c.get() > 0 => {
                    let _ = writeln!(out, "{name}: {}", c.get());
                }
                Metric::Gauge(g) if !used_only || g.get() != 0 => {
                    let _ = writeln!(out, "{name}: {}", g.get());
                }
                _ => {}
            }
        }
        for (name, e) in entries.iter().filter(|(n, _)| keep(n)) {
            if let Metric::Histogram(h) = &e.metric {
                match h.quantiles() {
                    None if !used_only => {
                        let _ = writeln!(out, "{name}: No recorded values");
                    }
                    None => {}
                    Some(q) => {
                        let parts: Vec<String> = QUANTILES
                            .iter()
                            .zip(q)
                            .map(|(p, v)| format!("P{}({v},{v})", p * 100.0))
                            .collect();
                        let _ = writeln!(out, "{name}: {}", parts.join(" "));
                    }
                }
            }
        }
        out
    }

    /// `/stats?format=json`.
    pub fn render_json(&self, filter: Option<&Regex>, used_only: bool) -> Value {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let keep = |name: &str| filter.is_none_or(|f| f.is_match(name));
        let mut stats = Vec::new();
        let mut computed = Vec::new();
        for (name, e) in entries.iter().filter(|(n, _)| keep(n)) {
            match &e.metric {
                Metric::Counter(c) if !used_only || c.get() > 0 => {
                    stats.push(json!({"name": name, "value": c.get()}))
                }
                Metric::Gauge(g) if !used_only || g.get() != 0 => {
                    stats.push(json!({"name": name, "value": g.get()}))
                }
                Metric::Histogram(h) if !used_only || h.count() > 0 => {
                    let values: Vec<Value> = match h.quantiles() {
                        Some(q) => q
                            .iter()
                            .map(|v| json!({"interval": null, "cumulative": v}))
                            .collect(),
                        None => QUANTILES
                            .iter()
                            .map(|_| json!({"interval": null, "cumulative": null}))
                            .collect(),
                    };
                    computed.push(json!({"name": name, "values": values}));
                }
                _ => {}
            }
        }
        let supported: Vec<f64> = QUANTILES.iter().map(|q| q * 100.0).collect();
        stats.push(json!({"histograms": {
            "supported_quantiles": supported,
            "computed_quantiles": computed,
        }}));
        json!({ "stats": stats })
    }

    /// `/stats/prometheus` with Envoy's tag extraction and `envoy_` prefix.
    pub fn render_prometheus(&self) -> String {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        // Group series by metric family, each family printed once with its TYPE.
        let mut families: BTreeMap<&str, (&'static str, Vec<&Entry>)> = BTreeMap::new();
        for e in entries.values() {
            let kind = match e.metric {
                Metric::Counter(_) => "counter",
                Metric::Gauge(_) => "gauge",
                Metric::Histogram(_) => "histogram",
            };
            families
                .entry(e.prom_name.as_str())
                .or_insert((kind, Vec::new()))
                .1
                .push(e);
        }
        let mut out = String::new();
        for (family, (kind, series)) in families {
            let _ = writeln!(out, "# TYPE {family} {kind}");
            for e in series {
                let labels = render_labels(&e.tags, None);
                match &e.metric {
                    Metric::Counter(c) => {
                        let _ = writeln!(out, "{family}{labels} {}", c.get());
                    }
                    Metric::Gauge(g) => {
                        let _ = writeln!(out, "{family}{labels} {}", g.get());
                    }
                    Metric::Histogram(h) => {
                        let cum = h.cumulative();
                        for (i, bound) in BUCKETS.iter().enumerate() {
                            let l = render_labels(&e.tags, Some(&bound.to_string()));
                            let _ = writeln!(out, "{family}_bucket{l} {}", cum[i]);
                        }
                        let l = render_labels(&e.tags, Some("+Inf"));
                        let _ = writeln!(out, "{family}_bucket{l} {}", h.count());
                        let _ = writeln!(
                            out,
                            "{family}_sum{labels} {}",
                            h.0.sum.load(Ordering::Relaxed)
                        );
                        let _ = writeln!(out, "{family}_count{labels} {}", h.count());
                    }
                }
            }
        }
        out
    }
}

fn render_labels(tags: &[(Cow<'static, str>, String)], le: Option<&str>) -> String {
    if tags.is_empty() && le.is_none() {
        return String::new();
    }
    let mut parts: Vec<String> = tags
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    format!("{{{}}}", parts.join(","))
}

/// Envoy's default tag extractors that apply to the stats envoyx has: each removes
/// its first capture group from the name and records the second as the tag value.
static TAG_EXTRACTORS: LazyLock<Vec<(&'static str, Regex)>> = LazyLock::new(|| {
    [
        ("envoy_response_code", r"_rq(_(\d{3}))$"),
        ("envoy_response_code_class", r"_rq(_(\d))xx$"),
        ("envoy_http_conn_manager_prefix", r"^http\.((.*?)\.)"),
        ("envoy_cluster_name", r"^cluster\.((.*?)\.)"),
        (
            "envoy_listener_address",
            r"^listener\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)",
        ),
        ("envoy_tcp_prefix", r"^tcp\.((.*?)\.)"),
    ]
    .into_iter()
    .map(|(n, r)| (n, Regex::new(r).expect("static regex")))
    .collect()
});

/// The Prometheus family name and tags Envoy derives from a stat name.
pub fn prometheus_name(name: &str) -> (String, Vec<(&'static str, String)>) {
    let mut rest = name.to_string();
    let mut tags = Vec::new();
    for (tag, re) in TAG_EXTRACTORS.iter() {
        let Some(caps) = re.captures(&rest) else {
            continue;
        };
        let (Some(remove), Some(value)) = (caps.get(1), caps.get(2)) else {
            continue;
        };
        if value.as_str().is_empty() {
            continue;
        }
        tags.push((*tag, value.as_str().to_string()));
        let range = remove.range();
        let value_range = value.range();
        // The response-code-class extractor keeps the `xx` suffix: only the digit goes.
        let cut = if *tag == "envoy_response_code_class" {
            value_range
        } else {
            range
        };
        rest.replace_range(cut, "");
    }
    (format!("envoy_{}", sanitize(&rest)), tags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_tag_extraction() {
        assert_eq!(
            prometheus_name("cluster.backend.upstream_rq_total"),
            (
                "envoy_cluster_upstream_rq_total".into(),
                vec![("envoy_cluster_name", "backend".into())]
            )
        );
        assert_eq!(
            prometheus_name("cluster.backend.upstream_rq_200"),
            (
                "envoy_cluster_upstream_rq".into(),
                vec![
                    ("envoy_response_code", "200".into()),
                    ("envoy_cluster_name", "backend".into())
                ]
            )
        );
        assert_eq!(
            prometheus_name("http.ingress.downstream_rq_2xx"),
            (
                "envoy_http_downstream_rq_xx".into(),
                vec![
                    ("envoy_response_code_class", "2".into()),
                    ("envoy_http_conn_manager_prefix", "ingress".into())
                ]
            )
        );
        assert_eq!(
            prometheus_name("listener.127.0.0.1_10000.downstream_cx_total"),
            (
                "envoy_listener_downstream_cx_total".into(),
                vec![("envoy_listener_address", "127.0.0.1_10000".into())]
            )
        );
        assert_eq!(
            prometheus_name("server.live"),
            ("envoy_server_live".into(), vec![])
        );
    }

    #[test]
    fn prometheus_renders_type_once_per_family() {
        let store = StatStore::new();
        store.counter("cluster.a.upstream_rq_total").add(3);
        store.counter("cluster.b.upstream_rq_total").inc();
        let text = store.render_prometheus();
        assert_eq!(
            text.matches("# TYPE envoy_cluster_upstream_rq_total counter")
                .count(),
            1
        );
        assert!(text.contains("envoy_cluster_upstream_rq_total{envoy_cluster_name=\"a\"} 3"));
        assert!(text.contains("envoy_cluster_upstream_rq_total{envoy_cluster_name=\"b\"} 1"));
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let store = StatStore::new();
        let h = store.histogram("cluster.a.upstream_rq_time");
        h.record(3);
        h.record(700);
        let text = store.render_prometheus();
        assert!(
            text.contains(
                "envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name=\"a\",le=\"5\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains(
            "envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name=\"a\",le=\"1000\"} 2"
        ));
        assert!(text.contains("envoy_cluster_upstream_rq_time_count{envoy_cluster_name=\"a\"} 2"));
    }
}
