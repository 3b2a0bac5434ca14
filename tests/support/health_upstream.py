"""An HTTP/1.1 upstream in its own process whose answers the test steers, for health
checking and outlier detection tests (a process, so that a test can ``kill -9`` it
and start it again on the same port).

- ``GET /healthz`` answers the health-check status (default 200), with
  ``x-envoy-immediate-health-check-fail`` / ``x-envoy-degraded`` when asked, or
  bytes that are not HTTP at all (``garbage``).
- any other path answers the traffic status (default 200) with ``x-upstream: <name>``.
- ``traffic_immediate=1`` adds ``x-envoy-immediate-health-check-fail`` to traffic answers.
- ``healthchecked=1`` adds ``x-envoy-upstream-healthchecked-cluster: <name>-svc`` to
  health-check answers (what ``service_name_matcher`` looks at).
- ``GET /count`` answers how many health checks it has answered.
- ``POST /control?hc=503&status=500&immediate=1&degraded=1&garbage=1`` sets them.
"""

from __future__ import annotations

import http.client
import signal
import socket
import subprocess
import sys
from urllib.parse import urlencode

from support.wait import until

_SCRIPT = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

port, name = int(sys.argv[1]), sys.argv[2]
state = {"hc": 200, "status": 200, "immediate": 0, "degraded": 0, "garbage": 0, "checks": 0,
         "traffic_immediate": 0, "healthchecked": 0}

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _reply(self, status, headers=(), body=b""):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/count":
            return self._reply(200, [], str(state["checks"]).encode())
        if self.path.startswith("/healthz"):
            state["checks"] += 1
            if state["garbage"]:
                self.wfile.write(b"\x00\xffTHIS IS NOT HTTP\r\n\r\n\x01\x02")
                self.close_connection = True
                return
            headers = []
            if state["immediate"]:
                headers.append(("x-envoy-immediate-health-check-fail", "true"))
            if state["degraded"]:
                headers.append(("x-envoy-degraded", "true"))
            if state["healthchecked"]:
                headers.append(("x-envoy-upstream-healthchecked-cluster", name + "-svc"))
            return self._reply(state["hc"], headers, b"hc")
        headers = [("x-upstream", name)]
        if state["traffic_immediate"]:
            headers.append(("x-envoy-immediate-health-check-fail", "true"))
        self._reply(state["status"], headers, name.encode())

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        for k, v in parse_qs(urlsplit(self.path).query).items():
            state[k] = int(v[0])
        self._reply(200, [], b"ok")

ThreadingHTTPServer.allow_reuse_address = True
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HealthUpstream:
    """The steerable upstream process; ``start`` again after ``kill`` reuses the port."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self) -> HealthUpstream:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SCRIPT, str(self.port), self.name],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        until(self._answers, timeout=10, what=f"upstream {self.name} up")
        return self

    def _answers(self) -> bool:
        try:
            self._request("GET", "/ping")
        except OSError:
            return False
        return True

    def _request(self, method: str, path: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()

    def checks(self) -> int:
        """How many health checks it has answered."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", "/count")
            return int(conn.getresponse().read())
        finally:
            conn.close()

    def set(self, **state: int) -> None:
        """Steers the answers (see the module docstring)."""
        assert self._request("POST", "/control?" + urlencode(state)) == 200

    def kill(self) -> None:
        """``kill -9``: the process dies without closing anything itself."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
