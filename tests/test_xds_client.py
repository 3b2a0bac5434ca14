"""envoyx's xDS client (python/envoyx/xds) against the ADS management server of
:mod:`support.xds_server`, State of the World and Delta, with a fake core that records
what it is asked to apply (so the protocol is tested apart from the data plane).

What Envoy 1.40 does, as observed with that server (and asserted against real Envoy
in test_xds_envoy.py), is what the client must do: ACK/NACK shapes, the version kept
on a NACK, partial acceptance, duplicate names, wildcard and named subscriptions,
SotW and Delta deletions, reconnection with the client's state, the start-up order
(CDS, EDS, then LDS, RDS) and ``initial_fetch_timeout``.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import types
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, ClassVar

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, json_format

import envoyx
from envoyx import ConfigError
from envoyx.config import load_bootstrap
from envoyx.xds import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    NACK_CODE,
    ROUTE,
    Applier,
    Backoff,
    StreamProtocol,
    XdsClient,
    build_node,
    parse_dynamic_resources,
)
from envoyx.xds._hash import version_gauge, xxh64
from envoyx.xds.settings import CLIENT_FEATURES, GrpcTarget, Source
from support.wait import free_port, until
from support.xds_resources import (
    ADS_SOURCE,
    ads_bootstrap,
    cluster_load_assignment,
    eds_cluster,
    listener,
    simple_routes,
)
from support.xds_server import XdsRequest, XdsServer, short

Json = dict[str, Any]
API_TYPES = {"sotw": "GRPC", "delta": "DELTA_GRPC"}
TIMEOUT = 10.0
MAIN = "main"
MAIN_ROUTES = "main_routes"
_seq = itertools.count(1)


# ------------------------------------------------------------------------------------
# a fake core: records apply() calls, holds what it accepted, computes wanted names
# ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApplyCall:
    type_url: str
    names: tuple[str, ...]
    removed: tuple[str, ...]
    version: str
    documents: dict[str, Json] = field(compare=False, repr=False)


class FakeCore:
    """Stands for ``envoyx._core.Server``: ``apply`` accepts everything except the
    names in :attr:`reject` (name -> reason); ``wanted_resources`` reads the route
    configurations and EDS services of what it holds, as the core does."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[ApplyCall] = []
        self.held: dict[str, dict[str, Json]] = {
            t: {} for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)
        }
        self.reject: dict[str, str] = {}
        self.stats: dict[str, int] = {}

    def apply(
        self, type_url: str, resources: list[tuple[str, str]], removed: list[str], version: str
    ) -> list[tuple[str, str]]:
        docs = {name: json.loads(text) for name, text in resources}
        with self.lock:
            self.calls.append(ApplyCall(type_url, tuple(docs), tuple(removed), version, docs))
            rejected = [(n, self.reject[n]) for n in docs if n in self.reject]
            for name, doc in docs.items():
                if name not in self.reject:
                    self.held[type_url][name] = doc
            for name in removed:
                self.held[type_url].pop(name, None)
        return rejected

    def wanted_resources(self, type_url: str) -> list[str]:
        out: set[str] = set()
        with self.lock:
            if type_url == ENDPOINT:
                for c in self.held[CLUSTER].values():
                    if c.get("type") == "EDS":
                        out.add(c.get("eds_cluster_config", {}).get("service_name") or c["name"])
            elif type_url == ROUTE:
                for lis in self.held[LISTENER].values():
                    for chain in lis.get("filter_chains", []):
                        for flt in chain.get("filters", []):
                            rds = flt.get("typed_config", {}).get("rds")
                            if rds:
                                out.add(rds["route_config_name"])
        return sorted(out)

    def counter_add(self, name: str, value: int) -> None:
        with self.lock:
            self.stats[name] = self.stats.get(name, 0) + value

    def gauge_set(self, name: str, value: int) -> None:
        with self.lock:
            self.stats[name] = value

    # -- test helpers -------------------------------------------------------------------

    def calls_of(self, type_url: str, since: int = 0) -> list[ApplyCall]:
        with self.lock:
            return [c for c in self.calls[since:] if c.type_url == type_url]

    def mark(self) -> int:
        with self.lock:
            return len(self.calls)

    def stat(self, name: str) -> int:
        with self.lock:
            return self.stats.get(name, 0)

    def wait_stat(self, name: str, value: int, timeout: float = TIMEOUT) -> None:
        until(lambda: self.stat(name) == value, timeout=timeout, what=f"{name} == {value}")


# ------------------------------------------------------------------------------------
# the client under test, built from an ADS bootstrap
# ------------------------------------------------------------------------------------


class Harness:
    def __init__(self, bootstrap: Json, node_id: str) -> None:
        self.node_id = node_id
        self.bootstrap = load_bootstrap(bootstrap)
        settings = parse_dynamic_resources(self.bootstrap)
        assert settings is not None
        self.settings = settings
        self.core = FakeCore()
        self.applier = Applier(self.core, self.bootstrap, settings)
        self.client = XdsClient(settings, self.applier)

    def start(self, *, wait: bool = True) -> Harness:
        self.client.start()
        if wait:
            assert self.client.wait_initialized(TIMEOUT), "initial fetch did not complete"
        return self

    def stop(self) -> None:
        self.client.stop()

    def status(self, type_url: str) -> dict[str, Any]:
        return self.client.status()[type_url]


MakeHarness = Callable[..., Harness]


@pytest.fixture
def xds() -> Iterator[XdsServer]:
    server = XdsServer().start()
    yield server
    server.stop()


@pytest.fixture(params=list(API_TYPES))
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_harness(mode: str) -> Iterator[MakeHarness]:
    made: list[Harness] = []

    def make(address: tuple[str, int], **kw: Any) -> Harness:
        node_id = f"xds-client-{mode}-{next(_seq)}"
        doc = ads_bootstrap(
            xds_address=address,
            admin_port=free_port(),
            api_type=API_TYPES[mode],  # type: ignore[arg-type]
            node_id=node_id,
            retry_base=kw.pop("retry_base", "0.05s"),
            retry_max=kw.pop("retry_max", "0.2s"),
            **kw,
        )
        h = Harness(doc, node_id)
        made.append(h)
        return h

    yield make
    for h in made:
        h.stop()


def base_resources(port: int = 10000) -> dict[str, dict[str, Json]]:
    """EDS clusters a and b with their endpoints; listener main whose routes (RDS
    main_routes) go to a."""
    return {
        CLUSTER: {"a": eds_cluster("a"), "b": eds_cluster("b")},
        ENDPOINT: {n: cluster_load_assignment(n, [("127.0.0.1", 9)]) for n in ("a", "b")},
        LISTENER: {MAIN: listener(MAIN, port, route_config_name=MAIN_ROUTES)},
        ROUTE: {MAIN_ROUTES: simple_routes(MAIN_ROUTES, "a")},
    }


def first(server: XdsServer, type_url: str, **kw: Any) -> XdsRequest:
    reqs = server.requests(type_url, **kw)
    assert reqs, f"no {short(type_url)} request\n{server.describe()}"
    return reqs[0]


def types_applied(calls: list[ApplyCall]) -> list[str]:
    """The types of successive apply calls (Delta applies one call per version)."""
    return [
        t for i, t in enumerate(c.type_url for c in calls) if i == 0 or calls[i - 1].type_url != t
    ]


def applied_versions(calls: list[ApplyCall]) -> dict[str, str]:
    return {name: c.version for c in calls for name in c.names}


def names_of(request: XdsRequest) -> list[str]:
    """The names a request subscribes to (SotW: all of them; Delta: the new ones)."""
    return sorted(request.resource_names if request.mode == "sotw" else request.subscribe)


# ------------------------------------------------------------------------------------
# start-up: order, request and ACK shapes, node, status, stats
# ------------------------------------------------------------------------------------


def test_startup_order_ack_shapes_node_and_stats(
    xds: XdsServer, make_harness: MakeHarness, mode: str
) -> None:
    versions = xds.set_snapshot(base_resources())
    h = make_harness(xds.address).start()
    for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE):
        xds.wait_for_ack(t, versions[t], TIMEOUT)

    cds, eds, lds, rds = (first(xds, t) for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE))
    eds_response, lds_response = xds.responses(ENDPOINT)[0], xds.responses(LISTENER)[0]
    # Envoy's order: LDS once the clusters' endpoints arrived, RDS once listeners did.
    assert cds.seq < eds.seq < eds_response.seq < lds.seq < lds_response.seq < rds.seq, (
        xds.describe()
    )
    assert all(r.kind == "initial" and r.response_nonce == "" for r in (cds, eds, lds, rds))
    assert types_applied(h.core.calls) == [CLUSTER, ENDPOINT, LISTENER, ROUTE]
    # the version each resource is applied with: SotW the response's, Delta its own
    for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE):
        assert applied_versions(h.core.calls_of(t)) == {
            n: versions[t] if mode == "sotw" else xds.resource_version(t, n)
            for n in xds.resources(t)
        }

    # node: the bootstrap's, plus envoyx's user agent and client features; in every request
    node = cds.node
    assert (node.id, node.cluster) == (h.node_id, "envoyx-tests")
    assert node.user_agent_name == "envoyx"
    assert node.HasField("user_agent_build_version")
    assert set(CLIENT_FEATURES) <= set(node.client_features)
    assert all(r.raw is not None and r.raw.HasField("node") for r in xds.requests())

    if mode == "sotw":
        # wildcard LDS/CDS: no names; EDS/RDS: the whole named set
        assert cds.resource_names == () and lds.resource_names == ()
        assert sorted(eds.resource_names) == ["a", "b"] and rds.resource_names == (MAIN_ROUTES,)
        assert cds.version_info == ""
        ack = xds.requests(CLUSTER, kind="ack")[0]
        assert ack.version_info == versions[CLUSTER]
        assert ack.response_nonce == xds.responses(CLUSTER)[0].nonce
        assert ack.error_detail is None
    else:
        assert cds.subscribe == () and lds.subscribe == ()  # the legacy wildcard
        assert sorted(eds.subscribe) == ["a", "b"] and rds.subscribe == (MAIN_ROUTES,)
        assert cds.initial_resource_versions == {}
        ack = xds.requests(CLUSTER, kind="ack")[0]
        assert ack.response_nonce == xds.responses(CLUSTER)[0].nonce
        assert ack.subscribe == () and ack.unsubscribe == () and ack.error_detail is None

    status = h.client.status()
    for t, names in (
        (CLUSTER, ["a", "b"]),
        (ENDPOINT, ["a", "b"]),
        (LISTENER, [MAIN]),
        (ROUTE, [MAIN_ROUTES]),
    ):
        assert status[t] == {
            "version": versions[t],
            "nonce": xds.responses(t)[-1].nonce,
            "last_error": None,
            "resources": names,
        }

    s = h.core.stat
    assert s("control_plane.connected_state") == 1
    for prefix in ("cluster_manager.cds.", "listener_manager.lds."):
        assert s(prefix + "update_success") == 1
        assert s(prefix + "update_attempt") == 2  # the subscription's start, the update
        assert s(prefix + "update_rejected") == 0
        assert s(prefix + "version") == version_gauge("1")
    assert s(f"http.{MAIN}.rds.{MAIN_ROUTES}.update_success") == 1
    assert s("cluster.a.update_success") == 1 and s("cluster.b.update_success") == 1
    assert s("cluster.a.update_rejected") == 0


def test_version_gauge_is_envoys_xxhash64() -> None:
    # cluster_manager.cds.version as Envoy 1.40 shows it for version_info "1"
    assert version_gauge("1") == 13237225503670494420
    # reference vectors (the last one takes the 32-byte stripe path)
    assert xxh64(b"") == 0xEF46DB3751D8E999
    assert xxh64(b"abc") == 0x44BC2CF5AD770999
    assert xxh64(b"Nobody inspects the spammish repetition") == 0xFBCEA83C8A378BF1


# ------------------------------------------------------------------------------------
# NACK and partial acceptance
# ------------------------------------------------------------------------------------


def test_nack_keeps_version_partial_acceptance_and_recovery(
    xds: XdsServer, make_harness: MakeHarness, mode: str
) -> None:
    versions = xds.set_snapshot(base_resources())
    h = make_harness(xds.address).start()
    xds.update(ENDPOINT, {"c": cluster_load_assignment("c", [("127.0.0.1", 9)])})
    xds.wait_for_ack(ROUTE, versions[ROUTE], TIMEOUT)
    h.core.reject["bad"] = "cluster manager: cluster provided LB specified but no LB"
    mark = h.core.mark()
    since = xds.mark()

    v2 = xds.update(CLUSTER, {"c": eds_cluster("c"), "bad": eds_cluster("bad")})
    nack = xds.wait_for_nack(CLUSTER, v2, TIMEOUT, since=since)
    message = (
        "Error adding/updating cluster(s) bad: "
        "cluster manager: cluster provided LB specified but no LB"
    )
    assert nack.error_detail == message and nack.error_code == NACK_CODE
    if mode == "sotw":
        assert nack.version_info == versions[CLUSTER]  # the version still in use
    # the valid cluster of the response was applied (with the response's version)
    # a and b are unchanged: not applied again
    assert applied_versions(h.core.calls_of(CLUSTER, mark)) == {
        n: v2 if mode == "sotw" else xds.resource_version(CLUSTER, n) for n in ("bad", "c")
    }
    assert "c" in h.core.held[CLUSTER] and "bad" not in h.core.held[CLUSTER]
    # ... and its endpoints are subscribed to
    xds.wait_for_request(
        lambda r: r.type_url == ENDPOINT and "c" in names_of(r), since=since, timeout=TIMEOUT
    )
    status = h.status(CLUSTER)
    assert status["version"] == versions[CLUSTER]
    assert status["last_error"] == message
    assert status["nonce"] == nack.response_nonce
    assert status["resources"] == ["a", "b", "c"]
    assert h.core.stat("cluster_manager.cds.update_rejected") == 1
    assert h.core.stat("cluster_manager.cds.update_success") == 1
    # the version gauge still shows the accepted version
    assert h.core.stat("cluster_manager.cds.version") == version_gauge(versions[CLUSTER])
    # nothing is asked again: the last CDS response is the NACKed one
    time.sleep(0.2)
    assert xds.responses(CLUSTER)[-1].nonce == nack.response_nonce

    # a valid resource is accepted, and the error is cleared
    h.core.reject.clear()
    since = xds.mark()
    xds.update(ENDPOINT, {"bad": cluster_load_assignment("bad", [("127.0.0.1", 9)])})
    v3 = xds.update(CLUSTER, {"bad": eds_cluster("bad", connect_timeout="2s")})
    ack = xds.wait_for_ack(CLUSTER, v3, TIMEOUT, since=since)
    if mode == "sotw":
        assert ack.version_info == v3
    assert h.status(CLUSTER)["last_error"] is None
    assert h.status(CLUSTER)["version"] == v3
    assert h.core.stat("cluster_manager.cds.update_success") == 2


def test_schema_invalid_resource_is_refused_before_the_core(
    xds: XdsServer, make_harness: MakeHarness, mode: str
) -> None:
    versions = xds.set_snapshot(base_resources())
    h = make_harness(xds.address).start()
    xds.wait_for_ack(ROUTE, versions[ROUTE], TIMEOUT)
    mark, since = h.core.mark(), xds.mark()
    v2 = xds.update(CLUSTER, {"a": {**eds_cluster("a"), "connect_timeout": "-1s"}})
    nack = xds.wait_for_nack(CLUSTER, v2, TIMEOUT, since=since)
    assert nack.error_detail == (
        "Error adding/updating cluster(s) a: connect_timeout: value must be greater than 0s"
    )
    assert h.core.calls_of(CLUSTER, mark) == []  # the core never saw it
    assert h.core.held[CLUSTER]["a"]["connect_timeout"] == "1s"


def test_unknown_type_in_a_listener_is_nacked(
    xds: XdsServer, make_harness: MakeHarness, mode: str
) -> None:
    versions = xds.set_snapshot(base_resources())
    h = make_harness(xds.address).start()
    xds.wait_for_ack(ROUTE, versions[ROUTE], TIMEOUT)
    odd = json_format.ParseDict(
        listener("odd", free_port(), route_config_name=MAIN_ROUTES), listener_pb2.Listener()
    )
    odd.filter_chains[0].filters[
        0
    ].typed_config.type_url = "type.googleapis.com/envoyx.test.Unknown"
    since = xds.mark()
    v2 = xds.update(LISTENER, {"odd": odd})
    nack = xds.wait_for_nack(LISTENER, v2, TIMEOUT, since=since)
    assert nack.error_detail == (
        "Error adding/updating listener(s) odd: filter_chains[0].filters[0].typed_config: "
        'unknown @type "type.googleapis.com/envoyx.test.Unknown"'
    )
    assert "odd" not in h.core.held[LISTENER]
    assert h.core.stat("listener_manager.lds.update_rejected") == 1


def test_duplicate_names_are_nacked(xds: XdsServer, make_harness: MakeHarness, mode: str) -> None:
    """SotW: no copy of the name is applied (Envoy's LDS/CDS apply the first, its RDS
    and EDS do not check), the rest of the response is. Delta (as Envoy): the whole
    response is rejected."""
    versions = xds.set_snapshot(base_resources())
    h = make_harness(xds.address).start()
    xds.wait_for_ack(ROUTE, versions[ROUTE], TIMEOUT)
    since, mark = xds.mark(), h.core.mark()
    version = xds.set_resources(
        CLUSTER, {**xds.resources(CLUSTER), "c": eds_cluster("c")}, duplicates=["c"]
    )
    nack = xds.wait_for_nack(CLUSTER, version, TIMEOUT, since=since)
    assert xds.responses(CLUSTER, since=since)[0].resource_names.count("c") == 2
    if mode == "sotw":
        assert nack.error_detail == "Error adding/updating cluster(s) c: duplicate cluster c found"
        assert "c" not in h.core.held[CLUSTER]
    else:
        assert nack.error_detail == "duplicate name c found among added/updated resources"
        assert h.core.calls_of(CLUSTER, mark) == []
    assert h.core.stat("cluster_manager.cds.update_rejected") == 1


def test_duplicate_route_configuration_is_nacked(
    xds: XdsServer, make_harness: MakeHarness, mode: str
) -> None:
    versions = xds.set_snapshot(base_resources())
    h = make_harness(xds.address).start()
    xds.wait_for_ack(ROUTE, versions[ROUTE], TIMEOUT)
    since = xds.mark()
    version = xds.set_resources(
        ROUTE, {MAIN_ROUTES: simple_routes(MAIN_ROUTES, "b")}, duplicates=[MAIN_ROUTES]
    )
    nack = xds.wait_for_nack(ROUTE, version, TIMEOUT, since=since)
    assert MAIN_ROUTES in (nack.error_detail or "")
    assert h.core.stat(f"http.{MAIN}.rds.{MAIN_ROUTES}.update_rejected") == 1


# ------------------------------------------------------------------------------------
# wildcard and named subscriptions; deletions
# ------------------------------------------------------------------------------------


def test_named_subscriptions_follow_the_clusters_and_sotw_deletion(
    xds: XdsServer, make_harness: MakeHarness, mode: str
) -> None:
    versions = xds.set_snapshot(base_resources())
    h = make_harness(xds.address).start()
    xds.wait_for_ack(ROUTE, versions[ROUTE], TIMEOUT)

    # a new EDS cluster (its own service name): its endpoints are subscribed to
    since = xds.mark()
    xds.update(ENDPOINT, {"svc-c": cluster_load_assignment("svc-c", [("127.0.0.1", 9)])})
    v_cds = xds.update(CLUSTER, {"c": eds_cluster("c", service_name="svc-c")})
    xds.wait_for_ack(CLUSTER, v_cds, TIMEOUT, since=since)
    sub = xds.wait_for_request(
        lambda r: r.type_url == ENDPOINT and "svc-c" in names_of(r), since=since, timeout=TIMEOUT
    )
    if mode == "sotw":
        assert sorted(sub.resource_names) == ["a", "b", "svc-c"]  # always the whole set
        # with the accepted version and the latest nonce of its type
        prev = [p for p in xds.responses(ENDPOINT) if p.seq < sub.seq][-1]
        assert (sub.version_info, sub.response_nonce) == (prev.version, prev.nonce)
    else:
        assert sub.subscribe == ("svc-c",) and sub.unsubscribe == ()
    until(lambda: "svc-c" in h.core.held[ENDPOINT], timeout=TIMEOUT, what="svc-c applied")
    assert h.core.stat("cluster.c.update_success") == 1

    # the cluster leaves CDS: it is removed, and so is its EDS subscription
    since, mark = xds.mark(), h.core.mark()
    v_rm = xds.remove(CLUSTER, ["c"])
    xds.wait_for_ack(CLUSTER, v_rm, TIMEOUT, since=since)
    removal = h.core.calls_of(CLUSTER, mark)
    assert [(c.names, c.removed) for c in removal] == [((), ("c",))]
    unsub = xds.wait_for_request(
        lambda r: (
            r.type_url == ENDPOINT
            and (
                r.unsubscribe == ("svc-c",)
                if mode == "delta"
                else sorted(r.resource_names) == ["a", "b"]
            )
        ),
        since=since,
        timeout=TIMEOUT,
    )
    assert unsub.kind in ("update", "ack")
    assert "svc-c" not in h.status(ENDPOINT)["resources"]

    # an EDS resource gone from the server: SotW cannot say so, Delta says so; either
    # way the core keeps the endpoints (only the parent's removal lets them go)
    since, mark = xds.mark(), h.core.mark()
    v_eds = xds.remove(ENDPOINT, ["a"])
    xds.wait_for_ack(ENDPOINT, v_eds, TIMEOUT, since=since)
    assert all(not c.removed for c in h.core.calls_of(ENDPOINT, mark))
    assert "a" in h.core.held[ENDPOINT]
    if mode == "delta":
        assert [r.removed for r in xds.responses(ENDPOINT, since=since)] == [("a",)]
        assert h.status(ENDPOINT)["resources"] == ["b"]


def test_listener_removal_and_route_subscription_switch(
    xds: XdsServer, make_harness: MakeHarness, mode: str
) -> None:
    versions = xds.set_snapshot(base_resources())
    h = make_harness(xds.address).start()
    xds.wait_for_ack(ROUTE, versions[ROUTE], TIMEOUT)
    xds.update(ROUTE, {"other": simple_routes("other", "b")})
    since = xds.mark()
    port = free_port()
    xds.update(LISTENER, {MAIN: listener(MAIN, port, route_config_name="other")})
    if mode == "sotw":
        xds.wait_for_request(
            lambda r: r.type_url == ROUTE and r.resource_names == ("other",),
            since=since,
            timeout=TIMEOUT,
        )
    else:
        xds.wait_for_request(
            lambda r: (
                r.type_url == ROUTE
                and r.subscribe == ("other",)
                and r.unsubscribe == (MAIN_ROUTES,)
            ),
            since=since,
            timeout=TIMEOUT,
        )
    until(lambda: "other" in h.core.held[ROUTE], timeout=TIMEOUT, what="route other applied")
    assert h.status(ROUTE)["resources"] == ["other"]

    since, mark = xds.mark(), h.core.mark()
    v = xds.remove(LISTENER, [MAIN])
    xds.wait_for_ack(LISTENER, v, TIMEOUT, since=since)
    assert [(c.names, c.removed) for c in h.core.calls_of(LISTENER, mark)] == [((), (MAIN,))]
    if mode == "delta":
        assert [r.removed for r in xds.responses(LISTENER, since=since)] == [(MAIN,)]
    # no listener names a route configuration any more: the subscription empties
    xds.wait_for_request(
        lambda r: (
            r.type_url == ROUTE
            and (r.unsubscribe == ("other",) if mode == "delta" else r.resource_names == ())
        ),
        since=since,
        timeout=TIMEOUT,
    )
    assert h.status(LISTENER)["resources"] == []


def test_cds_answer_waits_for_the_new_clusters_endpoints(
    xds: XdsServer, make_harness: MakeHarness, mode: str
) -> None:
    """As Envoy: a CDS update is ACKed once the EDS clusters it brought are warm (their
    endpoints arrived), so that the ACK means they serve; or once their EDS
    initial_fetch_timeout passed."""
    versions = xds.set_snapshot(base_resources())
    h = make_harness(xds.address).start()
    xds.wait_for_ack(ROUTE, versions[ROUTE], TIMEOUT)
    since = xds.mark()
    v_cds = xds.update(CLUSTER, {"c": eds_cluster("c")})
    sub = xds.wait_for_request(
        lambda r: r.type_url == ENDPOINT and "c" in names_of(r), since=since, timeout=TIMEOUT
    )
    if mode == "delta":
        # Delta can say c does not exist: that answers it, and CDS is ACKed
        xds.wait_for_ack(CLUSTER, v_cds, TIMEOUT, since=since)
    else:
        time.sleep(0.3)
        assert xds.requests(CLUSTER, since=since) == []  # not answered yet
        v_eds = xds.update(ENDPOINT, {"c": cluster_load_assignment("c", [("127.0.0.1", 9)])})
        ack = xds.wait_for_ack(CLUSTER, v_cds, TIMEOUT, since=since)
        eds_ack = xds.wait_for_ack(ENDPOINT, v_eds, TIMEOUT, since=since)
        assert sub.seq < eds_ack.seq < ack.seq

    # a cluster whose endpoints never come: answered after its EDS initial_fetch_timeout
    since = xds.mark()
    slow = {
        **eds_cluster("slow"),
        "eds_cluster_config": {"eds_config": {**ADS_SOURCE, "initial_fetch_timeout": "0.4s"}},
    }
    started = time.monotonic()
    v_slow = xds.update(CLUSTER, {"slow": slow})
    xds.wait_for_ack(CLUSTER, v_slow, TIMEOUT, since=since)
    if mode == "sotw":
        assert time.monotonic() - started >= 0.4
    assert "slow" in h.core.held[CLUSTER]


def test_static_resources_are_never_removed_by_lds_cds(
    xds: XdsServer, make_harness: MakeHarness, mode: str
) -> None:
    """A SotW response lacking the bootstrap's xds_cluster does not remove it (only
    what came over xDS can go), nor does a Delta removal naming it."""
    versions = xds.set_snapshot(base_resources())
    h = make_harness(xds.address).start()
    xds.wait_for_ack(ROUTE, versions[ROUTE], TIMEOUT)
    since, mark = xds.mark(), h.core.mark()
    v = xds.remove(CLUSTER, ["b"])
    xds.wait_for_ack(CLUSTER, v, TIMEOUT, since=since)
    assert [c.removed for c in h.core.calls_of(CLUSTER, mark)] == [("b",)]


# ------------------------------------------------------------------------------------
# the management server goes away
# ------------------------------------------------------------------------------------


def test_reconnect_after_server_restart(
    xds: XdsServer, make_harness: MakeHarness, mode: str
) -> None:
    versions = xds.set_snapshot(base_resources())
    h = make_harness(xds.address).start()
    for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE):
        xds.wait_for_ack(t, versions[t], TIMEOUT)
    known = {
        t: {n: xds.resource_version(t, n) for n in xds.resources(t)}
        for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)
    }
    before = h.client.status()
    old_stream = xds.last_stream_id
    mark = h.core.mark()

    xds.stop()
    h.core.wait_stat("control_plane.connected_state", 0)
    # the last good configuration stays: nothing removed, status unchanged
    assert h.core.calls[mark:] == []
    after = h.client.status()
    assert {t: (s["version"], s["resources"]) for t, s in after.items()} == {
        t: (s["version"], s["resources"]) for t, s in before.items()
    }
    assert h.core.stat("cluster_manager.cds.update_failure") >= 1
    v_rds = xds.set_resources(ROUTE, {MAIN_ROUTES: simple_routes(MAIN_ROUTES, "b")})

    since = xds.mark()
    xds.restart()
    sid = xds.wait_connected(h.node_id, since_stream=old_stream, timeout=TIMEOUT)
    xds.wait_for_ack(ROUTE, v_rds, TIMEOUT, since=since)
    h.core.wait_stat("control_plane.connected_state", 1)

    initial = {
        t: first(xds, t, since=since, stream_id=sid) for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)
    }
    assert all(r.kind == "initial" and r.response_nonce == "" for r in initial.values())
    assert initial[CLUSTER].seq < initial[ENDPOINT].seq < initial[LISTENER].seq < initial[ROUTE].seq
    if mode == "sotw":
        # each type's accepted version, the whole named sets
        assert {t: r.version_info for t, r in initial.items()} == versions
        assert sorted(initial[ENDPOINT].resource_names) == ["a", "b"]
        assert initial[ROUTE].resource_names == (MAIN_ROUTES,)
        for t in (CLUSTER, ENDPOINT, LISTENER):
            xds.wait_for_ack(t, versions[t], TIMEOUT, since=since)
    else:
        assert {t: dict(r.initial_resource_versions) for t, r in initial.items()} == known
        assert sorted(initial[ENDPOINT].subscribe) == ["a", "b"]
        assert initial[ROUTE].subscribe == (MAIN_ROUTES,)
        assert initial[CLUSTER].subscribe == ()
    # only what changed reaches the core (SotW resends everything; unchanged
    # resources are not applied again)
    assert [(c.type_url, c.names) for c in h.core.calls[mark:]] == [(ROUTE, (MAIN_ROUTES,))]
    assert h.status(ROUTE)["version"] == v_rds


def test_unreachable_server_times_out_then_connects(make_harness: MakeHarness, mode: str) -> None:
    port = free_port()
    h = make_harness(("127.0.0.1", port), initial_fetch_timeout="0.3s")
    started = time.monotonic()
    h.start()  # CDS then LDS time out
    assert time.monotonic() - started >= 0.6
    assert h.core.stat("cluster_manager.cds.init_fetch_timeout") == 1
    assert h.core.stat("listener_manager.lds.init_fetch_timeout") == 1
    assert h.core.stat("cluster_manager.cds.update_failure") >= 1
    assert h.core.stat("control_plane.connected_state") == 0

    server = XdsServer(port=port)
    server.set_snapshot(base_resources())
    server.start()
    try:
        # the jittered back-off (50 ms .. 200 ms here) brings the client back
        server.wait_for_ack(ROUTE, "1", TIMEOUT)
        h.core.wait_stat("control_plane.connected_state", 1)
        assert MAIN in h.core.held[LISTENER]
    finally:
        server.stop()


def test_initial_fetch_timeout_then_late_resources(
    xds: XdsServer, make_harness: MakeHarness, mode: str
) -> None:
    """Nothing served: CDS times out, then LDS is asked for and times out; start-up
    completes. Resources served later are applied."""
    h = make_harness(xds.address, initial_fetch_timeout="0.3s")
    started = time.monotonic()
    h.start()
    elapsed = time.monotonic() - started
    assert 0.6 <= elapsed < 5, elapsed
    cds, lds = first(xds, CLUSTER), first(xds, LISTENER)
    assert cds.seq < lds.seq
    assert h.core.stat("cluster_manager.cds.init_fetch_timeout") == 1
    assert h.core.stat("listener_manager.lds.init_fetch_timeout") == 1
    assert h.core.calls == []

    versions = xds.set_snapshot(base_resources())
    xds.wait_for_ack(ROUTE, versions[ROUTE], TIMEOUT)
    assert sorted(h.core.held[CLUSTER]) == ["a", "b"]


def test_listeners_wait_for_cluster_endpoints_or_their_timeout(
    xds: XdsServer, make_harness: MakeHarness, mode: str
) -> None:
    """Cluster b's endpoints do not exist. SotW cannot say so: LDS is asked for once
    b's EDS initial_fetch_timeout (0.5 s, in its eds_config) passed, as Envoy does.
    Delta says so (``removed_resources``), which answers the subscription."""
    resources = base_resources()
    resources[CLUSTER]["b"] = {
        **eds_cluster("b"),
        "eds_cluster_config": {"eds_config": {**ADS_SOURCE, "initial_fetch_timeout": "0.5s"}},
    }
    del resources[ENDPOINT]["b"]
    xds.set_snapshot(resources)
    h = make_harness(xds.address)
    h.start()
    eds_response = xds.responses(ENDPOINT)[0]
    lds = first(xds, LISTENER)
    assert eds_response.seq < lds.seq
    if mode == "sotw":
        assert h.core.stat("cluster.b.init_fetch_timeout") == 1
    else:
        assert eds_response.removed == ("b",)
        assert h.core.stat("cluster.b.init_fetch_timeout") == 0
    assert h.core.stat("cluster.a.init_fetch_timeout") == 0
    assert MAIN in h.core.held[LISTENER]


def test_backoff_is_jittered_exponential_and_capped() -> None:
    top = Backoff(0.5, 30.0, rng=lambda: 0.999999)
    delays = [top.next() for _ in range(10)]
    assert delays[:7] == pytest.approx([0.5, 1, 2, 4, 8, 16, 30], rel=1e-4)
    assert delays[7:] == pytest.approx([30, 30, 30], rel=1e-4)
    top.reset()
    assert top.next() == pytest.approx(0.5, rel=1e-4)
    low = Backoff(0.5, 30.0, rng=lambda: 0.0)
    assert low.next() == 0.0  # full jitter: anywhere in [0, interval)


# ------------------------------------------------------------------------------------
# per-type (non-aggregated) gRPC subscriptions
# ------------------------------------------------------------------------------------

_PER_TYPE_METHODS = {
    f"/envoy.service.{svc}.v3.{name}DiscoveryService/{verb}{plural}": delta
    for svc, name, plural in (
        ("listener", "Listener", "Listeners"),
        ("cluster", "Cluster", "Clusters"),
        ("route", "Route", "Routes"),
        ("endpoint", "Endpoint", "Endpoints"),
    )
    for verb, delta in (("Stream", False), ("Delta", True))
}
_ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"


class PerTypeRelay:
    """Serves LDS/CDS/RDS/EDS's own discovery services by relaying each stream to
    the ADS fixture (which then sees one type per stream)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = f"{upstream[0]}:{upstream[1]}"
        self.methods: list[str] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self.server.add_generic_rpc_handlers((self._Handler(self),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    class _Handler(grpc.GenericRpcHandler):
        def __init__(self, relay: PerTypeRelay) -> None:
            self.relay = relay

        def service(self, details: Any) -> Any:
            delta = _PER_TYPE_METHODS.get(details.method)
            if delta is None:
                return None
            self.relay.methods.append(details.method)
            req, resp = (
                (discovery_pb2.DeltaDiscoveryRequest, discovery_pb2.DeltaDiscoveryResponse)
                if delta
                else (discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse)
            )
            ads = _ADS + ("DeltaAggregatedResources" if delta else "StreamAggregatedResources")
            upstream = self.relay.upstream

            def relay(requests: Iterator[Any], context: Any) -> Iterator[Any]:
                channel = grpc.insecure_channel(upstream)
                call = channel.stream_stream(
                    ads,
                    request_serializer=req.SerializeToString,
                    response_deserializer=resp.FromString,
                )(requests)
                context.add_callback(call.cancel)
                try:
                    yield from call
                except grpc.RpcError:
                    return
                finally:
                    channel.close()

            return grpc.stream_stream_rpc_method_handler(
                relay,
                request_deserializer=req.FromString,
                response_serializer=resp.SerializeToString,
            )

    def start(self) -> PerTypeRelay:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(grace=None).wait(5)


def test_per_type_api_config_source_streams(xds: XdsServer, mode: str) -> None:
    relay = PerTypeRelay(xds.address).start()
    api = {
        "api_type": API_TYPES[mode],
        "transport_api_version": "V3",
        "grpc_services": [{"envoy_grpc": {"cluster_name": "per_type"}}],
    }
    source = {"api_config_source": api, "resource_api_version": "V3"}
    doc = ads_bootstrap(xds_address=xds.address, admin_port=free_port(), node_id="per-type")
    dyn = doc["dynamic_resources"]
    del dyn["ads_config"]
    dyn["lds_config"] = source
    dyn["cds_config"] = source
    per_type = json.loads(json.dumps(doc["static_resources"]["clusters"][0]))
    per_type["name"] = per_type["load_assignment"]["cluster_name"] = "per_type"
    per_type["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] = {
        "socket_address": {"address": "127.0.0.1", "port_value": relay.port}
    }
    doc["static_resources"]["clusters"].append(per_type)

    resources = base_resources()
    for c in resources[CLUSTER].values():
        c["eds_cluster_config"]["eds_config"] = source
    hcm = resources[LISTENER][MAIN]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["rds"]["config_source"] = {"self": {}, "resource_api_version": "V3"}  # = LDS's
    versions = xds.set_snapshot(resources)

    h = Harness(doc, "per-type")
    try:
        h.start()
        for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE):
            xds.wait_for_ack(t, versions[t], TIMEOUT)
        # one stream per type, each with the type's own service
        streams = {
            sid: {r.type_url for r in xds.requests(stream_id=sid)} for sid, _, _ in xds.streams()
        }
        assert sorted(len(types_) for types_ in streams.values()) == [1, 1, 1, 1]
        verb = "Delta" if mode == "delta" else "Stream"
        assert sorted(relay.methods) == sorted(
            f"/envoy.service.{s}.v3.{n}DiscoveryService/{verb}{p}"
            for s, n, p in (
                ("cluster", "Cluster", "Clusters"),
                ("endpoint", "Endpoint", "Endpoints"),
                ("listener", "Listener", "Listeners"),
                ("route", "Route", "Routes"),
            )
        )
        assert sorted(h.core.held[ROUTE]) == [MAIN_ROUTES]
        assert h.core.stat("control_plane.connected_state") == 1
    finally:
        h.stop()
        relay.stop()


# ------------------------------------------------------------------------------------
# the protocol alone (responses the fixture does not send)
# ------------------------------------------------------------------------------------


class _Recorder:
    def __init__(self, delta: bool = False, node_first_only: bool = False) -> None:
        self.core = FakeCore()
        bootstrap = load_bootstrap({"node": {"id": "n", "cluster": "c"}})
        self.applier = Applier(self.core, bootstrap)
        self.sent: list[Any] = []
        target = GrpcTarget(target="127.0.0.1:1", description="test")
        source = Source("ads", True, delta, target, node_first_only)
        node = bootstrap.node
        self.protocol = StreamProtocol(source, self.applier, node, send=self.sent.append)


def _cluster_any(name: str) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(json_format.ParseDict(eds_cluster(name), cluster_pb2.Cluster()))
    return a


def test_resource_wrapped_in_sotw_response_is_accepted() -> None:
    r = _Recorder()
    r.protocol.add_wildcard(CLUSTER)
    r.protocol.connect()
    wrapped = any_pb2.Any()
    wrapped.Pack(discovery_pb2.Resource(name="a", version="7", resource=_cluster_any("a")))
    r.protocol.handle(
        discovery_pb2.DiscoveryResponse(
            version_info="1", nonce="n1", type_url=CLUSTER, resources=[wrapped]
        )
    )
    assert sorted(r.core.held[CLUSTER]) == ["a"]
    ack = r.sent[-1]
    assert (ack.version_info, ack.response_nonce, ack.HasField("error_detail")) == (
        "1",
        "n1",
        False,
    )


def test_type_mismatch_rejects_the_whole_response() -> None:
    r = _Recorder()
    r.protocol.add_wildcard(CLUSTER)
    r.protocol.connect()
    r.protocol.handle(
        discovery_pb2.DiscoveryResponse(
            version_info="1", nonce="n1", type_url=CLUSTER, resources=[_cluster_any("a")]
        )
    )
    wrong = any_pb2.Any()
    wrong.Pack(
        json_format.ParseDict(listener("l", 1, route_config_name="r"), listener_pb2.Listener())
    )
    r.protocol.handle(
        discovery_pb2.DiscoveryResponse(
            version_info="2", nonce="n2", type_url=CLUSTER, resources=[_cluster_any("b"), wrong]
        )
    )
    nack = r.sent[-1]
    assert nack.version_info == "1" and nack.response_nonce == "n2"
    assert nack.error_detail.code == NACK_CODE
    assert nack.error_detail.message == (
        f"{LISTENER} does not match the message-wide type URL {CLUSTER} in DiscoveryResponse"
    )
    assert sorted(r.core.held[CLUSTER]) == ["a"]  # nothing applied, nothing removed


def test_nonce_of_every_response_is_kept() -> None:
    """A response for a type not subscribed to, and one carrying only resources not
    asked for, are ignored; their nonces are kept and sent with the next request."""
    r = _Recorder()
    r.protocol.connect()
    r.protocol.handle(discovery_pb2.DiscoveryResponse(version_info="9", nonce="x1", type_url=ROUTE))
    assert r.sent == []
    r.protocol.set_names(ENDPOINT, ["a"])
    assert list(r.sent[-1].resource_names) == ["a"]
    other = any_pb2.Any()
    other.Pack(
        json_format.ParseDict(
            cluster_load_assignment("zz", []), endpoint_pb2.ClusterLoadAssignment()
        )
    )
    r.protocol.handle(
        discovery_pb2.DiscoveryResponse(
            version_info="3", nonce="e1", type_url=ENDPOINT, resources=[other]
        )
    )
    ack = r.sent[-1]
    assert (ack.version_info, ack.response_nonce) == ("3", "e1")  # ACKed, nothing applied
    assert r.core.calls == []
    r.protocol.set_names(ENDPOINT, ["a", "b"])
    assert (r.sent[-1].response_nonce, list(r.sent[-1].resource_names)) == ("e1", ["a", "b"])
    assert r.protocol.status()[ROUTE]["nonce"] == "x1"


def test_node_only_on_first_request_when_asked() -> None:
    r = _Recorder(node_first_only=True)
    r.protocol.add_wildcard(CLUSTER)
    r.protocol.add_wildcard(LISTENER)
    r.protocol.connect()
    assert [m.HasField("node") for m in r.sent] == [True, False]
    r.protocol.disconnect()
    r.protocol.connect()  # a new stream: the node again
    assert [m.HasField("node") for m in r.sent[2:]] == [True, False]


def test_delta_heartbeat_without_resource_is_ignored() -> None:
    r = _Recorder(delta=True)
    r.protocol.add_wildcard(CLUSTER)
    r.protocol.connect()
    r.protocol.handle(
        discovery_pb2.DeltaDiscoveryResponse(
            system_version_info="1",
            nonce="d1",
            type_url=CLUSTER,
            resources=[
                discovery_pb2.Resource(name="a", version="v1", resource=_cluster_any("a")),
                discovery_pb2.Resource(name="b", version="v1"),  # heartbeat
            ],
        )
    )
    assert sorted(r.core.held[CLUSTER]) == ["a"]
    assert r.sent[-1].response_nonce == "d1" and not r.sent[-1].HasField("error_detail")
    assert r.protocol.status()[CLUSTER]["resources"] == ["a"]


# ------------------------------------------------------------------------------------
# the bootstrap's dynamic_resources
# ------------------------------------------------------------------------------------


ADS = "dynamic_resources.ads_config"


def _bootstrap_with(**dynamic: Any) -> Json:
    doc = ads_bootstrap(xds_address=("127.0.0.1", 5678), admin_port=9901)
    doc["dynamic_resources"].update(dynamic)
    return doc


def _settings_errors(doc: Json) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_dynamic_resources(load_bootstrap(doc))
    return info.value.errors


def test_settings_from_an_ads_bootstrap() -> None:
    settings = parse_dynamic_resources(
        load_bootstrap(_bootstrap_with(), service_node="node-x", service_cluster="cl-y")
    )
    assert settings is not None and settings.ads is not None
    assert settings.ads.target.target == "127.0.0.1:5678"
    assert not settings.ads.delta and settings.ads.aggregated
    assert (settings.ads.target.backoff_base, settings.ads.target.backoff_max) == (0.1, 0.5)
    assert settings.lds is not None and settings.lds.source is settings.ads
    assert settings.lds.initial_fetch_timeout == 15.0
    assert (settings.node.id, settings.node.cluster) == ("node-x", "cl-y")
    assert settings.node.user_agent_name == "envoyx"
    assert settings.node.HasField("user_agent_build_version")
    built = build_node(settings.node, "1.22.3rc1").user_agent_build_version.version
    assert (built.major_number, built.minor_number, built.patch) == (1, 22, 3)
    assert list(settings.node.client_features) == list(CLIENT_FEATURES)
    assert parse_dynamic_resources(load_bootstrap({"node": {"id": "x"}})) is None


def test_the_management_servers_cluster_without_a_type_is_static() -> None:
    doc = _bootstrap_with()
    (xds_cluster,) = doc["static_resources"]["clusters"]
    xds_cluster.pop("type", None)
    settings = parse_dynamic_resources(load_bootstrap(doc))
    assert settings is not None and settings.ads is not None
    assert settings.ads.target.target == "127.0.0.1:5678"
    xds_cluster["type"] = "EDS"
    assert any(
        "the management server's cluster must be STATIC" in e and e.endswith("LOGICAL_DNS")
        for e in _settings_errors(doc)
    )


def test_google_grpc_target_and_disabled_fetch_timeout() -> None:
    doc = _bootstrap_with(
        ads_config={
            "api_type": "DELTA_GRPC",
            "transport_api_version": "V3",
            "grpc_services": [
                {"google_grpc": {"target_uri": "dns:///xds.local:18000", "stat_prefix": "ads"}}
            ],
        },
        lds_config={"ads": {}, "resource_api_version": "V3", "initial_fetch_timeout": "0s"},
    )
    settings = parse_dynamic_resources(load_bootstrap(doc))
    assert settings is not None and settings.ads is not None and settings.lds is not None
    assert settings.ads.target.target == "dns:///xds.local:18000" and settings.ads.delta
    assert settings.lds.initial_fetch_timeout is None  # 0 = wait for ever


@pytest.mark.parametrize(
    ("dynamic", "expected"),
    [
        (
            {
                "ads_config": {
                    "api_type": "REST",
                    "transport_api_version": "V3",
                    "cluster_names": ["x"],
                }
            },
            [
                f"{ADS}.api_type: REST: REST subscriptions are not supported "
                "(use GRPC or DELTA_GRPC)",
                f"{ADS}.cluster_names: not used by gRPC subscriptions (use grpc_services)",
                f"{ADS}.grpc_services: exactly one gRPC service is required, got 0",
            ],
        ),
        (
            {
                "ads_config": {
                    "api_type": "GRPC",
                    "grpc_services": [{"envoy_grpc": {"cluster_name": "nowhere"}}],
                }
            },
            [
                f"{ADS}.transport_api_version: AUTO: V2 (and AUTO) xDS transport protocol "
                "versions are not supported; set transport_api_version: V3",
                f"{ADS}.grpc_services[0].envoy_grpc.cluster_name: unknown cluster 'nowhere' "
                "(the management server's cluster must be a static cluster of the bootstrap)",
            ],
        ),
        (
            {"lds_config": {"path_config_source": {"path": "/etc/lds.yaml"}}},
            [
                "dynamic_resources.lds_config.path_config_source: filesystem subscriptions "
                "are not supported (envoyx takes dynamic resources over gRPC: ads or "
                "api_config_source)"
            ],
        ),
    ],
    ids=["rest", "unknown-cluster", "path"],
)
def test_unsupported_settings_name_their_field(dynamic: Json, expected: list[str]) -> None:
    assert _settings_errors(_bootstrap_with(**dynamic)) == expected


def test_ads_source_without_ads_config() -> None:
    doc = _bootstrap_with()
    del doc["dynamic_resources"]["ads_config"]
    assert _settings_errors(doc) == [
        "dynamic_resources.lds_config.ads: there is no dynamic_resources.ads_config",
        "dynamic_resources.cds_config.ads: there is no dynamic_resources.ads_config",
    ]


# ------------------------------------------------------------------------------------
# envoyx.Server: the client wired in (over a fake core), xds_status(), update()
# ------------------------------------------------------------------------------------


class FakeCoreServer(FakeCore):
    """A fake ``_core.Server`` (the constructor and lifecycle of the real one)."""

    instances: ClassVar[list[FakeCoreServer]] = []

    def __init__(self, bootstrap_json: str, **options: Any) -> None:
        super().__init__()
        self.bootstrap_json = bootstrap_json
        self.options = options
        self.running = False
        self.events: list[str] = []
        FakeCoreServer.instances.append(self)

    def start(self, *, live: bool = True) -> None:
        self.events.append("start" if live else "start-initializing")
        self.running = True

    def mark_live(self) -> None:
        self.events.append("live")

    def stop(self) -> None:
        self.events.append("stop")
        self.running = False


@pytest.fixture
def fake_core(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FakeCoreServer]]:
    import envoyx.server

    FakeCoreServer.instances = []
    monkeypatch.setattr(envoyx.server, "_core", types.SimpleNamespace(Server=FakeCoreServer))
    yield FakeCoreServer


def test_server_starts_the_client_and_reports_status(
    xds: XdsServer, fake_core: type[FakeCoreServer], mode: str
) -> None:
    versions = xds.set_snapshot(base_resources())
    doc = ads_bootstrap(
        xds_address=xds.address,
        admin_port=free_port(),
        api_type=API_TYPES[mode],
        node_id="srv",  # type: ignore[arg-type]
    )
    server = envoyx.Server(doc, concurrency=1)
    core = fake_core.instances[0]
    assert server.xds_status() == {}
    server.start()
    try:
        # start() returned after the initial fetch: everything is applied
        assert types_applied(core.calls) == [CLUSTER, ENDPOINT, LISTENER, ROUTE]
        status = server.xds_status()
        assert {t: s["version"] for t, s in status.items()} == versions
        assert status[LISTENER]["resources"] == [MAIN]
        # Not LIVE until the initial fetch was over, as Envoy.
        assert core.events == ["start-initializing", "live"]
    finally:
        server.stop()
    assert core.events == ["start-initializing", "live", "stop"]
    assert server.xds_status() == {}
    assert xds.wait_for_request(lambda r: True, timeout=1)  # it did talk to the server


def test_update_applies_in_make_before_break_order(fake_core: type[FakeCoreServer]) -> None:
    server = envoyx.Server({"node": {"id": "n"}}, concurrency=1)
    core = fake_core.instances[0]
    server.update(
        routes=[simple_routes("r", "c")],
        listeners=[listener("l", 10000, route_config_name="r")],
        clusters=[json_format.ParseDict(eds_cluster("c"), cluster_pb2.Cluster())],
        endpoints=[cluster_load_assignment("c", [("127.0.0.1", 9)])],
        remove_clusters=["old"],
        version_info="v1",
    )
    assert [(c.type_url, c.names, c.removed, c.version) for c in core.calls] == [
        (CLUSTER, ("c",), (), "v1"),
        (ENDPOINT, ("c",), (), "v1"),
        (LISTENER, ("l",), (), "v1"),
        (ROUTE, ("r",), (), "v1"),
        (CLUSTER, (), ("old",), "v1"),
    ]
    # canonical proto-JSON: snake_case, @type in Anys
    hcm = core.held[LISTENER]["l"]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["@type"].endswith("HttpConnectionManager") and "route_config_name" in hcm["rds"]
    # the same resources again: nothing changes, nothing is applied
    n = len(core.calls)
    server.update(clusters=[eds_cluster("c")], version_info="v2")
    assert core.calls[n:] == []
    server.update(remove_listeners=["l"])
    assert (core.calls[-1].type_url, core.calls[-1].removed) == (LISTENER, ("l",))
    assert core.calls[-1].version.startswith("update-")


def test_update_schema_errors_apply_nothing(fake_core: type[FakeCoreServer]) -> None:
    server = envoyx.Server({"node": {"id": "n"}}, concurrency=1)
    core = fake_core.instances[0]
    with pytest.raises(ConfigError) as info:
        server.update(
            clusters=[eds_cluster("ok"), {**eds_cluster("bad"), "connect_timeout": "-1s"}],
            listeners=[{"name": "l", "adress": {}}],
            routes=[simple_routes("r", "x"), simple_routes("r", "y")],
        )
    assert info.value.errors == [
        "clusters[1].connect_timeout: value must be greater than 0s",
        'listeners[0].adress: unknown field "adress" in envoy.config.listener.v3.Listener '
        '(did you mean "address"?)',
        "routes[1]: route configuration 'r' is also routes[0]",
    ]
    assert core.calls == []


def test_update_reports_what_the_core_rejects(fake_core: type[FakeCoreServer]) -> None:
    server = envoyx.Server({"node": {"id": "n"}}, concurrency=1)
    core = fake_core.instances[0]
    core.reject["busy"] = "cannot bind 127.0.0.1:80: address in use"
    with pytest.raises(ConfigError) as info:
        server.update(
            listeners=[
                listener("fine", 10001, route_config_name="r"),
                listener("busy", 80, route_config_name="r"),
            ]
        )
    assert info.value.errors == [
        "listeners[1] (listener 'busy'): cannot bind 127.0.0.1:80: address in use"
    ]
    assert sorted(core.held[LISTENER]) == ["fine"]  # the others were applied
    assert isinstance(info.value, ValueError)


def test_update_subscribes_to_what_it_names(
    xds: XdsServer, fake_core: type[FakeCoreServer]
) -> None:
    """A cluster added from Python whose endpoints come from ADS is subscribed to."""
    xds.set_snapshot(
        {
            CLUSTER: {},
            LISTENER: {},
            ENDPOINT: {"py": cluster_load_assignment("py", [("127.0.0.1", 9)])},
        }
    )
    doc = ads_bootstrap(xds_address=xds.address, admin_port=free_port(), node_id="py")
    server = envoyx.Server(doc, concurrency=1)
    core = fake_core.instances[0]
    server.start()
    try:
        server.update(clusters=[eds_cluster("py")])
        xds.wait_for_ack(ENDPOINT, "1", TIMEOUT)
        until(lambda: "py" in core.held[ENDPOINT], timeout=TIMEOUT, what="endpoints of py")
        # a SotW CDS update (empty) does not remove what came from Python
        xds.wait_for_ack(CLUSTER, xds.set_resources(CLUSTER, {}), TIMEOUT)
        assert "py" in core.held[CLUSTER]
    finally:
        server.stop()


def test_server_rejects_unsupported_dynamic_resources(fake_core: type[FakeCoreServer]) -> None:
    doc = _bootstrap_with(
        cds_config={
            "api_config_source": {
                "api_type": "REST",
                "transport_api_version": "V3",
                "cluster_names": ["xds_cluster"],
            }
        }
    )
    with pytest.raises(ConfigError) as info:
        envoyx.Server(doc)
    assert info.value.errors[0].startswith(
        "dynamic_resources.cds_config.api_config_source.api_type: REST"
    )


# ------------------------------------------------------------------------------------
# the ClusterLoadAssignment fast path reads as the generic code does
# ------------------------------------------------------------------------------------


def test_eds_fast_path_matches_the_generic_checker_and_json() -> None:
    from envoyx.xds._eds import check_and_encode
    from envoyx.xds.applier import canonical_json, schema_errors

    def sa(address: str, port: int) -> Json:
        return {
            "endpoint": {"address": {"socket_address": {"address": address, "port_value": port}}}
        }

    lbs: list[Json] = [
        sa("10.0.0.1", 80),
        sa("10.0.0.2", 65535),
        {**sa("10.0.0.3", 81), "load_balancing_weight": 3},
        {**sa("10.0.0.4", 82), "health_status": "DRAINING"},
        sa("10.0.0.5", 0),  # the oneof set, to 0
        {
            "endpoint": {
                "hostname": "h",
                "address": {"socket_address": {"address": "a", "port_value": 1}},
            }
        },
        sa("höst.example", 83),
        sa('we"ird', 84),
        sa("x" * 200, 85),
        {"endpoint": {"address": {"pipe": {"path": "/run/up.sock"}}}},
    ]
    good = {
        "cluster_name": "c",
        "endpoints": [
            {"lb_endpoints": lbs, "priority": 1, "locality": {"zone": "z"}},
            {"lb_endpoints": [sa("10.1.0.1", 80)]},
            {"locality": {"zone": "empty"}},
        ],
        "policy": {"overprovisioning_factor": 140},
    }
    msg = json_format.ParseDict(good, endpoint_pb2.ClusterLoadAssignment())
    errors, text = check_and_encode(msg, schema_errors)
    assert errors == []
    assert json.loads(text) == json.loads(canonical_json(msg))

    bad = json.loads(json.dumps(good))
    bad["endpoints"][0]["lb_endpoints"] += [sa("", 80), sa("10.0.0.9", 70000)]
    bad["endpoints"][1]["priority"] = 200
    bad["endpoints"][1]["lb_endpoints"].append({**sa("10.1.0.2", 80), "load_balancing_weight": 0})
    msg = json_format.ParseDict(bad, endpoint_pb2.ClusterLoadAssignment())
    errors, _ = check_and_encode(msg, schema_errors)
    assert sorted(errors) == sorted(schema_errors(msg)) and len(errors) == 4
