"""Pass 2 of the checks: the protoc-gen-validate rules of a parsed message.

Internal API of envoyx (used by :mod:`envoyx.config` for the bootstrap and by
:mod:`envoyx.xds` for every xDS resource and ``Server.update`` resource), not part of
the public interface: names in ``__all__`` may change without notice.

Envoy checks these rules (required fields, string lengths, numeric ranges, ...) once a
document has parsed, inside ``typed_config`` Anys too; :class:`RuleChecker` reports every
broken rule with its field path and Envoy's (PGV's) wording, and :func:`rule_errors` is
the one-call form.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError, Message
from validate import validate_pb2

from envoyx.config.schema import (
    ANY,
    WRAPPERS,
    SchemaWalker,
    find_message_type,
    is_map,
    join_path,
    map_fields,
)

__all__ = ["RuleChecker", "rule_errors"]

_TYPED_STRUCTS = frozenset({"xds.type.v3.TypedStruct", "udpa.type.v1.TypedStruct"})


def rule_errors(msg: Message, path: str = "") -> list[str]:
    """Every protoc-gen-validate rule broken by ``msg`` (and every unknown ``@type`` in its
    Anys), each as ``"<path>: <problem>"`` under ``path`` (``(root)`` when empty)."""
    checker = RuleChecker()
    checker.message(msg, path)
    return checker.errors


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


class RuleChecker:
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
        if full_name == ANY:
            self.any_contents(msg, path)
            return
        if full_name.startswith("google.protobuf."):
            return
        plan = _plan_of(desc)
        if plan.skip:
            return
        for fd, rules in plan.fields:
            self.field(msg, fd, rules, join_path(path, fd.name))
        for oneof_name, members in plan.required_oneofs:
            if msg.WhichOneof(oneof_name) is None:
                choices = ", ".join(f'"{name}"' for name in members)
                self.error(join_path(path, oneof_name), f"value is required (set one of {choices})")
        if full_name in _TYPED_STRUCTS:
            self.typed_struct(msg, path)
        skipped = {fd.name for fd, rules in plan.fields if rules.message.skip}
        for fd, value in msg.ListFields():
            if fd.message_type is None or fd.name in skipped:
                continue
            child = join_path(path, fd.name)
            if is_map(fd):
                if map_fields(fd)[1].message_type is not None:
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
        desc = find_message_type(any_msg.type_url)
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
        desc = find_message_type(typed_struct.type_url)
        if desc is None:
            return
        value_path = join_path(path, "value")
        document = json_format.MessageToDict(typed_struct.value)
        walker = SchemaWalker()
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
        if is_map(fd):
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
        key_fd, value_fd = map_fields(fd)
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
            if value.DESCRIPTOR.full_name not in WRAPPERS:
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
