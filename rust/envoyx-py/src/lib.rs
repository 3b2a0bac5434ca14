//! Python bindings for envoyx-core: a `Server` handle and config validation.
//!
//! No proxy logic lives here. Every call that may block (start, stop, wait) releases
//! the GIL; the core's threads never take it.

mod errors;
mod filters;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use envoyx_core::access_log::FlushSettings;
use envoyx_core::config::NetworkFilter;
use envoyx_core::http::filter::FilterFactory;
use envoyx_core::log::{self, Level};
use envoyx_core::server::ResourceKind;
use envoyx_core::{Server as CoreServer, ServerOptions};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use errors::to_py_err;

// The system allocator, not mimalloc: measured with 1000 idle keep-alive
// connections, mimalloc kept 27 KiB per connection against 21 KiB, for no CPU
// gain visible above noise (15.4 vs 16.0 us per request). See docs/benchmarks.md.

/// envoyx's version string.
#[pyfunction]
fn version() -> &'static str {
    envoyx_core::server::VERSION
}

/// Maps a canonical proto-JSON bootstrap; returns every error (empty when valid).
/// With a `filter_factory`, the Python filters of static listeners are built too
/// (modules imported, classes instantiated), as serving would.
#[pyfunction]
#[pyo3(signature = (bootstrap_json, filter_factory = None))]
fn validate(
    py: Python<'_>,
    bootstrap_json: &str,
    filter_factory: Option<Py<PyAny>>,
) -> Vec<String> {
    py.detach(|| match envoyx_core::load_bootstrap(bootstrap_json) {
        Ok(bootstrap) => {
            let Some(factory) = filter_factory.map(filters::PyFilterFactory::new) else {
                return Vec::new();
            };
            let store = envoyx_core::stats::StatStore::new();
            bootstrap
                .listeners
                .iter()
                .flat_map(|l| l.chains())
                .filter_map(|c| match &c.filter {
                    NetworkFilter::Http(hcm) if !hcm.http_filters.is_empty() => {
                        factory.build(&hcm.http_filters, &store).err()
                    }
                    _ => None,
                })
                .flatten()
                .collect()
        }
        Err(envoyx_core::Error::Config(errors)) => errors,
        Err(e) => vec![e.to_string()],
    })
}

/// The mapped configuration in Rust's `Debug` form (tests compare two documents' effect).
#[pyfunction]
fn describe(py: Python<'_>, kind: &str, json: &str) -> PyResult<String> {
    py.detach(|| envoyx_core::describe(kind, json))
        .map_err(to_py_err)
}

/// Nanoseconds per route lookup and the cluster matched (micro-benchmark hook).
#[pyfunction]
#[pyo3(signature = (bootstrap_json, listener, authority, path, iterations = 100_000))]
fn route_match(
    py: Python<'_>,
    bootstrap_json: &str,
    listener: &str,
    authority: &str,
    path: &str,
    iterations: u64,
) -> PyResult<(f64, Option<String>)> {
    py.detach(|| envoyx_core::route_match_ns(bootstrap_json, listener, authority, path, iterations))
        .map_err(to_py_err)
}

#[pyclass(module = "envoyx._core", frozen)]
struct Server {
    inner: CoreServer,
}

#[pymethods]
impl Server {
    #[new]
    #[pyo3(signature = (bootstrap_json, *, concurrency = 0, drain_time_s = 600.0, log_level = "info", filter_factory = None, file_flush_interval_msec = 10000, file_flush_min_size_kb = 64))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        bootstrap_json: &str,
        concurrency: usize,
        drain_time_s: f64,
        log_level: &str,
        filter_factory: Option<Py<PyAny>>,
        file_flush_interval_msec: u64,
        file_flush_min_size_kb: usize,
    ) -> PyResult<Self> {
        let level = Level::parse(log_level)
            .ok_or_else(|| PyValueError::new_err(format!("unknown log level {log_level:?}")))?;
        if !(drain_time_s.is_finite() && drain_time_s >= 0.0) {
            return Err(PyValueError::new_err(
                "drain_time_s must be a non-negative number",
            ));
        }
        log::set_level(level);
        let mut options = ServerOptions {
            drain_time: Duration::from_secs_f64(drain_time_s),
            filter_factory: filter_factory
                .map(|f| Arc::new(filters::PyFilterFactory::new(f)) as Arc<dyn FilterFactory>),
            file_flush: FlushSettings {
                interval: Duration::from_millis(file_flush_interval_msec),
                min_size: file_flush_min_size_kb.saturating_mul(1024),
            },
            ..ServerOptions::default()
        };
        if concurrency > 0 {
            options.concurrency = concurrency;
        }
        let inner = py
            .detach(|| {
                let bootstrap = envoyx_core::load_bootstrap(bootstrap_json)?;
                CoreServer::new(bootstrap, options)
            })
            .map_err(to_py_err)?;
        Ok(Server { inner })
    }

    #[pyo3(signature = (*, live = true))]
    fn start(&self, py: Python<'_>, live: bool) -> PyResult<()> {
        py.detach(|| self.inner.start_with(live)).map_err(to_py_err)
    }

    fn mark_live(&self) {
        self.inner.mark_live();
    }

    fn stop(&self, py: Python<'_>) {
        py.detach(|| self.inner.stop());
    }

    fn drain(&self, py: Python<'_>) {
        py.detach(|| self.inner.drain());
    }

    #[pyo3(signature = (timeout = None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let timeout = match timeout {
            Some(t) if !(t.is_finite() && t >= 0.0) => {
                return Err(PyValueError::new_err(
                    "timeout must be a non-negative number",
                ));
            }
            Some(t) => Some(Duration::from_secs_f64(t)),
            None => None,
        };
        Ok(py.detach(|| self.inner.wait(timeout)))
    }

    #[getter]
    fn running(&self) -> bool {
        self.inner.running()
    }

    // Every method below may wait for a lock of the core; each releases the GIL
    // first (DESIGN.md §2: a thread holding the GIL never waits on the core).

    fn stats(&self, py: Python<'_>) -> HashMap<String, i64> {
        py.detach(|| {
            let instance = self.inner.instance();
            instance.refresh_gauges();
            instance.store.values().into_iter().collect()
        })
    }

    fn config_dump(&self, py: Python<'_>) -> String {
        py.detach(|| envoyx_core::admin::config_dump(self.inner.instance()).to_string())
    }

    fn listener_addresses(&self, py: Python<'_>) -> HashMap<String, (String, u16)> {
        py.detach(|| {
            self.inner
                .listener_addresses()
                .into_iter()
                .map(|(name, a)| (name, (a.ip().to_string(), a.port())))
                .collect()
        })
    }

    fn admin_address(&self, py: Python<'_>) -> Option<(String, u16)> {
        py.detach(|| {
            self.inner
                .admin_address()
                .map(|a| (a.ip().to_string(), a.port()))
        })
    }

    fn apply(
        &self,
        py: Python<'_>,
        type_url: &str,
        resources: Vec<(String, String)>,
        removed: Vec<String>,
        version_info: &str,
    ) -> PyResult<Vec<(String, String)>> {
        let kind = resource_kind(type_url)?;
        py.detach(|| self.inner.apply(kind, resources, &removed, version_info))
            .map_err(to_py_err)
    }

    fn wanted_resources(&self, py: Python<'_>, type_url: &str) -> PyResult<Vec<String>> {
        let kind = resource_kind(type_url)?;
        Ok(py.detach(|| self.inner.instance().wanted_resources(kind)))
    }

    fn counter_add(&self, py: Python<'_>, name: &str, value: u64) {
        py.detach(|| self.inner.instance().store.counter(name).add(value));
    }

    fn gauge_set(&self, py: Python<'_>, name: &str, value: i64) {
        py.detach(|| self.inner.instance().store.gauge(name).set(value));
    }
}

fn resource_kind(type_url: &str) -> PyResult<ResourceKind> {
    ResourceKind::from_type_url(type_url).ok_or_else(|| {
        PyValueError::new_err(format!(
            "envoyx does not apply resources of type {type_url}"
        ))
    })
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add_function(wrap_pyfunction!(validate, m)?)?;
    m.add_function(wrap_pyfunction!(describe, m)?)?;
    m.add_function(wrap_pyfunction!(route_match, m)?)?;
    m.add_class::<Server>()?;
    m.add_function(wrap_pyfunction!(filters::filter_wakeup_fd, m)?)?;
    m.add_function(wrap_pyfunction!(filters::filter_dispatch, m)?)?;
    m.add_function(wrap_pyfunction!(filters::run_filter_jobs, m)?)?;
    m.add_class::<filters::FilterJob>()?;
    m.add_class::<filters::StreamInfo>()?;
    m.add_class::<filters::Headers>()?;
    m.add_class::<filters::StatStore>()?;
    m.add_class::<filters::Counter>()?;
    m.add_class::<filters::Gauge>()?;
    m.add_class::<filters::Histogram>()?;
    Ok(())
}
