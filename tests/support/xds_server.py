"""An in-process ADS management server for the xDS tests (grpcio + xds-protos).

It serves ``StreamAggregatedResources`` (State of the World) and
``DeltaAggregatedResources`` (incremental) on 127.0.0.1, for every type in
:data:`RESOURCE_TYPES` (adding a type is adding an entry there), exactly as the xDS
protocol describes (envoy docs, api-docs/xds_protocol):

- one version per type (``"1"``, ``"2"``, … bumped by every change of that type) and a
  nonce per response, unique for the life of the server;
- at most one unanswered response per type and stream: a change that arrives while a
  response awaits its ACK/NACK is sent once it is answered (so every response is ACKed
  or NACKed before the next one of its type goes out);
- SotW: a wildcard subscription (``"*"``, or the legacy empty list on a stream that never
  named a resource) gets every resource of the type, a named one the requested
  resources that exist; a response is sent when the subscription changes, when the
  type's version is not the one last sent on the stream (never again for a NACKed
  version), and for a request that ACKs/NACKs nothing (a fresh request for the current
  state); requests carrying a stale nonce are recorded and otherwise ignored; a named
  subscription whose resources do not exist yet gets no (empty) response;
- Delta: each resource carries its own version (a digest of its serialized bytes, so
  it survives a server restart); only resources whose version the client does not
  have are sent; ``removed_resources`` names resources that went away and subscribed
  names that do not exist; ``initial_resource_versions`` of the first request of a
  type is honoured (nothing the client already has is resent); subscribing to a name
  always (re)sends it; a subscription change is honoured whatever its nonce; a NACKed
  resource is not resent until it changes; when a cluster the client had is replaced,
  its ClusterLoadAssignment is sent again right after it (:data:`DEPENDENTS`: Envoy
  warms the replacement only on a fresh one and does not ask for it in Delta);
- the first request of a type on a stream is answered once the test has set that
  type (a wildcard one even with no resources, so that the client's initial fetch
  completes; a named one when a requested resource exists — Delta: or with the
  missing names in ``removed_resources``).

Every request and response is recorded (:class:`XdsRequest`, :class:`XdsResponse`) and
tests wait on them with deadlines (:meth:`XdsServer.wait_for_ack`, …); nothing in
here sleeps to synchronise.

With ``tls=`` (:class:`ServerTls`) the server speaks gRPC over TLS, and over mutual TLS
when it names the client CA; :meth:`XdsServer.peer_identities` tells which client
certificate each stream presented. ``XdsServer.tls`` may be changed between
:meth:`~XdsServer.stop` and :meth:`~XdsServer.restart`.
"""

from __future__ import annotations

import hashlib
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2, scoped_route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401 - @type in the pool
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import (
    secret_pb2,
    tls_pb2,  # noqa: F401 - @type in the pool
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message

TYPE_PREFIX = "type.googleapis.com/"
LISTENER = TYPE_PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = TYPE_PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER = TYPE_PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = TYPE_PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = TYPE_PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"
SCOPED_ROUTE = TYPE_PREFIX + "envoy.config.route.v3.ScopedRouteConfiguration"

# Type URL -> message class. The server is otherwise type-agnostic.
RESOURCE_TYPES: dict[str, type[Message]] = {
    CLUSTER: cluster_pb2.Cluster,
    ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
    LISTENER: listener_pb2.Listener,
    ROUTE: route_pb2.RouteConfiguration,
    SECRET: secret_pb2.Secret,
    SCOPED_ROUTE: scoped_route_pb2.ScopedRouteConfiguration,
}


def _cluster_dependents(resource: any_pb2.Any) -> list[tuple[str, str]]:
    c = cluster_pb2.Cluster()
    resource.Unpack(c)
    if c.type != cluster_pb2.Cluster.EDS:
        return []
    return [(ENDPOINT, c.eds_cluster_config.service_name or c.name)]


# Resources that a client needs again when the resource they depend on is replaced.
DEPENDENTS: dict[str, Callable[[any_pb2.Any], list[tuple[str, str]]]] = {
    CLUSTER: _cluster_dependents,
}
# Make-before-break order for pushes that change several types at once.
PUSH_ORDER = [CLUSTER, ENDPOINT, LISTENER, SCOPED_ROUTE, ROUTE, SECRET]
SHORT_NAMES = {
    CLUSTER: "CDS",
    ENDPOINT: "EDS",
    LISTENER: "LDS",
    ROUTE: "RDS",
    SECRET: "SDS",
    SCOPED_ROUTE: "SRDS",
}

DEFAULT_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0

Mode = Literal["sotw", "delta"]
ResourceValue = Message | Mapping[str, Any] | any_pb2.Any
RequestKind = Literal["initial", "ack", "nack", "update", "stale"]


def short(type_url: str) -> str:
    return SHORT_NAMES.get(type_url, type_url.rsplit(".", 1)[-1])


# ------------------------------------------------------------------------------------
# records
# ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class XdsRequest:
    """One request as received, classified against the stream's state.

    ``kind``: ``initial`` (first request of its type on the stream), ``ack`` / ``nack``
    (the first answer to the response named by ``response_nonce``; a NACK carries
    ``error_detail``, or — SotW, old style — a ``version_info`` other than the
    response's), ``stale`` (SotW: a
    nonce older than the latest sent; ignored), ``update`` (anything else: a
    subscription change, a repeated nonce). ``response_version`` is the version of the
    response the nonce refers to (SotW ``version_info``, Delta ``system_version_info``).
    """

    seq: int
    stream_id: int
    mode: Mode
    type_url: str
    kind: RequestKind
    node_id: str
    node: base_pb2.Node
    response_nonce: str
    response_version: str | None
    error_detail: str | None  # error_detail.message of a NACK
    error_code: int | None
    # SotW
    version_info: str = ""
    resource_names: tuple[str, ...] = ()
    # Delta
    subscribe: tuple[str, ...] = ()
    unsubscribe: tuple[str, ...] = ()
    initial_resource_versions: Mapping[str, str] = field(default_factory=dict)
    raw: Message | None = field(default=None, repr=False, compare=False)

    @property
    def is_ack(self) -> bool:
        return self.kind == "ack"

    @property
    def is_nack(self) -> bool:
        return self.kind == "nack"


@dataclass(frozen=True)
class XdsResponse:
    """One response as sent."""

    seq: int
    stream_id: int
    mode: Mode
    type_url: str
    version: str  # SotW version_info / Delta system_version_info
    nonce: str
    resource_names: tuple[str, ...]
    resource_versions: Mapping[str, str]  # Delta: per-resource versions sent
    removed: tuple[str, ...] = ()  # Delta removed_resources


@dataclass(frozen=True)
class ServerTls:
    """The server side of TLS: its certificate chain and key (PEM), and for mutual TLS
    the CA (PEM) that client certificates must chain to; ``require_client_cert``
    refuses clients without one (otherwise a certificate is asked for, not required)."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None
    require_client_cert: bool = False

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.require_client_cert,
        )


@dataclass(frozen=True)
class PeerIdentity:
    """What the TLS handshake of one stream showed of the client (gRPC's auth
    context): ``transport`` is ``"ssl"`` over TLS, ``common_name`` and ``sans`` come
    from the client certificate (empty without one)."""

    stream_id: int
    transport: str | None
    common_name: str | None
    sans: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Entry:
    name: str
    version: str  # per-resource version (digest of the serialized resource)
    any: any_pb2.Any


@dataclass(frozen=True)
class _TypeSnapshot:
    version: str
    entries: dict[str, _Entry]
    # names sent twice in each response carrying them (to test that clients NACK that)
    duplicates: frozenset[str] = frozenset()

    def with_duplicates(self, entries: list[_Entry]) -> list[_Entry]:
        return entries + [e for e in entries if e.name in self.duplicates]


def to_any(type_url: str, value: ResourceValue) -> any_pb2.Any:
    """Pack a resource: a message of the type, a proto-JSON dict, or a ready ``Any``
    (to serve bytes Envoy cannot parse, e.g. an unknown ``@type`` inside)."""
    if isinstance(value, any_pb2.Any):
        return value
    cls = RESOURCE_TYPES[type_url]
    msg = value if isinstance(value, Message) else json_format.ParseDict(dict(value), cls())
    if msg.DESCRIPTOR.full_name != type_url.removeprefix(TYPE_PREFIX):
        raise TypeError(f"{msg.DESCRIPTOR.full_name} given for {type_url}")
    out = any_pb2.Any()
    out.Pack(msg, deterministic=True)
    return out


def _digest(a: any_pb2.Any) -> str:
    return hashlib.sha256(a.type_url.encode() + b"\0" + a.value).hexdigest()[:16]


# ------------------------------------------------------------------------------------
# per-stream state
# ------------------------------------------------------------------------------------

_ABSENT = "\0absent"  # Delta: the client was told this subscribed name does not exist
_CLOSE = object()


@dataclass
class _TypeState:
    requested: bool = False  # a request of this type was seen on the stream
    wildcard: bool = False
    explicit: bool = False  # a name (or "*") was ever named explicitly
    names: set[str] = field(default_factory=set)
    outstanding: str | None = None  # nonce of the response awaiting ACK/NACK
    last_nonce: str | None = None
    dirty: bool = False  # something must be sent once nothing is outstanding
    first_pending: bool = False  # the first request is not answered yet
    # SotW
    sent_version: str | None = None
    # Delta: what the client has, name -> version (or _ABSENT)
    known: dict[str, str] = field(default_factory=dict)
    force: set[str] = field(default_factory=set)  # names to resend or report removed
    rejected: dict[str, str] = field(default_factory=dict)  # name -> NACKed version
    # Delta: the outstanding response's resources and what the client had before
    inflight: dict[str, str | None] = field(default_factory=dict)
    inflight_versions: dict[str, str] = field(default_factory=dict)


class _Stream:
    def __init__(self, server: XdsServer, mode: Mode, sid: int, peer: str) -> None:
        self.server = server
        self.mode = mode
        self.id = sid
        self.peer = peer
        self.node = base_pb2.Node()
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.types: dict[str, _TypeState] = {}

    def close(self) -> None:
        """The RPC ended (or the server stops): end the generator, forget the stream."""
        self.queue.put(_CLOSE)
        self.server._stream_closed(self)

    def notify(self, type_urls: list[str]) -> None:
        self.queue.put(("update", type_urls))

    # -- the stream's single thread: grpc's worker iterating this generator ----------

    def run(self, request_iterator: Iterator[Message]) -> Iterator[Message]:
        reader = threading.Thread(
            target=self._read, args=(request_iterator,), name=f"xds-read-{self.id}", daemon=True
        )
        reader.start()
        try:
            while True:
                item = self.queue.get()
                if item is _CLOSE:
                    return
                what, payload = item
                if what == "request":
                    out = self._on_request(payload)
                else:
                    out = []
                    for t in payload:
                        st = self.types.get(t)
                        if st is not None and st.requested:
                            st.dirty = True
                            out.extend(self._maybe_send(t))
                yield from out
        finally:
            self.server._stream_closed(self)

    def _read(self, request_iterator: Iterator[Message]) -> None:
        try:
            for req in request_iterator:
                self.queue.put(("request", req))
        except Exception:
            pass
        finally:
            self.queue.put(_CLOSE)

    def _state(self, type_url: str) -> _TypeState:
        return self.types.setdefault(type_url, _TypeState())

    def _on_request(self, req: Any) -> list[Message]:
        if req.HasField("node") and not self.node.id:
            self.node = req.node
            self.server._stream_identified(self)
        t = req.type_url
        st = self._state(t)
        nonce = req.response_nonce
        has_error = req.HasField("error_detail")
        if has_error and nonce and nonce == st.outstanding:
            kind: RequestKind = "nack"
        elif nonce and nonce == st.outstanding:
            kind = "ack"
        elif not st.requested:
            kind = "initial"
        elif self.mode == "sotw" and nonce and nonce != st.last_nonce:
            kind = "stale"
        else:
            kind = "nack" if has_error else "update"
        if (
            self.mode == "sotw"
            and kind == "ack"
            and req.version_info != self.server._nonce_version(nonce)
        ):
            # Answered without error_detail but not at the sent version: a NACK in the
            # old style (the spec prefers error_detail; tests check it is there).
            kind = "nack"
        self.server._record_request(self, req, kind)
        if nonce and nonce == st.outstanding:
            st.outstanding = None
            if kind == "nack":
                # The client kept what it had: remember what it refused, so that it is
                # sent again only when it changes (or is subscribed to again).
                for n, prev in st.inflight.items():
                    if prev is None:
                        st.known.pop(n, None)
                    else:
                        st.known[n] = prev
                st.rejected.update(st.inflight_versions)
            st.inflight, st.inflight_versions = {}, {}
        if kind == "stale":
            return []
        if self.mode == "sotw":
            self._sotw_subscription(st, req, kind)
        else:
            self._delta_subscription(st, req)
        return self._maybe_send(t)

    # -- subscriptions ------------------------------------------------------------------

    def _sotw_subscription(self, st: _TypeState, req: Any, kind: RequestKind) -> None:
        names = set(req.resource_names)
        before = (st.wildcard, set(st.names), st.requested)
        if "*" in names:
            st.wildcard, st.explicit = True, True
            names.discard("*")
        elif not names and not st.explicit:
            st.wildcard = True  # legacy wildcard
        else:
            st.wildcard = False
            st.explicit = True
        if not st.requested:
            st.first_pending = True
        st.requested = True
        st.names = names
        if (st.wildcard, st.names, True) != before or kind in ("initial", "update"):
            # A changed subscription, or a request that answers no response: the client
            # asks for the current state (Envoy re-requests the unchanged names when a
            # cluster is replaced, and its new EDS watch warms only on a response).
            st.dirty = True
        snap = self.server._snapshot(req.type_url)
        if snap is not None and snap.version != st.sent_version and st.outstanding is None:
            st.dirty = True  # e.g. a new stream, or a change while a response was outstanding

    def _delta_subscription(self, st: _TypeState, req: Any) -> None:
        first = not st.requested
        initial = dict(req.initial_resource_versions)
        if first:
            st.first_pending = True
            st.known = dict(initial)
            if not req.resource_names_subscribe and not req.resource_names_unsubscribe:
                st.wildcard = True  # legacy wildcard
        for n in req.resource_names_subscribe:
            st.explicit = True
            if n == "*":
                st.wildcard = True
                continue
            st.names.add(n)
            st.rejected.pop(n, None)
            # Subscribing always (re)sends, unless the client said which version it has.
            if initial.get(n) is not None:
                st.known[n] = initial[n]
            else:
                st.known.pop(n, None)
        for n in req.resource_names_unsubscribe:
            if n == "*":
                st.wildcard = False
                st.known = {k: v for k, v in st.known.items() if k in st.names}
                continue
            st.names.discard(n)
            st.known.pop(n, None)
            if st.wildcard:
                st.force.add(n)  # the client cannot tell whether the wildcard covers it
        st.requested = True
        st.dirty = True

    # -- responses ----------------------------------------------------------------------

    def _maybe_send(self, type_url: str) -> list[Message]:
        st = self.types[type_url]
        if st.outstanding is not None or not st.dirty:
            return []
        snap = self.server._snapshot(type_url)
        if snap is None:
            return []  # the test has not set this type: answer once it does
        if self.mode == "sotw":
            return self._sotw_response(type_url, st, snap)
        return self._delta_response(type_url, st, snap)

    def _sotw_response(self, type_url: str, st: _TypeState, snap: _TypeSnapshot) -> list[Message]:
        st.dirty = False
        if st.wildcard:
            entries = list(snap.entries.values())
        else:
            entries = [e for n, e in snap.entries.items() if n in st.names]
            if not entries:
                # Nothing requested exists (or nothing is requested any more): for a
                # named type an empty response says nothing, so none is sent.
                return []
        nonce = self.server._next_nonce()
        resp = discovery_pb2.DiscoveryResponse(
            version_info=snap.version,
            type_url=type_url,
            nonce=nonce,
            resources=[e.any for e in snap.with_duplicates(entries)],
        )
        st.outstanding = st.last_nonce = nonce
        st.sent_version = snap.version
        st.first_pending = False
        self.server._record_response(
            self,
            type_url,
            snap.version,
            nonce,
            tuple(e.name for e in snap.with_duplicates(entries)),
            {e.name: e.version for e in entries},
            (),
        )
        return [resp]

    def _delta_response(self, type_url: str, st: _TypeState, snap: _TypeSnapshot) -> list[Message]:
        st.dirty = False
        entries = [
            e
            for n, e in snap.entries.items()
            if (st.wildcard or n in st.names)
            and st.known.get(n) != e.version
            and st.rejected.get(n) != e.version
        ]
        removed: list[str] = []
        for n, v in st.known.items():
            if n not in snap.entries and v != _ABSENT:
                removed.append(n)
        for n in sorted(st.names | st.force):
            if n not in snap.entries and n not in st.known and n not in removed:
                removed.append(n)
        for n in sorted(st.force):
            if n in snap.entries and (st.wildcard or n in st.names):
                e = snap.entries[n]
                if e not in entries:
                    entries.append(e)
        st.force.clear()
        if not entries and not removed and not st.first_pending:
            return []
        nonce = self.server._next_nonce()
        resp = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=snap.version,
            type_url=type_url,
            nonce=nonce,
            resources=[
                discovery_pb2.Resource(name=e.name, version=e.version, resource=e.any)
                for e in snap.with_duplicates(entries)
            ],
            removed_resources=removed,
        )
        replaced = [e for e in entries if st.known.get(e.name) not in (None, _ABSENT)]
        st.inflight = {e.name: st.known.get(e.name) for e in entries}
        st.inflight_versions = {e.name: e.version for e in entries}
        for e in entries:
            st.known[e.name] = e.version
            st.rejected.pop(e.name, None)
        for n in removed:
            if n in st.names:
                st.known[n] = _ABSENT
            else:
                st.known.pop(n, None)
        st.outstanding = st.last_nonce = nonce
        st.first_pending = False
        self.server._record_response(
            self,
            type_url,
            snap.version,
            nonce,
            tuple(e.name for e in snap.with_duplicates(entries)),
            {e.name: e.version for e in entries},
            tuple(removed),
        )
        return [resp, *self._resend_dependents(type_url, replaced)]

    def _resend_dependents(self, type_url: str, replaced: list[_Entry]) -> list[Message]:
        """Delta: a replaced cluster warms only when its ClusterLoadAssignment arrives
        again (Envoy does not re-subscribe, and keeps the old cluster until then), so the
        resources that depend on a replaced resource are sent again after it."""
        dependents = DEPENDENTS.get(type_url)
        if dependents is None or not replaced:
            return []
        out: list[Message] = []
        by_type: dict[str, set[str]] = {}
        for e in replaced:
            for dep_type, dep_name in dependents(e.any):
                by_type.setdefault(dep_type, set()).add(dep_name)
        for dep_type, names in by_type.items():
            dep = self.types.get(dep_type)
            if dep is None or not dep.requested:
                continue
            for n in names:
                if dep.wildcard or n in dep.names:
                    dep.known.pop(n, None)
                    dep.rejected.pop(n, None)
            dep.dirty = True
            out.extend(self._maybe_send(dep_type))
        return out


class _Servicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, server: XdsServer) -> None:
        self.server = server

    def StreamAggregatedResources(
        self, request_iterator: Iterator[Message], context: grpc.ServicerContext
    ) -> Iterator[Message]:
        return self.server._open_stream("sotw", request_iterator, context)

    def DeltaAggregatedResources(
        self, request_iterator: Iterator[Message], context: grpc.ServicerContext
    ) -> Iterator[Message]:
        return self.server._open_stream("delta", request_iterator, context)


# ------------------------------------------------------------------------------------
# the server
# ------------------------------------------------------------------------------------


class XdsServer:
    """ADS management server on ``127.0.0.1:<port>``.

    Resources are set per type with :meth:`set_resources` (replace the type's whole
    set), :meth:`update` (add/replace some), :meth:`remove`, or :meth:`set_snapshot`
    (several types at once, pushed CDS→EDS→LDS→RDS). Each change bumps the type's
    version, returns it, and is pushed to every connected client subscribed to the
    type.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        max_streams: int = 32,
        *,
        tls: ServerTls | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self._max_streams = max_streams
        self._identities: list[PeerIdentity] = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._snapshots: dict[str, _TypeSnapshot] = {}
        self._versions: dict[str, int] = {}
        self._streams: dict[int, _Stream] = {}
        self._requests: list[XdsRequest] = []
        self._responses: list[XdsResponse] = []
        self._nonce_versions: dict[str, str] = {}
        self._nonces = itertools.count(1)
        self._stream_ids = itertools.count(1)
        self._streams_opened = 0
        self._grpc: grpc.Server | None = None
        self._executor: futures.ThreadPoolExecutor | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> XdsServer:
        if self._grpc is not None:
            raise RuntimeError("xDS server already running")
        executor = futures.ThreadPoolExecutor(
            max_workers=self._max_streams, thread_name_prefix="xds"
        )
        server = grpc.server(
            executor,
            maximum_concurrent_rpcs=self._max_streams,
            options=[("grpc.so_reuseport", 0)],
        )
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(_Servicer(self), server)
        address = f"{self.host}:{self.port}"
        if self.tls is not None:
            port = server.add_secure_port(address, self.tls.credentials())
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"xDS server cannot bind {self.host}:{self.port}")
        self.port = port
        server.start()
        self._grpc, self._executor = server, executor
        return self

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop serving: every stream is cancelled and the port is closed. Resources,
        versions and records are kept, so :meth:`restart` resumes where this left off."""
        server, self._grpc = self._grpc, None
        if server is None:
            return
        done = server.stop(grace=None)
        with self._lock:
            streams = list(self._streams.values())
        for s in streams:
            s.close()
        if not done.wait(timeout):
            raise TimeoutError("grpc server did not stop")
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._streams:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self._streams)} xDS streams did not end")
                self._cond.wait(left)

    def restart(self) -> XdsServer:
        """Start again on the same port (after :meth:`stop`)."""
        if self._grpc is not None:
            self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self._grpc is not None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __enter__(self) -> XdsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- resources ----------------------------------------------------------------------

    def set_resources(
        self,
        type_url: str,
        resources: Mapping[str, ResourceValue],
        *,
        version: str | None = None,
        duplicates: Iterable[str] = (),
    ) -> str:
        """Replace the whole set of ``type_url`` resources; returns the new version.

        ``duplicates`` names resources that every response of this version carrying
        them carries twice (a protocol error that clients must NACK).
        """
        return self.set_snapshot(
            {type_url: resources},
            versions={type_url: version},
            duplicates={type_url: duplicates},
        )[type_url]

    def update(
        self, type_url: str, resources: Mapping[str, ResourceValue], *, version: str | None = None
    ) -> str:
        """Add or replace some resources of ``type_url``; returns the new version."""
        with self._lock:
            snap = self._snapshots.get(type_url)
            current = dict(snap.entries) if snap else {}
        merged: dict[str, ResourceValue] = {n: e.any for n, e in current.items()}
        merged.update(resources)
        return self.set_resources(type_url, merged, version=version)

    def remove(self, type_url: str, names: Iterable[str], *, version: str | None = None) -> str:
        """Remove some resources of ``type_url``; returns the new version."""
        gone = set(names)
        with self._lock:
            snap = self._snapshots.get(type_url)
            current = dict(snap.entries) if snap else {}
        missing = gone - set(current)
        if missing:
            raise KeyError(f"{short(type_url)} has no {sorted(missing)}")
        return self.set_resources(
            type_url, {n: e.any for n, e in current.items() if n not in gone}, version=version
        )

    def set_snapshot(
        self,
        resources: Mapping[str, Mapping[str, ResourceValue]],
        *,
        versions: Mapping[str, str | None] | None = None,
        duplicates: Mapping[str, Iterable[str]] | None = None,
    ) -> dict[str, str]:
        """Replace several types at once; pushed in make-before-break order
        (CDS, EDS, LDS, RDS, SDS). Returns the new version of each type."""
        packed: dict[str, dict[str, _Entry]] = {}
        for type_url, named in resources.items():
            if type_url not in RESOURCE_TYPES:
                raise KeyError(f"unknown resource type {type_url}")
            entries: dict[str, _Entry] = {}
            for name, value in named.items():
                a = to_any(type_url, value)
                entries[name] = _Entry(name, _digest(a), a)
            packed[type_url] = entries
        out: dict[str, str] = {}
        with self._lock:
            for type_url, entries in packed.items():
                n = self._versions.get(type_url, 0) + 1
                self._versions[type_url] = n
                v = (versions or {}).get(type_url) or str(n)
                dup = frozenset((duplicates or {}).get(type_url, ()))
                self._snapshots[type_url] = _TypeSnapshot(v, entries, dup)
                out[type_url] = v
            streams = list(self._streams.values())
        order = [t for t in PUSH_ORDER if t in packed] + [t for t in packed if t not in PUSH_ORDER]
        for s in streams:
            s.notify(order)
        return out

    def resources(self, type_url: str) -> dict[str, any_pb2.Any]:
        with self._lock:
            snap = self._snapshots.get(type_url)
            return {n: e.any for n, e in snap.entries.items()} if snap else {}

    def version(self, type_url: str) -> str | None:
        with self._lock:
            snap = self._snapshots.get(type_url)
            return snap.version if snap else None

    def resource_version(self, type_url: str, name: str) -> str:
        """The per-resource version sent in Delta responses."""
        with self._lock:
            return self._snapshots[type_url].entries[name].version

    # -- records ------------------------------------------------------------------------

    def mark(self) -> int:
        """A sequence number: pass it as ``since`` to look only at what comes after."""
        with self._lock:
            return self._peek_seq()

    def requests(
        self,
        type_url: str | None = None,
        *,
        since: int = 0,
        kind: RequestKind | None = None,
        stream_id: int | None = None,
    ) -> list[XdsRequest]:
        with self._lock:
            return [
                r
                for r in self._requests
                if (type_url is None or r.type_url == type_url)
                and r.seq >= since
                and (kind is None or r.kind == kind)
                and (stream_id is None or r.stream_id == stream_id)
            ]

    def responses(
        self, type_url: str | None = None, *, since: int = 0, stream_id: int | None = None
    ) -> list[XdsResponse]:
        with self._lock:
            return [
                r
                for r in self._responses
                if (type_url is None or r.type_url == type_url)
                and r.seq >= since
                and (stream_id is None or r.stream_id == stream_id)
            ]

    def wait_for_request(
        self,
        predicate: Callable[[XdsRequest], bool],
        *,
        since: int = 0,
        timeout: float = DEFAULT_TIMEOUT_S,
        what: str = "xDS request",
    ) -> XdsRequest:
        """The first recorded request (at or after ``since``) matching ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            i = 0
            while True:
                while i < len(self._requests):
                    r = self._requests[i]
                    i += 1
                    if r.seq >= since and predicate(r):
                        return r
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"no {what} within {timeout}s; recorded:\n{self._describe(since)}"
                    )
                self._cond.wait(left)

    def wait_for_ack(
        self,
        type_url: str,
        version: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        *,
        since: int = 0,
        node_id: str | None = None,
    ) -> XdsRequest:
        """Wait for an ACK of ``type_url`` (of the response carrying ``version``, if
        given; raises :class:`XdsNacked` at once if that response is NACKed instead)."""

        def match(r: XdsRequest) -> bool:
            if r.type_url != type_url or (node_id is not None and r.node_id != node_id):
                return False
            if version is not None and r.response_version != version:
                return False
            if r.kind == "nack" and version is not None:
                raise XdsNacked(r)
            return r.kind == "ack"

        return self.wait_for_request(
            match, since=since, timeout=timeout, what=f"ACK of {short(type_url)} {version or ''}"
        )

    def wait_for_nack(
        self,
        type_url: str,
        version: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        *,
        since: int = 0,
        node_id: str | None = None,
    ) -> XdsRequest:
        """Wait for a NACK of ``type_url`` (of the response carrying ``version``)."""

        def match(r: XdsRequest) -> bool:
            return (
                r.type_url == type_url
                and r.kind == "nack"
                and (version is None or r.response_version == version)
                and (node_id is None or r.node_id == node_id)
            )

        return self.wait_for_request(
            match, since=since, timeout=timeout, what=f"NACK of {short(type_url)} {version or ''}"
        )

    def connected_nodes(self) -> list[str]:
        """Node ids of the open streams (a stream counts once its node is known)."""
        with self._lock:
            return [s.node.id for s in self._streams.values() if s.node.id]

    def streams(self) -> list[tuple[int, Mode, str]]:
        """(stream id, mode, node id) of the open streams."""
        with self._lock:
            return [(s.id, s.mode, s.node.id) for s in self._streams.values()]

    def wait_connected(
        self, node_id: str | None = None, *, since_stream: int = 0, timeout: float = 10.0
    ) -> int:
        """Wait for an open stream (with id > ``since_stream``) from ``node_id``; return its id."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for s in self._streams.values():
                    if s.id > since_stream and s.node.id and (node_id in (None, s.node.id)):
                        return s.id
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no xDS stream from {node_id or 'any node'} in {timeout}s")
                self._cond.wait(left)

    def peer_identities(self) -> list[PeerIdentity]:
        """The TLS identity of every stream opened so far (in order)."""
        with self._lock:
            return list(self._identities)

    @property
    def last_stream_id(self) -> int:
        with self._lock:
            return self._streams_opened

    # -- internals (called by streams) ---------------------------------------------------

    def _peek_seq(self) -> int:
        # itertools.count has no peek: the next value is one more than the last given.
        n = len(self._requests) + len(self._responses)
        return n + 1

    def _open_stream(
        self, mode: Mode, request_iterator: Iterator[Message], context: grpc.ServicerContext
    ) -> Iterator[Message]:
        with self._cond:
            sid = next(self._stream_ids)
            self._streams_opened = sid
            stream = _Stream(self, mode, sid, context.peer())
            self._streams[sid] = stream
            self._identities.append(_peer_identity(sid, context))
            self._cond.notify_all()
        context.add_callback(stream.close)
        return stream.run(request_iterator)

    def _stream_identified(self, stream: _Stream) -> None:
        with self._cond:
            self._cond.notify_all()

    def _stream_closed(self, stream: _Stream) -> None:
        with self._cond:
            self._streams.pop(stream.id, None)
            self._cond.notify_all()

    def _snapshot(self, type_url: str) -> _TypeSnapshot | None:
        with self._lock:
            return self._snapshots.get(type_url)

    def _next_nonce(self) -> str:
        with self._lock:
            return str(next(self._nonces))

    def _nonce_version(self, nonce: str) -> str | None:
        with self._lock:
            return self._nonce_versions.get(nonce)

    def _record_request(self, stream: _Stream, req: Any, kind: RequestKind) -> None:
        err = req.error_detail if req.HasField("error_detail") else None
        common: dict[str, Any] = {
            "stream_id": stream.id,
            "mode": stream.mode,
            "type_url": req.type_url,
            "kind": kind,
            "node_id": stream.node.id,
            "node": stream.node,
            "response_nonce": req.response_nonce,
            "error_detail": err.message if err is not None else None,
            "error_code": err.code if err is not None else None,
            "raw": req,
        }
        if stream.mode == "sotw":
            common.update(version_info=req.version_info, resource_names=tuple(req.resource_names))
        else:
            common.update(
                subscribe=tuple(req.resource_names_subscribe),
                unsubscribe=tuple(req.resource_names_unsubscribe),
                initial_resource_versions=dict(req.initial_resource_versions),
            )
        with self._cond:
            rec = XdsRequest(
                seq=self._peek_seq(),
                response_version=self._nonce_versions.get(req.response_nonce),
                **common,
            )
            self._requests.append(rec)
            self._cond.notify_all()

    def _record_response(
        self,
        stream: _Stream,
        type_url: str,
        version: str,
        nonce: str,
        names: tuple[str, ...],
        versions: dict[str, str],
        removed: tuple[str, ...],
    ) -> None:
        with self._cond:
            self._nonce_versions[nonce] = version
            self._responses.append(
                XdsResponse(
                    seq=self._peek_seq(),
                    stream_id=stream.id,
                    mode=stream.mode,
                    type_url=type_url,
                    version=version,
                    nonce=nonce,
                    resource_names=names,
                    resource_versions=versions,
                    removed=removed,
                )
            )
            self._cond.notify_all()

    def _describe(self, since: int) -> str:
        lines = []
        for r in sorted(
            [*(x for x in self._requests if x.seq >= since)],
            key=lambda x: x.seq,
        )[-40:]:
            lines.append(
                f"  #{r.seq} s{r.stream_id} {short(r.type_url)} {r.kind} nonce={r.response_nonce!r}"
                f" version_info={r.version_info!r} names={list(r.resource_names or r.subscribe)}"
                + (f" error={r.error_detail!r}" if r.error_detail else "")
            )
        return "\n".join(lines) or "  (nothing)"

    def describe(self, since: int = 0) -> str:
        """Requests and responses so far, one a line, for assertion messages."""
        with self._lock:
            rows: list[tuple[int, str]] = []
            for r in self._requests:
                if r.seq >= since:
                    rows.append(
                        (
                            r.seq,
                            f"-> s{r.stream_id} {short(r.type_url)} {r.kind}"
                            f" nonce={r.response_nonce!r} v={r.version_info!r}"
                            f" names={list(r.resource_names)} sub={list(r.subscribe)}"
                            f" unsub={list(r.unsubscribe)}"
                            f" initial={dict(r.initial_resource_versions)}"
                            + (f" error={r.error_detail!r}" if r.error_detail else ""),
                        )
                    )
            for p in self._responses:
                if p.seq >= since:
                    rows.append(
                        (
                            p.seq,
                            f"<- s{p.stream_id} {short(p.type_url)} v={p.version!r}"
                            f" nonce={p.nonce!r} resources={list(p.resource_names)}"
                            f" removed={list(p.removed)}",
                        )
                    )
        return "\n".join(f"#{seq} {text}" for seq, text in sorted(rows)) or "(nothing)"


def _peer_identity(stream_id: int, context: grpc.ServicerContext) -> PeerIdentity:
    auth = context.auth_context() or {}

    def first(key: str) -> str | None:
        values = auth.get(key) or []
        return values[0].decode() if values else None

    sans = tuple(v.decode() for v in auth.get("x509_subject_alternative_name") or [])
    return PeerIdentity(
        stream_id, first("transport_security_type"), first("x509_common_name"), sans
    )


class XdsNacked(AssertionError):
    """The client NACKed the response a test waited to see ACKed."""

    def __init__(self, request: XdsRequest) -> None:
        super().__init__(
            f"{short(request.type_url)} version {request.response_version} NACKed: "
            f"{request.error_detail}"
        )
        self.request = request


def wait_all_acked(
    server: XdsServer,
    versions: Mapping[str, str],
    *,
    since: int = 0,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> dict[str, XdsRequest]:
    """Wait for the ACK of each ``{type_url: version}``; returns the ACKs by type."""
    out = {}
    deadline = time.monotonic() + timeout
    for type_url, version in versions.items():
        out[type_url] = server.wait_for_ack(
            type_url, version, since=since, timeout=max(0.0, deadline - time.monotonic())
        )
    return out
