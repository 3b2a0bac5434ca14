"""Large bodies through a TLS listener, both ways, over HTTP/1.1 and HTTP/2 (ALPN):
what the client sent reaches the upstream whole and what the upstream sent reaches
the client whole. The sizes are past any socket buffer, so the proxy's TLS writes
meet a full socket and must resume (rustls holding records back) without losing or
reordering bytes. Against envoyx and Envoy 1.40 with the same bootstrap."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable

import httpx
import pytest

from support.bootstrap import bootstrap, cluster
from support.proxy import ProxyProcess
from support.tls import Pki, client_context, downstream_tls, https_listener, shared_pki
from support.upstreams import HttpUpstream, pattern_sha256
from support.wait import free_port

StartProxy = Callable[..., ProxyProcess]
SERVER = "server.example.com"
DOWNLOAD = 8 * 1024 * 1024
UPLOAD = 3 * 1024 * 1024


@pytest.fixture(scope="module")
def pki() -> Pki:
    return shared_pki()


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
def test_large_bodies_both_ways_over_tls(
    start_proxy: StartProxy, pki: Pki, http_upstream: HttpUpstream, http2: bool
) -> None:
    tls = downstream_tls([pki.server_ecdsa], alpn=["h2", "http/1.1"])
    lis = https_listener(free_port(), tls, cluster_name="backend")
    proxy = start_proxy(
        bootstrap(
            admin_port=free_port(),
            listeners=[lis],
            clusters=[cluster("backend", [http_upstream.address])],
        )
    )
    host, port = proxy.listener_address()
    url = f"https://{host}:{port}"
    with httpx.Client(verify=client_context(pki), http2=http2, timeout=30) as client:
        ext = {"sni_hostname": SERVER}
        headers = {"x-test-response-size": str(DOWNLOAD)}
        # Read slowly at first so that the proxy's socket to the client fills up.
        digest, received = hashlib.sha256(), 0
        with client.stream("GET", f"{url}/down", headers=headers, extensions=ext) as down:
            assert down.status_code == 200
            assert down.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
            for i, chunk in enumerate(down.iter_bytes()):
                if i < 20:
                    time.sleep(0.02)
                digest.update(chunk)
                received += len(chunk)
        assert received == DOWNLOAD
        assert digest.hexdigest() == pattern_sha256(DOWNLOAD)

        payload = bytes(range(256)) * (UPLOAD // 256)
        up = client.post(f"{url}/up", content=payload, extensions=ext)
        assert up.status_code == 200
        echo = json.loads(up.content)
        assert echo["body_length"] == UPLOAD
        assert echo["body_sha256"] == hashlib.sha256(payload).hexdigest()
