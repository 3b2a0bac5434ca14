"""Pass 1 of the checks: a JSON-like document against a message's proto-JSON schema.

Internal API of envoyx (used by :mod:`envoyx.config` and by :mod:`envoyx.xds` for the
resources given to ``Server.update``), not part of the public interface: names in
``__all__`` may change without notice.

:class:`SchemaWalker` reports what ``json_format.ParseDict`` would reject (unknown
fields, wrong types, bad enum names, unknown ``@type``s, malformed durations, two members
of one oneof), every problem with its field path rather than stopping at the first, and
gives a normalized copy that ``ParseDict`` accepts. :func:`message_from_document` is that
walk followed by ``ParseDict``. The descriptor helpers (:func:`find_message_type`, which
imports the xds-protos package of an ``@type`` on demand, :func:`is_map`, ...) are shared
with :mod:`envoyx.config.rules`.
"""

from __future__ import annotations

import base64
import difflib
import importlib
import importlib.util
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

from google.protobuf import descriptor_pool, json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from envoyx.errors import ConfigError

__all__ = [
    "ANY",
    "FLOAT_STRING",
    "WRAPPERS",
    "SchemaWalker",
    "find_message_type",
    "is_map",
    "join_path",
    "map_fields",
    "message_from_document",
]

# Unknown fields let through by allow_unknown_fields are logged on "envoyx.config", as they
# were before config.py became a package: logging configurations that name it keep working.
_log = logging.getLogger("envoyx.config")

_M = TypeVar("_M", bound=Message)

# Modules defining every typed_config envoyx implements, imported so that their `@type`s are
# in the descriptor pool. Other `@type`s are imported on demand from their package.
_EXTENSION_MODULES = (
    "envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2",
    "envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2",
    "envoy.extensions.filters.http.router.v3.router_pb2",
    "envoy.extensions.access_loggers.file.v3.file_pb2",
    "envoy.extensions.access_loggers.stream.v3.stream_pb2",
    "envoy.extensions.upstreams.http.v3.http_protocol_options_pb2",
    "envoy.extensions.transport_sockets.tls.v3.tls_pb2",
    "xds.type.v3.typed_struct_pb2",
    "udpa.type.v1.typed_struct_pb2",
)
for _module in _EXTENSION_MODULES:
    importlib.import_module(_module)

# Top-level packages of xds-protos whose modules may be imported to resolve an `@type`.
_IMPORTABLE_ROOTS = frozenset(
    {"envoy", "xds", "udpa", "validate", "google", "cel", "opencensus", "opentelemetry"}
)

_POOL = descriptor_pool.Default()
ANY = "google.protobuf.Any"
WRAPPERS = frozenset(
    {
        "google.protobuf.DoubleValue",
        "google.protobuf.FloatValue",
        "google.protobuf.Int64Value",
        "google.protobuf.UInt64Value",
        "google.protobuf.Int32Value",
        "google.protobuf.UInt32Value",
        "google.protobuf.BoolValue",
        "google.protobuf.StringValue",
        "google.protobuf.BytesValue",
    }
)
# Well-known types whose JSON form is not an object of their fields; inside an Any they are
# written as {"@type": ..., "value": <json form>}.
_SPECIAL_JSON = WRAPPERS | {
    ANY,
    "google.protobuf.Duration",
    "google.protobuf.Timestamp",
    "google.protobuf.FieldMask",
    "google.protobuf.Struct",
    "google.protobuf.Value",
    "google.protobuf.ListValue",
}

_INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: ("int32", -(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: ("int64", -(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: ("uint32", 0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: ("uint64", 0, 2**64 - 1),
}
_FLOAT_MAX = 3.4028234663852886e38
_INT_STRING = re.compile(r"-?\d+\Z")
FLOAT_STRING = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z")


def message_from_document(
    document: object,
    message_class: type[_M],
    path: str = "",
    *,
    allow_unknown_fields: bool = False,
) -> _M:
    """A ``message_class`` from a JSON-like document (a dict in Envoy's v3 spelling).

    Raises :class:`~envoyx.ConfigError` listing every schema problem, each under ``path``.
    With ``allow_unknown_fields`` unknown fields are logged (``envoyx.config`` logger) and
    dropped instead (``--allow-unknown-static-fields``).
    """
    walker = SchemaWalker(allow_unknown_fields=allow_unknown_fields)
    desc = cast(Descriptor, message_class.DESCRIPTOR)  # the stubs also allow upb's type
    normalized = walker.message(document, desc, path)
    for warning in walker.warnings:
        _log.warning("%s", warning)
    if walker.errors or not isinstance(normalized, dict):
        raise ConfigError(walker.errors or [f"{path or '(root)'}: expected an object"])
    msg = message_class()
    try:
        json_format.ParseDict(normalized, msg, ignore_unknown_fields=allow_unknown_fields)
    except (json_format.ParseError, ValueError, TypeError, KeyError) as e:
        # The walker accepts only what ParseDict accepts; this is a safety net.
        raise ConfigError(f"{path or '(root)'}: {e}") from e
    return msg


def join_path(path: str, name: str) -> str:
    """The path of field ``name`` under ``path`` (``""`` is the root)."""
    return f"{path}.{name}" if path else name


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value:g}"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return f"string {json.dumps(shown)}"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return f"a Python {type(value).__name__}"


@dataclass(frozen=True)
class _Fields:
    """A message's fields by every name proto-JSON accepts for them."""

    by_key: dict[str, FieldDescriptor]
    names: list[str]


_fields_cache: dict[str, _Fields] = {}


def _fields_of(desc: Descriptor) -> _Fields:
    cached = _fields_cache.get(desc.full_name)
    if cached is None:
        by_key: dict[str, FieldDescriptor] = {}
        for fd in desc.fields:
            by_key[fd.name] = fd
            by_key.setdefault(fd.json_name, fd)
        cached = _Fields(by_key, [fd.name for fd in desc.fields])
        _fields_cache[desc.full_name] = cached
    return cached


def is_map(fd: FieldDescriptor) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def map_fields(fd: FieldDescriptor) -> tuple[FieldDescriptor, FieldDescriptor]:
    """The key and value fields of a map field's entry type."""
    entry = fd.message_type
    assert entry is not None
    return entry.fields_by_name["key"], entry.fields_by_name["value"]


def find_message_type(type_url: str) -> Descriptor | None:
    """The descriptor named by an Any type URL, importing its xds-protos package if needed."""
    type_name = type_url.rsplit("/", 1)[-1]
    if not type_name:
        return None
    try:
        return _POOL.FindMessageTypeByName(type_name)
    except KeyError:
        pass
    if not _import_package_of(type_name):
        return None
    try:
        return _POOL.FindMessageTypeByName(type_name)
    except KeyError:
        return None


_imported_packages: dict[str, bool] = {}


def _import_package_of(type_name: str) -> bool:
    parts = type_name.split(".")
    package_parts: list[str] = []
    for part in parts:
        if not part or part[0].isupper():
            break
        package_parts.append(part)
    package = ".".join(package_parts)
    if not package_parts or package_parts[0] not in _IMPORTABLE_ROOTS:
        return False
    if package in _imported_packages:
        return _imported_packages[package]
    imported = False
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            for module_file in sorted(Path(location).glob("*_pb2.py")):
                try:
                    importlib.import_module(f"{package}.{module_file.stem}")
                except Exception:  # a broken generated module only means "unknown @type"
                    continue
                imported = True
    _imported_packages[package] = imported
    return imported


class SchemaWalker:
    """Checks a JSON-like document against a message descriptor, collecting every error.

    Returns a normalized copy (snake_case field names, canonical enum names) that
    ``json_format.ParseDict`` accepts whenever no error was recorded.
    """

    def __init__(self, *, allow_unknown_fields: bool = False) -> None:
        self.allow_unknown_fields = allow_unknown_fields
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path or '(root)'}: {message}")

    def message(self, value: object, desc: Descriptor, path: str) -> object:
        full_name = desc.full_name
        if full_name in WRAPPERS:
            return self.scalar(value, desc.fields_by_name["value"], path)
        if full_name == ANY:
            return self.any(value, path)
        if full_name == "google.protobuf.Duration":
            return self.well_known_string(value, Duration, 'a duration string like "1.5s"', path)
        if full_name == "google.protobuf.Timestamp":
            return self.well_known_string(
                value, Timestamp, 'an RFC 3339 timestamp like "2024-01-01T00:00:00Z"', path
            )
        if full_name == "google.protobuf.FieldMask":
            return self.well_known_string(value, FieldMask, 'a field mask like "a.b,c"', path)
        if full_name == "google.protobuf.Struct":
            if not isinstance(value, Mapping):
                self.error(
                    path, f"expected an object (google.protobuf.Struct), got {_describe(value)}"
                )
                return None
            return self.json_value(value, path)
        if full_name == "google.protobuf.Value":
            return self.json_value(value, path)
        if full_name == "google.protobuf.ListValue":
            if not isinstance(value, list | tuple):
                self.error(
                    path, f"expected a list (google.protobuf.ListValue), got {_describe(value)}"
                )
                return None
            return self.json_value(value, path)
        return self.fields(value, desc, path)

    def fields(self, value: object, desc: Descriptor, path: str) -> dict[str, object] | None:
        if not isinstance(value, Mapping):
            self.error(path, f"expected an object ({desc.full_name}), got {_describe(value)}")
            return None
        known = _fields_of(desc)
        result: dict[str, object] = {}
        given_as: dict[str, str] = {}
        oneof_members: dict[str, str] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                self.error(path, f"field names are strings, got {_describe(key)}")
                continue
            fd = known.by_key.get(key)
            child = join_path(path, fd.name if fd is not None else key)
            if fd is None:
                self.unknown_field(child, key, desc, known)
                continue
            if fd.name in given_as:
                self.error(child, f'set twice, as "{given_as[fd.name]}" and as "{key}"')
                continue
            given_as[fd.name] = key
            if item is None:
                # proto3 JSON: null leaves the field unset, except in google.protobuf.Value.
                if fd.message_type is not None and fd.message_type.full_name == (
                    "google.protobuf.Value"
                ):
                    result[fd.name] = None
                continue
            oneof = fd.containing_oneof
            if oneof is not None and len(oneof.fields) > 1:
                other = oneof_members.get(oneof.name)
                if other is not None:
                    self.error(
                        child,
                        f'"{other}" is already set; only one field of oneof "{oneof.name}" '
                        "may be set",
                    )
                    continue
                oneof_members[oneof.name] = fd.name
            result[fd.name] = self.field(item, fd, child)
        return result

    def unknown_field(self, path: str, key: str, desc: Descriptor, known: _Fields) -> None:
        message = f'unknown field "{key}" in {desc.full_name}'
        if self.allow_unknown_fields:
            self.warnings.append(f"{path}: {message} (ignored)")
            return
        close = difflib.get_close_matches(key, list(known.by_key), n=1, cutoff=0.75)
        if close:
            suggestion = known.by_key[close[0]].name
            message += f' (did you mean "{suggestion}"?)'
        self.error(path, message)

    def field(self, value: object, fd: FieldDescriptor, path: str) -> object:
        if is_map(fd):
            return self.map(value, fd, path)
        if fd.is_repeated:
            if not isinstance(value, list | tuple):
                # Envoy's JSON parser (protobuf's) reads a single value given for a
                # repeated field as a list of that one value; go-control-plane's own
                # sample bootstrap relies on it (`grpc_services:` with one object).
                value = [value]
            items: list[object] = []
            for index, item in enumerate(value):
                item_path = f"{path}[{index}]"
                if item is None and not (
                    fd.message_type is not None
                    and fd.message_type.full_name == "google.protobuf.Value"
                ):
                    self.error(item_path, "null is not allowed in a list")
                    continue
                items.append(self.element(item, fd, item_path))
            return items
        return self.element(value, fd, path)

    def element(self, value: object, fd: FieldDescriptor, path: str) -> object:
        if fd.message_type is not None:
            return self.message(value, fd.message_type, path)
        return self.scalar(value, fd, path)

    def map(self, value: object, fd: FieldDescriptor, path: str) -> object:
        if not isinstance(value, Mapping):
            self.error(path, f"expected an object (map), got {_describe(value)}")
            return None
        key_fd, value_fd = map_fields(fd)
        result: dict[str, object] = {}
        for key, item in value.items():
            item_path = f"{path}[{json.dumps(str(key))}]"
            if isinstance(key, bool) or not isinstance(key, str | int):
                self.error(item_path, f"map keys are strings, got {_describe(key)}")
                continue
            key_text = str(key)
            if key_fd.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
                if key_text not in ("true", "false"):
                    self.error(
                        item_path, f'expected a boolean map key "true" or "false", got "{key_text}"'
                    )
                    continue
            elif key_fd.cpp_type in _INT_RANGES:
                self.scalar(key_text, key_fd, item_path)
            elif not isinstance(key, str):
                self.error(item_path, f"map keys are strings, got {_describe(key)}")
                continue
            if item is None and not (
                value_fd.message_type is not None
                and value_fd.message_type.full_name == "google.protobuf.Value"
            ):
                self.error(item_path, "null is not allowed as a map value")
                continue
            result[key_text] = self.element(item, value_fd, item_path)
        return result

    def scalar(self, value: object, fd: FieldDescriptor, path: str) -> object:
        cpp_type = fd.cpp_type
        if cpp_type in _INT_RANGES:
            type_name, low, high = _INT_RANGES[cpp_type]
            number: int | None = None
            if isinstance(value, int) and not isinstance(value, bool):
                number = value
            elif (isinstance(value, float) and value.is_integer()) or (
                isinstance(value, str) and _INT_STRING.match(value)
            ):
                number = int(value)
            if number is None:
                self.error(path, f"expected an integer ({type_name}), got {_describe(value)}")
                return None
            if not low <= number <= high:
                self.error(path, f"{number} is out of range for {type_name} [{low}, {high}]")
                return None
            return number
        if cpp_type in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
            type_name = "double" if cpp_type == FieldDescriptor.CPPTYPE_DOUBLE else "float"
            if isinstance(value, str) and value in ("NaN", "Infinity", "-Infinity"):
                return value
            number_f: float | None = None
            if (isinstance(value, int | float) and not isinstance(value, bool)) or (
                isinstance(value, str) and FLOAT_STRING.match(value)
            ):
                number_f = float(value)
            if number_f is None or not math.isfinite(number_f):
                self.error(path, f"expected a number ({type_name}), got {_describe(value)}")
                return None
            if type_name == "float" and abs(number_f) > _FLOAT_MAX:
                self.error(path, f"{number_f:g} is out of range for float")
                return None
            return number_f
        if cpp_type == FieldDescriptor.CPPTYPE_BOOL:
            if not isinstance(value, bool):
                self.error(path, f"expected a boolean (true or false), got {_describe(value)}")
                return None
            return value
        if cpp_type == FieldDescriptor.CPPTYPE_ENUM:
            assert fd.enum_type is not None
            return self.enum(value, fd.enum_type, path)
        if fd.type == FieldDescriptor.TYPE_BYTES:
            if not isinstance(value, str) or not _is_base64(value):
                self.error(path, f"expected base64-encoded bytes, got {_describe(value)}")
                return None
            return value
        if not isinstance(value, str):
            self.error(path, f"expected a string, got {_describe(value)}")
            return None
        return value

    def enum(self, value: object, enum: EnumDescriptor, path: str) -> object:
        if isinstance(value, str):
            # Envoy parses enum names case-insensitively (case_insensitive_enum_parsing).
            found = enum.values_by_name.get(value) or enum.values_by_name.get(value.upper())
            if found is not None:
                return found.name
        elif (
            isinstance(value, int)
            and not isinstance(value, bool)
            and (
                value in enum.values_by_number or (not enum.is_closed and -(2**31) <= value < 2**31)
            )
        ):
            return value
        names = ", ".join(v.name for v in enum.values)
        self.error(
            path, f"invalid value {_describe(value)} for enum {enum.full_name} (one of: {names})"
        )
        return None

    def well_known_string(
        self,
        value: object,
        message_class: type[Duration] | type[Timestamp] | type[FieldMask],
        expected: str,
        path: str,
    ) -> object:
        if isinstance(value, str):
            try:
                message_class().FromJsonString(value)
            except ValueError:
                pass
            else:
                return value
        self.error(path, f"expected {expected}, got {_describe(value)}")
        return None

    def any(self, value: object, path: str) -> object:
        if not isinstance(value, Mapping):
            self.error(
                path,
                f'expected an object with "@type" (google.protobuf.Any), got {_describe(value)}',
            )
            return None
        if not value:
            return {}
        type_url = value.get("@type")
        if type_url is None:
            self.error(path, 'missing "@type" (google.protobuf.Any)')
            return None
        if not isinstance(type_url, str) or "/" not in type_url:
            self.error(
                path,
                '"@type" must be a type URL like "type.googleapis.com/<message name>", '
                f"got {_describe(type_url)}",
            )
            return None
        desc = find_message_type(type_url)
        if desc is None:
            self.error(path, f'unknown @type "{type_url}"')
            return None
        if desc.full_name in _SPECIAL_JSON:
            extra = [key for key in value if key not in ("@type", "value")]
            for key in extra:
                self.error(
                    join_path(path, key), f'unknown field "{key}" in an Any of {desc.full_name}'
                )
            if "value" not in value:
                self.error(join_path(path, "value"), f'an Any of {desc.full_name} needs "value"')
                return None
            inner = self.message(value["value"], desc, join_path(path, "value"))
            return {"@type": type_url, "value": inner}
        body = {key: item for key, item in value.items() if key != "@type"}
        fields = self.fields(body, desc, path) or {}
        return {"@type": type_url, **fields}

    def json_value(self, value: object, path: str) -> object:
        if value is None or isinstance(value, bool | str):
            return value
        if isinstance(value, int | float):
            if isinstance(value, float) and not math.isfinite(value):
                self.error(path, f"{value} is not a JSON number")
                return None
            return value
        if isinstance(value, list | tuple):
            return [self.json_value(item, f"{path}[{index}]") for index, item in enumerate(value)]
        if isinstance(value, Mapping):
            result: dict[str, object] = {}
            for key, item in value.items():
                if not isinstance(key, str):
                    self.error(path, f"object keys are strings, got {_describe(key)}")
                    continue
                result[key] = self.json_value(item, join_path(path, key))
            return result
        self.error(path, f"expected a JSON value, got {_describe(value)}")
        return None


def _is_base64(text: str) -> bool:
    standard = text.replace("-", "+").replace("_", "/").rstrip("=")
    try:
        base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
    except ValueError:
        return False
    return True
