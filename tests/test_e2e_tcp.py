"""TCP proxy (envoy.filters.network.tcp_proxy) end to end against a real echo server.

Each test runs against envoyx and, as a second parametrization, the real Envoy.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from support.bootstrap import bootstrap, cluster, tcp_listener
from support.proxy import ProxyProcess
from support.upstreams import TcpEchoUpstream
from support.wait import RefusedPort, free_port, until

StartProxy = Callable[..., ProxyProcess]


def _tcp_proxy(start: StartProxy, upstream: tuple[str, int], concurrency: int = 1) -> ProxyProcess:
    bs = bootstrap(
        admin_port=free_port(),
        listeners=[tcp_listener(port=free_port(), cluster="echo", stat_prefix="tcp_echo")],
        clusters=[cluster("echo", [upstream])],
    )
    return start(bs, concurrency=concurrency)


def _exchange(address: tuple[str, int], payload: bytes, *, chunk: int = 65536) -> bytes:
    """Send ``payload`` while reading; half-close after the last byte; read to EOF."""
    received = bytearray()
    with socket.create_connection(address, timeout=30) as s:

        def reader() -> None:
            while data := s.recv(1 << 16):
                received.extend(data)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        for i in range(0, len(payload), chunk):
            s.sendall(payload[i : i + chunk])
        s.shutdown(socket.SHUT_WR)
        t.join(30)
        assert not t.is_alive(), "no EOF from the proxy after the client's half-close"
    return bytes(received)


def test_byte_exact_echo(start_proxy: StartProxy, tcp_echo: TcpEchoUpstream) -> None:
    proxy = _tcp_proxy(start_proxy, tcp_echo.address)
    payload = os.urandom(8 * 1024 * 1024) + bytes(range(256)) + b"\r\n\x00" * 100
    echoed = _exchange(proxy.listener_address(), payload)
    assert len(echoed) == len(payload)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()


def test_half_close_is_propagated_both_ways(
    start_proxy: StartProxy, tcp_echo: TcpEchoUpstream
) -> None:
    """The client shuts down its write side; the proxy passes the FIN upstream, the
    echo server finishes writing and closes; the client still gets every byte."""
    proxy = _tcp_proxy(start_proxy, tcp_echo.address)
    eofs = tcp_echo.eofs_seen
    with socket.create_connection(proxy.listener_address(), timeout=30) as s:
        s.sendall(b"first line\n")
        assert _recv_exact(s, 11) == b"first line\n"  # a round trip before the half-close
        s.sendall(b"last words")
        s.shutdown(socket.SHUT_WR)
        rest = b""
        while data := s.recv(65536):
            rest += data
    assert rest == b"last words"
    until(lambda: tcp_echo.eofs_seen > eofs, timeout=10, what="upstream to see the FIN")


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = s.recv(n - len(out))
        assert data, f"EOF after {out!r}"
        out += data
    return out


def test_many_concurrent_connections(start_proxy: StartProxy, tcp_echo: TcpEchoUpstream) -> None:
    proxy = _tcp_proxy(start_proxy, tcp_echo.address, concurrency=2)
    payloads = [os.urandom(10_000 + i * 1000) for i in range(64)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda p: _exchange(proxy.listener_address(), p), payloads))
    assert results == payloads
    listener = f"listener.127.0.0.1_{proxy.listener_address()[1]}"
    total = sum(len(p) for p in payloads)
    expected = {
        f"{listener}.downstream_cx_total": 64,
        "tcp.tcp_echo.downstream_cx_total": 64,
        "cluster.echo.upstream_cx_total": 64,
        "tcp.tcp_echo.downstream_cx_rx_bytes_total": total,
        "tcp.tcp_echo.downstream_cx_tx_bytes_total": total,
    }
    # Stats may be charged a moment after the connections closed: poll, then compare.
    assert proxy.wait_stats(expected, before={}) == expected


def test_refused_upstream_closes_the_client_and_keeps_serving(
    start_proxy: StartProxy, tcp_echo: TcpEchoUpstream
) -> None:
    refused = RefusedPort()
    try:
        bs = bootstrap(
            admin_port=free_port(),
            listeners=[
                tcp_listener(port=free_port(), name="dead", cluster="dead", stat_prefix="dead"),
                tcp_listener(port=free_port(), name="live", cluster="echo", stat_prefix="live"),
            ],
            clusters=[
                cluster("dead", [(refused.host, refused.port)]),
                cluster("echo", [tcp_echo.address]),
            ],
        )
        proxy = start_proxy(bs)
        with socket.create_connection(proxy.listener_address("dead"), timeout=30) as s:
            s.sendall(b"hello?")
            try:
                data = s.recv(100)
            except ConnectionResetError:  # Envoy resets (RST) rather than closes
                data = b""
            assert data == b"", "bytes relayed from an upstream that refused"
        until(
            lambda: proxy.stats().get("cluster.dead.upstream_cx_connect_fail") == 1,
            timeout=10,
            what="upstream_cx_connect_fail",
        )
        assert _exchange(proxy.listener_address("live"), b"still here") == b"still here"
    finally:
        refused.close()
