"""Certificates rotated on disk: an SDS secret (over ADS) whose ``TlsCertificate`` names
files (``certificate_chain`` / ``private_key`` ``filename``) in a directory laid out as
Kubernetes mounts a secret: ``tls.crt`` and ``tls.key`` are symlinks into ``..data``,
itself a symlink to a timestamped directory that an update replaces by renaming a new
``..data`` over it (:class:`SecretDir`).

What Envoy does, and what is asserted of both targets (``start_proxy``: envoyx and the
real Envoy 1.40 with the same bootstrap):

- after the swap, new handshakes present the new certificate within a few seconds
  (Envoy re-reads the files when something is moved into the secret's
  ``watched_directory``, or without one into the files' directories); a connection
  opened before keeps working; the listener's TLS context is rebuilt
  (``server_ssl_socket_factory.ssl_context_update_by_sds``);
- files that do not make a certificate keep the old one, counted in
  ``sds.<name>.key_rotation_failed``; a good swap after that is taken;
- a certificate of the bootstrap (a ``tls_certificates`` entry, or a static secret)
  is read once: swapping its files changes nothing.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.bootstrap import bootstrap
from support.clients import _Reader, read_response
from support.proxy import ProxyProcess
from support.tls import (
    CertFiles,
    HttpsLoad,
    Pki,
    TlsUpstream,
    client_context,
    downstream_tls,
    https_listener,
    https_request,
    listener_stat,
    shared_pki,
    tls_connect,
    upstream_tls,
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

SERVER_NAME = "server.example.com"
SECRET_NAME = "server-cert"
ROTATION_S = 5.0  # how long a rotation may take to be seen
_seq = itertools.count(1)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return shared_pki()


@pytest.fixture
def xds() -> Iterator[XdsServer]:
    server = XdsServer().start()
    yield server
    server.stop()


class SecretDir:
    """A directory holding ``tls.crt`` and ``tls.key`` as Kubernetes' atomic writer
    does: symlinks through ``..data`` to a versioned directory."""

    def __init__(self, root: Path, cert: CertFiles) -> None:
        self.root = root
        self.version = 0
        root.mkdir(parents=True, exist_ok=True)
        self._write(cert.cert_path.read_bytes(), cert.key_path.read_bytes())
        for name in ("tls.crt", "tls.key"):
            os.symlink(f"..data/{name}", root / name)

    @property
    def cert(self) -> Path:
        return self.root / "tls.crt"

    @property
    def key(self) -> Path:
        return self.root / "tls.key"

    def _write(self, cert: bytes, key: bytes) -> None:
        self.version += 1
        old = (self.root / "..data").resolve() if (self.root / "..data").exists() else None
        target = self.root / f"..v{self.version}"
        target.mkdir()
        (target / "tls.crt").write_bytes(cert)
        (target / "tls.key").write_bytes(key)
        tmp = self.root / "..data_tmp"
        os.symlink(target.name, tmp)
        os.rename(tmp, self.root / "..data")  # the atomic swap
        if old is not None:
            shutil.rmtree(old)

    def swap(self, cert: CertFiles) -> None:
        self._write(cert.cert_path.read_bytes(), cert.key_path.read_bytes())

    def swap_raw(self, cert: bytes, key: bytes) -> None:
        self._write(cert, key)


def file_secret(name: str, d: SecretDir, *, watched: bool) -> Json:
    tc: Json = {
        "certificate_chain": {"filename": str(d.cert)},
        "private_key": {"filename": str(d.key)},
    }
    if watched:
        tc["watched_directory"] = {"path": str(d.root)}
    return {"name": name, "tls_certificate": tc}


def tls_listener(name: str, port: int, secret: str) -> Json:
    doc = listener(name, port, route_config_name="routes")
    socket_ = downstream_tls([])
    socket_["typed_config"]["common_tls_context"] = {
        "tls_certificate_sds_secret_configs": [{"name": secret, "sds_config": ads_source()}]
    }
    doc["filter_chains"][0]["transport_socket"] = socket_
    return doc


def served_cn(address: tuple[str, int], pki: Pki) -> str | None:
    resp, hs = https_request(address, client_context(pki), server_name=SERVER_NAME, host="x")
    assert resp.status == 200
    return hs.peer_cn


def sds_proxy(
    start: StartProxy, xds: XdsServer, upstream: HttpUpstream, d: SecretDir, *, watched: bool
) -> tuple[ProxyProcess, tuple[str, int]]:
    port = free_port()
    xds.set_snapshot(
        {
            CLUSTER: {"a": eds_cluster("a")},
            ENDPOINT: {"a": cluster_load_assignment("a", [upstream.address])},
            LISTENER: {"main": tls_listener("main", port, SECRET_NAME)},
            ROUTE: {"routes": simple_routes("routes", "a")},
            SECRET: {SECRET_NAME: file_secret(SECRET_NAME, d, watched=watched)},
        }
    )
    doc = ads_bootstrap(
        xds_address=xds.address, admin_port=free_port(), node_id=f"watched-{next(_seq)}"
    )
    return start(doc), ("127.0.0.1", port)


def keep_alive_get(reader: _Reader) -> int:
    reader.sock.sendall(b"GET /again HTTP/1.1\r\nhost: x\r\n\r\n")
    return read_response(reader).status


@pytest.mark.parametrize("watched", [True, False], ids=["watched_directory", "file-dirs"])
def test_sds_certificate_files_swapped_on_disk(
    start_proxy: StartProxy,
    xds: XdsServer,
    pki: Pki,
    http_upstream: HttpUpstream,
    tmp_path: Path,
    watched: bool,
) -> None:
    old, new = pki.server_ecdsa, pki.server_rsa
    d = SecretDir(tmp_path / "secret", old)
    proxy, address = sds_proxy(start_proxy, xds, http_upstream, d, watched=watched)
    until(lambda: served_cn(address, pki) == old.common_name, timeout=10, what="first cert")
    updates = listener_stat(address, "server_ssl_socket_factory.ssl_context_update_by_sds")
    before = proxy.stats()

    with tls_connect(address, client_context(pki), server_name=SERVER_NAME) as sock:
        reader = _Reader(sock)
        assert keep_alive_get(reader) == 200

        d.swap(new)
        until(
            lambda: served_cn(address, pki) == new.common_name,
            timeout=ROTATION_S,
            what="the new certificate served",
        )
        # The connection opened before the swap carries on.
        assert keep_alive_get(reader) == 200

    stats = proxy.wait_stats({updates: 1}, before)
    assert stats == {updates: 1}, f"{proxy.kind}: {stats}"
    after = proxy.stats()
    assert after.get(f"sds.{SECRET_NAME}.key_rotation_failed", 0) == 0


def test_files_that_do_not_load_keep_the_old_certificate(
    start_proxy: StartProxy,
    xds: XdsServer,
    pki: Pki,
    http_upstream: HttpUpstream,
    tmp_path: Path,
) -> None:
    old, new = pki.server_ecdsa, pki.server_rsa
    d = SecretDir(tmp_path / "secret", old)
    proxy, address = sds_proxy(start_proxy, xds, http_upstream, d, watched=True)
    until(lambda: served_cn(address, pki) == old.common_name, timeout=10, what="first cert")
    failed = f"sds.{SECRET_NAME}.key_rotation_failed"
    before = proxy.stats()

    d.swap_raw(b"not a certificate\n", new.key_path.read_bytes())
    proxy.wait_stats({failed: 1}, before, timeout=ROTATION_S)
    assert proxy.stats().get(failed, 0) - before.get(failed, 0) == 1
    assert served_cn(address, pki) == old.common_name

    d.swap(new)
    until(
        lambda: served_cn(address, pki) == new.common_name,
        timeout=ROTATION_S,
        what="the new certificate served",
    )


@pytest.mark.parametrize("where", ["tls_certificates", "static_secret"])
def test_bootstrap_certificates_are_read_once(
    start_proxy: StartProxy, pki: Pki, tmp_path: Path, where: str
) -> None:
    old, new = pki.server_ecdsa, pki.server_rsa
    d = SecretDir(tmp_path / "secret", old)
    tc = file_secret("static-cert", d, watched=True)["tls_certificate"]
    socket_ = downstream_tls([])
    ctc = socket_["typed_config"]["common_tls_context"]
    secrets: list[Json] = []
    if where == "tls_certificates":
        ctc["tls_certificates"] = [tc]
    else:
        ctc["tls_certificate_sds_secret_configs"] = [{"name": "static-cert"}]
        secrets.append({"name": "static-cert", "tls_certificate": tc})
    lis = https_listener(free_port(), socket_)
    doc = bootstrap(admin_port=free_port(), listeners=[lis], clusters=[])
    if secrets:
        doc["static_resources"]["secrets"] = secrets
    proxy = start_proxy(doc)
    address = proxy.listener_address()
    assert served_cn(address, pki) == old.common_name

    d.swap(new)
    time.sleep(3)
    assert served_cn(address, pki) == old.common_name


def test_certificate_files_swapped_under_load(
    start_proxy: StartProxy,
    xds: XdsServer,
    pki: Pki,
    http_upstream: HttpUpstream,
    tmp_path: Path,
) -> None:
    """The watched files swapped (a symlink rename) while 4 threads make HTTPS
    requests on fresh connections: none fails, and once the new certificate is
    served, no connection gets the old one again."""
    old, new = pki.server_ecdsa, pki.server_rsa
    d = SecretDir(tmp_path / "secret", old)
    proxy, address = sds_proxy(start_proxy, xds, http_upstream, d, watched=True)
    until(lambda: served_cn(address, pki) == old.common_name, timeout=10, what="first cert")
    with HttpsLoad(address, client_context(pki), SERVER_NAME) as load:
        time.sleep(1.0)
        d.swap(new)
        until(
            lambda: any(r.peer_cn == new.common_name for r in load.snapshot()),
            timeout=ROTATION_S,
            what="the new certificate under load",
        )
        first_new = min(r.started for r in load.snapshot() if r.peer_cn == new.common_name)
        time.sleep(1.0)
    results = load.results
    failed = [r for r in results if r.error is not None]
    assert not failed, f"{proxy.kind}: {len(failed)} of {len(results)} failed: {failed[:3]}"
    # Connections that began after the first one served the new certificate ended
    # (a moment later) with it too: once switched, the listener never goes back.
    later = [r for r in results if r.started > first_new + 0.2]
    assert later and all(r.peer_cn == new.common_name for r in later)
    assert {r.peer_cn for r in results} == {old.common_name, new.common_name}


def test_a_clusters_client_certificate_swapped_on_disk(
    start_proxy: StartProxy, xds: XdsServer, pki: Pki, tmp_path: Path
) -> None:
    """The upstream side: a cluster's client certificate is an SDS secret naming
    watched files. The upstream requires a certificate from the PKI's root: with the
    rogue one the proxy's handshakes fail (503); once the files are swapped for a
    certificate the upstream trusts, requests go through — no restart, no push."""
    upstream = TlsUpstream(
        "tls-up", pki.server_ecdsa, client_ca=pki.ca_path, require_client_cert=True
    ).start()
    try:
        d = SecretDir(tmp_path / "client", pki.client_rogue)
        cluster = eds_cluster("up")
        cluster["transport_socket"] = upstream_tls(sni=SERVER_NAME)
        cluster["transport_socket"]["typed_config"]["common_tls_context"] = {
            "tls_certificate_sds_secret_configs": [
                {"name": "client-cert", "sds_config": ads_source()}
            ]
        }
        port = free_port()
        xds.set_snapshot(
            {
                CLUSTER: {"up": cluster},
                ENDPOINT: {"up": cluster_load_assignment("up", [upstream.address])},
                LISTENER: {"main": listener("main", port, route_config_name="routes")},
                ROUTE: {"routes": simple_routes("routes", "up")},
                SECRET: {"client-cert": file_secret("client-cert", d, watched=True)},
            }
        )
        doc = ads_bootstrap(
            xds_address=xds.address, admin_port=free_port(), node_id=f"watched-{next(_seq)}"
        )
        start_proxy(doc)
        url = f"http://127.0.0.1:{port}/"

        def status() -> int:
            return httpx.get(url, timeout=5).status_code

        until(lambda: status() == 503, timeout=10, what="the rogue certificate refused")
        d.swap(pki.client_web)
        until(lambda: status() == 200, timeout=ROTATION_S, what="the trusted certificate")
        assert upstream.handshakes[-1].error is None
    finally:
        upstream.stop()
