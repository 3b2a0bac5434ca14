"""Every field envoyx refuses in what istiod generated, found offline.

Over xDS envoyx NACKs a resource at its first refused field, so a live run shows one
gap per resource. :func:`peel` finds them all: each resource of an istiod config dump
(``/debug/config_dump?proxyID=``, kept in ``tests/istio/fixtures/``) is put into a
minimal bootstrap of its own and mapped by the core (``_core.validate``, as
``envoyx --mode validate``); every ``<path>: not supported by envoyx`` error names a
field, which is removed before mapping again, until the resource maps or an error of
another kind stays. Route configurations are mapped inline in a connection manager,
endpoint assignments as a static cluster's ``load_assignment``.

    python tests/support/istio_gaps.py tests/istio/fixtures/gateway.json

prints one line per gap: resource type, resource name, field path (relative to the
resource), message.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Json = dict[str, Any]

_ADS = {
    "ads_config": {
        "api_type": "GRPC",
        "transport_api_version": "V3",
        "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
    },
    "lds_config": {"ads": {}, "resource_api_version": "V3"},
    "cds_config": {"ads": {}, "resource_api_version": "V3"},
}
_XDS_CLUSTER = {
    "name": "xds-grpc",
    "type": "STATIC",
    "connect_timeout": "1s",
    "load_assignment": {
        "cluster_name": "xds-grpc",
        "endpoints": [
            {
                "lb_endpoints": [
                    {
                        "endpoint": {
                            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}}
                        }
                    }
                ]
            }
        ],
    },
    "typed_extension_protocol_options": {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    },
}
_HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"

# Where each kind of resource sits in its bootstrap, as the error paths spell it.
_CLUSTER_AT = "static_resources.clusters[1]"
_LISTENER_AT = "static_resources.listeners[0]"
_ROUTE_AT = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config"
_ENDPOINT_AT = "static_resources.clusters[1].load_assignment"


@dataclass(frozen=True)
class Gap:
    type: str  # Cluster, Listener, RouteConfiguration, ClusterLoadAssignment
    resource: str
    path: str  # relative to the resource, e.g. "metadata", "filter_chains[0].filters[0]..."
    message: str

    @property
    def field(self) -> str:
        """The path without list indexes: the same gap in every resource reads alike."""
        return re.sub(r"\[\d+\]", "", self.path)


def _import_types(doc: Any) -> None:
    """Import the xds-protos modules of every ``@type`` in ``doc`` (registering them)."""
    import importlib
    import pkgutil

    if isinstance(doc, dict):
        t = doc.get("@type")
        if isinstance(t, str):
            package = t.rsplit("/", 1)[-1].rsplit(".", 1)[0]
            try:
                mod = importlib.import_module(package)
                for info in pkgutil.iter_modules(mod.__path__):
                    if info.name.endswith("_pb2"):
                        importlib.import_module(f"{package}.{info.name}")
            except ImportError:
                pass
        for v in doc.values():
            _import_types(v)
    elif isinstance(doc, list):
        for v in doc:
            _import_types(v)


def _snake_case(dump: Json) -> Json:
    """istiod writes proto-JSON with camelCase names; the core's paths are snake_case."""
    from envoy.admin.v3 import config_dump_pb2
    from google.protobuf import json_format

    _import_types(dump)
    msg = json_format.ParseDict(dump, config_dump_pb2.ConfigDump(), ignore_unknown_fields=True)
    return dict(json_format.MessageToDict(msg, preserving_proto_field_name=True))


def resources(dump: Json) -> dict[str, list[Json]]:
    """The dynamic resources of an Envoy-style config dump, by type."""
    dump = _snake_case(dump)
    sections = {c["@type"].rsplit(".", 1)[-1]: c for c in dump.get("configs", [])}
    out: dict[str, list[Json]] = {
        "Cluster": [],
        "Listener": [],
        "RouteConfiguration": [],
        "ClusterLoadAssignment": [],
    }
    for c in sections.get("ClustersConfigDump", {}).get("dynamic_active_clusters", []):
        out["Cluster"].append(c["cluster"])
    for c in sections.get("ClustersConfigDump", {}).get("dynamic_warming_clusters", []):
        out["Cluster"].append(c["cluster"])
    for entry in sections.get("ListenersConfigDump", {}).get("dynamic_listeners", []):
        state = entry.get("active_state") or entry.get("warming_state")
        if state:
            out["Listener"].append(state["listener"])
    for r in sections.get("RoutesConfigDump", {}).get("dynamic_route_configs", []):
        out["RouteConfiguration"].append(r["route_config"])
    for e in sections.get("EndpointsConfigDump", {}).get("dynamic_endpoint_configs", []):
        out["ClusterLoadAssignment"].append(e["endpoint_config"])
    for docs in out.values():
        for d in docs:
            d.pop("@type", None)
    return out


def _bootstrap(kind: str, resource: Json) -> tuple[Json, str]:
    static: Json = {"clusters": [copy.deepcopy(_XDS_CLUSTER)], "listeners": []}
    if kind == "Cluster":
        static["clusters"].append(resource)
        at = _CLUSTER_AT
    elif kind == "ClusterLoadAssignment":
        static["clusters"].append(
            {
                "name": resource.get("cluster_name", "cla"),
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": resource,
            }
        )
        at = _ENDPOINT_AT
    elif kind == "Listener":
        # tcp_proxy names its cluster, which must exist: a stub for each
        for name in sorted(_cluster_names(resource)):
            stub = copy.deepcopy(_XDS_CLUSTER)
            del stub["typed_extension_protocol_options"]
            stub["name"] = stub["load_assignment"]["cluster_name"] = name
            static["clusters"].append(stub)
        static["listeners"].append(resource)
        at = _LISTENER_AT
    else:
        hcm = {
            "@type": _HCM,
            "stat_prefix": "peel",
            "route_config": resource,
            "http_filters": [
                {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}
            ],
        }
        static["listeners"].append(
            {
                "name": "peel",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [
                    {
                        "filters": [
                            {
                                "name": "envoy.filters.network.http_connection_manager",
                                "typed_config": hcm,
                            }
                        ]
                    }
                ],
            }
        )
        at = _ROUTE_AT
    return {
        "node": {"id": "peel", "cluster": "peel"},
        "dynamic_resources": copy.deepcopy(_ADS),
        "static_resources": static,
    }, at


def _cluster_names(doc: Any) -> set[str]:
    out: set[str] = set()
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k == "cluster" and isinstance(v, str):
                out.add(v)
            else:
                out |= _cluster_names(v)
    elif isinstance(doc, list):
        for v in doc:
            out |= _cluster_names(v)
    return out


def _validate(bootstrap: Json) -> list[str]:
    from envoyx import ConfigError, _core
    from envoyx.config.loading import bootstrap_to_json, load_bootstrap

    try:
        loaded = load_bootstrap(bootstrap)
    except ConfigError as e:
        return list(e.errors)
    return list(_core.validate(bootstrap_to_json(loaded)))


_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]|\[\"?([^\]\"]+)\"?\]")


def _tokens(path: str) -> list[str | int]:
    out: list[str | int] = []
    for m in _TOKEN.finditer(path):
        if m.group(1) is not None:
            out.append(m.group(1))
        elif m.group(2) is not None:
            out.append(int(m.group(2)))
        else:
            out.append(m.group(3))
    return out


def _delete(doc: Any, tokens: list[str | int]) -> bool:
    """Remove the field (or list element) at ``tokens``; False when it is not there."""
    node = doc
    for t in tokens[:-1]:
        try:
            node = node[t]
        except (KeyError, IndexError, TypeError):
            return False
    last = tokens[-1]
    try:
        del node[last]
    except (KeyError, IndexError, TypeError):
        return False
    return True


_UNSUPPORTED = re.compile(r"^(?P<path>\S+): (?P<msg>.*not supported by envoyx.*)$")


def peel(kind: str, resource: Json, max_rounds: int = 100) -> tuple[list[Gap], list[str]]:
    """Every refused field of one resource, and the errors left that name no field to
    remove (empty when the rest maps)."""
    gaps, others, _ = stripped(kind, resource, max_rounds)
    return gaps, others


def stripped(kind: str, resource: Json, max_rounds: int = 100) -> tuple[list[Gap], list[str], Json]:
    """:func:`peel`, and the resource without the refused fields (an unsupported
    extension goes whole: the HTTP or listener filter that names it)."""
    doc = copy.deepcopy(resource)
    name = str(doc.get("name") or doc.get("cluster_name") or "")
    gaps: list[Gap] = []
    for _ in range(max_rounds):
        bootstrap, at = _bootstrap(kind, doc)
        errors = _validate(bootstrap)
        if not errors:
            return gaps, [], doc
        progressed = False
        others: list[str] = []
        for err in errors:
            m = _UNSUPPORTED.match(err)
            if not m or not m.group("path").startswith(at):
                others.append(err)
                continue
            rel = m.group("path")[len(at) :].lstrip(".")
            tokens = _tokens(rel)
            if tokens[-2:] == ["typed_config", "@type"]:
                # an extension that is not supported: the whole filter goes
                tokens = tokens[:-2]
            if rel and _delete(doc, tokens):
                gaps.append(Gap(kind, name, rel, m.group("msg")))
                progressed = True
                break  # indexes after a removed list element moved: map again
            others.append(err)
        if not progressed:
            return gaps, others, doc
    return gaps, ["too many rounds"], doc


def peel_dump(dump: Json) -> tuple[list[Gap], list[tuple[str, str, str]]]:
    """Gaps of every resource of a config dump, and (type, name, error) left over."""
    gaps: list[Gap] = []
    left: list[tuple[str, str, str]] = []
    for kind, docs in resources(dump).items():
        for doc in docs:
            found, others = peel(kind, doc)
            gaps.extend(found)
            name = str(doc.get("name") or doc.get("cluster_name") or "")
            left.extend((kind, name, e) for e in others)
    return gaps, left


def main(argv: list[str]) -> int:
    for path in argv:
        with open(path) as f:
            dump = json.load(f)
        gaps, left = peel_dump(dump)
        print(f"# {path}")
        for g in gaps:
            print(f"{g.type}\t{g.resource}\t{g.path}\t{g.message}")
        for kind, name, err in left:
            print(f"{kind}\t{name}\t(other)\t{err}")
    return 0


if __name__ == "__main__":
    # Run as a script, this folder is first on sys.path, where support/envoy.py would
    # shadow the xds-protos package ``envoy``.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.exit(main(sys.argv[1:]))
