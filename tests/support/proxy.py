"""Run a proxy (Envoy or envoyx) as a child process from a bootstrap dict.

Both runners share one API so that a differential test drives them alike:
``start()`` writes the bootstrap to a file, spawns the process and polls the admin
``/ready`` endpoint against a deadline; ``stats()`` reads ``/stats?format=json``;
``stop()`` sends SIGTERM and returns the exit code.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from support.wait import Fatal, Timeout, proc_status_kb, until

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0

_seq = itertools.count()


class ProxyExited(Fatal, AssertionError):
    """The proxy process exited while the test expected it to be serving."""


class ProxyProcess:
    """A proxy child process configured with one bootstrap."""

    kind = "proxy"

    def __init__(
        self,
        bootstrap: dict[str, Any],
        workdir: Path,
        *,
        concurrency: int = 1,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.bootstrap = bootstrap
        self.concurrency = concurrency
        self.extra_args = extra_args
        n = next(_seq)
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / f"{self.kind}-{n}.yaml"
        self.log_path = workdir / f"{self.kind}-{n}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    # -- process -------------------------------------------------------------------

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def spawn(self) -> ProxyProcess:
        """Write the config and start the process without waiting for readiness."""
        self.config_path.write_text(yaml.safe_dump(self.bootstrap, sort_keys=False))
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=self.env(),
        )
        return self

    def start(self, timeout: float = START_TIMEOUT_S) -> ProxyProcess:
        self.spawn()
        try:
            until(self._ready_or_dead, timeout=timeout, what=f"{self.kind} admin /ready")
        except Timeout:
            self.stop()
            raise AssertionError(
                f"{self.kind} did not become ready in {timeout}s; log:\n{self.log_text()}"
            ) from None
        except ProxyExited:
            self._close_log()
            raise
        return self

    def _ready_or_dead(self) -> bool:
        if not self.running:
            raise ProxyExited(
                f"{self.kind} exited with {self.returncode} while starting; log:\n{self.log_text()}"
            )
        return self.ready()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait_exit(self, timeout: float = STOP_TIMEOUT_S) -> int:
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout)
        finally:
            self._close_log()
        return rc

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Send ``sig`` and wait; kill after ``timeout``. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                self._close_log()
                raise AssertionError(
                    f"{self.kind} did not exit within {timeout}s of signal {sig}; "
                    f"log:\n{self.log_text()}"
                ) from None
        self._close_log()
        return self.proc.returncode

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except FileNotFoundError:
            return ""

    def rss_kb(self) -> int:
        return proc_status_kb(self.pid, "VmRSS")

    def peak_rss_kb(self) -> int:
        return proc_status_kb(self.pid, "VmHWM")

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses -----------------------------------------------------------------

    @property
    def admin_address(self) -> tuple[str, int]:
        sa = self.bootstrap["admin"]["address"]["socket_address"]
        return (sa["address"], int(sa["port_value"]))

    def listener_address(self, name: str | None = None) -> tuple[str, int]:
        """The configured address of listener ``name`` (or of the first listener)."""
        for lis in self.bootstrap["static_resources"]["listeners"]:
            if name is None or lis["name"] == name:
                sa = lis["address"]["socket_address"]
                return (sa["address"], int(sa["port_value"]))
        raise KeyError(name)

    def url(self, path: str = "/", listener: str | None = None) -> str:
        host, port = self.listener_address(listener)
        return f"http://{host}:{port}{path}"

    # -- admin ---------------------------------------------------------------------

    def admin(
        self, path: str, method: str = "GET", timeout: float = 5.0
    ) -> tuple[int, dict[str, str], bytes]:
        host, port = self.admin_address
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            body = resp.read()
            headers = {k.lower(): v for k, v in resp.getheaders()}
            return resp.status, headers, body
        finally:
            conn.close()

    def ready(self) -> bool:
        try:
            status, _, _ = self.admin("/ready", timeout=2)
        except OSError:
            return False
        return status == 200

    def stats(self) -> dict[str, int]:
        """Counters and gauges by Envoy stat name, from ``/stats?format=json``."""
        status, _, body = self.admin("/stats?format=json")
        if status != 200:
            raise AssertionError(f"{self.kind} /stats?format=json gave {status}: {body[:200]!r}")
        out: dict[str, int] = {}
        for entry in json.loads(body)["stats"]:
            if "name" in entry and isinstance(entry.get("value"), int):
                out[entry["name"]] = entry["value"]
        return out

    def wait_stat(self, name: str, value: int, timeout: float = 10.0) -> dict[str, int]:
        """Poll until stat ``name`` equals ``value``; return all stats read then."""
        seen: dict[str, int] = {}

        def check() -> bool:
            nonlocal seen
            seen = self.stats()
            return seen.get(name) == value

        try:
            until(check, timeout=timeout, what=f"{name} == {value}")
        except Timeout:
            raise AssertionError(
                f"{self.kind}: stat {name} is {seen.get(name)}, expected {value}"
            ) from None
        return seen

    def wait_stats(
        self,
        expected: dict[str, int],
        before: dict[str, int],
        timeout: float = 5.0,
    ) -> dict[str, int]:
        """Poll until every stat in ``expected`` moved by exactly its value since
        ``before`` (stats are charged when a stream completes, which may be a moment
        after the client saw the response); return the deltas seen last."""
        seen: dict[str, int] = {}

        def check() -> bool:
            nonlocal seen
            now = self.stats()
            seen = {k: now.get(k, 0) - before.get(k, 0) for k in expected}
            return seen == expected

        with contextlib.suppress(Timeout):
            until(check, timeout=timeout, what="stat deltas")
        return seen


class EnvoyxProcess(ProxyProcess):
    """``python -m envoyx -c <file>`` — envoyx's CLI as a user runs it."""

    kind = "envoyx"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "envoyx",
            "-c",
            str(self.config_path),
            "--concurrency",
            str(self.concurrency),
            "-l",
            "info",
            *self.extra_args,
        ]
