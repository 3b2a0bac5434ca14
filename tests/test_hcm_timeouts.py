"""The connection manager's timeouts and per-connection limits, differential against
Envoy 1.40 with the same bootstrap: status, body, the response flag and details in the
access log, and the stats Envoy counts.

- ``request_timeout``, ``stream_idle_timeout``: a client that sends a head announcing a
  body, then stalls; ``stream_idle_timeout`` and ``max_stream_duration`` with an
  upstream that never answers (504 once the request is whole, 408 before);
- the route's ``idle_timeout`` over the connection manager's;
- ``request_headers_timeout``: a client that sends half a head;
- ``common_http_protocol_options``: ``idle_timeout`` (HTTP/1.1 close, HTTP/2 GOAWAY),
  ``max_connection_duration``, ``max_requests_per_connection``,
  ``headers_with_underscores_action`` (each action), ``max_headers_count``.

Every test takes ``start_proxy``: envoyx, then the real Envoy as a second
parametrization, with the same expectations. Clients are raw sockets (HTTP/1.1) and a
raw HTTP/2 client on ``hyperframe``/``hpack`` that answers PINGs and records GOAWAYs,
so that each timer is seen as the peer sees it. Timers are short (≤ 1 s) and
``delayed_close_timeout`` is 0.2 s, so the file runs in seconds.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hpack import Decoder, Encoder
from hyperframe.frame import (
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

import envoyx
from support.bootstrap import (
    bootstrap,
    cluster,
    file_access_log,
    http_listener,
    route,
    virtual_host,
)
from support.proxy import ProxyProcess
from support.upstreams import HttpUpstream
from support.wait import free_port, until

StartProxy = Callable[..., ProxyProcess]
Json = dict[str, Any]

LOG_FORMAT = "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%\n"
PREFIX = "http.ingress_http."
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_STREAM_ID = 2**31 - 1
CLOSE_WAIT_S = 5.0  # "within a few seconds" for a close after a timer
INTERNAL_ERROR = 2


# -- upstreams and proxies ---------------------------------------------------------


class SilentUpstream:
    """Accepts connections, reads what comes, and never answers."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.listener.close()
        for c in self.held:
            c.close()


@pytest.fixture
def silent_upstream() -> Iterator[SilentUpstream]:
    up = SilentUpstream()
    yield up
    up.close()


class Proxy:
    """A proxy with one HTTP listener, its port and its access log."""

    def __init__(self, proc: ProxyProcess, port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    def log_lines(self, n: int) -> list[str]:
        """The first ``n`` access log lines, once written (flushed every 100 ms)."""

        def read() -> list[str] | None:
            lines = self.log.read_text().splitlines() if self.log.exists() else []
            return lines[:n] if len(lines) >= n else None

        lines = until(read, timeout=5.0, what=f"{n} access log line(s)")
        assert lines is not None
        return lines

    def stats_delta(self, expected: dict[str, int], before: dict[str, int]) -> None:
        """Every ``http.ingress_http.<name>`` (or root ``http1.``/``http2.``) stat
        in ``expected`` moved by exactly its value."""
        full = {
            (k if k.startswith("http") and "." in k else PREFIX + k): v for k, v in expected.items()
        }
        seen = self.proc.wait_stats(full, before)
        assert seen == full, f"{self.proc.kind}: stat deltas {seen}, expected {full}"


def start_hcm(
    start: StartProxy,
    tmp_path: Path,
    upstream: tuple[str, int],
    hcm: Json,
    route_action: Json | None = None,
) -> Proxy:
    """One listener with ``hcm`` fields over the defaults and a delayed close of
    0.2 s, routing everything to ``upstream``."""
    port = free_port()
    log = tmp_path / f"access-{port}.log"
    listener = http_listener(
        port=port,
        virtual_hosts=[virtual_host("all", ["*"], [route({"prefix": "/"}, cluster="backend")])],
    )
    config = listener["filter_chains"][0]["filters"][0]["typed_config"]
    config["access_log"] = [file_access_log(str(log), LOG_FORMAT)]
    config["delayed_close_timeout"] = "0.2s"
    config.update(hcm)
    if route_action:
        config["route_config"]["virtual_hosts"][0]["routes"][0]["route"].update(route_action)
    proc = start(
        bootstrap(
            admin_port=free_port(),
            listeners=[listener],
            clusters=[cluster("backend", [upstream])],
        ),
        extra_args=("--file-flush-interval-msec", "100"),
    )
    return Proxy(proc, port, log)


def common(**fields: Any) -> Json:
    return {"common_http_protocol_options": fields}


# -- HTTP/1.1 over raw sockets -------------------------------------------------------


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(CLOSE_WAIT_S)
    return s


def read_until_eof(s: socket.socket) -> bytes:
    """What the proxy sends until it closes (fails if it does not within a few s)."""
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return out
        out += chunk


def read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a content-length body."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, f"closed before a response head: {buf!r}"
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = s.recv(65536)
        assert chunk, "closed mid-body"
        rest += chunk
    return status, headers, rest[:length]


def exchange_then_eof(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Sends ``data``, reads one response, then expects the proxy to close."""
    with connect(port) as s:
        s.sendall(data)
        status, headers, body = read_response(s)
        assert read_until_eof(s) == b""
    return status, headers, body


GET = b"GET / HTTP/1.1\r\nhost: example.com\r\n\r\n"
POST_HEAD = b"POST / HTTP/1.1\r\nhost: example.com\r\ncontent-length: 10\r\n\r\n"
HALF_HEAD = b"GET / HTTP/1.1\r\nhost: example.com\r\n"


# -- HTTP/2 with prior knowledge, frame by frame --------------------------------------


class RawH2:
    """An HTTP/2 client that answers SETTINGS and PINGs and records what it gets."""

    def __init__(self, port: int) -> None:
        self.sock = connect(port)
        self.sock.settimeout(0.1)
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.buf = b""
        self.statuses: dict[int, int] = {}
        self.resets: dict[int, int] = {}
        self.goaways: list[tuple[int, int]] = []
        self.settings: dict[int, int] = {}
        self.connection_window = 65_535
        self.eof = False
        self.sock.sendall(H2_PREFACE + SettingsFrame(0).serialize())

    def request(self, stream_id: int, headers: tuple[tuple[str, str], ...] = ()) -> None:
        pseudo = [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "x")]
        frame = HeadersFrame(stream_id)
        frame.data = self.encoder.encode([*pseudo, *headers])
        frame.flags.add("END_HEADERS")
        frame.flags.add("END_STREAM")
        self.sock.sendall(frame.serialize())

    def pump(self, done: Callable[[RawH2], bool], timeout: float = CLOSE_WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while not done(self):
            assert time.monotonic() < deadline, (
                f"h2: statuses {self.statuses}, resets {self.resets}, "
                f"goaways {self.goaways}, eof {self.eof}"
            )
            if self.eof:
                return
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.eof = True
                continue
            self.buf += chunk
            self._frames()

    def _frames(self) -> None:
        while len(self.buf) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self.buf[:9]))
            if len(self.buf) < 9 + length:
                return
            frame.parse_body(memoryview(self.buf[9 : 9 + length]))
            self.buf = self.buf[9 + length :]
            if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                self.settings.update(frame.settings)
                self.sock.sendall(SettingsFrame(0, flags=["ACK"]).serialize())
            elif isinstance(frame, WindowUpdateFrame) and frame.stream_id == 0:
                self.connection_window += frame.window_increment
            elif isinstance(frame, PingFrame) and "ACK" not in frame.flags:
                self.sock.sendall(PingFrame(0, frame.opaque_data, flags=["ACK"]).serialize())
            elif isinstance(frame, HeadersFrame):
                fields = dict(self.decoder.decode(frame.data))
                if ":status" in fields:
                    self.statuses[frame.stream_id] = int(fields[":status"])
            elif isinstance(frame, RstStreamFrame):
                self.resets[frame.stream_id] = frame.error_code
            elif isinstance(frame, GoAwayFrame):
                self.goaways.append((frame.last_stream_id, frame.error_code))

    def close(self) -> None:
        self.sock.close()


# -- stream timers ---------------------------------------------------------------------


def test_request_timeout_is_408_when_the_body_stalls(
    start_proxy: StartProxy, tmp_path: Path, http_upstream: HttpUpstream
) -> None:
    """A head announcing 10 body bytes, then nothing: 408 ``request timeout`` once
    ``request_timeout`` passes, and the connection closes (the request never ended)."""
    proxy = start_hcm(start_proxy, tmp_path, http_upstream.address, {"request_timeout": "0.5s"})
    before = proxy.proc.stats()
    status, headers, body = exchange_then_eof(proxy.port, POST_HEAD)
    assert (status, body) == (408, b"request timeout")
    assert headers["connection"] == "close"
    assert proxy.log_lines(1) == ["408 - request_overall_timeout"]
    # The client waits for the close: the delayed close runs out.
    proxy.stats_delta(
        {
            "downstream_rq_timeout": 1,
            "downstream_rq_4xx": 1,
            "downstream_cx_delayed_close_timeout": 1,
        },
        before,
    )


def test_stream_idle_timeout_is_408_when_the_client_stalls(
    start_proxy: StartProxy, tmp_path: Path, http_upstream: HttpUpstream
) -> None:
    """The same stalled body under ``stream_idle_timeout``: 408 ``stream timeout`` with
    the ``SI`` flag."""
    proxy = start_hcm(start_proxy, tmp_path, http_upstream.address, {"stream_idle_timeout": "0.5s"})
    before = proxy.proc.stats()
    status, headers, body = exchange_then_eof(proxy.port, POST_HEAD)
    assert (status, body) == (408, b"stream timeout")
    assert headers["connection"] == "close"
    assert proxy.log_lines(1) == ["408 SI stream_idle_timeout"]
    proxy.stats_delta({"downstream_rq_idle_timeout": 1, "downstream_rq_4xx": 1}, before)


def test_stream_idle_timeout_is_504_when_the_upstream_never_answers(
    start_proxy: StartProxy, tmp_path: Path, silent_upstream: SilentUpstream
) -> None:
    """A whole request and an upstream that never answers: 504 ``stream timeout``
    (the request was whole), ``SI``; the connection stays open for the next one."""
    proxy = start_hcm(
        start_proxy, tmp_path, silent_upstream.address, {"stream_idle_timeout": "0.5s"}
    )
    before = proxy.proc.stats()
    with connect(proxy.port) as s:
        for _ in range(2):
            s.sendall(GET)
            status, headers, body = read_response(s)
            assert (status, body) == (504, b"stream timeout")
            assert "connection" not in headers
    assert proxy.log_lines(2) == ["504 SI stream_idle_timeout"] * 2
    proxy.stats_delta({"downstream_rq_idle_timeout": 2, "downstream_rq_5xx": 2}, before)


def test_route_idle_timeout_replaces_the_stream_idle_timeout(
    start_proxy: StartProxy, tmp_path: Path, silent_upstream: SilentUpstream
) -> None:
    """The route's ``idle_timeout`` (0.5 s) wins over the connection manager's (30 s)."""
    proxy = start_hcm(
        start_proxy,
        tmp_path,
        silent_upstream.address,
        {"stream_idle_timeout": "30s"},
        route_action={"idle_timeout": "0.5s"},
    )
    started = time.monotonic()
    with connect(proxy.port) as s:
        s.sendall(GET)
        status, _, body = read_response(s)
    assert (status, body) == (504, b"stream timeout")
    assert time.monotonic() - started < 10
    assert proxy.log_lines(1) == ["504 SI stream_idle_timeout"]


def test_route_idle_timeout_zero_disables_the_stream_idle_timeout(
    start_proxy: StartProxy, tmp_path: Path, silent_upstream: SilentUpstream
) -> None:
    """A route ``idle_timeout`` of 0s turns the 0.3 s stream idle timer off: the
    stream lives until ``max_stream_duration`` (1 s) ends it instead."""
    proxy = start_hcm(
        start_proxy,
        tmp_path,
        silent_upstream.address,
        {"stream_idle_timeout": "0.3s", **common(max_stream_duration="1s")},
        route_action={"idle_timeout": "0s"},
    )
    before = proxy.proc.stats()
    with connect(proxy.port) as s:
        s.sendall(GET)
        status, _, body = read_response(s)
    assert (status, body) == (504, b"downstream duration timeout")
    assert proxy.log_lines(1) == ["504 - max_duration_timeout"]
    proxy.stats_delta(
        {"downstream_rq_max_duration_reached": 1, "downstream_rq_idle_timeout": 0}, before
    )


def test_max_stream_duration_ends_a_stream_the_upstream_never_answers(
    start_proxy: StartProxy, tmp_path: Path, silent_upstream: SilentUpstream
) -> None:
    proxy = start_hcm(
        start_proxy, tmp_path, silent_upstream.address, common(max_stream_duration="0.5s")
    )
    before = proxy.proc.stats()
    with connect(proxy.port) as s:
        s.sendall(GET)
        status, _, body = read_response(s)
    assert (status, body) == (504, b"downstream duration timeout")
    assert proxy.log_lines(1) == ["504 - max_duration_timeout"]
    proxy.stats_delta({"downstream_rq_max_duration_reached": 1, "downstream_rq_5xx": 1}, before)


@pytest.mark.parametrize(
    ("hcm", "stat"),
    [
        ({"stream_idle_timeout": "0.5s"}, "downstream_rq_idle_timeout"),
        (common(max_stream_duration="0.5s"), "downstream_rq_max_duration_reached"),
    ],
    ids=["stream_idle_timeout", "max_stream_duration"],
)
def test_http1_response_that_stalls_mid_body_is_reset(
    start_proxy: StartProxy,
    tmp_path: Path,
    http_upstream: HttpUpstream,
    hcm: Json,
    stat: str,
) -> None:
    """The upstream sends its response head, then stalls its body: once the response
    started, the timer resets the stream, which on HTTP/1.1 closes the connection
    with the body cut short."""
    proxy = start_hcm(start_proxy, tmp_path, http_upstream.address, hcm)
    token = f"stall-{proxy.proc.kind}-{stat}"
    before = proxy.proc.stats()
    try:
        with connect(proxy.port) as s:
            s.sendall(
                b"GET / HTTP/1.1\r\nhost: example.com\r\nx-test-hold-response: 1\r\n"
                b"x-test-response-size: 100\r\nx-test-token: " + token.encode() + b"\r\n\r\n"
            )
            got = read_until_eof(s)
    finally:
        http_upstream.release(token)
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: 100" in head.lower()
    assert body == b""
    proxy.stats_delta({stat: 1}, before)


def test_http2_response_that_stalls_mid_body_is_reset(
    start_proxy: StartProxy, tmp_path: Path, http_upstream: HttpUpstream
) -> None:
    """The same stall on HTTP/2: the stream is reset, the connection stays."""
    proxy = start_hcm(start_proxy, tmp_path, http_upstream.address, {"stream_idle_timeout": "0.5s"})
    token = f"stall-h2-{proxy.proc.kind}"
    before = proxy.proc.stats()
    client = RawH2(proxy.port)
    try:
        client.request(
            1,
            (
                ("x-test-hold-response", "1"),
                ("x-test-response-size", "100"),
                ("x-test-token", token),
            ),
        )
        client.pump(lambda c: 1 in c.resets)
        assert client.statuses == {1: 200} and not client.eof
    finally:
        client.close()
        http_upstream.release(token)
    proxy.stats_delta({"downstream_rq_idle_timeout": 1}, before)


@pytest.mark.parametrize(
    ("hcm", "body", "log", "stat"),
    [
        (
            {"request_headers_timeout": "0.5s"},
            b"request header timeout",
            "408 - request_header_timeout",
            "downstream_rq_header_timeout",
        ),
        (
            {"stream_idle_timeout": "0.5s"},
            b"stream timeout",
            "408 SI stream_idle_timeout",
            "downstream_rq_idle_timeout",
        ),
    ],
    ids=["request_headers_timeout", "stream_idle_timeout"],
)
def test_half_a_head_gets_408_when_its_timer_fires(
    start_proxy: StartProxy,
    tmp_path: Path,
    http_upstream: HttpUpstream,
    hcm: Json,
    body: bytes,
    log: str,
    stat: str,
) -> None:
    """A client sends half a request head and stalls: Envoy's stream exists from the
    first byte, so its timer answers 408 and the connection closes."""
    proxy = start_hcm(start_proxy, tmp_path, http_upstream.address, hcm)
    before = proxy.proc.stats()
    status, headers, got = exchange_then_eof(proxy.port, HALF_HEAD)
    assert (status, got) == (408, body)
    assert headers["connection"] == "close"
    assert proxy.log_lines(1) == [log]
    proxy.stats_delta({stat: 1, "downstream_rq_4xx": 1, "downstream_rq_total": 1}, before)


# -- connection timers and limits ----------------------------------------------------


def test_http1_idle_timeout_closes_idle_connections(
    start_proxy: StartProxy, tmp_path: Path, http_upstream: HttpUpstream
) -> None:
    """``idle_timeout`` 0.3 s: a keep-alive connection after its request is closed
    (after the 0.3 s drain), and so is one that never sent a byte."""
    proxy = start_hcm(
        start_proxy,
        tmp_path,
        http_upstream.address,
        {"drain_timeout": "0.3s", **common(idle_timeout="0.3s")},
    )
    before = proxy.proc.stats()
    with connect(proxy.port) as s:
        s.sendall(GET)
        status, headers, _ = read_response(s)
        assert status == 200 and "connection" not in headers
        assert read_until_eof(s) == b""
    with connect(proxy.port) as s:
        assert read_until_eof(s) == b""
    proxy.stats_delta({"downstream_cx_idle_timeout": 2, "downstream_rq_2xx": 1}, before)


def test_http2_idle_timeout_sends_goaway(
    start_proxy: StartProxy, tmp_path: Path, http_upstream: HttpUpstream
) -> None:
    """On HTTP/2 the idle timer starts the drain: GOAWAY with the highest stream id,
    then the final GOAWAY naming the last stream served, then the close."""
    proxy = start_hcm(
        start_proxy,
        tmp_path,
        http_upstream.address,
        {"drain_timeout": "0.3s", **common(idle_timeout="0.3s")},
    )
    before = proxy.proc.stats()
    client = RawH2(proxy.port)
    try:
        client.request(1)
        client.pump(lambda c: 1 in c.statuses)
        assert client.statuses == {1: 200}
        client.pump(lambda c: c.eof)
    finally:
        client.close()
    assert client.goaways == [(MAX_STREAM_ID, 0), (1, 0)]
    proxy.stats_delta({"downstream_cx_idle_timeout": 1, "downstream_rq_2xx": 1}, before)


def test_http1_max_connection_duration_closes_after_the_next_response(
    start_proxy: StartProxy, tmp_path: Path, http_upstream: HttpUpstream
) -> None:
    """Past ``max_connection_duration`` the connection drains: the next response
    carries ``connection: close`` and the connection ends."""
    proxy = start_hcm(
        start_proxy,
        tmp_path,
        http_upstream.address,
        {"drain_timeout": "2s", **common(max_connection_duration="0.5s")},
    )
    before = proxy.proc.stats()
    with connect(proxy.port) as s:
        s.sendall(GET)
        status, headers, _ = read_response(s)
        assert status == 200 and "connection" not in headers
        time.sleep(0.8)
        s.sendall(GET)
        status, headers, _ = read_response(s)
        assert status == 200 and headers["connection"] == "close"
        assert read_until_eof(s) == b""
    proxy.stats_delta({"downstream_cx_max_duration_reached": 1, "downstream_rq_2xx": 2}, before)


def test_http2_max_connection_duration_sends_goaway(
    start_proxy: StartProxy, tmp_path: Path, http_upstream: HttpUpstream
) -> None:
    proxy = start_hcm(
        start_proxy,
        tmp_path,
        http_upstream.address,
        {"drain_timeout": "0.3s", **common(max_connection_duration="0.5s")},
    )
    before = proxy.proc.stats()
    client = RawH2(proxy.port)
    try:
        client.request(1)
        client.pump(lambda c: c.eof)
    finally:
        client.close()
    assert client.statuses == {1: 200}
    assert client.goaways == [(MAX_STREAM_ID, 0), (1, 0)]
    proxy.stats_delta({"downstream_cx_max_duration_reached": 1}, before)


def test_http1_max_requests_per_connection(
    start_proxy: StartProxy, tmp_path: Path, http_upstream: HttpUpstream
) -> None:
    """``max_requests_per_connection: 2``: the second response closes the connection."""
    proxy = start_hcm(
        start_proxy, tmp_path, http_upstream.address, common(max_requests_per_connection=2)
    )
    before = proxy.proc.stats()
    with connect(proxy.port) as s:
        s.sendall(GET)
        status, headers, _ = read_response(s)
        assert status == 200 and "connection" not in headers
        s.sendall(GET)
        status, headers, _ = read_response(s)
        assert status == 200 and headers["connection"] == "close"
        assert read_until_eof(s) == b""
    # The stream asked for the close itself: no delayed close.
    proxy.stats_delta(
        {
            "downstream_cx_max_requests_reached": 1,
            "downstream_rq_2xx": 2,
            "downstream_cx_delayed_close_timeout": 0,
        },
        before,
    )


def test_http2_max_requests_per_connection_sends_goaway(
    start_proxy: StartProxy, tmp_path: Path, http_upstream: HttpUpstream
) -> None:
    """On HTTP/2 the stream that reaches the limit starts the drain: both streams are
    served, then GOAWAY, then the close."""
    proxy = start_hcm(
        start_proxy,
        tmp_path,
        http_upstream.address,
        {"drain_timeout": "0.3s", **common(max_requests_per_connection=2)},
    )
    before = proxy.proc.stats()
    client = RawH2(proxy.port)
    try:
        client.request(1)
        client.pump(lambda c: 1 in c.statuses)
        client.request(3)
        client.pump(lambda c: c.eof)
    finally:
        client.close()
    assert client.statuses == {1: 200, 3: 200}
    assert client.goaways == [(MAX_STREAM_ID, 0), (3, 0)]
    proxy.stats_delta({"downstream_cx_max_requests_reached": 1, "downstream_rq_2xx": 2}, before)


# -- request head rules ----------------------------------------------------------------


def echoed_headers(body: bytes) -> dict[str, str]:
    return {k: v for k, v in json.loads(body)["headers"]}


@pytest.mark.parametrize("action", ["ALLOW", "DROP_HEADER", "REJECT_REQUEST"])
def test_http1_headers_with_underscores(
    start_proxy: StartProxy, tmp_path: Path, http_upstream: HttpUpstream, action: str
) -> None:
    proxy = start_hcm(
        start_proxy,
        tmp_path,
        http_upstream.address,
        common(headers_with_underscores_action=action),
    )
    before = proxy.proc.stats()
    request = b"GET / HTTP/1.1\r\nhost: example.com\r\nx_under: 1\r\nx-dash: 2\r\n\r\n"
    if action == "REJECT_REQUEST":
        status, _, body = exchange_then_eof(proxy.port, request)
        assert (status, body) == (400, b"Bad Request")
        assert proxy.log_lines(1) == ["400 DPE http1.unexpected_underscore"]
        proxy.stats_delta(
            {
                "http1.requests_rejected_with_underscores_in_headers": 1,
                "downstream_cx_protocol_error": 1,
            },
            before,
        )
        return
    with connect(proxy.port) as s:
        s.sendall(request)
        status, _, body = read_response(s)
    assert status == 200
    seen = echoed_headers(body)
    assert seen["x-dash"] == "2"
    assert ("x_under" in seen) == (action == "ALLOW")
    dropped = 1 if action == "DROP_HEADER" else 0
    proxy.stats_delta({"http1.dropped_headers_with_underscores": dropped}, before)


@pytest.mark.parametrize("action", ["DROP_HEADER", "REJECT_REQUEST"])
def test_http2_headers_with_underscores(
    start_proxy: StartProxy, tmp_path: Path, http_upstream: HttpUpstream, action: str
) -> None:
    """HTTP/2: the header is dropped, or the stream is reset (INTERNAL_ERROR)."""
    proxy = start_hcm(
        start_proxy,
        tmp_path,
        http_upstream.address,
        common(headers_with_underscores_action=action),
    )
    before = proxy.proc.stats()
    client = RawH2(proxy.port)
    try:
        client.request(1, (("x_under", "1"),))
        client.pump(lambda c: 1 in c.statuses or 1 in c.resets)
    finally:
        client.close()
    if action == "REJECT_REQUEST":
        assert client.resets == {1: INTERNAL_ERROR}
        proxy.stats_delta({"http2.requests_rejected_with_underscores_in_headers": 1}, before)
    else:
        assert client.statuses == {1: 200}
        proxy.stats_delta({"http2.dropped_headers_with_underscores": 1}, before)


def test_max_headers_count(
    start_proxy: StartProxy, tmp_path: Path, http_upstream: HttpUpstream
) -> None:
    """``max_headers_count: 5``: a head of 5 headers passes, one of 6 gets 431."""
    proxy = start_hcm(start_proxy, tmp_path, http_upstream.address, common(max_headers_count=5))
    before = proxy.proc.stats()
    extra = b"".join(b"x-h%d: v\r\n" % i for i in range(4))
    with connect(proxy.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nhost: example.com\r\n" + extra + b"\r\n")
        status, _, _ = read_response(s)
    assert status == 200
    status, _, body = exchange_then_eof(
        proxy.port, b"GET / HTTP/1.1\r\nhost: example.com\r\n" + extra + b"x-h9: v\r\n\r\n"
    )
    assert (status, body) == (431, b"Request Header Fields Too Large")
    assert proxy.log_lines(2)[1] == "431 DPE http1.too_many_headers"
    proxy.stats_delta({"downstream_rq_2xx": 1, "downstream_rq_4xx": 1}, before)


def test_http2_protocol_options_are_advertised(
    start_proxy: StartProxy, tmp_path: Path, http_upstream: HttpUpstream
) -> None:
    """``http2_protocol_options``: the stream limit and the stream window in the
    codec's SETTINGS, the connection window by WINDOW_UPDATE."""
    proxy = start_hcm(
        start_proxy,
        tmp_path,
        http_upstream.address,
        {
            "http2_protocol_options": {
                "max_concurrent_streams": 7,
                "initial_stream_window_size": 131_072,
                "initial_connection_window_size": 1_048_576,
            }
        },
    )
    client = RawH2(proxy.port)
    try:
        client.request(1)
        client.pump(lambda c: 1 in c.statuses)
    finally:
        client.close()
    assert client.settings[SettingsFrame.MAX_CONCURRENT_STREAMS] == 7
    assert client.settings[SettingsFrame.INITIAL_WINDOW_SIZE] == 131_072
    assert client.connection_window == 1_048_576


# -- what envoyx does not implement ------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        (
            common(max_response_headers_kb=80),
            "common_http_protocol_options.max_response_headers_kb",
        ),
        (
            {"http2_protocol_options": {"allow_metadata": True}},
            "http2_protocol_options.allow_metadata",
        ),
        (
            {"http_protocol_options": {"enable_trailers": True}},
            "http_protocol_options.enable_trailers",
        ),
    ],
    ids=["max_response_headers_kb", "http2_protocol_options", "http_protocol_options"],
)
def test_unimplemented_options_are_refused_by_name(
    http_upstream: HttpUpstream, fields: Json, path: str
) -> None:
    listener = http_listener(
        port=free_port(),
        virtual_hosts=[virtual_host("all", ["*"], [route({"prefix": "/"}, cluster="backend")])],
    )
    listener["filter_chains"][0]["filters"][0]["typed_config"].update(fields)
    config = bootstrap(
        admin_port=free_port(),
        listeners=[listener],
        clusters=[cluster("backend", [http_upstream.address])],
    )
    server: envoyx.Server | None = None
    try:
        with pytest.raises(envoyx.ConfigError) as info:
            server = envoyx.Server(config, concurrency=1)
            server.start()
    finally:
        if server is not None and server.running:
            server.stop()
    assert f"typed_config.{path}" in str(info.value) and "not supported by envoyx" in str(
        info.value
    ), str(info.value)
