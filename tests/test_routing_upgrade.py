"""Upgrades (WebSocket over HTTP/1.1 and over HTTP/2 extended CONNECT) and CONNECT,
beside the real Envoy 1.40.

- The differential table: the connection manager's and the route's
  ``upgrade_configs`` in Envoy's precedence, refused upgrades (403), an upstream
  refusing the upgrade, ``http2_protocol_options.allow_connect``, CONNECT with
  ``connect_matcher`` and ``connect_config`` over HTTP/1.1 and HTTP/2. WebSocket
  frames go through a real WebSocket upstream (``support/websocket_upstream.py``);
  CONNECT tunnels reach the TCP echo upstream.
- The echo tests: a real client (the ``websockets`` package over HTTP/1.1; RFC 8441
  driven with the ``h2`` package and websockets' own framing over HTTP/2) sends
  10,000 messages through each proxy and reads them back, then closes cleanly: both
  ends see the close code and reason.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from websockets.asyncio.client import connect
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import OPEN, Protocol, Side

from support.bootstrap import bootstrap, cluster, http_listener, route, virtual_host
from support.differential import (
    Ctx,
    Environment,
    H2Upgrade,
    Http,
    Json,
    Scenario,
    Upgrade,
    run_differential,
)
from support.envoy import EnvoyProcess, targets_from_env
from support.proxy import EnvoyxProcess, ProxyProcess
from support.wait import free_port
from support.websocket_upstream import WebSocketUpstream

pytestmark = pytest.mark.envoy

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455's example for KEY


def ws_frame(payload: bytes, opcode: int = 1) -> bytes:
    """A masked client frame (RFC 6455 §5.2), the mask fixed so that bytes repeat."""
    mask = b"\x11\x22\x33\x44"
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    else:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def close_frame(code: int, reason: bytes) -> bytes:
    return ws_frame(code.to_bytes(2, "big") + reason, opcode=8)


# What the client sends once switched, and what the echo upstream answers: the
# message echoed, then its answer to the close handshake (then it closes).
WS_THEN = (ws_frame(b"hello"), close_frame(1000, b"bye"))
WS_BACK = b"\x81\x05hello" + b"\x88\x05\x03\xe8bye"


def ws_head(path: str = "/ws", upgrade: str = "websocket", connection: str = "Upgrade") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: example.com\r\nUpgrade: {upgrade}\r\n"
        f"Connection: {connection}\r\nSec-WebSocket-Key: {KEY}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


CONNECT_HEAD = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
H2_WS_HEADERS = (("sec-websocket-version", "13"), ("sec-websocket-key", KEY))


def _hcm(listener: Json) -> Json:
    hcm: Json = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def _build(
    ctx: Ctx,
    routes: list[Json],
    *,
    hcm_upgrades: list[Json] | None = None,
    allow_connect: bool = False,
    upstream: str = "ws",
) -> Json:
    listener = http_listener(port=ctx.port, virtual_hosts=[virtual_host("all", ["*"], routes)])
    hcm = _hcm(listener)
    if hcm_upgrades is not None:
        hcm["upgrade_configs"] = hcm_upgrades
    if allow_connect:
        hcm["http2_protocol_options"] = {"allow_connect": True}
    clusters = [
        cluster("ws", [ctx.up(upstream)] if upstream != "refused" else [ctx.refused]),
        cluster("echo", [ctx.up("echo")]),
        cluster("refused", [ctx.refused]),
        cluster("backend", [ctx.up("a")]),
    ]
    return bootstrap(admin_port=ctx.admin_port, listeners=[listener], clusters=clusters)


def ws_route(prefix: str = "/", upgrades: list[Json] | None = None) -> Json:
    r = route({"prefix": prefix}, cluster="ws")
    if upgrades is not None:
        r["route"]["upgrade_configs"] = upgrades
    return r


def connect_route(
    cluster_name: str = "echo", upgrades: list[Json] | None = None, terminate: bool = True
) -> Json:
    r = route({"connect_matcher": {}}, cluster=cluster_name)
    if upgrades is None:
        entry: Json = {"upgrade_type": "CONNECT"}
        if terminate:
            entry["connect_config"] = {}
        upgrades = [entry]
    r["route"]["upgrade_configs"] = upgrades
    return r


WS = [{"upgrade_type": "websocket"}]
SWITCHED = {"status": 101, "header:sec-websocket-accept": ACCEPT, "tunnel.received": WS_BACK}
REFUSED = {"status": 403, "body": "", "header:content-length": "0", "closed_after": True}
UP = "http.ingress_http."


def sc(
    name: str,
    build: Any,
    *requests: Any,
    stats: dict[str, int] | None = None,
    not_compared: dict[str, str] | None = None,
) -> Scenario:
    return Scenario(
        name, build, tuple(requests), stats=stats or {}, not_compared=not_compared or {}
    )


# Envoy answers a refused upgrade on HTTP/2 by closing the connection (GOAWAY) before
# the stream's 403, which the h2 package then refuses to read; envoyx answers the
# stream and keeps the connection. The refusal itself is compared through its stat.
H2_REFUSAL_DIFFERS = {
    "status": "Envoy's GOAWAY comes before its 403 (see H2_REFUSAL_DIFFERS)",
    "h2.closed": "Envoy closes the HTTP/2 connection on a refused upgrade",
    "h2.reset": "envoyx answers the stream instead",
    "header:server": "envoyx's 403 is read, Envoy's is not",
    "header:content-length": "envoyx's 403 is read, Envoy's is not",
    "body": "envoyx's 403 is read, Envoy's is not",
}


SCENARIOS = [
    sc(
        "ws_enabled_by_hcm",
        lambda ctx: _build(ctx, [ws_route()], hcm_upgrades=WS),
        Upgrade(ws_head(), WS_THEN, expect={**SWITCHED, "header:upgrade": "websocket"}),
        stats={
            UP + "downstream_cx_upgrades_total": 1,
            UP + "downstream_rq_1xx": 1,
            UP + "downstream_rq_ws_on_non_ws_route": 0,
        },
    ),
    sc(
        "ws_refused_without_config",
        lambda ctx: _build(ctx, [ws_route()]),
        Upgrade(ws_head(), expect=REFUSED),
        stats={
            UP + "downstream_rq_ws_on_non_ws_route": 1,
            UP + "downstream_rq_4xx": 1,
            UP + "downstream_cx_upgrades_total": 0,
        },
    ),
    sc(
        "ws_route_disables_hcm_upgrade",
        lambda ctx: _build(
            ctx,
            [
                ws_route("/off", [{"upgrade_type": "websocket", "enabled": False}]),
                ws_route("/"),
            ],
            hcm_upgrades=WS,
        ),
        Upgrade(ws_head("/off"), expect=REFUSED),
        Upgrade(ws_head("/on"), WS_THEN, expect=SWITCHED),
        stats={UP + "downstream_rq_ws_on_non_ws_route": 1, UP + "downstream_cx_upgrades_total": 1},
    ),
    sc(
        "ws_route_enables_without_hcm",
        lambda ctx: _build(ctx, [ws_route("/on", WS), ws_route("/")]),
        Upgrade(ws_head("/on"), WS_THEN, expect=SWITCHED),
        Upgrade(ws_head("/off"), expect=REFUSED),
    ),
    sc(
        "ws_route_enables_over_disabled_hcm",
        lambda ctx: _build(
            ctx,
            [ws_route("/on", [{"upgrade_type": "websocket", "enabled": True}]), ws_route("/")],
            hcm_upgrades=[{"upgrade_type": "websocket", "enabled": False}],
        ),
        Upgrade(ws_head("/on"), WS_THEN, expect=SWITCHED),
        Upgrade(ws_head("/off"), expect=REFUSED),
    ),
    sc(
        "ws_types_match_case_insensitively",
        lambda ctx: _build(ctx, [ws_route()], hcm_upgrades=[{"upgrade_type": "WebSocket"}]),
        Upgrade(ws_head(upgrade="WebSocket"), WS_THEN, expect=SWITCHED),
    ),
    sc(
        "ws_other_type_only",
        lambda ctx: _build(ctx, [ws_route("/ws", [{"upgrade_type": "foo"}])]),
        Upgrade(ws_head(), expect=REFUSED),
        stats={UP + "downstream_rq_ws_on_non_ws_route": 1},
    ),
    sc(
        "ws_connection_header_lists_upgrade_among_others",
        lambda ctx: _build(ctx, [ws_route()], hcm_upgrades=WS),
        Upgrade(ws_head(connection="keep-alive, Upgrade"), WS_THEN, expect=SWITCHED),
    ),
    sc(
        "ws_upgrade_header_without_connection_upgrade",
        lambda ctx: _build(ctx, [route({"prefix": "/"}, cluster="backend")]),
        Http(
            "/plain",
            headers=(("upgrade", "websocket"),),
            observe=("up.has:upgrade", "up.has:connection"),
            expect={"status": 200, "up.has:upgrade": False},
        ),
        stats={UP + "downstream_rq_ws_on_non_ws_route": 0},
    ),
    sc(
        "ws_upstream_refuses_the_upgrade",
        lambda ctx: _build(ctx, [ws_route()], hcm_upgrades=WS),
        Upgrade(
            ws_head("/refuse"),
            expect={"status": 403, "body": "refused\n", "header:x-upstream": "ws"},
        ),
        stats={UP + "downstream_cx_upgrades_total": 1, UP + "downstream_rq_4xx": 1},
    ),
    sc(
        "ws_upstream_unreachable",
        lambda ctx: _build(ctx, [ws_route()], hcm_upgrades=WS, upstream="refused"),
        Upgrade(ws_head(), expect={"status": 503}),
        stats={UP + "downstream_rq_5xx": 1},
    ),
    sc(
        "ws_on_direct_response_route",
        lambda ctx: _build(
            ctx, [route({"prefix": "/"}, direct=(200, "direct\n"))], hcm_upgrades=WS
        ),
        Upgrade(ws_head(), expect={"status": 200, "body": "direct\n"}),
    ),
    sc(
        "ws_no_route",
        lambda ctx: _build(ctx, [ws_route("/only")], hcm_upgrades=WS),
        Upgrade(ws_head("/elsewhere"), expect={"status": 404}),
        stats={UP + "downstream_rq_ws_on_non_ws_route": 0, UP + "no_route": 1},
    ),
    sc(
        "ws_h2_extended_connect",
        lambda ctx: _build(ctx, [ws_route()], hcm_upgrades=WS, allow_connect=True),
        H2Upgrade(
            "example.com",
            protocol="websocket",
            path="/ws",
            headers=H2_WS_HEADERS,
            then=WS_THEN,
            expect={"status": 200, "tunnel.received": WS_BACK, "h2.enable_connect_protocol": 1},
        ),
        not_compared={
            "h2.reset": (
                "Envoy's HTTP/1.1 upstream codec has no half-close: when the upstream closes "
                "after the close handshake Envoy resets the stream (CONNECT_ERROR); envoyx "
                "passes the end of stream on (END_STREAM). Every byte arrives either way."
            )
        },
        stats={
            UP + "downstream_cx_upgrades_total": 1,
            UP + "downstream_rq_1xx": 1,
            UP + "downstream_rq_2xx": 0,
        },
    ),
    sc(
        "ws_h2_refused_route",
        lambda ctx: _build(ctx, [ws_route()], allow_connect=True),
        H2Upgrade(
            "example.com",
            protocol="websocket",
            path="/ws",
            headers=H2_WS_HEADERS,
        ),
        stats={UP + "downstream_rq_ws_on_non_ws_route": 1},
        not_compared=H2_REFUSAL_DIFFERS,
    ),
    sc(
        "ws_h2_upstream_refuses",
        lambda ctx: _build(ctx, [ws_route()], hcm_upgrades=WS, allow_connect=True),
        H2Upgrade(
            "example.com",
            protocol="websocket",
            path="/refuse",
            headers=H2_WS_HEADERS,
            expect={"status": 403, "body": "refused\n"},
        ),
    ),
    sc(
        "h2_without_allow_connect_advertises_nothing",
        lambda ctx: _build(ctx, [ws_route()], hcm_upgrades=WS),
        H2Upgrade(
            "example.com",
            protocol="websocket",
            path="/ws",
            headers=H2_WS_HEADERS,
            expect={"h2.enable_connect_protocol": 0},
        ),
        not_compared={
            "h2.closed": (
                "a :protocol the server did not allow: Envoy's codec fails the connection, "
                "the h2 crate (under hyper) resets the stream with PROTOCOL_ERROR"
            ),
            "h2.reset": "see h2.closed",
        },
    ),
    sc(
        "connect_terminated_h1",
        lambda ctx: _build(ctx, [connect_route(), ws_route()]),
        # The echo comes back before the client's FIN, which ends the tunnel (an
        # HTTP/1.1 client's FIN closes the connection, in Envoy as in envoyx).
        Upgrade(
            CONNECT_HEAD,
            (b"ping through the tunnel", b""),
            half_close=True,
            expect={"status": 200, "tunnel.received": b"ping through the tunnel"},
        ),
        stats={UP + "downstream_cx_upgrades_total": 1, UP + "downstream_rq_2xx": 1},
    ),
    sc(
        "connect_terminated_h2",
        lambda ctx: _build(ctx, [connect_route(), ws_route()]),
        H2Upgrade(
            "example.com:443",
            then=b"ping over h2",
            half_close=True,
            expect={"status": 200, "tunnel.received": b"ping over h2"},
        ),
    ),
    sc(
        "connect_allowed_by_hcm_terminated_by_route",
        lambda ctx: _build(
            ctx,
            [connect_route(upgrades=[{"upgrade_type": "CONNECT", "connect_config": {}}])],
            hcm_upgrades=[{"upgrade_type": "CONNECT"}],
        ),
        Upgrade(
            CONNECT_HEAD,
            (b"x" * 1000, b""),
            half_close=True,
            expect={"status": 200, "tunnel.received": b"x" * 1000},
        ),
    ),
    sc(
        "connect_without_connect_matcher",
        lambda ctx: _build(ctx, [ws_route()], hcm_upgrades=[{"upgrade_type": "CONNECT"}]),
        Upgrade(CONNECT_HEAD, expect={"status": 404}),
        stats={UP + "no_route": 1},
    ),
    sc(
        "connect_route_not_upgraded",
        lambda ctx: _build(
            ctx, [connect_route(upgrades=[{"upgrade_type": "websocket"}]), ws_route()]
        ),
        Upgrade(CONNECT_HEAD, expect=REFUSED),
        stats={UP + "downstream_rq_ws_on_non_ws_route": 1},
    ),
    sc(
        "ws_upgrades_counted_per_connection",
        lambda ctx: _build(ctx, [ws_route()], hcm_upgrades=WS),
        Upgrade(ws_head("/one"), WS_THEN, expect=SWITCHED),
        Upgrade(ws_head("/two"), WS_THEN, expect=SWITCHED),
        Upgrade(ws_head("/refuse"), expect={"status": 403}),
        stats={UP + "downstream_cx_upgrades_total": 3, UP + "downstream_rq_1xx": 2},
    ),
    sc(
        "ws_h2_upstream_unreachable",
        lambda ctx: _build(
            ctx, [ws_route()], hcm_upgrades=WS, allow_connect=True, upstream="refused"
        ),
        H2Upgrade(
            "example.com",
            protocol="websocket",
            path="/ws",
            headers=H2_WS_HEADERS,
            expect={"status": 503},
        ),
        stats={UP + "downstream_rq_5xx": 1},
        not_compared={
            "h2.reset": (
                "after its reply to an extended CONNECT Envoy resets the stream with "
                "CONNECT_ERROR, hyper with NO_ERROR (the request side was never ended)"
            )
        },
    ),
    sc(
        "connect_upstream_unreachable",
        lambda ctx: _build(ctx, [connect_route("refused")]),
        Upgrade(CONNECT_HEAD, expect={"status": 503}),
        stats={UP + "downstream_rq_5xx": 1},
    ),
]


@pytest.fixture(scope="module")
def ws_upstream() -> Iterator[WebSocketUpstream]:
    up = WebSocketUpstream("ws").start()
    yield up
    up.stop()


@pytest.fixture
def ws_environment(environment: Environment, ws_upstream: WebSocketUpstream) -> Environment:
    """The shared upstreams plus the WebSocket echo upstream (``ctx.up("ws")``)."""
    environment.addresses["ws"] = ws_upstream.address
    return environment


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
@pytest.mark.parametrize("target", targets_from_env("ENVOYX_DIFF_TARGETS"))
def test_scenario(
    target: str,
    scenario: Scenario,
    envoy_binary: Path,
    ws_environment: Environment,
    tmp_path: Path,
) -> None:
    run_differential(target, scenario, envoy_binary, ws_environment, tmp_path)


def test_table_is_large_enough() -> None:
    names = [s.name for s in SCENARIOS]
    assert len(names) >= 15
    assert len(set(names)) == len(names)


# ---------------------------------------------------------------------------------
# Echo through both proxies: 10,000 messages each way, then a clean close
# ---------------------------------------------------------------------------------

MESSAGES = 10_000
ACTIVE = "http.ingress_http.downstream_cx_upgrades_active"


def _echo_bootstrap(port: int, admin: int, upstream: tuple[str, int]) -> Json:
    listener = http_listener(port=port, virtual_hosts=[virtual_host("all", ["*"], [ws_route()])])
    _hcm(listener)["upgrade_configs"] = WS
    _hcm(listener)["http2_protocol_options"] = {"allow_connect": True}
    return bootstrap(admin_port=admin, listeners=[listener], clusters=[cluster("ws", [upstream])])


@pytest.fixture(params=["envoyx", "envoy"])
def ws_proxy(
    request: pytest.FixtureRequest, ws_upstream: WebSocketUpstream, tmp_path: Path
) -> Iterator[tuple[ProxyProcess, int]]:
    port = free_port()
    bs = _echo_bootstrap(port, free_port(), ws_upstream.address)
    if request.param == "envoy":
        proxy: ProxyProcess = EnvoyProcess(
            request.getfixturevalue("envoy_binary"), bs, tmp_path / "envoy", concurrency=1
        )
    else:
        proxy = EnvoyxProcess(bs, tmp_path / "envoyx", concurrency=1)
    proxy.start()
    try:
        yield proxy, port
    finally:
        proxy.stop()


def _message(i: int) -> str:
    return f"message {i} " + "x" * (i % 97)


def test_websocket_echo_over_http1(
    ws_proxy: tuple[ProxyProcess, int], ws_upstream: WebSocketUpstream
) -> None:
    proxy, port = ws_proxy
    closes_before = len(ws_upstream.closes)

    async def run() -> tuple[int | None, str | None]:
        async with connect(f"ws://127.0.0.1:{port}/echo", compression=None) as ws:
            assert ws.response is not None
            assert ws.response.status_code == 101

            async def send() -> None:
                for i in range(MESSAGES):
                    await ws.send(_message(i))

            sender = asyncio.create_task(send())
            for i in range(MESSAGES):
                assert await ws.recv() == _message(i)
            await sender
            assert proxy.stats().get(ACTIVE) == 1  # for as long as the tunnel is open
            await ws.send(b"\x00\x01binary\xff")
            assert await ws.recv() == b"\x00\x01binary\xff"
            await ws.close(4000, "client bye")
            return ws.close_code, ws.close_reason

    code, reason = asyncio.run(asyncio.wait_for(run(), 120))
    assert (code, reason) == (4000, "client bye")  # the server's answer, through the proxy
    _wait_for(lambda: len(ws_upstream.closes) > closes_before)
    assert ws_upstream.closes[-1] == (4000, "client bye")
    assert proxy.stats().get("http.ingress_http.downstream_cx_upgrades_total") == 1
    _wait_for(lambda: proxy.stats().get(ACTIVE) == 0)


def test_websocket_server_close_reaches_the_client(ws_proxy: tuple[ProxyProcess, int]) -> None:
    _, port = ws_proxy

    async def run() -> tuple[int | None, str | None]:
        async with connect(f"ws://127.0.0.1:{port}/echo", compression=None) as ws:
            await ws.send("close-me")
            await ws.wait_closed()
            return ws.close_code, ws.close_reason

    assert asyncio.run(asyncio.wait_for(run(), 30)) == (4001, "server bye")


def test_websocket_refused_upgrade_through_client(ws_proxy: tuple[ProxyProcess, int]) -> None:
    """The upstream's refusal reaches the websockets client as its 403."""
    from websockets.exceptions import InvalidStatus

    _, port = ws_proxy

    async def run() -> int:
        try:
            async with connect(f"ws://127.0.0.1:{port}/refuse"):
                return 101
        except InvalidStatus as exc:
            assert exc.response.body == b"refused\n"
            return exc.response.status_code

    assert asyncio.run(asyncio.wait_for(run(), 30)) == 403


class _H2WebSocket:
    """RFC 8441 by hand: an h2c connection, an extended CONNECT stream, and
    websockets' own framing (``Protocol``) over the stream's DATA."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self.ws = Protocol(Side.CLIENT, state=OPEN, max_size=None)
        self.stream = 1
        self.status: int | None = None
        self.ended = False
        self.sock.sendall(self.h2.data_to_send())
        self._until(lambda: self.h2.remote_settings.enable_connect_protocol == 1)
        key = base64.b64encode(os.urandom(16)).decode()
        self.h2.send_headers(
            self.stream,
            [
                (":method", "CONNECT"),
                (":protocol", "websocket"),
                (":scheme", "http"),
                (":path", path),
                (":authority", f"127.0.0.1:{port}"),
                ("sec-websocket-version", "13"),
                ("sec-websocket-key", key),
            ],
        )
        self._flush()
        self._until(lambda: self.status is not None)

    def _flush(self) -> None:
        for chunk in self.ws.data_to_send():
            if self.ended:
                break
            if chunk:
                self.h2.send_data(self.stream, chunk)
            else:
                self.h2.end_stream(self.stream)
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def _pump(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("proxy closed the connection")
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                self.status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                self.ws.receive_data(event.data)
            elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                self.ended = True
                self.ws.receive_eof()
        self._flush()

    def _until(self, done: Any) -> None:
        while not done():
            self._pump()

    def frames(self, n: int) -> list[Frame]:
        out: list[Frame] = []
        while len(out) < n:
            out.extend(e for e in self.ws.events_received() if isinstance(e, Frame))
            if len(out) < n:
                self._pump()
        return out


def test_websocket_echo_over_http2(
    ws_proxy: tuple[ProxyProcess, int], ws_upstream: WebSocketUpstream
) -> None:
    _, port = ws_proxy
    closes_before = len(ws_upstream.closes)
    client = _H2WebSocket(port, "/echo")
    try:
        assert client.status == 200
        got: list[str] = []
        batch = 500
        for start in range(0, MESSAGES, batch):
            for i in range(start, start + batch):
                client.ws.send_text(_message(i).encode())
            client._flush()
            got.extend(f.data.decode() for f in client.frames(batch))
        assert got == [_message(i) for i in range(MESSAGES)]
        client.ws.send_close(4002, "h2 bye")
        client._flush()
        frames = client.frames(1)
        assert frames[0].opcode == Opcode.CLOSE
        assert Close.parse(frames[0].data) == Close(4002, "h2 bye")
        client._until(lambda: client.ended)
    finally:
        client.sock.close()
    _wait_for(lambda: len(ws_upstream.closes) > closes_before)
    assert ws_upstream.closes[-1] == (4002, "h2 bye")


def _wait_for(cond: Any, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------
# Configuration mistakes name the field
# ---------------------------------------------------------------------------------


def _validate(doc: Json) -> str:
    import envoyx

    with pytest.raises(envoyx.ConfigError) as info:
        envoyx.Server(doc)
    return str(info.value)


def _doc(route_upgrades: list[Json] | None = None, hcm_upgrades: list[Json] | None = None) -> Json:
    listener = http_listener(
        port=free_port(),
        virtual_hosts=[virtual_host("all", ["*"], [ws_route("/", route_upgrades)])],
    )
    if hcm_upgrades is not None:
        _hcm(listener)["upgrade_configs"] = hcm_upgrades
    return bootstrap(
        admin_port=free_port(), listeners=[listener], clusters=[cluster("ws", [("127.0.0.1", 1)])]
    )


def test_upgrade_filters_other_than_the_router_are_refused() -> None:
    lua = {
        "name": "lua",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        },
    }
    msg = _validate(_doc(hcm_upgrades=[{"upgrade_type": "websocket", "filters": [lua]}]))
    assert "upgrade_configs[0].filters: not supported by envoyx" in msg


def test_connect_config_needs_connect_type() -> None:
    msg = _validate(_doc([{"upgrade_type": "websocket", "connect_config": {}}]))
    assert "Non-CONNECT upgrade type websocket has ConnectConfig" in msg


def test_allow_post_is_refused_by_name() -> None:
    msg = _validate(_doc([{"upgrade_type": "CONNECT", "connect_config": {"allow_post": True}}]))
    assert "connect_config.allow_post: not supported by envoyx" in msg
