"""A bootstrap from wherever it comes: a path, YAML or JSON text, a dict or a message.

Files are read by extension (``.yaml``/``.yml``/``.json``/``.pb_text``/``.pb``); text
starting with ``{`` is read as JSON if it is JSON, any other text as YAML. YAML is read
as Envoy reads it (yaml-cpp then ``parseYamlNode``): ``yes``/``on``/``y`` are booleans,
``010`` is octal, dates stay strings, keys tagged ``!ignore`` are dropped. Documents then
go through the schema walk (:mod:`envoyx.config.schema`) and the bootstrap through the
rule check (:mod:`envoyx.config.rules`).

:func:`load_bootstrap` and :func:`bootstrap_to_json` are public, re-exported by
:mod:`envoyx.config`; the rest is private to this module.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeAlias

import yaml
from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap
from google.protobuf import json_format, text_format
from google.protobuf.message import DecodeError, Message

from envoyx.config.rules import rule_errors
from envoyx.config.schema import FLOAT_STRING, message_from_document
from envoyx.errors import ConfigError

__all__ = ["BootstrapSource", "bootstrap_to_json", "load_bootstrap"]

#: What :func:`load_bootstrap` accepts: a path, YAML/JSON text, a dict or a Bootstrap message.
BootstrapSource: TypeAlias = "str | os.PathLike[str] | Mapping[str, Any] | Message"

_BOOTSTRAP_TYPE = "envoy.config.bootstrap.v3.Bootstrap"
_FILE_FORMATS = {
    ".yaml": "yaml",
    ".yml": "yaml",
    ".json": "json",
    ".pb_text": "text",
    ".pb": "binary",
}


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

    broken_rules = rule_errors(bootstrap, "")
    if broken_rules:
        raise ConfigError(broken_rules)
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
        document = _first_yaml_document(text, _FastEnvoyYamlLoader)
    except yaml.YAMLError:
        # The pure-Python parser words its errors better than libyaml ("expected ',' or
        # ']', but got '}'"); a broken document is read again by it for the message.
        document = None
    else:
        if document is None:
            raise ConfigError(f"{origin}: the configuration is empty")
        return document
    try:
        document = _first_yaml_document(text, _EnvoyYamlLoader)
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


def _first_yaml_document(text: str, loader: type[yaml.SafeLoader]) -> object:
    # yaml-cpp's YAML::Load, which Envoy uses, reads the first document only.
    return next(iter(yaml.load_all(text, Loader=loader)), None)


class _EnvoyYamlRules:
    """Reads YAML as Envoy does: yaml-cpp's scalars as converted by Envoy's ``parseYamlNode``.

    Quoted and block scalars are strings; a plain scalar is null, then a yaml-cpp boolean
    (y/yes/true/on and their opposites), then a 64-bit integer (0x hex and 0 octal, beyond
    int32 kept as a decimal string), then a double (non-finite ones as "NaN"/"Infinity"),
    else a string. Map keys are their text; keys tagged ``!ignore`` are dropped.
    """

    # Only the merge key `<<` is resolved implicitly; every other plain scalar reaches
    # _construct_plain_scalar untouched (PyYAML's YAML 1.1 rules differ from yaml-cpp's).
    yaml_implicit_resolvers: dict[Any, Any] = {}  # noqa: RUF012 (PyYAML class-level registry)

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"expected a mapping node, but found {type(node).__name__}",
                node.start_mark,
            )
        self.flatten_mapping(node)  # type: ignore[attr-defined]
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
            mapping[key_node.value] = self.construct_object(value_node, deep=deep)  # type: ignore[attr-defined]
        return mapping


class _EnvoyYamlLoader(_EnvoyYamlRules, yaml.SafeLoader):
    """The rules on PyYAML's pure-Python parser, whose error messages are the clearer."""


class _FastEnvoyYamlLoader(_EnvoyYamlRules, getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The rules on libyaml's parser (PyYAML's wheels bundle it): a 10,000-endpoint
    bootstrap spent 16.6 s of a 21 s start in the pure-Python parser."""


def _construct_plain_scalar(loader: yaml.SafeLoader, node: yaml.Node) -> object:
    assert isinstance(node, yaml.ScalarNode)
    if node.style:  # quoted, literal or folded (a plain scalar: None, or "" from libyaml)
        return node.value
    return _yaml_cpp_scalar(node.value)


def _construct_tagged(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> object:
    # yaml-cpp ignores application tags (`!foo`): the node converts as if untagged.
    if isinstance(node, yaml.ScalarNode):
        return _construct_plain_scalar(loader, node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    assert isinstance(node, yaml.MappingNode)
    return loader.construct_mapping(node, deep=True)


for _loader in (_EnvoyYamlLoader, _FastEnvoyYamlLoader):
    _loader.add_implicit_resolver("tag:yaml.org,2002:merge", re.compile(r"^(?:<<)$"), ["<"])
    _loader.add_constructor("tag:yaml.org,2002:str", _construct_plain_scalar)
    _loader.add_multi_constructor("!", _construct_tagged)


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
    if FLOAT_STRING.match(text):
        number_f = float(text)
        if math.isfinite(number_f):
            return number_f
    return text


def _document_to_bootstrap(document: object, allow_unknown_fields: bool) -> Bootstrap:
    return message_from_document(document, Bootstrap, "", allow_unknown_fields=allow_unknown_fields)
