//! Envoy access logs: format strings with command operators, file/stdout/stderr sinks.
//!
//! A format is parsed once when configuration is applied (start-time formats
//! compiled, `%HOSTNAME%` read); logging a request only walks the parsed pieces.
//!
//! Writing follows Envoy's `AccessLogFileImpl`: a worker never touches the file.
//! It renders its line into its own buffer (one per worker, plus one for every
//! other thread, see [`crate::worker::shard`]), locked only by itself and by the
//! flusher, so workers share no lock. One flusher thread per process writes each
//! logger's buffers every flush interval, sooner when a buffer passes the minimum
//! flush size, and when a logger is dropped; [`flush_all`] writes everything
//! at once (the server calls it when it stops). A buffer holds whole lines and is
//! written in one piece, so lines are never torn or interleaved.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::Thread;
use std::time::{Duration, Instant, SystemTime};

use chrono::format::{Item, StrftimeItems};
use http::HeaderMap;

use crate::config::{AccessLogConfig, AccessLogFormat, AccessLogSink};

/// One command operator of Envoy's substitution format language.
#[derive(Debug, Clone, PartialEq)]
enum Operator {
    StartTime(TimeFormat),
    /// `%REQ(X?Y):Z%`: header X, else Y, truncated to Z bytes.
    Req(String, Option<String>, Option<usize>),
    Resp(String, Option<String>, Option<usize>),
    ResponseCode,
    ResponseFlags,
    ResponseCodeDetails,
    BytesReceived,
    BytesSent,
    Duration,
    ResponseDuration,
    Protocol,
    UpstreamHost,
    UpstreamCluster,
    UpstreamTransportFailureReason,
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    DownstreamLocalAddress,
    RouteName,
    /// Read once, when the format is parsed (as Envoy's formatter does).
    Hostname(String),
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Op(Operator),
}

/// A parsed format string.
#[derive(Debug, Clone, PartialEq)]
pub struct Format(Vec<Piece>);

impl Format {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut rest = s;
        while let Some(start) = rest.find('%') {
            text.push_str(&rest[..start]);
            let after = &rest[start + 1..];
            // `%%` is a literal percent sign; otherwise the operator is a name, an
            // optional `(argument)` that may hold `%` (`%START_TIME(%s.%3f)%`), an
            // optional `:length`, and the closing `%`.
            if let Some(stripped) = after.strip_prefix('%') {
                text.push('%');
                rest = stripped;
                continue;
            }
            let mut end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            if after[end..].starts_with('(') {
                if let Some(close) = after[end..].find(')') {
                    end += close + 1;
                }
            }
            end += after[end..].find('%').ok_or_else(|| {
                format!(
                    "Incorrect configuration: {s}. Couldn't find valid command at position {start}"
                )
            })?;
            let command = &after[..end];
            if !text.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut text)));
            }
            pieces.push(Piece::Op(parse_operator(command)?));
            rest = &after[end + 1..];
        }
        text.push_str(rest);
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(Format(pieces))
    }
}

fn parse_operator(command: &str) -> Result<Operator, String> {
    let (name, arg, max_len) = match command.find('(') {
        Some(open) => {
            let close = command
                .rfind(')')
                .ok_or_else(|| format!("Closing bracket is missing in command: {command}"))?;
            let max_len = match command[close + 1..].strip_prefix(':') {
                Some(n) => Some(
                    n.parse::<usize>()
                        .map_err(|_| format!("Length must be an integer in command: {command}"))?,
                ),
                None => None,
            };
            (&command[..open], Some(&command[open + 1..close]), max_len)
        }
        None => (command, None, None),
    };
    let header = |arg: Option<&str>| -> Result<(String, Option<String>), String> {
        let arg = arg.ok_or_else(|| format!("{name} requires a header name"))?;
        Ok(match arg.split_once('?') {
            Some((main, alt)) => (main.to_ascii_lowercase(), Some(alt.to_ascii_lowercase())),
            None => (arg.to_ascii_lowercase(), None),
        })
    };
    Ok(match name {
        "START_TIME" => Operator::StartTime(TimeFormat::compile(
            arg.filter(|a| !a.is_empty())
                .unwrap_or(DEFAULT_START_TIME_FORMAT),
        )),
        "REQ" => {
            let (h, alt) = header(arg)?;
            Operator::Req(h, alt, max_len)
        }
        "RESP" => {
            let (h, alt) = header(arg)?;
            Operator::Resp(h, alt, max_len)
        }
        "RESPONSE_CODE" => Operator::ResponseCode,
        "RESPONSE_FLAGS" => Operator::ResponseFlags,
        "RESPONSE_CODE_DETAILS" => Operator::ResponseCodeDetails,
        "BYTES_RECEIVED" => Operator::BytesReceived,
        "BYTES_SENT" => Operator::BytesSent,
        "DURATION" => Operator::Duration,
        "RESPONSE_DURATION" => Operator::ResponseDuration,
        "PROTOCOL" => Operator::Protocol,
        "UPSTREAM_HOST" => Operator::UpstreamHost,
        "UPSTREAM_CLUSTER" => Operator::UpstreamCluster,
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => Operator::UpstreamTransportFailureReason,
        "DOWNSTREAM_REMOTE_ADDRESS" => Operator::DownstreamRemoteAddress,
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => Operator::DownstreamRemoteAddressWithoutPort,
        "DOWNSTREAM_LOCAL_ADDRESS" => Operator::DownstreamLocalAddress,
        "ROUTE_NAME" => Operator::RouteName,
        "HOSTNAME" => Operator::Hostname(hostname()),
        other => return Err(format!("Not supported field in StreamInfo: {other}")),
    })
}

/// Everything a log line can refer to, filled in as the request proceeds.
#[derive(Debug, Default)]
pub struct LogRecord {
    pub start: Option<SystemTime>,
    pub request_headers: Option<HeaderMap>,
    /// `:method`, `:path`, `:authority` (pseudo-headers are not in the HeaderMap).
    pub method: String,
    pub path: String,
    pub authority: String,
    pub response_headers: Option<HeaderMap>,
    pub response_code: u16,
    pub response_flags: &'static str,
    pub response_code_details: &'static str,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Duration,
    pub response_duration: Option<Duration>,
    pub protocol: &'static str,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_cluster: Option<String>,
    pub upstream_failure: Option<String>,
    pub downstream_remote: Option<SocketAddr>,
    pub downstream_local: Option<SocketAddr>,
    pub route_name: String,
}

const NONE: &str = "-";

fn header_value<'a>(
    headers: Option<&'a HeaderMap>,
    pseudo: impl Fn(&str) -> Option<&'a str>,
    name: &str,
) -> Option<&'a str> {
    if let Some(v) = pseudo(name) {
        return Some(v);
    }
    headers?.get(name).and_then(|v| v.to_str().ok())
}

fn truncate(s: &str, max: Option<usize>) -> &str {
    match max {
        Some(n) if s.len() > n => {
            let mut end = n;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            &s[..end]
        }
        _ => s,
    }
}

impl Format {
    pub fn render(&self, r: &LogRecord, out: &mut String) {
        for piece in &self.0 {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Op(op) => match op {
                    Operator::StartTime(fmt) => match r.start {
                        Some(t) => fmt.render(t, out),
                        None => out.push_str(NONE),
                    },
                    Operator::Req(h, alt, max) => {
                        // An empty pseudo-header (a refused request has none) prints as `-`.
                        let pseudo = |n: &str| {
                            match n {
                                ":method" => Some(r.method.as_str()),
                                ":path" => Some(r.path.as_str()),
                                ":authority" | "host" => Some(r.authority.as_str()),
                                _ => None,
                            }
                            .filter(|v| !v.is_empty())
                        };
                        let v = header_value(r.request_headers.as_ref(), pseudo, h).or_else(|| {
                            alt.as_deref()
                                .and_then(|a| header_value(r.request_headers.as_ref(), pseudo, a))
                        });
                        out.push_str(v.map_or(NONE, |v| truncate(v, *max)));
                    }
                    Operator::Resp(h, alt, max) => {
                        let none = |_: &str| None;
                        let v = header_value(r.response_headers.as_ref(), none, h).or_else(|| {
                            alt.as_deref()
                                .and_then(|a| header_value(r.response_headers.as_ref(), none, a))
                        });
                        out.push_str(v.map_or(NONE, |v| truncate(v, *max)));
                    }
                    Operator::ResponseCode => {
                        let _ = write!(out, "{}", r.response_code);
                    }
                    Operator::ResponseFlags => out.push_str(r.response_flags),
                    Operator::ResponseCodeDetails => out.push_str(r.response_code_details),
                    Operator::BytesReceived => {
                        let _ = write!(out, "{}", r.bytes_received);
                    }
                    Operator::BytesSent => {
                        let _ = write!(out, "{}", r.bytes_sent);
                    }
                    Operator::Duration => {
                        let _ = write!(out, "{}", r.duration.as_millis());
                    }
                    Operator::ResponseDuration => match r.response_duration {
                        Some(d) => {
                            let _ = write!(out, "{}", d.as_millis());
                        }
                        None => out.push_str(NONE),
                    },
                    Operator::Protocol => out.push_str(r.protocol),
                    Operator::UpstreamHost => match r.upstream_host {
                        Some(a) => {
                            let _ = write!(out, "{a}");
                        }
                        None => out.push_str(NONE),
                    },
                    Operator::UpstreamCluster => {
                        out.push_str(r.upstream_cluster.as_deref().unwrap_or(NONE))
                    }
                    Operator::UpstreamTransportFailureReason => {
                        out.push_str(r.upstream_failure.as_deref().unwrap_or(NONE))
                    }
                    Operator::DownstreamRemoteAddress => match r.downstream_remote {
                        Some(a) => {
                            let _ = write!(out, "{a}");
                        }
                        None => out.push_str(NONE),
                    },
                    Operator::DownstreamRemoteAddressWithoutPort => match r.downstream_remote {
                        Some(a) => {
                            let _ = write!(out, "{}", a.ip());
                        }
                        None => out.push_str(NONE),
                    },
                    Operator::DownstreamLocalAddress => match r.downstream_local {
                        Some(a) => {
                            let _ = write!(out, "{a}");
                        }
                        None => out.push_str(NONE),
                    },
                    Operator::RouteName => out.push_str(if r.route_name.is_empty() {
                        NONE
                    } else {
                        &r.route_name
                    }),
                    Operator::Hostname(name) => out.push_str(name),
                },
            }
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| NONE.to_string())
}

/// Envoy's `%START_TIME%` without an argument: `2016-04-15T20:17:00.310Z`.
const DEFAULT_START_TIME_FORMAT: &str = "%Y-%m-%dT%H:%M:%S.%3fZ";

/// A `%START_TIME(...)%` format, compiled once. strftime specifiers are chrono's;
/// fractional seconds are Envoy's: `%f` is nine digits, `%1f`..`%9f` that many
/// (chrono alone knows only `%3f`, `%6f` and `%9f`).
#[derive(Debug, Clone, PartialEq)]
struct TimeFormat(Vec<TimePiece>);

#[derive(Debug, Clone, PartialEq)]
enum TimePiece {
    Items(Vec<Item<'static>>),
    /// Digits of fractional seconds, truncated.
    Fraction(u32),
}

impl TimeFormat {
    fn compile(format: &str) -> Self {
        fn push_items(pieces: &mut Vec<TimePiece>, text: &mut String) {
            if text.is_empty() {
                return;
            }
            // A run of text holding a specifier chrono does not know is printed
            // as written rather than cut short at it.
            let items = StrftimeItems::new(text)
                .parse_to_owned()
                .unwrap_or_else(|_| vec![Item::OwnedLiteral(text.as_str().into())]);
            pieces.push(TimePiece::Items(items));
            text.clear();
        }
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut chars = format.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '%' {
                text.push(c);
                continue;
            }
            let mut ahead = chars.clone();
            let digits = match (ahead.next(), ahead.next()) {
                (Some('f'), _) => Some((9, 1)),
                (Some(d @ '1'..='9'), Some('f')) => Some((d.to_digit(10).unwrap_or(9), 2)),
                _ => None,
            };
            match digits {
                Some((digits, len)) => {
                    push_items(&mut pieces, &mut text);
                    pieces.push(TimePiece::Fraction(digits));
                    for _ in 0..len {
                        chars.next();
                    }
                }
                None => {
                    // `%%` stays one unit so that `%%f` is a literal `%f`.
                    text.push('%');
                    if chars.peek() == Some(&'%') {
                        text.push('%');
                        chars.next();
                    }
                }
            }
        }
        push_items(&mut pieces, &mut text);
        TimeFormat(pieces)
    }

    fn render(&self, t: SystemTime, out: &mut String) {
        let dt: chrono::DateTime<chrono::Utc> = t.into();
        for piece in &self.0 {
            match piece {
                TimePiece::Items(items) => {
                    let _ = write!(out, "{}", dt.format_with_items(items.iter()));
                }
                TimePiece::Fraction(digits) => {
                    // A leap second shows as nanoseconds past 1e9; keep nine digits.
                    let nanos = dt.timestamp_subsec_nanos() % 1_000_000_000;
                    let value = nanos / 10u32.pow(9 - digits);
                    let _ = write!(out, "{value:0width$}", width = *digits as usize);
                }
            }
        }
    }
}

#[derive(Debug)]
enum CompiledFormat {
    Text(Format),
    Json(Vec<(String, Format)>),
}

/// When buffered lines are written: Envoy's `--file-flush-interval-msec` and
/// `--file-flush-min-size-kb`, with Envoy's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushSettings {
    /// Lines wait at most this long in memory (at least 1 ms is used, at most
    /// Envoy's largest, `u32::MAX` ms).
    pub interval: Duration,
    /// A buffer holding more than this many bytes is written without waiting
    /// for the interval (0: every line wakes the flusher).
    pub min_size: usize,
}

impl FlushSettings {
    /// Envoy's `--file-flush-interval-msec` default, 10000.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
    /// Envoy's `--file-flush-min-size-kb` default, 64.
    pub const DEFAULT_MIN_SIZE: usize = 64 * 1024;
}

impl Default for FlushSettings {
    fn default() -> Self {
        FlushSettings {
            interval: Self::DEFAULT_INTERVAL,
            min_size: Self::DEFAULT_MIN_SIZE,
        }
    }
}

/// What a logger needs from its server.
#[derive(Debug, Clone, Copy, Default)]
pub struct AccessLogOptions {
    /// The server's worker count: the logger keeps `workers + 1` buffers. Loggers
    /// that only the control thread writes (admin) pass 0.
    pub workers: usize,
    pub flush: FlushSettings,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One configured access logger.
pub struct AccessLogger {
    format: CompiledFormat,
    buffer: Arc<LogBuffer>,
}

impl std::fmt::Debug for AccessLogger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLogger")
            .field("format", &self.format)
            .field("shards", &self.buffer.shards.len())
            .field("flush", &self.buffer.settings)
            .finish_non_exhaustive()
    }
}

impl AccessLogger {
    pub fn open(config: &AccessLogConfig, options: AccessLogOptions) -> std::io::Result<Arc<Self>> {
        let format = match &config.format {
            AccessLogFormat::Text(s) => {
                CompiledFormat::Text(Format::parse(s).map_err(std::io::Error::other)?)
            }
            AccessLogFormat::Json(fields) => CompiledFormat::Json(
                fields
                    .iter()
                    .map(|(k, v)| Format::parse(v).map(|f| (k.clone(), f)))
                    .collect::<Result<_, _>>()
                    .map_err(std::io::Error::other)?,
            ),
        };
        // stdout and stderr are buffered like files, as Envoy does: a reader
        // that is slow to drain a pipe must not stall a worker either.
        let sink = match &config.sink {
            AccessLogSink::File(path) if path == "/dev/stdout" => Sink::Stdout,
            AccessLogSink::File(path) if path == "/dev/stderr" => Sink::Stderr,
            AccessLogSink::File(path) => Sink::File {
                file: OpenOptions::new().create(true).append(true).open(path)?,
                path: path.clone(),
            },
            AccessLogSink::Stdout => Sink::Stdout,
            AccessLogSink::Stderr => Sink::Stderr,
        };
        let buffer = LogBuffer::register(sink, options)?;
        Ok(Arc::new(AccessLogger { format, buffer }))
    }

    /// Renders one line into the calling thread's buffer; never writes to the sink.
    pub fn log(&self, record: &LogRecord) {
        let b = &*self.buffer;
        let shard = b.shards.get(crate::worker::shard()).unwrap_or(&b.shards[0]);
        let mut lines = lock(&shard.0);
        match &self.format {
            CompiledFormat::Text(f) => f.render(record, &mut lines),
            CompiledFormat::Json(fields) => {
                let mut map = serde_json::Map::new();
                for (k, f) in fields {
                    let mut v = String::new();
                    f.render(record, &mut v);
                    map.insert(k.clone(), serde_json::Value::String(v));
                }
                let _ = writeln!(lines, "{}", serde_json::Value::Object(map));
            }
        }
        let full = lines.len() > b.settings.min_size
            || (!b.started.load(Ordering::Relaxed) && !b.started.swap(true, Ordering::AcqRel));
        drop(lines);
        // Waking the flusher is an atomic flag and a futex wake: it never waits.
        if full && !b.urgent.swap(true, Ordering::AcqRel) {
            b.flusher.unpark();
        }
    }

    /// Writes this logger's buffered lines now; returns once they are written.
    pub fn flush(&self) {
        self.buffer.flush();
    }
}

impl Drop for AccessLogger {
    /// The flusher writes what is left (a removed listener's last lines) and
    /// closes the file; whichever thread drops the logger does not wait for that.
    fn drop(&mut self) {
        self.buffer.closed.store(true, Ordering::Release);
        self.buffer.flusher.unpark();
    }
}

/// Writes the buffered lines of every logger of the process and returns once
/// they are written. [`crate::server::Server::stop`] calls it after the workers
/// have stopped, so that no line is lost.
pub fn flush_all() {
    let buffers = lock(&BUFFERS).clone();
    for b in &buffers {
        b.flush();
    }
}

/// A worker's buffer, padded to its own cache lines.
#[repr(align(128))]
struct Shard(Mutex<String>);

struct LogBuffer {
    shards: Box<[Shard]>,
    settings: FlushSettings,
    /// Set by a thread whose buffer passed `min_size`; cleared by the flusher.
    urgent: AtomicBool,
    /// Set once the first line was logged: that line is written at once, as
    /// Envoy's flush thread does when it starts (someone tailing the log sees
    /// that logging works without waiting for the interval).
    started: AtomicBool,
    /// The logger is gone: the flusher writes what is left and forgets the buffer.
    closed: AtomicBool,
    flusher: Thread,
    /// Held while a flush takes and writes lines, so that a flush returns only
    /// once the lines it took (or another flush took) are written.
    out: Mutex<Output>,
}

struct Output {
    sink: Sink,
    /// Swapped with a shard's buffer: the shard's lock is held for a swap only.
    spare: String,
    due: Instant,
    failing: bool,
}

enum Sink {
    Stdout,
    Stderr,
    File { path: String, file: File },
}

impl Sink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes)?;
                out.flush()
            }
            Sink::Stderr => std::io::stderr().lock().write_all(bytes),
            Sink::File { file, .. } => file.write_all(bytes),
        }
    }

    fn name(&self) -> &str {
        match self {
            Sink::Stdout => "stdout",
            Sink::Stderr => "stderr",
            Sink::File { path, .. } => path,
        }
    }
}

/// Every live logger's buffer; taken by logger creation, the flusher and
/// [`flush_all`], never by a worker.
static BUFFERS: Mutex<Vec<Arc<LogBuffer>>> = Mutex::new(Vec::new());
/// The flusher thread, started with the first logger.
static FLUSHER: Mutex<Option<Thread>> = Mutex::new(None);
/// Serialises writes to disk, as Envoy's file lock does: two loggers writing the
/// same path through their own descriptors never mix their chunks.
static WRITE_LOCK: Mutex<()> = Mutex::new(());

impl LogBuffer {
    fn register(sink: Sink, options: AccessLogOptions) -> std::io::Result<Arc<Self>> {
        let flusher = {
            let mut slot = lock(&FLUSHER);
            match &*slot {
                Some(t) => t.clone(),
                None => {
                    let t = std::thread::Builder::new()
                        .name("envoyx-alog-flush".into())
                        .spawn(flush_loop)?
                        .thread()
                        .clone();
                    *slot = Some(t.clone());
                    t
                }
            }
        };
        let settings = FlushSettings {
            interval: options.flush.interval.clamp(
                Duration::from_millis(1),
                Duration::from_millis(u32::MAX.into()),
            ),
            min_size: options.flush.min_size,
        };
        let buffer = Arc::new(LogBuffer {
            shards: (0..=options.workers)
                .map(|_| Shard(Mutex::new(String::new())))
                .collect(),
            settings,
            urgent: AtomicBool::new(false),
            started: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            flusher,
            out: Mutex::new(Output {
                sink,
                spare: String::new(),
                due: Instant::now() + settings.interval,
                failing: false,
            }),
        });
        lock(&BUFFERS).push(buffer.clone());
        // The flusher learns of the new buffer's deadline.
        buffer.flusher.unpark();
        Ok(buffer)
    }

    /// Writes every shard's lines; returns when the interval next expires.
    fn flush(&self) -> Instant {
        let mut out = lock(&self.out);
        let out = &mut *out;
        for shard in self.shards.iter() {
            {
                let mut lines = lock(&shard.0);
                if lines.is_empty() {
                    continue;
                }
                std::mem::swap(&mut *lines, &mut out.spare);
            }
            let result = {
                let _disk = lock(&WRITE_LOCK);
                out.sink.write(out.spare.as_bytes())
            };
            match result {
                Ok(()) => out.failing = false,
                Err(e) => {
                    // Once per run of failures (a full disk fails every flush).
                    if !out.failing {
                        crate::log!(Error, "main", "access log {}: {e}", out.sink.name());
                    }
                    out.failing = true;
                }
            }
            out.spare.clear();
            // A burst must not pin its memory for the logger's lifetime.
            let keep = self.settings.min_size.clamp(4096, 1 << 20) * 2;
            if out.spare.capacity() > keep {
                out.spare.shrink_to(keep);
            }
        }
        out.due = Instant::now() + self.settings.interval;
        out.due
    }

    fn due(&self) -> Instant {
        lock(&self.out).due
    }
}

/// The flusher: writes each buffer when its interval expires, when a worker
/// signals a full buffer, and a last time when its logger is dropped.
fn flush_loop() {
    loop {
        let buffers = lock(&BUFFERS).clone();
        let mut next: Option<Instant> = None;
        let mut finished = Vec::new();
        for b in &buffers {
            // Read before flushing: a logger seen closed logs no more lines.
            let closed = b.closed.load(Ordering::Acquire);
            let urgent = b.urgent.swap(false, Ordering::AcqRel);
            let due = if closed || urgent || Instant::now() >= b.due() {
                b.flush()
            } else {
                b.due()
            };
            if closed {
                finished.push(b.clone());
            } else {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        if !finished.is_empty() {
            lock(&BUFFERS).retain(|b| !finished.iter().any(|f| Arc::ptr_eq(b, f)));
        }
        drop(finished);
        drop(buffers);
        // An unpark that comes before the park is not lost: park returns at once.
        match next {
            Some(t) => std::thread::park_timeout(t.saturating_duration_since(Instant::now())),
            None => std::thread::park(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::bootstrap::DEFAULT_ACCESS_LOG_FORMAT;

    #[test]
    fn default_format_renders_like_envoy() {
        let f = Format::parse(DEFAULT_ACCESS_LOG_FORMAT).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("user-agent", "curl/8".parse().unwrap());
        let r = LogRecord {
            start: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_460_751_420_310)),
            request_headers: Some(headers),
            method: "GET".into(),
            path: "/x".into(),
            authority: "h".into(),
            response_code: 200,
            response_flags: "-",
            bytes_sent: 12,
            duration: Duration::from_millis(3),
            protocol: "HTTP/1.1",
            upstream_host: Some("127.0.0.1:80".parse().unwrap()),
            ..Default::default()
        };
        let mut out = String::new();
        f.render(&r, &mut out);
        assert_eq!(
            out,
            "[2016-04-15T20:17:00.310Z] \"GET /x HTTP/1.1\" 200 - 0 12 3 - \"-\" \"curl/8\" \"-\" \"h\" \"127.0.0.1:80\"\n"
        );
    }

    #[test]
    fn unknown_operator_is_an_error() {
        assert_eq!(
            Format::parse("%NOPE%").unwrap_err(),
            "Not supported field in StreamInfo: NOPE"
        );
    }

    #[test]
    fn percent_escape_and_truncation() {
        let f = Format::parse("100%% %REQ(:PATH):2%").unwrap();
        let r = LogRecord {
            path: "/abc".into(),
            ..Default::default()
        };
        let mut out = String::new();
        f.render(&r, &mut out);
        assert_eq!(out, "100% /a");
    }

    #[test]
    fn start_time_fractions_are_envoys() {
        // 2016-04-15T20:17:00.310123456Z
        let t = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_460_751_420_310_123_456);
        let f = Format::parse("%START_TIME(%H:%M:%S.%f|%1f|%3f|%6f|%9f|%s|%%f)%").unwrap();
        let r = LogRecord {
            start: Some(t),
            ..Default::default()
        };
        let mut out = String::new();
        f.render(&r, &mut out);
        assert_eq!(
            out,
            "20:17:00.310123456|3|310|310123|310123456|1460751420|%f"
        );
    }

    #[test]
    fn hostname_is_read_when_parsed() {
        let f = Format::parse("%HOSTNAME%").unwrap();
        let expected = hostname();
        assert!(matches!(&f.0[..], [Piece::Op(Operator::Hostname(h))] if *h == expected));
    }

    fn temp_log(name: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!(
            "envoyx-access-log-{}-{name}.log",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        path
    }

    fn path_logger(
        path: &std::path::Path,
        workers: usize,
        flush: FlushSettings,
    ) -> Arc<AccessLogger> {
        let config = AccessLogConfig {
            sink: AccessLogSink::File(path.to_string_lossy().into_owned()),
            format: AccessLogFormat::Text("%REQ(:PATH)% %REQ(:AUTHORITY)%\n".into()),
        };
        AccessLogger::open(&config, AccessLogOptions { workers, flush }).unwrap()
    }

    fn record(path: String) -> LogRecord {
        LogRecord {
            path,
            // Long enough that a torn or interleaved line would show.
            authority: "a".repeat(300),
            ..Default::default()
        }
    }

    /// Polls `path` until it holds `n` lines (a deadline, not a sleep).
    fn wait_lines(path: &std::path::Path, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            if lines.len() >= n || Instant::now() >= deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn lines_from_many_threads_arrive_whole_within_the_interval() {
        const THREADS: usize = 4;
        const LINES: usize = 3000;
        let path = temp_log("threads");
        let flush = FlushSettings {
            interval: Duration::from_millis(20),
            min_size: 8 * 1024,
        };
        let logger = path_logger(&path, THREADS, flush);
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let logger = &logger;
                s.spawn(move || {
                    crate::worker::enter(t);
                    for n in 0..LINES {
                        logger.log(&record(format!("/w{t}/{n}")));
                    }
                });
            }
            // A thread that is no worker shares slot 0.
            let logger = &logger;
            s.spawn(move || {
                for n in 0..LINES {
                    logger.log(&record(format!("/other/{n}")));
                }
            });
        });
        // No explicit flush: the flusher writes on its own, within the interval
        // after the last line.
        let total = (THREADS + 1) * LINES;
        let lines = wait_lines(&path, total);
        assert_eq!(lines.len(), total, "every line is written, once");
        let pad = "a".repeat(300);
        let mut next = std::collections::HashMap::<String, usize>::new();
        for line in &lines {
            let (req, authority) = line.split_once(' ').expect("a whole line");
            assert_eq!(authority, pad, "torn or interleaved line: {line:?}");
            let (source, n) = req.rsplit_once('/').unwrap();
            let n: usize = n.parse().unwrap();
            let expected = next.entry(source.to_string()).or_default();
            assert_eq!(n, *expected, "each thread's lines stay in order");
            *expected += 1;
        }
        assert_eq!(next.len(), THREADS + 1);
        assert!(next.values().all(|&n| n == LINES));
        drop(logger);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_full_buffer_is_written_before_the_interval() {
        let path = temp_log("size");
        let flush = FlushSettings {
            interval: Duration::from_secs(3600),
            min_size: 1024,
        };
        let logger = path_logger(&path, 1, flush);
        std::thread::spawn({
            let logger = logger.clone();
            move || {
                crate::worker::enter(0);
                // Just past 1 KiB: the worker wakes the flusher.
                for n in 0..4 {
                    logger.log(&record(format!("/{n}")));
                }
            }
        })
        .join()
        .unwrap();
        assert_eq!(wait_lines(&path, 4).len(), 4);
        drop(logger);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn flush_all_and_drop_write_what_is_buffered() {
        let flush = FlushSettings {
            interval: Duration::from_secs(3600),
            min_size: 1 << 20,
        };
        let path = temp_log("flush-all");
        let logger = path_logger(&path, 2, flush);
        logger.log(&record("/one".into()));
        logger.log(&record("/two".into()));
        flush_all();
        // Synchronous: written when flush_all returns.
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        drop(logger);
        let _ = std::fs::remove_file(&path);

        let path = temp_log("drop");
        let logger = path_logger(&path, 2, flush);
        logger.log(&record("/one".into()));
        drop(logger);
        assert_eq!(
            wait_lines(&path, 1).len(),
            1,
            "the last lines of a dropped logger"
        );
        let _ = std::fs::remove_file(&path);
    }
}
