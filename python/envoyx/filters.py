"""Python HTTP filters: the :class:`Filter` base class and the runtime that runs it.

A filter is a subclass of :class:`Filter` overriding any of its hooks, sync or
``async def``. It is named in Envoy config as an HTTP filter whose ``typed_config`` is an
``xds.type.v3.TypedStruct`` with ``type_url: envoyx.filters.http.python`` (see
docs/filters.md), or attached from Python with ``envoyx.Server(config, filters={...})``.

How it runs: the core (Rust) queues one job per hook phase of a request whose route has
Python filters and wakes the executor thread through a file descriptor. That thread runs
an asyncio loop: sync hooks run inline, ``async def`` hooks as tasks on the same loop with
the filter's timeout. The core's tokio workers never wait for the GIL; they await the job's
answer.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import logging
import threading
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Mapping, MutableMapping
from dataclasses import dataclass, field
from time import monotonic as _monotonic
from types import CoroutineType
from typing import Any, ClassVar, TypeAlias, TypeVar

from envoyx import _core
from envoyx._core import Headers

__all__ = [
    "Counter",
    "Filter",
    "Gauge",
    "Headers",
    "Histogram",
    "LocalReply",
    "LogEntry",
    "Metrics",
    "RequestContext",
]

log = logging.getLogger("envoyx.filters")

Counter = _core.Counter
Gauge = _core.Gauge
Histogram = _core.Histogram

# collections.abc checks (isinstance(h, MutableMapping)) hold for the native mapping.
MutableMapping.register(Headers)

# Hook phases, in the core's numbering (rust/envoyx-core/src/http/filter.rs).
REQUEST_HEADERS, REQUEST_BODY, REQUEST_TRAILERS = 0, 1, 2
RESPONSE_HEADERS, RESPONSE_BODY, RESPONSE_TRAILERS = 3, 4, 5
LOG = 6
_HOOK_NAMES = (
    "on_request_headers",
    "on_request_body",
    "on_request_trailers",
    "on_response_headers",
    "on_response_body",
    "on_response_trailers",
    "on_log",
)


@dataclass(frozen=True, slots=True)
class LocalReply:
    """Answer the request from the proxy: ``status``, ``body`` and extra ``headers``."""

    status: int
    body: bytes | str = b""
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.status, int) or not 200 <= self.status <= 599:
            raise ValueError(f"LocalReply status must be an int in [200, 599], got {self.status!r}")


@dataclass(frozen=True, slots=True)
class LogEntry:
    """A finished request, as Envoy's access log command operators describe it."""

    start_time: float
    method: str
    path: str
    authority: str
    protocol: str
    response_code: int
    response_flags: str
    response_code_details: str
    bytes_received: int
    bytes_sent: int
    duration_ms: float
    upstream_host: str | None
    upstream_cluster: str | None
    route_name: str | None
    downstream_remote_address: str | None


class Metrics:
    """Stats declared by a filter; they appear beside Envoy's in ``/stats`` and
    ``/stats/prometheus`` as ``python.<name>[.<tag>.<value>...]``."""

    __slots__ = ("_store",)

    def __init__(self, store: _core.StatStore) -> None:
        self._store = store

    def counter(self, name: str, tags: Mapping[str, str] | None = None) -> Counter:
        return self._store.counter(name, _tags(tags))

    def gauge(self, name: str, tags: Mapping[str, str] | None = None) -> Gauge:
        return self._store.gauge(name, _tags(tags))

    def histogram(self, name: str, tags: Mapping[str, str] | None = None) -> Histogram:
        return self._store.histogram(name, _tags(tags))


def _tags(tags: Mapping[str, str] | None) -> list[tuple[str, str]]:
    return [(str(k), str(v)) for k, v in (tags or {}).items()]


_UNSET: Any = object()


class RequestContext:
    """One request as the filters see it; shared by every hook and filter of it.

    What the request arrived with (``method``, ``path``, ``authority``, ``scheme``,
    ``downstream_address``, ``downstream_peer_identity``, ``route_name``) is read from
    the proxy when a filter first asks for it; ``state`` is made on first use.
    """

    __slots__ = (
        "_chain",
        "_cluster",
        "_order",
        "_reverse",
        "_state",
        "_stream",
        "_task",
        "config",
        "request_headers",
        "response_headers",
        "status",
    )

    request_headers: Headers
    response_headers: Headers | None
    status: int | None
    config: Any
    _stream: _core.StreamInfo
    _chain: _Chain
    _cluster: str | None
    _state: dict[str, Any] | None
    # The active filters (index, route override) in request and in response order.
    _order: tuple[tuple[int, str | None], ...]
    _reverse: tuple[tuple[int, str | None], ...]
    # The request's running async hook (kept here: the loop holds tasks weakly).
    _task: asyncio.Task[None] | None

    @property
    def method(self) -> str:
        return self._stream.method

    @property
    def path(self) -> str:
        return self._stream.path

    @property
    def authority(self) -> str:
        return self._stream.authority

    @property
    def scheme(self) -> str:
        return self._stream.scheme

    @property
    def downstream_address(self) -> str | None:
        return self._stream.downstream_address

    @property
    def downstream_peer_identity(self) -> str | None:
        """The TLS client certificate's first URI SAN (a SPIFFE ID in a mesh)."""
        return self._stream.downstream_peer_identity

    @property
    def route_name(self) -> str | None:
        return self._stream.route_name

    @property
    def cluster(self) -> str | None:
        """The cluster the request goes to: the route's, unless a filter sets another."""
        cluster = self._cluster
        return self._stream.cluster if cluster is _UNSET else cluster

    @cluster.setter
    def cluster(self, value: str | None) -> None:
        self._cluster = value

    @property
    def state(self) -> dict[str, Any]:
        """Per-request data the filters share (a dict, empty at first)."""
        state = self._state
        if state is None:
            state = self._state = {}
        return state

    @state.setter
    def state(self, value: dict[str, Any]) -> None:
        self._state = value

    def __repr__(self) -> str:
        return f"<RequestContext {self.method} {self.authority}{self.path}>"


#: What a body hook may return (or an awaitable of it).
HookResult: TypeAlias = LocalReply | bytes | None

T = TypeVar("T")
#: A hook's result, or an awaitable of it for ``async def`` hooks.
MaybeAwaitable: TypeAlias = T | Awaitable[T]


class Filter:
    """Base class of Python HTTP filters: override the hooks you need.

    ``config`` is the ``config`` value of the filter's TypedStruct (any JSON value).
    ``metrics`` and ``name`` are set by envoyx before the first hook runs.
    """

    #: The ``name`` of the HTTP filter entry this instance runs as.
    name: str = ""
    metrics: Metrics

    def __init__(self, config: Any = None) -> None:
        self.config = config

    def on_request_headers(self, ctx: RequestContext) -> MaybeAwaitable[LocalReply | None]:
        return None

    def on_request_body(self, ctx: RequestContext, body: bytes) -> MaybeAwaitable[HookResult]:
        return None

    def on_request_trailers(
        self, ctx: RequestContext, trailers: Headers
    ) -> MaybeAwaitable[LocalReply | None]:
        return None

    def on_response_headers(self, ctx: RequestContext) -> MaybeAwaitable[LocalReply | None]:
        return None

    def on_response_body(self, ctx: RequestContext, body: bytes) -> MaybeAwaitable[HookResult]:
        return None

    def on_response_trailers(
        self, ctx: RequestContext, trailers: Headers
    ) -> MaybeAwaitable[LocalReply | None]:
        return None

    def on_log(self, ctx: RequestContext, entry: LogEntry) -> Awaitable[None] | None:
        return None


# ---------------------------------------------------------------------------------------
# The runtime side: building chains from config, and running jobs from the core.


@dataclass(slots=True)
class _Entry:
    name: str
    filter: Filter
    config: Any
    hooks: tuple[Callable[..., Any] | None, ...]


class _Chain:
    """The Python filters of one HTTP connection manager, in config order."""

    __slots__ = ("_override_cache", "_timeouts", "by_phase", "configs", "entries", "masks")

    def __init__(self, entries: list[_Entry]) -> None:
        self.entries = entries
        self.configs = [e.config for e in entries]
        #: by_phase[phase][index]: filter ``index``'s hook for ``phase``, or None.
        self.by_phase = [[e.hooks[p] for e in entries] for p in range(len(_HOOK_NAMES))]
        self.masks = [sum(1 << p for p, h in enumerate(e.hooks) if h is not None) for e in entries]
        self._override_cache: dict[str, Any] = {}
        self._timeouts: dict[int, float] = {}

    def timeout(self, job: _core.FilterJob, index: int) -> float:
        """Filter ``index``'s timeout in seconds (the core's settings), asked once."""
        try:
            return self._timeouts[index]
        except KeyError:
            value = self._timeouts[index] = job.timeout_s(index)
            return value

    def override(self, config_json: str) -> Any:
        """A route's config override (JSON text from the core), parsed once."""
        cache = self._override_cache
        try:
            return cache[config_json]
        except KeyError:
            value = cache[config_json] = _whole_numbers(json.loads(config_json))
            return value


def _whole_numbers(value: Any) -> Any:
    """A TypedStruct's numbers are doubles (google.protobuf.Struct): give back the
    ints a YAML or JSON config wrote (``403``, not ``403.0``)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


def build_chain(specs_json: str, store: _core.StatStore, objects: Mapping[str, Filter]) -> _Chain:
    """Imports and instantiates the filters of one HTTP connection manager.

    ``specs_json`` is the core's list of ``{name, path, module, class, object, config}``.
    Raises :class:`ValueError` with one ``"<path>: <problem>"`` line per bad filter.
    """
    errors: list[str] = []
    entries: list[_Entry] = []
    metrics = Metrics(store)
    for spec in json.loads(specs_json):
        path = spec["path"]
        config = _whole_numbers(spec.get("config"))
        instance: Filter | None = None
        if spec.get("object") is not None:
            key = spec["object"]
            found = objects.get(key)
            if found is None:
                given = "envoyx.Server(filters=...)"
                errors.append(f"{path}.object: no filter object {key!r} was given to {given}")
                continue
            instance = found
            if config is None:
                config = instance.config if hasattr(instance, "config") else None
        else:
            module_name, class_name = spec.get("module"), spec.get("class")
            try:
                module = importlib.import_module(module_name)
            except Exception as e:  # any import-time failure is a config error
                errors.append(f"{path}.module: cannot import {module_name!r}: {e!r}")
                continue
            cls = getattr(module, class_name, None)
            if not (isinstance(cls, type) and issubclass(cls, Filter)):
                errors.append(
                    f"{path}.class: {module_name}.{class_name} is not a subclass of "
                    "envoyx.filters.Filter"
                )
                continue
            try:
                # `metrics` and `name` exist before __init__ runs, so that it can
                # declare its stats.
                instance = cls.__new__(cls)
                instance.name = spec["name"]
                instance.metrics = metrics
                instance.__init__(config)  # type: ignore[misc]
            except Exception as e:
                errors.append(f"{path}.class: {module_name}.{class_name}({config!r}) raised {e!r}")
                continue
        if not isinstance(instance, Filter):
            errors.append(f"{path}.object: {instance!r} is not an envoyx.filters.Filter")
            continue
        instance.name = spec["name"]
        instance.metrics = metrics
        cls = type(instance)
        hooks = tuple(
            getattr(instance, name) if getattr(cls, name) is not getattr(Filter, name) else None
            for name in _HOOK_NAMES
        )
        entries.append(_Entry(spec["name"], instance, config, hooks))
    if errors:
        raise ValueError("\n".join(errors))
    _Runtime.get()  # the executor must be running before the first job
    return _Chain(entries)


class _Runtime:
    """The executor thread: an asyncio loop woken by the core when jobs are queued."""

    _instance: ClassVar[_Runtime | None] = None
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        global _loop, _deadlines
        self.loop = _loop = asyncio.new_event_loop()
        _deadlines = _Deadlines(self.loop)
        ready = threading.Event()
        self.thread = threading.Thread(
            target=self._run, args=(ready,), name="envoyx-python-filters", daemon=True
        )
        self.thread.start()
        ready.wait()

    @classmethod
    def get(cls) -> _Runtime:
        with cls._lock:
            if cls._instance is None:
                cls._instance = _Runtime()
            return cls._instance

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        _core.filter_dispatch(_new_context, _run_job, _resume, _raised, _runtime_failed, _UNSET)
        self.loop.add_reader(_core.filter_wakeup_fd(), self._wake)
        ready.set()
        self.loop.run_forever()

    @staticmethod
    def _wake() -> None:
        # The core runs the headers phases' sync hooks itself and calls back into
        # _run_job, _resume, _raised for the rest; every job gets an answer.
        try:
            _core.run_filter_jobs()
        except BaseException:  # never let the loop stop
            log.exception("envoyx: python filter runtime failed")


def _run_job(job: _core.FilterJob) -> None:
    """A job the core does not run itself (bodies, trailers, log, route overrides)."""
    try:
        _start_job(job)
    except BaseException as exc:  # never let one job stop the loop
        _runtime_failed(job, exc)


def _runtime_failed(job: _core.FilterJob, exc: BaseException) -> None:
    log.error("envoyx: python filter runtime failed on a job", exc_info=exc)
    job.fail("<runtime>")


def _resume(
    job: _core.FilterJob, phase: int, ctx: RequestContext, position: int, result: Any
) -> None:
    """A headers-phase hook run by the core returned ``result`` (not None): apply it
    and run the rest of the phase here."""
    chain = ctx._chain
    order = ctx._order if phase < RESPONSE_HEADERS else ctx._reverse
    if type(result) is CoroutineType or inspect.isawaitable(result):
        _start_async(job, phase, chain, order, position, ctx, None, result)
        return
    outcome = _apply(job, chain.entries[order[position][0]], result, None)
    if outcome is _STOP:
        return
    _run_phase(job, phase, chain, order, position + 1, ctx, outcome)  # type: ignore[arg-type]


def _raised(job: _core.FilterJob, ctx: RequestContext, index: int, exc: BaseException) -> None:
    """A headers-phase hook run by the core raised ``exc``."""
    if not isinstance(exc, Exception):
        _runtime_failed(job, exc)
        return
    entry = ctx._chain.entries[index]
    _log_failure(entry.name, _HOOK_NAMES[job.phase], exc)
    job.fail(entry.name)


def _new_context(stream: _core.StreamInfo, headers: Headers | None) -> RequestContext:
    """The request's context, made on its first job and kept by the core's stream;
    ``headers`` are the request headers when that job is the request-headers phase."""
    ctx = RequestContext()
    ctx._stream = stream
    ctx._chain = stream.chain
    ctx._cluster = _UNSET
    ctx._state = None
    ctx._task = None
    first = headers if headers is not None else stream.start_headers
    ctx.request_headers = first if first is not None else Headers()
    ctx.response_headers = None
    ctx.status = None
    ctx.config = None
    order = stream.order
    ctx._order = order
    # Response hooks run in reverse filter order, as Envoy's encoder filters do.
    ctx._reverse = order[::-1]
    return ctx


def _start_job(job: _core.FilterJob) -> None:
    phase, ctx = job.state
    if ctx is None:
        ctx = _new_context(job.stream, job.headers if phase == REQUEST_HEADERS else None)
        job.context = ctx
    if phase < RESPONSE_HEADERS:
        body = job.body if phase == REQUEST_BODY else None
        _run_phase(job, phase, ctx._chain, ctx._order, 0, ctx, body)
        return
    ctx.status = job.status
    if phase == RESPONSE_HEADERS:
        ctx.response_headers = job.headers
        _run_phase(job, phase, ctx._chain, ctx._reverse, 0, ctx, None)
        return
    if ctx.response_headers is None:
        ctx.response_headers = job.message_headers
    if phase == LOG:
        chain = ctx._chain
        entry = LogEntry(**job.log_fields())
        for index, override in ctx._order:
            _run_log(chain, index, override, ctx, entry)
        return
    body = job.body if phase == RESPONSE_BODY else None
    _run_phase(job, phase, ctx._chain, ctx._reverse, 0, ctx, body)


def _reply(job: _core.FilterJob, reply: LocalReply) -> None:
    body = reply.body.encode() if isinstance(reply.body, str) else bytes(reply.body)
    job.reply(reply.status, [(str(k), str(v)) for k, v in reply.headers.items()], body)


def _run_phase(
    job: _core.FilterJob,
    phase: int,
    chain: _Chain,
    order: tuple[tuple[int, str | None], ...],
    start: int,
    ctx: RequestContext,
    body: bytes | None,
) -> None:
    """Runs the phase's hooks from ``order[start]`` on, inline while they are sync; the
    first awaitable hands the rest of the phase to a task on this loop.

    This runs for every hook call of every filtered request: keep it lean."""
    hooks = chain.by_phase[phase]
    for i in range(start, len(order)):
        index, override = order[i]
        hook = hooks[index]
        if hook is None:
            continue
        ctx.config = chain.configs[index] if override is None else chain.override(override)
        try:
            if phase in (REQUEST_HEADERS, RESPONSE_HEADERS):
                result = hook(ctx)
            elif phase in (REQUEST_BODY, RESPONSE_BODY):
                result = hook(ctx, b"" if body is None else body)
            else:
                result = hook(ctx, job.headers)
        except Exception:
            _failed(job, chain.entries[index])
            return
        if result is None:
            continue
        if type(result) is CoroutineType or inspect.isawaitable(result):
            _start_async(job, phase, chain, order, i, ctx, body, result)
            return
        outcome = _apply(job, chain.entries[index], result, body)
        if outcome is _STOP:
            return
        body = outcome  # type: ignore[assignment]
    # Only request phases choose the cluster (None: the route's); a response phase
    # sends no string back.
    cluster = ctx._cluster if phase < RESPONSE_HEADERS else None
    job.done(body, None if cluster is _UNSET else cluster)


_STOP = object()


def _apply(job: _core.FilterJob, entry: _Entry, result: Any, body: bytes | None) -> object:
    """The body after a hook's result, or _STOP when the job has been answered."""
    if result is None:
        return body
    if isinstance(result, LocalReply):
        try:
            _reply(job, result)
        except Exception:  # an invalid header: the filter's error, as if it raised
            _failed(job, entry)
        return _STOP
    if isinstance(result, (bytes, bytearray, memoryview)) and job.phase in (
        REQUEST_BODY,
        RESPONSE_BODY,
    ):
        return bytes(result)
    try:
        raise TypeError(
            f"{type(entry.filter).__name__}.{_HOOK_NAMES[job.phase]} returned {result!r}; "
            "expected None or LocalReply"
            + (" or bytes" if job.phase in (REQUEST_BODY, RESPONSE_BODY) else "")
        )
    except TypeError:
        _failed(job, entry)
    return _STOP


def _start_async(
    job: _core.FilterJob,
    phase: int,
    chain: _Chain,
    order: tuple[tuple[int, str | None], ...],
    i: int,
    ctx: RequestContext,
    body: bytes | None,
    awaitable: Awaitable[Any],
) -> None:
    """Runs an async hook (and the rest of its phase) as a task, with the filter's
    timeout kept by the runtime's one deadline timer (no timer per call)."""
    timeout = chain.timeout(job, order[i][0])
    queue = _deadlines.queue(timeout)
    # asyncio.Task directly: the loop's create_task is a Python-level wrapper (our
    # loop has no task factory).
    task = _Task(_run_async(job, phase, chain, order, i, ctx, body, awaitable, queue), loop=_loop)
    # The loop holds tasks weakly; the context lives as long as the request.
    ctx._task = task
    _deadlines.add(queue, timeout, job, task)


async def _run_async(
    job: _core.FilterJob,
    phase: int,
    chain: _Chain,
    order: tuple[tuple[int, str | None], ...],
    i: int,
    ctx: RequestContext,
    body: bytes | None,
    awaitable: Awaitable[Any],
    queue: _DeadlineQueue,
) -> None:
    entry = chain.entries[order[i][0]]
    try:
        result = await awaitable
    except asyncio.CancelledError:
        if _deadlines.expired(job):
            job.timed_out()
            return
        raise
    except Exception:
        _failed(job, entry)
        return
    finally:
        if queue.pop(job, None) is None:
            _deadlines.forget(job)
    outcome = _apply(job, entry, result, body)
    if outcome is _STOP:
        return
    _run_phase(job, phase, chain, order, i + 1, ctx, outcome)  # type: ignore[arg-type]


#: Running async hooks with one timeout value: job -> (deadline, task), oldest first
#: (dicts keep insertion order).
_DeadlineQueue: TypeAlias = dict[_core.FilterJob, tuple[float, "asyncio.Task[None]"]]


class _Deadlines:
    """The timeouts of running async hooks, on one timer of the loop: jobs in the
    order their hook started, per timeout value (so deadlines come in order), the
    timer set for the earliest. A hook past its deadline has its task cancelled, as
    ``asyncio.timeout`` would, and its job answered ``timed_out``."""

    __slots__ = ("_expired", "_handle", "_loop", "_queues", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queues: dict[float, _DeadlineQueue] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._when = 0.0
        self._expired: set[_core.FilterJob] = set()

    def queue(self, timeout: float) -> _DeadlineQueue:
        queue = self._queues.get(timeout)
        if queue is None:
            queue = self._queues[timeout] = {}
        return queue

    def add(
        self, queue: _DeadlineQueue, timeout: float, job: _core.FilterJob, task: asyncio.Task[None]
    ) -> None:
        # The loop's clock (BaseEventLoop.time() is time.monotonic()).
        deadline = _monotonic() + timeout
        queue[job] = (deadline, task)
        if self._handle is None or deadline < self._when:
            if self._handle is not None:
                self._handle.cancel()
            self._when = deadline
            self._handle = self._loop.call_at(deadline, self._fire)

    def expired(self, job: _core.FilterJob) -> bool:
        """Whether the job's hook was cancelled for its timeout (asked once)."""
        if job in self._expired:
            self._expired.discard(job)
            return True
        return False

    def forget(self, job: _core.FilterJob) -> None:
        """A hook that swallowed its cancellation and ended anyway."""
        if self._expired:
            self._expired.discard(job)

    def _fire(self) -> None:
        self._handle = None
        now = self._loop.time()
        earliest: float | None = None
        for queue in self._queues.values():
            while queue:
                job, (deadline, task) = next(iter(queue.items()))
                if deadline > now:
                    if earliest is None or deadline < earliest:
                        earliest = deadline
                    break
                del queue[job]
                if not task.done():
                    self._expired.add(job)
                    task.cancel()
        if earliest is not None:
            self._when = earliest
            self._handle = self._loop.call_at(earliest, self._fire)


_Task = asyncio.Task
# The executor's loop and its deadlines, set once when the runtime starts (read on
# every async hook: no lookup through _Runtime and its lock).
_loop: asyncio.AbstractEventLoop
_deadlines: _Deadlines


def _failed(job: _core.FilterJob, entry: _Entry) -> None:
    _log_failure(entry.name, _HOOK_NAMES[job.phase], None)
    job.fail(entry.name)


def _run_log(
    chain: _Chain, index: int, override: str | None, ctx: RequestContext, entry: LogEntry
) -> None:
    item = chain.entries[index]
    hook = item.hooks[LOG]
    if hook is None:
        return
    ctx.config = chain.configs[index] if override is None else chain.override(override)
    try:
        result = hook(ctx, entry)
        if inspect.isawaitable(result):
            _spawn(_log_async(item, result))
    except Exception:
        _log_failure(item.name, "on_log", None)


async def _log_async(item: _Entry, awaitable: Awaitable[Any]) -> None:
    try:
        await awaitable
    except Exception:
        _log_failure(item.name, "on_log", None)


def _log_failure(filter_name: str, hook: str, exc: BaseException | None) -> str:
    """Logs a hook's failure: ``exc``, or the exception being handled."""
    text = traceback.format_exc() if exc is None else "".join(traceback.format_exception(exc))
    log.error("envoyx: python filter %r failed in %s:\n%s", filter_name, hook, text)
    return text


#: Running hook tasks: the loop keeps only weak references to tasks.
_tasks: set[asyncio.Task[None]] = set()


def _spawn(coro: Coroutine[Any, Any, None]) -> None:
    task = asyncio.ensure_future(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
