"""Bad input on and for a TLS listener: what is not TLS, a ClientHello that never
completes, and TLS configuration that cannot work.

Every test takes ``start_proxy``: it runs against envoyx and, as a second
parametrization, against the real Envoy 1.40 with the same bootstrap, so what is
asserted is Envoy's behaviour.

- Bytes that are not TLS (a plain HTTP request, random bytes) on a TLS port: the
  connection is closed without an HTTP answer and counted as
  ``listener.<addr>.ssl.connection_error``; the next TLS request is served.
- A ClientHello that never completes (a TLS record header announcing more than is
  sent): with the ``tls_inspector`` the connection is closed at
  ``listener_filters_timeout`` (``downstream_pre_cx_timeout``); without a listener
  filter, at the chain's ``transport_socket_connect_timeout``
  (``downstream_cx_transport_socket_connect_timeout``). Neither is an SSL error.
- Configuration: a private key that does not match its certificate, an unsupported
  cipher suite or ECDH curve, an unreadable certificate file: the proxy refuses to
  start (non-zero exit) and says why; envoyx's message names the field path. An
  expired certificate is no configuration error: the proxy starts and serves it, and
  a client that verifies it refuses it.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from support.bootstrap import bootstrap
from support.proxy import EnvoyxProcess, ProxyProcess
from support.tls import (
    TLS_INSPECTOR,
    CertFiles,
    Pki,
    client_context,
    downstream_tls,
    https_listener,
    https_request,
    listener_stat,
    refused_by_peer,
    shared_pki,
    stat_deltas,
)
from support.wait import free_port

StartProxy = Callable[..., ProxyProcess]
Json = dict[str, Any]

SERVER = "server.example.com"  # a DNS SAN of the PKI's server certificates
# The envoyx field path of the first certificate of the first chain's TLS context.
CERT_PATH = "filter_chains[0].transport_socket.typed_config.common_tls_context.tls_certificates[0]"
TIMEOUT_S = 0.5  # listener_filters_timeout / transport_socket_connect_timeout
# A TLS handshake record announcing 512 bytes, of which only the start is sent.
PARTIAL_CLIENT_HELLO = b"\x16\x03\x01\x02\x00" + b"\x01\x00\x01\xfc\x03\x03" + bytes(16)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return shared_pki()


def tls_proxy(
    start: StartProxy,
    transport_socket: Json,
    *,
    wait_ready: bool = True,
    chain_extra: Json | None = None,
    **listener_extra: Any,
) -> ProxyProcess:
    """One TLS listener answering ``200 hello`` itself."""
    lis = https_listener(free_port(), transport_socket)
    lis["filter_chains"][0].update(chain_extra or {})
    lis.update(listener_extra)
    doc = bootstrap(admin_port=free_port(), listeners=[lis], clusters=[])
    return start(doc, wait_ready=wait_ready)


def stat(proxy: ProxyProcess, name: str) -> str:
    return listener_stat(proxy.listener_address(), name)


def assert_serves(proxy: ProxyProcess, pki: Pki) -> None:
    """A good TLS request right now is answered."""
    assert proxy.running, f"{proxy.kind} died; log:\n{proxy.log_text()}"
    resp, hs = https_request(proxy.listener_address(), client_context(pki), server_name=SERVER)
    assert (resp.status, resp.body, hs.peer_cn) == (200, b"hello", "server-ecdsa")


def closed_after(address: tuple[str, int], data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` and read until the proxy closes; returns what it sent back.
    Fails if the connection is still open after ``timeout``."""
    received = b""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise AssertionError(f"still open after {timeout}s; got {received!r}") from None
    return received


def refused_at_start(proxy: ProxyProcess) -> str:
    """The proxy exits non-zero without becoming ready; returns its log."""
    rc = proxy.wait_exit(20)
    log = proxy.log_text()
    assert rc != 0, f"{proxy.kind} exited with 0; log:\n{log}"
    return log


# -- bytes that are not TLS ----------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nhost: example.com\r\n\r\n",
        bytes.fromhex("9c3a51e07f22d4b8a6105e3fc7d2a94b") * 16,
    ],
    ids=["plain-http", "random-bytes"],
)
def test_not_tls_on_a_tls_port_is_closed_and_counted(
    start_proxy: StartProxy, pki: Pki, data: bytes
) -> None:
    """The handshake fails: the connection is closed without any HTTP answer and
    counted as ``ssl.connection_error``; the listener goes on serving."""
    proxy = tls_proxy(start_proxy, downstream_tls([pki.server_ecdsa]))
    before = proxy.stats()
    received = closed_after(proxy.listener_address(), data)
    assert b"HTTP/" not in received, received
    stat_deltas(
        proxy, before, {stat(proxy, "ssl.connection_error"): 1, stat(proxy, "ssl.handshake"): 0}
    )
    assert_serves(proxy, pki)


# -- a ClientHello that never completes ---------------------------------------------------


def test_incomplete_client_hello_is_closed_at_listener_filters_timeout(
    start_proxy: StartProxy, pki: Pki
) -> None:
    """With the ``tls_inspector``, a ClientHello that stops half-way is closed once
    ``listener_filters_timeout`` passes (``downstream_pre_cx_timeout``), before any
    TLS is attempted (no ``ssl.connection_error``)."""
    proxy = tls_proxy(
        start_proxy,
        downstream_tls([pki.server_ecdsa]),
        listener_filters=[TLS_INSPECTOR],
        listener_filters_timeout=f"{TIMEOUT_S}s",
    )
    before = proxy.stats()
    t0 = time.monotonic()
    assert closed_after(proxy.listener_address(), PARTIAL_CLIENT_HELLO) == b""
    elapsed = time.monotonic() - t0
    assert TIMEOUT_S * 0.8 <= elapsed < TIMEOUT_S + 2, elapsed
    stat_deltas(
        proxy,
        before,
        {stat(proxy, "downstream_pre_cx_timeout"): 1, stat(proxy, "ssl.connection_error"): 0},
    )
    assert_serves(proxy, pki)


def test_incomplete_client_hello_is_closed_at_transport_socket_connect_timeout(
    start_proxy: StartProxy, pki: Pki
) -> None:
    """Without a listener filter, the chain's ``transport_socket_connect_timeout``
    bounds the handshake: the connection is closed when it passes and counted as
    ``downstream_cx_transport_socket_connect_timeout`` (not as an SSL error)."""
    proxy = tls_proxy(
        start_proxy,
        downstream_tls([pki.server_ecdsa]),
        chain_extra={"transport_socket_connect_timeout": f"{TIMEOUT_S}s"},
    )
    before = proxy.stats()
    t0 = time.monotonic()
    assert closed_after(proxy.listener_address(), PARTIAL_CLIENT_HELLO) == b""
    elapsed = time.monotonic() - t0
    assert TIMEOUT_S * 0.8 <= elapsed < TIMEOUT_S + 2, elapsed
    stat_deltas(
        proxy,
        before,
        {
            stat(proxy, "downstream_cx_transport_socket_connect_timeout"): 1,
            stat(proxy, "ssl.connection_error"): 0,
            stat(proxy, "downstream_pre_cx_timeout"): 0,
        },
    )
    assert_serves(proxy, pki)


# -- configuration ---------------------------------------------------------------------------


def mismatched(cert: CertFiles, key_of: CertFiles) -> Json:
    return {
        "certificate_chain": {"filename": str(cert.cert_path)},
        "private_key": {"filename": str(key_of.key_path)},
    }


@pytest.mark.parametrize("key_of", ["api", "server_rsa"], ids=["same-key-type", "rsa-key"])
def test_private_key_not_matching_its_certificate_is_refused(
    start_proxy: StartProxy, pki: Pki, key_of: str
) -> None:
    """The ECDSA certificate with the key of another ECDSA certificate, or an RSA key:
    the proxy refuses to start; envoyx names the certificate's field path."""
    ts = downstream_tls([pki.server_ecdsa])
    ts["typed_config"]["common_tls_context"]["tls_certificates"] = [
        mismatched(pki.server_ecdsa, getattr(pki, key_of))
    ]
    proxy = tls_proxy(start_proxy, ts, wait_ready=False)
    log = refused_at_start(proxy)
    # Envoy: "Failed to load private key from <path>, Cause: ...KEY_VALUES_MISMATCH"
    assert "private key" in log.lower(), log
    if isinstance(proxy, EnvoyxProcess):
        assert f"{CERT_PATH}: " in log, log


def test_expired_certificate_is_served_and_flagged(start_proxy: StartProxy, pki: Pki) -> None:
    """An expired certificate in the configuration is no error (Envoy logs nothing
    about it either): the proxy starts and serves it; a verifying client refuses it,
    one that does not verify is answered. What Envoy shows of it is the gauge
    ``server.days_until_first_cert_expiring``: 0 (for a valid certificate, the days
    it has left)."""
    proxy = tls_proxy(start_proxy, downstream_tls([pki.expired_server]))
    error = refused_by_peer(
        lambda: https_request(proxy.listener_address(), client_context(pki), server_name=SERVER)
    )
    assert "certificate has expired" in error, error
    resp, hs = https_request(
        proxy.listener_address(), client_context(verify=False), server_name=SERVER
    )
    assert (resp.status, hs.peer_cn) == (200, "expired-server")
    gauge = proxy.stats().get("server.days_until_first_cert_expiring")
    assert gauge == 0, f"{proxy.kind}: server.days_until_first_cert_expiring is {gauge}"


@pytest.mark.parametrize(
    ("param", "value"),
    [("cipher_suites", "DHE-RSA-AES128-GCM-SHA256"), ("ecdh_curves", "X448")],
)
def test_unsupported_cipher_or_curve_is_refused(
    start_proxy: StartProxy, pki: Pki, param: str, value: str
) -> None:
    """A cipher suite or curve that exists but is not supported: refused at start,
    the name in the message."""
    good = {"cipher_suites": "ECDHE-ECDSA-AES128-GCM-SHA256", "ecdh_curves": "P-256"}[param]
    ts = downstream_tls([pki.server_ecdsa], params={param: [good, value]})
    proxy = tls_proxy(start_proxy, ts, wait_ready=False)
    log = refused_at_start(proxy)
    assert value in log, log
    if isinstance(proxy, EnvoyxProcess):
        assert f"common_tls_context.tls_params.{param}[1]" in log, log


@pytest.mark.parametrize("what", ["missing", "directory"])
def test_unreadable_certificate_file_is_refused(
    start_proxy: StartProxy, pki: Pki, what: str, tmp_path: Path
) -> None:
    """A ``certificate_chain`` file that cannot be read (missing, or a directory):
    refused at start, naming the file; envoyx names the field path too."""
    path = tmp_path / "cert.pem"
    if what == "directory":
        path.mkdir()
    ts = downstream_tls([pki.server_ecdsa])
    ts["typed_config"]["common_tls_context"]["tls_certificates"][0]["certificate_chain"] = {
        "filename": str(path)
    }
    proxy = tls_proxy(start_proxy, ts, wait_ready=False)
    log = refused_at_start(proxy)
    assert str(path) in log, log
    if isinstance(proxy, EnvoyxProcess):
        assert f"{CERT_PATH}.certificate_chain" in log, log
