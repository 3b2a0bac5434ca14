"""java-control-plane (Maven Central ``io.envoyproxy.controlplane`` 1.0.49) driving envoyx,
beside Envoy 1.40, as it drives Envoy in its own integration tests (issue 12).

tests/xds_java is a small program on the control plane's own ``SimpleCache``,
``V3DiscoveryServer`` and ``TestResources``: an EDS cluster, its endpoint, an RDS
listener and its route, all over ADS (State of the World or Delta). It is built once
with Maven into ``~/.cache/envoyx/xds-java/`` (dependencies from Maven Central into
``~/.m2``). Each test starts it, bootstraps a proxy to it, checks the traffic reaches
the endpoint, moves the endpoint to a second upstream with a new snapshot, checks the
traffic follows, and that the proxy NACKed nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest

from support.envoy import CACHE_DIR, targets_from_env
from support.upstreams import HttpUpstream
from support.wait import free_port, until
from support.xds_resources import ads_bootstrap

pytestmark = pytest.mark.envoy

XDS_JAVA_DIR = Path(__file__).parent / "xds_java"
XDS_JAVA_OUT = CACHE_DIR / "xds-java"
BUILD_TIMEOUT_S = 300.0
EVENT_TIMEOUT_S = 20.0
API_TYPES = {"sotw": "GRPC", "delta": "DELTA_GRPC"}
TYPES = (
    "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
    "type.googleapis.com/envoy.config.listener.v3.Listener",
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
)


@pytest.fixture(scope="session")
def xds_java_classpath() -> str:
    """tests/xds_java built with Maven (a quick no-op when nothing changed)."""
    mvn = shutil.which("mvn")
    if mvn is None:
        pytest.fail("Maven is not installed (needed to build tests/xds_java)", pytrace=False)
    try:
        proc = subprocess.run(
            [mvn, "-q", "-B", "package", f"-Dxdsjava.out={XDS_JAVA_OUT}"],
            cwd=XDS_JAVA_DIR,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"mvn package of tests/xds_java took over {BUILD_TIMEOUT_S}s", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(f"mvn package of tests/xds_java failed:\n{proc.stdout}{proc.stderr}")
    return os.pathsep.join([str(XDS_JAVA_OUT / "xds-java-1.jar"), str(XDS_JAVA_OUT / "lib" / "*")])


class XdsJavaServer:
    """The Java program as a child: commands on stdin, events on stdout."""

    def __init__(
        self, classpath: str, *, listener_port: int, endpoint_port: int, mode: str, log: Path
    ) -> None:
        self._log: IO[bytes] = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.log_path = log
        self.proc = subprocess.Popen(
            [
                "java",
                "-cp",
                classpath,
                "envoyx.XdsJava",
                str(listener_port),
                str(endpoint_port),
                mode,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, name="xds-java-stdout", daemon=True)
        self._reader.start()
        self.port = int(self.wait(lambda w: w[0] == "listening")[1])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait(self, match: Callable[[list[str]], bool], start: int = 0) -> list[str]:
        found: list[list[str]] = []

        def seen() -> bool:
            found[:] = [w for w in (line.split(" ", 4) for line in self.lines[start:]) if match(w)]
            return bool(found) or self._eof

        with self._cond:
            self._cond.wait_for(seen, EVENT_TIMEOUT_S)
        if not found:
            raise AssertionError("xds-java: expected event not seen; events:\n" + self.transcript())
        return found[0]

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def wait_acks(self, start: int) -> None:
        for type_url in TYPES:
            self.wait(lambda w, t=type_url: w[0] == "ack" and w[1] == t, start=start)

    def nacks(self) -> list[str]:
        with self._cond:
            return [line for line in self.lines if line.startswith("nack ")]

    def command(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd.encode() + b"\n")
        self.proc.stdin.flush()

    def transcript(self) -> str:
        with self._cond:
            lines = list(self.lines[-100:])
        with contextlib.suppress(OSError):
            lines += ["-- stderr --", self.log_path.read_text(errors="replace")[-3000:]]
        return "\n".join(lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.command("quit")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self._log.close()


@pytest.fixture
def upstreams() -> Iterator[tuple[HttpUpstream, HttpUpstream]]:
    a, b = HttpUpstream("first").start(), HttpUpstream("second").start()
    yield a, b
    a.stop()
    b.stop()


def _served_by(port: int) -> str | None:
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/", timeout=2.0)
    except httpx.HTTPError:
        return None
    return r.headers.get("x-upstream") if r.status_code == 200 else None


@pytest.mark.parametrize("mode", ["sotw", "delta"])
@pytest.mark.parametrize("target", targets_from_env("ENVOYX_XDS_TARGETS"))
def test_java_control_plane_snapshot_with_a_moved_endpoint(
    target: str,
    mode: str,
    request: pytest.FixtureRequest,
    xds_java_classpath: str,
    upstreams: tuple[HttpUpstream, HttpUpstream],
    tmp_path: Path,
) -> None:
    first, second = upstreams
    listener_port = free_port()
    server = XdsJavaServer(
        xds_java_classpath,
        listener_port=listener_port,
        endpoint_port=first.port,
        mode=mode,
        log=tmp_path / "xds-java.log",
    )
    try:
        start_proxy = request.getfixturevalue(f"start_{target}")
        proxy = start_proxy(
            ads_bootstrap(
                xds_address=("127.0.0.1", server.port),
                admin_port=free_port(),
                api_type=API_TYPES[mode],  # type: ignore[arg-type]
            )
        )
        server.wait_acks(0)
        until(lambda: _served_by(listener_port) == "first", what="traffic to the first endpoint")

        mark = server.mark()
        server.command(f"snapshot 2 {second.port}")
        server.wait(lambda w: w[0] == "snapshot" and w[1] == "2", start=mark)
        until(lambda: _served_by(listener_port) == "second", what="traffic to the moved endpoint")
        assert not server.nacks(), f"{proxy.kind} NACKed:\n" + "\n".join(server.nacks())
        stats = proxy.stats()
        assert stats.get("control_plane.connected_state") == 1
        assert stats.get("cluster_manager.cds.update_rejected", 0) == 0
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n-- xds-java events --\n{server.transcript()}") from None
    finally:
        server.stop()
