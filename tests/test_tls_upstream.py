"""TLS origination: a cluster's ``transport_socket`` with an ``UpstreamTlsContext``,
end to end against :class:`support.tls.TlsUpstream` (HTTPS; HTTP/1.1, or HTTP/2 when
ALPN picks ``h2``), which echoes what its handshake saw: the SNI, the ALPN protocol,
the TLS version and the client certificate the proxy presented.

A failed upstream handshake is a connection failure: the client gets ``503`` with
Envoy's body ``upstream connect error or disconnect/reset before headers. reset
reason: remote connection failure``, the access log shows the response flag ``UF``
and ``%UPSTREAM_TRANSPORT_FAILURE_REASON%`` (a ``TLS_error:`` string naming the
failed check), and the cluster's ``ssl.*`` stats say which check failed.

Every test takes ``start_proxy``: envoyx and, as a second parametrization, the real
Envoy 1.40 with the same bootstrap and the same expectations.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.bootstrap import (
    HTTP_OPTIONS_TYPE,
    bootstrap,
    cluster,
    file_access_log,
    http_listener,
    route,
    virtual_host,
)
from support.proxy import ProxyProcess
from support.tls import (
    Pki,
    TlsUpstream,
    san_matcher,
    shared_pki,
    stat_deltas,
    upstream_tls,
    validation_context,
)
from support.wait import free_port, until

StartProxy = Callable[..., ProxyProcess]
Json = dict[str, Any]

HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
CONNECT_FAILURE_BODY = (
    "upstream connect error or disconnect/reset before headers. "
    "reset reason: remote connection failure"
)
LOG_FORMAT = "%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %UPSTREAM_TRANSPORT_FAILURE_REASON%\n"


@pytest.fixture(scope="module")
def pki() -> Pki:
    return shared_pki()


@pytest.fixture(scope="module")
def upstreams(pki: Pki) -> Iterator[dict[str, TlsUpstream]]:
    """HTTPS upstreams: ``h1`` (ALPN http/1.1 only), ``h2`` (ALPN h2 and http/1.1),
    ``plain_alpn`` (no ALPN), ``rogue`` and ``expired`` (certificates the root does
    not vouch for), ``mtls`` (requires a client certificate of the root)."""
    ups = {
        "h1": TlsUpstream("h1", pki.upstream, alpn=["http/1.1"]),
        "h2": TlsUpstream("h2", pki.upstream, alpn=["h2", "http/1.1"]),
        "plain_alpn": TlsUpstream("plain_alpn", pki.upstream),
        "rogue": TlsUpstream("rogue", pki.rogue_server),
        "expired": TlsUpstream("expired", pki.expired_server),
        "mtls": TlsUpstream("mtls", pki.upstream, client_ca=pki.ca_path, require_client_cert=True),
    }
    for up in ups.values():
        up.start()
    yield ups
    for up in ups.values():
        up.stop()


def tls_cluster(
    name: str, up: TlsUpstream, transport_socket: Json, *, protocol_options: Json | None = None
) -> Json:
    c = cluster(name, [up.address])
    c["transport_socket"] = transport_socket
    if protocol_options is not None:
        c["typed_extension_protocol_options"] = {
            HTTP_OPTIONS: {"@type": HTTP_OPTIONS_TYPE, **protocol_options}
        }
    return c


class Proxy:
    """A proxy routing ``/<cluster>/...`` to each cluster, with an access log."""

    def __init__(self, start: StartProxy, clusters: list[Json], log_dir: Path) -> None:
        self.log_path = log_dir / "access.log"
        lis = http_listener(
            port=free_port(),
            virtual_hosts=[
                virtual_host(
                    "all",
                    ["*"],
                    [route({"prefix": f"/{c['name']}/"}, cluster=c["name"]) for c in clusters],
                )
            ],
        )
        hcm = lis["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["access_log"] = [file_access_log(str(self.log_path), LOG_FORMAT)]
        # The first access log line is written at once, later ones at the flush
        # interval (Envoy's default: 10 s).
        self.proc = start(
            bootstrap(admin_port=free_port(), listeners=[lis], clusters=clusters),
            extra_args=("--file-flush-interval-msec", "100"),
        )
        self.client = httpx.Client(base_url=self.proc.url(), timeout=10)

    def get(self, path: str, host: str = "example.test") -> httpx.Response:
        return self.client.get(path, headers={"host": host})

    def echo(self, path: str, host: str = "example.test") -> Json:
        resp = self.get(path, host)
        assert resp.status_code == 200, resp.text
        body: Json = json.loads(resp.content)
        return body

    def log_line(self, path: str) -> list[str]:
        """The access log line of the request to ``path``, split on spaces."""

        def find() -> list[str] | None:
            if not self.log_path.exists():
                return None
            for line in self.log_path.read_text().splitlines():
                if line.split(" ", 1)[0] == path:
                    return line.split(" ")
            return None

        return until(find, timeout=10, what=f"access log line of {path}")

    def cluster_stat(self, c: str, name: str) -> str:
        return f"cluster.{c}.{name}"

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def make_proxy(start_proxy: StartProxy, tmp_path: Path) -> Iterator[Callable[[list[Json]], Proxy]]:
    made: list[Proxy] = []

    def make(clusters: list[Json]) -> Proxy:
        p = Proxy(start_proxy, clusters, tmp_path)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def assert_connect_failure(proxy: Proxy, path: str, reason: str) -> None:
    """``path`` got Envoy's 503 for a failed upstream connection; the access log shows
    ``UF`` and a TLS failure reason containing ``reason``."""
    resp = proxy.get(path)
    assert resp.status_code == 503
    assert resp.text == CONNECT_FAILURE_BODY
    line = proxy.log_line(path)
    assert line[1:3] == ["503", "UF"], line
    failure = " ".join(line[3:])
    assert failure.startswith("TLS_error:"), failure
    assert reason in failure, failure


# -- SNI, trust, SANs ----------------------------------------------------------------------


def test_sni_and_a_trusted_upstream(
    make_proxy: Callable[[list[Json]], Proxy], pki: Pki, upstreams: dict[str, TlsUpstream]
) -> None:
    """``sni`` is sent as configured; without it no SNI is sent (the endpoint is an
    IP address). The upstream's chain is checked against ``trusted_ca``; the upstream
    sees TLS 1.2 (Envoy's client default maximum) and ALPN ``http/1.1`` (an HTTP/1.1
    cluster offers it). Each cluster counts the handshake in ``cluster.<name>.ssl.*``."""
    up = upstreams["h1"]
    vc = validation_context(pki.ca_path)
    proxy = make_proxy(
        [
            tls_cluster("with_sni", up, upstream_tls(sni="backend.example.com", validation=vc)),
            tls_cluster("no_sni", up, upstream_tls(validation=vc)),
        ]
    )
    before = proxy.proc.stats()
    echo = proxy.echo("/with_sni/x")
    assert echo["tls"]["sni"] == "backend.example.com"
    assert echo["tls"]["version"] == "TLSv1.2"
    assert echo["tls"]["alpn"] == "http/1.1"
    assert echo["http_version"] == "1.1"
    assert echo["tls"]["peer_subject"] is None  # no client certificate configured
    echo = proxy.echo("/no_sni/x")
    assert echo["tls"]["sni"] is None
    # The connection is pooled: a second request makes no new handshake.
    assert proxy.echo("/with_sni/y")["connection_id"] == proxy.echo("/with_sni/z")["connection_id"]
    stat_deltas(
        proxy.proc,
        before,
        {
            "cluster.with_sni.ssl.handshake": 1,
            "cluster.with_sni.ssl.versions.TLSv1.2": 1,
            "cluster.with_sni.upstream_cx_total": 1,
            "cluster.no_sni.ssl.handshake": 1,
            "cluster.no_sni.ssl.fail_verify_error": 0,
        },
    )


def test_tls_params_raise_the_upstream_version(
    make_proxy: Callable[[list[Json]], Proxy], pki: Pki, upstreams: dict[str, TlsUpstream]
) -> None:
    """``tls_maximum_protocol_version: TLSv1_3`` lets the cluster speak TLS 1.3."""
    vc = validation_context(pki.ca_path)
    params = {"tls_maximum_protocol_version": "TLSv1_3"}
    proxy = make_proxy(
        [tls_cluster("tls13", upstreams["h1"], upstream_tls(validation=vc, params=params))]
    )
    before = proxy.proc.stats()
    assert proxy.echo("/tls13/x")["tls"]["version"] == "TLSv1.3"
    stat_deltas(proxy.proc, before, {"cluster.tls13.ssl.versions.TLSv1.3": 1})


@pytest.mark.parametrize("which", ["rogue", "expired"])
def test_an_untrusted_upstream_certificate_fails_the_connection(
    make_proxy: Callable[[list[Json]], Proxy],
    pki: Pki,
    upstreams: dict[str, TlsUpstream],
    which: str,
) -> None:
    """A certificate of another CA, or an expired one: 503 ``UF``, counted in
    ``ssl.fail_verify_error`` and ``upstream_cx_connect_fail``; the upstream sees the
    proxy abort the handshake."""
    up = upstreams[which]
    seen = len(up.handshakes)
    proxy = make_proxy(
        [tls_cluster("backend", up, upstream_tls(validation=validation_context(pki.ca_path)))]
    )
    before = proxy.proc.stats()
    assert_connect_failure(proxy, "/backend/x", "CERTIFICATE_VERIFY_FAILED")
    stat_deltas(
        proxy.proc,
        before,
        {
            "cluster.backend.ssl.fail_verify_error": 1,
            "cluster.backend.ssl.handshake": 0,
            "cluster.backend.upstream_cx_connect_fail": 1,
            "cluster.backend.upstream_rq_503": 1,
        },
    )
    hs = until(lambda: up.handshakes_since(seen), timeout=5, what="the upstream's handshake")
    assert len(hs) == 1 and hs[0].error is not None, hs


def test_no_validation_context_trusts_any_upstream(
    make_proxy: Callable[[list[Json]], Proxy], upstreams: dict[str, TlsUpstream]
) -> None:
    """Without a validation context the upstream's certificate is not checked: the
    rogue upstream serves."""
    proxy = make_proxy([tls_cluster("backend", upstreams["rogue"], upstream_tls())])
    assert proxy.echo("/backend/x")["upstream"] == "rogue"


@pytest.mark.parametrize(
    ("matchers", "accepted"),
    [
        pytest.param([san_matcher("DNS", exact="backend.example.com")], True, id="dns-exact"),
        pytest.param([san_matcher("DNS", exact="other.example.com")], False, id="dns-other"),
        pytest.param([san_matcher("DNS", suffix=".example.com")], True, id="dns-suffix"),
        pytest.param([san_matcher("IP_ADDRESS", exact="127.0.0.1")], True, id="ip"),
        pytest.param([san_matcher("URI", prefix="spiffe://")], False, id="uri-none"),
    ],
)
def test_match_typed_subject_alt_names_on_the_upstream_certificate(
    make_proxy: Callable[[list[Json]], Proxy],
    pki: Pki,
    upstreams: dict[str, TlsUpstream],
    matchers: list[Json],
    accepted: bool,
) -> None:
    """The upstream certificate has DNS SANs backend/a/b.example.com and IP 127.0.0.1:
    a matcher none of them satisfies fails the connection (``ssl.fail_verify_san``)."""
    vc = validation_context(pki.ca_path, san_matchers=matchers)
    proxy = make_proxy([tls_cluster("backend", upstreams["h1"], upstream_tls(validation=vc))])
    before = proxy.proc.stats()
    if accepted:
        assert proxy.echo("/backend/x")["upstream"] == "h1"
        expected = {"cluster.backend.ssl.handshake": 1, "cluster.backend.ssl.fail_verify_san": 0}
    else:
        assert_connect_failure(proxy, "/backend/x", "CERTIFICATE_VERIFY_FAILED")
        expected = {"cluster.backend.ssl.handshake": 0, "cluster.backend.ssl.fail_verify_san": 1}
    stat_deltas(proxy.proc, before, expected)


# -- client certificate --------------------------------------------------------------------


def test_client_certificate_to_an_upstream_requiring_mtls(
    make_proxy: Callable[[list[Json]], Proxy], pki: Pki, upstreams: dict[str, TlsUpstream]
) -> None:
    """The cluster's ``tls_certificates`` is presented to the upstream (which sees its
    subject and SPIFFE URI); a cluster without one is refused by the upstream: 503
    ``UF``, ``ssl.connection_error``."""
    up = upstreams["mtls"]
    vc = validation_context(pki.ca_path)
    proxy = make_proxy(
        [
            tls_cluster("with_cert", up, upstream_tls(validation=vc, client_cert=pki.envoy_client)),
            tls_cluster("no_cert", up, upstream_tls(validation=vc)),
        ]
    )
    before = proxy.proc.stats()
    tls = proxy.echo("/with_cert/x")["tls"]
    assert tls["peer_subject"] == "CN=envoy-client,O=envoyx tests"
    assert tls["peer_sans"] == ["spiffe://example.org/ns/edge/sa/envoy"]
    assert_connect_failure(proxy, "/no_cert/x", "HANDSHAKE_FAILURE")
    stat_deltas(
        proxy.proc,
        before,
        {
            "cluster.with_cert.ssl.handshake": 1,
            "cluster.no_cert.ssl.connection_error": 1,
            "cluster.no_cert.ssl.handshake": 0,
            "cluster.no_cert.upstream_cx_connect_fail": 1,
        },
    )


# -- ALPN and the upstream protocol ----------------------------------------------------------

EXPLICIT_H2 = {"explicit_http_config": {"http2_protocol_options": {}}}
AUTO = {"auto_config": {"http_protocol_options": {}, "http2_protocol_options": {}}}


@pytest.mark.parametrize(
    ("options", "alpn", "upstream", "negotiated", "version"),
    [
        # Explicit HTTP/2: the proxy offers h2 itself (no alpn_protocols needed).
        pytest.param(EXPLICIT_H2, None, "h2", "h2", "2", id="explicit-h2"),
        pytest.param(EXPLICIT_H2, ["h2"], "h2", "h2", "2", id="explicit-h2-alpn"),
        # auto_config: ALPN picks the protocol.
        pytest.param(AUTO, None, "h2", "h2", "2", id="auto-h2"),
        pytest.param(AUTO, None, "h1", "http/1.1", "1.1", id="auto-h1"),
    ],
)
def test_alpn_selects_the_upstream_protocol(
    make_proxy: Callable[[list[Json]], Proxy],
    pki: Pki,
    upstreams: dict[str, TlsUpstream],
    options: Json,
    alpn: list[str] | None,
    upstream: str,
    negotiated: str,
    version: str,
) -> None:
    vc = validation_context(pki.ca_path)
    proxy = make_proxy(
        [
            tls_cluster(
                "backend",
                upstreams[upstream],
                upstream_tls(validation=vc, alpn=alpn),
                protocol_options=options,
            )
        ]
    )
    before = proxy.proc.stats()
    first = proxy.echo("/backend/one")
    second = proxy.echo("/backend/two")
    assert first["tls"]["alpn"] == negotiated
    assert first["http_version"] == version
    assert first["connection_id"] == second["connection_id"]
    h2 = int(version == "2")
    stat_deltas(
        proxy.proc,
        before,
        {
            "cluster.backend.ssl.handshake": 1,
            "cluster.backend.upstream_cx_http2_total": h2,
            "cluster.backend.upstream_cx_http1_total": 1 - h2,
            "cluster.backend.upstream_rq_total": 2,
        },
    )


# -- auto SNI and SAN validation -------------------------------------------------------------


@pytest.mark.parametrize("san_validation", [True, False])
def test_auto_sni_from_the_host_header(
    make_proxy: Callable[[list[Json]], Proxy],
    pki: Pki,
    upstreams: dict[str, TlsUpstream],
    san_validation: bool,
) -> None:
    """``upstream_http_protocol_options.auto_sni``: each request's host is the SNI of
    its upstream connection, so requests for different hosts never share one (and
    those for the same host do). ``auto_san_validation`` also checks the upstream's
    certificate against that host: c.example.com (not among its SANs) fails with
    ``ssl.fail_verify_san``; without it the CA check alone passes it."""
    up = upstreams["h1"]
    options = {
        "explicit_http_config": {"http_protocol_options": {}},
        "upstream_http_protocol_options": {
            "auto_sni": True,
            "auto_san_validation": san_validation,
        },
    }
    proxy = make_proxy(
        [
            tls_cluster(
                "backend",
                up,
                upstream_tls(validation=validation_context(pki.ca_path)),
                protocol_options=options,
            )
        ]
    )
    before = proxy.proc.stats()
    a = proxy.echo("/backend/1", host="a.example.com")
    b = proxy.echo("/backend/2", host="b.example.com")
    a2 = proxy.echo("/backend/3", host="a.example.com")
    assert (a["tls"]["sni"], b["tls"]["sni"], a2["tls"]["sni"]) == (
        "a.example.com",
        "b.example.com",
        "a.example.com",
    )
    assert a["connection_id"] != b["connection_id"]
    assert a2["connection_id"] == a["connection_id"]
    # The host header's port is not part of the SNI.
    b2 = proxy.echo("/backend/4", host="b.example.com:8443")
    assert b2["tls"]["sni"] == "b.example.com"
    if san_validation:
        resp = proxy.get("/backend/5", host="c.example.com")
        assert (resp.status_code, resp.text) == (503, CONNECT_FAILURE_BODY)
        assert proxy.log_line("/backend/5")[1:3] == ["503", "UF"]
        expected = {"cluster.backend.ssl.handshake": 2, "cluster.backend.ssl.fail_verify_san": 1}
    else:
        assert proxy.echo("/backend/5", host="c.example.com")["tls"]["sni"] == "c.example.com"
        expected = {"cluster.backend.ssl.handshake": 3, "cluster.backend.ssl.fail_verify_san": 0}
    stat_deltas(proxy.proc, before, expected)
