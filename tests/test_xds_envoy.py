"""xDS interop: a proxy driven over ADS by the in-process management server of
:mod:`support.xds_server`, State of the World and Delta.

Every scenario runs against each target of ``XDS_TARGETS`` (env ``ENVOYX_XDS_TARGETS``,
comma-separated, default ``envoy,envoyx``): ``envoy`` is the real Envoy 1.40, which proves
that the fixture speaks the protocol as Envoy's client expects and that what the
scenarios assert is Envoy's behaviour; ``envoyx`` runs the same scenarios, unchanged,
against envoyx (the bootstrap is the same file). Each scenario also runs in both
protocol variants (``api_type: GRPC`` and ``DELTA_GRPC``).

Every scenario ends with :meth:`World.check_all_answered`: each response the server
sent on a live stream was ACKed, except the NACKs the scenario expected.

Where the two variants differ in what Envoy does, the scenario says so next to the
assertion (e.g. a ClusterLoadAssignment absent from a SotW response is not removed;
in Delta it is removed explicitly, and Envoy keeps the endpoints of an active cluster
anyway).
"""

from __future__ import annotations

import http.client
import itertools
import json
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format
from google.rpc import status_pb2

from support.envoy import targets_from_env
from support.proxy import ProxyProcess
from support.upstreams import HttpUpstream
from support.wait import Timeout, free_port, until
from support.xds_resources import (
    ads_bootstrap,
    cluster_load_assignment,
    eds_cluster,
    listener,
    prefix_route,
    regex_route,
    simple_routes,
)
from support.xds_server import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    RESOURCE_TYPES,
    ROUTE,
    SECRET,
    XdsRequest,
    XdsServer,
    short,
    wait_all_acked,
)

StartProxy = Callable[..., ProxyProcess]
Json = dict[str, Any]


# The proxies the scenarios run against. Adding "envoyx" (here or in the env var) is all
# it takes to run every scenario against envoyx.
XDS_TARGETS = targets_from_env("ENVOYX_XDS_TARGETS")
API_TYPES = {"sotw": "GRPC", "delta": "DELTA_GRPC"}
ACK_TIMEOUT_S = 10.0
DOWN_FOR_S = 2.0  # how long the management server stays away in the outage scenario
MAIN = "main"  # the listener every scenario starts with (stat_prefix too)
MAIN_ROUTES = "main_routes"

_node_seq = itertools.count(1)


# ---------------------------------------------------------------------------------
# the world: management server, upstreams, one proxy
# ---------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    upstream: str | None
    body: bytes


@dataclass
class World:
    server: XdsServer
    mode: str
    target: str
    ups: dict[str, HttpUpstream]
    launch: StartProxy
    node_id: str
    main_port: int = field(default_factory=free_port)
    proxy: ProxyProcess | None = None
    expected_nacks: list[XdsRequest] = field(default_factory=list)
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    extra_port: int = 0

    # -- set-up -------------------------------------------------------------------------

    def base_snapshot(self) -> dict[str, str]:
        """Clusters a and b (EDS, one endpoint each: upstreams a and b), listener
        ``main`` whose routes (RDS ``main_routes``) send everything to cluster a."""
        return self.server.set_snapshot(
            {
                CLUSTER: {"a": eds_cluster("a"), "b": eds_cluster("b")},
                ENDPOINT: {n: self.cla(n) for n in ("a", "b")},
                LISTENER: {MAIN: listener(MAIN, self.main_port, route_config_name=MAIN_ROUTES)},
                ROUTE: {MAIN_ROUTES: simple_routes(MAIN_ROUTES, "a")},
            }
        )

    def cla(self, cluster: str, *upstreams: str) -> Json:
        """The ClusterLoadAssignment of ``cluster``: the named upstreams (default: the
        upstream of the same name)."""
        names = upstreams or (cluster,)
        return cluster_load_assignment(cluster, [self.ups[n].address for n in names])

    def start(self, *, wait_ready: bool = True, **bootstrap_kw: Any) -> ProxyProcess:
        """Start the proxy and wait for it to be ready (which, with everything served,
        means every type was fetched and warmed)."""
        bootstrap = ads_bootstrap(
            xds_address=self.server.address,
            admin_port=free_port(),
            api_type=API_TYPES[self.mode],  # type: ignore[arg-type]
            node_id=self.node_id,
            **bootstrap_kw,
        )
        # A replaced listener's old filter chains drain for --drain-time-s before the
        # resources only they use (e.g. a route configuration) are let go.
        self.proxy = self.launch(
            bootstrap, extra_args=("--drain-time-s", "1"), wait_ready=wait_ready
        )
        return self.proxy

    @property
    def p(self) -> ProxyProcess:
        assert self.proxy is not None, "proxy not started"
        return self.proxy

    # -- pushing ----------------------------------------------------------------------

    def push(self, type_url: str, resources: dict[str, Any]) -> str:
        """Replace the type's resources and wait until the proxy ACKs them."""
        since = self.server.mark()
        version = self.server.set_resources(type_url, resources)
        self.server.wait_for_ack(type_url, version, ACK_TIMEOUT_S, since=since)
        return version

    def push_update(self, type_url: str, resources: dict[str, Any]) -> str:
        since = self.server.mark()
        version = self.server.update(type_url, resources)
        self.server.wait_for_ack(type_url, version, ACK_TIMEOUT_S, since=since)
        return version

    def push_remove(self, type_url: str, names: list[str]) -> str:
        since = self.server.mark()
        version = self.server.remove(type_url, names)
        self.server.wait_for_ack(type_url, version, ACK_TIMEOUT_S, since=since)
        return version

    def push_nacked(self, type_url: str, resources: dict[str, Any]) -> XdsRequest:
        """Add/replace resources that the proxy must NACK; return the NACK."""
        since = self.server.mark()
        version = self.server.update(type_url, resources)
        nack = self.server.wait_for_nack(type_url, version, ACK_TIMEOUT_S, since=since)
        self.expected_nacks.append(nack)
        return nack

    def version_of(self, type_url: str, name: str) -> str:
        """The ``version_info`` the proxy shows for a resource in /config_dump: the
        type's version in SotW, the resource's own version in Delta."""
        if self.mode == "delta":
            return self.server.resource_version(type_url, name)
        v = self.server.version(type_url)
        assert v is not None
        return v

    # -- traffic --------------------------------------------------------------------------

    def get(self, path: str = "/", port: int | None = None, timeout: float = 5.0) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", port or self.main_port, timeout=timeout)
        try:
            conn.request("GET", path, headers={"host": "xds.test", "connection": "close"})
            resp = conn.getresponse()
            return Reply(resp.status, resp.getheader("x-upstream"), resp.read())
        finally:
            conn.close()

    def wait_served_by(
        self, upstream: str, path: str = "/", port: int | None = None, timeout: float = 10.0
    ) -> None:
        """Poll until a request is answered 200 by ``upstream``."""
        last: list[Any] = []

        def check() -> bool:
            r = self.get(path, port)
            last[:] = [r]
            return r.status == 200 and r.upstream == upstream

        try:
            until(check, timeout=timeout, what=f"{path} served by {upstream}")
        except Timeout as exc:
            raise AssertionError(
                f"{path} on :{port or self.main_port} not served by {upstream}; last {last}"
                f"\n{self.server.describe()}"
            ) from exc

    def wait_status(self, status: int, path: str = "/", timeout: float = 10.0) -> Reply:
        return until(
            lambda: (r := self.get(path)).status == status and r,
            timeout=timeout,
            what=f"{path} -> {status}",
        )

    def wait_refused(self, port: int, timeout: float = 10.0) -> None:
        def refused() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2):
                    return False
            except ConnectionRefusedError:
                return True

        until(refused, timeout=timeout, what=f"port {port} to refuse connections")

    # -- observing the proxy ---------------------------------------------------------

    def config_dump(self) -> Json:
        status, _, body = self.p.admin("/config_dump")
        assert status == 200, body[:300]
        out: Json = {}
        for cfg in json.loads(body)["configs"]:
            out[cfg["@type"].rsplit(".", 1)[-1]] = cfg
        return out

    def dynamic(self) -> Json:
        """What /config_dump shows of the dynamic resources, by name:
        ``clusters``/``warming_clusters`` -> version_info, ``listeners`` -> (state,
        version_info), ``routes`` -> version_info."""
        dump = self.config_dump()
        clusters = dump.get("ClustersConfigDump", {})
        listeners = dump.get("ListenersConfigDump", {})
        routes = dump.get("RoutesConfigDump", {})
        out: Json = {
            "clusters": {
                c["cluster"]["name"]: c.get("version_info")
                for c in clusters.get("dynamic_active_clusters", [])
            },
            "warming_clusters": {
                c["cluster"]["name"]: c.get("version_info")
                for c in clusters.get("dynamic_warming_clusters", [])
            },
            "listeners": {},
            "routes": {
                r["route_config"]["name"]: r.get("version_info")
                for r in routes.get("dynamic_route_configs", [])
            },
        }
        for lis in listeners.get("dynamic_listeners", []):
            for state in ("active_state", "warming_state", "draining_state"):
                if state in lis:
                    out["listeners"][lis["name"]] = (state, lis[state].get("version_info"))
                    break
        return out

    def check_dump_entry(self, dump: Json) -> None:
        """Each dynamic entry carries version_info and last_updated."""
        clusters = dump["ClustersConfigDump"]["dynamic_active_clusters"]
        listeners = dump["ListenersConfigDump"]["dynamic_listeners"]
        routes = dump["RoutesConfigDump"]["dynamic_route_configs"]
        for entry in [*clusters, *routes, *(lis["active_state"] for lis in listeners)]:
            assert entry.get("version_info"), entry
            assert entry.get("last_updated"), entry

    def stats(self) -> dict[str, int]:
        return self.p.stats()

    def wait_stat(self, name: str, value: int, timeout: float = 10.0) -> None:
        self.p.wait_stat(name, value, timeout=timeout)

    # -- the closing check --------------------------------------------------------------

    def check_all_answered(self, timeout: float = ACK_TIMEOUT_S) -> None:
        """Every response on a live stream was ACKed; the only NACKs are the expected."""
        srv = self.server

        def unanswered() -> list[str]:
            live = {sid for sid, _, _ in srv.streams()}
            answered = {
                (r.stream_id, r.response_nonce) for r in srv.requests() if r.kind in ("ack", "nack")
            }
            return [
                f"{short(p.type_url)} v{p.version} nonce {p.nonce}"
                for p in srv.responses()
                if p.stream_id in live and (p.stream_id, p.nonce) not in answered
            ]

        try:
            until(lambda: not unanswered(), timeout=timeout, what="every response answered")
        except Timeout:
            raise AssertionError(
                f"responses never answered: {unanswered()}\n{srv.describe()}"
            ) from None
        nacks = srv.requests(kind="nack")
        unexpected = [n for n in nacks if n not in self.expected_nacks]
        assert not unexpected, "unexpected NACKs:\n" + "\n".join(
            f"{short(n.type_url)} v{n.response_version}: {n.error_detail}" for n in unexpected
        )


@pytest.fixture(params=XDS_TARGETS)
def target(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=list(API_TYPES))
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def xds_server() -> Iterator[XdsServer]:
    server = XdsServer().start()
    yield server
    server.stop()


@pytest.fixture
def world(
    request: pytest.FixtureRequest,
    target: str,
    mode: str,
    xds_server: XdsServer,
    http_upstreams: dict[str, HttpUpstream],
) -> Iterator[World]:
    launch: StartProxy = request.getfixturevalue(
        "start_envoy" if target == "envoy" else "start_envoyx"
    )
    w = World(
        server=xds_server,
        mode=mode,
        target=target,
        ups=http_upstreams,
        launch=launch,
        node_id=f"xds-{target}-{mode}-{next(_node_seq)}",
    )
    yield w
    for cleanup in w.cleanups:
        cleanup()


def first(server: XdsServer, type_url: str, **kw: Any) -> XdsRequest:
    reqs = server.requests(type_url, **kw)
    assert reqs, f"no {short(type_url)} request\n{server.describe()}"
    return reqs[0]


# ---------------------------------------------------------------------------------
# start-up
# ---------------------------------------------------------------------------------


def test_startup_warming_cds_eds_lds_rds(world: World) -> None:
    """With everything served, the proxy fetches CDS, then the endpoints of its EDS
    clusters, then (clusters warm) LDS, then the listener's routes; it ACKs each type's
    version; traffic through the dynamic listener reaches the upstream."""
    versions = world.base_snapshot()
    world.start()
    srv = world.server

    for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE):
        srv.wait_for_ack(t, versions[t], ACK_TIMEOUT_S)
    cds, eds, lds, rds = (first(srv, t) for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE))
    eds_response = srv.responses(ENDPOINT)[0]
    lds_response = srv.responses(LISTENER)[0]
    # Warming order: LDS is asked for only once the clusters' endpoints were served,
    # RDS once the listener arrived.
    assert cds.seq < eds.seq < eds_response.seq < lds.seq < lds_response.seq < rds.seq, (
        srv.describe()
    )
    assert all(r.kind == "initial" for r in (cds, eds, lds, rds))
    assert cds.node_id == world.node_id and cds.node.cluster == "envoyx-tests"
    assert srv.connected_nodes() == [world.node_id]
    if world.mode == "sotw":
        # Wildcard LDS/CDS (no names), named EDS/RDS with the full set in one request.
        assert cds.resource_names == () and lds.resource_names == ()
        assert sorted(eds.resource_names) == ["a", "b"]
        assert rds.resource_names == (MAIN_ROUTES,)
        assert cds.version_info == "" and cds.response_nonce == ""
        # ACK = the response's version and nonce.
        ack = srv.requests(CLUSTER, kind="ack")[0]
        assert ack.version_info == versions[CLUSTER]
        assert ack.response_nonce == srv.responses(CLUSTER)[0].nonce
    else:
        assert cds.subscribe in ((), ("*",)) and lds.subscribe in ((), ("*",))
        assert sorted(eds.subscribe) == ["a", "b"]
        assert rds.subscribe == (MAIN_ROUTES,)
        assert cds.initial_resource_versions == {}

    assert world.get().upstream == "a"

    dump = world.config_dump()
    world.check_dump_entry(dump)
    dyn = world.dynamic()
    assert dyn["clusters"] == {n: world.version_of(CLUSTER, n) for n in ("a", "b")}
    assert dyn["warming_clusters"] == {}
    assert dyn["listeners"] == {MAIN: ("active_state", world.version_of(LISTENER, MAIN))}
    assert dyn["routes"] == {MAIN_ROUTES: world.version_of(ROUTE, MAIN_ROUTES)}

    stats = world.stats()
    assert stats["control_plane.connected_state"] == 1
    assert stats["cluster_manager.cds.update_success"] == 1
    assert stats["cluster_manager.cds.update_rejected"] == 0
    assert stats["listener_manager.lds.update_success"] == 1
    assert stats["listener_manager.lds.update_rejected"] == 0
    assert stats[f"http.{MAIN}.rds.{MAIN_ROUTES}.update_success"] == 1
    assert stats["cluster.a.update_success"] >= 1
    world.check_all_answered()


def test_startup_waits_for_the_management_server(world: World) -> None:
    """Started before the server has anything, the proxy asks for clusters and waits
    (not ready, no listener); once the resources are set it warms and serves."""
    srv = world.server
    proxy = world.start(wait_ready=False)
    srv.wait_for_request(lambda r: r.type_url == CLUSTER and r.kind == "initial", timeout=30)
    assert srv.responses() == []

    def ready_status() -> int | None:
        try:
            return proxy.admin("/ready", timeout=2)[0]
        except OSError:
            return None

    assert until(ready_status, timeout=30, what="admin up") == 503  # still initializing
    assert srv.requests(LISTENER) == []  # LDS waits for CDS
    versions = world.base_snapshot()
    until(proxy.ready, timeout=30, what="proxy ready")
    wait_all_acked(srv, versions)
    assert world.get().upstream == "a"
    world.check_all_answered()


# ---------------------------------------------------------------------------------
# add / replace / remove, per type
# ---------------------------------------------------------------------------------


def test_endpoints_add_replace_remove(world: World) -> None:
    world.base_snapshot()
    world.start()
    assert world.get().upstream == "a"

    # replace: cluster a's only endpoint becomes upstream b
    world.push_update(ENDPOINT, {"a": world.cla("a", "b")})
    world.wait_served_by("b")
    # add: both
    world.push_update(ENDPOINT, {"a": world.cla("a", "a", "b")})
    world.wait_served_by("a")
    world.wait_served_by("b")
    # remove one: only a again
    world.push_update(ENDPOINT, {"a": world.cla("a", "a")})
    until(
        lambda: [world.get().upstream for _ in range(4)] == ["a"] * 4,
        timeout=10,
        what="only upstream a",
    )
    # remove all endpoints: no healthy upstream
    world.push_update(ENDPOINT, {"a": cluster_load_assignment("a", [])})
    reply = world.wait_status(503)
    assert reply.body == b"no healthy upstream"
    world.push_update(ENDPOINT, {"a": world.cla("a")})
    world.wait_served_by("a")

    # remove the resource itself: SotW cannot say so (an absent ClusterLoadAssignment
    # is not removed); Delta names it in removed_resources. Either way Envoy keeps the
    # endpoints of an active cluster.
    since = world.server.mark()
    world.push_remove(ENDPOINT, ["a"])
    if world.mode == "delta":
        assert [r.removed for r in world.server.responses(ENDPOINT, since=since)] == [("a",)]
    else:
        assert [r.resource_names for r in world.server.responses(ENDPOINT, since=since)] == [("b",)]
    assert world.get().upstream == "a"
    assert world.stats()["cluster.a.membership_total"] == 1
    world.check_all_answered()


def test_clusters_add_replace_remove(world: World) -> None:
    world.base_snapshot()
    world.start()
    srv = world.server

    # add: a new EDS cluster c, its endpoints, then a route to it (make before break)
    since = srv.mark()
    versions = srv.set_snapshot({CLUSTER: {**srv.resources(CLUSTER), "c": eds_cluster("c")}})
    srv.update(ENDPOINT, {"c": world.cla("c")})
    srv.wait_for_ack(CLUSTER, versions[CLUSTER], ACK_TIMEOUT_S, since=since)
    world.push(
        ROUTE, {MAIN_ROUTES: simple_routes(MAIN_ROUTES, "a", extra=[prefix_route("/c", "c")])}
    )
    world.wait_served_by("c", "/c")
    assert world.get("/").upstream == "a"
    dyn = world.dynamic()
    assert dyn["clusters"]["c"] == world.version_of(CLUSTER, "c")

    # replace: new settings for c; it warms again (its endpoints are sent again) and
    # takes over; traffic keeps flowing to c
    world.push_update(
        CLUSTER, {"c": eds_cluster("c", connect_timeout="2s", lb_policy="LEAST_REQUEST")}
    )
    dyn = world.dynamic()
    assert dyn["clusters"]["c"] == world.version_of(CLUSTER, "c")
    assert dyn["warming_clusters"] == {}
    dump = world.config_dump()["ClustersConfigDump"]["dynamic_active_clusters"]
    c = next(x["cluster"] for x in dump if x["cluster"]["name"] == "c")
    assert c["lb_policy"] == "LEAST_REQUEST" and c["connect_timeout"] == "2s"
    world.wait_served_by("c", "/c")

    # remove: c leaves CDS; the route to it now finds no cluster (503), and the proxy
    # stops asking for c's endpoints
    since = srv.mark()
    world.push_remove(CLUSTER, ["c"])
    if world.mode == "delta":
        assert [r.removed for r in srv.responses(CLUSTER, since=since)] == [("c",)]
        srv.wait_for_request(lambda r: r.type_url == ENDPOINT and "c" in r.unsubscribe, since=since)
    else:
        assert srv.responses(CLUSTER, since=since)[0].resource_names == ("a", "b")
        srv.wait_for_request(
            lambda r: r.type_url == ENDPOINT and sorted(r.resource_names) == ["a", "b"],
            since=since,
        )
    reply = world.wait_status(503, "/c")
    assert reply.upstream is None
    assert "c" not in world.dynamic()["clusters"]
    assert world.get("/").upstream == "a"
    world.check_all_answered()


def test_routes_replace_and_switch_route_configuration(world: World) -> None:
    world.base_snapshot()
    world.start()
    srv = world.server

    # replace: main_routes now sends everything to b
    world.push(ROUTE, {MAIN_ROUTES: simple_routes(MAIN_ROUTES, "b")})
    world.wait_served_by("b")
    assert world.dynamic()["routes"] == {MAIN_ROUTES: world.version_of(ROUTE, MAIN_ROUTES)}

    # add a second route configuration, then point the listener at it: the proxy
    # subscribes to the new name and drops the old one
    srv.update(ROUTE, {"other_routes": simple_routes("other_routes", "a")})
    since = srv.mark()
    world.push(LISTENER, {MAIN: listener(MAIN, world.main_port, route_config_name="other_routes")})
    world.wait_served_by("a")
    if world.mode == "sotw":
        srv.wait_for_request(
            lambda r: r.type_url == ROUTE and r.resource_names == ("other_routes",), since=since
        )
    else:
        srv.wait_for_request(
            lambda r: r.type_url == ROUTE and r.subscribe == ("other_routes",), since=since
        )
        srv.wait_for_request(
            lambda r: r.type_url == ROUTE and r.unsubscribe == (MAIN_ROUTES,), since=since
        )
    assert world.dynamic()["routes"]["other_routes"] == world.version_of(ROUTE, "other_routes")
    world.check_all_answered()


def test_listeners_add_replace_remove(world: World) -> None:
    world.base_snapshot()
    world.start()
    srv = world.server
    second = free_port()

    # add: a second listener sharing main_routes (already known: no new RDS fetch)
    world.push_update(
        LISTENER, {"second": listener("second", second, route_config_name=MAIN_ROUTES)}
    )
    world.wait_served_by("a", port=second)
    added_version = world.version_of(LISTENER, "second")
    assert world.dynamic()["listeners"]["second"] == ("active_state", added_version)

    # replace: new stat_prefix; new connections are served by the new filter chain
    world.push_update(
        LISTENER,
        {
            "second": listener(
                "second", second, route_config_name=MAIN_ROUTES, stat_prefix="second_v2"
            )
        },
    )
    until(
        lambda: (
            world.get(port=second).upstream == "a"
            and world.stats().get("http.second_v2.downstream_rq_completed", 0) >= 1
        ),
        timeout=10,
        what="replaced listener serving",
    )
    state, shown = world.dynamic()["listeners"]["second"]
    assert state == "active_state"
    dumped = next(
        lis["active_state"]["listener"]
        for lis in world.config_dump()["ListenersConfigDump"]["dynamic_listeners"]
        if lis["name"] == "second"
    )
    hcm = dumped["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["stat_prefix"] == "second_v2"
    if world.target == "envoy":
        # Envoy quirk: a listener updated in place (only its filter chains changed)
        # keeps the version_info of the listener it replaced.
        assert shown == added_version

    # remove: the port stops accepting; main is untouched
    since = srv.mark()
    world.push_remove(LISTENER, ["second"])
    if world.mode == "delta":
        assert [r.removed for r in srv.responses(LISTENER, since=since)] == [("second",)]
    world.wait_refused(second)
    # it drains (--drain-time-s 1), then it is gone
    assert world.dynamic()["listeners"].get("second", ("gone",))[0] in ("draining_state", "gone")
    until(lambda: "second" not in world.dynamic()["listeners"], timeout=10, what="drained")
    assert world.get().upstream == "a"
    assert world.stats()["listener_manager.lds.update_success"] == 4
    world.check_all_answered()


# ---------------------------------------------------------------------------------
# NACK: an invalid resource is refused, the previous configuration keeps serving
# ---------------------------------------------------------------------------------


def _unknown_type_listener(port: int) -> listener_pb2.Listener:
    """A listener whose HCM typed_config names a type nobody knows (as a message:
    proto-JSON could not even express it)."""
    msg = json_format.ParseDict(
        listener("odd", port, route_config_name=MAIN_ROUTES), listener_pb2.Listener()
    )
    msg.filter_chains[0].filters[
        0
    ].typed_config.type_url = "type.googleapis.com/envoyx.test.Unknown"
    return msg


@dataclass(frozen=True)
class BadResource:
    """An invalid resource pushed over a working configuration, and a valid fix."""

    type_url: str
    bad: Callable[[World], dict[str, Any]]
    envoy_reason: str  # a fragment of Envoy's error_detail
    rejected_stat: str
    fix: Callable[[World], dict[str, Any]]
    after_fix: Callable[[World], None]
    # Envoy keeps a NACKed listener in /config_dump (dynamic_listeners[].error_state);
    # one whose @type it cannot resolve makes the whole dump fail until it is replaced.
    envoy_dump_fails: bool = False


def _occupied_port(w: World) -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    w.cleanups.append(sock.close)
    return int(sock.getsockname()[1])


def _new_port(w: World) -> int:
    w.extra_port = free_port()
    return w.extra_port


BAD_RESOURCES = {
    "rds-invalid-regex": BadResource(
        ROUTE,
        bad=lambda w: {
            MAIN_ROUTES: simple_routes(MAIN_ROUTES, "b", extra=[regex_route("([", "b")])
        },
        envoy_reason="missing ]: [",
        rejected_stat=f"http.{MAIN}.rds.{MAIN_ROUTES}.update_rejected",
        fix=lambda w: {MAIN_ROUTES: simple_routes(MAIN_ROUTES, "b")},
        after_fix=lambda w: w.wait_served_by("b"),
    ),
    "cds-negative-connect-timeout": BadResource(
        CLUSTER,
        bad=lambda w: {"a": {**eds_cluster("a"), "connect_timeout": "-1s"}},
        envoy_reason="Expected positive duration",
        rejected_stat="cluster_manager.cds.update_rejected",
        fix=lambda w: {"a": eds_cluster("a", connect_timeout="2s")},
        after_fix=lambda w: w.wait_served_by("a"),
    ),
    "lds-port-in-use": BadResource(
        LISTENER,
        bad=lambda w: {"busy": listener("busy", _occupied_port(w), route_config_name=MAIN_ROUTES)},
        envoy_reason="Error adding/updating listener(s) busy: cannot bind",
        rejected_stat="listener_manager.lds.update_rejected",
        fix=lambda w: {"busy": listener("busy", _new_port(w), route_config_name=MAIN_ROUTES)},
        after_fix=lambda w: w.wait_served_by("a", port=w.extra_port),
    ),
    "lds-unknown-type": BadResource(
        LISTENER,
        bad=lambda w: {"odd": _unknown_type_listener(free_port())},
        envoy_reason=(
            "Error adding/updating listener(s) odd: Didn't find a registered implementation "
            "for 'envoy.filters.network.http_connection_manager' with type URL: "
            "'envoyx.test.Unknown'"
        ),
        rejected_stat="listener_manager.lds.update_rejected",
        fix=lambda w: {"odd": listener("odd", _new_port(w), route_config_name=MAIN_ROUTES)},
        after_fix=lambda w: w.wait_served_by("a", port=w.extra_port),
        envoy_dump_fails=True,
    ),
    "eds-malformed-ip": BadResource(
        ENDPOINT,
        bad=lambda w: {"a": cluster_load_assignment("a", [("not-an-ip", 80)])},
        envoy_reason="malformed IP address: not-an-ip",
        rejected_stat="cluster.a.update_rejected",
        fix=lambda w: {"a": w.cla("a", "b")},
        after_fix=lambda w: w.wait_served_by("b"),
    ),
}


@pytest.mark.parametrize("case", list(BAD_RESOURCES))
def test_nack_keeps_previous_config(world: World, case: str) -> None:
    bad = BAD_RESOURCES[case]
    versions = world.base_snapshot()
    world.start()
    srv = world.server
    before = world.dynamic()
    assert world.stats().get(bad.rejected_stat, 0) == 0

    nack = world.push_nacked(bad.type_url, bad.bad(world))
    assert nack.error_detail, nack
    assert nack.error_code is not None
    if world.target == "envoy":
        assert bad.envoy_reason in nack.error_detail, nack.error_detail
    if world.mode == "sotw":
        # NACK = the version still in use, plus the error
        assert nack.version_info == versions[bad.type_url]
    world.wait_stat(bad.rejected_stat, 1)

    # the previous configuration keeps serving, unchanged
    assert world.get().upstream == "a"
    if world.target == "envoy" and bad.envoy_dump_fails:
        _, _, body = world.p.admin("/config_dump")
        assert b"could not find @type 'type.googleapis.com/envoyx.test.Unknown'" in body, body
    else:
        assert world.dynamic() == before
    # nothing is resent until something changes
    assert srv.responses(bad.type_url)[-1].nonce == nack.response_nonce

    # a valid resource is accepted and takes effect
    world.push_update(bad.type_url, bad.fix(world))
    bad.after_fix(world)
    assert world.dynamic()["clusters"].keys() == {"a", "b"}
    world.check_all_answered()


# ---------------------------------------------------------------------------------
# partial acceptance: the valid resources of a partly invalid response are applied
# ---------------------------------------------------------------------------------


def test_partial_acceptance_cds(world: World) -> None:
    world.base_snapshot()
    world.start()
    srv = world.server
    srv.update(ENDPOINT, {"c": world.cla("c")})
    nack = world.push_nacked(
        CLUSTER,
        {"c": eds_cluster("c"), "bad": eds_cluster("bad", lb_policy="CLUSTER_PROVIDED")},
    )
    if world.target == "envoy":
        assert nack.error_detail == (
            "Error adding/updating cluster(s) bad: cluster manager: cluster provided LB "
            "specified but cluster 'bad' did not provide one. Check cluster documentation."
        )
    if world.mode == "sotw":
        assert nack.version_info == "1"
    # c was applied (with the version of the response that carried it), bad was not
    dyn = world.dynamic()
    assert dyn["clusters"] == {
        "a": world.version_of(CLUSTER, "a") if world.mode == "delta" else "1",
        "b": world.version_of(CLUSTER, "b") if world.mode == "delta" else "1",
        "c": world.version_of(CLUSTER, "c"),
    }
    world.push(
        ROUTE, {MAIN_ROUTES: simple_routes(MAIN_ROUTES, "a", extra=[prefix_route("/c", "c")])}
    )
    world.wait_served_by("c", "/c")
    assert world.stats()["cluster_manager.cds.update_rejected"] == 1
    world.check_all_answered()


def test_partial_acceptance_lds(world: World) -> None:
    world.base_snapshot()
    world.start()
    third = free_port()
    nack = world.push_nacked(
        LISTENER,
        {
            "third": listener("third", third, route_config_name=MAIN_ROUTES),
            "bad": listener("bad", _occupied_port(world), route_config_name=MAIN_ROUTES),
        },
    )
    if world.target == "envoy":
        assert nack.error_detail.startswith("Error adding/updating listener(s) bad: cannot bind")
    world.wait_served_by("a", port=third)
    listeners = world.dynamic()["listeners"]
    assert set(listeners) == {MAIN, "third"}
    assert listeners["third"] == ("active_state", world.version_of(LISTENER, "third"))
    assert world.stats()["listener_manager.lds.update_rejected"] == 1
    world.check_all_answered()


# ---------------------------------------------------------------------------------
# the management server goes away and comes back
# ---------------------------------------------------------------------------------

TYPES = (CLUSTER, ENDPOINT, LISTENER, ROUTE)


def test_reconnect_after_server_restart(world: World) -> None:
    """While the server is away the proxy keeps its configuration; on reconnect it
    tells what it has (SotW: each type's version; Delta: initial_resource_versions),
    and gets what changed meanwhile (Delta: only that)."""
    world.base_snapshot()
    srv = world.server
    second = free_port()
    srv.update(LISTENER, {"second": listener("second", second, route_config_name=MAIN_ROUTES)})
    world.start()
    acked = {t: str(srv.version(t)) for t in TYPES}
    wait_all_acked(srv, acked)
    known = {t: {n: srv.resource_version(t, n) for n in srv.resources(t)} for t in TYPES}
    old_stream = srv.last_stream_id

    srv.stop()
    world.wait_stat("control_plane.connected_state", 0)
    # meanwhile: main's routes now go to b, listener second is gone
    v_rds = srv.set_resources(ROUTE, {MAIN_ROUTES: simple_routes(MAIN_ROUTES, "b")})
    v_lds = srv.remove(LISTENER, ["second"])
    assert world.get().upstream == "a"
    assert world.get(port=second).upstream == "a"

    since = srv.mark()
    srv.restart()
    sid = srv.wait_connected(world.node_id, since_stream=old_stream, timeout=10)
    srv.wait_for_ack(ROUTE, v_rds, ACK_TIMEOUT_S, since=since)
    srv.wait_for_ack(LISTENER, v_lds, ACK_TIMEOUT_S, since=since)
    world.wait_served_by("b")
    world.wait_refused(second)
    world.wait_stat("control_plane.connected_state", 1)

    initial = {t: first(srv, t, since=since, stream_id=sid) for t in TYPES}
    assert all(r.kind == "initial" and r.response_nonce == "" for r in initial.values())
    assert initial[CLUSTER].node_id == world.node_id
    responses = {t: srv.responses(t, since=since, stream_id=sid) for t in TYPES}
    if world.mode == "sotw":
        # the first request on the new stream carries the version the proxy has
        assert {t: r.version_info for t, r in initial.items()} == acked
        assert sorted(initial[ENDPOINT].resource_names) == ["a", "b"]
        assert initial[ROUTE].resource_names == (MAIN_ROUTES,)
        # SotW sends every type again; the unchanged ones are ACKed at the same version
        for t in (CLUSTER, ENDPOINT):
            assert [r.version for r in responses[t]] == [acked[t]]
            srv.wait_for_ack(t, acked[t], ACK_TIMEOUT_S, since=since)
    else:
        assert {t: dict(r.initial_resource_versions) for t, r in initial.items()} == known
        assert sorted(initial[ENDPOINT].subscribe) == ["a", "b"]
        assert initial[ROUTE].subscribe == (MAIN_ROUTES,)
        # only what changed is sent
        assert [(r.resource_names, r.removed) for r in responses[CLUSTER]] == [((), ())]
        assert [(r.resource_names, r.removed) for r in responses[ENDPOINT]] == [((), ())]
        assert [(r.resource_names, r.removed) for r in responses[LISTENER]] == [((), ("second",))]
        assert [(r.resource_names, r.removed) for r in responses[ROUTE]] == [((MAIN_ROUTES,), ())]
    assert world.dynamic()["routes"] == {MAIN_ROUTES: world.version_of(ROUTE, MAIN_ROUTES)}
    world.check_all_answered()


def test_server_gone_for_a_while_traffic_keeps_flowing(world: World) -> None:
    world.base_snapshot()
    world.start()
    srv = world.server
    before = world.dynamic()
    old_stream = srv.last_stream_id

    srv.stop()
    world.wait_stat("control_plane.connected_state", 0)
    deadline = time.monotonic() + DOWN_FOR_S
    served = 0
    while time.monotonic() < deadline:
        reply = world.get()
        assert (reply.status, reply.upstream) == (200, "a")
        served += 1
    assert served > 0
    assert world.dynamic() == before
    # (No check of control_plane.connected_state here: Envoy sets it to 1 as soon as it
    # opens a stream, before the connection is up, so it flickers to 1 during each
    # reconnect attempt.)
    if world.target == "envoy":
        stats = world.stats()
        assert stats["cluster.xds_cluster.upstream_cx_connect_fail"] >= 1  # it kept trying

    srv.restart()
    srv.wait_connected(world.node_id, since_stream=old_stream, timeout=10)
    world.wait_stat("control_plane.connected_state", 1)
    # the new stream is live: an update goes through it
    world.push(ROUTE, {MAIN_ROUTES: simple_routes(MAIN_ROUTES, "b")})
    world.wait_served_by("b")
    world.check_all_answered()


# ---------------------------------------------------------------------------------
# a route switched between clusters under load
# ---------------------------------------------------------------------------------

LOAD_CLIENTS = 4
SWITCHES = ("b", "a") * 5
PER_PHASE = 100  # requests each phase must see served by its cluster


def test_route_switch_under_load_zero_failures(world: World) -> None:
    world.base_snapshot()
    world.start()
    cond = threading.Condition()
    counts = {"a": 0, "b": 0}
    failures: list[str] = []
    stop = threading.Event()

    def client(i: int) -> None:
        keepalive = i % 2 == 0  # half reuse one connection, half open one per request
        conn: http.client.HTTPConnection | None = None
        while not stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", world.main_port, timeout=5)
                headers = {"host": "xds.test"}
                if not keepalive:
                    headers["connection"] = "close"
                conn.request("GET", f"/load/{i}", headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                upstream = resp.getheader("x-upstream")
                if resp.status != 200 or upstream not in counts:
                    failures.append(f"{resp.status} {upstream} {body[:100]!r}")
                else:
                    with cond:
                        counts[upstream] += 1
                        cond.notify_all()
                if resp.will_close or not keepalive:
                    conn.close()
                    conn = None
            except Exception as exc:
                failures.append(repr(exc))
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    threads = [
        threading.Thread(target=client, args=(i,), name=f"load-{i}", daemon=True)
        for i in range(LOAD_CLIENTS)
    ]
    for t in threads:
        t.start()
    try:
        with cond:
            assert cond.wait_for(lambda: counts["a"] >= PER_PHASE, timeout=10), counts
        for target in SWITCHES:
            with cond:
                seen = counts[target]
            world.push(ROUTE, {MAIN_ROUTES: simple_routes(MAIN_ROUTES, target)})
            with cond:
                assert cond.wait_for(lambda t=target, s=seen: counts[t] >= s + PER_PHASE, 10), (
                    target,
                    counts,
                )
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert failures == []
    assert min(counts.values()) >= PER_PHASE * len(SWITCHES) // 2
    world.check_all_answered()


DUPLICATED = {
    CLUSTER: ("c", "Error adding/updating cluster(s) c: duplicate cluster c found"),
    LISTENER: ("dup", "Error adding/updating listener(s) dup: duplicate listener dup found\n"),
    ROUTE: (MAIN_ROUTES, None),
}


@pytest.mark.parametrize("type_url", list(DUPLICATED), ids=short)
def test_nack_duplicate_resource_names(world: World, type_url: str) -> None:
    """A response naming one resource twice is NACKed (the xDS spec: clients should).

    Envoy: SotW CDS/LDS NACK it but apply the first copy; SotW RDS does not check
    (ACKs, applies); Delta NACKs every type and applies nothing of the response.
    """
    world.base_snapshot()
    world.start()
    srv = world.server
    srv.update(ENDPOINT, {"c": world.cla("c")})
    name, envoy_sotw_error = DUPLICATED[type_url]
    new = {
        CLUSTER: {"c": eds_cluster("c")},
        LISTENER: {"dup": listener("dup", free_port(), route_config_name=MAIN_ROUTES)},
        ROUTE: {MAIN_ROUTES: simple_routes(MAIN_ROUTES, "b")},
    }[type_url]
    since = srv.mark()
    version = srv.set_resources(type_url, {**srv.resources(type_url), **new}, duplicates=[name])
    envoy = world.target == "envoy"
    if envoy and world.mode == "sotw" and type_url == ROUTE:
        srv.wait_for_ack(type_url, version, ACK_TIMEOUT_S, since=since)  # Envoy does not check
        assert srv.responses(type_url, since=since)[0].resource_names.count(name) == 2
        world.wait_served_by("b")
        world.check_all_answered()
        return
    nack = srv.wait_for_nack(type_url, version, ACK_TIMEOUT_S, since=since)
    world.expected_nacks.append(nack)
    assert srv.responses(type_url, since=since)[0].resource_names.count(name) == 2
    assert name in (nack.error_detail or "")
    dyn = world.dynamic()
    if envoy and world.mode == "sotw":
        assert nack.error_detail == envoy_sotw_error
        applied = dyn["clusters"] if type_url == CLUSTER else dyn["listeners"]
        assert name in applied  # the first copy is applied
    elif envoy:
        assert nack.error_detail == f"duplicate name {name} found among added/updated resources"
        assert dyn["clusters"].keys() == {"a", "b"} and dyn["listeners"].keys() == {MAIN}
    assert world.get().upstream == "a"
    world.check_all_answered()


# ---------------------------------------------------------------------------------
# the fixture itself, on protocol corners Envoy's client does not exercise
# (a raw ADS client; no proxy)
# ---------------------------------------------------------------------------------


class RawAdsClient:
    """One ADS stream driven by hand: ``send`` a request, ``recv`` the next response."""

    def __init__(self, server: XdsServer, *, delta: bool) -> None:
        self.server = server
        self.delta = delta
        self.channel = grpc.insecure_channel(f"{server.host}:{server.port}")
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        method = stub.DeltaAggregatedResources if delta else stub.StreamAggregatedResources
        self.call = method(iter(self.outbox.get, None))
        self.reader = threading.Thread(target=self._read, name="raw-ads", daemon=True)
        self.reader.start()
        self.node = base_pb2.Node(id="raw-client")

    def _read(self) -> None:
        try:
            for resp in self.call:
                self.inbox.put(resp)
        except grpc.RpcError:
            pass  # cancelled by close()

    def send(self, **fields: Any) -> None:
        cls = discovery_pb2.DeltaDiscoveryRequest if self.delta else discovery_pb2.DiscoveryRequest
        self.outbox.put(cls(node=self.node, **fields))

    def recv(self, timeout: float = 5.0) -> Any:
        return self.inbox.get(timeout=timeout)

    def assert_no_response(self) -> None:
        """Nothing was sent in answer to what was sent so far: a probe request of a type
        nobody serves is processed after them, in order, and answered by nothing."""
        probe = f"{SECRET}.probe{next(_node_seq)}"
        self.send(type_url=probe)
        self.server.wait_for_request(lambda r: r.type_url == probe, timeout=5)
        assert self.inbox.empty(), self.inbox.get()

    def close(self) -> None:
        self.outbox.put(None)
        self.call.cancel()
        self.reader.join(5)
        self.channel.close()


@pytest.fixture
def raw_client(xds_server: XdsServer) -> Iterator[Callable[..., RawAdsClient]]:
    clients: list[RawAdsClient] = []

    def make(*, delta: bool) -> RawAdsClient:
        clients.append(RawAdsClient(xds_server, delta=delta))
        return clients[-1]

    yield make
    for c in clients:
        c.close()


def _names(resp: Any) -> list[str]:
    if isinstance(resp, discovery_pb2.DeltaDiscoveryResponse):
        return [r.name for r in resp.resources]
    out = []
    for a in resp.resources:
        msg = RESOURCE_TYPES[a.type_url]()
        a.Unpack(msg)
        out.append(msg.name if hasattr(msg, "name") else msg.cluster_name)
    return out


def test_fixture_sotw_nonces_subscriptions_and_nacks(
    xds_server: XdsServer, raw_client: Callable[..., RawAdsClient]
) -> None:
    srv = xds_server
    srv.set_snapshot(
        {
            ENDPOINT: {
                "x": cluster_load_assignment("x", []),
                "y": cluster_load_assignment("y", []),
            },
            CLUSTER: {"x": eds_cluster("x")},
        }
    )
    c = raw_client(delta=False)
    # legacy wildcard: an empty first request gets everything
    c.send(type_url=CLUSTER)
    r1 = c.recv()
    assert (r1.version_info, _names(r1)) == ("1", ["x"])
    c.send(type_url=CLUSTER, version_info="1", response_nonce=r1.nonce)  # ACK
    c.assert_no_response()
    # named: only what is asked for; a name that does not exist is left out
    c.send(type_url=ENDPOINT, resource_names=["x", "nope"])
    e1 = c.recv()
    assert _names(e1) == ["x"]
    # a change while e1 is unanswered waits for e1's ACK (which also subscribes to y)
    v2 = srv.update(ENDPOINT, {"x": cluster_load_assignment("x", [("127.0.0.1", 1)])})
    c.send(type_url=ENDPOINT, resource_names=["x", "y"], version_info="1", response_nonce=e1.nonce)
    assert srv.wait_for_ack(ENDPOINT, "1").kind == "ack"
    e2 = c.recv()
    assert (e2.version_info, sorted(_names(e2))) == (v2, ["x", "y"])
    # a request carrying a stale nonce (e1's) is ignored
    c.send(type_url=ENDPOINT, resource_names=["y"], version_info="1", response_nonce=e1.nonce)
    c.assert_no_response()
    assert srv.requests(ENDPOINT)[-1].kind == "stale"
    # a NACK is recorded with its error and not answered by a resend
    c.send(
        type_url=ENDPOINT,
        resource_names=["x", "y"],
        version_info="1",
        response_nonce=e2.nonce,
        error_detail=status_pb2.Status(code=3, message="bad x"),
    )
    nack = srv.wait_for_nack(ENDPOINT, v2)
    assert (nack.error_detail, nack.error_code, nack.version_info) == ("bad x", 3, "1")
    c.assert_no_response()
    # unsubscribing from everything (after naming resources) is not a wildcard
    c.send(type_url=ENDPOINT, resource_names=[], version_info="1", response_nonce=e2.nonce)
    c.assert_no_response()
    # removing a cluster: SotW LDS/CDS responses carry the whole set, here none
    v = srv.remove(CLUSTER, ["x"])
    r2 = c.recv()
    assert (r2.version_info, _names(r2)) == (v, [])


def test_fixture_delta_versions_removals_and_reconnect(
    xds_server: XdsServer, raw_client: Callable[..., RawAdsClient]
) -> None:
    srv = xds_server
    srv.set_snapshot({CLUSTER: {"x": eds_cluster("x"), "y": eds_cluster("y")}, ENDPOINT: {}})
    c = raw_client(delta=True)
    c.send(type_url=CLUSTER)  # legacy wildcard
    r1 = c.recv()
    assert sorted(_names(r1)) == ["x", "y"] and list(r1.removed_resources) == []
    versions = {r.name: r.version for r in r1.resources}
    assert versions == {n: srv.resource_version(CLUSTER, n) for n in ("x", "y")}
    c.send(type_url=CLUSTER, response_nonce=r1.nonce)
    # only what changed is sent; removals are named
    srv.set_resources(CLUSTER, {"x": eds_cluster("x", connect_timeout="3s"), "z": eds_cluster("z")})
    r2 = c.recv()
    assert (sorted(_names(r2)), list(r2.removed_resources)) == (["x", "z"], ["y"])
    c.send(type_url=CLUSTER, response_nonce=r2.nonce)
    # a subscribed name that does not exist is reported removed
    c.send(type_url=ENDPOINT, resource_names_subscribe=["ghost"])
    e1 = c.recv()
    assert (_names(e1), list(e1.removed_resources)) == ([], ["ghost"])
    c.send(type_url=ENDPOINT, response_nonce=e1.nonce)
    c.assert_no_response()

    # reconnect with initial_resource_versions: only what differs is sent
    have = {"x": srv.resource_version(CLUSTER, "x"), "y": "old", "gone": "v0"}
    c2 = raw_client(delta=True)
    c2.send(type_url=CLUSTER, initial_resource_versions=have)
    r = c2.recv()
    assert (sorted(_names(r)), sorted(r.removed_resources)) == (["z"], ["gone", "y"])
    c2.send(type_url=CLUSTER, response_nonce=r.nonce)
    # wildcard plus an explicit name: unsubscribing the name resends it (still
    # covered by the wildcard)
    c2.send(type_url=CLUSTER, resource_names_subscribe=["x"])
    r = c2.recv()
    assert _names(r) == ["x"]  # subscribing always (re)sends
    c2.send(type_url=CLUSTER, response_nonce=r.nonce)
    c2.send(type_url=CLUSTER, resource_names_unsubscribe=["x"])
    r = c2.recv()
    assert _names(r) == ["x"]
    c2.send(type_url=CLUSTER, response_nonce=r.nonce)
    # a NACKed resource is not resent until it changes
    v = srv.update(CLUSTER, {"z": eds_cluster("z", connect_timeout="4s")})
    r = c2.recv()
    assert _names(r) == ["z"] and r.system_version_info == v
    c2.send(
        type_url=CLUSTER,
        response_nonce=r.nonce,
        error_detail=status_pb2.Status(code=3, message="no z"),
    )
    assert srv.wait_for_nack(CLUSTER, v).error_detail == "no z"
    c2.assert_no_response()
    srv.update(CLUSTER, {"z": eds_cluster("z", connect_timeout="5s")})
    assert _names(c2.recv()) == ["z"]
