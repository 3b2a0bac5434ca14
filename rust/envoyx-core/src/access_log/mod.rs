//! Envoy access logs: format strings with command operators, file/stdout/stderr sinks.
//!
//! A format is parsed once when configuration is applied (start-time formats
//! compiled, `%HOSTNAME%` read); logging a request only walks the parsed pieces.
//!
//! Writing follows Envoy's `AccessLogFileImpl`: a worker never touches the file.
//! It renders its line into its own buffer (one per worker, plus one for every
//! other thread, see [`crate::per_worker::shard`]), locked only by itself and by the
//! flusher, so workers share no lock. One flusher thread per process writes each
//! logger's buffers every flush interval, sooner when a buffer passes the minimum
//! flush size, and when a logger is dropped; [`flush_all`] writes everything
//! at once (the server calls it when it stops). A buffer holds whole lines and is
//! written in one piece, so lines are never torn or interleaved.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::Thread;
use std::time::{Duration, Instant};

use crate::config::{AccessLogConfig, AccessLogFormat, AccessLogSink};

mod als_proto;
mod format;
mod grpc;

pub use format::{Format, HeaderBytes, LogRecord, StreamFacts};
pub use grpc::{GrpcLogContext, set_local_node};

#[derive(Debug)]
enum CompiledFormat {
    Text(Format),
    Json(Vec<(String, Format)>),
    /// Lines rendered by the caller ([`AccessLogger::log_line`]).
    Lines,
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

/// One configured access logger: a file (stdout, stderr) of formatted lines, or
/// a gRPC access log service ([`grpc`]).
#[derive(Debug)]
pub struct AccessLogger(LoggerOutput);

#[derive(Debug)]
enum LoggerOutput {
    File(FileLogger),
    Grpc(grpc::GrpcLogger),
}

/// A logger writing lines to a file through the flusher.
struct FileLogger {
    format: CompiledFormat,
    buffer: Arc<LogBuffer>,
}

impl std::fmt::Debug for FileLogger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileLogger")
            .field("format", &self.format)
            .field("shards", &self.buffer.shards.len())
            .field("flush", &self.buffer.settings)
            .finish_non_exhaustive()
    }
}

impl AccessLogger {
    /// `grpc`: the cluster manager and stats gRPC loggers use; a gRPC logger
    /// configured where there is none (admin) is an error.
    pub fn open(
        config: &AccessLogConfig,
        options: AccessLogOptions,
        grpc: Option<GrpcLogContext<'_>>,
    ) -> std::io::Result<Arc<Self>> {
        if let AccessLogSink::Grpc(c) = &config.sink {
            let cx = grpc.ok_or_else(|| {
                std::io::Error::other("gRPC access loggers are not supported here by envoyx")
            })?;
            return Ok(Arc::new(AccessLogger(LoggerOutput::Grpc(
                grpc::GrpcLogger::open(c.clone(), cx)?,
            ))));
        }
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
            AccessLogSink::File(path) => Sink::open(path)?,
            AccessLogSink::Stdout => Sink::Stdout,
            AccessLogSink::Stderr => Sink::Stderr,
            AccessLogSink::Grpc(_) => unreachable!("handled above"),
        };
        let buffer = LogBuffer::register(sink, options)?;
        Ok(Arc::new(AccessLogger(LoggerOutput::File(FileLogger {
            format,
            buffer,
        }))))
    }

    /// A file of lines its callers render themselves: Envoy's event logs (health
    /// checking, outlier detection) share its access-log files and their flushing.
    pub fn open_lines(path: &str, options: AccessLogOptions) -> std::io::Result<Arc<Self>> {
        let buffer = LogBuffer::register(Sink::open(path)?, options)?;
        Ok(Arc::new(AccessLogger(LoggerOutput::File(FileLogger {
            format: CompiledFormat::Lines,
            buffer,
        }))))
    }

    /// Appends `line` and a newline to the calling thread's buffer.
    pub fn log_line(&self, line: &str) {
        if let LoggerOutput::File(f) = &self.0 {
            f.log_line(line);
        }
    }

    /// Logs one request: a line rendered into the calling thread's buffer, or an
    /// entry handed to the gRPC logger's task; never writes or sends itself.
    pub fn log(&self, record: &LogRecord) {
        match &self.0 {
            LoggerOutput::File(f) => f.log(record),
            LoggerOutput::Grpc(g) => g.log(record),
        }
    }

    /// Writes this logger's buffered lines now; returns once they are written
    /// (a gRPC logger flushes on its own schedule).
    pub fn flush(&self) {
        if let LoggerOutput::File(f) = &self.0 {
            f.buffer.flush();
        }
    }
}

impl FileLogger {
    fn log_line(&self, line: &str) {
        let shard = self.shard();
        let mut lines = lock(&shard.0);
        lines.push_str(line);
        lines.push('\n');
        self.wake_if_full(lines);
    }

    fn shard(&self) -> &Shard {
        let b = &*self.buffer;
        b.shards
            .get(crate::per_worker::shard())
            .unwrap_or(&b.shards[0])
    }

    /// Wakes the flusher when the buffer passed its minimum size, or for the
    /// logger's very first line.
    fn wake_if_full(&self, lines: MutexGuard<'_, String>) {
        let b = &*self.buffer;
        let full = lines.len() > b.settings.min_size
            || (!b.started.load(Ordering::Relaxed) && !b.started.swap(true, Ordering::AcqRel));
        drop(lines);
        // Waking the flusher is an atomic flag and a futex wake: it never waits.
        if full && !b.urgent.swap(true, Ordering::AcqRel) {
            b.flusher.unpark();
        }
    }

    /// Renders one line into the calling thread's buffer; never writes to the sink.
    fn log(&self, record: &LogRecord) {
        let mut lines = lock(&self.shard().0);
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
            CompiledFormat::Lines => return,
        }
        self.wake_if_full(lines);
    }
}

impl Drop for FileLogger {
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
    fn open(path: &str) -> std::io::Result<Sink> {
        Ok(match path {
            "/dev/stdout" => Sink::Stdout,
            "/dev/stderr" => Sink::Stderr,
            _ => Sink::File {
                file: OpenOptions::new().create(true).append(true).open(path)?,
                path: path.to_string(),
            },
        })
    }

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
        AccessLogger::open(&config, AccessLogOptions { workers, flush }, None).unwrap()
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
                    crate::per_worker::enter(t);
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
                crate::per_worker::enter(0);
                // The first line wakes the flusher (written at once, as Envoy
                // does); the next four are just past 1 KiB: the worker wakes it
                // again, whenever the first flush took its line.
                for n in 0..5 {
                    logger.log(&record(format!("/{n}")));
                }
            }
        })
        .join()
        .unwrap();
        assert_eq!(wait_lines(&path, 5).len(), 5);
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
