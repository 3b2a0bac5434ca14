"""The management server over TLS: an ``envoy_grpc`` cluster whose ``transport_socket``
is ``envoy.transport_sockets.tls`` (``UpstreamTlsContext``), against the repo's ADS
server (:mod:`support.xds_server`) served with ``grpc.ssl_server_credentials``.

Every scenario runs the same bootstrap through each proxy of ``ENVOYX_E2E_TARGETS``
(``start_proxy``): the real Envoy 1.40 shows what the scenario asserts is Envoy's
behaviour; envoyx's xDS client (grpcio) must do the same. Certificates come from
:func:`support.tls.shared_pki` (made at run time).

What Envoy reports when the handshake fails (a CA that does not sign the server's
certificate, a client certificate the server requires but is not given): the stream
never opens, so the management server sees no request; ``control_plane.connected_state``
stays 0; each failed attempt counts a ``cluster_manager.cds.update_failure`` (the CDS
subscription's, as for any stream failure) and the stream is retried with its back-off;
nothing is applied. Envoy also counts the failure on the cluster
(``cluster.xds_cluster.ssl.fail_verify_error``, ``upstream_cx_connect_fail``), which
envoyx cannot: its xDS channel is grpcio's, not a connection of the core's cluster.
"""

from __future__ import annotations

import base64
import http.client
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from envoyx import ConfigError
from envoyx.config import load_bootstrap
from envoyx.xds import parse_dynamic_resources
from support.proxy import ProxyProcess
from support.tls import (
    CertFiles,
    Pki,
    san_matcher,
    shared_pki,
    upstream_tls,
    validation_context,
)
from support.upstreams import HttpUpstream
from support.wait import free_port, until
from support.xds_resources import (
    XDS_CLUSTER,
    ads_bootstrap,
    cluster_load_assignment,
    eds_cluster,
    listener,
    simple_routes,
)
from support.xds_server import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    ServerTls,
    XdsServer,
    wait_all_acked,
)

StartProxy = Callable[..., ProxyProcess]
Json = dict[str, Any]

API_TYPES = {"sotw": "GRPC", "delta": "DELTA_GRPC"}
SERVER_NAME = "server.example.com"  # a DNS SAN of the PKI's server certificates
TIMEOUT = 15.0
_seq = itertools.count(1)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return shared_pki()


def server_tls(cert: CertFiles, *, client_ca: CertFiles | Pki | None = None) -> ServerTls:
    """The xDS server's TLS with ``cert``; with ``client_ca``, client certificates
    chaining to the PKI's root are required (mutual TLS)."""
    ca = client_ca.ca_path.read_bytes() if isinstance(client_ca, Pki) else None
    return ServerTls(
        cert.cert_path.read_bytes(),
        cert.key_path.read_bytes(),
        client_ca=ca,
        require_client_cert=ca is not None,
    )


@dataclass
class Setup:
    server: XdsServer
    upstream: HttpUpstream
    node_id: str
    main_port: int

    def snapshot(self) -> dict[str, str]:
        """Cluster ``a`` (EDS: the upstream), listener ``main`` with RDS routes to it."""
        return self.server.set_snapshot(
            {
                CLUSTER: {"a": eds_cluster("a")},
                ENDPOINT: {"a": cluster_load_assignment("a", [self.upstream.address])},
                LISTENER: {"main": listener("main", self.main_port, route_config_name="routes")},
                ROUTE: {"routes": simple_routes("routes", "a")},
            }
        )

    def bootstrap(self, transport_socket: Json, *, mode: str = "sotw", **kw: Any) -> Json:
        """An ADS bootstrap whose ``xds_cluster`` speaks TLS with ``transport_socket``."""
        doc = ads_bootstrap(
            xds_address=self.server.address,
            admin_port=free_port(),
            api_type=API_TYPES[mode],  # type: ignore[arg-type]
            node_id=self.node_id,
            **kw,
        )
        xds_cluster = doc["static_resources"]["clusters"][0]
        assert xds_cluster["name"] == XDS_CLUSTER
        xds_cluster["transport_socket"] = transport_socket
        return doc

    def get(self) -> tuple[int, str | None]:
        conn = http.client.HTTPConnection("127.0.0.1", self.main_port, timeout=5)
        try:
            conn.request("GET", "/", headers={"host": "xds.test", "connection": "close"})
            resp = conn.getresponse()
            resp.read()
            return resp.status, resp.getheader("x-upstream")
        finally:
            conn.close()


@pytest.fixture
def setup(http_upstream: HttpUpstream) -> Iterator[Callable[[ServerTls], Setup]]:
    servers: list[XdsServer] = []

    def make(tls: ServerTls) -> Setup:
        server = XdsServer(tls=tls).start()
        servers.append(server)
        return Setup(server, http_upstream, f"xds-tls-{next(_seq)}", free_port())

    yield make
    for server in servers:
        server.stop()


def assert_configured(s: Setup, proxy: ProxyProcess, versions: dict[str, str]) -> None:
    """Everything was fetched over the TLS stream and traffic flows."""
    wait_all_acked(s.server, versions, timeout=TIMEOUT)
    assert s.get() == (200, "a")
    assert proxy.stats()["control_plane.connected_state"] == 1


def assert_refused_handshakes(s: Setup, proxy: ProxyProcess) -> None:
    """No stream ever opened; each attempt failed and was retried; nothing applied."""
    until(
        lambda: proxy.stats().get("cluster_manager.cds.update_failure", 0) >= 3,
        timeout=TIMEOUT,
        what="three failed attempts (retries) of the xDS stream",
    )
    stats = proxy.stats()
    assert stats.get("control_plane.connected_state", 0) == 0
    assert stats.get("cluster_manager.cds.update_success", 0) == 0
    assert s.server.requests() == [], s.server.describe()
    assert s.server.last_stream_id == 0
    assert not proxy.ready()  # the initial fetch has not completed
    with pytest.raises(OSError):
        s.get()  # no listener was applied


# ------------------------------------------------------------------------------------
# TLS and mutual TLS to the management server
# ------------------------------------------------------------------------------------


def _trusted_ca(pki: Pki, form: str) -> Json:
    pem = pki.ca_path.read_bytes()
    if form == "filename":
        return {"filename": str(pki.ca_path)}
    if form == "inline_string":
        return {"inline_string": pem.decode()}
    return {"inline_bytes": base64.b64encode(pem).decode()}


@pytest.mark.parametrize("ca_form", ["filename", "inline_string", "inline_bytes"])
@pytest.mark.parametrize("mode", list(API_TYPES))
def test_tls_management_server_gives_config(
    start_proxy: StartProxy,
    setup: Callable[[ServerTls], Setup],
    pki: Pki,
    mode: str,
    ca_form: str,
) -> None:
    """An envoy_grpc cluster with an UpstreamTlsContext (trusted_ca in each DataSource
    form, sni) reaches the TLS management server and takes its configuration."""
    s = setup(server_tls(pki.server_ecdsa))
    versions = s.snapshot()
    ts = upstream_tls(sni=SERVER_NAME, validation={"trusted_ca": _trusted_ca(pki, ca_form)})
    proxy = start_proxy(s.bootstrap(ts, mode=mode))
    assert_configured(s, proxy, versions)
    identities = s.server.peer_identities()
    assert identities and all(i.transport == "ssl" for i in identities)
    assert identities[0].common_name is None  # no client certificate was asked for


def test_wrong_ca_applies_nothing_and_retries(
    start_proxy: StartProxy, setup: Callable[[ServerTls], Setup], pki: Pki
) -> None:
    """The server's certificate is signed by a CA the proxy does not trust: the
    handshake fails, no stream opens, nothing is applied, and the proxy keeps retrying;
    once the server presents a certificate it trusts, the next attempt takes the
    configuration."""
    s = setup(server_tls(pki.rogue_server))
    versions = s.snapshot()
    ts = upstream_tls(sni=SERVER_NAME, validation=validation_context(pki.ca_path))
    proxy = start_proxy(s.bootstrap(ts), wait_ready=False)
    assert_refused_handshakes(s, proxy)
    if proxy.kind == "envoy":
        # Envoy's own report, on the cluster's connections (envoyx's xDS channel is
        # grpcio's, not the core's cluster: it has no such stats).
        stats = proxy.stats()
        assert stats["cluster.xds_cluster.ssl.fail_verify_error"] >= 1
        assert stats["cluster.xds_cluster.upstream_cx_connect_fail"] >= 1

    s.server.stop()
    s.server.tls = server_tls(pki.server_ecdsa)
    s.server.restart()
    until(proxy.ready, timeout=TIMEOUT, what="the proxy ready after the server's fix")
    assert_configured(s, proxy, versions)


@pytest.mark.parametrize("client_cert_from", ["tls_certificates", "static_secret"])
def test_mutual_tls_required_by_the_server(
    start_proxy: StartProxy,
    setup: Callable[[ServerTls], Setup],
    pki: Pki,
    client_cert_from: str,
) -> None:
    """The server requires a client certificate: the proxy presents the one of its
    UpstreamTlsContext (``tls_certificates[0]``, or a ``static_resources.secrets``
    entry named by ``tls_certificate_sds_secret_configs``) and gets its
    configuration; the server sees that certificate."""
    s = setup(server_tls(pki.server_ecdsa, client_ca=pki))
    versions = s.snapshot()
    extra: dict[str, Any] = {}
    if client_cert_from == "tls_certificates":
        ts = upstream_tls(
            sni=SERVER_NAME,
            client_cert=pki.envoy_client,
            validation=validation_context(pki.ca_path),
        )
    else:
        ts = upstream_tls(sni=SERVER_NAME, validation=validation_context(pki.ca_path))
        ts["typed_config"]["common_tls_context"]["tls_certificate_sds_secret_configs"] = [
            {"name": "xds-client"}
        ]
        extra["secrets"] = [
            {
                "name": "xds-client",
                "tls_certificate": {
                    "certificate_chain": {"filename": str(pki.envoy_client.cert_path)},
                    "private_key": {"filename": str(pki.envoy_client.key_path)},
                },
            }
        ]
    doc = s.bootstrap(ts)
    doc["static_resources"].update(extra)
    proxy = start_proxy(doc)
    assert_configured(s, proxy, versions)
    identity = s.server.peer_identities()[0]
    assert identity.transport == "ssl"
    assert identity.common_name == pki.envoy_client.common_name
    assert "spiffe://example.org/ns/edge/sa/envoy" in identity.sans


def test_mutual_tls_without_a_client_certificate_fails(
    start_proxy: StartProxy, setup: Callable[[ServerTls], Setup], pki: Pki
) -> None:
    """The server requires a client certificate the proxy does not have: refused at
    the handshake, retried, nothing applied."""
    s = setup(server_tls(pki.server_ecdsa, client_ca=pki))
    s.snapshot()
    ts = upstream_tls(sni=SERVER_NAME, validation=validation_context(pki.ca_path))
    proxy = start_proxy(s.bootstrap(ts), wait_ready=False)
    assert_refused_handshakes(s, proxy)


@pytest.mark.parametrize(
    ("san", "connects"), [(SERVER_NAME, True), ("other.test", False)], ids=["match", "mismatch"]
)
def test_subject_alt_name_of_the_management_server(
    start_proxy: StartProxy,
    setup: Callable[[ServerTls], Setup],
    pki: Pki,
    san: str,
    connects: bool,
) -> None:
    """``match_typed_subject_alt_names`` with one DNS name: the server's certificate
    must carry it (no ``sni``: Envoy sends none, gRPC sends the name it checks)."""
    s = setup(server_tls(pki.server_ecdsa))
    versions = s.snapshot()
    ts = upstream_tls(
        validation=validation_context(pki.ca_path, san_matchers=[san_matcher("DNS", exact=san)])
    )
    proxy = start_proxy(s.bootstrap(ts), wait_ready=connects)
    if connects:
        assert_configured(s, proxy, versions)
        return
    assert_refused_handshakes(s, proxy)
    if proxy.kind == "envoy":
        assert proxy.stats()["cluster.xds_cluster.ssl.fail_verify_san"] >= 1


# ------------------------------------------------------------------------------------
# what envoyx cannot honour on that connection is refused, by field path
# ------------------------------------------------------------------------------------

TS = "static_resources.clusters[0].transport_socket"
CTX = f"{TS}.typed_config"
CTC = f"{CTX}.common_tls_context"
NOT_SUPPORTED = "not supported for the management server's connection"


def _settings_errors(transport_socket: Json, **static: Any) -> list[str]:
    doc = ads_bootstrap(xds_address=("127.0.0.1", 5678), admin_port=9901)
    doc["static_resources"]["clusters"][0]["transport_socket"] = transport_socket
    doc["static_resources"].update(static)
    with pytest.raises(ConfigError) as info:
        parse_dynamic_resources(load_bootstrap(doc))
    return info.value.errors


def test_unsupported_tls_settings_name_their_field(pki: Pki) -> None:
    ts = upstream_tls(
        sni="y.test",
        alpn=["h2", "http/1.1"],
        params={"tls_minimum_protocol_version": "TLSv1_3"},
        validation=validation_context(
            pki.ca_path,
            san_matchers=[san_matcher("URI", prefix="spiffe://example.org/")],
            crl=pki.crl,
        ),
        allow_renegotiation=True,
        max_session_keys=2,
    )
    assert _settings_errors(ts) == [
        f"{CTX}.allow_renegotiation: {NOT_SUPPORTED}",
        f"{CTX}.max_session_keys: {NOT_SUPPORTED}",
        f"{CTC}.tls_params: {NOT_SUPPORTED}",
        f"{CTC}.alpn_protocols[1]: 'http/1.1': gRPC speaks h2 only",
        f"{CTC}.validation_context.crl: {NOT_SUPPORTED}",
        f"{CTC}.validation_context.match_typed_subject_alt_names[0]: gRPC checks the "
        "server's certificate against one DNS name: one matcher with san_type DNS and an "
        "exact (case-sensitive) name is supported",
    ]


def test_tls_settings_that_grpc_cannot_express(pki: Pki) -> None:
    # No validation context: Envoy would accept any certificate, gRPC cannot.
    assert _settings_errors(upstream_tls()) == [
        f"{CTC}.validation_context: required for the management server's connection: "
        "envoyx verifies the server's certificate (set trusted_ca, or system_root_certs "
        "for the system's CAs), where Envoy would accept any certificate"
    ]
    # The SNI and the one name to match must agree: gRPC checks what it sends.
    ts = upstream_tls(
        sni="a.example.com",
        validation=validation_context(
            pki.ca_path, san_matchers=[san_matcher("DNS", exact="b.example.com")]
        ),
    )
    assert _settings_errors(ts) == [
        f"{CTX}.sni: 'a.example.com': gRPC checks the certificate against the name it "
        "sends as SNI, so it cannot also match 'b.example.com' (match_typed_subject_alt_names)"
    ]
    # Secrets of this connection: static ones only, of the right kind; one certificate.
    ts = upstream_tls(validation=validation_context(pki.ca_path))
    ctc = ts["typed_config"]["common_tls_context"]
    ctc["tls_certificate_sds_secret_configs"] = [
        {"name": "by-sds", "sds_config": {"ads": {}, "resource_api_version": "V3"}},
        {"name": "ca"},
        {"name": "nowhere"},
    ]
    ca_secret = {"name": "ca", "validation_context": {"trusted_ca": {"filename": "/x"}}}
    assert _settings_errors(ts, secrets=[ca_secret]) == [
        f"{CTC}.tls_certificate_sds_secret_configs[0].sds_config: secrets of the "
        "management server's own connection cannot come by SDS; name one of "
        "static_resources.secrets (no sds_config)",
        f"{CTC}.tls_certificate_sds_secret_configs[1].name: static secret 'ca' is not a "
        "tls_certificate",
        f"{CTC}.tls_certificate_sds_secret_configs[2].name: unknown static secret "
        "'nowhere' (static_resources.secrets)",
    ]
    # Another transport socket than TLS or raw_buffer, and transport_socket_matches.
    other = {
        "name": "envoy.transport_sockets.alts",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.alts.v3.Alts",
            "handshaker_service": "127.0.0.1:1",
        },
    }
    assert _settings_errors(other) == [
        f"{TS}.typed_config: type.googleapis.com/envoy.extensions.transport_sockets.alts.v3."
        "Alts: the management server's connection takes envoy.transport_sockets.tls "
        "(UpstreamTlsContext) or raw_buffer"
    ]


def test_tls_settings_grpcio_takes(pki: Pki) -> None:
    """What the channel is built from: roots, client certificate, SNI override."""
    doc = ads_bootstrap(xds_address=("127.0.0.1", 5678), admin_port=9901)
    doc["static_resources"]["clusters"][0]["transport_socket"] = upstream_tls(
        sni=SERVER_NAME,
        alpn=["h2"],
        client_cert=pki.envoy_client,
        validation=validation_context(pki.ca_path),
    )
    settings = parse_dynamic_resources(load_bootstrap(doc))
    assert settings is not None and settings.ads is not None
    target = settings.ads.target
    assert target.secure and target.target == "127.0.0.1:5678"
    assert target.root_certs == pki.ca_path.read_bytes()
    assert target.cert_chain == pki.envoy_client.cert_path.read_bytes()
    assert target.private_key == pki.envoy_client.key_path.read_bytes()
    assert ("grpc.ssl_target_name_override", SERVER_NAME) in target.channel_options
    # raw_buffer is plaintext, as without a transport socket
    doc["static_resources"]["clusters"][0]["transport_socket"] = {
        "name": "envoy.transport_sockets.raw_buffer",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3."
            "RawBuffer"
        },
    }
    settings = parse_dynamic_resources(load_bootstrap(doc))
    assert settings is not None and settings.ads is not None
    assert not settings.ads.target.secure
