"""The differential-test machinery: one :class:`Scenario` (a bootstrap and requests)
run through the real Envoy 1.40 and through envoyx, each response reduced to facts,
envoyx's facts compared with Envoy's.

- ``build(ctx)`` returns an Envoy v3 bootstrap (a plain dict, fed unchanged to both);
- ``requests`` are sent in order on one client connection (HTTP/1.1 or h2c), or as
  raw bytes on fresh sockets, gRPC calls, or TCP bytes (tcp_proxy);
- every response is reduced to *facts* (status, local-reply body, which upstream
  served, the headers that matter, what the upstream received); ``expect`` pins the
  facts Envoy gives (checked on both proxies), and envoyx's facts must equal Envoy's;
- ``stats`` are named stat deltas, checked on both;
- ``access_log`` compares the access-log lines (Envoy's default format) with the
  varying fields masked;
- ``sequence`` reduces the whole run (e.g. the round-robin pattern);
- ``not_compared`` names facts left out of the comparison, each with its reason.

A table of scenarios becomes tests with::

    @pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
    @pytest.mark.parametrize("target", targets_from_env("ENVOYX_DIFF_TARGETS"))
    def test_scenario(target, scenario, envoy_binary, environment, tmp_path):
        run_differential(target, scenario, envoy_binary, environment, tmp_path)

(the ``environment`` fixture, the shared upstreams, is in conftest.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from support.clients import RawResponse, _Reader, raw_exchange, read_response
from support.envoy import EnvoyProcess, targets_from_env
from support.proxy import EnvoyxProcess, ProxyProcess
from support.upstreams import (
    UNARY_METHOD,
    GrpcUpstream,
    H2cUpstream,
    HttpUpstream,
    TcpEchoUpstream,
    pattern,
)
from support.wait import RefusedPort, free_port

Facts = dict[str, Any]
Json = dict[str, Any]


# ---------------------------------------------------------------------------------
# The table's vocabulary
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ctx:
    """What a bootstrap builder may refer to. Listener and admin ports differ between
    the Envoy and the envoyx run; every fact has them replaced by ``{port}``."""

    port: int
    admin_port: int
    upstreams: dict[str, tuple[str, int]]
    refused: tuple[str, int]
    access_log: str

    def up(self, name: str) -> tuple[str, int]:
        return self.upstreams[name]


@dataclass(frozen=True)
class Http:
    """An HTTP request through the proxy.

    ``body``: bytes, or an int for that many bytes of :func:`pattern`; ``chunked``
    sends it without content-length (HTTP/1.1 chunked); ``http2`` uses h2c with prior
    knowledge. ``observe`` adds facts to the defaults (see :func:`http_facts`).
    """

    path: str = "/"
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | int | None = None
    chunked: bool = False
    http2: bool = False
    observe: tuple[str, ...] = ()
    expect: Facts = field(default_factory=dict)
    # An HTTP/2 stream reset is the answer (the fact ``reset``: its error code)
    # rather than a failure of the test.
    may_reset: bool = False


@dataclass(frozen=True)
class Raw:
    """Raw bytes on a fresh connection; one response is read. ``observe`` adds
    ``up.*`` facts (what the upstream received) for a proxied response."""

    data: bytes
    expect: Facts = field(default_factory=dict)
    observe: tuple[str, ...] = ()


@dataclass(frozen=True)
class Grpc:
    """A gRPC call through the proxy with a grpcio client (raw-bytes messages)."""

    method: str  # UNARY_METHOD or STREAM_METHOD
    payload: bytes
    metadata: tuple[tuple[str, str], ...] = ()
    expect: Facts = field(default_factory=dict)


@dataclass(frozen=True)
class Tcp:
    """Bytes on a fresh TCP connection: sent while reading, then a half-close; the
    connection is read to EOF (or reset)."""

    payload: bytes
    expect: Facts = field(default_factory=dict)


@dataclass(frozen=True)
class RawSeq:
    """Raw bytes on a fresh connection (pipelined requests, interim ``100
    Continue`` responses): ``data`` is sent at once, ``responses`` responses are
    read off the one connection (interim ones included), then the client
    half-closes and reads to EOF. ``observe`` adds facts of each response
    (``header:N``, and ``up.*`` from the echo upstream, see :func:`http_facts`)."""

    data: bytes
    responses: int = 1
    observe: tuple[str, ...] = ()
    expect: Facts = field(default_factory=dict)


@dataclass(frozen=True)
class Upgrade:
    """An upgrade or CONNECT on a fresh raw HTTP/1.1 connection: ``head`` is sent
    and the response head read. When the proxy switched (101, or 2xx to a CONNECT),
    ``then`` is sent (followed by a half-close when ``half_close``) and everything
    that comes back until the connection ends is a fact (``tunnel.received``);
    otherwise the response body is read."""

    head: bytes
    # Several parts: each but the last waits for an answer before the next goes.
    then: bytes | tuple[bytes, ...] = b""
    half_close: bool = False
    expect: Facts = field(default_factory=dict)


@dataclass(frozen=True)
class H2Upgrade:
    """A CONNECT over h2c with prior knowledge (the ``h2`` package): with
    ``protocol``, an RFC 8441 extended CONNECT to ``path``; without, a plain
    CONNECT to ``authority``. On a 2xx, ``then`` is sent as DATA (then END_STREAM
    when ``half_close``) and the DATA that comes back until the stream ends is a
    fact; otherwise the response body is. The server's
    SETTINGS_ENABLE_CONNECT_PROTOCOL is a fact too."""

    authority: str
    protocol: str | None = None
    path: str = "/"
    headers: tuple[tuple[str, str], ...] = ()
    # Several parts: each but the first goes once DATA came back for the previous.
    then: bytes | tuple[bytes, ...] = b""
    half_close: bool = False
    expect: Facts = field(default_factory=dict)


@dataclass(frozen=True)
class RawHead:
    """Raw bytes on a fresh connection; one response is read with its head as it
    came on the wire. Facts: ``status``, ``reason`` (the phrase as written),
    ``names`` (the response's header names as spelled, sorted: the case is the
    fact, not the order); and when the body is the head an upstream received (a
    JSON ``{"head": ...}``, as a recording upstream answers), ``up.request_line``
    and ``up.names`` (the names the upstream received, as spelled, sorted)."""

    data: bytes
    expect: Facts = field(default_factory=dict)


@dataclass(frozen=True)
class H2Settings:
    """An h2c connection with prior knowledge that sends nothing but its preface and
    a PING: facts are what the server put in force before answering it — each setting
    (``h2.setting:NAME``, RFC 9113's initial value where not announced: announcing a
    setting's default and leaving it out are the same) and the connection window it
    opened (``h2.connection_window``: 65535 plus its WINDOW_UPDATEs on stream 0)."""

    expect: Facts = field(default_factory=dict)


Request = Http | Raw | Grpc | Tcp | RawSeq | Upgrade | H2Upgrade | RawHead | H2Settings


@dataclass(frozen=True)
class Scenario:
    name: str
    build: Callable[[Ctx], Json]
    requests: tuple[Request, ...]
    stats: dict[str, int] = field(default_factory=dict)
    access_log: bool = False
    sequence: Callable[[list[Facts]], Any] | None = None
    expect_sequence: Any = None
    # Facts left out of the Envoy/envoyx comparison, each with the reason. Where
    # envoyx differs from Envoy on purpose, the difference is listed here and says why.
    not_compared: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------
# Observing
# ---------------------------------------------------------------------------------

DEFAULT_HTTP_FACTS = ("status", "upstream", "header:server", "header:content-type", "has:date")
ECHO = "application/json"
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _body_content(req: Http) -> bytes | Iterator[bytes] | None:
    if req.body is None:
        return None
    data = b"".join(pattern(req.body)) if isinstance(req.body, int) else req.body
    if req.chunked:
        return iter([data[i : i + 65536] for i in range(0, len(data), 65536)] or [b""])
    return data


def http_facts(req: Http, resp: httpx.Response) -> Facts:
    """Facts of one response. Defaults: status, upstream (x-upstream), server,
    content-type, date presence; for a reply the proxy made itself (no x-upstream)
    also body and content-length. ``observe`` names more:

    ``header:N`` value or None · ``header_all:N`` every value in order · ``has:N``
    presence · ``uuid:N`` whether the value is a UUID (``up.uuid:N`` upstream side) ·
    ``body.sha256`` (length, sha256) · ``protocol`` downstream HTTP version
    · ``up.header:N`` / ``up.has:N`` what the upstream received · ``up.header_all:N``
    every value it received, in order · ``up.headers`` sorted header names the upstream
    received · ``up.body`` (length, sha256) · ``up.protocol`` · ``up.method`` · ``up.path`` ·
    ``up.connection`` upstream connection id (for reuse patterns, see :func:`relabel`) ·
    ``up.peer_ip`` the source address of the upstream connection (HttpUpstream).
    """
    facts: Facts = {}
    upstream = resp.headers.get("x-upstream")
    echo: Json | None = None
    if upstream is not None and resp.headers.get("content-type") == ECHO:
        echo = json.loads(resp.content)
    for name in (*DEFAULT_HTTP_FACTS, *req.observe):
        facts[name] = _fact(name, resp, echo)
    if upstream is None:
        facts["body"] = resp.content.decode("utf-8", "replace")
        facts["header:content-length"] = resp.headers.get("content-length")
    return facts


def _fact(name: str, resp: Any, echo: Json | None) -> Any:
    kind, _, arg = name.partition(":")
    if kind == "status":
        return resp.status_code
    if kind == "upstream":
        return resp.headers.get("x-upstream")
    if kind == "header":
        return resp.headers.get(arg)
    if kind == "has":
        return arg in resp.headers
    if kind == "header_all":
        return resp.headers.get_list(arg)
    if kind == "uuid":
        return bool(UUID_RE.match(resp.headers.get(arg) or ""))
    if kind == "body.sha256":
        return (len(resp.content), hashlib.sha256(resp.content).hexdigest())
    if kind == "protocol":
        return resp.http_version
    if kind.startswith("up."):
        if echo is None:
            return "<no echo>"
        headers = {k: v for k, v in echo["headers"]}
        sub = kind[3:]
        if sub == "header":
            return headers.get(arg)
        if sub == "has":
            return arg in headers
        if sub == "header_all":
            return [v for k, v in echo["headers"] if k == arg]
        if sub == "uuid":
            return bool(UUID_RE.match(headers.get(arg) or ""))
        if sub == "headers":
            return sorted(headers)
        if sub == "body":
            return (echo["body_length"], echo["body_sha256"])
        if sub == "protocol":
            return echo["http_version"]
        if sub == "method":
            return echo["method"]
        if sub == "path":
            return echo["path"]
        if sub == "connection":
            return f"{echo['upstream']}#{echo['connection_id']}"
        if sub == "peer_ip":
            return echo.get("peer_ip")
    raise ValueError(f"unknown fact {name!r}")


def raw_facts(address: tuple[str, int], req: Raw) -> Facts:
    try:
        resp = raw_exchange(address, req.data)
    except ConnectionError:
        return {"status": None, "closed": True, "answered": False}
    facts: Facts = {
        "status": resp.status,
        "reason": resp.reason,
        "upstream": resp.header("x-upstream"),
        "header:content-type": resp.header("content-type"),
        "header:connection": resp.header("connection"),
        "header:server": resp.header("server"),
        "closed": resp.closed,
        "answered": True,
    }
    if facts["upstream"] is None:  # a reply the proxy made itself
        facts["body"] = resp.body.decode("utf-8", "replace")
        facts["header:content-length"] = resp.header("content-length")
    if req.observe:
        echo = json.loads(resp.body) if resp.header("content-type") == ECHO else None
        for name in req.observe:
            if not name.startswith("up."):
                raise ValueError(f"a raw request observes only up.* facts, not {name!r}")
            facts[name] = _fact(name, None, echo)
    return facts


def raw_seq_facts(address: tuple[str, int], req: RawSeq) -> Facts:
    """``responses``: per response (status, x-upstream, the proxy's own body or
    None, then the observed facts); ``eof``: whether the connection ended after
    them (the proxy closed it) without further bytes; ``answered``: how many."""
    responses: list[tuple[Any, ...]] = []
    eof = False
    with socket.create_connection(address, timeout=10) as sock:
        reader = _Reader(sock)
        try:
            sock.sendall(req.data)
            while len(responses) < req.responses:
                resp = read_response(reader)
                upstream = resp.header("x-upstream")
                echo = None
                if upstream is not None and resp.header("content-type") == ECHO:
                    echo = json.loads(resp.body)
                own = None if upstream is not None else resp.body.decode("utf-8", "replace")
                observed = tuple(_raw_fact(name, resp, echo) for name in req.observe)
                responses.append((resp.status, upstream, own, *observed))
        except (ConnectionError, OSError):
            pass
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        try:
            rest = reader.read_to_eof()
            eof = not rest
        except OSError:
            eof = True
    return {"responses": responses, "answered": len(responses), "eof_after": eof}


def _raw_fact(name: str, resp: RawResponse, echo: Json | None) -> Any:
    kind, _, arg = name.partition(":")
    if kind == "header":
        return resp.header(arg)
    if kind == "has":
        return resp.header(arg) is not None
    return _fact(name, None, echo)  # type: ignore[arg-type]


def raw_head_facts(address: tuple[str, int], req: RawHead) -> Facts:
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(req.data)
        reader = _RawReader(sock)
        try:
            head = reader.read_until(b"\r\n\r\n").decode("latin-1")
        except ConnectionError:
            return {"status": None, "answered": False}
        lines = head.split("\r\n")
        _, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        names = [line.partition(":")[0] for line in lines[1:]]
        lengths = [line.partition(":")[2].strip() for line in lines[1:] if ":" in line]
        length = next(
            (int(v) for n, v in zip(names, lengths, strict=False) if n.lower() == "content-length"),
            0,
        )
        body = reader.read_exact(length)
    facts: Facts = {"status": int(code), "reason": reason, "names": sorted(names)}
    try:
        received = json.loads(body)["head"]
    except (ValueError, KeyError, TypeError):
        return facts
    up_lines = received.split("\r\n")
    facts["up.request_line"] = up_lines[0]
    facts["up.names"] = sorted(line.partition(":")[0] for line in up_lines[1:])
    return facts


def grpc_facts(address: tuple[str, int], req: Grpc) -> Facts:
    target = f"{address[0]}:{address[1]}"
    with grpc.insecure_channel(target) as channel:
        if req.method == UNARY_METHOD:
            call = channel.unary_unary(req.method)
            try:
                reply, state = call.with_call(req.payload, metadata=req.metadata, timeout=10)
                messages = [reply]
                code, details = state.code(), state.details()
                initial, trailing = state.initial_metadata(), state.trailing_metadata()
            except grpc.RpcError as err:
                messages = []
                code, details = err.code(), err.details()
                initial = err.initial_metadata()
                trailing = err.trailing_metadata()
        else:
            stream = channel.unary_stream(req.method)(
                req.payload, metadata=req.metadata, timeout=10
            )
            messages = list(stream)
            code, details = stream.code(), stream.details()
            initial, trailing = stream.initial_metadata(), stream.trailing_metadata()
    keep = ("x-upstream", "x-trailer", "x-trailer-bin")
    return {
        "grpc.code": code.name,
        "grpc.details": details,
        "grpc.messages": messages,
        "grpc.initial": sorted((k, v) for k, v in initial if k in keep),
        "grpc.trailing": sorted((k, v) for k, v in trailing if k in keep),
    }


def tcp_facts(address: tuple[str, int], req: Tcp) -> Facts:
    received = bytearray()
    reset = False
    with socket.create_connection(address, timeout=30) as sock:

        def read() -> None:
            nonlocal reset
            try:
                while data := sock.recv(1 << 16):
                    received.extend(data)
            except ConnectionResetError:
                reset = True

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            sock.sendall(req.payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            reset = True
        reader.join(30)
        assert not reader.is_alive(), "no EOF from the proxy after the client's half-close"
    return {
        "tcp.received": (len(received), hashlib.sha256(received).hexdigest()),
        "tcp.echo_exact": bytes(received) == req.payload,
        "tcp.reset": reset,
    }


UPGRADE_HEADERS = (
    "upgrade",
    "connection",
    "server",
    "content-type",
    "content-length",
    "transfer-encoding",
    "sec-websocket-accept",
    "x-upstream",
)


def upgrade_facts(address: tuple[str, int], req: Upgrade) -> Facts:
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(req.head)
        reader = _RawReader(sock)
        try:
            head = reader.read_until(b"\r\n\r\n")
        except ConnectionError:
            return {"status": None, "answered": False}
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers.setdefault(k.strip().lower(), v.strip())
        facts: Facts = {"status": status, "reason": lines[0].split(" ", 2)[2]}
        for name in UPGRADE_HEADERS:
            facts[f"header:{name}"] = headers.get(name)
        facts["has:date"] = "date" in headers
        switched = status == 101 or (req.head.startswith(b"CONNECT ") and 200 <= status < 300)
        if switched:
            parts = req.then if isinstance(req.then, tuple) else (req.then,)
            for i, part in enumerate(parts):
                sock.sendall(part)
                if i + 1 < len(parts) and not reader.buf:
                    reader.fill()
            if req.half_close:
                sock.shutdown(socket.SHUT_WR)
            facts["tunnel.received"] = reader.read_to_eof()
        else:
            length = int(headers.get("content-length", "0"))
            facts["body"] = reader.read_exact(length).decode("utf-8", "replace")
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            facts["closed_after"] = reader.read_to_eof() == b"" and reader.eof
    return facts


class _RawReader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.eof = False

    def fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_until(self, sep: bytes) -> bytes:
        while sep not in self.buf:
            if not self.fill():
                raise ConnectionError(f"closed before {sep!r}")
        head, _, self.buf = self.buf.partition(sep)
        return head

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n and self.fill():
            pass
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_to_eof(self) -> bytes:
        while self.fill():
            pass
        out, self.buf = self.buf, b""
        return out


def h2_upgrade_facts(address: tuple[str, int], req: H2Upgrade) -> Facts:
    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions
    import h2.settings

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    facts: Facts = {}
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(conn.data_to_send())
        headers = [(":method", "CONNECT"), (":authority", req.authority)]
        if req.protocol is not None:
            headers += [(":protocol", req.protocol), (":scheme", "http"), (":path", req.path)]
        headers += list(req.headers)
        stream = 1
        sent = False
        switched = False
        received = bytearray()
        queue = list(req.then) if isinstance(req.then, tuple) else [req.then]
        response: dict[str, str] = {}
        ended = False
        while not ended:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                data = b""
            if not data:
                facts["h2.closed"] = True
                break
            try:
                events = conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                facts["h2.closed"] = True
                break
            for event in events:
                # The request goes after the server's SETTINGS: an extended CONNECT
                # needs its permission.
                if isinstance(event, h2.events.RemoteSettingsChanged) and not sent:
                    facts["h2.enable_connect_protocol"] = conn.remote_settings.get(
                        h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL, 0
                    )
                    try:
                        conn.send_headers(stream, headers)
                    except Exception as exc:  # the h2 package refuses :protocol without the setting
                        facts["h2.refused_locally"] = type(exc).__name__
                        ended = True
                        break
                    sent = True
                elif isinstance(event, h2.events.ResponseReceived):
                    response = {k.decode(): v.decode() for k, v in event.headers}
                    status = int(response[":status"])
                    facts["status"] = status
                    for name in UPGRADE_HEADERS:
                        facts[f"header:{name}"] = response.get(name)
                    switched = 200 <= status < 300
                    if switched:
                        conn.send_data(stream, queue.pop(0))
                        if req.half_close and not queue:
                            conn.end_stream(stream)
                elif isinstance(event, h2.events.DataReceived):
                    received.extend(event.data)
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                    if switched and queue:
                        conn.send_data(stream, queue.pop(0))
                        if req.half_close and not queue:
                            conn.end_stream(stream)
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
                elif isinstance(event, h2.events.StreamReset):
                    facts["h2.reset"] = int(event.error_code)
                    ended = True
            sock.sendall(conn.data_to_send())
    key = "tunnel.received" if switched else "body"
    facts[key] = bytes(received) if switched else received.decode("utf-8", "replace")
    return facts


def h2_settings_facts(address: tuple[str, int], req: H2Settings) -> Facts:
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.ping(b"defaults")
    # RFC 9113 §6.5.2's initial values (None: unlimited).
    facts: Facts = {
        "h2.setting:HEADER_TABLE_SIZE": 4096,
        "h2.setting:ENABLE_PUSH": 1,
        "h2.setting:MAX_CONCURRENT_STREAMS": None,
        "h2.setting:INITIAL_WINDOW_SIZE": 65535,
        "h2.setting:MAX_FRAME_SIZE": 16384,
        "h2.setting:MAX_HEADER_LIST_SIZE": None,
        "h2.setting:ENABLE_CONNECT_PROTOCOL": 0,
    }
    window = 65535
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(conn.data_to_send())
        answered = False
        while not answered:
            data = sock.recv(65536)
            if not data:
                facts["h2.closed"] = True
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    for code, changed in event.changed_settings.items():
                        facts[f"h2.setting:{getattr(code, 'name', code)}"] = changed.new_value
                elif isinstance(event, h2.events.WindowUpdated) and event.stream_id == 0:
                    window += event.delta
                elif isinstance(event, h2.events.PingAckReceived):
                    answered = True
            sock.sendall(conn.data_to_send())
    facts["h2.connection_window"] = window
    return facts


def relabel(values: list[Any]) -> str:
    """Name values by first appearance: [b, c, a, b, c, a] -> 'ABCABC'. Compares
    round-robin order and connection reuse without depending on the start point."""
    names: dict[Any, str] = {}
    return "".join(names.setdefault(v, chr(ord("A") + len(names))) for v in values)


def upstream_pattern(facts: list[Facts]) -> str:
    return relabel([f["upstream"] for f in facts])


def connection_pattern(facts: list[Facts]) -> str:
    return relabel([f["up.connection"] for f in facts])


ACCESS_LOG_RE = re.compile(
    r'^\[(?P<start>[^\]]+)\] "(?P<method>\S+) (?P<path>\S+) (?P<proto>\S+)" '
    r"(?P<code>\d+) (?P<flags>\S+) (?P<rx>\d+) (?P<tx>\d+) (?P<duration>\d+) "
    r'(?P<ust>\S+) "(?P<xff>[^"]*)" "(?P<ua>[^"]*)" "(?P<rid>[^"]*)" '
    r'"(?P<authority>[^"]*)" "(?P<host>[^"]*)"$'
)
START_TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def mask_access_log(line: str) -> str:
    """Envoy's default format with start time, duration, upstream service time and a
    generated request id masked (their format is still checked)."""
    m = ACCESS_LOG_RE.match(line)
    if m is None:
        return f"<not Envoy's default format: {line!r}>"
    f = m.groupdict()
    start = "T" if START_TIME_RE.match(f["start"]) else f"<bad time {f['start']}>"
    ust = "-" if f["ust"] == "-" else ("N" if f["ust"].isdigit() else f["ust"])
    rid = "<uuid>" if UUID_RE.match(f["rid"]) else f["rid"]
    return (
        f'[{start}] "{f["method"]} {f["path"]} {f["proto"]}" {f["code"]} {f["flags"]} '
        f'{f["rx"]} {f["tx"]} D {ust} "{f["xff"]}" "{f["ua"]}" "{rid}" '
        f'"{f["authority"]}" "{f["host"]}"'
    )


# ---------------------------------------------------------------------------------
# Running one scenario through one proxy
# ---------------------------------------------------------------------------------


@dataclass
class Result:
    facts: list[Facts]
    stats: dict[str, int]
    access_log: list[str]
    sequence: Any


def _normalize(value: Any, ports: dict[str, str]) -> Any:
    if isinstance(value, str):
        for real, placeholder in ports.items():
            value = re.sub(rf"(?<=[:_]){real}(?!\d)", placeholder, value)
        return value
    if isinstance(value, list):
        return [_normalize(v, ports) for v in value]
    if isinstance(value, tuple):
        return tuple(_normalize(v, ports) for v in value)
    if isinstance(value, dict):
        return {k: _normalize(v, ports) for k, v in value.items()}
    return value


_RUNS = itertools.count()


def run_scenario(
    scenario: Scenario,
    make_proxy: Callable[[Json, Path], ProxyProcess],
    env: Environment,
    workdir: Path,
) -> Result:
    access_log = workdir / f"{scenario.name}.{next(_RUNS)}.access.log"
    ctx = Ctx(
        port=free_port(),
        admin_port=free_port(),
        upstreams=env.addresses,
        refused=env.refused,
        access_log=str(access_log),
    )
    listener_stat = f"127.0.0.1_{ctx.port}"
    stat_names = {k.replace("{listener}", listener_stat): k for k in scenario.stats}
    proxy = make_proxy(scenario.build(ctx), workdir)
    proxy.start()
    try:
        address = ("127.0.0.1", ctx.port)
        before = proxy.stats()
        facts = _send_all(scenario, address)
        expected = {real: scenario.stats[tmpl] for real, tmpl in stat_names.items()}
        seen = proxy.wait_stats(expected, before)
        stats = {stat_names[k]: v for k, v in seen.items()}
        rc = proxy.stop()
        assert rc == 0, f"{proxy.kind} exited with {rc} on SIGTERM; log:\n{proxy.log_text()}"
    finally:
        if proxy.running:
            proxy.stop()
    lines: list[str] = []
    if scenario.access_log:
        # Read after the clean exit: Envoy flushes access logs every 10 s
        # (--file-flush-interval-msec) and when it exits.
        lines = access_log.read_text().splitlines() if access_log.exists() else []
    ports = {str(ctx.port): "{port}", str(ctx.admin_port): "{admin_port}"}
    facts = _normalize(facts, ports)
    lines = [_normalize(mask_access_log(line), ports) for line in lines]
    seq = scenario.sequence(facts) if scenario.sequence is not None else None
    return Result(facts=facts, stats=stats, access_log=lines, sequence=seq)


def _send_all(scenario: Scenario, address: tuple[str, int]) -> list[Facts]:
    base = f"http://{address[0]}:{address[1]}"
    timeout = httpx.Timeout(30.0)
    out: list[Facts] = []
    with (
        httpx.Client(base_url=base, timeout=timeout) as h1,
        httpx.Client(base_url=base, timeout=timeout, http1=False, http2=True) as h2,
    ):
        for req in scenario.requests:
            if isinstance(req, Raw):
                out.append(raw_facts(address, req))
            elif isinstance(req, RawSeq):
                out.append(raw_seq_facts(address, req))
            elif isinstance(req, Grpc):
                out.append(grpc_facts(address, req))
            elif isinstance(req, Tcp):
                out.append(tcp_facts(address, req))
            elif isinstance(req, Upgrade):
                out.append(upgrade_facts(address, req))
            elif isinstance(req, H2Upgrade):
                out.append(h2_upgrade_facts(address, req))
            elif isinstance(req, RawHead):
                out.append(raw_head_facts(address, req))
            elif isinstance(req, H2Settings):
                out.append(h2_settings_facts(address, req))
            else:
                client = h2 if req.http2 else h1
                try:
                    resp = client.request(
                        req.method, req.path, headers=list(req.headers), content=_body_content(req)
                    )
                except httpx.RemoteProtocolError as err:
                    reset = re.search(r"StreamReset stream_id:\d+, error_code:(\d+)", str(err))
                    if not (req.may_reset and reset):
                        raise
                    out.append({"reset": int(reset.group(1))})
                    continue
                out.append(http_facts(req, resp))
    return out


class Environment:
    """The upstreams shared by every scenario of the session."""

    def __init__(
        self,
        http: dict[str, HttpUpstream],
        h2: H2cUpstream,
        grpc_up: GrpcUpstream,
        echo: TcpEchoUpstream,
        refused: RefusedPort,
    ) -> None:
        self.addresses = {name: up.address for name, up in http.items()}
        self.addresses["h2"] = h2.address
        self.addresses["grpc"] = grpc_up.address
        self.addresses["echo"] = echo.address
        self.refused = (refused.host, refused.port)


_ENVOY_RESULTS: dict[str, Result] = {}


def _envoy_result(
    scenario: Scenario, envoy_binary: Path, env: Environment, workdir: Path
) -> Result:
    if scenario.name not in _ENVOY_RESULTS:

        def make(bs: Json, wd: Path) -> ProxyProcess:
            return EnvoyProcess(envoy_binary, bs, wd / "envoy", concurrency=1)

        _ENVOY_RESULTS[scenario.name] = run_scenario(scenario, make, env, workdir)
    return _ENVOY_RESULTS[scenario.name]


def check_expectations(scenario: Scenario, result: Result, who: str) -> None:
    problems = []
    for i, (req, facts) in enumerate(zip(scenario.requests, result.facts, strict=True)):
        for key, want in req.expect.items():
            got = facts.get(key, "<not observed>")
            if got != want:
                problems.append(
                    f"request {i} ({_describe(req)}): {key} = {got!r}, expected {want!r}"
                )
    for name, want in scenario.stats.items():
        got = result.stats.get(name)
        if got != want:
            problems.append(f"stat {name}: delta {got}, expected {want}")
    if scenario.access_log and len(result.access_log) != len(scenario.requests):
        problems.append(
            f"{len(result.access_log)} access log lines for {len(scenario.requests)} requests"
        )
    if scenario.expect_sequence is not None and result.sequence != scenario.expect_sequence:
        problems.append(f"sequence {result.sequence!r}, expected {scenario.expect_sequence!r}")
    assert not problems, f"{who} on scenario {scenario.name}:\n  " + "\n  ".join(problems)


def _describe(req: Request) -> str:
    if isinstance(req, Http):
        return f"{req.method} {req.path}" + (" h2" if req.http2 else "")
    if isinstance(req, Raw):
        return f"raw {req.data[:30]!r}"
    if isinstance(req, RawSeq):
        return f"raw {req.data[:30]!r}"
    if isinstance(req, Tcp):
        return f"tcp {len(req.payload)} bytes"
    if isinstance(req, Upgrade):
        return f"upgrade {req.head[:40]!r}"
    if isinstance(req, H2Upgrade):
        return f"h2 CONNECT {req.protocol or req.authority}"
    if isinstance(req, RawHead):
        return f"raw {req.data[:30]!r}"
    if isinstance(req, H2Settings):
        return "h2 SETTINGS"
    return f"grpc {req.method}"


# Facts that name things of one run (upstream connection ids count per session); they
# are compared only through a scenario's ``sequence``.
RUN_SPECIFIC = ("up.connection",)


def _drop(facts: Facts, keys: tuple[str, ...]) -> Facts:
    return {k: v for k, v in facts.items() if k not in keys and k not in RUN_SPECIFIC}


def differential_tests(
    scenarios: list[Scenario], ids: Iterable[str] | None = None
) -> Callable[..., None]:
    """The test of a table of scenarios, to assign to a ``test_`` name of a module:
    each scenario runs as ``[envoy-NAME]`` (the table against Envoy alone) and
    ``[envoyx-NAME]`` (envoyx beside Envoy's result); ``ENVOYX_DIFF_TARGETS`` picks."""
    names = list(ids) if ids is not None else [s.name for s in scenarios]

    @pytest.mark.parametrize("scenario", scenarios, ids=names)
    @pytest.mark.parametrize("target", targets_from_env("ENVOYX_DIFF_TARGETS"))
    def test_scenario(
        target: str,
        scenario: Scenario,
        envoy_binary: Path,
        environment: Environment,
        tmp_path: Path,
    ) -> None:
        run_differential(target, scenario, envoy_binary, environment, tmp_path)

    return test_scenario


def run_differential(
    target: str,
    scenario: Scenario,
    envoy_binary: Path,
    environment: Environment,
    tmp_path: Path,
) -> None:
    """One half of a scenario's test: ``target`` "envoy" checks the table against
    Envoy alone; "envoyx" runs envoyx too and compares it with Envoy's result."""
    envoy = _envoy_result(scenario, envoy_binary, environment, tmp_path)
    if target == "envoy":
        check_expectations(scenario, envoy, "Envoy")
        return

    def make(bs: Json, wd: Path) -> ProxyProcess:
        return EnvoyxProcess(bs, wd / "envoyx", concurrency=1)

    ours = run_scenario(scenario, make, environment, tmp_path)
    skip = tuple(scenario.not_compared)
    diffs = []
    for i, (req, e_facts, x_facts) in enumerate(
        zip(scenario.requests, envoy.facts, ours.facts, strict=True)
    ):
        e, x = _drop(e_facts, skip), _drop(x_facts, skip)
        for key in sorted(set(e) | set(x)):
            if e.get(key) != x.get(key):
                diffs.append(
                    f"request {i} ({_describe(req)}): {key}: "
                    f"envoy={e.get(key)!r} envoyx={x.get(key)!r}"
                )
    for name in scenario.stats:
        if envoy.stats.get(name) != ours.stats.get(name):
            diffs.append(
                f"stat {name}: envoy={envoy.stats.get(name)} envoyx={ours.stats.get(name)}"
            )
    if envoy.sequence != ours.sequence:
        diffs.append(f"sequence: envoy={envoy.sequence!r} envoyx={ours.sequence!r}")
    if envoy.access_log != ours.access_log:
        diffs.append(
            "access log:\n    envoy:  "
            + "\n            ".join(envoy.access_log)
            + "\n    envoyx: "
            + "\n            ".join(ours.access_log)
        )
    assert not diffs, f"envoyx differs from Envoy on {scenario.name}:\n  " + "\n  ".join(diffs)
    check_expectations(scenario, ours, "envoyx")
