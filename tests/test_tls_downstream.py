"""TLS termination on a listener's filter chain (``envoy.transport_sockets.tls`` with a
``DownstreamTlsContext``), end to end with real TLS clients (Python's ``ssl``, httpx,
``openssl s_client``) and the certificates of :func:`support.tls.shared_pki`.

Every test but the last takes ``start_proxy``: it runs against envoyx and, as a second
parametrization, against the real Envoy 1.40 with the same bootstrap and the same
expectations, so what is asserted is Envoy's behaviour: the certificate served, the
protocol, cipher and ALPN negotiated, whether a client is refused, and the TLS stats
of the listener (``listener.127.0.0.1_<port>.ssl.*``) and of the HTTP connection
manager (``http.ingress_http.downstream_cx_ssl_total``).

A refused handshake is seen by a TLS 1.3 client in different ways (an alert during the
handshake, or its first read failing after a handshake it thought complete, when the
server rejects the client's certificate): :func:`support.tls.refused_by_peer` accepts
any of them, and the stats say which check refused it.

The last test (a Python filter reading the TLS peer's identity) concerns envoyx alone.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.bootstrap import bootstrap, cluster
from support.proxy import ProxyProcess
from support.tls import (
    DB_SPIFFE,
    WEB_DNS,
    WEB_IP,
    WEB_SPIFFE,
    Pki,
    client_context,
    downstream_tls,
    handshake,
    https_listener,
    https_request,
    listener_stat,
    openssl_handshake,
    refused_by_peer,
    san_matcher,
    shared_pki,
    stat_deltas,
    validation_context,
)
from support.upstreams import HttpUpstream
from support.wait import free_port, until

StartProxy = Callable[..., ProxyProcess]
Json = dict[str, Any]

TESTS_DIR = Path(__file__).resolve().parent
SERVER = "server.example.com"  # a DNS SAN of every server certificate of the PKI
TLS12 = ssl.TLSVersion.TLSv1_2
TLS13 = ssl.TLSVersion.TLSv1_3


@pytest.fixture(scope="module")
def pki() -> Pki:
    return shared_pki()


def serve_tls(
    start: StartProxy,
    transport_socket: Json,
    *,
    upstream: HttpUpstream | None = None,
    http_filters: list[Json] | None = None,
) -> ProxyProcess:
    """One TLS listener answering ``200 hello`` (or proxying to ``upstream``)."""
    clusters = [cluster("backend", [upstream.address])] if upstream else []
    lis = https_listener(
        free_port(),
        transport_socket,
        cluster_name="backend" if upstream else None,
        http_filters=http_filters,
    )
    return start(bootstrap(admin_port=free_port(), listeners=[lis], clusters=clusters))


def ssl_stat(proxy: ProxyProcess, name: str) -> str:
    return listener_stat(proxy.listener_address(), f"ssl.{name}")


def refused(proxy: ProxyProcess, ctx: ssl.SSLContext, server_name: str = SERVER) -> str:
    return refused_by_peer(
        lambda: https_request(proxy.listener_address(), ctx, server_name=server_name)
    )


# -- certificates ------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["filename", "inline_string"])
def test_terminates_tls_with_a_certificate_chain_from_a_file_or_inline(
    start_proxy: StartProxy, pki: Pki, http_upstream: HttpUpstream, source: str
) -> None:
    """The certificate (leaf + intermediate, the client trusting only the root) comes
    from ``filename`` or ``inline_string``; the request is proxied with
    ``x-forwarded-proto: https``; the listener counts the handshake, its version,
    cipher and curve, and the HTTP connection manager an SSL connection."""
    proxy = serve_tls(
        start_proxy,
        downstream_tls([pki.server_chain], inline=source == "inline_string"),
        upstream=http_upstream,
    )
    before = proxy.stats()
    resp, hs = https_request(
        proxy.listener_address(), client_context(pki), "/tls", server_name=SERVER
    )
    assert resp.status == 200, resp
    assert hs.peer_cn == "server-chain"  # and it verified: the intermediate was sent
    assert hs.version == "TLSv1.3"
    echo = json.loads(resp.body)
    assert ["x-forwarded-proto", "https"] in echo["headers"]
    stat_deltas(
        proxy,
        before,
        {
            ssl_stat(proxy, "handshake"): 1,
            ssl_stat(proxy, "versions.TLSv1.3"): 1,
            ssl_stat(proxy, f"ciphers.{hs.cipher}"): 1,
            ssl_stat(proxy, "curves.X25519"): 1,
            # No client certificate: counted even without a validation context.
            ssl_stat(proxy, "no_certificate"): 1,
            ssl_stat(proxy, "connection_error"): 0,
            "http.ingress_http.downstream_cx_ssl_total": 1,
            "http.ingress_http.downstream_cx_total": 1,
        },
    )


def test_plaintext_on_a_tls_listener_is_closed_as_a_connection_error(
    start_proxy: StartProxy, pki: Pki
) -> None:
    """An HTTP/1.1 request in clear text to a TLS-only chain: the connection is closed
    without a byte of answer; ``ssl.connection_error`` counts it."""
    proxy = serve_tls(start_proxy, downstream_tls([pki.server_rsa]))
    before = proxy.stats()
    with socket.create_connection(proxy.listener_address(), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        try:
            data = sock.recv(1024)
        except ConnectionResetError:
            data = b""
    assert data == b""
    stat_deltas(
        proxy, before, {ssl_stat(proxy, "connection_error"): 1, ssl_stat(proxy, "handshake"): 0}
    )


# (listener alpn_protocols, client ALPN offer) -> negotiated ALPN, HTTP version
ALPN_CASES = [
    pytest.param(["h2", "http/1.1"], True, "h2", "HTTP/2", id="h2-offered"),
    pytest.param(["h2", "http/1.1"], False, "http/1.1", "HTTP/1.1", id="http1-offered"),
    pytest.param(None, True, None, "HTTP/1.1", id="no-listener-alpn"),
]


@pytest.mark.parametrize(("alpn", "client_h2", "negotiated", "version"), ALPN_CASES)
def test_alpn_chooses_http2_or_http1_with_codec_auto(
    start_proxy: StartProxy,
    pki: Pki,
    alpn: list[str] | None,
    client_h2: bool,
    negotiated: str | None,
    version: str,
) -> None:
    """``alpn_protocols: [h2, http/1.1]`` and ``codec_type: AUTO``: a client offering
    h2 speaks HTTP/2, one offering only http/1.1 HTTP/1.1; without ``alpn_protocols``
    the listener negotiates nothing and an h2-capable client falls back to HTTP/1.1."""
    proxy = serve_tls(start_proxy, downstream_tls([pki.server_ecdsa], alpn=alpn))
    # What ALPN the server picks, seen on a bare handshake with the client's offer.
    offer = ["h2", "http/1.1"] if client_h2 else ["http/1.1"]
    hs = handshake(proxy.listener_address(), client_context(pki, alpn=offer), server_name=SERVER)
    assert hs.alpn == negotiated
    # That handshake's connection is counted too: Envoy at accept, envoyx once the
    # handshake is done, which may be just after the client returns.
    until(lambda: proxy.stats().get("http.ingress_http.downstream_cx_ssl_total", 0) >= 1)
    before = proxy.stats()
    host, port = proxy.listener_address()
    with httpx.Client(verify=client_context(pki), http2=client_h2, timeout=5) as client:
        for _ in range(2):  # two requests, one connection
            resp = client.get(f"https://{host}:{port}/alpn", extensions={"sni_hostname": SERVER})
            assert resp.status_code == 200
            assert resp.text == "hello"
            assert resp.http_version == version
    h2 = 1 if version == "HTTP/2" else 0
    stat_deltas(
        proxy,
        before,
        {
            "http.ingress_http.downstream_cx_http2_total": h2,
            "http.ingress_http.downstream_cx_http1_total": 1 - h2,
            "http.ingress_http.downstream_cx_ssl_total": 1,
            "http.ingress_http.downstream_rq_total": 2,
        },
    )


@pytest.mark.parametrize(
    ("order", "client", "expected"),
    [
        # TLS 1.2: the cipher suites the client offers say which keys it accepts.
        pytest.param("rsa,ecdsa", "tls12:ECDHE-RSA-AES128-GCM-SHA256", "server-rsa", id="12-rsa"),
        pytest.param(
            "rsa,ecdsa", "tls12:ECDHE-ECDSA-AES128-GCM-SHA256", "server-ecdsa", id="12-ecdsa"
        ),
        # A client able to take either gets the ECDSA certificate, whatever the order
        # of the certificates and of the client's preferences.
        pytest.param(
            "rsa,ecdsa",
            "tls12:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-GCM-SHA256",
            "server-ecdsa",
            id="12-both",
        ),
        pytest.param("ecdsa,rsa", "tls13", "server-ecdsa", id="13-default-ecdsa-first"),
        pytest.param("rsa,ecdsa", "tls13", "server-ecdsa", id="13-default-rsa-first"),
        # TLS 1.3: the signature algorithms the client offers.
        pytest.param("rsa,ecdsa", "sigalgs:rsa_pss_rsae_sha256", "server-rsa", id="13-rsa-pss"),
        pytest.param("ecdsa,rsa", "sigalgs:ecdsa_secp256r1_sha256", "server-ecdsa", id="13-ecdsa"),
        pytest.param(
            "rsa,ecdsa",
            "sigalgs:rsa_pss_rsae_sha256:ecdsa_secp256r1_sha256",
            "server-ecdsa",
            id="13-rsa-preferred",
        ),
    ],
)
def test_rsa_or_ecdsa_certificate_chosen_by_what_the_client_supports(
    start_proxy: StartProxy, pki: Pki, order: str, client: str, expected: str
) -> None:
    certs = {"rsa": pki.server_rsa, "ecdsa": pki.server_ecdsa}
    proxy = serve_tls(start_proxy, downstream_tls([certs[k] for k in order.split(",")]))
    address = proxy.listener_address()
    kind, _, arg = client.partition(":")
    if kind == "sigalgs":
        cn, verify = openssl_handshake(address, ca=pki.ca_path, server_name=SERVER, sigalgs=arg)
        assert verify == "0 (ok)"
    else:
        ctx = (
            client_context(pki, max_version=TLS12, ciphers=arg)
            if kind == "tls12"
            else client_context(pki)
        )
        resp, hs = https_request(address, ctx, server_name=SERVER)
        assert resp.status == 200
        assert hs.version == ("TLSv1.2" if kind == "tls12" else "TLSv1.3")
        cn = hs.peer_cn or ""
    assert cn == expected


# -- protocol versions and cipher suites -------------------------------------------------


@pytest.mark.parametrize(
    ("params", "client_max", "version"),
    [
        pytest.param({"tls_minimum_protocol_version": "TLSv1_3"}, TLS12, None, id="min13-c12"),
        pytest.param({"tls_minimum_protocol_version": "TLSv1_3"}, None, "TLSv1.3", id="min13"),
        pytest.param({"tls_maximum_protocol_version": "TLSv1_2"}, None, "TLSv1.2", id="max12"),
        pytest.param(
            {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_2"},
            TLS12,
            "TLSv1.2",
            id="only12-c12",
        ),
        # Envoy's server default: TLS 1.2 to 1.3.
        pytest.param({}, TLS12, "TLSv1.2", id="default-c12"),
        pytest.param({}, None, "TLSv1.3", id="default"),
    ],
)
def test_tls_params_bound_the_protocol_version(
    start_proxy: StartProxy,
    pki: Pki,
    params: Json,
    client_max: ssl.TLSVersion | None,
    version: str | None,
) -> None:
    """``tls_params`` min/max versions: a client within them negotiates the highest
    common version (``ssl.versions.<v>`` counted); one below the minimum is refused
    with ``ssl.connection_error`` (no ``ssl.handshake``)."""
    proxy = serve_tls(start_proxy, downstream_tls([pki.server_ecdsa], params=params))
    ctx = client_context(pki, max_version=client_max)
    before = proxy.stats()
    if version is None:
        err = refused(proxy, ctx)
        assert "PROTOCOL_VERSION" in err, err  # a protocol_version alert
        stat_deltas(
            proxy, before, {ssl_stat(proxy, "connection_error"): 1, ssl_stat(proxy, "handshake"): 0}
        )
        return
    resp, hs = https_request(proxy.listener_address(), ctx, server_name=SERVER)
    assert resp.status == 200
    assert hs.version == version
    stat_deltas(
        proxy,
        before,
        {ssl_stat(proxy, "handshake"): 1, ssl_stat(proxy, f"versions.{version}"): 1},
    )


def test_cipher_suites_choose_the_tls12_cipher(start_proxy: StartProxy, pki: Pki) -> None:
    """``cipher_suites`` (TLS 1.2) is the server's list: a client offering one of them
    gets it (``ssl.ciphers.<name>``); a client offering none is refused
    (``ssl.connection_error``)."""
    cipher = "ECDHE-ECDSA-CHACHA20-POLY1305"
    params = {"tls_maximum_protocol_version": "TLSv1_2", "cipher_suites": [cipher]}
    proxy = serve_tls(start_proxy, downstream_tls([pki.server_ecdsa], params=params))
    before = proxy.stats()
    ctx = client_context(pki, ciphers=f"ECDHE-ECDSA-AES128-GCM-SHA256:{cipher}")
    resp, hs = https_request(proxy.listener_address(), ctx, server_name=SERVER)
    assert resp.status == 200
    assert (hs.version, hs.cipher) == ("TLSv1.2", cipher)
    stat_deltas(proxy, before, {ssl_stat(proxy, f"ciphers.{cipher}"): 1})

    before = proxy.stats()
    refused(proxy, client_context(pki, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256"))
    stat_deltas(
        proxy, before, {ssl_stat(proxy, "connection_error"): 1, ssl_stat(proxy, "handshake"): 0}
    )


def test_an_unknown_cipher_suite_is_a_configuration_error(
    start_proxy: StartProxy, pki: Pki
) -> None:
    """A ``cipher_suites`` entry that is no cipher: the proxy refuses the bootstrap
    and exits non-zero, naming the cipher it rejected."""
    params = {"cipher_suites": ["ECDHE-RSA-AES128-GCM-SHA256", "NOT-A-CIPHER"]}
    lis = https_listener(free_port(), downstream_tls([pki.server_rsa], params=params))
    proxy = start_proxy(
        bootstrap(admin_port=free_port(), listeners=[lis], clusters=[]), wait_ready=False
    )
    rc = proxy.wait_exit(20)
    assert rc != 0
    assert "NOT-A-CIPHER" in proxy.log_text()


# -- client certificates -------------------------------------------------------------------


def test_required_client_certificate(start_proxy: StartProxy, pki: Pki) -> None:
    """``require_client_certificate`` with a ``trusted_ca``: no certificate is refused
    (``ssl.fail_verify_no_cert``), one of another CA too (``ssl.fail_verify_error``);
    a certificate of the trusted CA is served (``ssl.handshake``)."""
    proxy = serve_tls(
        start_proxy,
        downstream_tls(
            [pki.server_rsa],
            validation=validation_context(pki.ca_path),
            require_client_certificate=True,
        ),
    )
    before = proxy.stats()
    refused(proxy, client_context(pki))
    stat_deltas(
        proxy,
        before,
        {
            ssl_stat(proxy, "fail_verify_no_cert"): 1,
            ssl_stat(proxy, "handshake"): 0,
            ssl_stat(proxy, "no_certificate"): 0,
            ssl_stat(proxy, "fail_verify_error"): 0,
        },
    )

    before = proxy.stats()
    refused(proxy, client_context(pki, cert=pki.client_rogue))
    stat_deltas(
        proxy,
        before,
        {
            ssl_stat(proxy, "fail_verify_error"): 1,
            ssl_stat(proxy, "fail_verify_no_cert"): 0,
            ssl_stat(proxy, "handshake"): 0,
        },
    )

    before = proxy.stats()
    resp, _ = https_request(
        proxy.listener_address(), client_context(pki, cert=pki.client_web), server_name=SERVER
    )
    assert resp.status == 200
    stat_deltas(
        proxy,
        before,
        {
            ssl_stat(proxy, "handshake"): 1,
            ssl_stat(proxy, "no_certificate"): 0,
            ssl_stat(proxy, "fail_verify_error"): 0,
        },
    )


def test_optional_client_certificate(start_proxy: StartProxy, pki: Pki) -> None:
    """A ``trusted_ca`` without ``require_client_certificate``: a client without a
    certificate is served (``ssl.no_certificate``), one with a valid certificate too;
    a certificate the CA did not sign is still refused (``ssl.fail_verify_error``)."""
    proxy = serve_tls(
        start_proxy,
        downstream_tls([pki.server_rsa], validation=validation_context(pki.ca_path)),
    )
    address = proxy.listener_address()
    before = proxy.stats()
    resp, _ = https_request(address, client_context(pki), server_name=SERVER)
    assert resp.status == 200
    stat_deltas(
        proxy, before, {ssl_stat(proxy, "handshake"): 1, ssl_stat(proxy, "no_certificate"): 1}
    )

    before = proxy.stats()
    resp, _ = https_request(address, client_context(pki, cert=pki.client_web), server_name=SERVER)
    assert resp.status == 200
    stat_deltas(
        proxy, before, {ssl_stat(proxy, "handshake"): 1, ssl_stat(proxy, "no_certificate"): 0}
    )

    before = proxy.stats()
    refused(proxy, client_context(pki, cert=pki.client_rogue))
    stat_deltas(
        proxy, before, {ssl_stat(proxy, "fail_verify_error"): 1, ssl_stat(proxy, "handshake"): 0}
    )


# The client certificate client_web has the SANs URI WEB_SPIFFE, DNS WEB_DNS, IP WEB_IP.
SAN_CASES = [
    pytest.param([san_matcher("URI", exact=WEB_SPIFFE)], True, id="uri-exact"),
    pytest.param([san_matcher("URI", exact=DB_SPIFFE)], False, id="uri-exact-other"),
    pytest.param(
        [san_matcher("URI", prefix="spiffe://example.org/ns/default/")], True, id="uri-prefix"
    ),
    pytest.param([san_matcher("URI", prefix="spiffe://other.org/")], False, id="uri-prefix-other"),
    pytest.param([san_matcher("URI", suffix="/sa/web")], True, id="uri-suffix"),
    pytest.param([san_matcher("URI", suffix="/sa/db")], False, id="uri-suffix-other"),
    pytest.param(
        [san_matcher("URI", safe_regex={"regex": r"spiffe://example\.org/ns/[a-z]+/sa/web"})],
        True,
        id="uri-regex",
    ),
    # safe_regex matches the whole value: a partial match is no match.
    pytest.param(
        [san_matcher("URI", safe_regex={"regex": r"spiffe://example\.org/ns/default"})],
        False,
        id="uri-regex-partial",
    ),
    pytest.param([san_matcher("DNS", exact=WEB_DNS)], True, id="dns-exact"),
    pytest.param([san_matcher("DNS", exact="db.client.example.org")], False, id="dns-other"),
    pytest.param([san_matcher("IP_ADDRESS", exact=WEB_IP)], True, id="ip-exact"),
    pytest.param([san_matcher("IP_ADDRESS", exact="10.1.2.4")], False, id="ip-other"),
    # The type counts: the URI's value is no DNS name.
    pytest.param([san_matcher("DNS", exact=WEB_SPIFFE)], False, id="wrong-type"),
    # Several matchers: any one matching is enough.
    pytest.param(
        [san_matcher("URI", exact=DB_SPIFFE), san_matcher("DNS", exact=WEB_DNS)],
        True,
        id="any-of",
    ),
]


@pytest.mark.parametrize(("matchers", "accepted"), SAN_CASES)
def test_match_typed_subject_alt_names_on_the_client_certificate(
    start_proxy: StartProxy, pki: Pki, matchers: list[Json], accepted: bool
) -> None:
    """``validation_context.match_typed_subject_alt_names``: a client certificate none
    of whose SANs matches is refused, counted in ``ssl.fail_verify_san``."""
    proxy = serve_tls(
        start_proxy,
        downstream_tls(
            [pki.server_rsa],
            validation=validation_context(pki.ca_path, san_matchers=matchers),
            require_client_certificate=True,
        ),
    )
    before = proxy.stats()
    ctx = client_context(pki, cert=pki.client_web)
    if accepted:
        resp, _ = https_request(proxy.listener_address(), ctx, server_name=SERVER)
        assert resp.status == 200
        expected = {ssl_stat(proxy, "handshake"): 1, ssl_stat(proxy, "fail_verify_san"): 0}
    else:
        refused(proxy, ctx)
        expected = {ssl_stat(proxy, "handshake"): 0, ssl_stat(proxy, "fail_verify_san"): 1}
    stat_deltas(proxy, before, expected)


def test_crl_revokes_a_client_certificate(start_proxy: StartProxy, pki: Pki) -> None:
    """``validation_context.crl``: the revoked certificate (client_db) is refused
    (``ssl.fail_verify_error``), another of the same CA is served."""
    proxy = serve_tls(
        start_proxy,
        downstream_tls(
            [pki.server_rsa],
            validation=validation_context(pki.ca_path, crl=pki.crl),
            require_client_certificate=True,
        ),
    )
    before = proxy.stats()
    refused(proxy, client_context(pki, cert=pki.client_db))
    stat_deltas(
        proxy, before, {ssl_stat(proxy, "fail_verify_error"): 1, ssl_stat(proxy, "handshake"): 0}
    )
    before = proxy.stats()
    resp, _ = https_request(
        proxy.listener_address(), client_context(pki, cert=pki.client_web), server_name=SERVER
    )
    assert resp.status == 200
    stat_deltas(
        proxy, before, {ssl_stat(proxy, "handshake"): 1, ssl_stat(proxy, "fail_verify_error"): 0}
    )


# -- session resumption --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "client_max", "reused"),
    [
        pytest.param({}, None, True, id="tickets-tls13"),
        pytest.param({}, TLS12, True, id="tickets-tls12"),
        # Without tickets TLS 1.3 does not resume; TLS 1.2 still does, by session id.
        pytest.param(
            {"disable_stateless_session_resumption": True}, None, False, id="no-tickets-tls13"
        ),
        pytest.param(
            {"disable_stateless_session_resumption": True}, TLS12, True, id="no-tickets-tls12"
        ),
        pytest.param(
            {
                "disable_stateless_session_resumption": True,
                "disable_stateful_session_resumption": True,
            },
            TLS12,
            False,
            id="neither-tls12",
        ),
    ],
)
def test_session_resumption(
    start_proxy: StartProxy,
    pki: Pki,
    extra: Json,
    client_max: ssl.TLSVersion | None,
    reused: bool,
) -> None:
    """A second connection offering the first one's session resumes it
    (``ssl.session_reused``) unless the server's resumption is disabled; both are
    full handshakes for ``ssl.handshake``."""
    proxy = serve_tls(start_proxy, downstream_tls([pki.server_ecdsa], **extra))
    address = proxy.listener_address()
    ctx = client_context(pki, max_version=client_max)
    before = proxy.stats()
    resp, first = https_request(address, ctx, server_name=SERVER)
    assert resp.status == 200
    assert first.session is not None and not first.session_reused
    resp, second = https_request(address, ctx, server_name=SERVER, session=first.session)
    assert resp.status == 200
    assert second.session_reused is reused
    stat_deltas(
        proxy,
        before,
        {ssl_stat(proxy, "handshake"): 2, ssl_stat(proxy, "session_reused"): int(reused)},
    )


def test_tls13_session_resumes_after_a_connection_close_response(
    start_proxy: StartProxy, pki: Pki, tmp_path: Path
) -> None:
    """OpenSSL keeps a TLS 1.3 session only if the server ended the connection with
    ``close_notify``: after a ``Connection: close`` response the next connection
    must resume it."""
    proxy = serve_tls(start_proxy, downstream_tls([pki.server_ecdsa]))
    host, port = proxy.listener_address()
    request = f"GET / HTTP/1.1\r\nHost: {SERVER}\r\nConnection: close\r\n\r\n"
    session = tmp_path / "session.pem"

    def s_client(*args: str) -> str:
        done = subprocess.run(
            [
                "openssl",
                "s_client",
                "-connect",
                f"{host}:{port}",
                "-servername",
                SERVER,
                "-CAfile",
                str(pki.ca_path),
                "-tls1_3",
                "-ign_eof",
                *args,
            ],
            input=request,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return done.stdout + done.stderr

    first = s_client("-sess_out", str(session))
    assert "HTTP/1.1 200" in first, first
    assert "unexpected eof" not in first.lower(), first
    second = s_client("-sess_in", str(session))
    assert "HTTP/1.1 200" in second, second
    assert "Reused, TLSv1.3" in second, second


# -- envoyx alone: the TLS peer's identity in a Python filter -----------------------------


def test_python_filter_sees_the_downstream_peer_identity(
    start_envoyx: StartProxy,
    pki: Pki,
    http_upstream: HttpUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With mTLS, ``ctx.downstream_peer_identity`` is the client certificate's SPIFFE
    URI SAN; without a client certificate (optional validation) it is None."""
    monkeypatch.setenv(
        "PYTHONPATH",
        os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH")) if p),
    )
    probe = {
        "name": "probe",
        "typed_config": {
            "@type": "type.googleapis.com/xds.type.v3.TypedStruct",
            "type_url": "envoyx.filters.http.python",
            "value": {"module": "filters_fixtures.sample_filters", "class": "ContextProbe"},
        },
    }
    proxy = serve_tls(
        start_envoyx,
        downstream_tls([pki.server_rsa], validation=validation_context(pki.ca_path)),
        upstream=http_upstream,
        http_filters=[probe],
    )

    def identity(ctx: ssl.SSLContext) -> Any:
        resp, _ = https_request(proxy.listener_address(), ctx, "/peer", server_name=SERVER)
        assert resp.status == 200, resp
        headers = dict(json.loads(resp.body)["headers"])
        return json.loads(headers["x-ctx"])["downstream_peer_identity"]

    assert identity(client_context(pki, cert=pki.client_web)) == WEB_SPIFFE
    assert identity(client_context(pki)) is None
