"""Certificate rotation under load: a TLS listener whose certificate is an SDS secret
(over ADS, from the repo's management server :mod:`support.xds_server`) gets a new
certificate pushed while a load generator runs HTTPS requests, each on a fresh
connection (so each is a full handshake), from several threads.

What Envoy does, and what is asserted of both targets (``start_proxy``: envoyx and the
real Envoy 1.40 with the same bootstrap), in State of the World and in Delta:

- no request fails, before, during or after the push;
- the new secret is in use by the time the proxy ACKs it: every connection opened
  after the ACK reached the server is served the new certificate (Envoy builds the new
  TLS context before it answers the update), and the load saw both certificates;
- every request was one handshake (``listener.<addr>.ssl.handshake``), none an
  ``ssl.connection_error``; ``sds.<name>.update_success`` counts both versions and
  ``listener.<addr>.server_ssl_socket_factory.ssl_context_update_by_sds`` both TLS
  contexts built from them.

(Rotation by a file change, ``watched_directory``, is in test_tls_watched_directory.py.)
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from support.proxy import ProxyProcess
from support.tls import (
    CertFiles,
    HttpsLoad,
    Pki,
    client_context,
    downstream_tls,
    https_request,
    listener_stat,
    shared_pki,
)
from support.upstreams import HttpUpstream
from support.wait import free_port, until
from support.xds_resources import (
    ads_bootstrap,
    ads_source,
    cluster_load_assignment,
    eds_cluster,
    listener,
    simple_routes,
)
from support.xds_server import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, XdsServer

StartProxy = Callable[..., ProxyProcess]
Json = dict[str, Any]

API_TYPES = {"sotw": "GRPC", "delta": "DELTA_GRPC"}
SERVER_NAME = "server.example.com"  # a DNS SAN of the PKI's server certificates
SECRET_NAME = "server-cert"
TIMEOUT = 10.0
THREADS = 4
BEFORE_S = 1.0  # load before the push
AFTER_S = 2.0  # load after the ACK
_seq = itertools.count(1)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return shared_pki()


@pytest.fixture(params=list(API_TYPES))
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def xds() -> Iterator[XdsServer]:
    server = XdsServer().start()
    yield server
    server.stop()


def certificate_secret(name: str, cert: CertFiles) -> Json:
    """A Secret holding a certificate (with its chain) and its key, inline."""
    return {
        "name": name,
        "tls_certificate": {
            "certificate_chain": {"inline_string": cert.cert_pem},
            "private_key": {"inline_string": cert.key_pem},
        },
    }


def tls_listener(name: str, port: int, secret: str) -> Json:
    """Listener ``name``: TLS with the certificate of SDS secret ``secret`` (over
    ADS), routes by RDS (``routes``)."""
    doc = listener(name, port, route_config_name="routes")
    socket_ = downstream_tls([])
    socket_["typed_config"]["common_tls_context"] = {
        "tls_certificate_sds_secret_configs": [{"name": secret, "sds_config": ads_source()}]
    }
    doc["filter_chains"][0]["transport_socket"] = socket_
    return doc


def test_certificate_pushed_by_sds_under_load(
    start_proxy: StartProxy, xds: XdsServer, mode: str, pki: Pki, http_upstream: HttpUpstream
) -> None:
    """A new certificate (another common name, another key type) pushed for the
    listener's secret while 4 threads make HTTPS requests on fresh connections: none
    fails, and every connection opened after the proxy ACKed the push is served the
    new certificate."""
    old, new = pki.server_ecdsa, pki.server_rsa
    port = free_port()
    xds.set_snapshot(
        {
            CLUSTER: {"a": eds_cluster("a")},
            ENDPOINT: {"a": cluster_load_assignment("a", [http_upstream.address])},
            LISTENER: {"main": tls_listener("main", port, SECRET_NAME)},
            ROUTE: {"routes": simple_routes("routes", "a")},
            SECRET: {SECRET_NAME: certificate_secret(SECRET_NAME, old)},
        }
    )
    doc = ads_bootstrap(
        xds_address=xds.address,
        admin_port=free_port(),
        api_type=API_TYPES[mode],  # type: ignore[arg-type]
        node_id=f"rotation-{next(_seq)}",
    )
    proxy = start_proxy(doc, concurrency=2)
    address = ("127.0.0.1", port)
    resp, hs = https_request(address, client_context(pki), server_name=SERVER_NAME, host="x")
    assert (resp.status, hs.peer_cn) == (200, old.common_name)

    with HttpsLoad(address, client_context(pki), SERVER_NAME, threads=THREADS) as load:
        time.sleep(BEFORE_S)
        since = xds.mark()
        version = xds.update(SECRET, {SECRET_NAME: certificate_secret(SECRET_NAME, new)})
        xds.wait_for_ack(SECRET, version, TIMEOUT, since=since)
        acked = time.monotonic()
        until(
            lambda: (
                sum(r.started > acked for r in load.snapshot()) >= 20
                and time.monotonic() - acked >= AFTER_S
            ),
            timeout=TIMEOUT + AFTER_S,
            what="load after the push",
        )
    results = load.results

    failed = [r for r in results if r.error is not None]
    assert not failed, (
        f"{proxy.kind}: {len(failed)} of {len(results)} requests failed, e.g. {failed[:5]}"
    )
    after = [r for r in results if r.started > acked]
    stale = [r for r in after if r.peer_cn != new.common_name]
    assert not stale, (
        f"{proxy.kind}: {len(stale)} of {len(after)} connections opened after the ACK "
        f"got {sorted({r.peer_cn for r in stale})}; the first {stale[0].started - acked:.3f}s "
        "after it"
    )
    before = [r for r in results if r.ended < acked]
    assert len(before) >= 10 and all(r.peer_cn == old.common_name for r in before[:5])
    assert {r.peer_cn for r in results} == {old.common_name, new.common_name}

    # Server side: every connection a handshake, none an SSL error; two SDS updates,
    # each building the listener's TLS context.
    handshakes = listener_stat(address, "ssl.handshake")
    stats = proxy.wait_stat(handshakes, len(results) + 1)
    assert stats.get(listener_stat(address, "ssl.connection_error")) == 0
    assert stats.get(f"sds.{SECRET_NAME}.update_success") == 2
    assert stats.get(f"sds.{SECRET_NAME}.update_rejected") == 0
    updates = listener_stat(address, "server_ssl_socket_factory.ssl_context_update_by_sds")
    assert stats.get(updates) == 2, f"{proxy.kind}: {updates} is {stats.get(updates)}"
