"""Bad input: each case gets the error or status Envoy gives, and the process keeps
serving (a good request follows every bad one).

Tests taking ``start_proxy`` run against envoyx and, as a second parametrization,
the real Envoy. Configuration errors (invalid YAML, unknown fields, …) are covered
by test_config.py / test_cli.py.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import httpx
import pytest

from support.bootstrap import bootstrap, cluster, http_listener, route, simple_proxy, virtual_host
from support.clients import raw_exchange
from support.proxy import ProxyProcess
from support.upstreams import HttpUpstream
from support.wait import RefusedPort, free_port, until

StartProxy = Callable[..., ProxyProcess]

REFUSED_PREFIX = (
    "upstream connect error or disconnect/reset before headers. "
    "reset reason: remote connection failure"
)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port with a listening socket on it (not SO_REUSEPORT)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    yield int(s.getsockname()[1])
    s.close()


def _assert_serves(proxy: ProxyProcess) -> None:
    assert proxy.running, f"{proxy.kind} died; log:\n{proxy.log_text()}"
    r = httpx.get(proxy.url("/good"), timeout=10)
    assert r.status_code == 200 and r.headers["x-upstream"] == "a"


# -- ports ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["listener", "admin"])
def test_port_already_in_use_fails_with_exit_1(
    start_proxy: StartProxy, http_upstream: HttpUpstream, taken_port: int, which: str
) -> None:
    listener_port = taken_port if which == "listener" else free_port()
    admin_port = taken_port if which == "admin" else free_port()
    bs = simple_proxy(port=listener_port, admin_port=admin_port, upstream=http_upstream.address)
    proxy = start_proxy(bs, wait_ready=False)
    rc = proxy.wait_exit(30)
    log = proxy.log_text()
    assert rc == 1, log
    assert f"127.0.0.1:{taken_port}" in log, log
    assert "address already in use" in log.lower(), log


def test_in_process_bind_error(http_upstream: HttpUpstream, taken_port: int) -> None:
    import envoyx

    server = envoyx.Server(
        simple_proxy(port=taken_port, admin_port=0, upstream=http_upstream.address)
    )
    with pytest.raises(envoyx.BindError) as info:
        server.start()
    assert isinstance(info.value, OSError)
    assert isinstance(info.value, envoyx.EnvoyxError)
    assert f"127.0.0.1:{taken_port}" in str(info.value)
    server.stop()  # idempotent after a failed start


# -- upstream refusing connections ---------------------------------------------------


def test_upstream_refusing_connections(
    start_proxy: StartProxy, http_upstream: HttpUpstream, refused_port: RefusedPort
) -> None:
    bs = bootstrap(
        admin_port=free_port(),
        listeners=[
            http_listener(
                port=free_port(),
                virtual_hosts=[
                    virtual_host(
                        "all",
                        ["*"],
                        [
                            route({"prefix": "/dead"}, cluster="dead"),
                            route({"prefix": "/"}, cluster="backend"),
                        ],
                    )
                ],
            )
        ],
        clusters=[
            cluster("dead", [(refused_port.host, refused_port.port)]),
            cluster("backend", [http_upstream.address]),
        ],
    )
    proxy = start_proxy(bs)
    with httpx.Client(timeout=10) as c:
        for i in range(10):
            r = c.get(proxy.url(f"/dead/{i}"))
            assert r.status_code == 503
            assert r.text.startswith(REFUSED_PREFIX), r.text
            assert r.headers["content-type"] == "text/plain"
    until(
        lambda: proxy.stats().get("cluster.dead.upstream_cx_connect_fail") == 10,
        timeout=10,
        what="10 connect failures counted",
    )
    _assert_serves(proxy)


# -- malformed HTTP/1 ------------------------------------------------------------------


@pytest.fixture
def proxy(start_proxy: StartProxy, http_upstream: HttpUpstream) -> ProxyProcess:
    return start_proxy(
        simple_proxy(port=free_port(), admin_port=free_port(), upstream=http_upstream.address)
    )


MALFORMED = {
    "garbage_request_line": b"GARBAGE\r\n\r\n",
    "spaces_in_target": b"GET /a b c HTTP/1.1\r\nhost: x\r\n\r\n",
    "header_without_colon": b"GET / HTTP/1.1\r\nhost: x\r\nno colon here\r\n\r\n",
    "space_before_colon": b"GET / HTTP/1.1\r\nhost : x\r\n\r\n",
    "bad_content_length": b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1x\r\n\r\n",
    "two_content_lengths": (
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab"
    ),
    "bad_chunk_size": b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    "tls_client_hello": bytes.fromhex("16030100a5010000a10303") + b"\x00" * 40 + b"\r\n\r\n",
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_request_gets_400_and_proxy_keeps_serving(
    proxy: ProxyProcess, http_upstream: HttpUpstream, data: bytes
) -> None:
    before = len(http_upstream.requests)
    resp = raw_exchange(proxy.listener_address(), data)
    assert (resp.status, resp.body) == (400, b"Bad Request")
    assert resp.closed
    assert len(http_upstream.requests) == before, "a malformed request reached the upstream"
    _assert_serves(proxy)


@pytest.mark.parametrize(
    "data",
    [
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n"
        b"transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
        b"content-length: 300\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ],
    ids=["cl_then_te", "te_then_cl"],
)
def test_content_length_with_transfer_encoding_is_400(
    proxy: ProxyProcess, http_upstream: HttpUpstream, data: bytes
) -> None:
    """Request smuggling guard: Envoy refuses both framings together (unless
    http_protocol_options.allow_chunked_length is set)."""
    before = len(http_upstream.requests)
    resp = raw_exchange(proxy.listener_address(), data)
    assert (resp.status, resp.body, resp.closed) == (400, b"Bad Request", True)
    assert len(http_upstream.requests) == before
    stats = proxy.wait_stat("http.ingress_http.downstream_cx_protocol_error", 1)
    assert stats["http.ingress_http.downstream_rq_4xx"] == 1
    _assert_serves(proxy)


@pytest.mark.parametrize(
    "data",
    [b"GET / HTTP/1.0\r\n\r\n", b"GET /\r\nhost: x\r\n\r\n"],
    ids=["http10", "http09_no_version"],
)
def test_old_http_versions_get_426(proxy: ProxyProcess, data: bytes) -> None:
    """Envoy refuses HTTP/1.0 (and a request line without a version, HTTP/0.9) with
    426 unless http_protocol_options.accept_http_10 is set."""
    resp = raw_exchange(proxy.listener_address(), data)
    assert (resp.status, resp.body, resp.closed) == (426, b"Upgrade Required", True)
    _assert_serves(proxy)


def test_oversized_headers_get_431(proxy: ProxyProcess, http_upstream: HttpUpstream) -> None:
    """Envoy's default max_request_headers_kb is 60."""
    big = b"x-big: " + b"a" * (64 * 1024) + b"\r\n"
    resp = raw_exchange(proxy.listener_address(), b"GET / HTTP/1.1\r\nhost: x\r\n" + big + b"\r\n")
    assert (resp.status, resp.body) == (431, b"Request Header Fields Too Large")
    assert resp.closed
    _assert_serves(proxy)


def test_client_disconnect_mid_request_keeps_serving(proxy: ProxyProcess) -> None:
    with socket.create_connection(proxy.listener_address(), timeout=10) as s:
        s.sendall(b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\npartial")
    with socket.create_connection(proxy.listener_address(), timeout=10) as s:
        s.sendall(b"GET /x HTTP/1.1\r\nhost: x\r\n")  # headers never finished
    _assert_serves(proxy)
