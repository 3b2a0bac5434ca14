//! gRPC access loggers (`envoy.access_loggers.http_grpc` / `tcp_grpc`): Envoy's
//! `GrpcAccessLogger` streaming `envoy.service.accesslog.v3.AccessLogService/
//! StreamAccessLogs` to a cluster.
//!
//! A worker builds the entry (a prost struct, not yet encoded) when its request
//! ends and hands it over a bounded channel; it never waits. One task per logger,
//! on the process's access-log thread, batches entries and flushes them — when the
//! batch reaches `buffer_size_bytes`, and every `buffer_flush_interval` — as one
//! message on its one HTTP/2 stream; the stream's first message carries the
//! identifier (node and `log_name`), as Envoy sends it. Envoy's stats,
//! `access_logs.grpc_access_log.*`:
//! - `logs_written`: HTTP entries taken into a batch (Envoy counts no TCP entry);
//! - `logs_dropped`: entries lost because the channel or the batch was full
//!   (a receiver that is down, or slower than the traffic);
//! - `grpc_entries_flushed`: entries of batches written to the stream;
//! - `grpc_entries_flush_failed`: entries of batches that could not be written
//!   (no stream could be opened, or the stream is above its buffer); the batch is
//!   kept and sent with the next flush, as Envoy's documentation says.
//!
//! Where envoyx differs: Envoy sends a batch to a stream that is still connecting
//! and loses it when the connection fails (counted flushed); envoyx opens the
//! stream first, so a receiver that is down keeps up to `buffer_size_bytes` of
//! entries until it is back, and counts what does not fit as dropped. After a
//! failed attempt the next one waits for the next flush interval.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderValue, Method, Request, header};
use http_body::Frame;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use tokio::sync::mpsc;

use super::LogRecord;
use super::als_proto as pb;
use crate::config::{GrpcAccessLogConfig, GrpcLogKind};
use crate::stats::{Counter, StatStore};
use crate::upstream::{ClusterManager, HostHealth};

const METHOD_PATH: &str = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs";
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";
/// Entries waiting for the logger's task; past this a worker drops (and counts)
/// its entry rather than wait.
const CHANNEL_ENTRIES: usize = 1024;
/// Messages written to the stream but not yet taken by HTTP/2 (flow control):
/// past this the stream is "above its high watermark" and a flush fails.
const STREAM_MESSAGES: usize = 16;

/// `access_logs.grpc_access_log.*` (`open_telemetry_access_log` for OTLP), shared
/// by every logger of a kind as in Envoy.
#[derive(Debug, Clone)]
struct GrpcLogStats {
    logs_written: Counter,
    logs_dropped: Counter,
    flushed: Counter,
    flush_failed: Counter,
}

impl GrpcLogStats {
    fn new(store: &StatStore, kind: GrpcLogKind) -> Self {
        let prefix = match kind {
            GrpcLogKind::OpenTelemetry => "open_telemetry_access_log",
            GrpcLogKind::Http | GrpcLogKind::Tcp => "grpc_access_log",
        };
        let c = |s: &str| store.counter(&format!("access_logs.{prefix}.{s}"));
        GrpcLogStats {
            logs_written: c("logs_written"),
            logs_dropped: c("logs_dropped"),
            flushed: c("grpc_entries_flushed"),
            flush_failed: c("grpc_entries_flush_failed"),
        }
    }
}

/// What a gRPC logger needs of its server: the cluster it streams to and the stats.
#[derive(Clone, Copy)]
pub struct GrpcLogContext<'a> {
    pub clusters: &'a Arc<ClusterManager>,
    pub store: &'a StatStore,
}

/// One entry, built on the worker, encoded by the logger's task.
#[derive(Debug)]
enum Entry {
    Http(Box<pb::HttpAccessLogEntry>),
    Tcp(Box<pb::TcpAccessLogEntry>),
    Otel(Box<pb::OtelLogRecord>),
}

/// The OpenTelemetry logger's formats, compiled when it is opened.
#[derive(Debug)]
struct OtelFormats {
    body: Option<super::Format>,
    attributes: Vec<(String, super::Format)>,
}

/// The worker's side of one gRPC access logger.
pub(super) struct GrpcLogger {
    config: Arc<GrpcAccessLogConfig>,
    tx: mpsc::Sender<Entry>,
    stats: GrpcLogStats,
    otel: Option<OtelFormats>,
}

impl std::fmt::Debug for GrpcLogger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcLogger")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl GrpcLogger {
    pub(super) fn open(
        config: Arc<GrpcAccessLogConfig>,
        cx: GrpcLogContext<'_>,
    ) -> std::io::Result<Self> {
        let parse = |f: &str| super::Format::parse(f).map_err(std::io::Error::other);
        let otel = match &config.otel {
            Some(o) => Some(OtelFormats {
                body: o.body.as_deref().map(parse).transpose()?,
                attributes: o
                    .attributes
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), parse(v)?)))
                    .collect::<std::io::Result<_>>()?,
            }),
            None => None,
        };
        let (tx, rx) = mpsc::channel(CHANNEL_ENTRIES);
        let stats = GrpcLogStats::new(cx.store, config.kind);
        let task = LoggerTask {
            config: config.clone(),
            clusters: cx.clusters.clone(),
            stats: stats.clone(),
            batch: Vec::new(),
            batch_bytes: 0,
            conn: None,
            stream: None,
            retry_at: None,
        };
        runtime()?.spawn(task.run(rx));
        Ok(GrpcLogger {
            config,
            tx,
            stats,
            otel,
        })
    }

    /// Hands the request's entry to the logger's task; never waits.
    pub(super) fn log(&self, record: &LogRecord) {
        let entry = match self.config.kind {
            GrpcLogKind::Http => Entry::Http(Box::new(http_entry(&self.config, record))),
            GrpcLogKind::Tcp => Entry::Tcp(Box::new(tcp_entry(record))),
            GrpcLogKind::OpenTelemetry => match &self.otel {
                Some(f) => Entry::Otel(Box::new(otel_entry(f, record))),
                None => return,
            },
        };
        if self.tx.try_send(entry).is_err() {
            self.stats.logs_dropped.inc();
        }
    }
}

/// The thread every gRPC logger's task runs on (started with the first logger).
fn runtime() -> std::io::Result<tokio::runtime::Handle> {
    static HANDLE: OnceLock<tokio::runtime::Handle> = OnceLock::new();
    static START: Mutex<()> = Mutex::new(());
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let _once = START.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("envoyx-grpc-alog".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))?;
    let _ = HANDLE.set(handle.clone());
    Ok(handle)
}

// ---------------------------------------------------------------------------------
// The node of the identifier
// ---------------------------------------------------------------------------------

static LOCAL_NODE: Mutex<Option<Arc<pb::Node>>> = Mutex::new(None);

/// The bootstrap's `node`, sent in each stream's identifier. Process-wide, as
/// Envoy's local info: the last server built sets it.
pub fn set_local_node(node: &serde_json::Value) {
    let s = |k: &str| node.get(k).and_then(|v| v.as_str()).unwrap_or_default();
    let locality = node.get("locality").map(|l| pb::Locality {
        region: l
            .get("region")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .into(),
        zone: l
            .get("zone")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .into(),
        sub_zone: l
            .get("sub_zone")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .into(),
    });
    let version: Vec<u32> = env!("CARGO_PKG_VERSION")
        .split('.')
        .map(|p| p.parse().unwrap_or(0))
        .collect();
    let built = pb::Node {
        id: s("id").into(),
        cluster: s("cluster").into(),
        metadata: node.get("metadata").map(pb::Struct::from_json),
        locality,
        user_agent_name: "envoyx".into(),
        user_agent_build_version: Some(pb::BuildVersion {
            version: Some(pb::SemanticVersion {
                major_number: version.first().copied().unwrap_or(0),
                minor_number: version.get(1).copied().unwrap_or(0),
                patch: version.get(2).copied().unwrap_or(0),
            }),
        }),
    };
    *LOCAL_NODE.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(built));
}

fn local_node() -> Option<pb::Node> {
    LOCAL_NODE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_deref()
        .cloned()
}

// ---------------------------------------------------------------------------------
// Entries (Envoy's grpc_access_log_utils.cc / http_grpc_access_log_impl.cc)
// ---------------------------------------------------------------------------------

fn common(record: &LogRecord, log_type: i32) -> pb::AccessLogCommon {
    let since_epoch = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).ok();
    let host = record.upstream_host;
    pb::AccessLogCommon {
        downstream_remote_address: record.downstream_remote.map(pb::Address::of),
        downstream_direct_remote_address: record.downstream_remote.map(pb::Address::of),
        downstream_local_address: record.downstream_local.map(pb::Address::of),
        tls_properties: record.downstream_tls.as_deref().map(tls_properties),
        start_time: record.start.and_then(since_epoch).map(pb::Timestamp::of),
        duration: Some(pb::Timestamp::of(record.duration)),
        time_to_first_upstream_rx_byte: record.response_duration.map(pb::Timestamp::of),
        upstream_remote_address: host.map(pb::Address::of),
        // Envoy names the cluster of the upstream host, so only with a host.
        upstream_cluster: host
            .and(record.upstream_cluster.as_deref().map(str::to_string))
            .unwrap_or_default(),
        upstream_transport_failure_reason: record.upstream_failure.clone().unwrap_or_default(),
        route_name: record.route_name.clone(),
        response_flags: pb::ResponseFlags::parse(record.response_flags),
        upstream_request_attempt_count: 0,
        stream_id: String::new(),
        access_log_type: log_type,
    }
}

/// The downstream TLS session as Envoy 1.40 logs it: version, suite, the SNI a
/// `tls_inspector` found, of each certificate its subject and URI SANs, and the
/// peer's issuer.
fn tls_properties(tls: &crate::tls::PeerTls) -> pb::TlsProperties {
    let cert = |c: Option<&crate::tls::peer::CertInfo>, issuer: bool| {
        c.map(|c| pb::CertificateProperties {
            subject_alt_name: c
                .uri_sans
                .iter()
                .map(|u| pb::SubjectAltName {
                    uri: Some(u.clone()),
                })
                .collect(),
            subject: c.subject.clone(),
            issuer: if issuer {
                c.issuer.clone()
            } else {
                String::new()
            },
        })
    };
    pb::TlsProperties {
        tls_version: match tls.version {
            Some("TLSv1") => 1,
            Some("TLSv1.1") => 2,
            Some("TLSv1.2") => 3,
            Some("TLSv1.3") => 4,
            _ => 0,
        },
        tls_cipher_suite: tls
            .cipher
            .and_then(crate::tls::params::suite_id)
            .map(|id| pb::UInt32Value { value: id.into() }),
        tls_sni_hostname: tls
            .requested_server_name
            .as_deref()
            .unwrap_or_default()
            .to_string(),
        local_certificate_properties: cert(tls.local(), false),
        peer_certificate_properties: cert(tls.peer(), true),
    }
}

fn header_text(record: &LogRecord, name: &str) -> Option<String> {
    let v = record.request_headers.as_ref()?.get(name)?;
    Some(String::from_utf8_lossy(v.as_bytes()).into_owned())
}

fn http_entry(config: &GrpcAccessLogConfig, record: &LogRecord) -> pb::HttpAccessLogEntry {
    let mut common = common(record, pb::DOWNSTREAM_END);
    let request_id = header_text(record, "x-request-id").unwrap_or_default();
    // Envoy's stream id is the request's id when it has one.
    common.stream_id.clone_from(&request_id);
    let scheme = if record.downstream_tls.is_some() {
        "https"
    } else {
        "http"
    };
    let mut request_headers = BTreeMap::new();
    for name in &config.request_headers {
        let value = match name.as_str() {
            ":method" => Some(record.method.clone()),
            ":path" => Some(record.path.clone()),
            ":authority" => Some(record.authority.clone()),
            ":scheme" => Some(scheme.to_string()),
            other => header_text(record, other),
        };
        if let Some(v) = value {
            request_headers.insert(name.clone(), v);
        }
    }
    let mut response_headers = BTreeMap::new();
    if let Some(h) = record.response_headers.as_ref() {
        for name in &config.response_headers {
            if let Some(v) = h.get(name.as_str()) {
                response_headers.insert(
                    name.clone(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                );
            }
        }
    }
    let protocol_version = match record.protocol {
        "HTTP/1.0" => 1,
        "HTTP/1.1" => 2,
        "HTTP/2" => 3,
        "HTTP/3" => 4,
        _ => 0,
    };
    pb::HttpAccessLogEntry {
        common_properties: Some(common),
        protocol_version,
        request: Some(pb::HttpRequestProperties {
            request_method: pb::request_method(&record.method),
            scheme: scheme.to_string(),
            authority: record.authority.clone(),
            path: record.path.clone(),
            user_agent: header_text(record, "user-agent").unwrap_or_default(),
            referer: header_text(record, "referer").unwrap_or_default(),
            forwarded_for: header_text(record, "x-forwarded-for").unwrap_or_default(),
            request_id,
            original_path: header_text(record, "x-envoy-original-path").unwrap_or_default(),
            request_body_bytes: record.bytes_received,
            request_headers,
        }),
        response: Some(pb::HttpResponseProperties {
            response_code: (record.response_code != 0).then_some(pb::UInt32Value {
                value: record.response_code.into(),
            }),
            response_body_bytes: record.bytes_sent,
            response_headers,
            response_code_details: record.response_code_details.to_string(),
        }),
    }
}

fn tcp_entry(record: &LogRecord) -> pb::TcpAccessLogEntry {
    let mut common = common(record, pb::TCP_CONNECTION_END);
    common.stream_id = uuid::Uuid::new_v4().to_string();
    pb::TcpAccessLogEntry {
        common_properties: Some(common),
        connection_properties: Some(pb::ConnectionProperties {
            received_bytes: record.bytes_received,
            sent_bytes: record.bytes_sent,
        }),
    }
}

/// Envoy's OpenTelemetry `LogRecord`: the start time, the formatted body and
/// attributes (an operator without a value prints `-`, as in Envoy's).
fn otel_entry(f: &OtelFormats, record: &LogRecord) -> pb::OtelLogRecord {
    let render = |format: &super::Format| {
        let mut out = String::new();
        format.render(record, &mut out);
        out
    };
    let time_unix_nano = record
        .start
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64);
    pb::OtelLogRecord {
        time_unix_nano,
        body: f.body.as_ref().map(|b| pb::AnyValue {
            string_value: Some(render(b)),
        }),
        attributes: f
            .attributes
            .iter()
            .map(|(k, v)| pb::KeyValue::string(k, render(v)))
            .collect(),
    }
}

impl Entry {
    fn encoded_len(&self) -> usize {
        match self {
            Entry::Http(e) => e.encoded_len(),
            Entry::Tcp(e) => e.encoded_len(),
            Entry::Otel(e) => e.encoded_len(),
        }
    }
}

// ---------------------------------------------------------------------------------
// The logger's task: batching, flushing, the stream
// ---------------------------------------------------------------------------------

struct LoggerTask {
    config: Arc<GrpcAccessLogConfig>,
    clusters: Arc<ClusterManager>,
    stats: GrpcLogStats,
    batch: Vec<Entry>,
    /// Envoy's `approximate_message_size_bytes_`: the entries' encoded sizes.
    batch_bytes: usize,
    /// The connection to the receiver, and the ALS call on it (its messages).
    conn: Option<Connection>,
    stream: Option<mpsc::Sender<BodyFrame>>,
    /// After a failed attempt to connect, the next waits for this.
    retry_at: Option<Instant>,
}

impl LoggerTask {
    async fn run(mut self, mut rx: mpsc::Receiver<Entry>) {
        let interval = self
            .config
            .buffer_flush_interval
            .max(Duration::from_millis(1));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                entry = rx.recv() => match entry {
                    Some(entry) => self.add(entry).await,
                    // The logger is gone (its listener removed, the server
                    // stopped): a last flush to a stream that is up.
                    None => {
                        self.retry_at = None;
                        self.flush().await;
                        return;
                    }
                },
                _ = tick.tick() => self.flush().await,
            }
        }
    }

    /// Envoy's `log()` / `canLogMore()`.
    async fn add(&mut self, entry: Entry) {
        let max = self.config.buffer_size_bytes as usize;
        if max != 0 && self.batch_bytes >= max {
            self.flush().await;
            if self.batch_bytes >= max {
                self.stats.logs_dropped.inc();
                return;
            }
        }
        if !matches!(entry, Entry::Tcp(_)) {
            self.stats.logs_written.inc();
        }
        self.batch_bytes += entry.encoded_len();
        self.batch.push(entry);
        if self.batch_bytes >= max {
            self.flush().await;
        }
    }

    async fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let n = self.batch.len() as u64;
        // A connection or call the receiver closed is opened again at once (one try).
        for _ in 0..2 {
            if self.conn.as_ref().is_none_or(Connection::is_closed) {
                self.conn = None;
                self.stream = None;
                if self.retry_at.is_some_and(|t| Instant::now() < t) {
                    return;
                }
                match Connection::open(&self.clusters, &self.config.cluster).await {
                    Some(c) => {
                        self.retry_at = None;
                        self.conn = Some(c);
                    }
                    None => {
                        self.retry_at = Some(Instant::now() + self.config.buffer_flush_interval);
                        self.stats.flush_failed.add(n);
                        return;
                    }
                }
            }
            let conn = self.conn.as_mut().expect("opened above");
            let sent = if self.config.kind == GrpcLogKind::OpenTelemetry {
                // One unary Export per batch.
                let Some(call) = conn.call(EXPORT_PATH).await else {
                    self.conn = None;
                    continue;
                };
                call.try_send(Ok(Frame::data(self.encode(false))))
            } else {
                // One StreamAccessLogs call; its first message identifies the logger.
                let identify = self.stream.as_ref().is_none_or(|s| s.is_closed());
                if identify {
                    match conn.call(METHOD_PATH).await {
                        Some(call) => self.stream = Some(call),
                        None => {
                            self.conn = None;
                            continue;
                        }
                    }
                }
                let frame = self.encode(identify);
                self.stream
                    .as_ref()
                    .expect("started above")
                    .try_send(Ok(Frame::data(frame)))
            };
            match sent {
                Ok(()) => {
                    self.stats.flushed.add(n);
                    self.batch.clear();
                    self.batch_bytes = 0;
                    return;
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // Above the high watermark: kept for the next flush.
                    self.stats.flush_failed.add(n);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => self.stream = None,
            }
        }
        self.stats.flush_failed.add(n);
    }

    fn encode(&self, identify: bool) -> Bytes {
        if let Some(otel) = &self.config.otel {
            return encode_otlp(&resource(&self.config.log_name, otel), &self.batch);
        }
        let identifier = identify.then(|| pb::Identifier {
            node: local_node(),
            log_name: self.config.log_name.clone(),
        });
        encode(identifier.as_ref(), self.config.kind, &self.batch)
    }
}

/// A batch as one length-prefixed gRPC `StreamAccessLogsMessage`, encoded from
/// the entries in place (prost's field encoders take references).
fn encode(identifier: Option<&pb::Identifier>, kind: GrpcLogKind, batch: &[Entry]) -> Bytes {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, message};
    let entries_len: usize = batch.iter().map(|e| e.field_len(1)).sum();
    // `http_logs` (2) or `tcp_logs` (3): HTTPAccessLogEntries / TCPAccessLogEntries.
    let entries_field = match kind {
        GrpcLogKind::Tcp => 3,
        GrpcLogKind::Http | GrpcLogKind::OpenTelemetry => 2,
    };
    let len = identifier.map_or(0, |i| message::encoded_len(1, i))
        + 1
        + encoded_len_varint(entries_len as u64)
        + entries_len;
    let mut out = BytesMut::with_capacity(5 + len);
    out.put_u8(0);
    out.put_u32(len as u32);
    if let Some(i) = identifier {
        message::encode(1, i, &mut out);
    }
    encode_key(entries_field, WireType::LengthDelimited, &mut out);
    encode_varint(entries_len as u64, &mut out);
    for e in batch {
        e.encode_field(1, &mut out);
    }
    debug_assert_eq!(out.len(), 5 + len);
    out.freeze()
}

impl Entry {
    /// The entry as field `tag` of its batch message.
    fn field_len(&self, tag: u32) -> usize {
        use prost::encoding::message;
        match self {
            Entry::Http(e) => message::encoded_len(tag, &**e),
            Entry::Tcp(e) => message::encoded_len(tag, &**e),
            Entry::Otel(e) => message::encoded_len(tag, &**e),
        }
    }

    fn encode_field(&self, tag: u32, out: &mut BytesMut) {
        use prost::encoding::message;
        match self {
            Entry::Http(e) => message::encode(tag, &**e, out),
            Entry::Tcp(e) => message::encode(tag, &**e, out),
            Entry::Otel(e) => message::encode(tag, &**e, out),
        }
    }
}

/// The OTLP resource: Envoy's built-in labels (`log_name`, `zone_name`,
/// `cluster_name`, `node_name`, from the bootstrap node) unless disabled, then
/// `resource_attributes`.
fn resource(log_name: &str, otel: &crate::config::OtelLogConfig) -> pb::Resource {
    let mut attributes = Vec::new();
    if !otel.disable_builtin_labels {
        let node = local_node().unwrap_or_default();
        let zone = node.locality.map(|l| l.zone).unwrap_or_default();
        attributes.push(pb::KeyValue::string("log_name", log_name.to_string()));
        attributes.push(pb::KeyValue::string("zone_name", zone));
        attributes.push(pb::KeyValue::string("cluster_name", node.cluster));
        attributes.push(pb::KeyValue::string("node_name", node.id));
    }
    for (k, v) in &otel.resource_attributes {
        attributes.push(pb::KeyValue::string(k, v.clone()));
    }
    pb::Resource { attributes }
}

/// A batch as one length-prefixed `ExportLogsServiceRequest`: one
/// `ResourceLogs` (the resource, one `ScopeLogs` holding the records).
fn encode_otlp(resource: &pb::Resource, batch: &[Entry]) -> Bytes {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, message};
    let delimited = |n: usize| 1 + encoded_len_varint(n as u64) + n;
    // ScopeLogs.log_records is field 2.
    let scope_len: usize = batch.iter().map(|e| e.field_len(2)).sum();
    // ResourceLogs: resource (1), scope_logs (2).
    let resource_logs_len = message::encoded_len(1, resource) + delimited(scope_len);
    // ExportLogsServiceRequest.resource_logs is field 1.
    let len = delimited(resource_logs_len);
    let mut out = BytesMut::with_capacity(5 + len);
    out.put_u8(0);
    out.put_u32(len as u32);
    encode_key(1, WireType::LengthDelimited, &mut out);
    encode_varint(resource_logs_len as u64, &mut out);
    message::encode(1, resource, &mut out);
    encode_key(2, WireType::LengthDelimited, &mut out);
    encode_varint(scope_len as u64, &mut out);
    for e in batch {
        e.encode_field(2, &mut out);
    }
    debug_assert_eq!(out.len(), 5 + len);
    out.freeze()
}

type BodyFrame = Result<Frame<Bytes>, Infallible>;

/// The request body of the stream: the messages the task writes.
struct ChannelBody(mpsc::Receiver<BodyFrame>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx)
    }
}

/// An HTTP/2 connection to a host of the receiver's cluster.
struct Connection {
    sender: http2::SendRequest<ChannelBody>,
    /// `http://<cluster>` (`https` with the cluster's TLS), as Envoy's gRPC client
    /// names the authority.
    origin: String,
}

impl Connection {
    fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Connects to a host of `cluster`; None when there is no such cluster or
    /// host, or the host cannot be reached.
    async fn open(clusters: &ClusterManager, cluster: &str) -> Option<Connection> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let cluster = clusters.get(cluster)?;
        let host = {
            let hosts = cluster.hosts.load();
            let healthy: Vec<_> = hosts
                .iter()
                .filter(|h| h.health() != HostHealth::Unhealthy)
                .collect();
            let pick = NEXT.fetch_add(1, Ordering::Relaxed);
            (*healthy.get(pick % healthy.len().max(1))?).clone()
        };
        let io = crate::upstream::connect(&cluster, &host, None).await.ok()?;
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .ok()?;
        tokio::spawn(conn);
        let scheme = if cluster.tls.is_some() {
            "https"
        } else {
            "http"
        };
        Some(Connection {
            sender,
            origin: format!("{scheme}://{}", cluster.name),
        })
    }

    /// Starts a gRPC call to `path`; its request messages go into the returned
    /// sender (the call's request ends when the sender is dropped). None when the
    /// connection is gone.
    async fn call(&mut self, path: &str) -> Option<mpsc::Sender<BodyFrame>> {
        self.sender.ready().await.ok()?;
        let (tx, rx) = mpsc::channel(STREAM_MESSAGES);
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(format!("{}{path}", self.origin))
            .body(ChannelBody(rx))
            .ok()?;
        let h = req.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        let response = self.sender.send_request(req);
        // The answer is read to its end (an ALS answers only when the call ends),
        // which keeps the call open until then.
        tokio::spawn(async move {
            if let Ok(resp) = response.await {
                use http_body_util::BodyExt;
                let mut body = resp.into_body();
                while let Some(Ok(_)) = body.frame().await {}
            }
        });
        Some(tx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_otlp_batch_decodes_as_an_export_request() {
        let otel = crate::config::OtelLogConfig {
            resource_attributes: vec![("svc".into(), "edge".into())],
            disable_builtin_labels: true,
            ..Default::default()
        };
        let formats = OtelFormats {
            body: Some(super::super::Format::parse("%REQ(:METHOD)% %RESPONSE_CODE%").unwrap()),
            attributes: vec![(
                "path".into(),
                super::super::Format::parse("%REQ(:PATH)%").unwrap(),
            )],
        };
        let record = LogRecord {
            method: "GET".into(),
            path: "/p".into(),
            response_code: 204,
            start: Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(1_500)),
            ..Default::default()
        };
        let entry = otel_entry(&formats, &record);
        assert_eq!(entry.time_unix_nano, 1_500);
        assert_eq!(
            entry.body.as_ref().unwrap().string_value.as_deref(),
            Some("GET 204")
        );
        let framed = encode_otlp(
            &resource("l", &otel),
            &[Entry::Otel(Box::new(entry.clone()))],
        );
        let len = u32::from_be_bytes(framed[1..5].try_into().unwrap()) as usize;
        assert_eq!(framed.len(), 5 + len);
        let req = pb::ExportLogsServiceRequest::decode(&framed[5..]).unwrap();
        let rl = &req.resource_logs[0];
        assert_eq!(
            rl.resource.as_ref().unwrap().attributes,
            vec![pb::KeyValue::string("svc", "edge".into())]
        );
        assert_eq!(rl.scope_logs[0].log_records, vec![entry]);
    }

    #[test]
    fn response_flags_of_the_short_form() {
        assert_eq!(pb::ResponseFlags::parse("-"), None);
        let f = pb::ResponseFlags::parse("UF,URX").unwrap();
        assert!(f.upstream_connection_failure && f.upstream_retry_limit_exceeded);
        assert!(!f.no_healthy_upstream);
        assert!(pb::ResponseFlags::parse("UH").unwrap().no_healthy_upstream);
    }

    #[test]
    fn an_entry_encodes_with_envoys_field_numbers() {
        let record = LogRecord {
            method: "GET".into(),
            path: "/p".into(),
            authority: "h".into(),
            protocol: "HTTP/1.1",
            response_code: 200,
            response_flags: "-",
            ..Default::default()
        };
        let config = GrpcAccessLogConfig {
            kind: GrpcLogKind::Http,
            log_name: "l".into(),
            cluster: "c".into(),
            buffer_size_bytes: 16384,
            buffer_flush_interval: Duration::from_secs(1),
            request_headers: vec![":method".into()],
            response_headers: vec![],
            otel: None,
        };
        let e = http_entry(&config, &record);
        let bytes = e.encode_to_vec();
        let back = pb::HttpAccessLogEntry::decode(&bytes[..]).unwrap();
        assert_eq!(back, e);
        let req = back.request.unwrap();
        assert_eq!(req.request_method, 1);
        assert_eq!(req.request_headers.get(":method").unwrap(), "GET");
        assert_eq!(back.protocol_version, 2);
        assert_eq!(back.response.unwrap().response_code.unwrap().value, 200);
        // HTTPAccessLogEntry.request is field 3 (length-delimited: tag 0x1a).
        assert!(bytes.contains(&0x1a));

        // A batch of two with the identifier decodes as Envoy's message.
        let identifier = pb::Identifier {
            node: Some(pb::Node {
                id: "n".into(),
                ..Default::default()
            }),
            log_name: "l".into(),
        };
        let batch = vec![
            Entry::Http(Box::new(e.clone())),
            Entry::Http(Box::new(e.clone())),
        ];
        let framed = encode(Some(&identifier), GrpcLogKind::Http, &batch);
        assert_eq!(framed[0], 0);
        let len = u32::from_be_bytes(framed[1..5].try_into().unwrap()) as usize;
        assert_eq!(framed.len(), 5 + len);
        let msg = pb::StreamAccessLogsMessage::decode(&framed[5..]).unwrap();
        assert_eq!(msg.identifier, Some(identifier));
        match msg.log_entries {
            Some(pb::LogEntries::HttpLogs(h)) => assert_eq!(h.log_entry, vec![e.clone(), e]),
            other => panic!("{other:?}"),
        }
    }
}
