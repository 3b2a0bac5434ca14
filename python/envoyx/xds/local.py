"""``Server.update(...)``: resources given from Python, applied as xDS updates are.

Each resource (a dict in Envoy's v3 spelling, or a message) is checked against Envoy's
schema like a bootstrap is (every problem, each with its field path, e.g.
``clusters[1].connect_timeout: value must be greater than 0s``); if any is invalid
nothing is applied. The valid ones then go through the same path as xDS responses
(:class:`~envoyx.xds.applier.Applier`), make before break: secrets, clusters,
endpoints, listeners, routes, then the removals of clusters, endpoints and secrets.
Resources the core rejects are reported together once the others are applied.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

from envoyx.config.schema import message_from_document
from envoyx.errors import ConfigError
from envoyx.xds.applier import Applier, Prepared, ResourceRejected, schema_errors
from envoyx.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, TYPES

__all__ = ["GROUPS", "LocalUpdate", "apply_update", "parse_resource"]

#: ``Server.update`` keyword -> type URL, in make-before-break order.
GROUPS = (
    ("secrets", SECRET),
    ("clusters", CLUSTER),
    ("endpoints", ENDPOINT),
    ("listeners", LISTENER),
    ("routes", ROUTE),
)

_versions = itertools.count(1)

ResourceInput = Mapping[str, Any] | Message


@dataclass
class LocalUpdate:
    """What one ``Server.update`` call asks for, by type URL."""

    add: dict[str, list[ResourceInput]]
    remove: dict[str, list[str]]
    version_info: str | None = None


def parse_resource(type_url: str, value: object, path: str) -> Message:
    """One resource of ``type_url`` from a dict or a message, checked against Envoy's
    schema. Raises :class:`~envoyx.ConfigError` listing every problem under ``path``."""
    rtype = TYPES[type_url]
    desc = cast(Descriptor, rtype.message.DESCRIPTOR)
    if isinstance(value, Message):
        if value.DESCRIPTOR.full_name != desc.full_name:
            raise ConfigError(
                f"{path}: expected a {desc.full_name}, got a {value.DESCRIPTOR.full_name}"
            )
        msg = rtype.message()
        msg.CopyFrom(value)
    elif isinstance(value, Mapping):
        msg = message_from_document(value, rtype.message, path)
    else:
        raise ConfigError(
            f"{path}: expected a dict or a {desc.full_name} message, got {type(value).__name__}"
        )
    errors = schema_errors(msg, path)
    if errors:
        raise ConfigError(errors)
    return msg


def apply_update(applier: Applier, update: LocalUpdate) -> list[str]:
    """Check then apply ``update``; returns why each rejected resource was rejected.

    Raises :class:`~envoyx.ConfigError` (nothing applied) when a resource is invalid.
    """
    labels = dict((t, label) for label, t in GROUPS)
    parsed: dict[str, list[tuple[str, Message]]] = {}
    errors: list[str] = []
    for label, type_url in GROUPS:
        items = update.add.get(type_url, [])
        out: list[tuple[str, Message]] = []
        seen: dict[str, int] = {}
        for i, value in enumerate(items):
            path = f"{label}[{i}]"
            try:
                msg = parse_resource(type_url, value, path)
            except ConfigError as e:
                errors.extend(e.errors)
                continue
            name = TYPES[type_url].name_of(msg)
            if name in seen:
                errors.append(
                    f"{path}: {TYPES[type_url].noun} {name!r} is also {label}[{seen[name]}]"
                )
                continue
            seen[name] = i
            out.append((path, msg))
        parsed[type_url] = out
        for j, name in enumerate(update.remove.get(type_url, [])):
            if not isinstance(name, str) or not name:
                errors.append(f"remove_{label}[{j}]: expected a {TYPES[type_url].noun} name")
    if errors:
        raise ConfigError(errors)

    version = update.version_info
    if version is None:
        version = f"update-{next(_versions)}"
    rejected: list[str] = []
    prepared: dict[str, list[tuple[str, Prepared]]] = {}
    for _, type_url in GROUPS:
        ready: list[tuple[str, Prepared]] = []
        for path, msg in parsed[type_url]:
            name = TYPES[type_url].name_of(msg)
            try:
                ready.append((path, applier.prepare(type_url, msg, checked=True)))
            except ResourceRejected as e:
                rejected.append(f"{path} ({labels[type_url][:-1]} {name!r}): {e}")
        prepared[type_url] = ready

    def run(type_url: str, items: Iterable[tuple[str, Prepared]], removed: list[str]) -> None:
        batch = list(items)
        outcome = applier.apply(type_url, [p for _, p in batch], removed, version)
        by_name = {p.name: path for path, p in batch}
        for name, why in outcome.items():
            where = by_name.get(name, f"remove_{labels[type_url]}")
            rejected.append(f"{where} ({labels[type_url][:-1]} {name!r}): {why}")

    with applier.lock:
        if prepared[SECRET]:
            run(SECRET, prepared[SECRET], [])
        run(CLUSTER, prepared[CLUSTER], [])
        run(ENDPOINT, prepared[ENDPOINT], [])
        run(LISTENER, prepared[LISTENER], list(update.remove.get(LISTENER, [])))
        run(ROUTE, prepared[ROUTE], list(update.remove.get(ROUTE, [])))
        if update.remove.get(CLUSTER):
            run(CLUSTER, [], list(update.remove[CLUSTER]))
        if update.remove.get(ENDPOINT):
            run(ENDPOINT, [], list(update.remove[ENDPOINT]))
        if update.remove.get(SECRET):
            run(SECRET, [], list(update.remove[SECRET]))
    return rejected
