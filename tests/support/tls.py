"""TLS for the tests: a throwaway PKI, TLS upstream servers, TLS clients and the
Envoy v3 ``envoy.transport_sockets.tls`` config pieces.

- :func:`shared_pki`: one set of keys and certificates per test session, made with
  ``cryptography`` in a temporary directory: a root CA, an intermediate CA, server
  certificates (RSA 2048 and ECDSA P-256), client certificates with SPIFFE URI SANs,
  a certificate of another ("rogue") CA, an expired one, and a CRL of the root that
  revokes one client certificate.
- :class:`TlsUpstream`: an HTTPS upstream (HTTP/1.1 on ``h11`` and, when ALPN picks
  ``h2``, HTTP/2 on the ``h2`` state machine) that echoes, beside the request, what
  its TLS handshake saw: the SNI, the ALPN protocol, the version and the client
  certificate's subject and SANs. Every handshake (failed ones too) is recorded.
- :func:`client_context`, :func:`https_request`, :func:`handshake`: the client side
  with Python's ``ssl`` (raw sockets, so that version, cipher, SNI, ALPN and the
  served certificate are all visible).
- :func:`downstream_tls`, :func:`upstream_tls`, :func:`validation_context`:
  ``transport_socket`` dicts in Envoy's own spelling.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import ipaddress
import json
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from support.bootstrap import (
    HCM,
    HCM_TYPE,
    ROUTER_TYPE,
    TCP_PROXY_TYPE,
    route,
    socket_address,
    virtual_host,
)
from support.clients import RawResponse, _Reader, read_response
from support.proxy import ProxyProcess
from support.upstreams import HttpUpstream, ReceivedRequest

Json = dict[str, Any]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

TLS_SOCKET = "envoy.transport_sockets.tls"
DOWNSTREAM_TLS_TYPE = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
)
UPSTREAM_TLS_TYPE = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
)
TLS_INSPECTOR = {
    "name": "envoy.filters.listener.tls_inspector",
    "typed_config": {
        "@type": "type.googleapis.com/"
        "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
    },
}
HTTP_INSPECTOR = {
    "name": "envoy.filters.listener.http_inspector",
    "typed_config": {
        "@type": "type.googleapis.com/"
        "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"
    },
}

WEB_SPIFFE = "spiffe://example.org/ns/default/sa/web"
DB_SPIFFE = "spiffe://example.org/ns/default/sa/db"
WEB_DNS = "web.client.example.org"
WEB_IP = "10.1.2.3"

_NOW = datetime.datetime.now(datetime.UTC)
_ONE_DAY = datetime.timedelta(days=1)


# -- certificates ------------------------------------------------------------------------


@dataclass(frozen=True)
class CertFiles:
    """A certificate (with its chain up to, not including, the root) and its key."""

    name: str
    cert_path: Path
    key_path: Path
    cert: x509.Certificate = field(repr=False)

    @property
    def cert_pem(self) -> str:
        return self.cert_path.read_text()

    @property
    def key_pem(self) -> str:
        return self.key_path.read_text()

    @property
    def common_name(self) -> str:
        return common_name(self.cert)

    @property
    def key_type(self) -> str:
        return key_type(self.cert)

    @property
    def serial(self) -> int:
        return self.cert.serial_number


def common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def key_type(cert: x509.Certificate) -> str:
    """``"rsa"`` or ``"ecdsa"``."""
    return "ecdsa" if isinstance(cert.public_key(), ec.EllipticCurvePublicKey) else "rsa"


def _key(kind: str) -> PrivateKey:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "envoyx tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _write_key(path: Path, key: PrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


class Authority:
    """A CA that signs leaves (and intermediates) into ``directory``."""

    def __init__(
        self,
        directory: Path,
        name: str,
        *,
        parent: Authority | None = None,
        kind: str = "ecdsa",
    ) -> None:
        self.directory = directory
        self.name = name
        self.key = _key(kind)
        self.parent = parent
        issuer_name = parent.cert.subject if parent else _name(name)
        issuer_key = parent.key if parent else self.key
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(issuer_name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_NOW - _ONE_DAY)
            .not_valid_after(_NOW + 3650 * _ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(issuer_key, hashes.SHA256())
        )
        self.cert_path = directory / f"{name}.crt"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def chain_pem(self) -> bytes:
        """This CA's certificate and its parents' below the root (for a leaf's chain)."""
        if self.parent is None:
            return b""
        return self.cert.public_bytes(serialization.Encoding.PEM) + self.parent.chain_pem()

    def issue(
        self,
        name: str,
        *,
        cn: str | None = None,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        uris: tuple[str, ...] = (),
        kind: str = "ecdsa",
        client: bool = False,
        server: bool = True,
        expired: bool = False,
        key_usage: bool = False,
    ) -> CertFiles:
        """A leaf signed by this CA. ``key_usage`` adds a critical key usage extension
        (digital signature, and key encipherment for RSA), as an X509-SVID has."""
        key = _key(kind)
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        sans += [x509.UniformResourceIdentifier(u) for u in uris]
        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        if expired:
            not_before, not_after = _NOW - 30 * _ONE_DAY, _NOW - 2 * _ONE_DAY
        else:
            not_before, not_after = _NOW - _ONE_DAY, _NOW + 365 * _ONE_DAY
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn or name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if key_usage:
            builder = builder.add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=kind == "rsa",
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path = self.directory / f"{name}.crt"
        key_path = self.directory / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + self.chain_pem())
        _write_key(key_path, key)
        return CertFiles(name, cert_path, key_path, cert)

    def crl(self, name: str, revoked: list[CertFiles]) -> Path:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(_NOW - _ONE_DAY)
            .next_update(_NOW + 30 * _ONE_DAY)
            # RFC 5280 makes the CRL number mandatory; webpki (envoyx) refuses a
            # CRL without one where BoringSSL (Envoy) takes it.
            .add_extension(x509.CRLNumber(1), critical=False)
        )
        for c in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(c.serial)
                .revocation_date(_NOW - _ONE_DAY)
                .build()
            )
        crl = builder.sign(self.key, hashes.SHA256())
        path = self.directory / f"{name}.crl.pem"
        path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        return path


@dataclass(frozen=True)
class Pki:
    """Everything the TLS tests use; paths live for the whole session.

    Server certificates carry the DNS SANs ``server.example.com``, ``*.example.com``,
    ``localhost`` and the IP SAN ``127.0.0.1``; each has a distinct common name so a
    client can tell which one it was served.
    """

    directory: Path
    root: Authority
    intermediate: Authority
    rogue: Authority
    server_rsa: CertFiles  # RSA 2048, CN server-rsa
    server_ecdsa: CertFiles  # P-256, CN server-ecdsa
    server_chain: CertFiles  # issued by the intermediate; the file holds leaf + intermediate
    api: CertFiles  # CN api, DNS api.example.com
    wildcard: CertFiles  # CN wildcard, DNS *.example.com
    fallback: CertFiles  # CN fallback, DNS fallback.test
    upstream: CertFiles  # CN upstream: backend/a/b.example.com, 127.0.0.1
    passthrough: CertFiles  # CN passthrough-upstream, DNS passthrough.example.com
    rogue_server: CertFiles  # signed by the rogue CA (untrusted)
    expired_server: CertFiles  # signed by the root, expired
    client_web: CertFiles  # URI WEB_SPIFFE, DNS WEB_DNS, IP WEB_IP
    client_db: CertFiles  # URI DB_SPIFFE; revoked by ``crl``
    client_rogue: CertFiles  # URI WEB_SPIFFE, signed by the rogue CA
    envoy_client: CertFiles  # the proxy's own client certificate towards upstreams
    crl: Path  # the root's CRL: revokes client_db

    @property
    def ca_path(self) -> Path:
        return self.root.cert_path


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    root = Authority(directory, "root-ca")
    intermediate = Authority(directory, "intermediate-ca", parent=root)
    rogue = Authority(directory, "rogue-ca")
    server_sans: Json = {
        "dns": ("server.example.com", "*.example.com", "localhost"),
        "ips": ("127.0.0.1",),
    }
    client_db = root.issue(
        "client-db", uris=(DB_SPIFFE,), client=True, server=False, cn="client-db"
    )
    return Pki(
        directory=directory,
        root=root,
        intermediate=intermediate,
        rogue=rogue,
        server_rsa=root.issue("server-rsa", kind="rsa", **server_sans),
        server_ecdsa=root.issue("server-ecdsa", kind="ecdsa", **server_sans),
        server_chain=intermediate.issue("server-chain", **server_sans),
        api=root.issue("api", dns=("api.example.com",)),
        wildcard=root.issue("wildcard", dns=("*.example.com",)),
        fallback=root.issue("fallback", dns=("fallback.test",), ips=("127.0.0.1",)),
        upstream=root.issue(
            "upstream",
            dns=("backend.example.com", "a.example.com", "b.example.com"),
            ips=("127.0.0.1",),
        ),
        passthrough=root.issue("passthrough-upstream", dns=("passthrough.example.com",)),
        rogue_server=rogue.issue("rogue-server", **server_sans),
        expired_server=root.issue("expired-server", expired=True, **server_sans),
        client_web=root.issue(
            "client-web",
            uris=(WEB_SPIFFE,),
            dns=(WEB_DNS,),
            ips=(WEB_IP,),
            client=True,
            server=False,
        ),
        client_db=client_db,
        client_rogue=rogue.issue("client-rogue", uris=(WEB_SPIFFE,), client=True, server=False),
        envoy_client=root.issue(
            "envoy-client",
            uris=("spiffe://example.org/ns/edge/sa/envoy",),
            client=True,
            server=False,
        ),
        crl=root.crl("root", [client_db]),
    )


_pki_lock = threading.Lock()
_pki: Pki | None = None


def shared_pki() -> Pki:
    """One :class:`Pki` per process (every TLS test module shares it); its directory is
    removed when the process exits."""
    global _pki
    with _pki_lock:
        if _pki is None:
            directory = Path(tempfile.mkdtemp(prefix="envoyx-pki-"))
            atexit.register(shutil.rmtree, directory, True)
            _pki = make_pki(directory)
        return _pki


# -- Envoy config pieces -----------------------------------------------------------------


def data_source(path: Path, *, inline: bool = False) -> Json:
    return {"inline_string": path.read_text()} if inline else {"filename": str(path)}


def tls_certificate(cert: CertFiles, *, inline: bool = False) -> Json:
    return {
        "certificate_chain": data_source(cert.cert_path, inline=inline),
        "private_key": data_source(cert.key_path, inline=inline),
    }


def validation_context(
    ca: Path | None = None,
    *,
    san_matchers: list[Json] | None = None,
    crl: Path | None = None,
    **extra: Any,
) -> Json:
    vc: Json = {}
    if ca is not None:
        vc["trusted_ca"] = {"filename": str(ca)}
    if san_matchers is not None:
        vc["match_typed_subject_alt_names"] = san_matchers
    if crl is not None:
        vc["crl"] = {"filename": str(crl)}
    vc.update(extra)
    return vc


SPIFFE_VALIDATOR = "envoy.tls.cert_validator.spiffe"
SPIFFE_VALIDATOR_TYPE = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig"
)


def spiffe_validation_context(
    trust_domains: dict[str, Path], *, san_matchers: list[Json] | None = None, **extra: Any
) -> Json:
    """A ``validation_context`` with Envoy's SPIFFE validator: each trust domain's
    bundle (a PEM file of CAs) by domain name."""
    vc: Json = {
        "custom_validator_config": {
            "name": SPIFFE_VALIDATOR,
            "typed_config": {
                "@type": SPIFFE_VALIDATOR_TYPE,
                "trust_domains": [
                    {"name": name, "trust_bundle": {"filename": str(path)}}
                    for name, path in trust_domains.items()
                ],
            },
        }
    }
    if san_matchers is not None:
        vc["match_typed_subject_alt_names"] = san_matchers
    vc.update(extra)
    return vc


def san_matcher(san_type: str, **matcher: Any) -> Json:
    """``{san_type: URI, matcher: {exact: ...}}`` (StringMatcher keys as keyword args)."""
    return {"san_type": san_type, "matcher": matcher}


def common_tls_context(
    certs: list[CertFiles] | None = None,
    *,
    inline: bool = False,
    alpn: list[str] | None = None,
    params: Json | None = None,
    validation: Json | None = None,
) -> Json:
    ctc: Json = {}
    if certs:
        ctc["tls_certificates"] = [tls_certificate(c, inline=inline) for c in certs]
    if alpn is not None:
        ctc["alpn_protocols"] = alpn
    if params is not None:
        ctc["tls_params"] = params
    if validation is not None:
        ctc["validation_context"] = validation
    return ctc


def downstream_tls(
    certs: list[CertFiles],
    *,
    inline: bool = False,
    alpn: list[str] | None = None,
    params: Json | None = None,
    validation: Json | None = None,
    **extra: Any,
) -> Json:
    """A ``transport_socket`` terminating TLS (``DownstreamTlsContext``); ``extra``
    goes on the context itself (``require_client_certificate``, ...)."""
    ctx: Json = {
        "@type": DOWNSTREAM_TLS_TYPE,
        "common_tls_context": common_tls_context(
            certs, inline=inline, alpn=alpn, params=params, validation=validation
        ),
    }
    ctx.update(extra)
    return {"name": TLS_SOCKET, "typed_config": ctx}


def upstream_tls(
    *,
    sni: str | None = None,
    client_cert: CertFiles | None = None,
    alpn: list[str] | None = None,
    params: Json | None = None,
    validation: Json | None = None,
    **extra: Any,
) -> Json:
    """A cluster ``transport_socket`` originating TLS (``UpstreamTlsContext``)."""
    ctx: Json = {
        "@type": UPSTREAM_TLS_TYPE,
        "common_tls_context": common_tls_context(
            [client_cert] if client_cert else None,
            alpn=alpn,
            params=params,
            validation=validation,
        ),
    }
    if sni is not None:
        ctx["sni"] = sni
    ctx.update(extra)
    return {"name": TLS_SOCKET, "typed_config": ctx}


def listener_stat(address: tuple[str, int], name: str) -> str:
    """Envoy's per-listener stat name: ``listener.127.0.0.1_<port>.<name>``."""
    return f"listener.{address[0]}_{address[1]}.{name}"


# -- clients -----------------------------------------------------------------------------


def client_context(
    pki: Pki | None = None,
    *,
    ca: Path | None = None,
    cert: CertFiles | None = None,
    alpn: list[str] | None = None,
    min_version: ssl.TLSVersion | None = None,
    max_version: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
    verify: bool = True,
) -> ssl.SSLContext:
    """A client ``SSLContext`` trusting the PKI's root (or ``ca``), hostname checked."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if verify:
        cafile = ca or (pki.ca_path if pki else None)
        assert cafile is not None, "client_context needs a pki or a ca"
        ctx.load_verify_locations(cafile=str(cafile))
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert_path), str(cert.key_path))
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    if min_version is not None:
        ctx.minimum_version = min_version
    if max_version is not None:
        ctx.maximum_version = max_version
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    return ctx


@dataclass
class Handshake:
    """What a client saw of a TLS handshake."""

    version: str | None
    cipher: str | None
    alpn: str | None
    peer_cn: str | None
    peer_key_type: str | None
    session_reused: bool
    session: ssl.SSLSession | None = None


def _handshake_of(sock: ssl.SSLSocket) -> Handshake:
    der = sock.getpeercert(binary_form=True)
    cert = x509.load_der_x509_certificate(der) if der else None
    cipher = sock.cipher()
    return Handshake(
        version=sock.version(),
        cipher=cipher[0] if cipher else None,
        alpn=sock.selected_alpn_protocol(),
        peer_cn=common_name(cert) if cert else None,
        peer_key_type=key_type(cert) if cert else None,
        session_reused=sock.session_reused,
        session=sock.session,
    )


@contextlib.contextmanager
def tls_connect(
    address: tuple[str, int],
    ctx: ssl.SSLContext,
    *,
    server_name: str | None = None,
    session: ssl.SSLSession | None = None,
    source: tuple[str, int] | None = None,
    timeout: float = 5.0,
) -> Iterator[ssl.SSLSocket]:
    """A TLS connection (handshake done). ``server_name`` is the SNI and the name the
    certificate is checked against; without it the IP address is checked (no SNI)."""
    raw = socket.create_connection(address, timeout=timeout, source_address=source)
    try:
        sock = ctx.wrap_socket(raw, server_hostname=server_name or address[0], session=session)
    except BaseException:
        raw.close()
        raise
    with sock:
        yield sock


def handshake(
    address: tuple[str, int],
    ctx: ssl.SSLContext,
    *,
    server_name: str | None = None,
    timeout: float = 5.0,
) -> Handshake:
    """Only a handshake; the connection is closed at once."""
    with tls_connect(address, ctx, server_name=server_name, timeout=timeout) as sock:
        return _handshake_of(sock)


def request_bytes(path: str, host: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"host: {host}", "connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def https_request(
    address: tuple[str, int],
    ctx: ssl.SSLContext,
    path: str = "/",
    *,
    server_name: str | None = None,
    host: str | None = None,
    headers: dict[str, str] | None = None,
    session: ssl.SSLSession | None = None,
    source: tuple[str, int] | None = None,
    timeout: float = 5.0,
) -> tuple[RawResponse, Handshake]:
    """One HTTP/1.1 GET (``connection: close``) over a fresh TLS connection; returns
    the response and the handshake (``session`` read after the response, so that a
    TLS 1.3 ticket has arrived)."""
    with tls_connect(
        address, ctx, server_name=server_name, session=session, source=source, timeout=timeout
    ) as sock:
        sock.sendall(request_bytes(path, host or server_name or "localhost", headers))
        resp = read_response(_Reader(sock))
        return resp, _handshake_of(sock)


def h2_request(
    address: tuple[str, int],
    ctx: ssl.SSLContext,
    path: str = "/",
    *,
    server_name: str | None = None,
    authority: str = "example.test",
    timeout: float = 5.0,
) -> tuple[int, bytes, Handshake]:
    """One HTTP/2 GET over a fresh TLS connection offering ALPN ``h2`` alone (httpx
    always offers ``http/1.1`` first); returns the status, the body and the handshake."""
    ctx.set_alpn_protocols(["h2"])
    conn = h2.connection.H2Connection(
        config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    with tls_connect(address, ctx, server_name=server_name, timeout=timeout) as sock:
        hs = _handshake_of(sock)
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        conn.send_headers(
            stream,
            [(":method", "GET"), (":scheme", "https"), (":authority", authority), (":path", path)],
            end_stream=True,
        )
        sock.sendall(conn.data_to_send())
        status, chunks, done = 0, [], False
        while not done:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed before the HTTP/2 response ended")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    chunks.append(event.data)
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.StreamReset):
                    raise ConnectionError(f"stream reset with error code {event.error_code}")
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                    done = True
            sock.sendall(conn.data_to_send())
    return status, b"".join(chunks), hs


def refused_by_peer(fn: Any) -> str:
    """Run ``fn`` (a TLS exchange) expecting the peer to refuse it: returns the error
    the client saw; fails if ``fn`` completed."""
    try:
        result = fn()
    except (ssl.SSLError, ConnectionError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    raise AssertionError(f"the TLS exchange succeeded: {result!r}")


# -- upstream ----------------------------------------------------------------------------


@dataclass
class ServerHandshake:
    """What :class:`TlsUpstream` saw of one connection's TLS handshake."""

    sni: str | None
    alpn: str | None = None
    version: str | None = None
    peer_subject: str | None = None
    peer_sans: list[str] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> Json:
        return {
            "sni": self.sni,
            "alpn": self.alpn,
            "version": self.version,
            "peer_subject": self.peer_subject,
            "peer_sans": self.peer_sans,
        }


class TlsUpstream(HttpUpstream):
    """An HTTPS upstream: TLS with ``cert``, then HTTP/1.1 (``h11``) or, when ALPN
    picked ``h2``, HTTP/2. Optionally asks for (``client_ca``) and requires
    (``require_client_cert``) a client certificate.

    Its JSON echo is :class:`support.upstreams.ReceivedRequest`'s plus ``"tls"``: the
    connection's :class:`ServerHandshake`. ``handshakes`` lists every handshake,
    failed ones with their ``error``.
    """

    def __init__(
        self,
        name: str,
        cert: CertFiles,
        *,
        alpn: list[str] | None = None,
        client_ca: Path | None = None,
        require_client_cert: bool = False,
    ) -> None:
        super().__init__(name)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert.cert_path), str(cert.key_path))
        if alpn:
            ctx.set_alpn_protocols(alpn)
        if client_ca is not None:
            ctx.load_verify_locations(cafile=str(client_ca))
            ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        ctx.sni_callback = self._on_sni
        self.ssl_context = ctx
        self.handshakes: list[ServerHandshake] = []
        self._local = threading.local()

    def _on_sni(self, sslobj: Any, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        self._local.sni = server_name

    def handshakes_since(self, n: int) -> list[ServerHandshake]:
        with self._lock:
            return self.handshakes[n:]

    @property
    def successful_handshakes(self) -> list[ServerHandshake]:
        with self._lock:
            return [h for h in self.handshakes if h.error is None]

    def _serve(self, sock: socket.socket) -> None:
        raw = sock
        self._local.sni = None
        raw.settimeout(10)
        try:
            tls = self.ssl_context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            with self._lock:
                self.handshakes.append(ServerHandshake(sni=self._local.sni, error=str(exc)))
                self._conns.discard(raw)
            raw.close()
            return
        info = ServerHandshake(
            sni=self._local.sni, alpn=tls.selected_alpn_protocol(), version=tls.version()
        )
        peer = tls.getpeercert(binary_form=True)
        if peer:
            cert = x509.load_der_x509_certificate(peer)
            info.peer_subject = cert.subject.rfc4514_string()
            with contextlib.suppress(x509.ExtensionNotFound):
                sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                info.peer_sans = [str(v.value) for v in sans.value]
        with self._lock:
            self.handshakes.append(info)
            # stop() shuts down what it finds here: the TLS socket now owns the fd.
            self._conns.discard(raw)
            self._conns.add(tls)
        self._local.info = info
        try:
            if info.alpn == "h2":
                self._serve_h2(tls)
            else:
                super()._serve(tls)
        finally:
            with self._lock:
                self._conns.discard(tls)
            tls.close()

    def _echo_body(self, req: ReceivedRequest) -> bytes:
        info: ServerHandshake | None = getattr(self._local, "info", None)
        body = req.to_json()
        body["tls"] = info.to_json() if info else None
        return json.dumps(body, sort_keys=True).encode()

    def _serve_h2(self, sock: ssl.SSLSocket) -> None:
        conn_id = self._next_connection_id()
        config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        conn = h2.connection.H2Connection(config=config)
        conn.initiate_connection()
        streams: dict[int, tuple[list[tuple[str, str]], int]] = {}
        n = 0
        sock.settimeout(120)
        try:
            sock.sendall(conn.data_to_send())
            while data := sock.recv(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        hdrs = [(str(k), str(v)) for k, v in event.headers]
                        streams[event.stream_id] = (hdrs, 0)
                    elif isinstance(event, h2.events.DataReceived):
                        hdrs, length = streams[event.stream_id]
                        streams[event.stream_id] = (hdrs, length + len(event.data))
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.StreamEnded):
                        n += 1
                        hdrs, length = streams.pop(event.stream_id)
                        self._answer_h2(conn, event.stream_id, hdrs, length, conn_id, n)
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        return
                sock.sendall(conn.data_to_send())
        except (OSError, ssl.SSLError):
            return

    def _answer_h2(
        self,
        conn: h2.connection.H2Connection,
        stream: int,
        headers: list[tuple[str, str]],
        body_length: int,
        conn_id: int,
        n: int,
    ) -> None:
        pseudo = dict(h for h in headers if h[0].startswith(":"))
        req = ReceivedRequest(
            upstream=self.name,
            method=pseudo.get(":method", ""),
            path=pseudo.get(":path", ""),
            http_version="2",
            headers=[h for h in headers if not h[0].startswith(":")]
            + [("host", pseudo.get(":authority", ""))],
            body_length=body_length,
            body_sha256="",
            connection_id=conn_id,
            request_on_connection=n,
        )
        self._record(req)
        echo = self._echo_body(req)
        conn.send_headers(
            stream,
            [
                (":status", "200"),
                ("content-type", "application/json"),
                ("content-length", str(len(echo))),
                ("x-upstream", self.name),
            ],
        )
        conn.send_data(stream, echo, end_stream=True)


# -- listeners ---------------------------------------------------------------------------


def hcm_config(
    virtual_hosts: list[Json],
    *,
    stat_prefix: str = "ingress_http",
    http_filters: list[Json] | None = None,
    codec_type: str = "AUTO",
    **extra: Any,
) -> Json:
    """An ``http_connection_manager`` network filter (ends with the router)."""
    filters = [
        *(http_filters or []),
        {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}},
    ]
    hcm: Json = {
        "@type": HCM_TYPE,
        "stat_prefix": stat_prefix,
        "codec_type": codec_type,
        "route_config": {"name": "local_route", "virtual_hosts": virtual_hosts},
        "http_filters": filters,
    }
    hcm.update(extra)
    return {"name": HCM, "typed_config": hcm}


def direct_chain(
    body: str,
    *,
    match: Json | None = None,
    transport_socket: Json | None = None,
    stat_prefix: str | None = None,
) -> Json:
    """A filter chain named ``body`` whose HTTP connection manager answers every
    request ``200 <body>`` itself, so a client sees which chain served it."""
    chain: Json = {
        "name": body,
        "filters": [
            hcm_config(
                [virtual_host("all", ["*"], [route({"prefix": "/"}, direct=(200, body))])],
                stat_prefix=stat_prefix or body.replace("-", "_"),
            )
        ],
    }
    if match is not None:
        chain["filter_chain_match"] = match
    if transport_socket is not None:
        chain["transport_socket"] = transport_socket
    return chain


def tcp_proxy_chain(cluster_name: str, *, match: Json | None = None) -> Json:
    chain: Json = {
        "name": f"tcp-{cluster_name}",
        "filters": [
            {
                "name": "envoy.filters.network.tcp_proxy",
                "typed_config": {
                    "@type": TCP_PROXY_TYPE,
                    "stat_prefix": f"tcp_{cluster_name}",
                    "cluster": cluster_name,
                },
            }
        ],
    }
    if match is not None:
        chain["filter_chain_match"] = match
    return chain


def listener(
    port: int,
    chains: list[Json],
    *,
    name: str = "main",
    listener_filters: list[Json] | None = None,
    default_chain: Json | None = None,
    **extra: Any,
) -> Json:
    lis: Json = {
        "name": name,
        "address": socket_address("127.0.0.1", port),
        "filter_chains": chains,
    }
    if listener_filters is not None:
        lis["listener_filters"] = listener_filters
    if default_chain is not None:
        lis["default_filter_chain"] = default_chain
    lis.update(extra)
    return lis


def https_listener(
    port: int,
    transport_socket: Json,
    *,
    cluster_name: str | None = None,
    body: str = "hello",
    http_filters: list[Json] | None = None,
    **hcm_extra: Any,
) -> Json:
    """One filter chain terminating TLS; its HTTP connection manager (stat prefix
    ``ingress_http``) routes everything to ``cluster_name``, or answers ``200 <body>``."""
    r = (
        route({"prefix": "/"}, cluster=cluster_name)
        if cluster_name
        else route({"prefix": "/"}, direct=(200, body))
    )
    chain = {
        "filters": [
            hcm_config([virtual_host("all", ["*"], [r])], http_filters=http_filters, **hcm_extra)
        ],
        "transport_socket": transport_socket,
    }
    return listener(port, [chain])


def stat_deltas(proxy: ProxyProcess, before: dict[str, int], expected: dict[str, int]) -> None:
    """Assert that each stat moved by exactly its expected value since ``before``
    (polled for a moment: Envoy charges some stats after the client saw the end)."""
    seen = proxy.wait_stats(expected, before)
    assert seen == expected, f"{proxy.kind}: stat deltas {seen}, expected {expected}"


def openssl_handshake(
    address: tuple[str, int],
    *,
    ca: Path,
    server_name: str | None = None,
    sigalgs: str | None = None,
    tls13: bool = True,
) -> tuple[str, str]:
    """A handshake by ``openssl s_client`` (whose signature algorithms can be chosen,
    which Python's ``ssl`` cannot); returns the served leaf's common name and the
    verification result (``"0 (ok)"`` when the chain verified against ``ca``)."""
    cmd = [
        "openssl",
        "s_client",
        "-connect",
        f"{address[0]}:{address[1]}",
        "-CAfile",
        str(ca),
    ]
    if server_name is not None:
        cmd += ["-servername", server_name]
    else:
        cmd += ["-noservername"]
    if sigalgs is not None:
        cmd += ["-sigalgs", sigalgs]
    if tls13:
        cmd.append("-tls1_3")
    out = subprocess.run(cmd, input=b"", capture_output=True, timeout=10).stdout.decode()
    cn = re.search(r"^subject=.*CN = ([^,\n]+)$", out, re.MULTILINE)
    verify = re.search(r"Verify return code: (.*)$", out, re.MULTILINE)
    assert cn and verify, f"openssl s_client printed no certificate:\n{out[-2000:]}"
    return cn.group(1).strip(), verify.group(1).strip()


@dataclass(frozen=True)
class LoadResult:
    """One request of :class:`HttpsLoad`: when, its status, the certificate served."""

    started: float
    ended: float
    status: int | None
    peer_cn: str | None
    error: str | None


class HttpsLoad:
    """``threads`` threads doing HTTPS GETs, each on a new connection (a full
    handshake), until the ``with`` block ends; a request fails unless it gets 200
    from the upstream named ``upstream``."""

    def __init__(
        self,
        address: tuple[str, int],
        ctx: ssl.SSLContext,
        server_name: str,
        *,
        threads: int = 4,
        upstream: str = "a",
        timeout: float = 10.0,
    ) -> None:
        self.address = address
        self.ctx = ctx
        self.server_name = server_name
        self.threads = threads
        self.upstream = upstream
        self.timeout = timeout
        self.results: list[LoadResult] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="tls-load")
        self._futures: list[Any] = []

    def __enter__(self) -> HttpsLoad:
        self._futures = [self._pool.submit(self._run) for _ in range(self.threads)]
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for f in self._futures:
            f.result(timeout=self.timeout)
        self._pool.shutdown()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                resp, hs = https_request(
                    self.address, self.ctx, "/load", server_name=self.server_name, host="x"
                )
                ok = resp.status == 200 and resp.header("x-upstream") == self.upstream
                result = LoadResult(
                    started,
                    time.monotonic(),
                    resp.status,
                    hs.peer_cn,
                    None if ok else f"status {resp.status}",
                )
            except Exception as exc:
                result = LoadResult(
                    started, time.monotonic(), None, None, f"{type(exc).__name__}: {exc}"
                )
            with self._lock:
                self.results.append(result)

    def snapshot(self) -> list[LoadResult]:
        with self._lock:
            return list(self.results)
