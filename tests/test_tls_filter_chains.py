"""Filter chain matching on one listener (``filter_chain_match``), with the TLS and HTTP
inspector listener filters, end to end.

Each chain answers every request with its own name (a ``direct_response`` body) or, for
TLS passthrough, is a ``tcp_proxy`` to a TLS upstream whose certificate the client then
sees; so each test sees which chain served a connection. Envoy's matching order is
destination port, destination IP, server name, transport protocol, application
protocols, source type, source IP, source port; at each step the most specific match
wins and chains that do not name the criterion are the fallback. A connection no chain
matches goes to ``default_filter_chain`` or is closed, counted in
``listener.<address>.no_filter_chain_match``.

Every test takes ``start_proxy``: envoyx and, as a second parametrization, the real
Envoy 1.40 with the same bootstrap and the same expectations.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from support.bootstrap import bootstrap, cluster
from support.clients import RawResponse, _Reader, raw_exchange, read_response
from support.proxy import ProxyProcess
from support.tls import (
    HTTP_INSPECTOR,
    TLS_INSPECTOR,
    Pki,
    TlsUpstream,
    client_context,
    direct_chain,
    downstream_tls,
    h2_request,
    handshake,
    https_request,
    listener,
    listener_stat,
    refused_by_peer,
    shared_pki,
    stat_deltas,
    tcp_proxy_chain,
)
from support.wait import free_port

StartProxy = Callable[..., ProxyProcess]
Json = dict[str, Any]

GET = b"GET / HTTP/1.1\r\nhost: example.test\r\nconnection: close\r\n\r\n"


@pytest.fixture(scope="module")
def pki() -> Pki:
    return shared_pki()


@pytest.fixture(scope="module")
def passthrough_upstream(pki: Pki) -> Iterator[TlsUpstream]:
    up = TlsUpstream("passthrough", pki.passthrough).start()
    yield up
    up.stop()


def serve(
    start: StartProxy,
    chains: list[Json],
    *,
    clusters: list[Json] | None = None,
    **listener_extra: Any,
) -> ProxyProcess:
    lis = listener(free_port(), chains, **listener_extra)
    return start(bootstrap(admin_port=free_port(), listeners=[lis], clusters=clusters or []))


def plain_get(
    address: tuple[str, int], *, source: tuple[str, int] | None = None, request: bytes = GET
) -> RawResponse:
    with socket.create_connection(address, timeout=5, source_address=source) as sock:
        sock.sendall(request)
        return read_response(_Reader(sock))


def tls_body(
    proxy: ProxyProcess,
    pki: Pki,
    server_name: str | None,
    *,
    alpn: list[str] | None = None,
) -> tuple[bytes, str | None]:
    """The body a TLS client gets (SNI ``server_name``) and the served certificate's CN;
    the certificate is not checked against the name (the chain decides it)."""
    ctx = client_context(pki, verify=False, alpn=alpn)
    resp, hs = https_request(
        proxy.listener_address(), ctx, server_name=server_name, host="example.test"
    )
    assert resp.status == 200, resp
    return resp.body, hs.peer_cn


def closed_without_answer(address: tuple[str, int], data: bytes = GET) -> None:
    """The proxy closes the connection without a byte (FIN or RST)."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(data)
        try:
            got = sock.recv(1024)
        except ConnectionResetError:
            got = b""
    assert got == b"", got


def lstat(proxy: ProxyProcess, name: str) -> str:
    return listener_stat(proxy.listener_address(), name)


# -- server names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sni", "chain", "cn"),
    [
        ("api.example.com", "api", "api"),  # exact beats the wildcard
        ("x.example.com", "wildcard", "wildcard"),
        ("a.b.example.com", "wildcard", "wildcard"),  # a wildcard spans several labels
        ("example.com", "fallback", "fallback"),  # *.example.com needs a label more
        ("other.test", "fallback", "fallback"),
        (None, "fallback", "fallback"),  # no SNI: the chain without server_names
    ],
)
def test_server_names_exact_and_wildcard(
    start_proxy: StartProxy, pki: Pki, sni: str | None, chain: str, cn: str
) -> None:
    proxy = serve(
        start_proxy,
        [
            direct_chain(
                "api",
                match={"server_names": ["api.example.com"]},
                transport_socket=downstream_tls([pki.api]),
            ),
            direct_chain(
                "wildcard",
                match={"server_names": ["*.example.com"]},
                transport_socket=downstream_tls([pki.wildcard]),
            ),
            direct_chain("fallback", transport_socket=downstream_tls([pki.fallback])),
        ],
        listener_filters=[TLS_INSPECTOR],
    )
    assert tls_body(proxy, pki, sni) == (chain.encode(), cn)


def test_no_matching_chain_closes_the_connection(start_proxy: StartProxy, pki: Pki) -> None:
    """Only a chain for ``api.example.com``: a TLS client naming another server, one
    sending no SNI and a plaintext client are each closed without an answer, each
    counted in ``no_filter_chain_match``; none reaches a TLS handshake."""
    proxy = serve(
        start_proxy,
        [
            direct_chain(
                "api",
                match={"server_names": ["api.example.com"]},
                transport_socket=downstream_tls([pki.api]),
            )
        ],
        listener_filters=[TLS_INSPECTOR],
    )
    address = proxy.listener_address()
    before = proxy.stats()
    ctx = client_context(pki, verify=False)
    refused_by_peer(lambda: https_request(address, ctx, server_name="other.test"))
    refused_by_peer(lambda: https_request(address, ctx, server_name=None))
    closed_without_answer(address)
    stat_deltas(
        proxy,
        before,
        {
            lstat(proxy, "no_filter_chain_match"): 3,
            lstat(proxy, "ssl.handshake"): 0,
            lstat(proxy, "ssl.connection_error"): 0,
        },
    )
    # The matching name is served.
    assert tls_body(proxy, pki, "api.example.com") == (b"api", "api")


def test_default_filter_chain_takes_what_no_chain_matches(
    start_proxy: StartProxy, pki: Pki
) -> None:
    """``default_filter_chain`` serves the connections no chain matches; they are not
    counted in ``no_filter_chain_match``."""
    proxy = serve(
        start_proxy,
        [
            direct_chain(
                "api",
                match={"server_names": ["api.example.com"]},
                transport_socket=downstream_tls([pki.api]),
            )
        ],
        listener_filters=[TLS_INSPECTOR],
        default_chain=direct_chain("default", transport_socket=downstream_tls([pki.fallback])),
    )
    before = proxy.stats()
    assert tls_body(proxy, pki, "other.test") == (b"default", "fallback")
    assert tls_body(proxy, pki, None) == (b"default", "fallback")
    assert tls_body(proxy, pki, "api.example.com") == (b"api", "api")
    stat_deltas(
        proxy, before, {lstat(proxy, "no_filter_chain_match"): 0, lstat(proxy, "ssl.handshake"): 3}
    )


# -- transport and application protocols -------------------------------------------------


def test_tls_and_plaintext_on_the_same_port(start_proxy: StartProxy, pki: Pki) -> None:
    """``transport_protocol: tls`` and ``raw_buffer`` chains on one port, told apart by
    the TLS inspector."""
    proxy = serve(
        start_proxy,
        [
            direct_chain(
                "tls",
                match={"transport_protocol": "tls"},
                transport_socket=downstream_tls([pki.server_ecdsa]),
            ),
            direct_chain("plain", match={"transport_protocol": "raw_buffer"}),
        ],
        listener_filters=[TLS_INSPECTOR],
    )
    before = proxy.stats()
    assert tls_body(proxy, pki, "server.example.com") == (b"tls", "server-ecdsa")
    resp = raw_exchange(proxy.listener_address(), GET)
    assert (resp.status, resp.body) == (200, b"plain")
    stat_deltas(
        proxy,
        before,
        {
            lstat(proxy, "ssl.handshake"): 1,
            "http.tls.downstream_cx_ssl_total": 1,
            "http.plain.downstream_cx_total": 1,
            "http.plain.downstream_cx_ssl_total": 0,
        },
    )


@pytest.mark.parametrize(
    ("offer", "chain", "alpn"),
    [
        (["h2", "http/1.1"], "h2", "h2"),
        # The client's order decides, not the chains': the first protocol it offers
        # that a chain names (httpx offers http/1.1 first).
        (["http/1.1", "h2"], "http11", "http/1.1"),
        (["http/1.1"], "http11", "http/1.1"),
        (["spdy/3"], "tls-any", None),  # no chain names it: the chain without the criterion
        (None, "tls-any", None),  # no ALPN at all
    ],
)
def test_application_protocols_from_the_tls_alpn(
    start_proxy: StartProxy, pki: Pki, offer: list[str] | None, chain: str, alpn: str | None
) -> None:
    """``application_protocols`` matched against the client's ALPN offer (read by the
    TLS inspector, before any handshake). Each chain has its own certificate and
    ``alpn_protocols``, so the handshake shows which one took the connection."""
    proxy = serve(
        start_proxy,
        [
            direct_chain(
                "h2",
                match={"transport_protocol": "tls", "application_protocols": ["h2"]},
                transport_socket=downstream_tls([pki.api], alpn=["h2", "http/1.1"]),
            ),
            direct_chain(
                "http11",
                match={"transport_protocol": "tls", "application_protocols": ["http/1.1"]},
                transport_socket=downstream_tls([pki.wildcard], alpn=["http/1.1"]),
            ),
            direct_chain(
                "tls-any",
                match={"transport_protocol": "tls"},
                transport_socket=downstream_tls([pki.fallback]),
            ),
        ],
        listener_filters=[TLS_INSPECTOR],
    )
    cn = {"h2": "api", "http11": "wildcard", "tls-any": "fallback"}[chain]
    ctx = client_context(pki, verify=False, alpn=offer)
    hs = handshake(proxy.listener_address(), ctx, server_name="api.example.com")
    assert (hs.peer_cn, hs.alpn) == (cn, alpn)
    if alpn == "h2":
        status, body, _ = h2_request(
            proxy.listener_address(), client_context(pki), server_name="api.example.com"
        )
        assert (status, body) == (200, b"h2")
    else:
        assert tls_body(proxy, pki, "api.example.com", alpn=offer) == (chain.encode(), cn)


def test_application_protocols_from_the_http_inspector(start_proxy: StartProxy) -> None:
    """Plaintext: the HTTP inspector tells HTTP/2 with prior knowledge (``h2c``) from
    HTTP/1.1 and HTTP/1.0."""
    proxy = serve(
        start_proxy,
        [
            direct_chain(
                "h2c", match={"transport_protocol": "raw_buffer", "application_protocols": ["h2c"]}
            ),
            direct_chain(
                "http11",
                match={"transport_protocol": "raw_buffer", "application_protocols": ["http/1.1"]},
            ),
            direct_chain(
                "http10",
                match={"transport_protocol": "raw_buffer", "application_protocols": ["http/1.0"]},
            ),
        ],
        listener_filters=[TLS_INSPECTOR, HTTP_INSPECTOR],
    )
    host, port = proxy.listener_address()
    with httpx.Client(http1=False, http2=True, timeout=5) as client:
        resp = client.get(f"http://{host}:{port}/")
    assert (resp.http_version, resp.text) == ("HTTP/2", "h2c")
    resp11 = plain_get(proxy.listener_address())
    assert (resp11.status, resp11.body) == (200, b"http11")
    # HTTP/1.0 reaches its chain, whose connection manager refuses it (Envoy's
    # default without accept_http_10): told by that chain's stats.
    before = proxy.stats()
    resp10 = plain_get(
        proxy.listener_address(), request=b"GET / HTTP/1.0\r\nhost: example.test\r\n\r\n"
    )
    assert resp10.status == 426
    stat_deltas(
        proxy,
        before,
        {
            "http.http10.downstream_cx_total": 1,
            "http.http11.downstream_cx_total": 0,
            "http.h2c.downstream_cx_total": 0,
        },
    )


# -- addresses and ports -----------------------------------------------------------------


def test_destination_port_and_prefix_ranges_most_specific_wins(start_proxy: StartProxy) -> None:
    """A chain naming the listener's port beats one naming none; among those, the
    longest destination prefix wins; a chain for another port is never used."""
    port = free_port()
    chains = [
        direct_chain("any"),
        direct_chain("port", match={"destination_port": port}),
        direct_chain(
            "port-8",
            match={
                "destination_port": port,
                "prefix_ranges": [{"address_prefix": "127.0.0.0", "prefix_len": 8}],
            },
        ),
        direct_chain(
            "port-32",
            match={
                "destination_port": port,
                "prefix_ranges": [{"address_prefix": "127.0.0.1", "prefix_len": 32}],
            },
        ),
        direct_chain("other-port", match={"destination_port": port + 1}),
        direct_chain(
            "other-net", match={"prefix_ranges": [{"address_prefix": "10.0.0.0", "prefix_len": 8}]}
        ),
    ]
    lis = listener(port, chains)
    proxy = start_proxy(bootstrap(admin_port=free_port(), listeners=[lis], clusters=[]))
    assert plain_get(proxy.listener_address()).body == b"port-32"


def test_destination_prefix_ranges_without_a_port(start_proxy: StartProxy) -> None:
    """With no chain naming a port, the destination prefix decides: /8 beats a chain
    without prefix; a prefix that does not hold the address does not match."""
    proxy = serve(
        start_proxy,
        [
            direct_chain("any"),
            direct_chain(
                "lo-8", match={"prefix_ranges": [{"address_prefix": "127.0.0.0", "prefix_len": 8}]}
            ),
            direct_chain(
                "other",
                match={"prefix_ranges": [{"address_prefix": "127.0.0.2", "prefix_len": 32}]},
            ),
        ],
    )
    assert plain_get(proxy.listener_address()).body == b"lo-8"


@pytest.mark.parametrize(
    ("source_ip", "use_port", "chain"),
    [
        ("127.0.0.1", False, "any"),
        ("127.0.0.3", False, "src-3"),
        ("127.0.0.1", True, "src-port"),
        # The source IP is matched before the source port: the /32 chain wins.
        ("127.0.0.3", True, "src-3"),
        ("127.0.0.4", False, "src-4-7"),
    ],
)
def test_source_prefix_ranges_and_source_ports(
    start_proxy: StartProxy, source_ip: str, use_port: bool, chain: str
) -> None:
    """``source_prefix_ranges`` and ``source_ports`` against the client's address
    (clients bound to other loopback addresses and to a chosen port)."""
    source_port = free_port()
    proxy = serve(
        start_proxy,
        [
            direct_chain("any"),
            direct_chain(
                "src-3",
                match={"source_prefix_ranges": [{"address_prefix": "127.0.0.3", "prefix_len": 32}]},
            ),
            direct_chain(
                "src-4-7",
                match={"source_prefix_ranges": [{"address_prefix": "127.0.0.4", "prefix_len": 30}]},
            ),
            direct_chain("src-port", match={"source_ports": [source_port]}),
        ],
    )
    source = (source_ip, source_port if use_port else 0)
    assert plain_get(proxy.listener_address(), source=source).body == chain.encode()


# -- TLS passthrough -----------------------------------------------------------------------


def test_sni_passthrough_to_a_tls_upstream(
    start_proxy: StartProxy, pki: Pki, passthrough_upstream: TlsUpstream
) -> None:
    """A ``tcp_proxy`` chain picked by ``server_names`` forwards the TLS bytes as they
    are: the client handshakes with the upstream (its certificate, its view of the
    SNI) and the listener counts no handshake; another name is terminated by the
    proxy with its own certificate."""
    proxy = serve(
        start_proxy,
        [
            tcp_proxy_chain("passthrough", match={"server_names": ["passthrough.example.com"]}),
            direct_chain(
                "terminated",
                match={"server_names": ["server.example.com"]},
                transport_socket=downstream_tls([pki.server_ecdsa]),
            ),
        ],
        clusters=[cluster("passthrough", [passthrough_upstream.address])],
        listener_filters=[TLS_INSPECTOR],
    )
    address = proxy.listener_address()
    before = proxy.stats()
    resp, hs = https_request(
        address, client_context(pki), "/through", server_name="passthrough.example.com"
    )
    assert resp.status == 200
    assert hs.peer_cn == "passthrough-upstream"  # verified against the name, too
    echo = resp.body.decode()
    assert '"sni": "passthrough.example.com"' in echo
    assert '"path": "/through"' in echo
    stat_deltas(
        proxy,
        before,
        {
            lstat(proxy, "ssl.handshake"): 0,
            "tcp.tcp_passthrough.downstream_cx_total": 1,
            "cluster.passthrough.upstream_cx_total": 1,
        },
    )
    resp, hs = https_request(address, client_context(pki), server_name="server.example.com")
    assert (resp.body, hs.peer_cn) == (b"terminated", "server-ecdsa")
    stat_deltas(proxy, before, {lstat(proxy, "ssl.handshake"): 1})


# -- listener filter timeout ---------------------------------------------------------------


def test_listener_filters_timeout_continues_to_the_plaintext_chain(
    start_proxy: StartProxy, pki: Pki
) -> None:
    """A client that says nothing: after ``listener_filters_timeout`` the TLS inspector
    gives up and, with ``continue_on_listener_filters_timeout``, the connection goes to
    the chain for what it found (nothing: ``raw_buffer``); the request the client sends
    afterwards is served there. ``downstream_pre_cx_timeout`` counts the timeout."""
    proxy = serve(
        start_proxy,
        [
            direct_chain(
                "tls",
                match={"transport_protocol": "tls"},
                transport_socket=downstream_tls([pki.server_ecdsa]),
            ),
            direct_chain("plain", match={"transport_protocol": "raw_buffer"}),
        ],
        listener_filters=[TLS_INSPECTOR],
        listener_filters_timeout="0.2s",
        continue_on_listener_filters_timeout=True,
    )
    before = proxy.stats()
    with socket.create_connection(proxy.listener_address(), timeout=5) as sock:
        proxy.wait_stat(lstat(proxy, "downstream_pre_cx_timeout"), 1)
        sock.sendall(GET)
        resp = read_response(_Reader(sock))
    assert (resp.status, resp.body) == (200, b"plain")
    stat_deltas(
        proxy,
        before,
        {lstat(proxy, "downstream_pre_cx_timeout"): 1, "http.plain.downstream_cx_total": 1},
    )


def test_listener_filters_timeout_closes_a_silent_connection(
    start_proxy: StartProxy, pki: Pki
) -> None:
    """Without ``continue_on_listener_filters_timeout`` a connection the inspector
    could not classify in time is closed."""
    proxy = serve(
        start_proxy,
        [
            direct_chain(
                "tls",
                match={"transport_protocol": "tls"},
                transport_socket=downstream_tls([pki.server_ecdsa]),
            ),
            direct_chain("plain"),
        ],
        listener_filters=[TLS_INSPECTOR],
        listener_filters_timeout="0.3s",
    )
    before = proxy.stats()
    started = time.monotonic()
    with socket.create_connection(proxy.listener_address(), timeout=5) as sock:
        try:
            got = sock.recv(1024)
        except ConnectionResetError:
            got = b""
    elapsed = time.monotonic() - started
    assert got == b""
    assert 0.25 <= elapsed < 4, elapsed
    stat_deltas(
        proxy,
        before,
        {lstat(proxy, "downstream_pre_cx_timeout"): 1, "http.plain.downstream_cx_total": 0},
    )
    # A client that speaks at once is classified in time.
    assert plain_get(proxy.listener_address()).body == b"plain"


def test_tls_client_hello_served_by_the_tls_chain_with_a_timeout_configured(
    start_proxy: StartProxy, pki: Pki
) -> None:
    """With a listener filter timeout configured, a client whose ClientHello arrives at
    once is matched on it (no timeout counted)."""
    proxy = serve(
        start_proxy,
        [
            direct_chain(
                "tls",
                match={"transport_protocol": "tls"},
                transport_socket=downstream_tls([pki.server_ecdsa]),
            ),
            direct_chain("plain", match={"transport_protocol": "raw_buffer"}),
        ],
        listener_filters=[TLS_INSPECTOR],
        listener_filters_timeout="1s",
        continue_on_listener_filters_timeout=True,
    )
    before = proxy.stats()
    assert tls_body(proxy, pki, "server.example.com") == (b"tls", "server-ecdsa")
    stat_deltas(proxy, before, {lstat(proxy, "downstream_pre_cx_timeout"): 0})
