"""``proxy_100_continue`` beside Envoy 1.40 (issue 12; Istio sets it on every connection
manager): an HTTP/1.1 request's ``Expect: 100-continue`` goes upstream and the client's
``100 Continue`` is the upstream's, instead of the proxy's own.

The upstream here is a raw socket server: on ``Expect: 100-continue`` it sends
``100 Continue`` (path ``/continue``), refuses with a final ``417`` before the body
(``/refuse``), or says nothing and waits for the body (``/silent``). The client sends the
head, waits up to a second for an interim answer (as curl does), then sends the body
unless a final answer came. What the client and the upstream saw is compared.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.bootstrap import bootstrap, cluster, http_listener, route, virtual_host
from support.envoy import EnvoyProcess
from support.proxy import EnvoyxProcess, ProxyProcess
from support.wait import free_port

pytestmark = pytest.mark.envoy

BODY = b"hello"
CLIENT_WAIT_S = 1.0


def _read_head(sock: socket.socket, buf: bytearray) -> bytes | None:
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    buf[:] = rest
    return head


class ContinueUpstream:
    """Answers per path; records, per request, whether it saw `expect`."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.saw_expect: list[bool] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._conn, args=(conn,), daemon=True).start()

    def _conn(self, conn: socket.socket) -> None:
        with contextlib.closing(conn):
            buf = bytearray()
            while True:
                head = _read_head(conn, buf)
                if head is None:
                    return
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = dict(
                    (k.strip().lower(), v.strip()) for k, v in (x.split(":", 1) for x in lines[1:])
                )
                expect = headers.get("expect", "").lower() == "100-continue"
                self.saw_expect.append(expect)
                if path == "/refuse" and expect:
                    conn.sendall(b"HTTP/1.1 417 Expectation Failed\r\ncontent-length: 0\r\n\r\n")
                    return
                if path == "/continue" and expect:
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                length = int(headers.get("content-length", "0"))
                while len(buf) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                body = bytes(buf[:length])
                del buf[:length]
                reply = b"got " + body
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(reply), reply)
                )

    def stop(self) -> None:
        self.sock.close()


def _exchange(port: int, path: str) -> list[str]:
    """What the client saw: each status line, and the final body."""
    seen: list[str] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            f"POST {path} HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
            f"content-length: {len(BODY)}\r\n\r\n".encode()
        )
        buf = bytearray()
        s.settimeout(CLIENT_WAIT_S)
        try:
            head = _read_head(s, buf)
        except TimeoutError:
            head = None
            seen.append("(no interim answer)")
        s.settimeout(10)
        if head is not None:
            seen.append(head.split(b"\r\n")[0].decode())
            if not head.startswith(b"HTTP/1.1 100"):
                return seen
        s.sendall(BODY)
        head = _read_head(s, buf)
        assert head is not None
        status = head.split(b"\r\n")[0].decode()
        seen.append(status)
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")[1:]
            if line.lower().startswith(b"content-length")
        )
        while len(buf) < length:
            buf += s.recv(65536)
        seen.append(bytes(buf[:length]).decode())
    return seen


@pytest.fixture
def upstream() -> Iterator[ContinueUpstream]:
    up = ContinueUpstream()
    yield up
    up.stop()


@pytest.mark.parametrize("proxy_100_continue", [True, False])
def test_expect_100_continue_as_envoy(
    proxy_100_continue: bool, envoy_binary: Path, tmp_path: Path, upstream: ContinueUpstream
) -> None:
    results: dict[str, tuple[list[list[str]], list[bool]]] = {}
    for kind in ("envoy", "envoyx"):
        port = free_port()
        listener = http_listener(
            port=port,
            virtual_hosts=[virtual_host("all", ["*"], [route({"prefix": "/"}, cluster="up")])],
        )
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["proxy_100_continue"] = proxy_100_continue
        bs = bootstrap(
            admin_port=free_port(),
            listeners=[listener],
            clusters=[cluster("up", [("127.0.0.1", upstream.port)])],
        )
        proxy: ProxyProcess = (
            EnvoyProcess(envoy_binary, bs, tmp_path / kind, concurrency=1)
            if kind == "envoy"
            else EnvoyxProcess(bs, tmp_path / kind, concurrency=1)
        )
        upstream.saw_expect.clear()
        with proxy:
            seen = [_exchange(port, p) for p in ("/continue", "/silent", "/refuse")]
        results[kind] = (seen, list(upstream.saw_expect))

    envoy_seen, envoy_expect = results["envoy"]
    assert envoy_seen[0][0] == "HTTP/1.1 100 Continue"
    if proxy_100_continue:
        assert envoy_expect == [True, True, True]
        # The upstream's refusal reaches the client, which never sends the body.
        assert envoy_seen[2] == ["HTTP/1.1 417 Expectation Failed"]
    else:
        assert envoy_expect == [False, False, False]
    assert results["envoyx"] == results["envoy"]
