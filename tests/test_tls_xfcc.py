"""What a TLS connection tells the upstream and the access log, against Envoy 1.40:
``x-forwarded-client-cert`` under each ``forward_client_cert_details`` mode (with
``set_current_client_cert_details``), and the downstream TLS command operators of
access-log formats.

The expected XFCC values are computed here from the client certificate itself
(its SHA-256, its subject in RFC 2253/4514 form, its SANs), so each target is held
to the same exact header, not to the other's output.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from support.bootstrap import bootstrap, cluster, file_access_log
from support.proxy import ProxyProcess
from support.tls import (
    WEB_DNS,
    WEB_SPIFFE,
    Pki,
    client_context,
    downstream_tls,
    https_listener,
    https_request,
    shared_pki,
    validation_context,
)
from support.upstreams import HttpUpstream
from support.wait import free_port, until

StartProxy = Callable[..., ProxyProcess]
Json = dict[str, Any]
SERVER = "server.example.com"
XFCC = "x-forwarded-client-cert"
ALL_DETAILS = {"subject": True, "uri": True, "dns": True}


@pytest.fixture(scope="module")
def pki() -> Pki:
    return shared_pki()


def serve(
    start: StartProxy,
    pki: Pki,
    upstream: HttpUpstream,
    tmp_path: Path | None = None,
    log_format: str | None = None,
    **hcm: Any,
) -> ProxyProcess:
    """A TLS listener that asks for (not requires) a client certificate, proxying
    to ``upstream``; ``hcm`` goes on the connection manager."""
    tls = downstream_tls([pki.server_rsa], validation=validation_context(pki.ca_path))
    if tmp_path is not None and log_format is not None:
        hcm["access_log"] = [file_access_log(str(tmp_path / "access.log"), log_format)]
    lis = https_listener(free_port(), tls, cluster_name="backend", **hcm)
    doc = bootstrap(
        admin_port=free_port(), listeners=[lis], clusters=[cluster("backend", [upstream.address])]
    )
    return start(doc, extra_args=("--file-flush-interval-msec", "100"))


def upstream_xfcc(
    proxy: ProxyProcess, pki: Pki, *, client_cert: bool, sent: str | None = None
) -> list[str]:
    """The XFCC values the upstream saw for one request (``sent``: the client's own)."""
    ctx = client_context(pki, cert=pki.client_web if client_cert else None)
    headers = {XFCC: sent} if sent is not None else None
    resp, _ = https_request(
        proxy.listener_address(), ctx, "/xfcc", server_name=SERVER, headers=headers
    )
    assert resp.status == 200, resp
    echo = json.loads(resp.body)
    return [v for k, v in echo["headers"] if k == XFCC]


def client_details(pki: Pki, *, subject: bool, uri: bool, dns: bool) -> str:
    cert = pki.client_web.cert
    parts = [f"Hash={hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()}"]
    if subject:
        parts.append(f'Subject="{cert.subject.rfc4514_string()}"')
    if uri:
        parts.append(f"URI={WEB_SPIFFE}")
    if dns:
        parts.append(f"DNS={WEB_DNS}")
    return ";".join(parts)


def test_default_sanitize_removes_a_client_supplied_header(
    start_proxy: StartProxy, pki: Pki, http_upstream: HttpUpstream
) -> None:
    proxy = serve(start_proxy, pki, http_upstream)
    assert upstream_xfcc(proxy, pki, client_cert=True, sent="By=spiffe://evil") == []


def test_sanitize_set_replaces_the_header_with_the_client_details(
    start_proxy: StartProxy, pki: Pki, http_upstream: HttpUpstream
) -> None:
    """With mutual TLS the upstream sees exactly Hash, Subject, URI and DNS of the
    client's certificate; without a client certificate the header is removed."""
    proxy = serve(
        start_proxy,
        pki,
        http_upstream,
        forward_client_cert_details="SANITIZE_SET",
        set_current_client_cert_details=ALL_DETAILS,
    )
    expected = client_details(pki, subject=True, uri=True, dns=True)
    assert upstream_xfcc(proxy, pki, client_cert=True, sent="By=spiffe://evil") == [expected]
    assert upstream_xfcc(proxy, pki, client_cert=False, sent="By=spiffe://evil") == []


def test_append_forward_appends_after_what_the_client_sent(
    start_proxy: StartProxy, pki: Pki, http_upstream: HttpUpstream
) -> None:
    proxy = serve(
        start_proxy,
        pki,
        http_upstream,
        forward_client_cert_details="APPEND_FORWARD",
        set_current_client_cert_details={"uri": True},
    )
    expected = client_details(pki, subject=False, uri=True, dns=False)
    seen = upstream_xfcc(proxy, pki, client_cert=True, sent="By=spiffe://front")
    assert seen == [f"By=spiffe://front,{expected}"]
    assert upstream_xfcc(proxy, pki, client_cert=True) == [expected]


@pytest.mark.parametrize(
    ("mode", "with_cert", "forwarded"),
    [
        ("FORWARD_ONLY", True, True),
        ("FORWARD_ONLY", False, False),
        ("ALWAYS_FORWARD_ONLY", False, True),
    ],
)
def test_forward_only_modes(
    start_proxy: StartProxy,
    pki: Pki,
    http_upstream: HttpUpstream,
    mode: str,
    with_cert: bool,
    forwarded: bool,
) -> None:
    proxy = serve(start_proxy, pki, http_upstream, forward_client_cert_details=mode)
    seen = upstream_xfcc(proxy, pki, client_cert=with_cert, sent="By=spiffe://front")
    assert seen == (["By=spiffe://front"] if forwarded else [])


def test_access_log_tls_operators(
    start_proxy: StartProxy, pki: Pki, http_upstream: HttpUpstream, tmp_path: Path
) -> None:
    """``%DOWNSTREAM_PEER_URI_SAN%``, ``%DOWNSTREAM_PEER_DNS_SAN%``,
    ``%DOWNSTREAM_TLS_VERSION%``, ``%REQUESTED_SERVER_NAME%``,
    ``%DOWNSTREAM_PEER_FINGERPRINT_256%`` with a client certificate, and ``-`` for
    the peer's fields without one. The requested server name is what a
    tls_inspector found: this listener has none, so it is ``-`` (as in Envoy)."""
    fmt = (
        "%DOWNSTREAM_PEER_URI_SAN% %DOWNSTREAM_PEER_DNS_SAN% %DOWNSTREAM_TLS_VERSION% "
        "%REQUESTED_SERVER_NAME% %DOWNSTREAM_PEER_FINGERPRINT_256%\n"
    )
    proxy = serve(start_proxy, pki, http_upstream, tmp_path=tmp_path, log_format=fmt)
    for cert in (pki.client_web, None):
        resp, _ = https_request(
            proxy.listener_address(), client_context(pki, cert=cert), server_name=SERVER
        )
        assert resp.status == 200
    log = tmp_path / "access.log"
    until(lambda: log.exists() and len(log.read_text().splitlines()) == 2, timeout=10)
    digest = hashlib.sha256(pki.client_web.cert.public_bytes(Encoding.DER)).hexdigest()
    assert log.read_text().splitlines() == [
        f"{WEB_SPIFFE} {WEB_DNS} TLSv1.3 - {digest}",
        "- - TLSv1.3 - -",
    ]
