//! The Python filter bridge: implements the core's filter traits by queueing jobs
//! for the Python executor thread (`envoyx.filters._Runtime`).
//!
//! A tokio worker calling a hook pushes a [`PendingJob`] onto one process-wide queue,
//! signals an eventfd if the executor is not already woken, and awaits a oneshot
//! answer — it never takes the GIL. The executor's asyncio loop watches the eventfd;
//! woken, it drains the queue (`run_filter_jobs()`), each job becoming a [`FilterJob`].
//! The headers phases of a request without route overrides run their sync hooks
//! from here (no Python dispatcher frame per job); every other job, and a hook that
//! returns something or raises, goes on in the Python runtime, which answers it.
//! (An eventfd, not a socket pair: a signal is a counter increment, not a buffer
//! allocation.)

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use envoyx_core::access_log::LogRecord;
use envoyx_core::config::HttpFilterSpec;
use envoyx_core::http::filter::{
    ActiveFilter, FilterChain, FilterFactory, FilterInfo, FilterPlan, FilterStream, HookCall,
    HookOutcome, HookReply, Hooks, Phase, StreamStart,
};
use envoyx_core::stats::{self, Metric, MetricKind};
use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use nix::sys::eventfd::{EfdFlags, EventFd};
use pyo3::exceptions::{PyKeyError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------
// The queue between tokio workers and the executor thread.

struct PendingJob {
    stream: Arc<PyStream>,
    work: Work,
}

// Unboxed: jobs move through the queue's reused buffers, and a box per call would
// be a malloc on the worker and a free on the executor (glibc's slow cross-thread
// path).
#[allow(clippy::large_enum_variant)]
enum Work {
    Hook(HookCall, HookReply),
    Log(Box<LogRecord>),
}

struct Queue {
    jobs: Mutex<Vec<PendingJob>>,
    /// The executor's buffer, swapped with `jobs` on each drain: both keep their
    /// capacity, so that a burst of pushes does not grow a fresh Vec each time.
    spare: Mutex<Vec<PendingJob>>,
    /// Set while a signal is unread: a burst of jobs costs one write.
    woken: AtomicBool,
    wake: EventFd,
}

static QUEUE: LazyLock<Queue> = LazyLock::new(|| Queue {
    jobs: Mutex::new(Vec::new()),
    spare: Mutex::new(Vec::new()),
    woken: AtomicBool::new(false),
    wake: EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
        .expect("eventfd for the filter executor"),
});

impl Queue {
    fn push(&self, job: PendingJob) {
        lock(&self.jobs).push(job);
        if !self.woken.swap(true, Ordering::AcqRel) {
            // Fails only on counter overflow, which a pending signal makes harmless.
            let _ = self.wake.write(1);
        }
    }

    /// Runs `each` on every queued job (the executor, when woken).
    fn drain(&self, mut each: impl FnMut(PendingJob)) {
        // Resets the counter (EAGAIN when it is already 0).
        let _ = self.wake.read();
        // Cleared before taking the jobs: a job pushed after the take signals again.
        self.woken.store(false, Ordering::Release);
        // Only the executor drains: `spare` is never contended.
        let mut batch = lock(&self.spare);
        std::mem::swap(&mut *lock(&self.jobs), &mut *batch);
        batch.drain(..).for_each(&mut each);
    }
}

/// The file descriptor the executor's loop watches for queued jobs (an eventfd).
#[pyfunction]
pub fn filter_wakeup_fd() -> i32 {
    QUEUE.wake.as_fd().as_raw_fd()
}

// ---------------------------------------------------------------------------------
// The executor's dispatch: the headers phases of a plan without route overrides run
// their sync hooks from here; everything else (bodies, trailers, log, overrides, a
// hook that returns something or raises) goes to the Python runtime.

/// The Python runtime's entry points (`envoyx.filters`), given once.
struct Dispatch {
    /// `_new_context(stream, headers) -> RequestContext`
    new_context: Py<PyAny>,
    /// `_run_job(job)`: runs a job entirely in Python; never raises.
    run_job: Py<PyAny>,
    /// `_resume(job, phase, ctx, position, result)`: a hook returned `result`.
    resume: Py<PyAny>,
    /// `_raised(job, ctx, index, exc)`: filter `index`'s hook raised `exc`.
    raised: Py<PyAny>,
    /// `_runtime_failed(job, exc)`: the runtime itself failed on a job.
    runtime_failed: Py<PyAny>,
    /// `RequestContext._cluster` while no filter chose a cluster.
    unset: Py<PyAny>,
}

static DISPATCH: PyOnceLock<Dispatch> = PyOnceLock::new();

/// Registers the Python runtime's entry points (the first registration stays).
#[pyfunction]
pub fn filter_dispatch(
    py: Python<'_>,
    new_context: Py<PyAny>,
    run_job: Py<PyAny>,
    resume: Py<PyAny>,
    raised: Py<PyAny>,
    runtime_failed: Py<PyAny>,
    unset: Py<PyAny>,
) {
    DISPATCH.get_or_init(py, || Dispatch {
        new_context,
        run_job,
        resume,
        raised,
        runtime_failed,
        unset,
    });
}

/// Runs every queued job (called by the executor when woken).
#[pyfunction]
pub fn run_filter_jobs(py: Python<'_>) -> PyResult<()> {
    let Some(d) = DISPATCH.get(py) else {
        return Err(PyValueError::new_err("filter_dispatch() was not called"));
    };
    // A job the runtime could not even fail is dropped: its worker sees the
    // answer channel close and fails the request. The others still run.
    let mut first_error = None;
    QUEUE.drain(|pending| {
        if let Err(e) = run_job(py, d, pending) {
            first_error.get_or_insert(e);
        }
    });
    first_error.map_or(Ok(()), Err)
}

fn run_job(py: Python<'_>, d: &Dispatch, pending: PendingJob) -> PyResult<()> {
    let job = FilterJob::new(py, pending)?;
    let fast = job.log.is_none()
        && (job.phase == Phase::RequestHeaders as u8 || job.phase == Phase::ResponseHeaders as u8)
        && job.stream.info.start.active.is_none();
    if !fast {
        d.run_job.call1(py, (Py::new(py, job)?,))?;
        return Ok(());
    }
    let failed = match run_headers_phase(py, d, &job) {
        Ok(Next::Done) => return Ok(()),
        Ok(Next::Resume((ctx, position, result))) => {
            let job = Py::new(py, job)?;
            let phase = job.get().phase;
            match d.resume.call1(py, (&job, phase, ctx, position, result)) {
                Ok(_) => return Ok(()),
                Err(e) => (job, e),
            }
        }
        Ok(Next::Raised(ctx, index, e)) => {
            let job = Py::new(py, job)?;
            match d.raised.call1(py, (&job, ctx, index, e.into_value(py))) {
                Ok(_) => return Ok(()),
                Err(e) => (job, e),
            }
        }
        Err(e) => (Py::new(py, job)?, e),
    };
    let (job, e) = failed;
    d.runtime_failed.call1(py, (job, e.into_value(py)))?;
    Ok(())
}

enum Next<'py> {
    /// Every hook returned None: the job is answered.
    Done,
    /// A hook returned something else: `(ctx, position in the phase's order, result)`.
    Resume((Bound<'py, PyAny>, usize, Bound<'py, PyAny>)),
    /// Filter `index`'s hook raised.
    Raised(Bound<'py, PyAny>, usize, PyErr),
}

/// A request- or response-headers phase of the chain's default plan: each filter's
/// hook in order (response hooks in reverse, as Envoy's encoder filters run).
fn run_headers_phase<'py>(py: Python<'py>, d: &Dispatch, job: &FilterJob) -> PyResult<Next<'py>> {
    let request = job.phase == Phase::RequestHeaders as u8;
    let headers = job.headers.as_ref().map(|h| h.bind(py));
    let existing = lock(&job.stream.context)
        .as_ref()
        .map(|c| c.bind(py).clone());
    let ctx = match existing {
        Some(ctx) => ctx,
        None => {
            let info = Bound::new(py, StreamInfo(job.stream.info.clone()))?;
            let first = if request { headers.cloned() } else { None };
            let ctx = d.new_context.bind(py).call1((info, first))?;
            *lock(&job.stream.context) = Some(ctx.clone().unbind());
            ctx
        }
    };
    if !request {
        ctx.setattr(pyo3::intern!(py, "status"), job.status)?;
        ctx.setattr(pyo3::intern!(py, "response_headers"), headers)?;
    }
    let chain = &job.stream.info.chain;
    let hooks = &chain.by_phase[job.phase as usize];
    let n = hooks.len();
    for position in 0..n {
        let index = if request { position } else { n - 1 - position };
        let Some(hook) = &hooks[index] else { continue };
        ctx.setattr(pyo3::intern!(py, "config"), &chain.configs[index])?;
        match hook.bind(py).call1((&ctx,)) {
            Ok(result) if result.is_none() => {}
            Ok(result) => return Ok(Next::Resume((ctx, position, result))),
            Err(e) => return Ok(Next::Raised(ctx, index, e)),
        }
    }
    let cluster = if request {
        let chosen = ctx.getattr(pyo3::intern!(py, "_cluster"))?;
        if chosen.is(d.unset.bind(py)) {
            None
        } else {
            chosen.extract::<Option<String>>()?
        }
    } else {
        None
    };
    job.finish(py, None, cluster);
    Ok(Next::Done)
}

// ---------------------------------------------------------------------------------
// Chains and streams: the core's traits.

/// Builds chains by calling `envoyx.filters.build_chain` (through the callable the
/// Python `Server` gives, which knows the `filters=` objects).
pub struct PyFilterFactory {
    build: Py<PyAny>,
}

impl PyFilterFactory {
    pub fn new(build: Py<PyAny>) -> Self {
        PyFilterFactory { build }
    }
}

impl FilterFactory for PyFilterFactory {
    fn build(
        &self,
        specs: &[HttpFilterSpec],
        store: &Arc<stats::StatStore>,
    ) -> Result<Arc<dyn FilterChain>, Vec<String>> {
        let json = serde_json::Value::Array(
            specs
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "name": s.name, "path": s.path, "module": s.module,
                        "class": s.class, "object": s.object, "config": s.config,
                    })
                })
                .collect(),
        )
        .to_string();
        let first_path = specs.first().map_or("", |s| s.path.as_str());
        Python::attach(|py| {
            let store = Py::new(py, StatStore(store.clone())).map_err(|e| vec![e.to_string()])?;
            let chain = self
                .build
                .call1(py, (json, store))
                .map_err(|e| python_errors(py, &e, first_path))?;
            let masks: Vec<u8> = chain
                .getattr(py, "masks")
                .and_then(|m| m.extract(py))
                .map_err(|e| vec![format!("{first_path}: {e}")])?;
            let filters: Vec<FilterInfo> = specs
                .iter()
                .zip(masks)
                .map(|(s, mask)| FilterInfo {
                    name: s.name.clone(),
                    hooks: Hooks(mask),
                    settings: s.settings,
                })
                .collect();
            let timeouts = specs
                .iter()
                .map(|s| s.settings.timeout.as_secs_f64())
                .collect();
            let by_phase: Vec<Vec<Option<Py<PyAny>>>> = chain
                .getattr(py, "by_phase")
                .and_then(|m| m.extract(py))
                .map_err(|e| vec![format!("{first_path}: {e}")])?;
            let configs: Vec<Py<PyAny>> = chain
                .getattr(py, "configs")
                .and_then(|m| m.extract(py))
                .map_err(|e| vec![format!("{first_path}: {e}")])?;
            let plan = FilterPlan::compile(&filters, None);
            Ok(Arc::new(PyChain {
                filters,
                plan,
                shared: Arc::new(ChainShared {
                    chain,
                    timeouts,
                    by_phase,
                    configs,
                    default_order: PyOnceLock::new(),
                }),
            }) as Arc<dyn FilterChain>)
        })
    }
}

/// A `ValueError` from `build_chain` carries one "<path>: <problem>" per line.
fn python_errors(py: Python<'_>, e: &PyErr, path: &str) -> Vec<String> {
    if e.is_instance_of::<PyValueError>(py) {
        let text = e.value(py).to_string();
        return text.lines().map(str::to_string).collect();
    }
    vec![format!("{path}: {e}")]
}

struct PyChain {
    filters: Vec<FilterInfo>,
    /// Every filter, no route override: the plan of most requests.
    plan: Option<FilterPlan>,
    /// In an Arc so that a worker starting a stream clones it without the GIL.
    shared: Arc<ChainShared>,
}

struct ChainShared {
    /// The Python `_Chain` (filter instances and their hooks).
    chain: Py<PyAny>,
    /// Each filter's timeout in seconds, for `async def` hooks.
    timeouts: Vec<f64>,
    /// `by_phase[phase][index]`: filter `index`'s hook for `phase`, if it has one.
    by_phase: Vec<Vec<Option<Py<PyAny>>>>,
    /// Each filter's config (`ctx.config` while its hooks run).
    configs: Vec<Py<PyAny>>,
    /// The default plan's active filters as Python sees them, made once.
    default_order: PyOnceLock<Py<PyTuple>>,
}

impl FilterChain for PyChain {
    fn filters(&self) -> &[FilterInfo] {
        &self.filters
    }

    fn default_plan(&self) -> Option<&FilterPlan> {
        self.plan.as_ref()
    }

    fn start(&self, start: StreamStart) -> Arc<dyn FilterStream> {
        Arc::new(PyStream {
            info: Arc::new(RequestInfo {
                chain: self.shared.clone(),
                start,
            }),
            context: Mutex::new(None),
        })
    }
}

/// One request's state on the Python side.
struct PyStream {
    /// Apart from the context: the context holds it (as `StreamInfo`), and a
    /// context holding its own holder would never be freed.
    info: Arc<RequestInfo>,
    /// The `RequestContext`, made by the executor on the first job. Dropped without
    /// the GIL when the request ends; pyo3 defers the decref to the next GIL holder.
    context: Mutex<Option<Py<PyAny>>>,
}

/// The request as routed, and its chain.
struct RequestInfo {
    chain: Arc<ChainShared>,
    start: StreamStart,
}

impl FilterStream for PyStream {
    fn call(self: Arc<Self>, call: HookCall, reply: HookReply) {
        QUEUE.push(PendingJob {
            stream: self,
            work: Work::Hook(call, reply),
        });
    }

    fn log(self: Arc<Self>, record: LogRecord) {
        QUEUE.push(PendingJob {
            stream: self,
            work: Work::Log(Box::new(record)),
        });
    }
}

// ---------------------------------------------------------------------------------
// What Python sees.

/// One hook phase of one request, as the executor runs it.
#[pyclass(module = "envoyx._core", frozen)]
pub struct FilterJob {
    stream: Arc<PyStream>,
    phase: u8,
    status: u16,
    headers: Option<Py<Headers>>,
    message_headers: Option<Py<Headers>>,
    body: Option<Bytes>,
    log: Option<Box<LogRecord>>,
    reply: Mutex<Option<HookReply>>,
}

impl FilterJob {
    fn new(py: Python<'_>, job: PendingJob) -> PyResult<Self> {
        let wrap = |h: Option<HeaderMap>| -> PyResult<Option<Py<Headers>>> {
            h.map(|map| Py::new(py, Headers::from(map))).transpose()
        };
        Ok(match job.work {
            Work::Hook(call, reply) => FilterJob {
                stream: job.stream,
                phase: call.phase as u8,
                status: call.status,
                headers: wrap(call.headers)?,
                message_headers: wrap(call.message_headers)?,
                body: call.body,
                log: None,
                reply: Mutex::new(Some(reply)),
            },
            Work::Log(record) => FilterJob {
                stream: job.stream,
                phase: Phase::Log as u8,
                status: record.response_code,
                headers: None,
                message_headers: None,
                body: None,
                log: Some(record),
                reply: Mutex::new(None),
            },
        })
    }

    /// Continue (see `done`).
    fn finish(&self, py: Python<'_>, body: Option<Bytes>, cluster: Option<String>) {
        let hooks = self.stream.info.start.hooks;
        let keep = match self.phase {
            p if p == Phase::RequestHeaders as u8 => hooks.any_after(Phase::RequestHeaders),
            p if p == Phase::ResponseHeaders as u8 => hooks.any_after(Phase::ResponseHeaders),
            _ => false,
        };
        let headers = self.headers.as_ref().map(|h| {
            let mut h = h.borrow_mut(py);
            if keep {
                h.map.clone()
            } else {
                std::mem::take(&mut h.map)
            }
        });
        self.answer(HookOutcome::Continue {
            headers,
            body,
            cluster,
        });
    }

    fn answer(&self, outcome: HookOutcome) {
        if let Some(reply) = lock(&self.reply).take() {
            reply.send(outcome);
        }
    }
}

#[pymethods]
impl FilterJob {
    /// The phase number (0 request headers .. 6 log).
    #[getter]
    fn phase(&self) -> u8 {
        self.phase
    }

    /// `(phase, context)`: what the dispatcher reads first, in one call. The
    /// context is None before the request's first job made it.
    #[getter]
    fn state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let context = lock(&self.stream.context).as_ref().map(|c| c.clone_ref(py));
        (self.phase, context).into_pyobject(py)
    }

    /// The request's `RequestContext`, None before the first job made it.
    #[getter]
    fn get_context(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        lock(&self.stream.context).as_ref().map(|c| c.clone_ref(py))
    }

    #[setter]
    fn set_context(&self, context: Py<PyAny>) {
        *lock(&self.stream.context) = Some(context);
    }

    /// The request as routed, read when a filter asks (`RequestContext` keeps it).
    #[getter]
    fn stream(&self) -> StreamInfo {
        StreamInfo(self.stream.info.clone())
    }

    /// The phase's headers (request or response headers, or trailers).
    #[getter]
    fn headers(&self, py: Python<'_>) -> Option<Py<Headers>> {
        self.headers.as_ref().map(|h| h.clone_ref(py))
    }

    /// In response body and trailers phases, the response headers if no
    /// response-headers hook had them.
    #[getter]
    fn message_headers(&self, py: Python<'_>) -> Option<Py<Headers>> {
        self.message_headers.as_ref().map(|h| h.clone_ref(py))
    }

    #[getter]
    fn status(&self) -> u16 {
        self.status
    }

    #[getter]
    fn body<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.body.as_ref().map(|b| PyBytes::new(py, b))
    }

    /// The timeout of the chain's filter `index`, in seconds.
    fn timeout_s(&self, index: usize) -> f64 {
        self.stream
            .info
            .chain
            .timeouts
            .get(index)
            .copied()
            .unwrap_or(1.0)
    }

    /// The finished request's fields (the log phase), as `LogEntry` takes them.
    fn log_fields<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let Some(r) = self.log.as_deref() else {
            return Ok(d);
        };
        let start = r
            .start
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        d.set_item("start_time", start)?;
        d.set_item("method", &r.method)?;
        d.set_item("path", &r.path)?;
        d.set_item("authority", &r.authority)?;
        d.set_item("protocol", r.protocol)?;
        d.set_item("response_code", r.response_code)?;
        d.set_item("response_flags", r.response_flags)?;
        d.set_item("response_code_details", r.response_code_details)?;
        d.set_item("bytes_received", r.bytes_received)?;
        d.set_item("bytes_sent", r.bytes_sent)?;
        d.set_item("duration_ms", r.duration.as_secs_f64() * 1000.0)?;
        d.set_item("upstream_host", r.upstream_host.map(|a| a.to_string()))?;
        d.set_item("upstream_cluster", r.upstream_cluster.as_deref())?;
        d.set_item(
            "route_name",
            (!r.route_name.is_empty()).then_some(r.route_name.as_str()),
        )?;
        d.set_item(
            "downstream_remote_address",
            r.downstream_remote.map(|a| a.to_string()),
        )?;
        Ok(d)
    }

    /// Continue: the phase's headers as the filters left them, the body (body
    /// phases) and the cluster chosen.
    ///
    /// The headers are moved to the proxy, not copied, unless a later hook of the
    /// request can still read them through its context (request headers then
    /// response hooks; response headers then response body, trailers or log hooks).
    /// Trailers are given to their hook only, never kept on the context.
    #[pyo3(signature = (body, cluster))]
    fn done(&self, py: Python<'_>, body: Option<Vec<u8>>, cluster: Option<String>) {
        self.finish(py, body.map(Bytes::from), cluster);
    }

    /// Answer the request locally. Raises ValueError, answering nothing, for a status
    /// outside [200, 599] or an invalid header (the caller then fails the job).
    fn reply(&self, status: u16, headers: Vec<(String, String)>, body: Vec<u8>) -> PyResult<()> {
        let checked = (|| {
            if !(200..=599).contains(&status) {
                return Err(format!("status {status} is not in [200, 599]"));
            }
            headers
                .iter()
                .map(|(n, v)| Ok((header_name(n)?, header_value(v)?)))
                .collect::<Result<Vec<_>, String>>()
        })();
        match checked {
            Ok(headers) => {
                self.answer(HookOutcome::LocalReply {
                    status,
                    headers,
                    body: Bytes::from(body),
                });
                Ok(())
            }
            Err(e) => Err(PyValueError::new_err(format!("invalid LocalReply: {e}"))),
        }
    }

    /// A hook of filter `filter` raised (it has been logged).
    fn fail(&self, filter: String) {
        self.answer(HookOutcome::Failed { filter });
    }

    /// A hook overran its timeout.
    fn timed_out(&self) {
        self.answer(HookOutcome::TimedOut);
    }
}

/// One request as routed (the `RequestContext`'s source for what it reads lazily).
#[pyclass(module = "envoyx._core", frozen)]
pub struct StreamInfo(Arc<RequestInfo>);

#[pymethods]
impl StreamInfo {
    /// The Python `_Chain` of the connection manager.
    #[getter]
    fn chain(&self, py: Python<'_>) -> Py<PyAny> {
        self.0.chain.chain.clone_ref(py)
    }

    #[getter]
    fn method(&self) -> &str {
        self.0.start.method.as_str()
    }

    #[getter]
    fn path(&self) -> &str {
        &self.0.start.path
    }

    #[getter]
    fn authority(&self) -> &str {
        &self.0.start.authority
    }

    #[getter]
    fn scheme(&self) -> &'static str {
        self.0.start.scheme
    }

    #[getter]
    fn downstream_address(&self) -> String {
        self.0.start.downstream.to_string()
    }

    /// The TLS client certificate's first URI SAN (None: no TLS or no certificate).
    #[getter]
    fn downstream_peer_identity(&self) -> Option<String> {
        let tls = self.0.start.tls.as_ref()?;
        tls.peer_identity().map(str::to_string)
    }

    #[getter]
    fn route_name(&self) -> Option<&str> {
        self.0.start.route_name.as_deref()
    }

    /// The route's cluster.
    #[getter]
    fn cluster(&self) -> Option<&str> {
        self.0.start.cluster.as_deref()
    }

    /// The active filters: `(index, route config override as JSON text or None)`,
    /// made once per chain for requests on routes without overrides.
    #[getter]
    fn order(&self, py: Python<'_>) -> PyResult<Py<PyTuple>> {
        let make = |active: &[ActiveFilter]| -> PyResult<Py<PyTuple>> {
            let items = active
                .iter()
                .map(|a| (a.index, a.config_override.as_deref()).into_pyobject(py))
                .collect::<PyResult<Vec<_>>>()?;
            Ok(PyTuple::new(py, items)?.unbind())
        };
        match &self.0.start.active {
            Some(active) => make(active),
            None => {
                let chain = &self.0.chain;
                let default = chain.default_order.get_or_try_init(py, || {
                    let all: Vec<ActiveFilter> = (0..chain.timeouts.len())
                        .map(|index| ActiveFilter {
                            index,
                            config_override: None,
                        })
                        .collect();
                    make(&all)
                })?;
                Ok(default.clone_ref(py))
            }
        }
    }

    /// The request headers when the chain has no request-headers hook (a copy).
    #[getter]
    fn start_headers(&self, py: Python<'_>) -> PyResult<Option<Py<Headers>>> {
        self.0
            .start
            .request_headers
            .as_ref()
            .map(|h| Py::new(py, Headers::from(h.clone())))
            .transpose()
    }
}

fn header_name(name: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("invalid header name {name:?}"))
}

fn header_value(value: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_bytes(value.as_bytes()).map_err(|_| format!("invalid header value {value:?}"))
}

/// A case-insensitive mutable mapping over the proxy's own header map: names are
/// lower-cased, a name may hold several values (`add`, `get_all`).
#[pyclass(module = "envoyx._core", mapping)]
pub struct Headers {
    map: HeaderMap,
}

impl From<HeaderMap> for Headers {
    fn from(map: HeaderMap) -> Self {
        Headers { map }
    }
}

fn text(v: &HeaderValue) -> String {
    String::from_utf8_lossy(v.as_bytes()).into_owned()
}

#[pymethods]
impl Headers {
    #[new]
    #[pyo3(signature = (items = None))]
    fn py_new(items: Option<Vec<(String, String)>>) -> PyResult<Self> {
        let mut h = Headers {
            map: HeaderMap::new(),
        };
        for (n, v) in items.unwrap_or_default() {
            h.add(&n, &v)?;
        }
        Ok(h)
    }

    fn __getitem__(&self, name: &str) -> PyResult<String> {
        self.map
            .get(name.to_ascii_lowercase().as_str())
            .map(text)
            .ok_or_else(|| PyKeyError::new_err(name.to_string()))
    }

    fn __setitem__(&mut self, name: &str, value: &str) -> PyResult<()> {
        let n = header_name(name).map_err(PyValueError::new_err)?;
        let v = header_value(value).map_err(PyValueError::new_err)?;
        self.map.insert(n, v);
        Ok(())
    }

    fn __delitem__(&mut self, name: &str) -> PyResult<()> {
        match self.map.remove(name.to_ascii_lowercase().as_str()) {
            Some(_) => Ok(()),
            None => Err(PyKeyError::new_err(name.to_string())),
        }
    }

    fn __contains__(&self, name: &str) -> bool {
        self.map.contains_key(name.to_ascii_lowercase().as_str())
    }

    /// The number of distinct names.
    fn __len__(&self) -> usize {
        self.map.keys_len()
    }

    fn __iter__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let names = PyList::new(py, self.map.keys().map(HeaderName::as_str))?;
        Ok(names.try_iter()?.into_any().unbind())
    }

    fn __repr__(&self) -> String {
        let items: Vec<String> = self
            .map
            .iter()
            .map(|(n, v)| format!("({:?}, {:?})", n.as_str(), text(v)))
            .collect();
        format!("Headers([{}])", items.join(", "))
    }

    /// The first value of `name`, or `default`.
    #[pyo3(signature = (name, default = None))]
    fn get(&self, name: &str, default: Option<String>) -> Option<String> {
        self.map
            .get(name.to_ascii_lowercase().as_str())
            .map(text)
            .or(default)
    }

    /// Every value of `name`, in order.
    fn get_all(&self, name: &str) -> Vec<String> {
        self.map
            .get_all(name.to_ascii_lowercase().as_str())
            .iter()
            .map(text)
            .collect()
    }

    /// Appends a value to `name` (keeps the existing ones).
    fn add(&mut self, name: &str, value: &str) -> PyResult<()> {
        let n = header_name(name).map_err(PyValueError::new_err)?;
        let v = header_value(value).map_err(PyValueError::new_err)?;
        self.map.append(n, v);
        Ok(())
    }

    /// Removes `name` and returns its first value, or `default`.
    #[pyo3(signature = (name, default = None))]
    fn pop(&mut self, name: &str, default: Option<String>) -> PyResult<String> {
        match self.map.remove(name.to_ascii_lowercase().as_str()) {
            Some(v) => Ok(text(&v)),
            None => default.ok_or_else(|| PyKeyError::new_err(name.to_string())),
        }
    }

    /// The distinct names.
    fn keys(&self) -> Vec<String> {
        self.map.keys().map(|n| n.as_str().to_string()).collect()
    }

    /// Every value (several per name when a name repeats).
    fn values(&self) -> Vec<String> {
        self.map.values().map(text).collect()
    }

    /// Every `(name, value)` pair (several per name when a name repeats).
    fn items(&self) -> Vec<(String, String)> {
        self.map
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), text(v)))
            .collect()
    }
}

// ---------------------------------------------------------------------------------
// Metrics declared from Python.

fn checked_name(name: &str) -> PyResult<String> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && !name.ends_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(format!("python.{name}"))
    } else {
        Err(PyValueError::new_err(format!(
            "invalid metric name {name:?}: use letters, digits, '_', '-' and '.'"
        )))
    }
}

fn checked_tags(tags: Vec<(String, String)>) -> PyResult<Vec<(String, String)>> {
    for (k, v) in &tags {
        let k_ok = !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !k_ok || v.is_empty() {
            return Err(PyValueError::new_err(format!(
                "invalid tag {k:?}={v:?}: names are letters, digits and '_'; values non-empty"
            )));
        }
    }
    Ok(tags)
}

/// The server's stat store, as filters declare stats in it (`python.` prefix).
#[pyclass(module = "envoyx._core", frozen)]
pub struct StatStore(Arc<stats::StatStore>);

#[pymethods]
impl StatStore {
    #[pyo3(signature = (name, tags = Vec::new()))]
    fn counter(&self, name: &str, tags: Vec<(String, String)>) -> PyResult<Counter> {
        match self.declare(MetricKind::Counter, name, tags)? {
            Metric::Counter(c) => Ok(Counter(c)),
            _ => unreachable!("StatStore::tagged returns the kind asked for"),
        }
    }

    #[pyo3(signature = (name, tags = Vec::new()))]
    fn gauge(&self, name: &str, tags: Vec<(String, String)>) -> PyResult<Gauge> {
        match self.declare(MetricKind::Gauge, name, tags)? {
            Metric::Gauge(g) => Ok(Gauge(g)),
            _ => unreachable!("StatStore::tagged returns the kind asked for"),
        }
    }

    #[pyo3(signature = (name, tags = Vec::new()))]
    fn histogram(&self, name: &str, tags: Vec<(String, String)>) -> PyResult<Histogram> {
        match self.declare(MetricKind::Histogram, name, tags)? {
            Metric::Histogram(h) => Ok(Histogram(h)),
            _ => unreachable!("StatStore::tagged returns the kind asked for"),
        }
    }
}

impl StatStore {
    /// A checked name and tags; a name another kind of stat has is a ValueError.
    fn declare(
        &self,
        kind: MetricKind,
        name: &str,
        tags: Vec<(String, String)>,
    ) -> PyResult<Metric> {
        self.0
            .tagged(kind, &checked_name(name)?, &checked_tags(tags)?)
            .map_err(|existing| {
                PyValueError::new_err(format!(
                    "python.{name} is already a {existing:?}, not a {kind:?}"
                ))
            })
    }
}

/// A counter in the proxy's stats (`/stats`, `/stats/prometheus`).
#[pyclass(module = "envoyx._core", frozen)]
pub struct Counter(stats::Counter);

#[pymethods]
impl Counter {
    #[pyo3(signature = (n = 1))]
    fn inc(&self, n: u64) {
        self.0.add(n);
    }

    #[getter]
    fn value(&self) -> u64 {
        self.0.get()
    }
}

/// A gauge in the proxy's stats.
#[pyclass(module = "envoyx._core", frozen)]
pub struct Gauge(stats::Gauge);

#[pymethods]
impl Gauge {
    fn set(&self, value: i64) {
        self.0.set(value);
    }

    #[pyo3(signature = (n = 1))]
    fn inc(&self, n: i64) {
        self.0.add(n);
    }

    #[pyo3(signature = (n = 1))]
    fn dec(&self, n: i64) {
        self.0.add(-n);
    }

    #[getter]
    fn value(&self) -> i64 {
        self.0.get()
    }
}

/// A histogram in the proxy's stats (Envoy's buckets; values are whole numbers,
/// conventionally milliseconds).
#[pyclass(module = "envoyx._core", frozen)]
pub struct Histogram(stats::Histogram);

#[pymethods]
impl Histogram {
    fn record(&self, value: u64) {
        self.0.record(value);
    }

    #[getter]
    fn count(&self) -> u64 {
        self.0.count()
    }
}
