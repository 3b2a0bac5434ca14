"""envoyx's xDS client: gRPC streams to management servers, driven by grpcio.

One thread per stream (the ADS stream, or one per type and ``api_config_source``)
reads responses and hands them to its :class:`~envoyx.xds.protocol.StreamProtocol`;
requests go out through an :class:`Outbox` that grpcio's own thread drains. With
``rate_limit_settings`` the outbox takes a token of the stream's :class:`TokenBucket`
for each request, as Envoy's ``GrpcStream`` does: what finds the bucket empty waits
(``control_plane.rate_limit_enforced``, ``control_plane.pending_requests``), so a
management server that answers every NACK with the same rejected resource at once
gets at most ``fill_rate`` answers a second. A stream that ends
(or cannot be opened) is opened again after a jittered exponential back-off (Envoy's:
full jitter, from ``retry_back_off.base_interval`` (500 ms) doubling up to its
``max_interval`` (30 s)); the configuration applied so far keeps serving meanwhile.

Start-up follows Envoy's initialization order: CDS first, and the endpoints of the EDS
clusters it brings and the secrets (SDS) of their TLS contexts; once the clusters are
initialized (or their ``initial_fetch_timeout`` passed), LDS, and the route
configurations and secrets its listeners name — with scoped RDS, the scopes (SRDS, a
wildcard subscription opened once a listener uses it) and the route configurations
they name. :meth:`XdsClient.wait_initialized`
returns when all of it is done.

The names of route configurations, endpoints and secrets to subscribe to are the
core's (``wanted_resources``): what the listeners and clusters it holds name, asked
again after each update. Secrets are asked about only once something applied names one
over xDS (an SDS config with ``sds_config``).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from envoyx.errors import XdsError
from envoyx.xds.applier import Applier
from envoyx.xds.protocol import Awaited, Request, StreamProtocol, TypeState
from envoyx.xds.resources import (
    ADS_METHODS,
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    SCOPED_ROUTE,
    SECRET,
    TYPES,
)
from envoyx.xds.settings import (
    DEFAULT_INITIAL_FETCH_TIMEOUT,
    RateLimit,
    Source,
    XdsSettings,
)

__all__ = ["Backoff", "Outbox", "TokenBucket", "XdsClient"]

_log = logging.getLogger("envoyx.xds")

_JOIN_TIMEOUT_S = 5.0
#: How often the housekeeping thread reads the RDS/EDS/SDS names the core needs.
REFRESH_INTERVAL_S = 1.0
#: The start-up phases: each wildcard type, then the named types its resources name.
PHASES = ((CLUSTER, (ENDPOINT, SECRET)), (LISTENER, (SCOPED_ROUTE, ROUTE, SECRET)))


class Backoff:
    """Envoy's ``JitteredExponentialBackOffStrategy``: the n-th delay is uniform in
    ``[0, min(base * 2**n, max))``; :meth:`reset` once a stream works again."""

    def __init__(
        self, base: float, maximum: float, rng: Callable[[], float] = random.random
    ) -> None:
        self.base = base
        self.maximum = max(maximum, base)
        self._rng = rng
        self._next = base

    def next(self) -> float:
        interval = self._next
        self._next = self.maximum if self._next > self.maximum / 2 else self._next * 2
        return min(self._rng() * interval, self.maximum)

    def reset(self) -> None:
        self._next = self.base


class TokenBucket:
    """Envoy's ``TokenBucketImpl``: starts with ``max_tokens``, refills at ``fill_rate``
    tokens a second (refilled only when taken from while not full, as Envoy's)."""

    #: Envoy's lowest fill rate: one token a year.
    MIN_FILL_RATE = 1.0 / (365 * 24 * 60 * 60)

    def __init__(
        self, max_tokens: int, fill_rate: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_tokens = float(max_tokens)
        self.fill_rate = max(abs(fill_rate), self.MIN_FILL_RATE)
        self.tokens = float(max_tokens)
        self._clock = clock
        self._last_fill = clock()

    def consume(self) -> bool:
        """Take one token; False when there is none."""
        if self.tokens < self.max_tokens:
            now = self._clock()
            self.tokens = min(
                self.tokens + (now - self._last_fill) * self.fill_rate, self.max_tokens
            )
            self._last_fill = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def next_token(self) -> float:
        """Seconds until a token may be there (Envoy's ``nextTokenAvailable``)."""
        if self.tokens >= 1:
            return 0.0
        return math.ceil(1000.0 / self.fill_rate) / 1000.0


class Outbox:
    """The requests of one stream call, in order, for grpcio's thread to send.

    With a :class:`TokenBucket`, each request takes a token; with none left the request
    waits for the next (counted in ``control_plane.rate_limit_enforced``, the queue's
    length in ``control_plane.pending_requests``), as Envoy's ``GrpcStream``. Every
    request goes out, in order (a reply is built before the subscriptions it causes
    are, so a later request is not always the newer state).
    """

    def __init__(self, bucket: TokenBucket | None, stats: Any) -> None:
        self._bucket = bucket
        self._stats = stats
        self._items: list[Request] = []
        self._cond = threading.Condition()
        self._closed = False
        self._reported = 0  # the pending_requests last set (Envoy sets it once used)
        self._waiting = False  # the sender waits for a token

    def put(self, request: Request) -> None:
        with self._cond:
            if self._closed:
                return
            self._items.append(request)
            if self._waiting:
                # Envoy tries to drain on every request queued: one more enforcement
                self._stats.counter("control_plane.rate_limit_enforced")
                self._report()
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _report(self) -> None:
        size = len(self._items)
        if size != self._reported:
            self._reported = size
            self._stats.gauge("control_plane.pending_requests", size)

    def __iter__(self) -> Iterator[Request]:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                bucket = self._bucket
                if bucket is not None and not bucket.consume():
                    if not self._waiting:
                        self._waiting = True
                        self._stats.counter("control_plane.rate_limit_enforced")
                        self._report()
                    self._cond.wait(bucket.next_token())
                    continue
                self._waiting = False
                request = self._items.pop(0)
                self._report()
            yield request


class _Stream:
    """One gRPC stream to a management server, reopened until stopped."""

    def __init__(self, client: XdsClient, source: Source, type_url: str | None) -> None:
        self.client = client
        self.source = source
        self.type_url = type_url  # None for ADS
        self.name = "ADS" if type_url is None else TYPES[type_url].short
        self.protocol = StreamProtocol(
            source,
            client.applier,
            client.settings.node,
            send=self._send,
            on_applied=client._on_applied,
            on_answered=client._on_answered,
        )
        self.backoff = Backoff(source.target.backoff_base, source.target.backoff_max)
        # the stream's token bucket outlives its calls, as Envoy's GrpcStream's
        limit: RateLimit | None = source.rate_limit
        self.bucket = TokenBucket(limit.max_tokens, limit.fill_rate) if limit is not None else None
        self._queue: Outbox | None = None
        self._call: Any = None
        self._responded = False
        self._thread: threading.Thread | None = None

    @property
    def method(self) -> str:
        delta = self.source.delta
        if self.type_url is None:
            return ADS_METHODS[delta]
        return TYPES[self.type_url].method_path(delta)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"envoyx-xds-{self.name.lower()}", daemon=True
        )
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    # called with the client lock held
    def _send(self, request: Request) -> None:
        if self._queue is not None:
            self._queue.put(request)

    def cancel(self) -> None:
        """Called with the client lock held: end the current call, if any."""
        if self._call is not None:
            self._call.cancel()
        if self._queue is not None:
            self._queue.close()

    def _run(self) -> None:
        client = self.client
        while not client._stopping.is_set():
            try:
                self._attempt()
            except Exception:  # a bug must not end the stream for good
                _log.exception(
                    "xDS %s stream to %s failed", self.name, self.source.target.description
                )
            if client._stopping.is_set():
                break
            delay = self.backoff.next()
            _log.debug("xDS %s stream: reconnecting in %.3fs", self.name, delay)
            client._stopping.wait(delay)

    def _attempt(self) -> None:
        import grpc  # type: ignore[import-untyped]

        client = self.client
        target = self.source.target
        channel = _make_channel(target)
        q = Outbox(self.bucket, client.stats)
        response_type = (
            discovery_pb2.DeltaDiscoveryResponse
            if self.source.delta
            else discovery_pb2.DiscoveryResponse
        )
        request_type = (
            discovery_pb2.DeltaDiscoveryRequest
            if self.source.delta
            else discovery_pb2.DiscoveryRequest
        )
        multicallable = channel.stream_stream(
            self.method,
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )

        with client._lock:
            if client._stopping.is_set():
                channel.close()
                return
            self._queue = q
            self._responded = False
            self.protocol.connect()  # queues the first requests
            self._call = multicallable(
                iter(q), metadata=list(target.metadata) or None, wait_for_ready=False
            )
        _log.info("xDS %s stream to %s opening", self.name, target.description)
        try:
            for response in self._call:
                with client._lock:
                    if not self._responded:
                        self._responded = True
                        self.backoff.reset()
                        client._update_connected()
                    self.protocol.handle(response)
                    client._cond.notify_all()
            _log.warning("xDS %s stream to %s closed by the server", self.name, target.description)
        except grpc.RpcError as e:
            if not client._stopping.is_set():
                code = e.code() if hasattr(e, "code") else None
                details = e.details() if hasattr(e, "details") else str(e)
                _log.warning(
                    "xDS %s stream to %s failed: %s %s",
                    self.name,
                    target.description,
                    getattr(code, "name", code),
                    details,
                )
        finally:
            with client._lock:
                q.close()
                self._queue = None
                self._call = None
                self._responded = False
                self.protocol.disconnect()
                client._update_connected()
                client._cond.notify_all()
            channel.close()

    def is_connected(self) -> bool:
        # Connected once the server answered on the stream (grpcio tells nothing
        # earlier without watching the channel's connectivity, which races with
        # closing it); every management server answers the first request of a
        # wildcard type at once.
        return self._call is not None and self._responded


def _make_channel(target: Any) -> Any:
    import grpc

    base_ms = max(1, int(target.backoff_base * 1000))
    max_ms = max(base_ms, int(target.backoff_max * 1000))
    # gRPC core's minimum connect deadline (MIN_CONNECT_TIMEOUT of its connection
    # back-off) is this option: the cluster's connect_timeout, as Envoy uses it.
    connect_ms = max(100, int(target.connect_timeout * 1000))
    options: list[tuple[str, Any]] = [
        # A fresh channel per attempt, with its own connection: the back-off is ours.
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.initial_reconnect_backoff_ms", base_ms),
        ("grpc.min_reconnect_backoff_ms", connect_ms),
        ("grpc.max_reconnect_backoff_ms", max_ms),
        ("grpc.enable_retries", 0),
        ("grpc.primary_user_agent", "envoyx"),
        *target.channel_options,
    ]
    if target.secure:
        creds = grpc.ssl_channel_credentials(
            root_certificates=target.root_certs,
            private_key=target.private_key,
            certificate_chain=target.cert_chain,
        )
        return grpc.secure_channel(target.target, creds, options=options)
    if target.local_credentials:
        return grpc.secure_channel(target.target, grpc.local_channel_credentials(), options=options)
    return grpc.insecure_channel(target.target, options=options)


class XdsClient:
    """Subscribes to the bootstrap's dynamic resources and applies them."""

    def __init__(self, settings: XdsSettings, applier: Applier) -> None:
        try:
            import grpc  # noqa: F401
        except ImportError as e:  # pragma: no cover - grpcio is a dependency
            raise XdsError("the xDS client needs grpcio (pip install grpcio)") from e
        self.settings = settings
        self.applier = applier
        self.stats = applier.stats
        self._lock = applier.lock
        self._cond = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._started = False
        self._clusters_initialized = False
        self._initialized = False
        self._streams: dict[tuple[str, str | None], _Stream] = {}
        self._connected_gauge: int | None = None
        self._init_thread: threading.Thread | None = None
        self._warned: set[tuple[str, str]] = set()
        for kind, type_url in (("cds", CLUSTER), ("lds", LISTENER)):
            resolved = settings.cds if kind == "cds" else settings.lds
            if resolved is not None and resolved.source is not None:
                stream = self._stream_for(resolved.source, type_url)
                stream.protocol.add_wildcard(type_url, active=False)

    # -- streams ---------------------------------------------------------------------------

    def _stream_for(self, source: Source, type_url: str) -> _Stream:
        key = (source.key, None if source.aggregated else type_url)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = _Stream(self, source, key[1])
            if self._started and not self._stopping.is_set():
                stream.start()
        return stream

    def _streams_of(self, type_url: str) -> list[tuple[_Stream, TypeState]]:
        return [
            (s, s.protocol.types[type_url])
            for s in self._streams.values()
            if type_url in s.protocol.types
        ]

    def _update_connected(self) -> None:
        """``control_plane.connected_state``: 1 while every stream is connected."""
        streams = list(self._streams.values())
        value = int(bool(streams) and all(s.is_connected() for s in streams))
        if value != self._connected_gauge:
            self._connected_gauge = value
            self.stats.gauge("control_plane.connected_state", value)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Open the streams and begin the initialization sequence (returns at once)."""
        with self._lock:
            if self._started:
                return
            self._started = True
            self._update_connected()
            self.stats.gauge("control_plane.pending_requests", 0)
            self.stats.counter("control_plane.rate_limit_enforced", 0)
            for stream, _ in self._streams_of(CLUSTER):
                stream.protocol.activate(CLUSTER)
            self._refresh_named()
            for stream in list(self._streams.values()):
                stream.start()
        self._init_thread = threading.Thread(target=self._run, name="envoyx-xds", daemon=True)
        self._init_thread.start()

    def stop(self) -> None:
        """Close every stream and join the threads. Idempotent."""
        with self._lock:
            self._stopping.set()
            for stream in self._streams.values():
                stream.cancel()
            streams = list(self._streams.values())
            self._cond.notify_all()
        for stream in streams:
            stream.join(_JOIN_TIMEOUT_S)
        if self._init_thread is not None:
            self._init_thread.join(_JOIN_TIMEOUT_S)
        with self._lock:
            self._connected_gauge = None
            if self._started:
                self.stats.gauge("control_plane.connected_state", 0)

    def wait_initialized(self, timeout: float | None = None) -> bool:
        """Block until start-up fetching is over (every LDS/CDS subscription answered
        or timed out, and the RDS/EDS resources they name); False on ``timeout`` or when
        stopped first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._initialized and not self._stopping.is_set():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return self._initialized

    @property
    def initialized(self) -> bool:
        return self._initialized

    @property
    def stopping(self) -> bool:
        """Whether stop() was called."""
        return self._stopping.is_set()

    # -- initialization ------------------------------------------------------------------

    def _run(self) -> None:
        """The client's own thread: the initialization sequence, then housekeeping."""
        (clusters, of_clusters), (listeners, of_listeners) = PHASES
        with self._cond:
            if not self._wait_phase(clusters, of_clusters):
                return
            self._clusters_initialized = True
            _log.info("xDS: clusters initialized; fetching listeners")
            for stream, _ in self._streams_of(listeners):
                stream.protocol.activate(listeners)
            if not self._wait_phase(listeners, of_listeners):
                return
            self._initialized = True
            _log.info("xDS: initial fetch done")
            self._cond.notify_all()
            self._housekeeping()

    def _housekeeping(self) -> None:
        """With the lock held, until stopped: answer held replies whose wait expired,
        end the initial fetches that timed out, and follow what the core needs.
        Listeners that finish draining let go of their route configurations without any
        update, so the RDS/EDS/SDS names are read again every
        :data:`REFRESH_INTERVAL_S` (no traffic unless they changed)."""
        while not self._stopping.is_set():
            now = time.monotonic()
            nearest = self._expire_held(now)
            for named_type in (ENDPOINT, ROUTE, SECRET):
                fetch = self._expire_fetches(named_type, None, now)
                if fetch is not None:
                    nearest = fetch if nearest is None else min(nearest, fetch)
            scopes = self._expire_scopes(now)
            if scopes is not None and scopes != float("inf"):
                nearest = scopes if nearest is None else min(nearest, scopes)
            wait = REFRESH_INTERVAL_S if nearest is None else min(REFRESH_INTERVAL_S, nearest - now)
            self._cond.wait(max(0.0, wait))
            if self._stopping.is_set():
                return
            self._refresh_named()

    def _wait_phase(self, wildcard: str, named: tuple[str, ...]) -> bool:
        """With the lock held: wait until the ``wildcard`` subscriptions and the
        ``named`` resources they name are answered or timed out."""
        while not self._stopping.is_set():
            now = time.monotonic()
            held = self._expire_held(now)
            pending = self._pending(wildcard, named, now)
            if pending is not None and pending <= now:
                continue  # something just timed out: look again
            if pending is None:
                return True
            deadline = pending if held is None else min(pending, held)
            self._cond.wait(None if deadline == float("inf") else max(0.0, deadline - now))
        return False

    def _expire_held(self, now: float) -> float | None:
        """Send the held replies whose wait expired; the nearest other deadline."""
        nearest: float | None = None
        for stream in self._streams.values():
            deadline = stream.protocol.expire(now)
            if deadline is not None:
                nearest = deadline if nearest is None else min(nearest, deadline)
        return nearest

    def _pending(self, wildcard: str, named: tuple[str, ...], now: float) -> float | None:
        """None when done, else the next deadline (``inf``: none). Marks what timed out."""
        nearest: float | None = None

        def wait_until(deadline: float) -> None:
            nonlocal nearest
            nearest = deadline if nearest is None else min(nearest, deadline)

        resolved = self.settings.cds if wildcard == CLUSTER else self.settings.lds
        timeout = resolved.initial_fetch_timeout if resolved is not None else None
        for _, st in self._streams_of(wildcard):
            if not st.wildcard or st.initial_done:
                continue
            started = st.started_at if st.started_at is not None else now
            if timeout is not None and now >= started + timeout:
                st.initial_done = True
                self.stats.init_fetch_timeout(self.applier.stat_prefixes(wildcard, ""))
                _log.warning("xDS: initial fetch of %s timed out", TYPES[wildcard].short)
                return now
            wait_until(float("inf") if timeout is None else started + timeout)
        if nearest is not None:
            return nearest  # the names come once the wildcard type has answered
        for named_type in named:
            if named_type == SCOPED_ROUTE:
                deadline = self._expire_scopes(now)
                if deadline is not None:
                    return deadline  # the route names come once the scopes have
                continue
            # Secrets are shared: the clusters' phase waits only for the clusters' own.
            only = self.applier.named(wildcard, named_type) if named_type == SECRET else None
            deadline = self._expire_fetches(named_type, only, now, waiting=True)
            if deadline is not None:
                wait_until(deadline)
        return nearest

    def _expire_scopes(self, now: float) -> float | None:
        """With the lock held: end the initial fetch of the SRDS subscriptions not
        answered within their ``initial_fetch_timeout``: counted, and the core is told
        of an empty update, so that the listeners waiting for scopes go on without
        (as Envoy's do). Returns the nearest other deadline (``inf``: none)."""
        nearest: float | None = None
        for _, st in self._streams_of(SCOPED_ROUTE):
            if not st.active or st.initial_done:
                continue
            sources = self.applier.sources_of(SCOPED_ROUTE, "")
            timeout = sources[0].initial_fetch_timeout if sources else DEFAULT_INITIAL_FETCH_TIMEOUT
            started = st.started_at if st.started_at is not None else now
            if timeout is not None and now >= started + timeout:
                st.initial_done = True
                self.stats.init_fetch_timeout(self.applier.stat_prefixes(SCOPED_ROUTE, ""))
                _log.warning("xDS: initial fetch of SRDS timed out")
                try:
                    self.applier.apply(SCOPED_ROUTE, [], [], st.version)
                except Exception:  # the client's thread must go on
                    _log.exception("xDS: telling the core of the SRDS timeout failed")
                continue
            deadline = float("inf") if timeout is None else started + timeout
            nearest = deadline if nearest is None else min(nearest, deadline)
        return nearest

    def _expire_fetches(
        self, type_url: str, only: set[str] | None, now: float, *, waiting: bool = False
    ) -> float | None:
        """With the lock held: end the initial fetch of the ``type_url`` names (of
        ``only``, if given) subscribed to and not answered within their config source's
        ``initial_fetch_timeout``, as Envoy does: ``init_fetch_timeout`` is counted and
        what waited for them goes on. A secret that timed out is also given to the core
        as removed: what names it stops waiting for it (a listener goes active without
        its certificate; Envoy keeps a secret it has).

        Returns the nearest deadline of the others (``inf`` when ``waiting`` and some
        wait for ever; None when nothing is pending)."""
        nearest: float | None = None
        for _, st in self._streams_of(type_url):
            for name in sorted(st.names - st.received):
                if only is not None and name not in only:
                    continue
                sources = self.applier.sources_of(type_url, name)
                fetch = (
                    sources[0].initial_fetch_timeout if sources else DEFAULT_INITIAL_FETCH_TIMEOUT
                )
                started = st.subscribed_at.get(name, now)
                if fetch is not None and now >= started + fetch:
                    st.received.add(name)
                    self.stats.init_fetch_timeout(self.applier.stat_prefixes(type_url, name))
                    _log.warning(
                        "xDS: initial fetch of %s %s timed out", TYPES[type_url].short, name
                    )
                    if type_url == SECRET:
                        try:
                            self.applier.apply(SECRET, [], [name], st.version)
                        except Exception:  # the housekeeping thread must go on
                            _log.exception("xDS: telling the core of secret %s failed", name)
                    self._on_answered(type_url, {name})  # what waited for it goes on
                    continue
                if fetch is None and not waiting:
                    continue
                deadline = float("inf") if fetch is None else started + fetch
                nearest = deadline if nearest is None else min(nearest, deadline)
        return nearest

    # -- subscriptions of named resources ----------------------------------------------------

    def _on_applied(self, type_url: str, changed: list[str]) -> Awaited | None:
        """With the lock held: resources of ``type_url`` were applied (``changed``: the
        new or modified ones). The RDS/EDS/SDS names the core needs may have changed.

        Returns what the ACK/NACK of a CDS update waits for: the endpoints of the EDS
        clusters it brought, and (once the clusters are initialized) the secrets of
        their TLS contexts, that have not arrived yet. Envoy answers CDS once those
        clusters are warm, so that an ACK means they are in force; during start-up it
        does not wait for their secrets (the LDS request waits for them instead).
        """
        self._refresh_named()
        if type_url != CLUSTER or not changed:
            return None
        awaited_types = (ENDPOINT, SECRET) if self._clusters_initialized else (ENDPOINT,)
        now = time.monotonic()
        names: set[tuple[str, str]] = set()
        deadline: float | None = now
        for name in changed:
            for dep in self.applier.named_by(CLUSTER, name):
                dep_type, dep_name = dep
                if dep_type not in awaited_types or dep in names:
                    continue
                if not any(
                    dep_name in st.names - st.received for _, st in self._streams_of(dep_type)
                ):
                    continue
                names.add(dep)
                sources = self.applier.sources_of(dep_type, dep_name)
                timeout = (
                    sources[0].initial_fetch_timeout if sources else DEFAULT_INITIAL_FETCH_TIMEOUT
                )
                if timeout is None or deadline is None:
                    deadline = None
                else:
                    deadline = max(deadline, now + timeout)
        if not names:
            return None
        self._cond.notify_all()  # the housekeeping thread watches the deadline
        return Awaited(frozenset(names), deadline)

    def _on_answered(self, type_url: str, names: set[str]) -> None:
        """With the lock held: resources of ``type_url`` were answered."""
        for stream in self._streams.values():
            stream.protocol.answered(type_url, names)
        self._cond.notify_all()

    def refresh(self) -> None:
        """Subscribe to what the core needs now (after :meth:`envoyx.Server.update`)."""
        with self._lock:
            if self._stopping.is_set():
                return
            self._refresh_named()

    def _refresh_named(self) -> None:
        """Subscribe to the route configurations, endpoints and secrets the core needs.

        The core is asked for secrets only once a listener or cluster it holds names one
        over xDS (or while secrets are subscribed to, to let them go): until then there
        is none to ask about.
        """
        self._refresh(ENDPOINT)
        self._subscribe_scopes()
        self._refresh(ROUTE)
        if self.applier.named_anywhere(SECRET) or any(
            st.names for _, st in self._streams_of(SECRET)
        ):
            self._refresh(SECRET)

    def _subscribe_scopes(self) -> None:
        """Open the SRDS wildcard subscription on the stream of each ``scoped_rds``
        config source the listeners name (once; it stays open, as in Envoy while a
        listener uses it)."""
        for resolved in self.applier.sources_of(SCOPED_ROUTE, ""):
            source = resolved.source or self.settings.ads
            if source is None:
                continue
            stream = self._stream_for(source, SCOPED_ROUTE)
            st = stream.protocol.types.get(SCOPED_ROUTE)
            if st is None or not st.active:
                stream.protocol.add_wildcard(SCOPED_ROUTE)

    def _refresh(self, type_url: str) -> None:
        wanted = self.applier.wanted(type_url)
        by_stream: dict[tuple[str, str | None], set[str]] = {
            key: set() for key, s in self._streams.items() if type_url in s.protocol.types
        }
        for name in wanted:
            source = self._source_for(type_url, name)
            if source is None:
                continue
            self._stream_for(source, type_url)
            key = (source.key, None if source.aggregated else type_url)
            by_stream.setdefault(key, set()).add(name)
        for key, names in by_stream.items():
            self._streams[key].protocol.set_names(type_url, names)
        for stream in self._streams.values():
            stream.protocol.prune(type_url, set(wanted))
        self._cond.notify_all()

    def _source_for(self, type_url: str, name: str) -> Source | None:
        for resolved in self.applier.sources_of(type_url, name):
            if resolved.source is not None:
                return resolved.source
        if self.settings.ads is not None:
            return self.settings.ads
        if (type_url, name) not in self._warned:
            self._warned.add((type_url, name))
            _log.warning(
                "xDS: no config source known for %s %s (and no ads_config): not subscribing",
                TYPES[type_url].short,
                name,
            )
        return None

    # -- inspection ------------------------------------------------------------------------

    def status(self) -> dict[str, dict[str, Any]]:
        """Per type URL: ``version`` (last accepted), ``nonce`` (of the latest
        response), ``last_error`` (of the latest NACK, None once a later update is
        accepted) and ``resources`` (names held from the management server)."""
        out: dict[str, dict[str, Any]] = {}
        with self._lock:
            for stream in self._streams.values():
                for type_url, entry in stream.protocol.status().items():
                    if type_url not in out:
                        out[type_url] = entry
                    else:
                        merged = out[type_url]
                        merged["resources"] = sorted({*merged["resources"], *entry["resources"]})
                        if merged["last_error"] is None:
                            merged["last_error"] = entry["last_error"]
        return out
