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


class RequestContext:
    """One request as the filters see it; shared by every hook and filter of it."""

    __slots__ = (
        "_order",
        "_reverse",
        "authority",
        "cluster",
        "config",
        "downstream_address",
        "downstream_peer_identity",
        "method",
        "path",
        "request_headers",
        "response_headers",
        "route_name",
        "scheme",
        "state",
        "status",
    )

    method: str
    path: str
    authority: str
    scheme: str
    request_headers: Headers
    response_headers: Headers | None
    status: int | None
    downstream_address: str | None
    downstream_peer_identity: str | None
    route_name: str | None
    cluster: str | None
    state: dict[str, Any]
    config: Any
    # The active filters (index, route override) in request and in response order.
    _order: tuple[tuple[int, str | None], ...]
    _reverse: tuple[tuple[int, str | None], ...]

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

    __slots__ = ("_override_cache", "by_phase", "configs", "entries", "masks")

    def __init__(self, entries: list[_Entry]) -> None:
        self.entries = entries
        self.configs = [e.config for e in entries]
        #: by_phase[phase][index]: filter ``index``'s hook for ``phase``, or None.
        self.by_phase = [[e.hooks[p] for e in entries] for p in range(len(_HOOK_NAMES))]
        self.masks = [sum(1 << p for p, h in enumerate(e.hooks) if h is not None) for e in entries]
        self._override_cache: dict[str, Any] = {}

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
        self.loop = asyncio.new_event_loop()
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
        self.loop.add_reader(_core.filter_wakeup_fd(), self._wake)
        ready.set()
        self.loop.run_forever()

    def _wake(self) -> None:
        for job in _core.filter_jobs():
            try:
                _start_job(job)
            except BaseException:  # never let one job stop the loop
                log.exception("envoyx: python filter runtime failed on a job")
                job.fail("<runtime>")


def _new_context(job: _core.FilterJob, phase: int) -> RequestContext:
    """The request's context, made on its first job and kept by the core's stream."""
    method, path, authority, scheme, peer, route_name, cluster = job.info
    ctx = RequestContext()
    ctx.method = method
    ctx.path = path
    ctx.authority = authority
    ctx.scheme = scheme
    first = job.headers if phase == REQUEST_HEADERS else job.start_headers
    ctx.request_headers = first if first is not None else Headers()
    ctx.response_headers = None
    ctx.status = None
    ctx.downstream_address = peer
    ctx.downstream_peer_identity = None
    ctx.route_name = route_name
    ctx.cluster = cluster
    ctx.state = {}
    ctx.config = None
    order = job.active
    ctx._order = order
    # Response hooks run in reverse filter order, as Envoy's encoder filters do.
    ctx._reverse = order[::-1]
    job.context = ctx
    return ctx


def _start_job(job: _core.FilterJob) -> None:
    phase = job.phase
    ctx: RequestContext | None = job.context
    if ctx is None:
        ctx = _new_context(job, phase)
    if phase < RESPONSE_HEADERS:
        _run_phase(job, phase, job.chain, ctx._order, 0, ctx, job.body)
        return
    ctx.status = job.status
    if phase == RESPONSE_HEADERS:
        ctx.response_headers = job.headers
    elif ctx.response_headers is None:
        ctx.response_headers = job.message_headers
    if phase == LOG:
        chain: _Chain = job.chain
        entry = LogEntry(**job.log_fields())
        for index, override in ctx._order:
            _run_log(chain, index, override, ctx, entry)
        return
    _run_phase(job, phase, job.chain, ctx._reverse, 0, ctx, job.body)


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
        if inspect.isawaitable(result):
            timeout = job.timeout_s(index)
            _spawn(_run_async(job, phase, chain, order, i, ctx, body, result, timeout))
            return
        outcome = _apply(job, chain.entries[index], result, body)
        if outcome is _STOP:
            return
        body = outcome  # type: ignore[assignment]
    # Only request phases choose the cluster; a response phase sends no string back.
    job.done(body, ctx.cluster if phase < RESPONSE_HEADERS else None)


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


async def _run_async(
    job: _core.FilterJob,
    phase: int,
    chain: _Chain,
    order: tuple[tuple[int, str | None], ...],
    i: int,
    ctx: RequestContext,
    body: bytes | None,
    awaitable: Awaitable[Any],
    timeout: float,
) -> None:
    entry = chain.entries[order[i][0]]
    try:
        # asyncio.timeout, not wait_for: no second task per call.
        async with asyncio.timeout(timeout):
            result = await awaitable
    except TimeoutError:
        job.timed_out()
        return
    except Exception:
        _failed(job, entry)
        return
    outcome = _apply(job, entry, result, body)
    if outcome is _STOP:
        return
    _run_phase(job, phase, chain, order, i + 1, ctx, outcome)  # type: ignore[arg-type]


def _failed(job: _core.FilterJob, entry: _Entry) -> None:
    _log_failure(entry.name, _HOOK_NAMES[job.phase])
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
        _log_failure(item.name, "on_log")


async def _log_async(item: _Entry, awaitable: Awaitable[Any]) -> None:
    try:
        await awaitable
    except Exception:
        _log_failure(item.name, "on_log")


def _log_failure(filter_name: str, hook: str) -> str:
    text = traceback.format_exc()
    log.error("envoyx: python filter %r failed in %s:\n%s", filter_name, hook, text)
    return text


#: Running hook tasks: the loop keeps only weak references to tasks.
_tasks: set[asyncio.Task[None]] = set()


def _spawn(coro: Coroutine[Any, Any, None]) -> None:
    task = asyncio.ensure_future(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
