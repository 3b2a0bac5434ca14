"""Every field Envoy gives a default takes that default in envoyx.

For each documented default (tests/support/envoy_defaults.py, from the comments of
Envoy's API protos) the field is left unset in one document and written out with Envoy's
value in another; the core must map both to the same configuration (`_core.describe`,
the mapped model in full). Each is checked where the message can arrive: in the
bootstrap's static resources and as the xDS resource that carries it (LDS listener, CDS
cluster, RDS route configuration: the same mapping, reached by another door). The
management server's own cluster is a static cluster, so its defaults are the cluster's.

A second test walks every field of these messages the core reads and requires it to be
classified: a documented default (checked), a default that is the absence of a feature,
or no documented default. A field supported later cannot skip the check silently.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from typing import Any

import grpc
import pytest
from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from envoyx import ConfigError, _core
from envoyx.xds.client import _make_channel
from envoyx.xds.settings import parse_dynamic_resources
from support.bootstrap import bootstrap, cluster, http_listener, route, virtual_host
from support.bootstrap import socket_address as _address
from support.config_fields import Place, _at, _base, fields_of, probe
from support.differential import (
    Ctx,
    H2Settings,
    Http,
    Json,
    Raw,
    Scenario,
    differential_tests,
)
from support.envoy_defaults import (
    ABSENT,
    DEFAULT_PLACES,
    DEFAULTS,
    NO_DEFAULT,
    Default,
)

_PLACES = {place.message: place for place in DEFAULT_PLACES}
_CHECKED_TYPES = ("google.protobuf.",)


def _canonical(doc: dict[str, Any]) -> dict[str, Any]:
    """The document as the loader hands it to the core: through the proto, canonical JSON."""
    message = json_format.ParseDict(doc, Bootstrap())
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _documents(default: Default, value: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    place = _PLACES[default.message]
    unset = _base()
    if place.prepare is not None:
        place.prepare(unset)
    explicit = copy.deepcopy(unset)
    _at(explicit, place.path)[default.field] = copy.deepcopy(value)
    return _canonical(unset), _canonical(explicit)


def _resource(doc: dict[str, Any], path: str) -> tuple[str, dict[str, Any]] | None:
    """The xDS resource of `doc` that holds `path`, and its describe kind."""
    static = doc["static_resources"]
    if path.startswith("static_resources.clusters[0]"):
        return "cluster", static["clusters"][0]
    if ".route_config" in path:
        hcm = static["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        return "route_configuration", hcm["route_config"]
    if path.startswith("static_resources.listeners[0]"):
        return "listener", static["listeners"][0]
    return None


def _diff(a: str, b: str) -> str:
    return "\n".join(difflib.unified_diff(a.splitlines(), b.splitlines(), "unset", "set", n=2))


_RAW = re.compile(r"^(\s*)raw: (?:Object|Array) [{\[]$")


def _mapped(kind: str, doc: dict[str, Any]) -> str:
    """The core's model of `doc` without the `raw` copies it keeps for /config_dump
    (which echoes the input, as Envoy's does)."""
    out: list[str] = []
    closing: str | None = None
    for line in _core.describe(kind, json.dumps(doc)).splitlines():
        if closing is not None:
            if line.startswith(closing):
                closing = None
            continue
        raw = _RAW.match(line)
        if raw is not None:
            closing = f"{raw.group(1)}}}" if line.endswith("{") else f"{raw.group(1)}]"
            continue
        out.append(line)
    return "\n".join(out)


def _assert_same(kind: str, unset: dict[str, Any], explicit: dict[str, Any], what: str) -> None:
    a = _mapped(kind, unset)
    b = _mapped(kind, explicit)
    assert a == b, f"{what} ({kind}): unset is not Envoy's default\n{_diff(a, b)}"


@pytest.mark.parametrize("default", DEFAULTS, ids=lambda d: d.name)
def test_an_unset_field_takes_envoys_documented_default(default: Default) -> None:
    place = _PLACES[default.message]
    field = next(f for f in fields_of(default.message) if f.name == default.field)
    assert probe(place, field) == "supported", f"{default.name} is listed but not supported"
    what = f"{default.name} = {default.value!r} ({default.doc})"
    unset, explicit = _documents(default, default.value)
    _assert_same("bootstrap", unset, explicit, what)
    if default.xds_value is not None:
        unset, explicit = _documents(default, default.xds_value)
    found = _resource(unset, place.path)
    if found is not None:
        kind, resource = found
        _, written = _resource(explicit, place.path)  # type: ignore[misc]
        _assert_same(kind, resource, written, what)


def _checked_field(field: FieldDescriptor) -> bool:
    """A field whose unset state proto3 tells apart from every written value."""
    if field.is_repeated or field.type != FieldDescriptor.TYPE_MESSAGE:
        return False
    name = field.message_type.full_name
    if name.startswith(_CHECKED_TYPES):
        return name not in ("google.protobuf.Any", "google.protobuf.Struct")
    return False


def test_every_supported_field_with_an_unset_state_is_classified() -> None:
    listed = {d.name for d in DEFAULTS}
    unclassified = []
    twice = []
    for place in DEFAULT_PLACES:
        for field in fields_of(place.message):
            name = f"{place.message.rsplit('.', 1)[-1]}.{field.name}"
            homes = [name in listed, name in ABSENT, name in NO_DEFAULT]
            if sum(homes) > 1:
                twice.append(name)
            if not _checked_field(field) or any(homes):
                continue
            if probe(place, field) == "supported":
                unclassified.append(name)
    assert not twice, f"classified more than once: {twice}"
    assert not unclassified, (
        "supported fields with an unset state that tests/support/envoy_defaults.py does not "
        f"classify (read Envoy's comment for each): {unclassified}"
    )


def test_a_wrong_default_is_caught() -> None:
    # The comparison can fail: a route timeout of 5 s is not the unset 15 s.
    route = next(d for d in DEFAULTS if d.name == "RouteAction.timeout")
    unset, explicit = _documents(route, "5s")
    with pytest.raises(AssertionError, match="unset is not Envoy's default"):
        _assert_same("bootstrap", unset, explicit, "RouteAction.timeout = 5s")


# -- the same defaults, as Envoy 1.40 behaves with the fields left unset ----------------


def _unset_everywhere(ctx: Ctx) -> Json:
    """A connection manager, a route, a retry policy and a cluster with nothing optional
    set: what they do is Envoy's defaults at work."""
    retrying = route({"prefix": "/retry"}, cluster="a")
    retrying["route"]["retry_policy"] = {"retry_on": "5xx"}
    return bootstrap(
        admin_port=ctx.admin_port,
        listeners=[
            http_listener(
                port=ctx.port,
                virtual_hosts=[
                    virtual_host("all", ["*"], [retrying, route({"prefix": "/"}, cluster="a")])
                ],
            )
        ],
        clusters=[cluster("a", [ctx.up("a")])],
    )


def _headers(n: int) -> bytes:
    lines = b"".join(b"x-h%d: v\r\n" % i for i in range(n))
    return b"GET / HTTP/1.1\r\nhost: h\r\n" + lines + b"connection: close\r\n\r\n"


def _h2_upstream(ctx: Ctx) -> Json:
    """A connection manager in front of an HTTP/2 upstream, nothing optional set."""
    h2 = cluster("h2", [ctx.up("h2")])
    h2["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    return bootstrap(
        admin_port=ctx.admin_port,
        listeners=[
            http_listener(
                port=ctx.port,
                virtual_hosts=[virtual_host("all", ["*"], [route({"prefix": "/"}, cluster="h2")])],
            )
        ],
        clusters=[h2],
    )


DEFAULT_SCENARIOS = [
    Scenario(
        "defaults_http2_settings",
        _unset_everywhere,
        # Http2ProtocolOptions unset: the settings and connection window in force.
        (
            H2Settings(
                expect={
                    "h2.connection_window": 24 * 1024 * 1024,
                    "h2.setting:INITIAL_WINDOW_SIZE": 16 * 1024 * 1024,
                    "h2.setting:MAX_CONCURRENT_STREAMS": 1024,
                    "h2.setting:HEADER_TABLE_SIZE": 4096,
                }
            ),
        ),
        not_compared={
            "h2.setting:MAX_HEADER_LIST_SIZE": "hyper's codec always announces a header-list "
            "limit; envoyx makes it twice max_request_headers_kb plus the per-header overhead, "
            "so that the limit Envoy enforces without announcing it is checked first",
        },
    ),
    Scenario(
        "defaults_route_and_connection_manager",
        _unset_everywhere,
        (
            # RouteAction.timeout unset: 15 s, told to the upstream; server_name: envoy.
            Http(
                "/",
                observe=("up.header:x-envoy-expected-rq-timeout-ms",),
                expect={
                    "status": 200,
                    "header:server": "envoy",
                    "up.header:x-envoy-expected-rq-timeout-ms": "15000",
                },
            ),
            # HttpProtocolOptions.max_headers_count unset: 100 request headers.
            Raw(_headers(98), expect={"status": 200}),
            Raw(_headers(99), expect={"status": 431}),
            # max_request_headers_kb unset: 60 KiB, over HTTP/2 too.
            Http("/", http2=True, headers=(("x-big", "v" * 40000),), expect={"status": 200}),
            # RetryPolicy.num_retries unset: one retry.
            Http("/retry", headers=(("x-test-status", "503"),), expect={"status": 503}),
        ),
        stats={"cluster.a.upstream_rq_retry": 1, "cluster.a.upstream_rq_total": 5},
    ),
    Scenario(
        "defaults_http2_upstream",
        _h2_upstream,
        (
            # max_response_headers_kb unset: 60 KiB from an HTTP/2 upstream too.
            Http(
                "/",
                headers=(("x-test-response-header", "x-big: " + "v" * 40000),),
                expect={"status": 200, "upstream": "h2"},
            ),
        ),
    ),
]


test_defaults_behave_as_envoys = pytest.mark.envoy(differential_tests(DEFAULT_SCENARIOS))


def _ads_bootstrap(xds_cluster: Json) -> Bootstrap:
    doc = {
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds_cluster"}}],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [xds_cluster]},
    }
    return json_format.ParseDict(doc, Bootstrap())


@pytest.mark.parametrize(("written", "seconds"), [(None, 5.0), ("1.5s", 1.5)])
def test_the_management_servers_cluster_takes_the_cluster_defaults(
    written: str | None, seconds: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # go-control-plane's sample bootstrap: no type (STATIC), no connect_timeout (5 s),
    # which bounds each connection attempt of the xDS channel as in Envoy.
    xds_cluster: Json = {
        "name": "xds_cluster",
        "load_assignment": {
            "cluster_name": "xds_cluster",
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _address("127.0.0.1", 18000)}}]}
            ],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }
    if written is not None:
        xds_cluster["connect_timeout"] = written
    settings = parse_dynamic_resources(_ads_bootstrap(xds_cluster))
    assert settings is not None and settings.ads is not None
    assert settings.ads.target.target == "127.0.0.1:18000"
    assert settings.ads.target.connect_timeout == seconds
    # ... and the channel's connect deadline is set from it (gRPC core's minimum connect
    # timeout is the option min_reconnect_backoff_ms).
    made: dict[str, Any] = {}

    def insecure_channel(target: str, options: Any) -> object:
        made.update(target=target, options=dict(options))
        return object()

    monkeypatch.setattr(grpc, "insecure_channel", insecure_channel)
    _make_channel(settings.ads.target)
    assert made["target"] == "127.0.0.1:18000"
    assert made["options"]["grpc.min_reconnect_backoff_ms"] == int(seconds * 1000)


def _zero(field: FieldDescriptor) -> Any:
    """proto3's value of an unset scalar field, as proto JSON writes it."""
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[0].name
    if field.type == FieldDescriptor.TYPE_BOOL:
        return False
    if field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
        return ""
    if field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return 0.0
    return 0


def _mapped_or_errors(kind: str, doc: dict[str, Any]) -> str:
    try:
        return _mapped(kind, doc)
    except ConfigError as e:
        return f"refused: {e}"


@pytest.mark.parametrize("place", DEFAULT_PLACES, ids=lambda p: p.message.rsplit(".", 1)[-1])
def test_an_unset_scalar_reads_as_proto3s_zero_value(place: Place) -> None:
    # The loader hands the core canonical JSON, which leaves out every scalar equal to
    # its zero value: the core's reading of an absent bool, number, string or enum must
    # be that zero value (cluster `type` STATIC, `lb_policy` ROUND_ROBIN,
    # `dns_lookup_family` AUTO, …), or an explicit `false` would differ from none.
    base = _base()
    if place.prepare is not None:
        place.prepare(base)
    base = _canonical(base)
    unset = _mapped_or_errors("bootstrap", base)
    wrong = []
    for field in fields_of(place.message):
        if field.is_repeated or field.type == FieldDescriptor.TYPE_MESSAGE:
            continue
        if field.containing_oneof is not None:
            continue  # a oneof member has presence: set to its zero value, it is chosen
        if field.name in _at(base, place.path):
            continue  # the probe document sets it already (a required field)
        if probe(place, field) != "supported":
            continue
        written = copy.deepcopy(base)
        _at(written, place.path)[field.name] = _zero(field)
        explicit = _mapped_or_errors("bootstrap", written)
        if explicit != unset:
            wrong.append(f"{field.name} = {_zero(field)!r}:\n{_diff(unset, explicit)}")
    assert not wrong, f"{place.message}: unset is not the zero value\n" + "\n".join(wrong)
