"""SDS over ADS: TLS certificates and CAs as ``Secret`` resources
(``type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret``) from the
repo's ADS server (:mod:`support.xds_server`), named by listeners
(``tls_certificate_sds_secret_configs``) and clusters
(``validation_context_sds_secret_config``) with ``sds_config: {ads: {}}``.

Every scenario runs through each proxy of ``ENVOYX_E2E_TARGETS`` (``start_proxy``; the
real Envoy 1.40 shows the behaviour asserted is Envoy's) and in both protocol variants
(State of the World and Delta). Certificates come from :func:`support.tls.shared_pki`.

What Envoy does, as these scenarios show it:

- A secret is subscribed to (by name, on the ADS stream) once a listener or cluster
  naming it arrives: the SDS request follows the LDS/CDS response that brought it. Its
  stats are ``sds.<name>.update_attempt`` (1 from the subscription's start),
  ``update_success``, ``update_rejected``, ``update_failure``, ``init_fetch_timeout``,
  ``version``, ``update_time`` and ``key_rotation_failed``.
- Warming: a listener waits for its certificate (``warming_state``, its port refuses
  connections) and the LDS answer does not wait for it; a cluster added after start-up
  waits for its secret and so does the CDS answer (Envoy pauses CDS while a cluster
  warms). At start-up the clusters' secrets come before LDS is asked for, and the proxy
  is ready once the listeners' secrets are there.
- A secret pushed again (rotation) is used by the next handshakes; established
  connections go on with the certificate they have.
- A secret the server never sends keeps the listener warming (until the SDS
  ``initial_fetch_timeout``, 15 s by default). But in Delta, a server that answers the
  subscription with the name in ``removed_resources`` (it has no such secret) ends the
  wait: Envoy ACKs, counts an ``update_success``, and the listener goes active without
  a certificate, resetting every handshake.
"""

from __future__ import annotations

import http.client
import itertools
import json
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from envoyx.xds._hash import version_gauge
from support.proxy import EnvoyxProcess, ProxyProcess
from support.tls import (
    Pki,
    TlsUpstream,
    client_context,
    downstream_tls,
    handshake,
    https_request,
    refused_by_peer,
    shared_pki,
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
from support.xds_server import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    SECRET,
    XdsRequest,
    XdsServer,
    short,
)

StartProxy = Callable[..., ProxyProcess]
Json = dict[str, Any]

API_TYPES = {"sotw": "GRPC", "delta": "DELTA_GRPC"}
SERVER_NAME = "server.example.com"  # a DNS SAN of the PKI's server certificates
UPSTREAM_NAME = "backend.example.com"  # a DNS SAN of the PKI's upstream certificate
TIMEOUT = 10.0
HOLD_S = 1.0  # how long a "still waiting" state is watched
MAIN = "main"
ROUTES = "routes"
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


@pytest.fixture
def tls_upstream(pki: Pki) -> Iterator[TlsUpstream]:
    up = TlsUpstream("tls-upstream", pki.upstream)
    up.start()
    yield up
    up.stop()


# ------------------------------------------------------------------------------------
# resources
# ------------------------------------------------------------------------------------


def certificate_secret(name: str, cert: Any) -> Json:
    """A Secret holding a certificate and its key (inline)."""
    return {
        "name": name,
        "tls_certificate": {
            "certificate_chain": {"inline_string": cert.cert_pem},
            "private_key": {"inline_string": cert.key_pem},
        },
    }


def ca_secret(name: str, pki: Pki) -> Json:
    """A Secret holding a validation context: the PKI's root as trusted CA."""
    return {
        "name": name,
        "validation_context": {"trusted_ca": {"inline_string": pki.ca_path.read_text()}},
    }


def sds(name: str, initial_fetch_timeout: str | None = None) -> Json:
    return {"name": name, "sds_config": ads_source(initial_fetch_timeout)}


def tls_listener(
    name: str, port: int, secret: str, *, initial_fetch_timeout: str | None = None
) -> Json:
    """Listener ``name``: TLS with the certificate of SDS secret ``secret``, routes by
    RDS (``routes``)."""
    doc = listener(name, port, route_config_name=ROUTES)
    socket_ = downstream_tls([])
    socket_["typed_config"]["common_tls_context"] = {
        "tls_certificate_sds_secret_configs": [sds(secret, initial_fetch_timeout)]
    }
    doc["filter_chains"][0]["transport_socket"] = socket_
    return doc


def tls_cluster(name: str, address: tuple[str, int], ca: str) -> Json:
    """A STATIC cluster originating TLS (SNI ``backend.example.com``) that validates
    the upstream with the CA of SDS secret ``ca``."""
    socket_ = upstream_tls(sni=UPSTREAM_NAME)
    socket_["typed_config"]["common_tls_context"] = {
        "validation_context_sds_secret_config": sds(ca)
    }
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": cluster_load_assignment(name, [address]),
        "transport_socket": socket_,
    }


# ------------------------------------------------------------------------------------
# the world: management server, proxy, clients
# ------------------------------------------------------------------------------------


@dataclass
class World:
    server: XdsServer
    mode: str
    launch: StartProxy
    pki: Pki
    upstream: HttpUpstream
    node_id: str = field(default_factory=lambda: f"sds-{next(_seq)}")
    port: int = field(default_factory=free_port)
    proxy: ProxyProcess | None = None
    expected_nacks: list[XdsRequest] = field(default_factory=list)

    def base(self, **types: dict[str, Any]) -> dict[str, str]:
        """Cluster ``a`` (EDS: the HTTP upstream) and routes to it, plus ``types``."""
        resources: dict[str, dict[str, Any]] = {
            CLUSTER: {"a": eds_cluster("a")},
            ENDPOINT: {"a": cluster_load_assignment("a", [self.upstream.address])},
            LISTENER: {},
            ROUTE: {ROUTES: simple_routes(ROUTES, "a")},
        }
        for type_url, named in types.items():
            resources[type_url] = {**resources.get(type_url, {}), **named}
        return self.server.set_snapshot(resources)

    def start(self, *, wait_ready: bool = True) -> ProxyProcess:
        doc = ads_bootstrap(
            xds_address=self.server.address,
            admin_port=free_port(),
            api_type=API_TYPES[self.mode],  # type: ignore[arg-type]
            node_id=self.node_id,
        )
        self.proxy = self.launch(doc, wait_ready=wait_ready)
        return self.proxy

    @property
    def p(self) -> ProxyProcess:
        assert self.proxy is not None, "proxy not started"
        return self.proxy

    # -- pushing -----------------------------------------------------------------------

    def push(self, type_url: str, resources: dict[str, Any]) -> str:
        """Add/replace resources and wait until the proxy ACKs them."""
        since = self.server.mark()
        version = self.server.update(type_url, resources)
        self.server.wait_for_ack(type_url, version, TIMEOUT, since=since)
        return version

    def version_of(self, type_url: str, name: str) -> str:
        """The version_info /config_dump shows: the type's (SotW) or the resource's
        own (Delta)."""
        if self.mode == "delta":
            return self.server.resource_version(type_url, name)
        version = self.server.version(type_url)
        assert version is not None
        return version

    # -- clients -----------------------------------------------------------------------

    def https(self, path: str = "/") -> tuple[int, str | None, str | None]:
        """GET over a new TLS connection (SNI server.example.com): status, the
        upstream that answered, the common name of the certificate served."""
        resp, hs = https_request(
            ("127.0.0.1", self.port),
            client_context(self.pki),
            path,
            server_name=SERVER_NAME,
            host="sds.test",
        )
        return resp.status, resp.header("x-upstream"), hs.peer_cn

    def handshake_cn(self) -> str | None:
        return handshake(
            ("127.0.0.1", self.port), client_context(self.pki), server_name=SERVER_NAME
        ).peer_cn

    def refuses_connections(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2):
                return False
        except ConnectionRefusedError:
            return True

    # -- observing the proxy -----------------------------------------------------------

    def dump(self) -> Json:
        status, _, body = self.p.admin("/config_dump")
        assert status == 200, body[:300]
        return {c["@type"].rsplit(".", 1)[-1]: c for c in json.loads(body)["configs"]}

    def listener_state(self, name: str) -> str | None:
        for lis in self.dump().get("ListenersConfigDump", {}).get("dynamic_listeners", []):
            if lis["name"] == name:
                for state in ("active_state", "warming_state", "draining_state"):
                    if state in lis:
                        return state
        return None

    def clusters(self) -> tuple[set[str], set[str]]:
        """Names of the dynamic (active, warming) clusters."""
        dump = self.dump().get("ClustersConfigDump", {})
        active = {c["cluster"]["name"] for c in dump.get("dynamic_active_clusters", [])}
        warming = {c["cluster"]["name"] for c in dump.get("dynamic_warming_clusters", [])}
        return active, warming

    def secrets(self) -> dict[str, list[Json]]:
        """/config_dump's SecretsConfigDump: ``dynamic_active_secrets``, ...

        Envoy redacts private keys there: ``"[redacted]"``."""
        dump = self.dump().get("SecretsConfigDump", {})
        return {k: v for k, v in dump.items() if k != "@type"}

    def stat(self, name: str) -> int | None:
        return self.p.stats().get(name)

    def sds_stats(self, secret: str) -> dict[str, int]:
        prefix = f"sds.{secret}."
        return {k[len(prefix) :]: v for k, v in self.p.stats().items() if k.startswith(prefix)}

    def holds(self, condition: Callable[[], bool], what: str, seconds: float = HOLD_S) -> None:
        """``condition`` is true now and stays true for ``seconds`` (a state that must
        not change, watched; not a synchronisation)."""
        deadline = time.monotonic() + seconds
        while True:
            assert condition(), f"{what}: no longer true\n{self.server.describe()}"
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def check_all_answered(self) -> None:
        """Every response on a live stream was ACKed; the only NACKs are the expected."""
        srv = self.server

        def unanswered() -> list[str]:
            live = {sid for sid, _, _ in srv.streams()}
            answered = {
                (r.stream_id, r.response_nonce) for r in srv.requests() if r.kind in ("ack", "nack")
            }
            return [
                f"{short(r.type_url)} v{r.version} nonce {r.nonce}"
                for r in srv.responses()
                if r.stream_id in live and (r.stream_id, r.nonce) not in answered
            ]

        until(lambda: not unanswered(), timeout=TIMEOUT, what="every response answered")
        unexpected = [n for n in srv.requests(kind="nack") if n not in self.expected_nacks]
        assert not unexpected, [n.error_detail for n in unexpected]


@pytest.fixture
def world(
    start_proxy: StartProxy, xds: XdsServer, mode: str, pki: Pki, http_upstream: HttpUpstream
) -> World:
    return World(xds, mode, start_proxy, pki, http_upstream)


def first(server: XdsServer, type_url: str, **kw: Any) -> XdsRequest:
    requests = server.requests(type_url, **kw)
    assert requests, f"no {short(type_url)} request\n{server.describe()}"
    return requests[0]


def requested_names(request: XdsRequest) -> tuple[str, ...]:
    return request.resource_names if request.mode == "sotw" else request.subscribe


# ------------------------------------------------------------------------------------
# listeners
# ------------------------------------------------------------------------------------


def test_listener_certificate_by_sds(world: World) -> None:
    """The listener's certificate is the SDS secret it names: asked for once the
    listener arrives, served to HTTPS clients; the proxy is ready only with it."""
    versions = world.base(
        **{
            LISTENER: {MAIN: tls_listener(MAIN, world.port, "server-cert")},
            SECRET: {"server-cert": certificate_secret("server-cert", world.pki.server_ecdsa)},
        }
    )
    world.start()
    srv = world.server
    srv.wait_for_ack(SECRET, versions[SECRET], TIMEOUT)
    sds_request = first(srv, SECRET)
    assert requested_names(sds_request) == ("server-cert",)
    assert srv.responses(LISTENER)[0].seq < sds_request.seq, srv.describe()

    assert world.https() == (200, "a", world.pki.server_ecdsa.common_name)
    assert world.listener_state(MAIN) == "active_state"
    stats = world.sds_stats("server-cert")
    assert stats["update_success"] == 1
    assert stats["update_attempt"] == 2  # the subscription's start, the update
    assert stats["update_rejected"] == stats["update_failure"] == 0
    assert stats["init_fetch_timeout"] == stats["key_rotation_failed"] == 0
    expected = version_gauge(versions[SECRET])
    if isinstance(world.p, EnvoyxProcess):
        # envoyx's gauges are signed 64-bit: a version keeps xxh64's low 63 bits.
        expected &= 0x7FFF_FFFF_FFFF_FFFF
    assert stats["version"] == expected

    active = world.secrets()["dynamic_active_secrets"]
    assert [s["name"] for s in active] == ["server-cert"]
    assert active[0]["version_info"] == world.version_of(SECRET, "server-cert")
    cert = active[0]["secret"]["tls_certificate"]
    assert cert["private_key"] == {"inline_string": "[redacted]"}
    assert "BEGIN CERTIFICATE" in cert["certificate_chain"]["inline_string"]
    world.check_all_answered()


def test_rotated_secret_serves_new_connections(world: World) -> None:
    """A new certificate pushed for the secret: new handshakes get it; a connection
    established before keeps its certificate and goes on serving."""
    world.base(
        **{
            LISTENER: {MAIN: tls_listener(MAIN, world.port, "server-cert")},
            SECRET: {"server-cert": certificate_secret("server-cert", world.pki.server_ecdsa)},
        }
    )
    world.start()
    before = http.client.HTTPSConnection(
        "127.0.0.1", world.port, timeout=5, context=client_context(world.pki)
    )
    try:
        before.request("GET", "/1", headers={"host": "sds.test"})
        assert before.getresponse().read() and before.sock is not None
        assert isinstance(before.sock, ssl.SSLSocket)
        first_cert = before.sock.getpeercert(binary_form=True)

        world.push(SECRET, {"server-cert": certificate_secret("server-cert", world.pki.server_rsa)})
        until(
            lambda: world.handshake_cn() == world.pki.server_rsa.common_name,
            timeout=TIMEOUT,
            what="new handshakes served the rotated certificate",
        )
        assert world.https() == (200, "a", world.pki.server_rsa.common_name)

        before.request("GET", "/2", headers={"host": "sds.test"})
        resp = before.getresponse()
        assert resp.status == 200 and resp.getheader("x-upstream") == "a"
        resp.read()
        assert before.sock.getpeercert(binary_form=True) == first_cert
    finally:
        before.close()
    assert world.sds_stats("server-cert")["update_success"] == 2
    world.check_all_answered()


def test_listener_waits_for_a_secret_never_sent(world: World) -> None:
    """A listener naming a secret the server does not send stays warming (its port
    refuses connections); the LDS update is answered without waiting for it. Once the
    secret comes, the listener serves with it."""
    world.base()  # no secret at all: the server never answers the SDS subscription
    world.start()
    srv = world.server
    since = srv.mark()
    world.push(LISTENER, {MAIN: tls_listener(MAIN, world.port, "late-cert")})
    srv.wait_for_request(
        lambda r: r.type_url == SECRET and "late-cert" in requested_names(r),
        since=since,
        timeout=TIMEOUT,
        what="the SDS subscription of late-cert",
    )
    world.holds(
        lambda: world.listener_state(MAIN) == "warming_state" and world.refuses_connections(),
        "the listener warms and refuses connections",
    )
    assert srv.responses(SECRET) == []
    assert world.stat("listener_manager.total_listeners_warming") == 1
    stats = world.sds_stats("late-cert")
    assert (stats["update_attempt"], stats["update_success"]) == (1, 0)

    world.push(SECRET, {"late-cert": certificate_secret("late-cert", world.pki.server_ecdsa)})
    until(lambda: not world.refuses_connections(), timeout=TIMEOUT, what="listener active")
    assert world.https() == (200, "a", world.pki.server_ecdsa.common_name)
    assert world.listener_state(MAIN) == "active_state"
    world.check_all_answered()


def test_secret_initial_fetch_timeout_activates_the_listener_without_it(world: World) -> None:
    """The secret does not come within its ``initial_fetch_timeout`` (1 s here, in the
    listener's ``sds_config``): the wait ends, ``init_fetch_timeout`` is counted, and
    the listener goes active without a certificate: every handshake fails."""
    world.base()  # the server never answers the SDS subscription
    world.start()
    since = world.server.mark()
    world.push(LISTENER, {MAIN: tls_listener(MAIN, world.port, "slow", initial_fetch_timeout="1s")})
    world.server.wait_for_request(
        lambda r: r.type_url == SECRET and "slow" in requested_names(r),
        since=since,
        timeout=TIMEOUT,
        what="the SDS subscription of slow",
    )
    until(lambda: world.listener_state(MAIN) == "active_state", timeout=TIMEOUT, what="active")
    until(lambda: not world.refuses_connections(), timeout=TIMEOUT, what="listening")
    refused_by_peer(world.handshake_cn)
    stats = world.sds_stats("slow")
    assert stats["init_fetch_timeout"] == 1
    assert stats["update_attempt"] == 2  # the subscription's start, the timeout
    assert stats["update_success"] == 0
    world.check_all_answered()


@pytest.mark.parametrize("mode", ["delta"])
def test_delta_secret_reported_missing_activates_the_listener_without_it(world: World) -> None:
    """Delta: the server answers the subscription of a secret it does not have with
    the name in ``removed_resources``. Envoy ignores the removal, ACKs it (counted as a
    successful update) and ends the listener's wait: the listener goes active without
    a certificate, and every handshake fails. (In State of the World a server sends
    nothing for a name it does not have: see the test above.)"""
    world.base(**{SECRET: {"other": certificate_secret("other", world.pki.server_ecdsa)}})
    world.start()
    srv = world.server
    since = srv.mark()
    world.push(LISTENER, {MAIN: tls_listener(MAIN, world.port, "missing")})
    response = until(
        lambda: next(iter(srv.responses(SECRET, since=since)), None),
        timeout=TIMEOUT,
        what="the SDS answer",
    )
    assert response.removed == ("missing",) and response.resource_names == ()
    srv.wait_for_ack(SECRET, response.version, TIMEOUT, since=since)
    until(lambda: world.listener_state(MAIN) == "active_state", timeout=TIMEOUT, what="active")
    until(lambda: not world.refuses_connections(), timeout=TIMEOUT, what="listening")
    refused_by_peer(world.handshake_cn)
    stats = world.sds_stats("missing")
    assert (stats["update_success"], stats["update_rejected"]) == (1, 0)
    world.check_all_answered()


def test_invalid_secret_is_nacked_and_the_old_one_kept(world: World) -> None:
    """A secret that breaks Envoy's schema rules (an empty session ticket key list) is
    NACKed; the listener goes on serving the certificate it had."""
    world.base(
        **{
            LISTENER: {MAIN: tls_listener(MAIN, world.port, "server-cert")},
            SECRET: {"server-cert": certificate_secret("server-cert", world.pki.server_ecdsa)},
        }
    )
    world.start()
    srv = world.server
    since = srv.mark()
    invalid = {"name": "server-cert", "session_ticket_keys": {"keys": []}}
    version = srv.update(SECRET, {"server-cert": invalid})
    nack = srv.wait_for_nack(SECRET, version, TIMEOUT, since=since)
    world.expected_nacks.append(nack)
    assert nack.error_detail
    stats = world.sds_stats("server-cert")
    assert (stats["update_success"], stats["update_rejected"]) == (1, 1)
    assert world.https() == (200, "a", world.pki.server_ecdsa.common_name)
    world.check_all_answered()


# ------------------------------------------------------------------------------------
# clusters
# ------------------------------------------------------------------------------------


def test_cluster_secret_comes_before_listeners_at_start_up(
    world: World, tls_upstream: TlsUpstream
) -> None:
    """At start-up the secrets of the clusters are fetched before LDS is asked for
    (the clusters are not initialized without them); the CDS answer does not wait for
    them. Traffic then reaches the TLS upstream, validated with the secret's CA."""
    versions = world.base(
        **{
            CLUSTER: {"tls": tls_cluster("tls", tls_upstream.address, "upstream-ca")},
            LISTENER: {MAIN: listener(MAIN, world.port, route_config_name=ROUTES)},
            ROUTE: {ROUTES: simple_routes(ROUTES, "tls")},
            SECRET: {"upstream-ca": ca_secret("upstream-ca", world.pki)},
        }
    )
    world.start()
    srv = world.server
    srv.wait_for_ack(ROUTE, versions[ROUTE], TIMEOUT)
    sds_request, lds_request = first(srv, SECRET), first(srv, LISTENER)
    sds_response = srv.responses(SECRET)[0]
    assert srv.responses(CLUSTER)[0].seq < sds_request.seq < sds_response.seq < lds_request.seq, (
        srv.describe()
    )
    assert requested_names(sds_request) == ("upstream-ca",)

    conn = http.client.HTTPConnection("127.0.0.1", world.port, timeout=5)
    try:
        conn.request("GET", "/", headers={"host": "sds.test", "connection": "close"})
        resp = conn.getresponse()
        body = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 200 and resp.getheader("x-upstream") == "tls-upstream"
    assert body["tls"]["sni"] == UPSTREAM_NAME
    assert world.sds_stats("upstream-ca")["update_success"] == 1
    world.check_all_answered()


def test_new_cluster_waits_for_its_secret_and_so_does_the_cds_answer(
    world: World, tls_upstream: TlsUpstream
) -> None:
    """After start-up, a cluster whose CA comes by SDS warms until the secret arrives,
    and the CDS update is answered only then (Envoy pauses CDS while a cluster warms);
    then traffic reaches the TLS upstream through it."""
    main = listener(MAIN, world.port, route_config_name=ROUTES)
    versions = world.base(**{LISTENER: {MAIN: main}})
    world.start()
    srv = world.server
    srv.wait_for_ack(ROUTE, versions[ROUTE], TIMEOUT)

    since = srv.mark()
    v_cds = srv.update(CLUSTER, {"tls": tls_cluster("tls", tls_upstream.address, "upstream-ca")})
    srv.wait_for_request(
        lambda r: r.type_url == SECRET and "upstream-ca" in requested_names(r),
        since=since,
        timeout=TIMEOUT,
        what="the SDS subscription of upstream-ca",
    )
    world.holds(
        lambda: "tls" in world.clusters()[1] and not srv.requests(CLUSTER, since=since),
        "the cluster warms and CDS is not answered",
    )

    v_sds = srv.update(SECRET, {"upstream-ca": ca_secret("upstream-ca", world.pki)})
    cds_ack = srv.wait_for_ack(CLUSTER, v_cds, TIMEOUT, since=since)
    srv.wait_for_ack(SECRET, v_sds, TIMEOUT, since=since)
    assert srv.responses(SECRET, since=since)[0].seq < cds_ack.seq
    until(lambda: "tls" in world.clusters()[0], timeout=TIMEOUT, what="cluster tls active")

    world.push(ROUTE, {ROUTES: simple_routes(ROUTES, "tls")})
    conn = http.client.HTTPConnection("127.0.0.1", world.port, timeout=5)
    try:
        conn.request("GET", "/", headers={"host": "sds.test", "connection": "close"})
        resp = conn.getresponse()
        resp.read()
    finally:
        conn.close()
    assert resp.status == 200 and resp.getheader("x-upstream") == "tls-upstream"
    world.check_all_answered()
