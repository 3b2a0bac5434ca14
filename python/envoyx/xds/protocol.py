"""The xDS protocol of one stream, State of the World or Delta, without any I/O.

A :class:`StreamProtocol` keeps, per resource type, what the xDS spec asks a client to
keep (envoy docs, api-docs/xds_protocol): the version last accepted, the nonce of the
latest response (of every response, even one that is ignored), the subscribed names,
and (Delta) each resource's version. :meth:`StreamProtocol.handle` takes one response,
applies what it can through the :class:`~envoyx.xds.applier.Applier` and answers with
an ACK or a NACK; requests go out through the ``send`` callable given at construction
(the transport's queue; dropped while disconnected).

What is done as Envoy 1.40 does:

- ACK: SotW ``version_info`` = the response's, ``response_nonce`` = its nonce; Delta
  ``response_nonce`` only.
- NACK: the same with SotW ``version_info`` = the version still in use, and
  ``error_detail`` (``google.rpc.Status``, code ``INTERNAL`` as Envoy sends) naming each
  rejected resource: ``Error adding/updating cluster(s) a: why, b: why``.
- A partly invalid response: its valid resources are applied (and, SotW, the absent
  LDS/CDS resources removed), the response is NACKed, so the version stays the old one.
- A name twice in a SotW response: the first is applied, the others rejected
  (``duplicate cluster c found``); in Delta the whole response is rejected
  (``duplicate name c found among added/updated resources``).
- A resource that does not decode, or whose type is not the response's: the whole
  response is rejected.
- Wildcard LDS/CDS (SotW: no names; Delta: nothing subscribed, the legacy wildcard);
  RDS/EDS by name, the whole set in each SotW request; Delta subscribes and
  unsubscribes the difference.
- A new stream: SotW sends each type's accepted version and no nonce; Delta sends
  ``initial_resource_versions`` of every resource it holds.
- A resource refused before is answered with the same error without being decoded
  again when its bytes come back unchanged on the same stream and nothing changed in
  the core since (:meth:`~envoyx.xds.applier.Applier.known_rejection`): Envoy parses
  each resend.
- SDS (``Secret``) is named like RDS/EDS. A Delta ``removed_resources`` naming a
  subscribed secret is ACKed and counted as a successful update of it; Envoy keeps a
  secret it has, and what waits for one it lacks stops waiting: those names go to the
  core as removed.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.rpc import status_pb2  # type: ignore[import-untyped]

from envoyx.xds.applier import Applier, Prepared, ResourceRejected
from envoyx.xds.resources import (
    ENDPOINT,
    ORDER,
    RESOURCE_WRAPPER,
    ROUTE,
    SCOPED_ROUTE,
    SECRET,
    TYPES,
    ResourceType,
)
from envoyx.xds.settings import Source

__all__ = ["NACK_CODE", "Awaited", "StreamProtocol", "TypeState"]

_log = logging.getLogger("envoyx.xds")

#: ``error_detail.code`` of a NACK: Envoy sends INTERNAL (13).
NACK_CODE = 13

#: ``DiscoveryRequest`` or ``DeltaDiscoveryRequest`` (xds-protos has no type stubs).
Request: TypeAlias = Any
#: ``DiscoveryResponse`` or ``DeltaDiscoveryResponse``.
Response: TypeAlias = Any


@dataclass
class TypeState:
    """What a stream keeps of one resource type."""

    rtype: ResourceType
    wildcard: bool
    active: bool = True  # LDS waits until the clusters are initialized, as in Envoy
    names: set[str] = field(default_factory=set)  # named subscription
    version: str = ""  # SotW version_info / Delta system_version_info last accepted
    nonce: str = ""  # of the latest response on the current stream
    last_error: str | None = None
    resources: dict[str, str] = field(default_factory=dict)  # held: name -> version
    # the current stream
    sent: bool = False  # a request of this type went out
    sent_names: set[str] = field(default_factory=set)  # Delta: what the server knows
    # initial fetch (start-up warming)
    started_at: float | None = None
    initial_done: bool = False
    received: set[str] = field(default_factory=set)  # names answered (or timed out)
    subscribed_at: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Item:
    """One resource of a response, decoded (``msg`` None: refused before, ``rejected``
    says why)."""

    name: str
    msg: Any
    version: str  # Delta: the resource's version
    digest: bytes = b""  # of the bytes received (type URL and value)
    rejected: str | None = None


def _raw_digest(resource: any_pb2.Any) -> bytes:
    h = hashlib.blake2b(resource.type_url.encode(), digest_size=16)
    h.update(b"\0")
    h.update(resource.value)
    return h.digest()


class _Fatal(Exception):
    """The whole response is rejected."""


@dataclass(frozen=True)
class Awaited:
    """What an ACK/NACK waits for: resources, as (type URL, name) (the endpoints and
    secrets of the clusters an update brought), until ``deadline`` (monotonic; None: no
    limit)."""

    names: frozenset[tuple[str, str]]
    deadline: float | None


@dataclass
class _Held:
    request: Request
    waiting: set[tuple[str, str]]
    deadline: float | None


class StreamProtocol:
    """The protocol state of one stream (it survives reconnections)."""

    def __init__(
        self,
        source: Source,
        applier: Applier,
        node: Any,
        *,
        send: Callable[[Request], None],
        on_applied: Callable[[str, list[str]], Awaited | None] = lambda type_url, changed: None,
        on_answered: Callable[[str, set[str]], None] = lambda type_url, names: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.delta = source.delta
        self.applier = applier
        self.stats = applier.stats
        self.node = node
        self._send = send
        self._on_applied = on_applied
        self._on_answered = on_answered
        self._clock = clock
        self.types: dict[str, TypeState] = {}
        self.connected = False
        self._node_sent = False
        # replies held until the resources they wait for are answered, by type
        self.held: dict[str, _Held] = {}

    # -- subscriptions ---------------------------------------------------------------------

    def _ordered(self) -> list[TypeState]:
        known = [self.types[t] for t in ORDER if t in self.types]
        return known + [s for t, s in self.types.items() if t not in ORDER]

    def add_wildcard(self, type_url: str, *, active: bool = True) -> TypeState:
        """Subscribe to every resource of ``type_url`` (LDS, CDS)."""
        st = self.types.get(type_url)
        if st is None:
            st = self.types[type_url] = TypeState(TYPES[type_url], wildcard=True, active=False)
        st.wildcard = True
        if active:
            self.activate(type_url)
        return st

    def activate(self, type_url: str) -> None:
        """Start a subscription added inactive (sends its first request if connected)."""
        st = self.types[type_url]
        if st.active:
            return
        st.active = True
        st.started_at = self._clock()
        self.stats.started(self.applier.stat_prefixes(type_url, ""))
        if self.connected:
            self._send_initial(st)

    def set_names(self, type_url: str, names: Iterable[str]) -> None:
        """Subscribe to exactly ``names`` of ``type_url`` (RDS, EDS): SotW sends the
        whole set, Delta what changed."""
        wanted = set(names)
        st = self.types.get(type_url)
        if st is None:
            if not wanted:
                return
            st = self.types[type_url] = TypeState(TYPES[type_url], wildcard=False)
        if st.wildcard or wanted == st.names:
            return
        now = self._clock()
        added = wanted - st.names
        for name in sorted(added):
            st.subscribed_at[name] = now
            self.stats.started(self.applier.stat_prefixes(type_url, name))
        for name in st.names - wanted:
            st.resources.pop(name, None)
            st.received.discard(name)
            st.subscribed_at.pop(name, None)
        st.names = wanted
        if not (self.connected and st.active):
            return
        if not st.sent:
            if wanted:
                self._send_initial(st)
            return
        if self.delta:
            subscribe = sorted(wanted - st.sent_names)
            unsubscribe = sorted(st.sent_names - wanted)
            st.sent_names = set(wanted)
            if subscribe or unsubscribe:
                self._send(self._delta_request(st, subscribe=subscribe, unsubscribe=unsubscribe))
        else:
            self._send(self._sotw_request(st))

    # -- connection --------------------------------------------------------------------------

    def connect(self) -> None:
        """A new stream is open: send each active subscription's first request."""
        self.applier.forget_rejections()
        self.connected = True
        self._node_sent = False
        self.held.clear()
        for st in self.types.values():
            st.nonce = ""
            st.sent = False
            st.sent_names = set()
        for st in self._ordered():
            if st.active and (st.wildcard or st.names):
                self._send_initial(st)

    def disconnect(self) -> None:
        """The stream ended: Envoy counts an ``update_failure`` per subscription."""
        was = self.connected
        self.connected = False
        self.held.clear()  # their nonces mean nothing on the next stream
        if not was:
            return
        for st in self._ordered():
            if not st.active or not st.sent:
                continue
            if st.wildcard:
                self.stats.failure(self.applier.stat_prefixes(st.rtype.type_url, ""))
            else:
                for name in sorted(st.names):
                    self.stats.failure(self.applier.stat_prefixes(st.rtype.type_url, name))

    # -- requests ------------------------------------------------------------------------

    def _node(self) -> Any:
        if self.source.node_first_only and self._node_sent:
            return None
        self._node_sent = True
        return self.node

    def _send_initial(self, st: TypeState) -> None:
        st.sent = True
        if self.delta:
            names = sorted(st.names) if not st.wildcard else []
            st.sent_names = set(names)
            initial = {n: v for n, v in st.resources.items() if st.wildcard or n in st.names}
            self._send(self._delta_request(st, subscribe=names, initial=initial))
        else:
            self._send(self._sotw_request(st))

    def _sotw_request(
        self, st: TypeState, *, version: str | None = None, error: str | None = None
    ) -> discovery_pb2.DiscoveryRequest:
        req = discovery_pb2.DiscoveryRequest(
            version_info=st.version if version is None else version,
            type_url=st.rtype.type_url,
            response_nonce=st.nonce,
            resource_names=[] if st.wildcard else sorted(st.names),
        )
        node = self._node()
        if node is not None:
            req.node.CopyFrom(node)
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=NACK_CODE, message=error))
        return req

    def _delta_request(
        self,
        st: TypeState,
        *,
        subscribe: Iterable[str] = (),
        unsubscribe: Iterable[str] = (),
        initial: dict[str, str] | None = None,
        nonce: str = "",
        error: str | None = None,
    ) -> discovery_pb2.DeltaDiscoveryRequest:
        req = discovery_pb2.DeltaDiscoveryRequest(
            type_url=st.rtype.type_url,
            resource_names_subscribe=list(subscribe),
            resource_names_unsubscribe=list(unsubscribe),
            initial_resource_versions=initial or {},
            response_nonce=nonce,
        )
        node = self._node()
        if node is not None:
            req.node.CopyFrom(node)
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=NACK_CODE, message=error))
        return req

    # -- responses ---------------------------------------------------------------------------

    def handle(self, response: Response) -> None:
        """Process one response: apply, then ACK or NACK."""
        type_url = response.type_url
        st = self.types.get(type_url)
        if st is None:
            rtype = TYPES.get(type_url)
            if rtype is None:
                _log.warning("ignoring an xDS response of type %s, not subscribed to", type_url)
                return
            # Not subscribed (any more): keep its nonce, apply nothing.
            st = self.types[type_url] = TypeState(rtype, wildcard=False)
            st.nonce = response.nonce
            _log.warning("ignoring an xDS response of %s, not subscribed to", rtype.short)
            return
        self._release(type_url)  # answer the previous response before this one
        st.nonce = response.nonce
        if not st.active:  # LDS before the clusters are initialized: not asked for yet
            _log.warning("ignoring an xDS response of %s, not subscribed to yet", st.rtype.short)
            return
        if isinstance(response, discovery_pb2.DeltaDiscoveryResponse):
            version = response.system_version_info
            self._handle_delta(st, response, version)
        else:
            version = response.version_info
            self._handle_sotw(st, response, version)

    def _handle_sotw(
        self, st: TypeState, response: discovery_pb2.DiscoveryResponse, version: str
    ) -> None:
        rtype = st.rtype
        try:
            items = [self._decode_sotw(rtype, a) for a in response.resources]
        except _Fatal as e:
            self._reject_whole(st, str(e), version)
            return
        present = {item.name for item in items}
        removed = sorted(n for n in st.resources if n not in present) if st.wildcard else []
        errors: list[tuple[str, str]] = []
        counts: dict[str, int] = {}
        for item in items:
            counts[item.name] = counts.get(item.name, 0) + 1
        candidates: list[_Item] = []
        reported: set[str] = set()
        for item in items:
            if counts[item.name] > 1:
                # No copy is applied (Envoy's LDS/CDS apply the first: an artefact of
                # their loop; its RDS/EDS do not check): what the server meant is unknown.
                if item.name not in reported:
                    reported.add(item.name)
                    errors.append((item.name, f"duplicate {rtype.noun} {item.name} found"))
                continue
            if not st.wildcard and item.name not in st.names:
                _log.debug("ignoring %s %s, not subscribed to", rtype.short, item.name)
                continue
            candidates.append(item)
        self._apply(st, candidates, removed, version, errors)

    def _handle_delta(
        self, st: TypeState, response: discovery_pb2.DeltaDiscoveryResponse, version: str
    ) -> None:
        rtype = st.rtype
        try:
            items: list[_Item] = []
            for resource in response.resources:
                item = self._decode_delta(rtype, resource)
                if item is not None:
                    items.append(item)
            names = [r.name for r in response.resources]
            dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
            if dup is not None:
                raise _Fatal(f"duplicate name {dup} found among added/updated resources")
        except _Fatal as e:
            self._reject_whole(st, str(e), version)
            return
        errors: list[tuple[str, str]] = []
        candidates: list[_Item] = []
        for item in items:
            if not st.wildcard and item.name not in st.names:
                _log.debug("ignoring %s %s, not subscribed to", rtype.short, item.name)
                continue
            candidates.append(item)
        gone = list(response.removed_resources)
        updated: list[str] = []
        if st.wildcard:
            removed = [n for n in gone if n in st.resources]
        elif rtype.type_url == SECRET:
            # Envoy ignores the removal of a secret it has, but what waits for one it
            # lacks stops waiting (a listener goes active without its certificate): the
            # core is told of those, and each counts as a successful update, as in Envoy.
            removed = [n for n in gone if n in st.names and n not in st.resources]
            updated = [n for n in gone if n in st.names]
            for name in gone:
                st.resources.pop(name, None)
        else:
            # RDS/EDS: Envoy keeps what it has (an active cluster keeps its endpoints,
            # a route configuration goes when no listener names it); only forget it.
            # Envoy's RDS subscription ignores the removal and succeeds: counted so.
            removed = []
            if rtype.type_url == ROUTE:
                updated = [n for n in gone if n in st.names]
            for name in gone:
                st.resources.pop(name, None)
        self._apply(
            st, candidates, removed, version, errors, also_answered=gone, also_updated=updated
        )

    def _decode_sotw(self, rtype: ResourceType, resource: any_pb2.Any) -> _Item:
        digest = _raw_digest(resource)
        known = self.applier.known_rejection(rtype.type_url, digest)
        if known is not None:
            return _Item(known[0], None, "", digest, known[1])
        version = ""
        if resource.type_url == RESOURCE_WRAPPER:
            wrapper = discovery_pb2.Resource()
            try:
                wrapper.ParseFromString(resource.value)
            except Exception as e:
                raise _Fatal(f"cannot decode a {RESOURCE_WRAPPER}: {e}") from e
            version = wrapper.version
            resource = wrapper.resource
        if resource.type_url != rtype.type_url:
            raise _Fatal(
                f"{resource.type_url} does not match the message-wide type URL "
                f"{rtype.type_url} in DiscoveryResponse"
            )
        try:
            msg = rtype.decode(resource.value)
        except ValueError as e:
            raise _Fatal(str(e)) from e
        return _Item(rtype.name_of(msg), msg, version, digest)

    def _decode_delta(self, rtype: ResourceType, resource: Any) -> _Item | None:
        if not resource.HasField("resource"):
            return None  # a heartbeat (TTL refresh) carries no resource
        body = resource.resource
        digest = _raw_digest(body)
        known = self.applier.known_rejection(rtype.type_url, digest)
        if known is not None and (not resource.name or resource.name == known[0]):
            return _Item(known[0], None, resource.version, digest, known[1])
        if body.type_url != rtype.type_url:
            raise _Fatal(
                f"{body.type_url} does not match the message-wide type URL "
                f"{rtype.type_url} in DeltaDiscoveryResponse"
            )
        try:
            msg = rtype.decode(body.value)
        except ValueError as e:
            raise _Fatal(str(e)) from e
        return _Item(resource.name or rtype.name_of(msg), msg, resource.version, digest)

    def _apply(
        self,
        st: TypeState,
        candidates: list[_Item],
        removed: list[str],
        version: str,
        errors: list[tuple[str, str]],
        also_answered: Iterable[str] = (),
        also_updated: Iterable[str] = (),
    ) -> None:
        rtype = st.rtype
        type_url = rtype.type_url
        prepared: list[tuple[_Item, Prepared]] = []
        for item in candidates:
            if item.rejected is not None:
                errors.append((item.name, item.rejected))
                continue
            own = rtype.name_of(item.msg)
            if own != item.name:
                errors.append(
                    (
                        item.name,
                        f"resource name {item.name} does not match the {rtype.noun} name {own!r}",
                    )
                )
                continue
            try:
                # An assignment is known by the digest of its bytes (serializing 10,000
                # endpoints again costs 5 ms); the others by their deterministic
                # serialization: a server's map order may vary, and an unchanged
                # cluster or listener must not be rebuilt.
                ready = self.applier.prepare(
                    type_url,
                    item.msg,
                    parent=self.source,
                    digest=item.digest if type_url == ENDPOINT else None,
                )
                prepared.append((item, ready))
            except ResourceRejected as e:
                errors.append((item.name, str(e)))
                self.applier.remember_rejected(type_url, item.digest, item.name, str(e))
        try:
            rejected = self._apply_groups(type_url, prepared, removed, version)
        except Exception as e:  # the core failed as a whole: nothing was applied
            _log.exception("applying %s version %s failed", rtype.short, version)
            self._reject_whole(st, f"{rtype.short} update failed: {e}", version)
            return
        accepted: list[str] = []
        for item, _ in prepared:
            if item.name in rejected:
                errors.append((item.name, rejected[item.name]))
                self.applier.remember_rejected(
                    type_url, item.digest, item.name, rejected[item.name]
                )
                continue
            st.resources[item.name] = item.version if self.delta else version
            accepted.append(item.name)
        for name in removed:
            st.resources.pop(name, None)
        succeeded = list(dict.fromkeys([*accepted, *also_updated]))
        answered = {item.name for item in candidates} | {n for n, _ in errors}
        answered |= set(also_answered)
        order = {item.name: i for i, item in enumerate(candidates)}
        errors.sort(key=lambda e: order.get(e[0], len(order)))
        if errors:
            message = f"Error adding/updating {rtype.noun}(s) " + ", ".join(
                f"{name}: {why}" for name, why in errors
            )
            reply = self._nack(st, message, version)
            if st.wildcard:
                self.stats.rejected(self.applier.stat_prefixes(type_url, ""))
            else:
                failed = {n for n, _ in errors}
                for name in sorted(failed & st.names):
                    self.stats.rejected(self.applier.stat_prefixes(type_url, name))
                for name in succeeded:
                    self.stats.success(self.applier.stat_prefixes(type_url, name), version)
        else:
            reply = self._ack(st, version)
            if st.wildcard:
                self.stats.success(self.applier.stat_prefixes(type_url, ""), version)
            else:
                for name in succeeded:
                    self.stats.success(self.applier.stat_prefixes(type_url, name), version)
        st.initial_done = True
        awaited = None
        if accepted or removed:
            changed = {item.name for item, p in prepared if p.json is not None}
            awaited = self._on_applied(type_url, [n for n in accepted if n in changed])
        self._reply(st, reply, awaited)
        if not st.wildcard:
            self._answered(st, answered)

    def _answered(self, st: TypeState, names: set[str]) -> None:
        subscribed = names & st.names
        st.received |= subscribed
        if subscribed:
            self._on_answered(st.rtype.type_url, subscribed)

    def _reply(self, st: TypeState, reply: Request, awaited: Awaited | None) -> None:
        """Send an ACK/NACK, or hold it until what it waits for is answered (as Envoy
        answers CDS only once the clusters it brought are warm, i.e. have endpoints)."""
        if awaited is None or not awaited.names:
            self._send(reply)
            return
        self.held[st.rtype.type_url] = _Held(reply, set(awaited.names), awaited.deadline)

    def _release(self, type_url: str) -> None:
        held = self.held.pop(type_url, None)
        if held is not None and self.connected:
            self._send(held.request)

    def answered(self, type_url: str, names: set[str]) -> None:
        """Resources of ``type_url`` were answered (on any stream): send the replies
        that waited only for them."""
        for key, held in list(self.held.items()):
            held.waiting -= {(type_url, name) for name in names}
            if not held.waiting:
                self._release(key)

    def prune(self, type_url: str, wanted: set[str]) -> None:
        """Stop waiting for ``type_url`` names no longer subscribed to."""
        for key, held in list(self.held.items()):
            held.waiting = {(t, n) for t, n in held.waiting if t != type_url or n in wanted}
            if not held.waiting:
                self._release(key)

    def expire(self, now: float) -> float | None:
        """Send the held replies whose deadline passed; the nearest other deadline."""
        nearest: float | None = None
        for key, held in list(self.held.items()):
            if held.deadline is None:
                continue
            if held.deadline <= now:
                _log.warning(
                    "xDS: %s answered without waiting further for %s",
                    TYPES[key].short,
                    ", ".join(f"{TYPES[t].short} {n}" for t, n in sorted(held.waiting)),
                )
                self._release(key)
            else:
                nearest = held.deadline if nearest is None else min(nearest, held.deadline)
        return nearest

    def _apply_groups(
        self,
        type_url: str,
        prepared: list[tuple[_Item, Prepared]],
        removed: list[str],
        version: str,
    ) -> dict[str, str]:
        """SotW: one ``core.apply`` with the response's version. Delta: each resource
        has its own version (what ``/config_dump`` shows), so one call per version
        (the removals go with the first) — but SRDS, whose update Envoy applies (or
        refuses) as a whole under the response's version."""
        if not self.delta or type_url == SCOPED_ROUTE:
            return self.applier.apply(type_url, [p for _, p in prepared], removed, version)
        groups: dict[str, list[Prepared]] = {}
        for item, ready in prepared:
            if ready.json is not None:
                groups.setdefault(item.version or version, []).append(ready)
        if not groups:
            return self.applier.apply(type_url, [], removed, version)
        rejected: dict[str, str] = {}
        for n, (group_version, group) in enumerate(groups.items()):
            rejected.update(
                self.applier.apply(type_url, group, removed if n == 0 else [], group_version)
            )
        if TYPES[type_url].wildcard and (len(groups) > 1 or next(iter(groups)) != version):
            # the type's own version_info (LDS/CDS in /config_dump) is the response's
            self.applier.set_version(type_url, version)
        return rejected

    def _reject_whole(self, st: TypeState, message: str, version: str) -> None:
        _log.warning("%s update (version %s) rejected: %s", st.rtype.short, version, message)
        self._send(self._nack(st, message, version))
        type_url = st.rtype.type_url
        if st.wildcard:
            self.stats.rejected(self.applier.stat_prefixes(type_url, ""))
        else:
            for name in sorted(st.names):
                self.stats.rejected(self.applier.stat_prefixes(type_url, name))
            # as Envoy: a rejected update ends the wait for these resources
            self._answered(st, set(st.names))
        st.initial_done = True

    def _ack(self, st: TypeState, version: str) -> Request:
        st.version = version
        st.last_error = None
        if self.delta:
            return self._delta_request(st, nonce=st.nonce)
        return self._sotw_request(st)

    def _nack(self, st: TypeState, message: str, version: str) -> Request:
        # the same refusal again (a server resending it) is logged once
        log = _log.debug if message == st.last_error else _log.warning
        st.last_error = message
        log("NACK %s version %s: %s", st.rtype.short, version, message)
        if self.delta:
            return self._delta_request(st, nonce=st.nonce, error=message)
        return self._sotw_request(st, error=message)

    # -- inspection ------------------------------------------------------------------------

    def status(self) -> dict[str, dict[str, Any]]:
        return {
            st.rtype.type_url: {
                "version": st.version,
                "nonce": st.nonce,
                "last_error": st.last_error,
                "resources": sorted(st.resources),
            }
            for st in self._ordered()
            if st.active and (st.wildcard or st.names or st.resources or st.nonce)
        }
