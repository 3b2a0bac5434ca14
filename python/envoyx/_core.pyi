"""Type stubs for the native extension built from rust/envoyx-py.

The extension holds no proxy logic: it owns one envoyx-core server and exposes it.
Errors are raised as the classes of ``envoyx.errors`` (never a private ``_core`` class).
"""

from collections.abc import Callable, Iterator
from typing import Any, Self, final

__all__ = [
    "Counter",
    "FilterJob",
    "Gauge",
    "Headers",
    "Histogram",
    "Server",
    "StatStore",
    "StreamInfo",
    "describe",
    "filter_dispatch",
    "filter_wakeup_fd",
    "route_match",
    "run_filter_jobs",
    "validate",
    "version",
]

def version() -> str:
    """envoyx's version string."""

def validate(
    bootstrap_json: str, filter_factory: Callable[[str, StatStore], Any] | None = None
) -> list[str]:
    """Map a canonical proto-JSON Bootstrap onto the core's model without serving.

    With ``filter_factory`` (as for :class:`Server`), the Python filters of static
    listeners are built too. Returns every error found (each prefixed with its field
    path); empty when valid.
    """

def describe(kind: str, json: str) -> str:
    """The configuration as the core holds it once mapped (Rust's ``Debug`` form).

    ``kind`` is ``"bootstrap"`` or one xDS resource: ``"listener"``, ``"cluster"``,
    ``"route_configuration"`` (canonical proto JSON). Raises ``ConfigError`` when the
    document does not map. Tests compare two documents' effect with it.
    """

def route_match(
    bootstrap_json: str, listener: str, authority: str, path: str, iterations: int = 100_000
) -> tuple[float, str | None]:
    """Nanoseconds per route lookup on one listener's compiled table, and the cluster
    matched (``"<direct_response>"`` for a direct response, None for no route)."""

@final
class Server:
    """One envoyx data plane, configured from a canonical proto-JSON Bootstrap.

    Raises ``envoyx.ConfigError`` (with ``.errors``) when the bootstrap cannot be mapped.
    """

    def __new__(
        cls,
        bootstrap_json: str,
        *,
        concurrency: int = 0,
        drain_time_s: float = 600.0,
        log_level: str = "info",
        filter_factory: Callable[[str, StatStore], Any] | None = None,
        file_flush_interval_msec: int = 10000,
        file_flush_min_size_kb: int = 64,
    ) -> Self:
        """``filter_factory(specs_json, stats)`` builds the Python filter chain of each
        HTTP connection manager (``envoyx.filters.build_chain``); it must return an
        object with ``masks`` (the hook bitmask of each filter) or raise ValueError
        with one ``"<path>: <problem>"`` per line."""
    def start(self, *, live: bool = True) -> None:
        """Bind every listener and the admin endpoint, start workers; returns once bound.

        With ``live=False`` the server stays INITIALIZING (admin ``/ready`` answers 503)
        until :meth:`mark_live`, as Envoy does during its xDS initial fetch.
        Raises ``envoyx.BindError`` (an ``OSError``) when an address cannot be bound.
        """
    def mark_live(self) -> None:
        """End initialization: ``/ready`` answers LIVE."""
    def stop(self) -> None:
        """Stop accepting, close connections, join workers. Idempotent."""
    def drain(self) -> None:
        """Stop accepting new connections; in-flight requests finish (drain_time_s)."""
    def wait(self, timeout: float | None = None) -> bool:
        """Block (GIL released) until the server stops; True if it stopped."""
    @property
    def running(self) -> bool: ...
    def stats(self) -> dict[str, int]:
        """Every counter and gauge by Envoy's stat name."""
    def config_dump(self) -> str:
        """The admin /config_dump document as JSON text."""
    def listener_addresses(self) -> dict[str, tuple[str, int]]:
        """Bound address of each listener by name (port 0 resolved)."""
    def admin_address(self) -> tuple[str, int] | None:
        """Bound admin address, or None without an admin block."""
    def apply(
        self,
        type_url: str,
        resources: list[tuple[str, str]],
        removed: list[str],
        version_info: str,
    ) -> list[tuple[str, str]]:
        """Apply xDS resources of one type (Listener, RouteConfiguration,
        ScopedRouteConfiguration, Cluster, ClusterLoadAssignment or Secret
        ``type.googleapis.com/...`` URL).

        ``resources`` are (name, canonical proto-JSON of the resource) to add or
        replace; ``removed`` names go away. Valid resources are applied even when
        others are rejected (ScopedRouteConfigurations: all or none, as Envoy);
        returns (name, error) for each rejected one. Listeners and clusters warm
        (until their routes / scopes / endpoints arrive) before serving.
        """
    def wanted_resources(self, type_url: str) -> list[str]:
        """Names the core needs of a named-subscription type: route configurations
        named by listeners and by SRDS scopes (RDS) and EDS service names of
        clusters (EDS)."""
    def counter_add(self, name: str, value: int) -> None:
        """Add to a counter shown with Envoy's stats (created on first use)."""
    def gauge_set(self, name: str, value: int) -> None:
        """Set a gauge shown with Envoy's stats (created on first use)."""

def filter_wakeup_fd() -> int:
    """The descriptor the filter executor's loop watches: readable when jobs are queued."""

def filter_dispatch(
    new_context: Callable[[StreamInfo, Headers | None], Any],
    run_job: Callable[[FilterJob], None],
    resume: Callable[[FilterJob, int, Any, int, Any], None],
    raised: Callable[[FilterJob, Any, int, BaseException], None],
    runtime_failed: Callable[[FilterJob, BaseException], None],
    unset: Any,
) -> None:
    """Registers the Python runtime's entry points for ``run_filter_jobs``."""

def run_filter_jobs() -> None:
    """Runs every queued job: headers phases' sync hooks here, the rest through the
    registered entry points."""

@final
class FilterJob:
    """One hook phase of one request, queued by a worker for the Python executor."""

    @property
    def phase(self) -> int: ...
    @property
    def state(self) -> tuple[int, Any]:
        """(phase, context): the context is None before the request's first job."""
    @property
    def context(self) -> Any: ...
    @context.setter
    def context(self, value: Any) -> None: ...
    @property
    def stream(self) -> StreamInfo: ...
    @property
    def headers(self) -> Headers | None: ...
    @property
    def message_headers(self) -> Headers | None: ...
    @property
    def status(self) -> int: ...
    @property
    def body(self) -> bytes | None: ...
    def timeout_s(self, index: int) -> float: ...
    def log_fields(self) -> dict[str, Any]: ...
    def done(self, body: bytes | None, cluster: str | None) -> None:
        """Continue with the phase's headers as left, ``body`` and ``cluster``."""
    def reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """Answer locally; raises ValueError (answering nothing) when invalid."""
    def fail(self, filter: str) -> None:
        """A hook of ``filter`` raised (the traceback is logged by the caller)."""
    def timed_out(self) -> None:
        """A hook overran its timeout."""

@final
class StreamInfo:
    """One request as routed, read lazily by ``RequestContext``."""

    @property
    def chain(self) -> Any: ...
    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def authority(self) -> str: ...
    @property
    def scheme(self) -> str: ...
    @property
    def downstream_address(self) -> str: ...
    @property
    def downstream_peer_identity(self) -> str | None:
        """The TLS client certificate's first URI SAN (None: no TLS or no certificate)."""
    @property
    def route_name(self) -> str | None: ...
    @property
    def cluster(self) -> str | None:
        """The route's cluster."""
    @property
    def order(self) -> tuple[tuple[int, str | None], ...]:
        """Active filters: (index in the chain, route config override as JSON or None)."""
    @property
    def start_headers(self) -> Headers | None:
        """A copy of the request headers when the chain has no request-headers hook."""

@final
class Headers:
    """A case-insensitive mutable mapping over the proxy's header map."""

    def __new__(cls, items: list[tuple[str, str]] | None = None) -> Self: ...
    def __getitem__(self, key: str, /) -> str: ...
    def __setitem__(self, key: str, value: str, /) -> None: ...
    def __delitem__(self, key: str, /) -> None: ...
    def __contains__(self, key: object, /) -> bool: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[str]: ...
    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name``, or ``default``."""
    def get_all(self, name: str) -> list[str]:
        """Every value of ``name``, in order."""
    def add(self, name: str, value: str) -> None:
        """Append a value to ``name``, keeping existing ones."""
    def pop(self, name: str, default: str | None = None) -> str:
        """Remove ``name``; its first value, or ``default`` (KeyError without one)."""
    def keys(self) -> list[str]: ...
    def values(self) -> list[str]: ...
    def items(self) -> list[tuple[str, str]]: ...

@final
class StatStore:
    """A server's stats, as Python filters declare theirs (under ``python.``)."""

    def counter(self, name: str, tags: list[tuple[str, str]] = ...) -> Counter: ...
    def gauge(self, name: str, tags: list[tuple[str, str]] = ...) -> Gauge: ...
    def histogram(self, name: str, tags: list[tuple[str, str]] = ...) -> Histogram: ...

@final
class Counter:
    def inc(self, n: int = 1) -> None: ...
    @property
    def value(self) -> int: ...

@final
class Gauge:
    def set(self, value: int) -> None: ...
    def inc(self, n: int = 1) -> None: ...
    def dec(self, n: int = 1) -> None: ...
    @property
    def value(self) -> int: ...

@final
class Histogram:
    def record(self, value: int) -> None: ...
    @property
    def count(self) -> int: ...
