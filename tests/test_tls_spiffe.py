"""Envoy's SPIFFE certificate validator (``validation_context.custom_validator_config``
``envoy.tls.cert_validator.spiffe`` with a ``SPIFFECertValidatorConfig``): the peer's
certificate is verified against the bundle of the trust domain its SPIFFE ID names
(``spiffe://<trust domain>/...``, its URI SAN), and only against that one.

Two trust domains, ``a.example`` and ``b.example``, each with its own CA. Every test but
the last takes ``start_proxy`` (envoyx and the real Envoy 1.40, same bootstrap, same
expectations):

- on a listener (client certificates): an SVID of each configured domain is accepted;
  one signed by B's CA claiming A's domain, one of an unconfigured domain, one with no
  URI SAN (or an ``https://`` one) and one without a key usage extension (X509-SVID
  leaf validation) are refused (``ssl.fail_verify_error``);
  no certificate at all is refused too (the validator always requires one:
  ``ssl.fail_verify_no_cert``), with or without ``require_client_certificate``;
- ``match_typed_subject_alt_names`` still applies (``ssl.fail_verify_san``), its URI
  matchers only (a DNS matcher is ignored, as Envoy does);
- on a cluster (server certificates): the upstream's SVID of A is accepted, one from
  B's CA claiming A is a connection failure (``cluster.<name>.ssl.fail_verify_error``).

The last test is envoyx's own: what it does not implement (``trust_bundles``, other
validators) is refused by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.bootstrap import bootstrap, cluster, http_listener, route, virtual_host
from support.proxy import ProxyProcess
from support.tls import (
    Authority,
    CertFiles,
    TlsUpstream,
    client_context,
    downstream_tls,
    https_listener,
    https_request,
    listener_stat,
    refused_by_peer,
    san_matcher,
    shared_pki,
    spiffe_validation_context,
    stat_deltas,
    upstream_tls,
)
from support.wait import free_port

StartProxy = Callable[..., ProxyProcess]
Json = dict[str, Any]

SERVER = "server.example.com"
A_WEB = "spiffe://a.example/ns/default/sa/web"
A_DB = "spiffe://a.example/ns/default/sa/db"
B_API = "spiffe://b.example/ns/prod/sa/api"


class SpiffePki:
    """Two trust domains' CAs and their SVIDs (client and server usages both)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_a = Authority(directory, "spiffe-a-ca")
        self.ca_b = Authority(directory, "spiffe-b-ca")
        # X509-SVIDs: both usages, and a key usage extension (Envoy's validator
        # refuses a leaf without one).
        svid: Json = {"client": True, "server": True, "key_usage": True}
        self.a_web = self.ca_a.issue("a-web", uris=(A_WEB,), dns=("web.a.example",), **svid)
        self.a_db = self.ca_a.issue("a-db", uris=(A_DB,), **svid)
        self.b_api = self.ca_b.issue("b-api", uris=(B_API,), **svid)
        # B's CA signs an SVID of A's trust domain: only A's bundle may vouch for it.
        self.b_claims_a = self.ca_b.issue("b-claims-a", uris=(A_WEB,), **svid)
        # A's CA, a domain nobody configured.
        self.a_unknown = self.ca_a.issue(
            "a-unknown", uris=("spiffe://c.example/ns/x/sa/y",), **svid
        )
        # A's CA, no URI SAN at all; and an https:// URI that is no SPIFFE ID.
        self.a_no_uri = self.ca_a.issue("a-no-uri", dns=("web.a.example",), **svid)
        self.a_https = self.ca_a.issue("a-https", uris=("https://a.example/web",), **svid)
        # A's CA, a good SPIFFE ID but no key usage extension.
        self.a_no_ku = self.ca_a.issue("a-no-ku", uris=(A_WEB,), client=True, server=True)

    def bundles(self) -> dict[str, Path]:
        return {"a.example": self.ca_a.cert_path, "b.example": self.ca_b.cert_path}


@pytest.fixture(scope="module")
def spki(tmp_path_factory: pytest.TempPathFactory) -> SpiffePki:
    return SpiffePki(tmp_path_factory.mktemp("spiffe-pki"))


def serve(start: StartProxy, validation: Json, **extra: Any) -> ProxyProcess:
    """A TLS listener (the shared PKI's server certificate) answering ``200 hello``."""
    lis = https_listener(
        free_port(),
        downstream_tls([shared_pki().server_ecdsa], validation=validation, **extra),
    )
    return start(bootstrap(admin_port=free_port(), listeners=[lis], clusters=[]))


def ssl_stat(proxy: ProxyProcess, name: str) -> str:
    return listener_stat(proxy.listener_address(), f"ssl.{name}")


def request(proxy: ProxyProcess, cert: CertFiles | None) -> int:
    ctx = client_context(shared_pki(), cert=cert)
    resp, _ = https_request(proxy.listener_address(), ctx, server_name=SERVER)
    return resp.status


def refused(proxy: ProxyProcess, cert: CertFiles | None) -> str:
    return refused_by_peer(lambda: request(proxy, cert))


STATS = ("handshake", "fail_verify_error", "fail_verify_san", "fail_verify_no_cert")


def expect(proxy: ProxyProcess, before: dict[str, int], **deltas: int) -> None:
    """Every ``ssl.*`` verification stat moved by its delta (0 when not named)."""
    stat_deltas(proxy, before, {ssl_stat(proxy, s): deltas.get(s, 0) for s in STATS})


# -- client certificates -----------------------------------------------------------------


@pytest.mark.parametrize("require", [True, False], ids=["required", "not-required"])
def test_client_svids_are_verified_against_their_trust_domains_bundle(
    start_proxy: StartProxy, spki: SpiffePki, require: bool
) -> None:
    extra = {"require_client_certificate": True} if require else {}
    proxy = serve(start_proxy, spiffe_validation_context(spki.bundles()), **extra)

    for ok in (spki.a_web, spki.b_api):
        before = proxy.stats()
        assert request(proxy, ok) == 200, ok.name
        expect(proxy, before, handshake=1)

    for bad in (spki.b_claims_a, spki.a_unknown, spki.a_no_uri, spki.a_https, spki.a_no_ku):
        before = proxy.stats()
        refused(proxy, bad)
        expect(proxy, before, fail_verify_error=1)

    # No certificate: the SPIFFE validator requires one either way.
    before = proxy.stats()
    refused(proxy, None)
    expect(proxy, before, fail_verify_no_cert=1)


def test_only_the_named_trust_domains_bundle_vouches(
    start_proxy: StartProxy, spki: SpiffePki
) -> None:
    """With A's domain alone configured, B's SVID is refused even though A's bundle is
    the only one there is; A's SVID is accepted."""
    proxy = serve(start_proxy, spiffe_validation_context({"a.example": spki.ca_a.cert_path}))
    before = proxy.stats()
    assert request(proxy, spki.a_web) == 200
    refused(proxy, spki.b_api)
    refused(proxy, spki.b_claims_a)
    expect(proxy, before, handshake=1, fail_verify_error=2)


SAN_CASES = [
    pytest.param([san_matcher("URI", exact=A_WEB)], True, id="uri-exact"),
    pytest.param([san_matcher("URI", exact=A_DB)], False, id="uri-other"),
    pytest.param([san_matcher("URI", prefix="spiffe://a.example/ns/default/")], True, id="prefix"),
    # Only URI matchers count under the SPIFFE validator: a DNS matcher that does not
    # match is ignored, so is one that does.
    pytest.param([san_matcher("DNS", exact="nothing.example")], True, id="dns-ignored"),
    pytest.param(
        [san_matcher("DNS", exact="web.a.example"), san_matcher("URI", exact=A_DB)],
        False,
        id="dns-match-ignored",
    ),
]


@pytest.mark.parametrize(("matchers", "accepted"), SAN_CASES)
def test_match_typed_subject_alt_names_apply_to_the_svid(
    start_proxy: StartProxy, spki: SpiffePki, matchers: list[Json], accepted: bool
) -> None:
    proxy = serve(start_proxy, spiffe_validation_context(spki.bundles(), san_matchers=matchers))
    before = proxy.stats()
    if accepted:
        assert request(proxy, spki.a_web) == 200
        expect(proxy, before, handshake=1)
    else:
        refused(proxy, spki.a_web)
        expect(proxy, before, fail_verify_san=1)


# -- server certificates -------------------------------------------------------------------


@pytest.fixture(scope="module")
def spiffe_upstreams(spki: SpiffePki) -> Iterator[dict[str, TlsUpstream]]:
    ups = {
        "good": TlsUpstream("good", spki.a_web),
        "impostor": TlsUpstream("impostor", spki.b_claims_a),
    }
    for up in ups.values():
        up.start()
    yield ups
    for up in ups.values():
        up.stop()


def test_upstream_svid_is_verified_against_its_trust_domains_bundle(
    start_proxy: StartProxy, spki: SpiffePki, spiffe_upstreams: dict[str, TlsUpstream]
) -> None:
    clusters = []
    for name, up in spiffe_upstreams.items():
        c = cluster(name, [up.address])
        c["transport_socket"] = upstream_tls(
            validation=spiffe_validation_context(
                {"a.example": spki.ca_a.cert_path},
                san_matchers=[san_matcher("URI", exact=A_WEB)],
            )
        )
        clusters.append(c)
    lis = http_listener(
        port=free_port(),
        virtual_hosts=[
            virtual_host(
                "all", ["*"], [route({"prefix": f"/{n}/"}, cluster=n) for n in spiffe_upstreams]
            )
        ],
    )
    proxy = start_proxy(bootstrap(admin_port=free_port(), listeners=[lis], clusters=clusters))
    before = proxy.stats()
    with httpx.Client(base_url=proxy.url(), timeout=10) as client:
        assert client.get("/good/x").status_code == 200
        assert client.get("/impostor/x").status_code == 503
    stat_deltas(
        proxy,
        before,
        {
            "cluster.good.ssl.handshake": 1,
            "cluster.good.ssl.fail_verify_error": 0,
            "cluster.impostor.ssl.handshake": 0,
            "cluster.impostor.ssl.fail_verify_error": 1,
            "cluster.impostor.ssl.fail_verify_san": 0,
        },
    )


# -- envoyx's own ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("validator", "message"),
    [
        pytest.param(
            {
                "name": "envoy.tls.cert_validator.spiffe",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                    "SPIFFECertValidatorConfig",
                    "trust_domains": [
                        {"name": "a.example", "trust_bundle": {"filename": "/dev/null"}}
                    ],
                    "trust_bundles": {"filename": "/nonexistent/bundle.json"},
                },
            },
            "trust_bundles: not supported by envoyx",
            id="trust-bundles",
        ),
        pytest.param(
            {
                "name": "envoy.tls.cert_validator.default",
                "typed_config": {
                    "@type": "type.googleapis.com/google.protobuf.Empty",
                },
            },
            "is not supported by envoyx",
            id="other-validator",
        ),
    ],
)
def test_what_envoyx_does_not_implement_is_refused_by_name(
    start_envoyx: StartProxy, validator: Json, message: str
) -> None:
    lis = https_listener(
        free_port(),
        downstream_tls(
            [shared_pki().server_ecdsa], validation={"custom_validator_config": validator}
        ),
    )
    proxy = start_envoyx(
        bootstrap(admin_port=free_port(), listeners=[lis], clusters=[]), wait_ready=False
    )
    assert proxy.wait_exit(20) != 0
    assert message in proxy.log_text()
