"""NACK storms: a management server that answers every NACK with the rejected snapshot
at once, as go-control-plane's snapshot cache does (its SotW server sees a request whose
``version_info`` is not the snapshot's and responds with the snapshot again), thousands
of times a second.

The management server is go-control-plane v0.14 (``tests/xds_go``, ``--stable-names``:
an update changes only what differs). Snapshot v0 gives cluster 0 one endpoint; a bad
snapshot gives it 10,000 endpoints plus one with an empty address, which Envoy's schema
rules refuse (``SocketAddress.address`` ``min_len: 1``): the whole assignment is NACKed
and comes back at once, for ever. Cluster 1, its listener, and cluster 0's assignment
accepted before stay in force and keep serving.

- ``test_a_resent_rejected_assignment_costs_little``: with no rate limit (Envoy's
  default) the storm runs as fast as both sides go. envoyx remembers the digest of the
  refused bytes and answers each resend with the same NACK without decoding or mapping
  the assignment again: envoyx's CPU seconds per NACK answered stay under a tenth of
  the CPU seconds it took to apply one assignment of the same size (measured in the same
  process just before). Envoy parses every resend (its figures are printed, see
  docs/xds.md).
- ``test_rate_limit_settings_bound_the_storm``: ``rate_limit_settings`` (Envoy's token
  bucket on the discovery requests of a stream): over the storm the NACKs the server
  receives are at most ``max_tokens + fill_rate * seconds``; ``control_plane.
  rate_limit_enforced`` counts the requests held back — envoyx and Envoy alike.

In both, traffic keeps flowing through both listeners during the storm, and a corrected
snapshot is ACKed and served.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_xds_go import (
    BUILD_TIMEOUT_S,
    ENDPOINT_TYPE,
    XDS_GO_DIR,
    XdsGoServer,
    _go_binary,
    ads_bootstrap,
    free_port_block,
    get,
)
from test_xds_java import XdsJavaServer, _served_by, xds_java_classpath  # noqa: F401 (a fixture)

from support.envoy import CACHE_DIR, targets_from_env
from support.proxy import ProxyProcess
from support.upstreams import HttpUpstream
from support.wait import free_port, until

UPSTREAM = "storm-upstream"
ENDPOINTS = 10_000
STORM_S = 2.0
# test_rate_limit_settings_bound_the_storm's bucket
MAX_TOKENS = 5
FILL_RATE = 4.0

Json = dict[str, Any]


def build_xds_go() -> Path:
    """tests/xds_go built into a cache path named by its sources' digest (test_xds_go
    builds the same sources; a path of their own keeps worktrees from overwriting it)."""
    h = hashlib.sha256()
    for name in ("main.go", "go.mod", "go.sum"):
        h.update((XDS_GO_DIR / name).read_bytes())
    binary = CACHE_DIR / "xds-go" / f"xds-go-{h.hexdigest()[:12]}"
    if binary.exists():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, GOFLAGS="-mod=mod -buildvcs=false")
    proc = subprocess.run(
        [_go_binary(), "build", "-o", str(binary), "."],
        cwd=XDS_GO_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"go build of tests/xds_go failed:\n{proc.stderr}")
    return binary


@pytest.fixture(scope="session")
def storm_server_binary() -> Path:
    try:
        return build_xds_go()
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def any_loopback_upstream() -> Iterator[HttpUpstream]:
    """Bound to 0.0.0.0: every 127.x.y.z endpoint of the big assignment reaches it."""
    up = HttpUpstream(UPSTREAM, host="0.0.0.0").start()
    yield up
    up.stop()


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Storm:
    """The Go server, the proxy, and the traffic checks of one test."""

    def __init__(
        self,
        request: pytest.FixtureRequest,
        target: str,
        binary: Path,
        upstream: HttpUpstream,
        tmp_path: Path,
        rate_limit: Json | None,
    ) -> None:
        self.base_port = free_port_block(2)
        self.server = XdsGoServer(
            binary,
            mode="ads",
            upstream_port=upstream.port,
            base_port=self.base_port,
            listeners=2,
            log_path=tmp_path / "xds-go.log",
            extra_args=("--stable-names",),
        )
        bootstrap = ads_bootstrap(
            admin_port=free_port(), xds_port=self.server.port, api_type="GRPC"
        )
        if rate_limit is not None:
            bootstrap["dynamic_resources"]["ads_config"]["rate_limit_settings"] = rate_limit
        start_proxy = request.getfixturevalue(f"start_{target}")
        self.proxy: ProxyProcess = start_proxy(bootstrap)
        self.server.wait_acks("v0", start=0)
        self.serves()

    def serves(self) -> None:
        """Both listeners reach the upstream."""
        for i in range(2):
            port = self.base_port + i
            until(lambda p=port: get(p) == (200, UPSTREAM), timeout=15, what=f"listener-{i}")

    def update(self, *commands: str) -> tuple[str, int]:
        """Send ``commands`` and ``update``: (the new version, the event mark before)."""
        mark = self.server.mark()
        for command in commands:
            self.server.command(command)
        return self.server.update(), mark

    def eds(self, kind: str, version: str | None, start: int, timeout: float = 20) -> None:
        """Wait for an EDS ``ack``/``nack`` (of ``version`` for an ACK) from ``start``."""

        def match(e: Any) -> bool:
            if e.kind != kind or e.args[0] != ENDPOINT_TYPE:
                return False
            return version is None or e.args[1] == version

        self.server.wait_event(match, timeout=timeout, start=start)

    def nacks_since(self, start: int) -> int:
        with self.server._cond:
            return sum(
                1
                for e in self.server.events[start:]
                if e.kind == "nack" and e.args[0] == ENDPOINT_TYPE
            )

    def storm(self) -> tuple[int, float, float, int]:
        """Let the storm run STORM_S with traffic through both listeners (every request
        must reach the upstream): (NACKs received by the server, CPU seconds of the
        proxy, seconds, requests served)."""
        mark = self.server.mark()
        cpu0, t0 = cpu_seconds(self.proxy.pid), time.monotonic()
        served = 0
        while time.monotonic() - t0 < STORM_S:
            for i in range(2):
                answer = get(self.base_port + i)
                assert answer == (200, UPSTREAM), f"listener-{i} answered {answer} in the storm"
                served += 1
            time.sleep(0.1)
        cpu1, t1 = cpu_seconds(self.proxy.pid), time.monotonic()
        return self.nacks_since(mark), cpu1 - cpu0, t1 - t0, served

    def corrected(self) -> float:
        """A corrected snapshot: ACKed (seconds from the update), and served."""
        t0 = time.monotonic()
        version, mark = self.update("bad off")
        self.eds("ack", version, mark)
        took = time.monotonic() - t0
        self.serves()
        return took

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def storm_factory(
    request: pytest.FixtureRequest,
    storm_server_binary: Path,
    any_loopback_upstream: HttpUpstream,
    tmp_path: Path,
) -> Iterator[Any]:
    made: list[Storm] = []

    def make(target: str, rate_limit: Json | None = None) -> Storm:
        storm = Storm(
            request, target, storm_server_binary, any_loopback_upstream, tmp_path, rate_limit
        )
        made.append(storm)
        return storm

    yield make
    for storm in made:
        storm.stop()


@pytest.mark.parametrize("target", targets_from_env("ENVOYX_XDS_TARGETS"))
def test_a_resent_rejected_assignment_costs_little(target: str, storm_factory: Any) -> None:
    storm = storm_factory(target)
    # One assignment of ENDPOINTS endpoints applied: what one parse and apply costs.
    cpu0 = cpu_seconds(storm.proxy.pid)
    version, mark = storm.update(f"endpoints {ENDPOINTS}")
    storm.eds("ack", version, mark)
    time.sleep(0.3)  # the rest of the apply (stats, the workers' host sets)
    apply_cpu = cpu_seconds(storm.proxy.pid) - cpu0
    storm.serves()

    # The same assignment with one bad endpoint: NACKed, resent at once, for ever.
    _, mark = storm.update("bad on")
    storm.eds("nack", None, mark)
    nacks, cpu, seconds, served = storm.storm()
    per_nack = cpu / max(nacks, 1)
    print(
        f"\n{target}: apply of {ENDPOINTS} endpoints {apply_cpu * 1000:.1f} ms CPU; storm: "
        f"{nacks} NACKs in {seconds:.2f}s ({nacks / seconds:.0f}/s), "
        f"CPU {cpu:.2f}s ({cpu / seconds:.0%} of a core), {per_nack * 1000:.2f} ms CPU a NACK, "
        f"{served} requests served"
    )
    assert nacks >= 10, f"{target}: no storm ({nacks} NACKs in {seconds:.1f}s)"
    stats = storm.proxy.stats()
    rejected = stats.get("cluster.cluster-0.update_rejected")
    print(f"{target}: cluster.cluster-0.update_rejected {rejected}")
    assert stats.get("cluster.cluster-0.update_rejected", 0) >= nacks
    if target == "envoyx":
        # A resend costs envoyx a digest of the bytes, not a parse: the CPU of each NACK
        # answered stays far below that of one parse and apply of the same assignment
        # (answering each resend by parsing it again costs a third of it, measured).
        assert per_nack < apply_cpu / 10, (
            f"{per_nack * 1000:.2f} ms CPU a NACK, {apply_cpu * 1000:.1f} ms an apply"
        )
    took = storm.corrected()
    print(f"{target}: corrected snapshot ACKed {took * 1000:.0f} ms after the update")


@pytest.mark.parametrize("target", targets_from_env("ENVOYX_XDS_TARGETS"))
def test_rate_limit_settings_bound_the_storm(target: str, storm_factory: Any) -> None:
    storm = storm_factory(target, rate_limit={"max_tokens": MAX_TOKENS, "fill_rate": FILL_RATE})
    _, mark = storm.update(f"endpoints {ENDPOINTS}", "bad on")
    storm.eds("nack", None, mark)
    nacks, cpu, seconds, served = storm.storm()
    print(
        f"\n{target} (max_tokens {MAX_TOKENS}, fill_rate {FILL_RATE}/s): {nacks} NACKs in "
        f"{seconds:.2f}s, CPU {cpu:.3f}s, {served} requests served"
    )
    # The bucket: at most max_tokens at once, then fill_rate a second (+1: a token
    # taken just before the window).
    bound = MAX_TOKENS + FILL_RATE * seconds + 1
    assert 2 <= nacks <= bound, f"{target}: {nacks} NACKs in {seconds:.2f}s (bound {bound:.1f})"
    stats = storm.proxy.stats()
    print(
        f"{target}: "
        + ", ".join(
            f"{name} {stats.get(name)}"
            for name in (
                "control_plane.rate_limit_enforced",
                "control_plane.pending_requests",
                "cluster.cluster-0.update_rejected",
            )
        )
    )
    assert stats.get("control_plane.rate_limit_enforced", 0) > 0, stats
    assert "control_plane.pending_requests" in stats
    took = storm.corrected()
    print(f"{target}: corrected snapshot ACKed {took * 1000:.0f} ms after the update")


def test_rate_limit_settings_are_read() -> None:
    """Envoy's defaults (100 tokens, 10 a second) for fields left unset; a NaN
    fill_rate refused as Envoy refuses it; no limit without the message."""
    from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap
    from google.protobuf import json_format

    from envoyx.errors import ConfigError
    from envoyx.xds.settings import RateLimit, parse_dynamic_resources

    def ads(rate_limit: Json | None) -> Any:
        doc = ads_bootstrap(admin_port=1, xds_port=2, api_type="GRPC")
        if rate_limit is not None:
            doc["dynamic_resources"]["ads_config"]["rate_limit_settings"] = rate_limit
        settings = parse_dynamic_resources(json_format.ParseDict(doc, Bootstrap()))
        assert settings is not None and settings.ads is not None
        return settings.ads.rate_limit

    assert ads(None) is None
    assert ads({}) == RateLimit(100, 10.0)
    assert ads({"max_tokens": 7}) == RateLimit(7, 10.0)
    assert ads({"fill_rate": 0.5}) == RateLimit(100, 0.5)
    with pytest.raises(ConfigError, match=r"rate_limit_settings\.fill_rate: .*NaN nor Inf"):
        ads({"fill_rate": "NaN"})
    # Envoy's schema rule (fill_rate gt 0) holds for the whole bootstrap
    from envoyx.config import load_bootstrap

    doc = ads_bootstrap(admin_port=1, xds_port=2, api_type="GRPC")
    doc["dynamic_resources"]["ads_config"]["rate_limit_settings"] = {"fill_rate": 0}
    with pytest.raises(ConfigError, match=r"rate_limit_settings\.fill_rate: value must be greater"):
        load_bootstrap(doc)


def test_the_token_bucket_is_envoys() -> None:
    from envoyx.xds.client import TokenBucket

    now = [0.0]
    bucket = TokenBucket(3, 2.0, clock=lambda: now[0])
    assert [bucket.consume() for _ in range(4)] == [True, True, True, False]
    assert bucket.next_token() == 0.5
    now[0] = 0.5
    assert bucket.consume() and not bucket.consume()
    now[0] = 10.0
    assert [bucket.consume() for _ in range(4)] == [True, True, True, False]


def test_requests_wait_for_tokens_in_order() -> None:
    from envoy.service.discovery.v3 import discovery_pb2

    from envoyx.xds.client import Outbox, TokenBucket

    class Stats:
        def __init__(self) -> None:
            self.values: dict[str, int] = {}

        def counter(self, name: str, value: int = 1) -> None:
            self.values[name] = self.values.get(name, 0) + value

        def gauge(self, name: str, value: int) -> None:
            self.values[name] = value

    now = [0.0]
    stats = Stats()
    box = Outbox(TokenBucket(1, 1000.0, clock=lambda: now[0]), stats)

    def req(type_url: str, nonce: str) -> Any:
        return discovery_pb2.DiscoveryRequest(type_url=type_url, response_nonce=nonce)

    box.put(req("a", "1"))
    got: list[str] = []
    it = iter(box)
    got.append(next(it).response_nonce)  # the one token
    box.put(req("a", "2"))
    box.put(req("b", "3"))
    sender = threading.Thread(target=lambda: got.extend(next(it).response_nonce for _ in range(2)))
    sender.start()
    until(lambda: stats.values.get("control_plane.rate_limit_enforced", 0) > 0, timeout=5)
    assert stats.values["control_plane.pending_requests"] == 2
    assert got == ["1"]
    now[0] = 1.0  # a token again
    until(lambda: len(got) == 2, timeout=5)
    now[0] = 2.0
    sender.join(5)
    box.close()
    assert got == ["1", "2", "3"]
    assert stats.values["control_plane.pending_requests"] == 0


def _lb(address: str, port: int, **extra: Any) -> Json:
    sa: Json = {"address": address}
    if port:
        sa["port_value"] = port
    return {"endpoint": {"address": {"socket_address": sa}}, **extra}


EDS_SHAPES: list[Json] = [
    # plain ones, 1-, 2- and 3-byte ports, long addresses (2-byte lengths)
    {"cluster_name": "c", "endpoints": [{"lb_endpoints": [_lb("10.0.0.1", 9), _lb("h", 300)]}]},
    {
        "cluster_name": "c",
        "endpoints": [{"lb_endpoints": [_lb("a" * 120, 65535), _lb("b" * 127, 20000)]}],
    },
    # other shapes beside plain ones, in localities with their own fields
    {
        "cluster_name": "c",
        "policy": {"overprovisioning_factor": 140},
        "endpoints": [
            {
                "locality": {"region": "r\x12\x0a", "zone": "z"},
                "priority": 1,
                "load_balancing_weight": 3,
                "lb_endpoints": [
                    _lb("10.0.0.1", 9),
                    _lb("10.0.0.2", 9, health_status="UNHEALTHY"),
                    _lb("10.0.0.3", 9, load_balancing_weight=5),
                    _lb("10.0.0.4", 9, metadata={"filter_metadata": {"m": {"k": "v"}}}),
                    {
                        "endpoint": {
                            "address": {
                                "socket_address": {
                                    "address": "10.0.0.5",
                                    "port_value": 9,
                                    "protocol": "UDP",
                                }
                            }
                        }
                    },
                    _lb('q"uote', 9),
                    _lb("é", 9),
                    _lb("10.0.0.6", 9),
                ],
            },
            {"lb_endpoints": [_lb("10.0.0.7", 9)]},
            {"priority": 2},
        ],
    },
    # refused by the schema rules: an empty address, a port over 65535 is unrepresentable
    {"cluster_name": "c", "endpoints": [{"lb_endpoints": [_lb("10.0.0.1", 9), _lb("", 9)]}]},
]


@pytest.mark.parametrize("shape", range(len(EDS_SHAPES)))
def test_the_eds_fast_path_writes_what_the_generic_code_writes(shape: int) -> None:
    """The plain endpoints read from the bytes, the others the generic way: the same
    JSON and the same errors as the generic code gives for the whole assignment."""
    import json

    from envoy.config.endpoint.v3 import endpoint_pb2
    from google.protobuf import json_format

    from envoyx.xds._eds import check_and_encode
    from envoyx.xds.applier import canonical_json, schema_errors

    cla = json_format.ParseDict(EDS_SHAPES[shape], endpoint_pb2.ClusterLoadAssignment())
    errors, text = check_and_encode(cla, schema_errors)
    assert errors == schema_errors(cla)
    if not errors:
        assert json.loads(text) == json.loads(canonical_json(cla))


def test_a_refusal_is_forgotten_once_anything_changes() -> None:
    """The memory of refused bytes holds only while the core holds what it held when
    it refused them (an accepted or removed resource of any type, or a new stream,
    may have been the reason)."""
    from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap
    from envoy.config.endpoint.v3 import endpoint_pb2

    from envoyx.xds.applier import Applier
    from envoyx.xds.resources import CLUSTER, ENDPOINT

    class Core:
        def apply(self, type_url: str, resources: Any, removed: Any, version: str) -> Any:
            return [(name, "refused") for name, _ in resources if name == "bad"]

        def wanted_resources(self, type_url: str) -> list[str]:
            return []

    applier = Applier(Core(), Bootstrap())  # type: ignore[arg-type]
    applier.remember_rejected(ENDPOINT, b"d1", "c", "why")
    assert applier.known_rejection(ENDPOINT, b"d1") == ("c", "why")
    assert applier.known_rejection(CLUSTER, b"d1") is None
    # the core refusing something else changes nothing
    bad = applier.prepare(ENDPOINT, endpoint_pb2.ClusterLoadAssignment(cluster_name="bad"))
    assert applier.apply(ENDPOINT, [bad], [], "1") == {"bad": "refused"}
    assert applier.known_rejection(ENDPOINT, b"d1") == ("c", "why")
    # anything taken: forgotten
    ok = applier.prepare(ENDPOINT, endpoint_pb2.ClusterLoadAssignment(cluster_name="ok"))
    assert applier.apply(ENDPOINT, [ok], [], "2") == {}
    assert applier.known_rejection(ENDPOINT, b"d1") is None
    applier.remember_rejected(ENDPOINT, b"d1", "c", "why")
    applier.forget_rejections()  # a new stream
    assert applier.known_rejection(ENDPOINT, b"d1") is None


@pytest.mark.envoy
@pytest.mark.parametrize("target", targets_from_env("ENVOYX_XDS_TARGETS"))
def test_java_control_planes_storm_is_bounded_by_the_rate_limit(
    target: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """java-control-plane 1.0.49's SimpleCache resends a refused snapshot at once too
    (an endpoint on port 70000: Envoy's rule port_value lte 65535): with
    ``rate_limit_settings`` the NACKs stay within the bucket, the endpoint accepted
    before keeps serving, and the next snapshot is taken."""

    from support.xds_resources import ads_bootstrap as ads_bootstrap_of

    classpath = request.getfixturevalue("xds_java_classpath")
    first, second = HttpUpstream("first").start(), HttpUpstream("second").start()
    listener_port = free_port()
    server = XdsJavaServer(
        classpath,
        listener_port=listener_port,
        endpoint_port=first.port,
        mode="sotw",
        log=tmp_path / "xds-java.log",
    )
    try:
        bootstrap = ads_bootstrap_of(xds_address=("127.0.0.1", server.port), admin_port=free_port())
        bootstrap["dynamic_resources"]["ads_config"]["rate_limit_settings"] = {
            "max_tokens": MAX_TOKENS,
            "fill_rate": FILL_RATE,
        }
        proxy = request.getfixturevalue(f"start_{target}")(bootstrap)
        server.wait_acks(0)
        until(lambda: _served_by(listener_port) == "first", what="traffic to the first endpoint")

        mark = server.mark()
        server.command("snapshot 2 70000")
        server.wait(lambda w: w[0] == "nack" and w[1] == ENDPOINT_TYPE, start=mark)
        t0 = time.monotonic()
        start = server.mark()
        while time.monotonic() - t0 < STORM_S:
            assert _served_by(listener_port) == "first", "the accepted endpoint stopped serving"
            time.sleep(0.1)
        seconds = time.monotonic() - t0
        with server._cond:
            nacks = sum(1 for line in server.lines[start:] if line.startswith("nack "))
        print(f"\n{target}: java-control-plane storm, {nacks} NACKs in {seconds:.2f}s")
        bound = MAX_TOKENS + FILL_RATE * seconds + 1
        assert 1 <= nacks <= bound, f"{target}: {nacks} NACKs in {seconds:.2f}s (bound {bound:.1f})"
        assert proxy.stats().get("control_plane.rate_limit_enforced", 0) > 0

        server.command(f"snapshot 3 {second.port}")
        until(lambda: _served_by(listener_port) == "second", what="traffic to the new endpoint")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n-- xds-java events --\n{server.transcript()}") from None
    finally:
        server.stop()
        first.stop()
        second.stop()
