"""Which fields of a message envoyx reads: asked of the core itself, field by field.

The core refuses every field it does not read (`<path>: not supported by envoyx`), so
setting one field at a time in an otherwise minimal bootstrap and looking for that error
at exactly that field's path gives the code's own list of supported and rejected fields.
`docs/config-support.md` ("Field index") is checked against it by
tests/test_config_support_doc.py and rewritten by `python -m tests.support.config_fields`.

A probe value is built from the field's descriptor (a non-default scalar, `{}` for a
message, one element for a repeated field or map), so the field is present after the
proto round-trip the loader makes. The schema's validation rules (PGV) are skipped: the
question is whether envoyx reads the field, not whether the probe value is sensible.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap
from google.protobuf import descriptor_pool, json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from envoyx import _core

HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
DOC = Path(__file__).resolve().parents[2] / "docs" / "config-support.md"
INDEX_HEADING = "## Field index"


def _base() -> dict[str, Any]:
    """A minimal valid bootstrap: one listener with a connection manager, one cluster."""
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "l",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": HCM_TYPE,
                                        "stat_prefix": "p",
                                        "route_config": {
                                            "name": "r",
                                            "virtual_hosts": [
                                                {
                                                    "name": "v",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "route": {"cluster": "c"},
                                                        }
                                                    ],
                                                }
                                            ],
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {"@type": ROUTER_TYPE},
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "c",
                    "type": "STATIC",
                    "load_assignment": {
                        "cluster_name": "c",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": 2,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        }
    }


_HCM = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"
_ROUTES = f"{_HCM}.route_config.virtual_hosts[0].routes[0]"


def _set_action(kind: str, value: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """Replaces the first route's action (`route`, `redirect`, `direct_response`)."""

    def prepare(doc: dict[str, Any]) -> None:
        route = _at(doc, _ROUTES)
        for action in ("route", "redirect", "direct_response"):
            route.pop(action, None)
        route[kind] = copy.deepcopy(value)

    return prepare


def _set(path: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def prepare(doc: dict[str, Any]) -> None:
        _at(doc, path)[key] = copy.deepcopy(value)

    return prepare


@dataclass(frozen=True)
class Place:
    """Where a message sits in the probe bootstrap (its error path) and what it needs."""

    message: str
    path: str
    prepare: Callable[[dict[str, Any]], None] | None = None


PLACES = [
    Place(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        _HCM,
    ),
    Place(
        "envoy.config.core.v3.HttpProtocolOptions",
        f"{_HCM}.common_http_protocol_options",
        _set(_HCM, "common_http_protocol_options", {}),
    ),
    Place(
        "envoy.config.core.v3.Http1ProtocolOptions",
        f"{_HCM}.http_protocol_options",
        _set(_HCM, "http_protocol_options", {}),
    ),
    Place(
        "envoy.config.core.v3.Http2ProtocolOptions",
        f"{_HCM}.http2_protocol_options",
        _set(_HCM, "http2_protocol_options", {}),
    ),
    Place(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager."
        "UpgradeConfig",
        f"{_HCM}.upgrade_configs[0]",
        _set(_HCM, "upgrade_configs", [{"upgrade_type": "websocket"}]),
    ),
    Place(
        "envoy.extensions.filters.network.http_connection_manager.v3.LocalReplyConfig",
        f"{_HCM}.local_reply_config",
        _set(_HCM, "local_reply_config", {}),
    ),
    Place(
        "envoy.extensions.filters.network.http_connection_manager.v3.ResponseMapper",
        f"{_HCM}.local_reply_config.mappers[0]",
        _set(
            _HCM,
            "local_reply_config",
            {
                "mappers": [
                    {
                        "filter": {
                            "status_code_filter": {
                                "comparison": {
                                    "op": "EQ",
                                    "value": {"default_value": 404, "runtime_key": "k"},
                                }
                            }
                        }
                    }
                ]
            },
        ),
    ),
    Place("envoy.config.route.v3.RouteConfiguration", f"{_HCM}.route_config"),
    Place("envoy.config.route.v3.VirtualHost", f"{_HCM}.route_config.virtual_hosts[0]"),
    Place("envoy.config.route.v3.Route", _ROUTES),
    Place("envoy.config.route.v3.RouteMatch", f"{_ROUTES}.match"),
    Place(
        "envoy.config.route.v3.HeaderMatcher",
        f"{_ROUTES}.match.headers[0]",
        _set(f"{_ROUTES}.match", "headers", [{"name": "h"}]),
    ),
    Place(
        "envoy.config.route.v3.QueryParameterMatcher",
        f"{_ROUTES}.match.query_parameters[0]",
        _set(f"{_ROUTES}.match", "query_parameters", [{"name": "q"}]),
    ),
    Place("envoy.config.route.v3.RouteAction", f"{_ROUTES}.route"),
    Place(
        "envoy.config.route.v3.WeightedCluster",
        f"{_ROUTES}.route.weighted_clusters",
        _set_action("route", {"weighted_clusters": {"clusters": [{"name": "c", "weight": 1}]}}),
    ),
    Place(
        "envoy.config.route.v3.WeightedCluster.ClusterWeight",
        f"{_ROUTES}.route.weighted_clusters.clusters[0]",
        _set_action("route", {"weighted_clusters": {"clusters": [{"name": "c", "weight": 1}]}}),
    ),
    Place(
        "envoy.config.route.v3.RouteAction.RequestMirrorPolicy",
        f"{_ROUTES}.route.request_mirror_policies[0]",
        _set_action("route", {"cluster": "c", "request_mirror_policies": [{"cluster": "c"}]}),
    ),
    Place(
        "envoy.config.route.v3.RouteAction.UpgradeConfig",
        f"{_ROUTES}.route.upgrade_configs[0]",
        _set_action("route", {"cluster": "c", "upgrade_configs": [{"upgrade_type": "websocket"}]}),
    ),
    Place(
        "envoy.config.route.v3.RouteAction.HashPolicy",
        f"{_ROUTES}.route.hash_policy[0]",
        _set_action("route", {"cluster": "c", "hash_policy": [{}]}),
    ),
    Place(
        "envoy.config.route.v3.RetryPolicy",
        f"{_ROUTES}.route.retry_policy",
        _set_action("route", {"cluster": "c", "retry_policy": {}}),
    ),
    Place(
        "envoy.config.route.v3.RedirectAction",
        f"{_ROUTES}.redirect",
        _set_action("redirect", {"host_redirect": "h"}),
    ),
    Place(
        "envoy.config.route.v3.DirectResponseAction",
        f"{_ROUTES}.direct_response",
        _set_action("direct_response", {"status": 200}),
    ),
    Place(
        "envoy.config.core.v3.HeaderValueOption",
        f"{_ROUTES}.request_headers_to_add[0]",
        _set(_ROUTES, "request_headers_to_add", [{"header": {"key": "k", "value": "v"}}]),
    ),
]


def _at(doc: Any, path: str) -> Any:
    node = doc
    for name, index in re.findall(r"([A-Za-z_0-9]+)(?:\[(\d+)\])?", path):
        node = node[name]
        if index:
            node = node[int(index)]
    return node


def _message_descriptor(full_name: str) -> Descriptor:
    return descriptor_pool.Default().FindMessageTypeByName(full_name)


_WELL_KNOWN: dict[str, Any] = {
    "google.protobuf.Duration": "1s",
    "google.protobuf.Timestamp": "1970-01-01T00:00:01Z",
    "google.protobuf.BoolValue": True,
    "google.protobuf.StringValue": "x",
    "google.protobuf.BytesValue": "eA==",
    "google.protobuf.UInt32Value": 1,
    "google.protobuf.UInt64Value": "1",
    "google.protobuf.Int32Value": 1,
    "google.protobuf.Int64Value": "1",
    "google.protobuf.DoubleValue": 0.5,
    "google.protobuf.FloatValue": 0.5,
    "google.protobuf.Struct": {"k": "v"},
    "google.protobuf.Value": "x",
    "google.protobuf.ListValue": ["x"],
    "google.protobuf.Empty": {},
    "google.protobuf.Any": {"@type": "type.googleapis.com/google.protobuf.Empty"},
}


def _scalar_value(field: FieldDescriptor) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        name = field.message_type.full_name
        return copy.deepcopy(_WELL_KNOWN.get(name, {}))
    if field.type == FieldDescriptor.TYPE_ENUM:
        values = field.enum_type.values
        return (values[1] if len(values) > 1 else values[0]).name
    if field.type == FieldDescriptor.TYPE_BOOL:
        return True
    if field.type == FieldDescriptor.TYPE_STRING:
        return "x"
    if field.type == FieldDescriptor.TYPE_BYTES:
        return "eA=="
    if field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return 0.5
    return 1


def probe_value(field: FieldDescriptor) -> Any:
    """A value that makes `field` present after the proto round-trip."""
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return {"k": _scalar_value(field.message_type.fields_by_name["value"])}
    if field.is_repeated:
        return [_scalar_value(field)]
    return _scalar_value(field)


def _errors(doc: dict[str, Any]) -> list[str] | str:
    try:
        bootstrap = json_format.ParseDict(doc, Bootstrap())
    except json_format.ParseError as e:
        return f"the probe document does not parse: {e}"
    as_json = json.dumps(json_format.MessageToDict(bootstrap, preserving_proto_field_name=True))
    return list(_core.validate(as_json))


def fields_of(message: str) -> list[FieldDescriptor]:
    return list(_message_descriptor(message).fields)


def probe(place: Place, field: FieldDescriptor) -> str:
    """`supported` or `rejected`, as the core answers for this one field."""
    doc = _base()
    if place.prepare is not None:
        place.prepare(doc)
    owner = _at(doc, place.path)
    oneof = field.containing_oneof
    if oneof is not None:
        for sibling in oneof.fields:
            owner.pop(sibling.name, None)
    owner[field.name] = probe_value(field)
    errors = _errors(doc)
    if isinstance(errors, str):
        raise AssertionError(f"{place.message}.{field.name}: {errors}")
    where = f"{place.path}.{field.name}"
    refused = any(e.startswith(f"{where}: ") and "not supported" in e for e in errors)
    return "rejected" if refused else "supported"


def code_list() -> Iterator[tuple[str, str, str]]:
    """(message, field, status) for every field of every message in PLACES."""
    for place in PLACES:
        for field in fields_of(place.message):
            yield place.message, field.name, probe(place, field)


# -- the document ------------------------------------------------------------------------

_ROW = re.compile(r"^\| `([a-z0-9_]+)` \| (supported|rejected|differs)(?:: (.*))? \|$")


def doc_list(text: str | None = None) -> dict[str, dict[str, tuple[str, str]]]:
    """message -> field -> (status, note), from the document's field index."""
    text = DOC.read_text() if text is None else text
    index = text.split(f"\n{INDEX_HEADING}\n", 1)
    if len(index) != 2:
        raise AssertionError(f"{DOC.name} has no '{INDEX_HEADING}' section")
    listed: dict[str, dict[str, tuple[str, str]]] = {}
    message = None
    for line in index[1].splitlines():
        if line.startswith("## "):
            break
        if line.startswith("### `") and line.endswith("`"):
            message = line[5:-1]
            listed[message] = {}
        elif message is not None and line.startswith("| `"):
            row = _ROW.match(line)
            if row is None:
                raise AssertionError(f"{DOC.name}: unreadable field-index row: {line}")
            listed[message][row.group(1)] = (row.group(2), row.group(3) or "")
    return listed


def render(
    statuses: dict[str, dict[str, str]], notes: dict[str, dict[str, tuple[str, str]]]
) -> str:
    """The field-index section, keeping the notes (and `differs`) already written."""
    out = [
        INDEX_HEADING,
        "",
        "Every field of the messages a route configuration and a connection manager are",
        "made of, as the core reads it: **supported**, **rejected** (set, it is refused",
        "with its path) or **differs** (read, with a difference from Envoy the note names).",
        "tests/test_config_support_doc.py sets each field alone in a minimal bootstrap and",
        "checks the core's answer against this list; `python -m tests.support.config_fields`",
        "rewrites it from the code, keeping the notes.",
        "",
    ]
    for message, fields in statuses.items():
        out += [f"### `{message}`", "", "| field | status |", "| --- | --- |"]
        for name, status in fields.items():
            old_status, note = notes.get(message, {}).get(name, ("", ""))
            if status == "supported" and old_status == "differs":
                status = "differs"
            out.append(f"| `{name}` | {status}{': ' + note if note else ''} |")
        out.append("")
    return "\n".join(out)


def rewrite_doc() -> None:
    statuses: dict[str, dict[str, str]] = {}
    for message, name, status in code_list():
        statuses.setdefault(message, {})[name] = status
    text = DOC.read_text()
    head, sep, rest = text.partition(f"\n{INDEX_HEADING}\n")
    notes = doc_list(text) if sep else {}
    tail = ""
    if sep:
        after = rest.split("\n## ", 1)
        tail = "\n## " + after[1] if len(after) == 2 else ""
    DOC.write_text(head.rstrip("\n") + "\n\n" + render(statuses, notes) + tail)


if __name__ == "__main__":
    rewrite_doc()
    sys.exit(0)
