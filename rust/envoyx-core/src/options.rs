//! The server's command-line options (Envoy's `Server::Options`).

use std::sync::Arc;
use std::time::Duration;

use crate::access_log::FlushSettings;
use crate::http::filter::FilterFactory;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Clone)]
pub struct ServerOptions {
    /// `--concurrency`: number of workers (at least 1).
    pub concurrency: usize,
    /// `--drain-time-s`: how long in-flight requests may take once stop begins.
    pub drain_time: Duration,
    /// Builds the chains of `envoyx.filters.http.python` filters (the Python
    /// bindings give one); without it such filters are a configuration error.
    pub filter_factory: Option<Arc<dyn FilterFactory>>,
    /// `--file-flush-interval-msec` and `--file-flush-min-size-kb`: when access
    /// logs write their buffered lines.
    pub file_flush: FlushSettings,
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("concurrency", &self.concurrency)
            .field("drain_time", &self.drain_time)
            .field("filter_factory", &self.filter_factory.is_some())
            .field("file_flush", &self.file_flush)
            .finish()
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            concurrency: std::thread::available_parallelism().map_or(1, |n| n.get()),
            drain_time: Duration::from_secs(600),
            filter_factory: None,
            file_flush: FlushSettings::default(),
        }
    }
}
