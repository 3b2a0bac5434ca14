"""The one path by which xDS resources reach the core, for the xDS client and for
:meth:`envoyx.Server.update` alike.

:meth:`Applier.prepare` checks one resource (Envoy's schema rules, its config sources)
and gives its canonical proto-JSON; :meth:`Applier.apply` hands a type's changes to
``core.apply``. A resource identical to the one the core holds is not handed again, as
Envoy does not rebuild an unchanged cluster or listener (its ``version_info`` stays that
of the update that brought it). The applier also remembers what each listener and
cluster names (route configurations, EDS services, SDS secrets), to route those
subscriptions and to name their stats.

It remembers the resources it refused too (by a digest of their bytes as received, see
:meth:`Applier.remember_rejected`): a management server that answers a NACK by sending
the same bytes again (go-control-plane's and java-control-plane's caches do, at once,
thousands of times a second) is answered with the same NACK without the resource being
decoded, checked or mapped again, for as long as nothing else the core holds changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap
from google.protobuf import json_format
from google.protobuf.message import Message

from envoyx.config.rules import rule_errors
from envoyx.xds._eds import check_and_encode
from envoyx.xds._hash import version_gauge
from envoyx.xds.resources import (
    CLUSTER,
    DEPENDENT_TYPES,
    ENDPOINT,
    LISTENER,
    ROUTE,
    SCOPED_ROUTE,
    SCOPED_ROUTE_TABLES,
    TYPES,
    Dependency,
    dependencies,
)
from envoyx.xds.settings import ResolvedSource, Source, SourceError, XdsSettings

__all__ = ["Applier", "Core", "Prepared", "ResourceRejected", "XdsStats"]

_log = logging.getLogger("envoyx.xds")

#: Envoy's stats of one xDS subscription (``<prefix>.update_success``, ...).
SUBSCRIPTION_COUNTERS = (
    "update_attempt",
    "update_success",
    "update_rejected",
    "update_failure",
    "init_fetch_timeout",
)
SUBSCRIPTION_GAUGES = ("version", "update_time")
#: Counters Envoy keeps beside a subscription's, by stat prefix: an SDS secret's
#: ``sds.<name>.key_rotation_failed`` (certificate files that failed to reload).
EXTRA_COUNTERS = {"sds.": ("key_rotation_failed",)}
#: How many refused resources are remembered (beyond it the memory starts afresh).
REJECTED_MEMORY = 1024
#: Where Envoy counts the wildcard subscriptions.
TYPE_STAT_PREFIX = {LISTENER: "listener_manager.lds.", CLUSTER: "cluster_manager.cds."}


class Core(Protocol):
    """What the applier and the xDS client use of ``envoyx._core.Server``."""

    def apply(
        self,
        type_url: str,
        resources: list[tuple[str, str]],
        removed: list[str],
        version_info: str,
    ) -> list[tuple[str, str]]: ...

    def wanted_resources(self, type_url: str) -> list[str]: ...

    def counter_add(self, name: str, value: int) -> None: ...

    def gauge_set(self, name: str, value: int) -> None: ...


class ResourceRejected(ValueError):
    """One resource cannot be applied; the message says why (with field paths)."""


@dataclass(frozen=True)
class Prepared:
    """A checked resource ready for ``core.apply``; ``json`` is None when the core
    already holds this exact resource."""

    name: str
    json: str | None
    digest: bytes
    dependencies: tuple[tuple[Dependency, ResolvedSource], ...]


def canonical_json(msg: Message) -> str:
    """The canonical proto-JSON the core takes (snake_case names, ``@type`` in Anys)."""
    document = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


def schema_errors(msg: Message, path: str = "") -> list[str]:
    """Envoy's protoc-gen-validate rules (and unknown ``@type``s) broken by ``msg``."""
    return rule_errors(msg, path)


def _digest(msg: Message) -> bytes:
    return hashlib.blake2b(msg.SerializeToString(deterministic=True), digest_size=16).digest()


class XdsStats:
    """Envoy's xDS stats, kept in the core's stat store (so they show in ``/stats``)."""

    def __init__(self, core: Core) -> None:
        self._core = core
        self._registered: set[str] = set()

    def counter(self, name: str, value: int = 1) -> None:
        # AttributeError: a core without xDS stats (a test's fake may have none)
        with contextlib.suppress(AttributeError):
            self._core.counter_add(name, value)

    def gauge(self, name: str, value: int) -> None:
        try:
            self._core.gauge_set(name, value)
        except OverflowError:
            # A core whose gauges are signed 64-bit: keep the low 63 bits.
            self._core.gauge_set(name, value & 0x7FFF_FFFF_FFFF_FFFF)
        except AttributeError:
            pass

    def register(self, prefixes: Iterable[str]) -> None:
        """Create a subscription's stats at zero, as Envoy shows them before any update."""
        for prefix in prefixes:
            if prefix in self._registered:
                continue
            self._registered.add(prefix)
            extra = [
                name
                for start, names in EXTRA_COUNTERS.items()
                if prefix.startswith(start)
                for name in names
            ]
            for name in (*SUBSCRIPTION_COUNTERS, *extra):
                self.counter(prefix + name, 0)
            for name in SUBSCRIPTION_GAUGES:
                self.gauge(prefix + name, 0)

    def started(self, prefixes: Iterable[str]) -> None:
        prefixes = list(prefixes)
        self.register(prefixes)
        for prefix in prefixes:
            self.counter(prefix + "update_attempt")

    def success(self, prefixes: Iterable[str], version_info: str) -> None:
        now_ms = int(time.time() * 1000)
        for prefix in prefixes:
            self.register([prefix])
            self.counter(prefix + "update_attempt")
            self.counter(prefix + "update_success")
            self.gauge(prefix + "version", version_gauge(version_info))
            self.gauge(prefix + "update_time", now_ms)

    def rejected(self, prefixes: Iterable[str]) -> None:
        for prefix in prefixes:
            self.register([prefix])
            self.counter(prefix + "update_attempt")
            self.counter(prefix + "update_rejected")

    def failure(self, prefixes: Iterable[str]) -> None:
        for prefix in prefixes:
            self.register([prefix])
            self.counter(prefix + "update_attempt")
            self.counter(prefix + "update_failure")

    def init_fetch_timeout(self, prefixes: Iterable[str]) -> None:
        # Envoy counts an attempt for every outcome, a timed-out initial fetch too.
        for prefix in prefixes:
            self.register([prefix])
            self.counter(prefix + "update_attempt")
            self.counter(prefix + "init_fetch_timeout")


class Applier:
    """Applies resources to the core; one lock (:attr:`lock`) serialises every change
    and guards the xDS client's state too."""

    def __init__(
        self, core: Core, bootstrap: Bootstrap, settings: XdsSettings | None = None
    ) -> None:
        self.core = core
        self.settings = settings
        self.lock = threading.RLock()
        self.stats = XdsStats(core)
        # what the core holds, by type then name: the digest of the resource
        self._digests: dict[str, dict[str, bytes]] = {t: {} for t in TYPES}
        # what each listener / cluster names: (parent type, parent name) -> dependencies
        self._deps: dict[tuple[str, str], tuple[tuple[Dependency, ResolvedSource], ...]] = {}
        # bumped by every change the core takes: a refusal may depend on what it holds
        self.generation = 0
        # refused resources: (type, digest of the bytes received) -> (name, why, generation)
        self._rejected: dict[tuple[str, bytes], tuple[str, str, int]] = {}
        # the route configuration each SRDS scope the core holds names
        self._scope_routes: dict[str, str] = {}
        self._index_static(bootstrap)

    # -- preparing -------------------------------------------------------------------------

    def prepare(
        self,
        type_url: str,
        msg: Message,
        *,
        parent: Source | None = None,
        checked: bool = False,
        digest: bytes | None = None,
    ) -> Prepared:
        """Check one resource of ``type_url`` and give what ``apply`` needs.

        ``parent`` is the stream that delivered it (for config sources naming
        ``self``); ``checked`` skips the schema rules (already checked by the caller);
        ``digest`` identifies the resource (the xDS client's, of the bytes received
        for an assignment: serializing 10,000 endpoints again to digest them costs
        5 ms).
        Raises :class:`ResourceRejected`.
        """
        rtype = TYPES[type_url]
        name = rtype.name_of(msg)
        if digest is None:
            digest = _digest(msg)
        with self.lock:
            if self._digests[type_url].get(name) == digest:
                return Prepared(name, None, digest, self._deps.get((type_url, name), ()))
        if type_url == ENDPOINT:  # the one type that can be huge: a fast path
            errors, text = check_and_encode(msg, schema_errors)
            if errors and not checked:
                raise ResourceRejected("; ".join(errors))
            return Prepared(name, text, digest, ())
        if not checked:
            errors = schema_errors(msg)
            if errors:
                raise ResourceRejected("; ".join(errors))
        deps = self._resolve(type_url, msg, parent)
        try:
            text = canonical_json(msg)
        except (TypeError, ValueError, KeyError) as e:
            raise ResourceRejected(f"cannot convert the {rtype.noun} to JSON: {e}") from e
        return Prepared(name, text, digest, deps)

    def remember_rejected(self, type_url: str, digest: bytes, name: str, why: str) -> None:
        """``name``, received as the bytes of ``digest``, was refused for ``why``."""
        with self.lock:
            if len(self._rejected) >= REJECTED_MEMORY:
                self._rejected.clear()
            self._rejected[(type_url, digest)] = (name, why, self.generation)

    def forget_rejections(self) -> None:
        """Parse refused resources again when they come back (a new stream: a refusal
        for a reason outside the configuration, a port in use, may be over)."""
        with self.lock:
            self._rejected.clear()

    def known_rejection(self, type_url: str, digest: bytes) -> tuple[str, str] | None:
        """(name, why) when the bytes of ``digest`` were refused and nothing changed in
        the core since (what it holds may have been the reason)."""
        with self.lock:
            entry = self._rejected.get((type_url, digest))
            if entry is None or entry[2] != self.generation:
                return None
            return entry[0], entry[1]

    def _resolve(
        self, type_url: str, msg: Message, parent: Source | None
    ) -> tuple[tuple[Dependency, ResolvedSource], ...]:
        out: list[tuple[Dependency, ResolvedSource]] = []
        errors: list[str] = []
        for dep in dependencies(type_url, msg):
            if self.settings is None:
                # No xDS client: nothing subscribes (Server.update supplies these itself).
                out.append((dep, ResolvedSource(None, None)))
                continue
            try:
                out.append((dep, self.settings.resolve(dep.source, dep.path, parent)))
            except SourceError as e:
                errors.extend(e.errors)
        if errors:
            raise ResourceRejected("; ".join(errors))
        return tuple(out)

    def _index_static(self, bootstrap: Bootstrap) -> None:
        errors: list[str] = []
        static = bootstrap.static_resources
        for type_url, field, items in (
            (LISTENER, "listeners", static.listeners),
            (CLUSTER, "clusters", static.clusters),
        ):
            for i, msg in enumerate(items):
                try:
                    deps = self._resolve(type_url, msg, None)
                except ResourceRejected as e:
                    errors.extend(
                        f"static_resources.{field}[{i}].{error}" for error in str(e).split("; ")
                    )
                    continue
                if deps:
                    self._deps[(type_url, TYPES[type_url].name_of(msg))] = deps
        if errors:
            from envoyx.errors import ConfigError

            raise ConfigError(errors)

    # -- applying --------------------------------------------------------------------------

    def apply(
        self, type_url: str, prepared: list[Prepared], removed: list[str], version_info: str
    ) -> dict[str, str]:
        """Hand ``prepared`` (the changed ones) and ``removed`` to the core; returns
        the rejected resources by name, with why."""
        changed = [p for p in prepared if p.json is not None]
        with self.lock:
            # The core hears of every SRDS update, even one that changes nothing: the
            # first one ends the wait of the listeners using scoped RDS.
            if not changed and not removed and type_url != SCOPED_ROUTE:
                return {}
            rejected = dict(
                self.core.apply(
                    type_url,
                    [(p.name, p.json) for p in changed if p.json is not None],
                    list(removed),
                    version_info,
                )
            )
            held = self._digests[type_url]
            if removed or len(rejected) < len(changed):
                self.generation += 1
            for p in changed:
                if p.name in rejected:
                    continue
                held[p.name] = p.digest
                if type_url in DEPENDENT_TYPES:
                    if p.dependencies:
                        self._deps[(type_url, p.name)] = p.dependencies
                    else:
                        self._deps.pop((type_url, p.name), None)
            for name in removed:
                held.pop(name, None)
                self._deps.pop((type_url, name), None)
            if type_url == SCOPED_ROUTE and not rejected:
                for name in removed:
                    self._scope_routes.pop(name, None)
                for p in changed:
                    self._scope_routes[p.name] = json.loads(p.json or "{}").get(
                        "route_configuration_name", ""
                    )
        return rejected

    def set_version(self, type_url: str, version_info: str) -> None:
        """Set the version ``/config_dump`` shows for the whole type (LDS, CDS) without
        changing a resource: Delta applies each resource with its own version, then the
        response's ``system_version_info`` here."""
        with self.lock:
            self.core.apply(type_url, [], [], version_info)

    # -- what the core needs -----------------------------------------------------------

    def wanted(self, type_url: str) -> list[str]:
        """Names of ``type_url`` (RDS, EDS, SDS) the core waits for."""
        with self.lock:
            return list(self.core.wanted_resources(type_url))

    def _names_dep(self, dep: Dependency, type_url: str, name: str) -> bool:
        """Whether ``dep`` names ``name`` of ``type_url``: by its name; an SRDS
        subscription whatever the name; the route tables of the scoped connection
        managers every route configuration an SRDS scope names."""
        if dep.type_url != type_url:
            return False
        if type_url == SCOPED_ROUTE:
            return True
        if dep.name == SCOPED_ROUTE_TABLES and type_url == ROUTE:
            return name in self._scope_routes.values()
        return dep.name == name

    def sources_of(self, type_url: str, name: str) -> list[ResolvedSource]:
        """Where ``name`` (a route configuration, an EDS service) is to be fetched
        from, per what names it (first the first that named it)."""
        with self.lock:
            return [
                resolved
                for deps in self._deps.values()
                for dep, resolved in deps
                if self._names_dep(dep, type_url, name)
            ]

    def named(self, parent_type: str, type_url: str) -> set[str]:
        """Names of ``type_url`` that resources of ``parent_type`` name (the secrets of
        the clusters, say)."""
        with self.lock:
            return {
                dep.name
                for (ptype, _), deps in self._deps.items()
                if ptype == parent_type
                for dep, _ in deps
                if dep.type_url == type_url
            }

    def named_anywhere(self, type_url: str) -> bool:
        """Whether any listener or cluster the core holds names a ``type_url`` resource."""
        with self.lock:
            return any(dep.type_url == type_url for deps in self._deps.values() for dep, _ in deps)

    def named_by(self, type_url: str, name: str) -> list[tuple[str, str]]:
        """(type URL, name) of what the listener / cluster ``name`` names."""
        with self.lock:
            return [(dep.type_url, dep.name) for dep, _ in self._deps.get((type_url, name), ())]

    def stat_prefixes(self, type_url: str, name: str) -> list[str]:
        """Where Envoy counts the updates of ``name``: ``listener_manager.lds.`` for
        LDS, ``cluster_manager.cds.`` for CDS, ``http.<stat_prefix>.rds.<name>.`` per
        HCM naming a route configuration, ``cluster.<cluster>.`` per EDS cluster,
        ``sds.<name>.`` for a secret."""
        fixed = TYPE_STAT_PREFIX.get(type_url)
        if fixed is not None:
            return [fixed]
        with self.lock:
            prefixes = {
                dep.stat_prefix + (f"{name}." if dep.name == SCOPED_ROUTE_TABLES else "")
                for deps in self._deps.values()
                for dep, _ in deps
                if self._names_dep(dep, type_url, name)
            }
        return sorted(prefixes)
