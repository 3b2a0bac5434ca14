"""Load and validate Envoy v3 bootstrap documents.

A bootstrap arrives as a file path (``.yaml``/``.yml``/``.json``/``.pb_text``/``.pb``), as
YAML or JSON text, as a dict, or as an ``envoy.config.bootstrap.v3.Bootstrap`` message. It is
checked against Envoy's own schema (the generated classes of ``xds-protos``) in two passes,
each of which reports every problem of the document together, each naming its field path:

1. the proto-JSON schema: unknown fields, wrong types, bad enum names, unknown ``@type``s,
   malformed durations, two members of one oneof (what ``json_format.ParseDict`` would
   reject, but without stopping at the first error);
2. the protoc-gen-validate rules Envoy checks once the document has parsed (required
   fields, string lengths, numeric ranges, ...), inside ``typed_config`` Anys too.

YAML is read as Envoy reads it (yaml-cpp then ``parseYamlNode``): ``yes``/``on``/``y`` are
booleans, ``010`` is octal, dates stay strings, keys tagged ``!ignore`` are dropped.

:func:`bootstrap_to_json` gives the canonical proto-JSON handed to the Rust core.
"""

from __future__ import annotations

import base64
import difflib
import importlib
import importlib.util
import ipaddress
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import yaml
from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap
from google.protobuf import descriptor_pool, json_format, message_factory, text_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp
from validate import validate_pb2

from envoyx.errors import ConfigError

__all__ = [
    "Bootstrap",
    "BootstrapSource",
    "bootstrap_to_json",
    "load_bootstrap",
]

_log = logging.getLogger(__name__)

#: What :func:`load_bootstrap` accepts: a path, YAML/JSON text, a dict or a Bootstrap message.
BootstrapSource: TypeAlias = "str | os.PathLike[str] | Mapping[str, Any] | Message"

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
_BOOTSTRAP_TYPE = "envoy.config.bootstrap.v3.Bootstrap"
_ANY = "google.protobuf.Any"
_TYPED_STRUCTS = frozenset({"xds.type.v3.TypedStruct", "udpa.type.v1.TypedStruct"})
_WRAPPERS = frozenset(
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
_SPECIAL_JSON = _WRAPPERS | {
    _ANY,
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
_FLOAT_STRING = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z")
_FILE_FORMATS = {
    ".yaml": "yaml",
    ".yml": "yaml",
    ".json": "json",
    ".pb_text": "text",
    ".pb": "binary",
}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def load_bootstrap(
    source: BootstrapSource | None = None,
    *,
    config_yaml: str | None = None,
    service_node: str | None = None,
    service_cluster: str | None = None,
    service_zone: str | None = None,
    allow_unknown_fields: bool = False,
) -> Bootstrap:
    """Load a bootstrap and check it against Envoy's schema; return the Bootstrap message.

    ``source`` is a path (``.yaml``, ``.yml``, ``.json``, ``.pb_text`` or ``.pb``), YAML or
    JSON text, a dict, or a Bootstrap message (copied, never modified). ``config_yaml`` is
    merged over it as Envoy merges ``--config-yaml`` over ``-c`` (``MergeFrom``: scalars
    replaced, messages merged, repeated fields appended). ``service_node``,
    ``service_cluster`` and ``service_zone`` override ``node.id``, ``node.cluster`` and
    ``node.locality.zone`` as Envoy's flags of the same names do. ``allow_unknown_fields``
    logs unknown fields instead of rejecting them (``--allow-unknown-static-fields``).

    Raises :class:`~envoyx.ConfigError` whose ``errors`` list every problem found.
    """
    if source is None and config_yaml is None:
        raise ConfigError(
            "no configuration: give a config path, YAML/JSON text, a dict or a Bootstrap "
            "(Envoy: at least one of --config-path or --config-yaml must be given)"
        )
    bootstrap = Bootstrap()
    errors: list[str] = []
    if source is not None:
        try:
            bootstrap = _load_source(source, allow_unknown_fields)
        except ConfigError as e:
            errors.extend(e.errors)
    if config_yaml is not None:
        try:
            document = _parse_yaml(config_yaml, "--config-yaml")
            override = _document_to_bootstrap(document, allow_unknown_fields)
        except ConfigError as e:
            errors.extend(
                error if error.startswith("--config-yaml") else f"{error} (in --config-yaml)"
                for error in e.errors
            )
        else:
            bootstrap.MergeFrom(override)
    if errors:
        raise ConfigError(errors)

    if service_node:
        bootstrap.node.id = service_node
    if service_cluster:
        bootstrap.node.cluster = service_cluster
    if service_zone:
        bootstrap.node.locality.zone = service_zone

    checker = _RuleChecker()
    checker.message(bootstrap, "")
    if checker.errors:
        raise ConfigError(checker.errors)
    return bootstrap


def bootstrap_to_json(bootstrap: Message) -> str:
    """The canonical proto-JSON of a bootstrap: snake_case field names, ``@type`` in Anys.

    This exact text is what the Rust core receives (``_core.Server``, ``_core.validate``).
    """
    try:
        document = json_format.MessageToDict(bootstrap, preserving_proto_field_name=True)
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"(root): cannot convert the bootstrap to JSON: {e}") from e
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


# --------------------------------------------------------------------------------------------
# Reading sources
# --------------------------------------------------------------------------------------------


def _load_source(source: BootstrapSource, allow_unknown_fields: bool) -> Bootstrap:
    if isinstance(source, Message):
        if source.DESCRIPTOR.full_name != _BOOTSTRAP_TYPE:
            raise ConfigError(
                f"(root): expected a {_BOOTSTRAP_TYPE} message, got {source.DESCRIPTOR.full_name}"
            )
        bootstrap = Bootstrap()
        bootstrap.CopyFrom(source)
        return bootstrap
    if isinstance(source, Mapping):
        return _document_to_bootstrap(source, allow_unknown_fields)
    if isinstance(source, os.PathLike):
        return _load_file(Path(os.fspath(source)), allow_unknown_fields)
    if isinstance(source, str):
        if _looks_like_path(source):
            return _load_file(Path(source), allow_unknown_fields)
        return _document_to_bootstrap(_parse_text(source), allow_unknown_fields)
    raise ConfigError(
        "(root): a bootstrap is a path, YAML/JSON text, a dict or a Bootstrap message, "
        f"not {type(source).__name__}"
    )


def _looks_like_path(text: str) -> bool:
    if "\n" in text or not text.strip():
        return False
    if os.path.exists(text):
        return True
    stripped = text.strip()
    return ":" not in stripped and not stripped.startswith(("{", "["))


def _load_file(path: Path, allow_unknown_fields: bool) -> Bootstrap:
    kind = _FILE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(
            f"{path}: unsupported configuration file extension {path.suffix!r} "
            "(expected .yaml, .yml, .json, .pb_text or .pb)"
        )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read configuration file: {e.strerror or e}") from e
    if kind == "binary":
        bootstrap = Bootstrap()
        try:
            bootstrap.ParseFromString(data)
        except DecodeError as e:
            raise ConfigError(f"{path}: not a binary {_BOOTSTRAP_TYPE}: {e}") from e
        return bootstrap
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e}") from e
    if kind == "text":
        bootstrap = Bootstrap()
        try:
            text_format.Parse(text, bootstrap)
        except text_format.ParseError as e:
            raise ConfigError(f"{path}:{e}") from e
        return bootstrap
    document = _parse_json(text, str(path)) if kind == "json" else _parse_yaml(text, str(path))
    return _document_to_bootstrap(document, allow_unknown_fields)


def _parse_text(text: str) -> object:
    if text.lstrip().startswith("{"):
        try:
            return _parse_json(text, "<config>")
        except ConfigError:
            pass  # JSON-looking flow YAML ({a: 1}): read it as YAML below.
    return _parse_yaml(text, "<config>")


def _parse_json(text: str, origin: str) -> object:
    def reject_constant(name: str) -> object:
        raise ValueError(f"{name} is not valid JSON")

    def unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
        result: dict[str, object] = {}
        for key, value in pairs:
            if key in result:
                raise ValueError(f"duplicate key {key!r}")
            result[key] = value
        return result

    try:
        return json.loads(text, object_pairs_hook=unique_keys, parse_constant=reject_constant)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{origin}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from e
    except ValueError as e:
        raise ConfigError(f"{origin}: invalid JSON: {e}") from e


def _parse_yaml(text: str, origin: str) -> object:
    try:
        documents = yaml.load_all(text, Loader=_EnvoyYamlLoader)
        # yaml-cpp's YAML::Load, which Envoy uses, reads the first document only.
        document = next(iter(documents), None)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{origin}:{mark.line + 1}:{mark.column + 1}" if mark else origin
        problem = e.problem or e.context or "invalid YAML"
        raise ConfigError(f"{where}: invalid YAML: {problem}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{origin}: invalid YAML: {e}") from e
    if document is None:
        raise ConfigError(f"{origin}: the configuration is empty")
    return document


class _EnvoyYamlLoader(yaml.SafeLoader):
    """Reads YAML as Envoy does: yaml-cpp's scalars as converted by Envoy's ``parseYamlNode``.

    Quoted and block scalars are strings; a plain scalar is null, then a yaml-cpp boolean
    (y/yes/true/on and their opposites), then a 64-bit integer (0x hex and 0 octal, beyond
    int32 kept as a decimal string), then a double (non-finite ones as "NaN"/"Infinity"),
    else a string. Map keys are their text; keys tagged ``!ignore`` are dropped.
    """

    # Only the merge key `<<` is resolved implicitly; every other plain scalar reaches
    # _construct_plain_scalar untouched (PyYAML's YAML 1.1 rules differ from yaml-cpp's).
    yaml_implicit_resolvers = {}  # noqa: RUF012 (PyYAML class-level registry)

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"expected a mapping node, but found {type(node).__name__}",
                node.start_mark,
            )
        self.flatten_mapping(node)
        mapping: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "!ignore":
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    "a mapping key must be a scalar",
                    key_node.start_mark,
                )
            mapping[key_node.value] = self.construct_object(value_node, deep=deep)
        return mapping


def _construct_plain_scalar(loader: _EnvoyYamlLoader, node: yaml.Node) -> object:
    assert isinstance(node, yaml.ScalarNode)
    if node.style is not None:  # quoted, literal or folded
        return node.value
    return _yaml_cpp_scalar(node.value)


def _construct_tagged(loader: _EnvoyYamlLoader, tag_suffix: str, node: yaml.Node) -> object:
    # yaml-cpp ignores application tags (`!foo`): the node converts as if untagged.
    if isinstance(node, yaml.ScalarNode):
        return _construct_plain_scalar(loader, node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_mapping(node, deep=True)


_EnvoyYamlLoader.add_implicit_resolver("tag:yaml.org,2002:merge", re.compile(r"^(?:<<)$"), ["<"])
_EnvoyYamlLoader.add_constructor("tag:yaml.org,2002:str", _construct_plain_scalar)
_EnvoyYamlLoader.add_multi_constructor("!", _construct_tagged)

_YAML_CPP_BOOLS = {
    "y": True,
    "yes": True,
    "true": True,
    "on": True,
    "n": False,
    "no": False,
    "false": False,
    "off": False,
}
_YAML_CPP_NULLS = frozenset({"", "~", "null", "Null", "NULL"})
_YAML_CPP_INT = re.compile(r"([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z")
_YAML_CPP_INF = frozenset({".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"})
_YAML_CPP_NEG_INF = frozenset({"-.inf", "-.Inf", "-.INF"})
_YAML_CPP_NAN = frozenset({".nan", ".NaN", ".NAN"})


def _yaml_cpp_scalar(text: str) -> object:
    if text in _YAML_CPP_NULLS:
        return None
    lowered = text.lower()
    if lowered in _YAML_CPP_BOOLS and (
        text == lowered or text[1:] == lowered[1:] or text == text.upper()
    ):
        return _YAML_CPP_BOOLS[lowered]
    match = _YAML_CPP_INT.match(text)
    if match:
        sign, digits = match.groups()
        if digits[:2] in ("0x", "0X"):
            number = int(digits[2:], 16)
        elif digits.startswith("0") and len(digits) > 1:
            number = int(digits[1:], 8)
        else:
            number = int(digits)
        if sign == "-":
            number = -number
        if -(2**31) <= number < 2**31:
            return number
        if -(2**63) <= number < 2**63:
            return str(number)  # proto3 JSON takes big integers as strings, as Envoy does
    if text in _YAML_CPP_INF:
        return "Infinity"
    if text in _YAML_CPP_NEG_INF:
        return "-Infinity"
    if text in _YAML_CPP_NAN:
        return "NaN"
    if _FLOAT_STRING.match(text):
        number_f = float(text)
        if math.isfinite(number_f):
            return number_f
    return text


# --------------------------------------------------------------------------------------------
# Pass 1: the proto-JSON schema
# --------------------------------------------------------------------------------------------


def _document_to_bootstrap(document: object, allow_unknown_fields: bool) -> Bootstrap:
    walker = _SchemaWalker(allow_unknown_fields=allow_unknown_fields)
    normalized = walker.message(document, Bootstrap.DESCRIPTOR, "")
    for warning in walker.warnings:
        _log.warning("%s", warning)
    if walker.errors or not isinstance(normalized, dict):
        raise ConfigError(walker.errors or ["(root): expected an object"])
    bootstrap = Bootstrap()
    try:
        json_format.ParseDict(normalized, bootstrap, ignore_unknown_fields=allow_unknown_fields)
    except (json_format.ParseError, ValueError, TypeError, KeyError) as e:
        # The walker accepts only what ParseDict accepts; this is a safety net.
        raise ConfigError(f"(root): {e}") from e
    return bootstrap


def _join(path: str, name: str) -> str:
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


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def _map_fields(fd: FieldDescriptor) -> tuple[FieldDescriptor, FieldDescriptor]:
    """The key and value fields of a map field's entry type."""
    entry = fd.message_type
    assert entry is not None
    return entry.fields_by_name["key"], entry.fields_by_name["value"]


def _find_message_type(type_url: str) -> Descriptor | None:
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


class _SchemaWalker:
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
        if full_name in _WRAPPERS:
            return self.scalar(value, desc.fields_by_name["value"], path)
        if full_name == _ANY:
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
            child = _join(path, fd.name if fd is not None else key)
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
        if _is_map(fd):
            return self.map(value, fd, path)
        if fd.is_repeated:
            if not isinstance(value, list | tuple):
                self.error(path, f"expected a list, got {_describe(value)}")
                return None
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
        key_fd, value_fd = _map_fields(fd)
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
                isinstance(value, str) and _FLOAT_STRING.match(value)
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
        desc = _find_message_type(type_url)
        if desc is None:
            self.error(path, f'unknown @type "{type_url}"')
            return None
        if desc.full_name in _SPECIAL_JSON:
            extra = [key for key in value if key not in ("@type", "value")]
            for key in extra:
                self.error(_join(path, key), f'unknown field "{key}" in an Any of {desc.full_name}')
            if "value" not in value:
                self.error(_join(path, "value"), f'an Any of {desc.full_name} needs "value"')
                return None
            inner = self.message(value["value"], desc, _join(path, "value"))
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
                result[key] = self.json_value(item, _join(path, key))
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


# --------------------------------------------------------------------------------------------
# Pass 2: protoc-gen-validate rules, and Any contents
# --------------------------------------------------------------------------------------------


@dataclass
class _RulePlan:
    """What to check on one message type: fields with rules, required oneofs."""

    skip: bool
    fields: list[tuple[FieldDescriptor, validate_pb2.FieldRules]] = field(default_factory=list)
    required_oneofs: list[tuple[str, list[str]]] = field(default_factory=list)


_plans: dict[str, _RulePlan] = {}

_HEADER_NAME = re.compile(r"^:?[0-9a-zA-Z!#$%&'*+\-.^_|~`]+$")
_HEADER_VALUE = re.compile(r"^[^\x00-\x08\x0a-\x1f\x7f]*$")
_HEADER_LOOSE = re.compile(r"^[^\x00\x0a\x0d]*$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
_HOST_LABEL = re.compile(r"^[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$")
_NUMERIC_RULES = frozenset(
    {
        "float",
        "double",
        "int32",
        "int64",
        "uint32",
        "uint64",
        "sint32",
        "sint64",
        "fixed32",
        "fixed64",
        "sfixed32",
        "sfixed64",
    }
)
_regex_cache: dict[str, re.Pattern[str] | None] = {}


def _plan_of(desc: Descriptor) -> _RulePlan:
    plan = _plans.get(desc.full_name)
    if plan is not None:
        return plan
    options = desc.GetOptions()
    skip = bool(
        options.Extensions[validate_pb2.disabled] or options.Extensions[validate_pb2.ignored]
    )
    plan = _RulePlan(skip=skip)
    for fd in desc.fields:
        fd_options = fd.GetOptions()
        if fd_options.HasExtension(validate_pb2.rules):
            plan.fields.append((fd, fd_options.Extensions[validate_pb2.rules]))
    for oneof in desc.oneofs:
        if oneof.GetOptions().Extensions[validate_pb2.required]:
            plan.required_oneofs.append((oneof.name, [fd.name for fd in oneof.fields]))
    _plans[desc.full_name] = plan
    return plan


def _compiled(pattern: str) -> re.Pattern[str] | None:
    if pattern not in _regex_cache:
        try:
            _regex_cache[pattern] = re.compile(pattern)
        except re.error:
            _regex_cache[pattern] = None  # RE2-only syntax: left to the core
    return _regex_cache[pattern]


def _format_number(value: float | int) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _range_problem(
    value: float | int,
    rules: Any,
    fmt: Callable[[Any], str],
    key: Callable[[Any], float | int],
) -> str | None:
    """PGV's const/lt/lte/gt/gte/in/not_in, with its messages."""
    names = rules.DESCRIPTOR.fields_by_name

    def has(name: str) -> bool:
        return name in names and rules.HasField(name)

    if has("const") and value != key(rules.const):
        return f"value must equal {fmt(rules.const)}"
    low = high = None
    low_inclusive = high_inclusive = False
    if has("gt"):
        low = rules.gt
    elif has("gte"):
        low, low_inclusive = rules.gte, True
    if has("lt"):
        high = rules.lt
    elif has("lte"):
        high, high_inclusive = rules.lte, True
    above = low is None or (value >= key(low) if low_inclusive else value > key(low))
    below = high is None or (value <= key(high) if high_inclusive else value < key(high))
    if low is not None and high is not None:
        opening = "[" if low_inclusive else "("
        closing = "]" if high_inclusive else ")"
        if key(high) > key(low):
            if not (above and below):
                return f"value must be inside range {opening}{fmt(low)}, {fmt(high)}{closing}"
        elif not (above or below):
            return (
                f"value must be outside range {'(' if high_inclusive else '['}{fmt(high)}, "
                f"{fmt(low)}{')' if low_inclusive else ']'}"
            )
    elif not above:
        relation = "greater than or equal to" if low_inclusive else "greater than"
        return f"value must be {relation} {fmt(low)}"
    elif not below:
        relation = "less than or equal to" if high_inclusive else "less than"
        return f"value must be {relation} {fmt(high)}"
    allowed = list(getattr(rules, "in"))
    if allowed and value not in [key(item) for item in allowed]:
        return f"value must be in list [{', '.join(fmt(item) for item in allowed)}]"
    denied = list(rules.not_in)
    if denied and value in [key(item) for item in denied]:
        return f"value must not be in list [{', '.join(fmt(item) for item in denied)}]"
    return None


def _duration_nanos(duration: Duration) -> int:
    return int(duration.seconds) * 1_000_000_000 + int(duration.nanos)


def _duration_text(duration: Duration) -> str:
    return duration.ToJsonString()


def _is_hostname(text: str) -> bool:
    host = text[:-1] if text.endswith(".") else text
    if not host or len(host) > 253:
        return False
    return all(_HOST_LABEL.match(label) for label in host.split("."))


def _is_ip(text: str, version: int | None = None) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return version is None or address.version == version


class _RuleChecker:
    """Checks a parsed message against protoc-gen-validate rules, collecting every error.

    Recurses into set message fields and into Any contents (Envoy validates each
    typed_config when it builds the extension). Anys whose type is unknown are reported.
    """

    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path or '(root)'}: {message}")

    def message(self, msg: Any, path: str) -> None:
        desc: Descriptor = msg.DESCRIPTOR
        full_name = desc.full_name
        if full_name == _ANY:
            self.any_contents(msg, path)
            return
        if full_name.startswith("google.protobuf."):
            return
        plan = _plan_of(desc)
        if plan.skip:
            return
        for fd, rules in plan.fields:
            self.field(msg, fd, rules, _join(path, fd.name))
        for oneof_name, members in plan.required_oneofs:
            if msg.WhichOneof(oneof_name) is None:
                choices = ", ".join(f'"{name}"' for name in members)
                self.error(_join(path, oneof_name), f"value is required (set one of {choices})")
        if full_name in _TYPED_STRUCTS:
            self.typed_struct(msg, path)
        skipped = {fd.name for fd, rules in plan.fields if rules.message.skip}
        for fd, value in msg.ListFields():
            if fd.message_type is None or fd.name in skipped:
                continue
            child = _join(path, fd.name)
            if _is_map(fd):
                if _map_fields(fd)[1].message_type is not None:
                    for key, item in value.items():
                        self.message(item, f"{child}[{json.dumps(str(key))}]")
            elif fd.is_repeated:
                for index, item in enumerate(value):
                    self.message(item, f"{child}[{index}]")
            else:
                self.message(value, child)

    def any_contents(self, any_msg: Any, path: str) -> None:
        if not any_msg.type_url:
            return
        desc = _find_message_type(any_msg.type_url)
        if desc is None:
            self.error(path, f'unknown @type "{any_msg.type_url}"')
            return
        inner = message_factory.GetMessageClass(desc)()
        try:
            inner.ParseFromString(any_msg.value)
        except DecodeError as e:
            self.error(path, f'cannot decode the {desc.full_name} of "@type": {e}')
            return
        self.message(inner, path)

    def typed_struct(self, typed_struct: Any, path: str) -> None:
        # Envoy converts a TypedStruct whose type_url it knows into that message and fails on
        # a mismatch; an unknown type_url (a Python filter's config) is left as it is.
        if not typed_struct.type_url:
            return
        desc = _find_message_type(typed_struct.type_url)
        if desc is None:
            return
        value_path = _join(path, "value")
        document = json_format.MessageToDict(typed_struct.value)
        walker = _SchemaWalker()
        normalized = walker.message(document, desc, value_path)
        if walker.errors or not isinstance(normalized, dict):
            self.errors.extend(walker.errors)
            return
        inner = message_factory.GetMessageClass(desc)()
        try:
            json_format.ParseDict(normalized, inner)
        except (json_format.ParseError, ValueError, TypeError, KeyError) as e:
            self.error(value_path, str(e))
            return
        self.message(inner, value_path)

    def field(
        self, msg: Message, fd: FieldDescriptor, rules: validate_pb2.FieldRules, path: str
    ) -> None:
        kind = rules.WhichOneof("type")
        if _is_map(fd):
            self.map_field(getattr(msg, fd.name), fd, rules, path)
            return
        if fd.is_repeated:
            self.repeated_field(list(getattr(msg, fd.name)), fd, rules, path)
            return
        oneof = fd.containing_oneof
        if oneof is not None and msg.WhichOneof(oneof.name) != fd.name:
            return  # PGV checks only the member of a oneof that is set
        if fd.message_type is not None and not msg.HasField(fd.name):
            required = rules.message.required or (
                kind in ("duration", "any", "timestamp") and getattr(rules, kind).required
            )
            if required:
                self.error(path, "value is required")
            return
        self.value(getattr(msg, fd.name), fd, rules, path)

    def repeated_field(
        self,
        items: list[Any],
        fd: FieldDescriptor,
        rules: validate_pb2.FieldRules,
        path: str,
    ) -> None:
        if rules.WhichOneof("type") != "repeated":
            return
        repeated = rules.repeated
        if repeated.ignore_empty and not items:
            return
        if repeated.HasField("min_items") and len(items) < repeated.min_items:
            self.error(path, f"value must contain at least {repeated.min_items} item(s)")
        if repeated.HasField("max_items") and len(items) > repeated.max_items:
            self.error(path, f"value must contain no more than {repeated.max_items} item(s)")
        if repeated.unique:
            keys = [
                item.SerializeToString(deterministic=True) if isinstance(item, Message) else item
                for item in items
            ]
            if len(set(keys)) != len(keys):
                self.error(path, "repeated value must contain unique items")
        if repeated.HasField("items"):
            for index, item in enumerate(items):
                self.value(item, fd, repeated.items, f"{path}[{index}]")

    def map_field(
        self, entries: Any, fd: FieldDescriptor, rules: validate_pb2.FieldRules, path: str
    ) -> None:
        if rules.WhichOneof("type") != "map":
            return
        map_rules = rules.map
        if map_rules.ignore_empty and not entries:
            return
        if map_rules.HasField("min_pairs") and len(entries) < map_rules.min_pairs:
            self.error(path, f"value must contain at least {map_rules.min_pairs} pair(s)")
        if map_rules.HasField("max_pairs") and len(entries) > map_rules.max_pairs:
            self.error(path, f"value must contain no more than {map_rules.max_pairs} pair(s)")
        key_fd, value_fd = _map_fields(fd)
        for key, item in entries.items():
            item_path = f"{path}[{json.dumps(str(key))}]"
            if map_rules.HasField("keys"):
                self.value(key, key_fd, map_rules.keys, item_path)
            if map_rules.HasField("values"):
                self.value(item, value_fd, map_rules.values, item_path)

    def value(
        self, value: Any, fd: FieldDescriptor, rules: validate_pb2.FieldRules, path: str
    ) -> None:
        """Checks one value (a field, a list item or a map key/value) against its rules."""
        kind = rules.WhichOneof("type")
        if kind is None:
            return
        sub = getattr(rules, kind)
        if isinstance(value, Message) and kind not in ("duration", "any", "timestamp"):
            if value.DESCRIPTOR.full_name not in _WRAPPERS:
                return
            wrapper: Any = value
            value = wrapper.value  # PGV applies scalar rules to a wrapper's value
        problem: str | None = None
        if kind in _NUMERIC_RULES:
            if sub.ignore_empty and value == 0:
                return
            problem = _range_problem(value, sub, _format_number, lambda x: x)
        elif kind == "bool":
            if sub.HasField("const") and value != sub.const:
                problem = f"value must equal {'true' if sub.const else 'false'}"
        elif kind == "string":
            problem = self.string_problem(value, sub)
        elif kind == "bytes":
            problem = self.bytes_problem(value, sub)
        elif kind == "enum":
            assert fd.enum_type is not None
            if sub.defined_only and value not in fd.enum_type.values_by_number:
                problem = "value must be one of the defined enum values"
            else:
                problem = _range_problem(value, sub, str, lambda x: x)
        elif kind == "duration":
            problem = _range_problem(_duration_nanos(value), sub, _duration_text, _duration_nanos)
        elif kind == "any":
            allowed = list(getattr(sub, "in"))
            if allowed and value.type_url not in allowed:
                problem = f"type URL must be in list [{', '.join(allowed)}]"
            elif value.type_url in list(sub.not_in):
                problem = f"type URL must not be in list [{', '.join(sub.not_in)}]"
        if problem is not None:
            self.error(path, problem)

    @staticmethod
    def string_problem(value: str, rules: validate_pb2.StringRules) -> str | None:
        if rules.ignore_empty and not value:
            return None
        has = rules.HasField
        size = len(value)
        if has("const") and value != rules.const:
            return f"value must equal {json.dumps(rules.const)}"
        if has("len") and size != rules.len:
            return f"value length must be {rules.len} characters"
        if has("min_len") and size < rules.min_len:
            return f"value length must be at least {rules.min_len} characters"
        if has("max_len") and size > rules.max_len:
            return f"value length must be at most {rules.max_len} characters"
        if has("len_bytes") or has("min_bytes") or has("max_bytes"):
            encoded = len(value.encode("utf-8"))
            if has("len_bytes") and encoded != rules.len_bytes:
                return f"value length must be {rules.len_bytes} bytes"
            if has("min_bytes") and encoded < rules.min_bytes:
                return f"value length must be at least {rules.min_bytes} bytes"
            if has("max_bytes") and encoded > rules.max_bytes:
                return f"value length must be at most {rules.max_bytes} bytes"
        if has("prefix") and not value.startswith(rules.prefix):
            return f"value does not have prefix {json.dumps(rules.prefix)}"
        if has("suffix") and not value.endswith(rules.suffix):
            return f"value does not have suffix {json.dumps(rules.suffix)}"
        if has("contains") and rules.contains not in value:
            return f"value does not contain substring {json.dumps(rules.contains)}"
        if has("not_contains") and rules.not_contains in value:
            return f"value contains substring {json.dumps(rules.not_contains)}"
        allowed = list(getattr(rules, "in"))
        if allowed and value not in allowed:
            return f"value must be in list [{', '.join(allowed)}]"
        if value in rules.not_in:
            return f"value must not be in list [{', '.join(rules.not_in)}]"
        if rules.HasField("pattern"):
            pattern = _compiled(rules.pattern)
            if pattern is not None and not pattern.search(value):
                return f"value does not match regex pattern {json.dumps(rules.pattern)}"
        well_known = rules.WhichOneof("well_known")
        if well_known == "well_known_regex":
            if rules.HasField("strict") and not rules.strict:
                regex = _HEADER_LOOSE
            elif rules.well_known_regex == validate_pb2.HTTP_HEADER_NAME:
                regex = _HEADER_NAME
            else:
                regex = _HEADER_VALUE
            if rules.well_known_regex != validate_pb2.UNKNOWN and not regex.match(value):
                kind = (
                    "name" if rules.well_known_regex == validate_pb2.HTTP_HEADER_NAME else "value"
                )
                return f"value must be a valid HTTP header {kind}"
        elif well_known is not None and getattr(rules, well_known):
            valid = {
                "ip": lambda: _is_ip(value),
                "ipv4": lambda: _is_ip(value, 4),
                "ipv6": lambda: _is_ip(value, 6),
                "hostname": lambda: _is_hostname(value),
                "address": lambda: _is_ip(value) or _is_hostname(value),
                "uuid": lambda: bool(_UUID.match(value)),
            }.get(well_known)
            if valid is not None and not valid():
                names = {
                    "ip": "an IP address",
                    "ipv4": "an IPv4 address",
                    "ipv6": "an IPv6 address",
                    "hostname": "a hostname",
                    "address": "a hostname or IP address",
                    "uuid": "a UUID",
                }
                return f"value must be a valid {names[well_known]}"
        return None

    @staticmethod
    def bytes_problem(value: bytes, rules: validate_pb2.BytesRules) -> str | None:
        if rules.ignore_empty and not value:
            return None
        if rules.HasField("len") and len(value) != rules.len:
            return f"value length must be {rules.len} bytes"
        if rules.HasField("min_len") and len(value) < rules.min_len:
            return f"value length must be at least {rules.min_len} bytes"
        if rules.HasField("max_len") and len(value) > rules.max_len:
            return f"value length must be at most {rules.max_len} bytes"
        return None
