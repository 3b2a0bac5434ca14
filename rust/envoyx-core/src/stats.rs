//! Stats with Envoy's names and meanings, and Envoy's three admin renderings.
//!
//! Handles are created (and their Prometheus name and tags computed) when
//! configuration is applied; the request path only touches relaxed atomics, and
//! on a worker thread only cells of that worker's own shard, written with a plain
//! load and store (no locked read-modify-write, no line shared with another
//! worker). Reads (`get`, admin, Python) sum the shards.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use regex::Regex;
use serde_json::{Value, json};

use crate::per_worker;

/// Cells in one [`Line`]: 16 × 8 bytes = 128 bytes, the unit x86's adjacent-line
/// prefetcher moves (and the cache line of Apple's cores), so shards one line apart
/// never share what the hardware moves between cores.
const LINE_CELLS: usize = 16;
/// Cells per shard in one slab of a [`StatStore`]: 256 (2 KiB per shard row).
const SLAB_CELLS: usize = 16 * LINE_CELLS;

#[repr(align(128))]
struct Line([AtomicU64; LINE_CELLS]);

/// The cells of many stats, one row per shard (see [`per_worker::shard`]): row 0 for
/// threads that are not workers, row `i + 1` for worker `i`. A stat is one index
/// (a histogram a run of indexes) valid in every row, so the cells one worker
/// writes for all stats of a slab are packed together in its own row, and no
/// two rows share a line. Reading a stat sums its cell over the rows.
///
/// Memory per stat cell is 8 bytes × shards, amortised over the slab: no padding
/// per stat, unlike one cache-padded atomic per shard per stat.
struct Slab {
    shards: usize,
    lines_per_shard: usize,
    lines: Box<[Line]>,
}

impl Slab {
    fn new(shards: usize, cells: usize) -> Arc<Self> {
        let shards = shards.max(1);
        let lines_per_shard = cells.div_ceil(LINE_CELLS).max(1);
        let lines = (0..shards * lines_per_shard)
            .map(|_| Line(std::array::from_fn(|_| AtomicU64::new(0))))
            .collect();
        Arc::new(Slab {
            shards,
            lines_per_shard,
            lines,
        })
    }

    #[inline]
    fn cell(&self, shard: usize, idx: usize) -> &AtomicU64 {
        &self.lines[shard * self.lines_per_shard + idx / LINE_CELLS].0[idx % LINE_CELLS]
    }

    /// Adds `n` (wrapping) to cell `idx` of the calling thread's shard.
    #[inline]
    fn add(&self, shard: usize, idx: usize, n: u64) {
        if shard != 0 && shard < self.shards {
            // Only worker `shard - 1` writes this row: a plain read and write is
            // exact and takes no locked read-modify-write. (Worker indexes are per
            // process; this holds because each Server has its own store and its
            // workers are its only threads entered with those indexes that reach
            // its stats. Were it broken, counts could be lost, never memory.)
            let c = self.cell(shard, idx);
            c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
        } else {
            // Row 0 is shared by every thread that is not a worker, and by a
            // worker whose index this slab has no row for.
            self.cell(0, idx).fetch_add(n, Ordering::Relaxed);
        }
    }

    fn sum(&self, idx: usize, shards: std::ops::Range<usize>) -> u64 {
        shards.fold(0, |acc, s| {
            acc.wrapping_add(self.cell(s, idx).load(Ordering::Relaxed))
        })
    }
}

impl std::fmt::Debug for Slab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slab")
            .field("shards", &self.shards)
            .field("cells", &(self.lines_per_shard * LINE_CELLS))
            .finish()
    }
}

/// Hands out slab cells to the stats of one store; full slabs stay alive as long
/// as a stat in them does.
#[derive(Debug)]
struct Arena {
    shards: usize,
    slab: Option<Arc<Slab>>,
    next: usize,
}

impl Arena {
    fn alloc(&mut self, cells: usize) -> (Arc<Slab>, usize) {
        match &self.slab {
            Some(slab) if self.next + cells <= SLAB_CELLS => {
                let idx = self.next;
                self.next += cells;
                (slab.clone(), idx)
            }
            _ => {
                let slab = Slab::new(self.shards, SLAB_CELLS.max(cells));
                self.slab = Some(slab.clone());
                self.next = cells;
                (slab, 0)
            }
        }
    }
}

/// A monotonic counter: per-worker shards, summed when read. `default()` is a
/// detached counter with a single shared cell.
#[derive(Clone)]
pub struct Counter {
    slab: Arc<Slab>,
    idx: usize,
}

impl Default for Counter {
    fn default() -> Self {
        Counter {
            slab: Slab::new(1, 1),
            idx: 0,
        }
    }
}

impl Counter {
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }
    #[inline]
    pub fn add(&self, n: u64) {
        self.slab.add(per_worker::shard(), self.idx, n);
    }
    pub fn get(&self) -> u64 {
        self.slab.sum(self.idx, 0..self.slab.shards)
    }
}

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Counter").field(&self.get()).finish()
    }
}

/// A gauge: per-worker shards holding signed deltas (two's complement in the
/// cells), summed when read, so an `inc` on one worker and a `dec` on another
/// net to zero. `set(v)` writes `v` minus the worker shards' sum into the shared
/// shard 0 (a store, never touching a worker's row): the sum is then `v`, and a
/// concurrent `inc`/`dec` orders either before or after the `set`, as with one
/// atomic. `set` reads every shard, so it belongs on control paths, not per request.
#[derive(Clone)]
pub struct Gauge {
    slab: Arc<Slab>,
    idx: usize,
}

impl Default for Gauge {
    fn default() -> Self {
        Gauge {
            slab: Slab::new(1, 1),
            idx: 0,
        }
    }
}

impl Gauge {
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }
    #[inline]
    pub fn dec(&self) {
        self.add(-1);
    }
    /// Adds `n` (negative to subtract) without the race of `set(get() + n)`.
    #[inline]
    pub fn add(&self, n: i64) {
        self.slab.add(per_worker::shard(), self.idx, n as u64);
    }
    pub fn set(&self, v: i64) {
        let workers = self.slab.sum(self.idx, 1..self.slab.shards);
        self.slab
            .cell(0, self.idx)
            .store((v as u64).wrapping_sub(workers), Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.slab.sum(self.idx, 0..self.slab.shards) as i64
    }
}

impl std::fmt::Debug for Gauge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Gauge").field(&self.get()).finish()
    }
}

/// Envoy's default histogram bucket bounds, in milliseconds.
pub const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
const QUANTILES: [f64; 10] = [0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0];

/// Cells of one histogram: a count per bucket (not cumulative; the last is +Inf),
/// then the sum of samples. The total count is the buckets' sum.
const HISTOGRAM_CELLS: usize = BUCKETS.len() + 2;
const SUM_CELL: usize = BUCKETS.len() + 1;

/// A latency histogram with Envoy's buckets: per-worker shards, merged when read.
#[derive(Clone)]
pub struct Histogram {
    slab: Arc<Slab>,
    idx: usize,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            slab: Slab::new(1, HISTOGRAM_CELLS),
            idx: 0,
        }
    }
}

/// One read of a histogram's shards: bucket counts (not cumulative) and the sum.
struct HistogramSnapshot {
    buckets: [u64; BUCKETS.len() + 1],
    sum: u64,
}

impl HistogramSnapshot {
    fn cumulative(&self) -> Vec<u64> {
        let mut acc = 0;
        self.buckets
            .iter()
            .map(|b| {
                acc += b;
                acc
            })
            .collect()
    }

    /// Quantile estimates by linear interpolation inside a bucket.
    fn quantiles(&self) -> Option<Vec<f64>> {
        let cum = self.cumulative();
        let count = *cum.last()?;
        if count == 0 {
            return None;
        }
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

impl Histogram {
    /// Records one sample in milliseconds.
    pub fn record(&self, ms: u64) {
        let v = ms as f64;
        let i = BUCKETS
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(BUCKETS.len());
        let shard = per_worker::shard();
        self.slab.add(shard, self.idx + i, 1);
        self.slab.add(shard, self.idx + SUM_CELL, ms);
    }

    pub fn count(&self) -> u64 {
        (0..=BUCKETS.len()).fold(0, |acc, i| {
            acc.wrapping_add(self.slab.sum(self.idx + i, 0..self.slab.shards))
        })
    }

    fn snapshot(&self) -> HistogramSnapshot {
        let all = 0..self.slab.shards;
        HistogramSnapshot {
            buckets: std::array::from_fn(|i| self.slab.sum(self.idx + i, all.clone())),
            sum: self.slab.sum(self.idx + SUM_CELL, all),
        }
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count())
            .finish()
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
#[derive(Debug)]
pub struct StatStore {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    entries: BTreeMap<String, Entry>,
    arena: Arena,
}

impl Default for StatStore {
    fn default() -> Self {
        StatStore {
            inner: Mutex::new(Inner {
                entries: BTreeMap::new(),
                arena: Arena {
                    shards: 2,
                    slab: None,
                    next: 0,
                },
            }),
        }
    }
}

impl StatStore {
    /// A store for one worker (tests, `--mode validate`).
    pub fn new() -> Arc<Self> {
        Self::with_workers(1)
    }

    /// A store whose stats have a shard for each of `workers` workers and one
    /// shared by every other thread. A worker with an index `>= workers` still
    /// counts exactly, in the shared shard.
    /// Rows per stat: the workers + 1 (see [`per_worker::shard`]).
    pub fn shards(&self) -> usize {
        lock(&self.inner).arena.shards
    }

    pub fn with_workers(workers: usize) -> Arc<Self> {
        let store = Self::default();
        lock(&store.inner).arena.shards = workers + 1;
        Arc::new(store)
    }

    fn get_or_insert(&self, name: &str, kind: MetricKind) -> Metric {
        self.get_or_insert_with(name, kind, || {
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
        kind: MetricKind,
        naming: impl FnOnce() -> (String, Vec<(Cow<'static, str>, String)>),
    ) -> Metric {
        let mut inner = lock(&self.inner);
        if let Some(e) = inner.entries.get(name) {
            return e.metric.clone();
        }
        let metric = match kind {
            MetricKind::Counter => {
                let (slab, idx) = inner.arena.alloc(1);
                Metric::Counter(Counter { slab, idx })
            }
            MetricKind::Gauge => {
                let (slab, idx) = inner.arena.alloc(1);
                Metric::Gauge(Gauge { slab, idx })
            }
            MetricKind::Histogram => {
                let (slab, idx) = inner.arena.alloc(HISTOGRAM_CELLS);
                Metric::Histogram(Histogram { slab, idx })
            }
        };
        let (prom_name, tags) = naming();
        inner.entries.insert(
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
        match self.get_or_insert(name, MetricKind::Counter) {
            Metric::Counter(c) => c,
            _ => Counter::default(),
        }
    }

    pub fn gauge(&self, name: &str) -> Gauge {
        match self.get_or_insert(name, MetricKind::Gauge) {
            Metric::Gauge(g) => g,
            _ => Gauge::default(),
        }
    }

    pub fn histogram(&self, name: &str) -> Histogram {
        match self.get_or_insert(name, MetricKind::Histogram) {
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
        let metric = self.get_or_insert_with(&name, kind, || {
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
        let inner = lock(&self.inner);
        let entries = &inner.entries;
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
        let inner = lock(&self.inner);
        let entries = &inner.entries;
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
                match h.snapshot().quantiles() {
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
        let inner = lock(&self.inner);
        let entries = &inner.entries;
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
                    let values: Vec<Value> = match h.snapshot().quantiles() {
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
        let inner = lock(&self.inner);
        let entries = &inner.entries;
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
                        let snapshot = h.snapshot();
                        let cum = snapshot.cumulative();
                        for (i, bound) in BUCKETS.iter().enumerate() {
                            let l = render_labels(&e.tags, Some(&bound.to_string()));
                            let _ = writeln!(out, "{family}_bucket{l} {}", cum[i]);
                        }
                        let count = cum[BUCKETS.len()];
                        let l = render_labels(&e.tags, Some("+Inf"));
                        let _ = writeln!(out, "{family}_bucket{l} {count}");
                        let _ = writeln!(out, "{family}_sum{labels} {}", snapshot.sum);
                        let _ = writeln!(out, "{family}_count{labels} {count}");
                    }
                }
            }
        }
        out
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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

    /// Runs `f(i)` on `threads` threads entered as workers `first..first + threads`.
    fn on_workers(first: usize, threads: usize, f: impl Fn(usize) + Sync) {
        std::thread::scope(|s| {
            for i in first..first + threads {
                let f = &f;
                s.spawn(move || {
                    crate::per_worker::enter(i);
                    f(i);
                });
            }
        });
    }

    #[test]
    fn counts_from_several_workers_sum_exactly() {
        let store = StatStore::with_workers(4);
        let c = store.counter("cluster.a.upstream_rq_total");
        std::thread::scope(|s| {
            // Workers write their own shards while two non-worker threads share shard 0.
            s.spawn(|| on_workers(0, 4, |i| (0..100_000).for_each(|_| c.add(i as u64 + 1))));
            for _ in 0..2 {
                s.spawn(|| (0..100_000).for_each(|_| c.inc()));
            }
        });
        assert_eq!(c.get(), 100_000 * (1 + 2 + 3 + 4) + 200_000);
        // Another handle to the same stat, and every reader, sees the sum.
        assert_eq!(store.counter("cluster.a.upstream_rq_total").get(), c.get());
        assert_eq!(
            store.values()["cluster.a.upstream_rq_total"],
            c.get() as i64
        );
        assert!(
            store
                .render_text(None, false)
                .contains(&format!("cluster.a.upstream_rq_total: {}", c.get()))
        );
    }

    #[test]
    fn gauge_inc_on_one_worker_dec_on_another_nets_zero() {
        let store = StatStore::with_workers(2);
        let g = store.gauge("cluster.a.upstream_rq_active");
        on_workers(0, 2, |i| {
            for _ in 0..10_000 {
                if i == 0 { g.inc() } else { g.dec() }
            }
        });
        assert_eq!(g.get(), 0);
        on_workers(1, 1, |_| g.dec());
        assert_eq!(g.get(), -1);
        assert_eq!(store.values()["cluster.a.upstream_rq_active"], -1);
        // `set` makes the sum what was set, whatever the workers' shards hold;
        // later deltas apply on top of it.
        g.set(7);
        assert_eq!(g.get(), 7);
        on_workers(0, 2, |i| if i == 0 { g.inc() } else { g.add(-3) });
        assert_eq!(g.get(), 5);
        on_workers(1, 1, |_| g.set(-2));
        assert_eq!(g.get(), -2);
    }

    #[test]
    fn histogram_shards_merge() {
        let store = StatStore::with_workers(3);
        let h = store.histogram("cluster.a.upstream_rq_time");
        // Worker i records 1000 samples of 3 ms and i samples of 700 ms.
        on_workers(0, 3, |i| {
            (0..1000).for_each(|_| h.record(3));
            (0..i).for_each(|_| h.record(700));
        });
        h.record(0);
        assert_eq!(h.count(), 3000 + 3 + 1);
        let snap = h.snapshot();
        assert_eq!(snap.sum, 3000 * 3 + 3 * 700);
        let cum = snap.cumulative();
        assert_eq!(cum[0], 1); // le 0.5
        assert_eq!(cum[2], 3001); // le 5
        assert_eq!(cum[9], 3004); // le 1000
        assert_eq!(cum[BUCKETS.len()], 3004); // +Inf
        let text = store.render_prometheus();
        assert!(text.contains(
            "envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name=\"a\",le=\"5\"} 3001"
        ));
        assert!(
            text.contains("envoy_cluster_upstream_rq_time_count{envoy_cluster_name=\"a\"} 3004")
        );
        assert!(
            text.contains("envoy_cluster_upstream_rq_time_sum{envoy_cluster_name=\"a\"} 11100")
        );
    }

    #[test]
    fn worker_beyond_the_store_shards_counts_in_the_shared_shard() {
        // A one-worker store used from threads claiming workers 5 and 6, next to a
        // non-worker thread: all of them fall back to shard 0 with fetch_add.
        let store = StatStore::new();
        let c = store.counter("a");
        let g = store.gauge("b");
        let h = store.histogram("c");
        std::thread::scope(|s| {
            s.spawn(|| {
                on_workers(5, 2, |_| {
                    for _ in 0..50_000 {
                        c.inc();
                        g.inc();
                        h.record(1);
                    }
                })
            });
            s.spawn(|| {
                for _ in 0..50_000 {
                    c.inc();
                    g.dec();
                    h.record(1);
                }
            });
        });
        assert_eq!(c.get(), 150_000);
        assert_eq!(g.get(), 50_000);
        assert_eq!(h.count(), 150_000);
    }

    #[test]
    fn detached_stats_count_from_any_thread() {
        let c = Counter::default();
        let g = Gauge::default();
        let h = Histogram::default();
        on_workers(0, 3, |_| {
            for _ in 0..10_000 {
                c.inc();
                g.dec();
                h.record(10);
            }
        });
        g.set(4);
        assert_eq!((c.get(), g.get(), h.count()), (30_000, 4, 30_000));
    }

    #[test]
    fn stats_across_slabs_do_not_share_cells() {
        let store = StatStore::with_workers(2);
        // More cells than one slab holds, histograms straddling slab ends included.
        let counters: Vec<Counter> = (0..SLAB_CELLS + 7)
            .map(|i| store.counter(&format!("c{i}")))
            .collect();
        let histograms: Vec<Histogram> =
            (0..30).map(|i| store.histogram(&format!("h{i}"))).collect();
        on_workers(0, 2, |w| {
            for (i, c) in counters.iter().enumerate() {
                c.add(i as u64 + w as u64);
            }
            for (i, h) in histograms.iter().enumerate() {
                (0..=i).for_each(|_| h.record(w as u64));
            }
        });
        for (i, c) in counters.iter().enumerate() {
            assert_eq!(c.get(), 2 * i as u64 + 1, "c{i}");
        }
        for (i, h) in histograms.iter().enumerate() {
            assert_eq!(h.count(), 2 * (i as u64 + 1), "h{i}");
            assert_eq!(h.snapshot().sum, i as u64 + 1, "h{i}");
        }
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

#[cfg(test)]
mod memory {
    use super::*;

    fn rss() -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    /// Bytes of resident memory per stat; run alone, as RSS is process-wide.
    /// Nothing is freed before the last figure, so no figure reuses freed memory.
    #[test]
    #[ignore = "measurement: cargo test --release -p envoyx-core --lib stats::memory -- --ignored --nocapture --test-threads=1"]
    fn bytes_per_counter() {
        const N: usize = 200_000;
        let names: Vec<String> = (0..N)
            .map(|i| format!("cluster.c{i}.upstream_rq_total"))
            .collect();
        let mut stores = Vec::new();
        for workers in [1, 2, 16] {
            let store = StatStore::with_workers(workers);
            let before = rss();
            for n in &names {
                store.counter(n).inc();
            }
            println!(
                "registered counter, {workers} workers: {} bytes (store entry and name included)",
                (rss() - before) / N
            );
            stores.push(store);
        }
        let before = rss();
        let detached: Vec<Counter> = (0..N).map(|_| Counter::default()).collect();
        println!(
            "detached counter: {} bytes (handle included)",
            (rss() - before) / N
        );
        drop(detached);
    }
}
