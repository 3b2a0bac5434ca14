"""Real upstream servers for the end-to-end and differential tests.

- :class:`HttpUpstream`: HTTP/1.1 (h11, one thread per connection): keep-alive and
  close, content-length and chunked bodies both ways, streamed bodies of any size.
  By default it answers with a JSON echo of the request it received.
- :class:`H2cUpstream`: HTTP/2 with prior knowledge (and HTTP/1.1) via hypercorn,
  same echo and controls.
- :class:`GrpcUpstream`: grpcio server with generic handlers and raw-bytes
  serializers: a unary and a server-streaming method, custom trailing metadata.
- :class:`TcpEchoUpstream`: echoes bytes; on the client's half-close it finishes
  writing, then shuts down its own side.

Request headers that steer the HTTP upstreams (all optional):

``x-test-status``            response status (default 200)
``x-test-response-size``     send that many bytes of :func:`pattern` instead of the echo
``x-test-response-chunked``  ``1``: no content-length, the body goes out chunked
``x-test-close``             ``1``: answer with ``connection: close`` and close
``x-test-token``             a token: body bytes received and sent for the request
                             are counted in :meth:`progress`
``x-test-hold``              ``1``: wait for :meth:`release` of the token before
                             reading the request body
``x-test-hold-response``     ``1``: wait for :meth:`release` of the token before
                             sending the response body

``connections_total`` counts the connections an upstream accepted (h2c: that carried
a request), ``open_connections`` those still open on its side (for pooling tests).

Every response carries ``x-upstream: <name>`` so a test knows which upstream served,
and ``server: <name>-server`` (Envoy overwrites ``server`` by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import h11

from support.wait import until

CHUNK = 64 * 1024
_BLOCK = bytes(range(256)) * (CHUNK // 256)
HOLD_TIMEOUT_S = 60.0


def established_connections(port: int) -> int:
    """ESTABLISHED TCP sockets whose local port is ``port`` (``/proc/net/tcp{,6}``):
    the accepted, server-side ends of connections to a server listening on it."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)  # the header line
                for line in f:
                    fields = line.split()
                    local, state = fields[1], fields[3]
                    if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                        n += 1
        except FileNotFoundError:
            continue
    return n


def pattern(size: int) -> Iterator[bytes]:
    """A deterministic body of ``size`` bytes, as 64 KiB chunks."""
    left = size
    while left > 0:
        n = min(left, CHUNK)
        yield _BLOCK[:n]
        left -= n


def pattern_sha256(size: int) -> str:
    h = hashlib.sha256()
    for chunk in pattern(size):
        h.update(chunk)
    return h.hexdigest()


@dataclass
class ReceivedRequest:
    """What an upstream saw of one request."""

    upstream: str
    method: str
    path: str
    http_version: str
    headers: list[tuple[str, str]]
    body_length: int
    body_sha256: str
    connection_id: int
    request_on_connection: int
    trailers: list[tuple[str, str]] = field(default_factory=list)
    # The connection's source address as the upstream saw it (HttpUpstream only).
    peer_ip: str = ""

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "upstream": self.upstream,
            "method": self.method,
            "path": self.path,
            "http_version": self.http_version,
            "headers": [list(h) for h in self.headers],
            "body_length": self.body_length,
            "body_sha256": self.body_sha256,
            "connection_id": self.connection_id,
            "request_on_connection": self.request_on_connection,
            "trailers": [list(t) for t in self.trailers],
            "peer_ip": self.peer_ip,
        }


def _peer_ip(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return ""


# Connection ids start here so that they keep their width for the whole session: the
# echo's size (and a logged byte count) must not change when an id gains a digit
# between the Envoy and the envoyx run of a differential scenario.
CONNECTION_ID_BASE = 1_000_000


class _Gates:
    """Hold points keyed by a token (x-test-hold) and byte counters for them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}
        self._progress: dict[str, int] = {}
        self._reached: dict[str, threading.Event] = {}

    def _event(self, table: dict[str, threading.Event], token: str) -> threading.Event:
        with self._lock:
            return table.setdefault(token, threading.Event())

    def wait(self, token: str) -> None:
        self._event(self._reached, token).set()
        if not self._event(self._events, token).wait(HOLD_TIMEOUT_S):
            raise TimeoutError(f"hold {token!r} never released")

    def reached(self, token: str) -> bool:
        return self._event(self._reached, token).is_set()

    def release(self, token: str) -> None:
        self._event(self._events, token).set()

    def add(self, token: str | None, n: int) -> None:
        if token is None:
            return
        with self._lock:
            self._progress[token] = self._progress.get(token, 0) + n

    def progress(self, token: str) -> int:
        with self._lock:
            return self._progress.get(token, 0)


@dataclass
class _Controls:
    status: int = 200
    response_size: int | None = None
    chunked: bool = False
    close: bool = False
    token: str | None = None
    hold: bool = False
    hold_response: bool = False
    # ``x-test-response-header: name: value`` (repeatable): headers to answer with.
    response_headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, headers: list[tuple[str, str]]) -> _Controls:
        h = dict(headers)
        size = h.get("x-test-response-size")
        return cls(
            status=int(h.get("x-test-status", "200")),
            response_size=int(size) if size is not None else None,
            chunked=h.get("x-test-response-chunked") == "1",
            close=h.get("x-test-close") == "1",
            token=h.get("x-test-token"),
            hold=h.get("x-test-hold") == "1",
            hold_response=h.get("x-test-hold-response") == "1",
            response_headers=tuple(
                (name.strip(), value.strip())
                for k, v in headers
                if k == "x-test-response-header"
                for name, _, value in [v.partition(":")]
            ),
        )


class _UpstreamBase:
    def __init__(self, name: str) -> None:
        self.name = name
        self.host = "127.0.0.1"
        self.port = 0
        self.requests: list[ReceivedRequest] = []
        self.connections_total = 0
        self._lock = threading.Lock()
        self._gates = _Gates()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def release(self, token: str) -> None:
        self._gates.release(token)

    def holding(self, token: str) -> bool:
        """True once a request carrying this hold token reached its hold point."""
        return self._gates.reached(token)

    def progress(self, token: str) -> int:
        """Body bytes received or sent so far by the request(s) with this hold token."""
        return self._gates.progress(token)

    def _record(self, req: ReceivedRequest) -> None:
        with self._lock:
            self.requests.append(req)

    @property
    def open_connections(self) -> int:
        """Connections to this upstream still open on its side: sockets on its port
        that the kernel holds as ESTABLISHED (a peer's FIN takes a socket out of that
        state). :class:`HttpUpstream` answers from its own view instead."""
        return established_connections(self.port)

    def _next_connection_id(self) -> int:
        with self._lock:
            self.connections_total += 1
            return CONNECTION_ID_BASE + self.connections_total

    def _echo_body(self, req: ReceivedRequest) -> bytes:
        return json.dumps(req.to_json(), sort_keys=True).encode()

    def __enter__(self) -> _UpstreamBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class HttpUpstream(_UpstreamBase):
    """HTTP/1.1 upstream on h11, one thread per connection."""

    def __init__(self, name: str, host: str = "127.0.0.1") -> None:
        super().__init__(name)
        self.host = host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self._sock.listen(512)
        self.port = int(self._sock.getsockname()[1])
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept_loop, name=f"http-{name}", daemon=True)

    def start(self) -> HttpUpstream:
        self._thread.start()
        return self

    @property
    def open_connections(self) -> int:
        """Connections this server is still serving: it has not yet read their end."""
        with self._lock:
            return len(self._conns)

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        conn_id = self._next_connection_id()
        sock.settimeout(120)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
        n = 0
        try:
            while True:
                event = self._next_event(sock, conn)
                if isinstance(event, h11.ConnectionClosed) or event is None:
                    return
                if not isinstance(event, h11.Request):
                    return
                n += 1
                if not self._handle(sock, conn, event, conn_id, n):
                    return
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (OSError, h11.ProtocolError, TimeoutError):
            return
        finally:
            with self._lock:
                self._conns.discard(sock)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    @staticmethod
    def _next_event(sock: socket.socket, conn: h11.Connection) -> Any:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = sock.recv(CHUNK)
                conn.receive_data(data)
                continue
            if event is h11.PAUSED:
                return None
            return event

    def _handle(
        self,
        sock: socket.socket,
        conn: h11.Connection,
        request: h11.Request,
        conn_id: int,
        n: int,
    ) -> bool:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers]
        ctl = _Controls.parse(headers)
        if ctl.hold and ctl.token:
            self._gates.wait(ctl.token)
        digest = hashlib.sha256()
        length = 0
        trailers: list[tuple[str, str]] = []
        while True:
            event = self._next_event(sock, conn)
            if isinstance(event, h11.Data):
                digest.update(event.data)
                length += len(event.data)
                self._gates.add(ctl.token, len(event.data))
            elif isinstance(event, h11.EndOfMessage):
                trailers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
                break
            else:
                return False
        req = ReceivedRequest(
            upstream=self.name,
            method=request.method.decode(),
            path=request.target.decode("latin-1"),
            http_version=request.http_version.decode(),
            headers=headers,
            body_length=length,
            body_sha256=digest.hexdigest(),
            connection_id=conn_id,
            request_on_connection=n,
            trailers=trailers,
            peer_ip=_peer_ip(sock),
        )
        self._record(req)

        resp_headers = [("x-upstream", self.name), ("server", f"{self.name}-server")]
        resp_headers.extend(ctl.response_headers)
        if ctl.close:
            resp_headers.append(("connection", "close"))
        if ctl.response_size is not None:
            body: Iterator[bytes] = pattern(ctl.response_size)
            resp_headers.append(("content-type", "application/octet-stream"))
            if not ctl.chunked:
                resp_headers.append(("content-length", str(ctl.response_size)))
        else:
            echo = self._echo_body(req)
            body = iter([echo])
            resp_headers.append(("content-type", "application/json"))
            if not ctl.chunked:
                resp_headers.append(("content-length", str(len(echo))))
        if ctl.chunked and request.http_version == b"1.1":
            resp_headers.append(("transfer-encoding", "chunked"))
        sock.sendall(conn.send(h11.Response(status_code=ctl.status, headers=resp_headers)))
        if ctl.hold_response and ctl.token:
            self._gates.wait(ctl.token)
        if request.method != b"HEAD":
            for chunk in body:
                sock.sendall(conn.send(h11.Data(data=chunk)))
                self._gates.add(ctl.token, len(chunk))
        sock.sendall(conn.send(h11.EndOfMessage()))
        return True


class H2cUpstream(_UpstreamBase):
    """HTTP/2 prior-knowledge (h2c) and HTTP/1.1 upstream: hypercorn on its own loop."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(512)
        self._sock.setblocking(False)
        self.port = int(self._sock.getsockname()[1])
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown: asyncio.Event | None = None
        self._started = threading.Event()
        self._conn_ids: dict[Any, int] = {}
        self._thread = threading.Thread(target=self._run, name=f"h2c-{name}", daemon=True)

    def start(self) -> H2cUpstream:
        self._thread.start()
        until(self._started.is_set, timeout=10, what="hypercorn loop")
        until(self._answers, timeout=10, what=f"h2c upstream {self.name} to answer")
        # The readiness probe is not one of the connections a test counts.
        with self._lock:
            self.connections_total = 0
            self._conn_ids.clear()
            self.requests.clear()
        return self

    def _answers(self) -> bool:
        with socket.create_connection(self.address, timeout=2) as s:
            s.sendall(b"GET /ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 ")

    def stop(self) -> None:
        if self._loop is not None and self._shutdown is not None:
            self._loop.call_soon_threadsafe(self._shutdown.set)
        self._thread.join(10)
        self._sock.close()

    def _run(self) -> None:
        from hypercorn.asyncio import serve
        from hypercorn.config import Config, Sockets

        sock = self._sock

        class _BoundConfig(Config):
            def create_sockets(self) -> Sockets:
                return Sockets([], [sock], [])

        config = _BoundConfig()
        config.keep_alive_timeout = 300
        config.accesslog = None
        config.errorlog = None
        config.h2_max_inbound_frame_size = 1 << 20
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._shutdown = asyncio.Event()
        self._started.set()
        try:
            loop.run_until_complete(
                serve(self._app, config, shutdown_trigger=self._shutdown.wait)  # type: ignore[arg-type]
            )
        finally:
            loop.close()

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        ctl = _Controls.parse(headers)
        if ctl.hold and ctl.token:
            await asyncio.get_running_loop().run_in_executor(None, self._gates.wait, ctl.token)
        digest = hashlib.sha256()
        length = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            digest.update(chunk)
            length += len(chunk)
            self._gates.add(ctl.token, len(chunk))
            if not msg.get("more_body", False):
                break
        client = scope.get("client")
        key = (scope["http_version"], tuple(client) if client else None)
        with self._lock:
            if key not in self._conn_ids:
                self._conn_ids[key] = CONNECTION_ID_BASE + len(self._conn_ids) + 1
                self.connections_total += 1
            conn_id = self._conn_ids[key]
        path = scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            path += "?" + scope["query_string"].decode("latin-1")
        req = ReceivedRequest(
            upstream=self.name,
            method=scope["method"],
            path=path,
            http_version=scope["http_version"],
            headers=headers,
            body_length=length,
            body_sha256=digest.hexdigest(),
            connection_id=conn_id,
            request_on_connection=0,
        )
        self._record(req)
        resp_headers = [(b"x-upstream", self.name.encode()), (b"server", b"h2c-server")]
        if ctl.response_size is not None:
            chunks: Iterator[bytes] = pattern(ctl.response_size)
            resp_headers.append((b"content-type", b"application/octet-stream"))
            if not ctl.chunked:
                resp_headers.append((b"content-length", str(ctl.response_size).encode()))
        else:
            echo = self._echo_body(req)
            chunks = iter([echo])
            resp_headers.append((b"content-type", b"application/json"))
            if not ctl.chunked:
                resp_headers.append((b"content-length", str(len(echo)).encode()))
        await send({"type": "http.response.start", "status": ctl.status, "headers": resp_headers})
        if ctl.hold_response and ctl.token:
            await asyncio.get_running_loop().run_in_executor(None, self._gates.wait, ctl.token)
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            self._gates.add(ctl.token, len(chunk))
        await send({"type": "http.response.body", "body": b"", "more_body": False})


GRPC_SERVICE = "envoyx.test.Echo"
UNARY_METHOD = f"/{GRPC_SERVICE}/Unary"
STREAM_METHOD = f"/{GRPC_SERVICE}/Stream"


class GrpcUpstream(_UpstreamBase):
    """grpcio server, no codegen: methods take and return raw bytes.

    ``Unary``: replies ``b"echo:" + request``; initial metadata ``x-upstream``,
    trailing metadata ``x-trailer: unary`` and ``x-trailer-bin`` (binary).
    With request metadata ``x-test-grpc-code: <int>`` it fails with that code and
    details ``"requested failure"`` (trailers still sent).
    ``Stream``: the request is an ASCII count N; replies ``msg-0`` … ``msg-(N-1)``,
    trailing metadata ``x-trailer: stream``.
    """

    TRAILER_BIN = b"\x00\x01\xfe\xff"

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary),
            "Stream": grpc.unary_stream_rpc_method_handler(self._stream),
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(GRPC_SERVICE, handlers),)
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    def start(self) -> GrpcUpstream:
        self._server.start()
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=10)
        return self

    def stop(self) -> None:
        self._server.stop(grace=None).wait(5)

    def _unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        md = dict(context.invocation_metadata())
        context.send_initial_metadata((("x-upstream", self.name),))
        context.set_trailing_metadata((("x-trailer", "unary"), ("x-trailer-bin", self.TRAILER_BIN)))
        code = md.get("x-test-grpc-code")
        if code is not None:
            status = next(c for c in grpc.StatusCode if c.value[0] == int(str(code)))
            context.abort(status, "requested failure")
        return b"echo:" + request

    def _stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        context.send_initial_metadata((("x-upstream", self.name),))
        context.set_trailing_metadata((("x-trailer", "stream"),))
        for i in range(int(request.decode())):
            yield f"msg-{i}".encode()


class TcpEchoUpstream(_UpstreamBase):
    """Echo server: writes back what it reads; on EOF finishes and half-closes."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(256)
        self.port = int(self._sock.getsockname()[1])
        self.bytes_echoed = 0
        self.eofs_seen = 0
        self._thread = threading.Thread(target=self._accept_loop, name=f"tcp-{name}", daemon=True)

    def start(self) -> TcpEchoUpstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._next_connection_id()
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(120)
        try:
            while True:
                data = conn.recv(CHUNK)
                if not data:
                    with self._lock:
                        self.eofs_seen += 1
                    conn.shutdown(socket.SHUT_WR)
                    break
                conn.sendall(data)
                with self._lock:
                    self.bytes_echoed += len(data)
            # Drain until the peer closes too, so the close is orderly.
            while conn.recv(CHUNK):
                pass
        except OSError:
            pass
        finally:
            conn.close()
