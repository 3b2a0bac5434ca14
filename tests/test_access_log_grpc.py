"""gRPC access logs (``envoy.access_loggers.http_grpc`` / ``tcp_grpc``) against a real
access log service: a grpcio server implementing
``envoy.service.accesslog.v3.AccessLogService`` (the ``xds-protos`` stubs) receives
what Envoy 1.40 and envoyx send for the same requests, and the entries are compared
field by field.

Each scenario runs as two tests, as in test_differential.py: ``[envoy-NAME]`` checks
the scenario's expectations against Envoy alone, ``[envoyx-NAME]`` runs envoyx and
compares its entries with Envoy's. Masked before comparing: times (start time,
duration: their presence is compared), ephemeral ports, request and stream ids (their
form is compared). ``NOT_FILLED`` lists the entry fields envoyx leaves empty, each
with its reason (docs/config-support.md, "gRPC access loggers"); they are dropped from
Envoy's entries before the comparison.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2

import envoyx
from support.bootstrap import (
    HCM,
    HCM_TYPE,
    ROUTER_TYPE,
    bootstrap,
    cluster,
    route,
    tcp_listener,
    virtual_host,
)
from support.differential import Ctx, Environment, Http, Json, Tcp, _normalize, _send_all
from support.envoy import EnvoyProcess, targets_from_env
from support.proxy import EnvoyxProcess, ProxyProcess
from support.tls import (
    client_context,
    downstream_tls,
    https_request,
    shared_pki,
    validation_context,
)
from support.wait import free_port, until

pytestmark = pytest.mark.envoy

HTTP_GRPC_TYPE = (
    "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig"
)
TCP_GRPC_TYPE = "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.TcpGrpcAccessLogConfig"
OTEL_TYPE = (
    "type.googleapis.com/envoy.extensions.access_loggers.open_telemetry.v3."
    "OpenTelemetryAccessLogConfig"
)
OTLP_SERVICE = "opentelemetry.proto.collector.logs.v1.LogsService"
STAT = "access_logs.grpc_access_log."

# Entry fields envoyx leaves empty, and why; they are not compared.
NOT_FILLED = {
    # envoyx's record keeps the request's start, duration and the first upstream
    # byte (%RESPONSE_DURATION%), not the other per-byte timestamps.
    "common_properties.time_to_last_rx_byte": "no per-byte timing",
    "common_properties.time_to_first_upstream_tx_byte": "no per-byte timing",
    "common_properties.time_to_last_upstream_tx_byte": "no per-byte timing",
    "common_properties.time_to_last_upstream_rx_byte": "no per-byte timing",
    "common_properties.time_to_first_downstream_tx_byte": "no per-byte timing",
    "common_properties.time_to_last_downstream_tx_byte": "no per-byte timing",
    "common_properties.upstream_local_address": "the pool does not report its socket",
    "common_properties.upstream_request_attempt_count": "the record keeps no try count",
    # Byte counts of headers and of the wire (framing, TLS) per stream: envoyx
    # counts body bytes per stream and wire bytes per connection only.
    "common_properties.downstream_wire_bytes_sent": "no per-stream wire bytes",
    "common_properties.downstream_wire_bytes_received": "no per-stream wire bytes",
    "common_properties.upstream_wire_bytes_sent": "no per-stream wire bytes",
    "common_properties.upstream_wire_bytes_received": "no per-stream wire bytes",
    "request.request_headers_bytes": "no header byte counts",
    "request.upstream_header_bytes_sent": "no header byte counts",
    "request.downstream_header_bytes_received": "no header byte counts",
    "response.response_headers_bytes": "no header byte counts",
    "response.upstream_header_bytes_received": "no header byte counts",
    "response.downstream_header_bytes_sent": "no header byte counts",
}

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
DURATION_RE = re.compile(r"^\d+(\.\d+)?s$")


# ---------------------------------------------------------------------------------
# The access log service
# ---------------------------------------------------------------------------------


@dataclass
class Stream:
    """One StreamAccessLogs call: its messages as proto-JSON dicts."""

    messages: list[Json] = field(default_factory=list)

    @property
    def identifier(self) -> Json | None:
        return self.messages[0].get("identifier") if self.messages else None


class AlsReceiver(als_pb2_grpc.AccessLogServiceServicer):
    """A real ALS: grpcio on a fixed port, so that it can go down and come back."""

    def __init__(self) -> None:
        self.port = free_port()
        self.streams: list[Stream] = []
        # OTLP LogsService/Export requests, as proto-JSON dicts.
        self.exports: list[Json] = []
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None

    def start(self) -> AlsReceiver:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(self, server)
        otlp = grpc.method_handlers_generic_handler(
            OTLP_SERVICE,
            {
                "Export": grpc.unary_unary_rpc_method_handler(
                    self._export,
                    request_deserializer=logs_service_pb2.ExportLogsServiceRequest.FromString,
                    response_serializer=logs_service_pb2.ExportLogsServiceResponse.SerializeToString,
                )
            },
        )
        server.add_generic_rpc_handlers((otlp,))
        server.add_insecure_port(f"127.0.0.1:{self.port}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def reset(self) -> None:
        with self._lock:
            self.streams = []
            self.exports = []

    def _export(self, request: Any, context: Any) -> Any:
        as_json = json_format.MessageToDict(request, preserving_proto_field_name=True)
        with self._lock:
            self.exports.append(as_json)
        return logs_service_pb2.ExportLogsServiceResponse()

    def otel_records(self) -> list[tuple[list[Json], Json]]:
        """Each log record with its resource's attributes. This xds-protos' OTLP is
        older: ``scope_logs`` (field 2) decodes as ``instrumentation_library_logs``
        and ``log_records`` as ``logs``."""
        out = []
        with self._lock:
            exports = list(self.exports)
        for export in exports:
            for rl in export.get("resource_logs", []):
                attrs = rl.get("resource", {}).get("attributes", [])
                for scope in rl.get("instrumentation_library_logs", []):
                    out.extend((attrs, rec) for rec in scope.get("logs", []))
        return out

    def StreamAccessLogs(self, request_iterator: Any, context: Any) -> Any:
        stream = Stream()
        with self._lock:
            self.streams.append(stream)
        for message in request_iterator:
            as_json = json_format.MessageToDict(message, preserving_proto_field_name=True)
            with self._lock:
                stream.messages.append(as_json)
        return als_pb2.StreamAccessLogsResponse()

    def messages(self) -> list[Json]:
        with self._lock:
            return [m for s in self.streams for m in s.messages]

    def entries(self) -> list[Json]:
        out = []
        for m in self.messages():
            logs = m.get("http_logs") or m.get("tcp_logs") or {}
            out.extend(logs.get("log_entry", []))
        return out


@pytest.fixture(scope="module")
def receiver() -> Any:
    r = AlsReceiver().start()
    yield r
    r.stop()


# ---------------------------------------------------------------------------------
# Bootstraps
# ---------------------------------------------------------------------------------

NODE = {
    "id": "node-a",
    "cluster": "mesh-1",
    "metadata": {"team": "edge", "n": 2},
    "locality": {"region": "r1", "zone": "z1"},
}


def grpc_logger(
    *,
    log_name: str = "als-http",
    tcp: bool = False,
    request_headers: tuple[str, ...] = (),
    response_headers: tuple[str, ...] = (),
    buffer_size_bytes: int | None = None,
    flush: str | None = None,
) -> Json:
    common: Json = {
        "log_name": log_name,
        "transport_api_version": "V3",
        "grpc_service": {"envoy_grpc": {"cluster_name": "als"}},
    }
    if buffer_size_bytes is not None:
        common["buffer_size_bytes"] = buffer_size_bytes
    if flush is not None:
        common["buffer_flush_interval"] = flush
    typed: Json = {"@type": TCP_GRPC_TYPE if tcp else HTTP_GRPC_TYPE, "common_config": common}
    if request_headers:
        typed["additional_request_headers_to_log"] = list(request_headers)
    if response_headers:
        typed["additional_response_headers_to_log"] = list(response_headers)
    name = "envoy.access_loggers.tcp_grpc" if tcp else "envoy.access_loggers.http_grpc"
    return {"name": name, "typed_config": typed}


def http_bootstrap(ctx: Ctx, als_port: int, logger: Json, routes: list[Json] | None = None) -> Json:
    routes = routes or [route({"prefix": "/"}, cluster="backend")]
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": "ingress_http",
        "route_config": {
            "name": "local_route",
            "virtual_hosts": [virtual_host("all", ["*"], routes)],
        },
        "http_filters": [
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}
        ],
        "access_log": [logger],
    }
    listener = {
        "name": "ingress",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": ctx.port}},
        "filter_chains": [{"filters": [{"name": HCM, "typed_config": hcm}]}],
    }
    doc = bootstrap(
        admin_port=ctx.admin_port,
        listeners=[listener],
        clusters=[
            cluster("backend", [ctx.up("a")]),
            cluster("empty", []),
            cluster("als", [("127.0.0.1", als_port)], http2=True),
        ],
    )
    doc["node"] = NODE
    return doc


def tcp_bootstrap(ctx: Ctx, als_port: int, logger: Json) -> Json:
    listener = tcp_listener(port=ctx.port, cluster="echo")
    listener["filter_chains"][0]["filters"][0]["typed_config"]["access_log"] = [logger]
    doc = bootstrap(
        admin_port=ctx.admin_port,
        listeners=[listener],
        clusters=[
            cluster("echo", [ctx.up("echo")]),
            cluster("als", [("127.0.0.1", als_port)], http2=True),
        ],
    )
    doc["node"] = NODE
    return doc


# ---------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlsScenario:
    """A bootstrap (given the receiver's port), requests, and how many entries the
    receiver gets for them; ``check`` asserts more of one proxy's run."""

    name: str
    build: Callable[[Ctx, int], Json]
    requests: tuple[Http | Tcp, ...]
    entries: int
    stats: dict[str, int] = field(default_factory=dict)
    # Each message's entry count, compared between the proxies.
    compare_batches: bool = False
    # Entry fields left out of this scenario's comparison, with the reason.
    not_compared: dict[str, str] = field(default_factory=dict)


HEADERS_LOGGED = ("x-custom", ":method", ":authority", "referer", "x-missing", "x-added")

SCENARIOS = [
    AlsScenario(
        "http1_and_http2",
        lambda ctx, als: http_bootstrap(
            ctx,
            als,
            grpc_logger(
                request_headers=HEADERS_LOGGED, response_headers=("content-type", "x-nope")
            ),
        ),
        (
            Http(
                "/one?q=1",
                headers=(("x-custom", "c1"), ("referer", "http://ref/"), ("user-agent", "ua/1")),
            ),
            Http("/two", method="POST", body=b"hello", http2=True, headers=(("x-custom", "c2"),)),
            Http("/three", method="PUT", body=1000),
        ),
        entries=3,
        stats={STAT + "logs_written": 3, STAT + "logs_dropped": 0},
    ),
    AlsScenario(
        "local_replies_and_flags",
        lambda ctx, als: http_bootstrap(
            ctx,
            als,
            grpc_logger(request_headers=(":path",)),
            routes=[
                {"name": "to-empty", "match": {"prefix": "/empty"}, "route": {"cluster": "empty"}},
                {
                    "name": "rewritten",
                    "match": {"prefix": "/old"},
                    "route": {"cluster": "backend", "prefix_rewrite": "/new"},
                },
                route({"prefix": "/direct"}, direct=(418, "teapot")),
            ],
        ),
        (
            Http("/empty/x", expect={"status": 503}),
            Http("/old/path", expect={"status": 200}),
            Http("/direct", expect={"status": 418}),
            Http("/nowhere", expect={"status": 404}),
        ),
        entries=4,
        not_compared={
            # envoyx's access-log record keeps the :path the client sent when a route
            # rewrites it without header mutations (the file log's %REQ(:PATH)% too).
            "request.path": "the record keeps the downstream :path",
            "request.original_path": "the record keeps the downstream :path",
            "request.request_headers": "the record keeps the downstream :path",
        },
    ),
    AlsScenario(
        "added_headers",
        lambda ctx, als: http_bootstrap(
            ctx,
            als,
            grpc_logger(
                request_headers=("x-added", "x-custom"), response_headers=("x-resp-added",)
            ),
            routes=[
                {
                    "match": {"prefix": "/"},
                    "route": {"cluster": "backend"},
                    "request_headers_to_add": [{"header": {"key": "x-added", "value": "yes"}}],
                    "response_headers_to_add": [
                        {"header": {"key": "x-resp-added", "value": "%RESPONSE_CODE%"}}
                    ],
                }
            ],
        ),
        (Http("/a", headers=(("x-custom", "1"),)), Http("/b", http2=True)),
        entries=2,
    ),
    AlsScenario(
        "tcp_proxy",
        lambda ctx, als: tcp_bootstrap(ctx, als, grpc_logger(log_name="als-tcp", tcp=True)),
        (Tcp(b"ping over tcp"), Tcp(b"x" * 3000)),
        entries=2,
        # Envoy counts no TCP entry in logs_written.
        stats={STAT + "logs_written": 0, STAT + "grpc_entries_flushed": 2},
    ),
    AlsScenario(
        # buffer_size_bytes 1: every entry is flushed alone, long before the interval.
        "batching_by_size",
        lambda ctx, als: http_bootstrap(ctx, als, grpc_logger(buffer_size_bytes=1, flush="60s")),
        (Http("/s1"), Http("/s2"), Http("/s3")),
        entries=3,
        stats={STAT + "grpc_entries_flushed": 3},
        compare_batches=True,
    ),
]


# ---------------------------------------------------------------------------------
# Running and comparing
# ---------------------------------------------------------------------------------


@dataclass
class AlsResult:
    facts: list[Json]
    streams: list[Stream]
    entries: list[Json]
    stats: dict[str, int]


def _make(target: str, envoy_binary: Path, bs: Json, wd: Path) -> ProxyProcess:
    if target == "envoy":
        return EnvoyProcess(envoy_binary, bs, wd / "envoy", concurrency=1)
    return EnvoyxProcess(bs, wd / "envoyx", concurrency=1)


def run_als(
    target: str,
    scenario: AlsScenario,
    envoy_binary: Path,
    env: Environment,
    receiver: AlsReceiver,
    workdir: Path,
) -> AlsResult:
    receiver.reset()
    ctx = Ctx(
        port=free_port(),
        admin_port=free_port(),
        upstreams=env.addresses,
        refused=env.refused,
        access_log="",
    )
    proxy = _make(target, envoy_binary, scenario.build(ctx, receiver.port), workdir)
    proxy.start()
    try:
        before = proxy.stats()
        facts = _send_all(scenario, ("127.0.0.1", ctx.port))  # type: ignore[arg-type]
        until(
            lambda: len(receiver.entries()) >= scenario.entries,
            timeout=10,
            what=f"{scenario.entries} entries at the receiver from {target}",
        )
        after = proxy.stats()
        stats = {k: after.get(k, 0) - before.get(k, 0) for k in scenario.stats}
    finally:
        proxy.stop()
    ports = {str(ctx.port): "{port}"}
    with receiver._lock:
        streams = [Stream(list(s.messages)) for s in receiver.streams]
    entries = [_mask(e, ports) for e in receiver.entries()]
    return AlsResult(_normalize(facts, ports), streams, entries, stats)


def _mask(entry: Json, ports: dict[str, str]) -> Json:
    """Drops NOT_FILLED fields, masks times, ephemeral ports and ids."""
    out: Json = {}
    for part, fields in entry.items():
        if not isinstance(fields, dict):
            out[part] = fields
            continue
        kept: Json = {}
        for name, value in fields.items():
            if f"{part}.{name}" in NOT_FILLED:
                continue
            if name == "start_time":
                value = "<time>" if TIME_RE.match(value) else value
            elif name.startswith("time_to") or name == "duration":
                value = "<duration>" if DURATION_RE.match(value) else value
            elif name in ("stream_id", "request_id"):
                value = "<uuid>" if UUID_RE.match(value) else value
            elif name in ("downstream_remote_address", "downstream_direct_remote_address"):
                value = {"socket_address": {**value["socket_address"], "port_value": "<eph>"}}
            elif name == "tls_properties":
                # The session id differs per handshake; envoyx leaves it empty.
                value = {k: v for k, v in value.items() if k != "tls_session_id"}
            elif name == "downstream_local_address":
                port = str(value["socket_address"].get("port_value"))
                value = {
                    "socket_address": {
                        **value["socket_address"],
                        "port_value": ports.get(port, port),
                    }
                }
            kept[name] = value
        out[part] = kept
    return _normalize(out, ports)


_ENVOY: dict[str, AlsResult] = {}


def _envoy(
    scenario: AlsScenario, envoy_binary: Path, env: Environment, receiver: AlsReceiver, wd: Path
) -> AlsResult:
    if scenario.name not in _ENVOY:
        _ENVOY[scenario.name] = run_als("envoy", scenario, envoy_binary, env, receiver, wd)
    return _ENVOY[scenario.name]


def _check(scenario: AlsScenario, result: AlsResult, who: str) -> None:
    problems = []
    for i, (req, facts) in enumerate(zip(scenario.requests, result.facts, strict=True)):
        for key, want in req.expect.items():
            if facts.get(key) != want:
                problems.append(f"request {i}: {key} = {facts.get(key)!r}, expected {want!r}")
    for name, want in scenario.stats.items():
        if result.stats.get(name) != want:
            problems.append(f"stat {name}: delta {result.stats.get(name)}, expected {want}")
    if len(result.entries) != scenario.entries:
        problems.append(f"{len(result.entries)} entries, expected {scenario.entries}")
    # The identifier: in each stream's first message only, with the node and log name.
    for s in result.streams:
        ident = s.identifier
        if ident is None or ident.get("log_name") not in ("als-http", "als-tcp"):
            problems.append(f"a stream's first message has no identifier: {s.messages[:1]}")
            continue
        node = ident["node"]
        for key in ("id", "cluster", "metadata", "locality"):
            want = (
                {k: (float(v) if isinstance(v, int) else v) for k, v in NODE[key].items()}
                if isinstance(NODE[key], dict)
                else NODE[key]
            )
            if node.get(key) != want:
                problems.append(f"identifier node.{key} = {node.get(key)!r}, expected {want!r}")
        if any("identifier" in m for m in s.messages[1:]):
            problems.append("identifier sent after the stream's first message")
    assert not problems, f"{who} on {scenario.name}:\n  " + "\n  ".join(problems)


def _batches(result: AlsResult) -> list[int]:
    return [
        len((m.get("http_logs") or m.get("tcp_logs") or {}).get("log_entry", []))
        for s in result.streams
        for m in s.messages
    ]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
@pytest.mark.parametrize("target", targets_from_env("ENVOYX_DIFF_TARGETS"))
def test_scenario(
    target: str,
    scenario: AlsScenario,
    envoy_binary: Path,
    environment: Environment,
    receiver: AlsReceiver,
    tmp_path: Path,
) -> None:
    envoy = _envoy(scenario, envoy_binary, environment, receiver, tmp_path)
    if target == "envoy":
        _check(scenario, envoy, "Envoy")
        return
    ours = run_als("envoyx", scenario, envoy_binary, environment, receiver, tmp_path)
    diffs = []
    for i, (e, x) in enumerate(zip(envoy.facts, ours.facts, strict=True)):
        if e != x:
            diffs.append(f"request {i}: envoy={e!r} envoyx={x!r}")
    for i, (e, x) in enumerate(zip(envoy.entries, ours.entries, strict=False)):
        for part in sorted(set(e) | set(x)):
            ep, xp = e.get(part, {}), x.get(part, {})
            if not isinstance(ep, dict) or not isinstance(xp, dict):
                if ep != xp:
                    diffs.append(f"entry {i} {part}: envoy={ep!r} envoyx={xp!r}")
                continue
            for name in sorted(set(ep) | set(xp)):
                if f"{part}.{name}" in scenario.not_compared:
                    continue
                if ep.get(name) != xp.get(name):
                    diffs.append(
                        f"entry {i} {part}.{name}: envoy={ep.get(name)!r} envoyx={xp.get(name)!r}"
                    )
    for name in scenario.stats:
        if envoy.stats.get(name) != ours.stats.get(name):
            diffs.append(
                f"stat {name}: envoy={envoy.stats.get(name)} envoyx={ours.stats.get(name)}"
            )
    if scenario.compare_batches and _batches(envoy) != _batches(ours):
        diffs.append(f"batches: envoy={_batches(envoy)} envoyx={_batches(ours)}")
    assert not diffs, f"envoyx differs from Envoy on {scenario.name}:\n  " + "\n  ".join(diffs)
    _check(scenario, ours, "envoyx")


# ---------------------------------------------------------------------------------
# Batching by interval, a receiver that is down, bad configuration
# ---------------------------------------------------------------------------------


def _replace(typed: Json, **fields: Any) -> None:
    """Makes ``typed`` an OpenTelemetry logger's config with ``fields`` set."""
    typed.clear()
    typed.update(otel_logger()["typed_config"], **fields)


def _paths(receiver: AlsReceiver) -> list[str]:
    return [e.get("request", {}).get("path", "") for e in receiver.entries()]


def _start(target: str, envoy_binary: Path, doc: Json, tmp_path: Path) -> ProxyProcess:
    return _make(target, envoy_binary, doc, tmp_path).start()


def _ctx(environment: Environment) -> Ctx:
    return Ctx(
        port=free_port(),
        admin_port=free_port(),
        upstreams=environment.addresses,
        refused=environment.refused,
        access_log="",
    )


@pytest.mark.parametrize("target", targets_from_env("ENVOYX_DIFF_TARGETS"))
def test_entries_wait_for_the_flush_interval(
    target: str,
    envoy_binary: Path,
    environment: Environment,
    receiver: AlsReceiver,
    tmp_path: Path,
) -> None:
    """With a large buffer, entries go out once per buffer_flush_interval: the three
    requests sent right after a flush arrive together, one message, at the next."""
    receiver.reset()
    ctx = _ctx(environment)
    doc = http_bootstrap(ctx, receiver.port, grpc_logger(flush="1s"))
    proxy = _start(target, envoy_binary, doc, tmp_path)
    base = f"http://127.0.0.1:{ctx.port}"
    try:
        with httpx.Client(base_url=base) as client:
            assert client.get("/i0").status_code == 200
            # Its flush marks the interval's phase; the next three follow at once.
            until(lambda: len(receiver.entries()) == 1, timeout=5, what="the first flush")
            sent_at = time.monotonic()
            for i in (1, 2, 3):
                assert client.get(f"/i{i}").status_code == 200
            until(lambda: len(receiver.entries()) == 4, timeout=5, what="the next flush")
            waited = time.monotonic() - sent_at
    finally:
        proxy.stop()
    batches = [len(m["http_logs"]["log_entry"]) for m in receiver.messages() if "http_logs" in m]
    assert batches == [1, 3], batches
    assert _paths(receiver) == ["/i0", "/i1", "/i2", "/i3"]
    # The three waited for the timer (most of the 1 s interval), not sent one by one.
    assert waited > 0.5, waited
    assert len(receiver.streams) == 1
    assert "identifier" in receiver.messages()[0]
    assert "identifier" not in receiver.messages()[1]


@pytest.mark.parametrize("target", targets_from_env("ENVOYX_DIFF_TARGETS"))
def test_a_receiver_that_is_down_loses_entries_never_traffic(
    target: str,
    envoy_binary: Path,
    environment: Environment,
    tmp_path: Path,
) -> None:
    """While the receiver is down every request is served; once it is back, the
    entries of later requests arrive on a new stream with its identifier.

    Envoy sends each batch to a stream that is still connecting and loses it with
    the connection (counted ``grpc_entries_flushed``, nothing dropped). envoyx opens
    the stream first: it keeps up to ``buffer_size_bytes`` of entries for the
    receiver's return (``grpc_entries_flush_failed`` counts the failed attempts) and
    counts what does not fit as ``logs_dropped``."""
    down = AlsReceiver()
    ctx = _ctx(environment)
    doc = http_bootstrap(ctx, down.port, grpc_logger(buffer_size_bytes=600, flush="0.2s"))
    proxy = _start(target, envoy_binary, doc, tmp_path)
    base = f"http://127.0.0.1:{ctx.port}"
    try:
        before = proxy.stats()
        with httpx.Client(base_url=base) as client:
            for i in range(8):
                assert client.get(f"/down{i}").status_code == 200
            time.sleep(0.5)  # flush attempts against the closed port
            down.start()
            time.sleep(0.6)  # a flush interval past the retry: the stream is back
            for i in range(2):
                assert client.get(f"/up{i}").status_code == 200
        until(
            lambda: {"/up0", "/up1"} <= set(_paths(down)),
            timeout=10,
            what="the entries sent after the receiver came back",
        )
        after = proxy.stats()
    finally:
        proxy.stop()
        down.stop()
    delta = {
        k[len(STAT) :]: after.get(k, 0) - before.get(k, 0) for k in after if k.startswith(STAT)
    }
    for s in down.streams:
        assert s.identifier is not None and s.identifier["log_name"] == "als-http"
    if target == "envoy":
        assert delta["logs_written"] == 10, delta
        assert delta["logs_dropped"] == 0, delta
        return
    kept = [p for p in _paths(down) if p.startswith("/down")]
    assert delta["logs_dropped"] > 0, delta
    assert delta["logs_written"] + delta["logs_dropped"] == 10, delta
    assert delta["grpc_entries_flush_failed"] > 0, delta
    # What was kept arrives, in order: the first entries, up to the buffer.
    assert kept and kept == [f"/down{i}" for i in range(len(kept))], kept
    assert len(kept) + 2 == delta["logs_written"], (kept, delta)


BAD: dict[str, tuple[Callable[[Json], None], str]] = {
    "google_grpc": (
        lambda t: t["common_config"].__setitem__(
            "grpc_service", {"google_grpc": {"target_uri": "x:1", "stat_prefix": "s"}}
        ),
        "common_config.grpc_service.google_grpc: not supported by envoyx",
    ),
    "filter_state_objects_to_log": (
        lambda t: t["common_config"].__setitem__("filter_state_objects_to_log", ["k"]),
        "common_config.filter_state_objects_to_log: not supported by envoyx",
    ),
    "response_trailers": (
        lambda t: t.__setitem__("additional_response_trailers_to_log", ["grpc-status"]),
        "typed_config.additional_response_trailers_to_log: not supported by envoyx",
    ),
    "empty_log_name": (
        lambda t: t["common_config"].pop("log_name"),
        "common_config.log_name: value length must be at least 1",
    ),
    # OpenTelemetry: only string values are formatted.
    "otel_kvlist_body": (
        lambda t: _replace(t, body={"kvlist_value": {"values": []}}),
        "typed_config.body.kvlist_value: not supported by envoyx",
    ),
    "otel_stat_prefix": (
        lambda t: _replace(t, stat_prefix="p"),
        "typed_config.stat_prefix: not supported by envoyx",
    ),
    "v2_transport": (
        lambda t: t["common_config"].__setitem__("transport_api_version", "V2"),
        "common_config.transport_api_version: V2 is not supported (only V3)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_grpc_logger_config_names_the_field(case: str, environment: Environment) -> None:
    mutate, message = BAD[case]
    logger = grpc_logger()
    mutate(logger["typed_config"])
    doc = http_bootstrap(_ctx(environment), 1, logger)
    with pytest.raises(envoyx.ConfigError) as info:
        envoyx.Server(doc)
    path = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.access_log[0]"
    assert any(e.startswith(path) and message in e for e in info.value.errors), info.value.errors
    assert len(info.value.errors) == 1, info.value.errors


# ---------------------------------------------------------------------------------
# OpenTelemetry (OTLP LogsService/Export)
# ---------------------------------------------------------------------------------


def otel_logger(*, flush: str = "0.2s", disable_builtin_labels: bool = False) -> Json:
    typed: Json = {
        "@type": OTEL_TYPE,
        "common_config": {
            "log_name": "otel-log",
            "transport_api_version": "V3",
            "grpc_service": {"envoy_grpc": {"cluster_name": "als"}},
            "buffer_flush_interval": flush,
        },
        "body": {"string_value": "%REQ(:METHOD)% %REQ(:PATH)% %PROTOCOL% %RESPONSE_CODE%"},
        "attributes": {
            "values": [
                {"key": "flags", "value": {"string_value": "%RESPONSE_FLAGS%"}},
                {"key": "ua", "value": {"string_value": "%REQ(USER-AGENT)%"}},
                {"key": "custom", "value": {"string_value": "%REQ(X-CUSTOM)%"}},
                {"key": "cluster", "value": {"string_value": "%UPSTREAM_CLUSTER%"}},
            ]
        },
        "resource_attributes": {"values": [{"key": "svc", "value": {"string_value": "edge"}}]},
    }
    if disable_builtin_labels:
        typed["disable_builtin_labels"] = True
    return {"name": "envoy.access_loggers.open_telemetry", "typed_config": typed}


OTEL_REQUESTS = (
    Http("/o1", headers=(("user-agent", "ua/1"), ("x-custom", "c"))),
    Http("/o2", method="POST", body=b"abc", http2=True),
    Http("/empty/o3", expect={"status": 503}),
)


@dataclass(frozen=True)
class _Requests:
    """What ``_send_all`` reads of a scenario: its requests."""

    requests: tuple[Http | Tcp, ...]


def _otel_run(
    target: str,
    envoy_binary: Path,
    environment: Environment,
    receiver: AlsReceiver,
    tmp_path: Path,
    disable_builtin_labels: bool,
) -> tuple[list[tuple[list[Json], Json]], dict[str, int]]:
    receiver.reset()
    ctx = _ctx(environment)
    routes = [
        route({"prefix": "/empty"}, cluster="empty"),
        route({"prefix": "/"}, cluster="backend"),
    ]
    logger = otel_logger(disable_builtin_labels=disable_builtin_labels)
    doc = http_bootstrap(ctx, receiver.port, logger, routes=routes)
    proxy = _start(target, envoy_binary, doc, tmp_path)
    started = time.time_ns()
    try:
        before = proxy.stats()
        facts = _send_all(_Requests(OTEL_REQUESTS), ("127.0.0.1", ctx.port))  # type: ignore[arg-type]
        assert [f["status"] for f in facts] == [200, 200, 503]
        until(lambda: len(receiver.otel_records()) >= 3, timeout=10, what="3 OTLP log records")
        after = proxy.stats()
    finally:
        proxy.stop()
    prefix = "access_logs.open_telemetry_access_log."
    stats = {
        k[len(prefix) :]: after.get(k, 0) - before.get(k, 0)
        for k in (prefix + "logs_written", prefix + "logs_dropped")
    }
    records = receiver.otel_records()
    masked = []
    for attrs, rec in records:
        stamp = int(rec.pop("time_unix_nano"))
        assert started <= stamp <= time.time_ns(), (started, stamp)
        masked.append((attrs, rec))
    return masked, stats


_OTEL_ENVOY: dict[bool, Any] = {}


@pytest.mark.parametrize("builtin", [True, False], ids=["builtin_labels", "no_builtin_labels"])
@pytest.mark.parametrize("target", targets_from_env("ENVOYX_DIFF_TARGETS"))
def test_open_telemetry_records_match_envoys(
    target: str,
    builtin: bool,
    envoy_binary: Path,
    environment: Environment,
    receiver: AlsReceiver,
    tmp_path: Path,
) -> None:
    """``envoy.access_loggers.open_telemetry``: one Export per batch; the resource
    carries Envoy's built-in labels from the node (unless disabled) and
    ``resource_attributes``; each record the start time, the formatted body and
    attributes (``-`` for an operator without a value)."""
    if builtin not in _OTEL_ENVOY:
        _OTEL_ENVOY[builtin] = _otel_run(
            "envoy", envoy_binary, environment, receiver, tmp_path, not builtin
        )
    envoy_records, envoy_stats = _OTEL_ENVOY[builtin]
    labels = [
        {"key": "log_name", "value": {"string_value": "otel-log"}},
        {"key": "zone_name", "value": {"string_value": "z1"}},
        {"key": "cluster_name", "value": {"string_value": "mesh-1"}},
        {"key": "node_name", "value": {"string_value": "node-a"}},
    ]
    resource = (labels if builtin else []) + [{"key": "svc", "value": {"string_value": "edge"}}]
    bodies = ["GET /o1 HTTP/1.1 200", "POST /o2 HTTP/2 200", "GET /empty/o3 HTTP/1.1 503"]
    if target == "envoy":
        assert [a for a, _ in envoy_records] == [resource] * 3
        assert [r["body"]["string_value"] for _, r in envoy_records] == bodies
        assert envoy_stats == {"logs_written": 3, "logs_dropped": 0}
        return
    ours, stats = _otel_run("envoyx", envoy_binary, environment, receiver, tmp_path, not builtin)
    assert ours == envoy_records
    assert stats == envoy_stats


# ---------------------------------------------------------------------------------
# A TLS downstream: tls_properties
# ---------------------------------------------------------------------------------


def _tls_run(
    target: str,
    envoy_binary: Path,
    environment: Environment,
    receiver: AlsReceiver,
    tmp_path: Path,
) -> list[Json]:
    pki = shared_pki()
    receiver.reset()
    ctx = _ctx(environment)
    doc = http_bootstrap(ctx, receiver.port, grpc_logger(flush="0.2s"))
    chain = doc["static_resources"]["listeners"][0]["filter_chains"][0]
    chain["transport_socket"] = downstream_tls(
        [pki.server_rsa],
        validation=validation_context(pki.ca_path),
        require_client_certificate=True,
    )
    proxy = _start(target, envoy_binary, doc, tmp_path)
    try:
        client = client_context(pki, cert=pki.client_web)
        resp, _ = https_request(
            ("127.0.0.1", ctx.port), client, "/tls", server_name="server.example.com"
        )
        assert resp.status == 200
        until(lambda: len(receiver.entries()) >= 1, timeout=10, what="the TLS entry")
    finally:
        proxy.stop()
    return [_mask(e, {str(ctx.port): "{port}"}) for e in receiver.entries()]


_TLS_ENVOY: list[list[Json]] = []


@pytest.mark.parametrize("target", targets_from_env("ENVOYX_DIFF_TARGETS"))
def test_tls_properties_match_envoys(
    target: str,
    envoy_binary: Path,
    environment: Environment,
    receiver: AlsReceiver,
    tmp_path: Path,
) -> None:
    """An mTLS request's entry: TLS version, cipher suite, SNI, the local and the
    peer certificate's subject and URI SANs, as Envoy logs them."""
    if not _TLS_ENVOY:
        _TLS_ENVOY.append(_tls_run("envoy", envoy_binary, environment, receiver, tmp_path))
    envoy = _TLS_ENVOY[0]
    tls = envoy[0]["common_properties"]["tls_properties"]
    if target == "envoy":
        assert tls["tls_version"] == "TLSv1_3", tls
        assert "tls_sni_hostname" not in tls, "Envoy logs the SNI a tls_inspector found"
        assert tls["peer_certificate_properties"]["issuer"] == "CN=root-ca,O=envoyx tests"
        assert tls["peer_certificate_properties"]["subject_alt_name"], tls
        assert envoy[0]["request"]["scheme"] == "https"
        return
    ours = _tls_run("envoyx", envoy_binary, environment, receiver, tmp_path)
    assert ours == envoy
