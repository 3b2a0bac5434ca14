#!/usr/bin/env python3
"""TLS benchmarks: envoyx, Envoy and HAProxy terminating TLS in one run.

    python benches/tls.py [--duration 10] [--rounds 1] [--quick] [--targets envoyx,haproxy]

The load harness's setup (benches/harness.py, whose functions this reuses): one nginx
upstream with a 12-byte body over plaintext HTTP/1.1 keep-alive, one worker per proxy.
envoyx and Envoy get the harness's bootstrap (benches/configs/bootstrap.yaml) with its
listener doubled and a ``DownstreamTlsContext`` on each copy (one serving an ECDSA P-256
certificate, one an RSA 2048 certificate; ALPN h2 and http/1.1, every other TLS setting
left at its default); HAProxy (Debian's, built with OpenSSL) gets
benches/configs/haproxy-tls.cfg, ``bind ... ssl crt`` on two ports alike. The
certificates are made at run time with ``cryptography`` (tests/support/tls.py's
``Authority``) in a temporary directory.

Per target:

- TLS keep-alive: wrk -t1 over https (HTTP/1.1) and h2load -t1 over TLS with ALPN h2,
  on the ECDSA listener: requests/s, p50/p99, proxy CPU per request;
- full handshakes (RSA 2048 and ECDSA P-256 listeners) and resumed handshakes (the
  ECDSA listener, TLS 1.3 session tickets): ``openssl s_time -new`` / ``-reuse`` in
  several processes at once, each connection one HTTP/1.1 request with
  ``Connection: close``: handshakes per second and proxy CPU per handshake; and
  resumed TLS 1.2 handshakes without a request (``s_time -reuse -tls1_2``), whose
  resumption does not depend on how the server ends the connection;
- memory: RSS per idle TLS keep-alive connection (1,000 connections open, each after
  one request).

Targets (issue 9): TLS keep-alive CPU per request ≤ HAProxy's; handshakes per second ≥
HAProxy's; ≤ 8 KiB per idle TLS connection. Ratios in the tables are to HAProxy's
figure. The report goes to stdout and benches/results/tls.md, raw outputs and a JSON of
every figure to benches/results/raw/.
"""

from __future__ import annotations

import argparse
import copy
import re
import ssl
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
from harness import (
    RAW,
    RESULTS,
    TIMES,
    Child,
    HarnessError,
    LoadResult,
    Running,
    Settings,
    TargetResult,
    fmt_kib,
    fmt_us,
    log,
)

from support.tls import DOWNSTREAM_TLS_TYPE, TLS_SOCKET, Authority, CertFiles

TARGETS = ("envoyx", "envoy", "haproxy")
REFERENCE = "haproxy"  # the peer every ratio here is taken against (issue 9's targets)
KEY_KINDS = ("ecdsa", "rsa")
PLAIN = "plain"  # the plaintext listener of the same proxy: the baseline of "TLS adds"
IDLE_GOAL_BYTES = 8 * harness.KIB
# One HTTP/1.1 request per s_time connection: s_time writes "GET <page> HTTP/1.0\r\n\r\n";
# this page turns it into an HTTP/1.1 request with a Host and Connection: close (Envoy
# and envoyx refuse HTTP/1.0 with 426 by default, HAProxy would proxy it), so that every
# target proxies the same request and closes the connection after it.
S_TIME_PAGE = "/ HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nX-Bench:"


@dataclass(frozen=True)
class HandshakeKind:
    key: str
    label: str
    cert: str  # which listener: its certificate's key kind
    resumed: bool  # s_time -reuse (else -new)
    # TLS 1.2 and the handshake alone (no request): s_time takes its session from the
    # handshake itself, so resumption does not depend on how the connection ends (a
    # TLS 1.3 ticket arrives after the handshake, and OpenSSL drops the session when
    # the server closes without close_notify).
    tls12_bare: bool = False


HANDSHAKES = (
    HandshakeKind("rsa-full", "full, RSA 2048", "rsa", resumed=False),
    HandshakeKind("ecdsa-full", "full, ECDSA P-256", "ecdsa", resumed=False),
    HandshakeKind("ecdsa-resumed", "resumed (TLS 1.3 ticket), ECDSA", "ecdsa", resumed=True),
    HandshakeKind(
        "ecdsa-resumed-tls12",
        "resumed, TLS 1.2, handshake only, ECDSA",
        "ecdsa",
        resumed=True,
        tls12_bare=True,
    ),
)


@dataclass
class TlsSettings(Settings):
    handshake_clients: int = 4


@dataclass
class HandshakeRun:
    connections: int
    resumed: int  # of them, the ones s_time saw resumed
    seconds: float
    failed_clients: int
    proxy_cpu_us: float | None = None  # per handshake

    @property
    def rate(self) -> float:
        return self.connections / self.seconds if self.seconds else 0.0


@dataclass
class Handshakes:
    """One handshake figure over the rounds: medians, the resumed share over all."""

    rate: float
    proxy_cpu_us: float | None
    resumed_share: float
    failed_clients: int


@dataclass
class TlsResult(TargetResult):
    """``h1_runs``/``h2_runs`` are over TLS; ``plain_runs`` the same load in plaintext."""

    negotiated: str = ""
    handshake_runs: dict[str, list[HandshakeRun]] = field(default_factory=dict)
    plain_runs: dict[str, list[LoadResult]] = field(default_factory=dict)

    def plain(self, proto: str) -> LoadResult | None:
        return harness.combine(self.plain_runs.get(proto, []))

    def handshakes(self, key: str) -> Handshakes | None:
        runs = self.handshake_runs.get(key, [])
        if not runs:
            return None
        cpu = [r.proxy_cpu_us for r in runs if r.proxy_cpu_us is not None]
        connections = sum(r.connections for r in runs)
        return Handshakes(
            rate=float(statistics.median(r.rate for r in runs)),
            proxy_cpu_us=statistics.median(cpu) if cpu else None,
            resumed_share=sum(r.resumed for r in runs) / connections if connections else 0.0,
            failed_clients=sum(r.failed_clients for r in runs),
        )


# ------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Certs:
    ca: Path
    leaves: dict[str, CertFiles]  # by key kind
    haproxy_pems: dict[str, Path]  # certificate chain and key in one file

    def client_context(self) -> ssl.SSLContext:
        """Python's TLS client verifying against the run's CA; ALPN http/1.1."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(self.ca)
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx


def make_certs(directory: Path) -> Certs:
    directory.mkdir()
    root = Authority(directory, "bench-ca")
    leaves = {
        kind: root.issue(f"bench-{kind}", kind=kind, dns=("localhost",), ips=("127.0.0.1",))
        for kind in KEY_KINDS
    }
    pems = {}
    for kind, leaf in leaves.items():
        pems[kind] = directory / f"bench-{kind}.pem"
        pems[kind].write_text(leaf.cert_pem + leaf.key_pem)
    return Certs(root.cert_path, leaves, pems)


# ------------------------------------------------------------------------ targets


def transport_socket(leaf: CertFiles) -> dict[str, Any]:
    return {
        "name": TLS_SOCKET,
        "typed_config": {
            "@type": DOWNSTREAM_TLS_TYPE,
            "common_tls_context": {
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(leaf.cert_path)},
                        "private_key": {"filename": str(leaf.key_path)},
                    }
                ],
            },
        },
    }


def write_bootstrap(
    name: str, workdir: Path, upstream: harness.Upstream, certs: Certs
) -> tuple[Path, dict[str, int]]:
    """The harness's bootstrap: its plaintext listener, and a copy of it per key kind
    with TLS on it."""
    *listen, admin = harness.free_ports(len(KEY_KINDS) + 2)
    ports = dict(zip((PLAIN, *KEY_KINDS), listen, strict=True))
    path = harness.render(
        "bootstrap.yaml",
        workdir / f"tls-{name}-bootstrap.yaml",
        listen_port=ports[PLAIN],
        admin_port=admin,
        upstream_port=upstream.h1_port,
    )
    doc = yaml.safe_load(path.read_text())
    plain = doc["static_resources"]["listeners"][0]
    listeners = [plain]
    for kind in KEY_KINDS:
        port = ports[kind]
        lis = copy.deepcopy(plain)
        lis["name"] = f"bench-{kind}"
        lis["address"]["socket_address"]["port_value"] = port
        lis["filter_chains"][0]["transport_socket"] = transport_socket(certs.leaves[kind])
        listeners.append(lis)
    doc["static_resources"]["listeners"] = listeners
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path, ports


def start_proxy(
    name: str, tools: dict[str, str], workdir: Path, upstream: harness.Upstream, certs: Certs
) -> tuple[Child, dict[str, int]]:
    raw_log = RAW / f"tls-{name}.log"
    if name == "haproxy":
        keys = (PLAIN, *KEY_KINDS)
        ports = dict(zip(keys, harness.free_ports(len(keys)), strict=True))
        cfg = harness.render(
            "haproxy-tls.cfg",
            workdir / "haproxy-tls.cfg",
            plain_port=ports[PLAIN],
            ecdsa_port=ports["ecdsa"],
            rsa_port=ports["rsa"],
            ecdsa_pem=certs.haproxy_pems["ecdsa"],
            rsa_pem=certs.haproxy_pems["rsa"],
            upstream_port=upstream.h1_port,
        )
        return harness.spawn(name, [tools["haproxy"], "-db", "-f", str(cfg)], raw_log), ports
    cfg, ports = write_bootstrap(name, workdir, upstream, certs)
    if name == "envoyx":
        cmd = [tools["envoyx"], "-c", str(cfg), "--concurrency", "1"]
    else:
        cmd = [tools["envoy"], "-c", str(cfg), "--concurrency", "1", "--disable-hot-restart"]
    return harness.spawn(name, cmd, raw_log), ports


def negotiated(port: int) -> str:
    """What an OpenSSL client with its defaults negotiates: version, cipher, group."""
    done = subprocess.run(
        ["openssl", "s_client", "-brief", "-connect", f"127.0.0.1:{port}"],
        input="",
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    text = done.stdout + done.stderr
    found = []
    for label in ("Protocol version", "Ciphersuite", "Server Temp Key"):
        m = re.search(rf"^{label}: (.+)$", text, re.MULTILINE)
        found.append(m.group(1).strip() if m else "?")
    return ", ".join(found)


@dataclass
class TlsTarget:
    running: Running  # h1_port and h2_port: the ECDSA listener
    ports: dict[str, int]


def start_target(
    name: str, tools: dict[str, str], workdir: Path, upstream: harness.Upstream, certs: Certs
) -> TlsTarget | TlsResult:
    result = TlsResult(name)
    child: Child | None = None
    try:
        child, ports = start_proxy(name, tools, workdir, upstream, certs)
        for key, port in ports.items():
            harness.wait_ready(port, child, None if key == PLAIN else certs.client_context())
        result.negotiated = negotiated(ports["ecdsa"])
        running = Running(result, ports["ecdsa"], ports["ecdsa"], child.pid, child)
        return TlsTarget(running, ports)
    except harness.STEP_ERRORS as exc:
        if child is not None:
            child.stop()
        result.errors.append(f"start: {str(exc).strip() or repr(exc)}")
        log(f"{name}: FAILED to start: {exc}")
        return result


# ---------------------------------------------------------------------- handshakes


def s_time(
    port: int, kind: HandshakeKind, seconds: int, clients: int, raw_name: str
) -> HandshakeRun:
    """``clients`` ``openssl s_time`` processes at once for ``seconds``; every connection
    is a handshake (full with ``-new``, resuming the first connection's session with
    ``-reuse``) and one request (none with ``tls12_bare``). The rate is over the wall
    time of all of them."""
    cmd = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-time", str(seconds)]
    cmd.append("-reuse" if kind.resumed else "-new")
    cmd += ["-tls1_2"] if kind.tls12_bare else ["-www", S_TIME_PAGE]
    started = time.monotonic()
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(clients)
    ]
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        outputs.append((proc.returncode, out))
    elapsed = time.monotonic() - started
    shown = " ".join(cmd).replace("\r\n", "\\r\\n")
    (RAW / raw_name).write_text("\n".join(f"$ {shown}  # rc {rc}\n{out}" for rc, out in outputs))
    connections = resumed_count = failed = 0
    for rc, out in outputs:
        m = re.search(r"^(\d+) connections in [\d.]+s;", out, re.MULTILINE)
        if rc != 0 or m is None:
            failed += 1
            continue
        connections += int(m.group(1))
        # s_time prints one character per connection: "r" when it was resumed.
        progress = "".join(line for line in out.splitlines() if re.fullmatch(r"[*rt3]+", line))
        resumed_count += progress.count("r")
    if connections == 0:
        tail = outputs[0][1].strip()[-500:] if outputs else ""
        raise HarnessError(f"openssl s_time made no connection: {tail}")
    return HandshakeRun(connections, resumed_count, elapsed, failed)


def run_handshakes(
    target: TlsTarget, kind: HandshakeKind, settings: TlsSettings, round_no: int
) -> None:
    running = target.running
    name, pid = running.result.name, running.pid
    assert pid is not None and isinstance(running.result, TlsResult)
    result: TlsResult = running.result
    suffix = f"-{round_no}" if settings.rounds > 1 else ""
    port, key = target.ports[kind.cert], kind.key

    def run() -> None:
        if settings.warmup:
            s_time(port, kind, settings.warmup, 1, f"tls-{name}-{key}-warmup{suffix}.txt")
        before = harness.cpu_seconds(pid)
        hs = s_time(
            port,
            kind,
            settings.duration,
            settings.handshake_clients,
            f"tls-{name}-{key}{suffix}.txt",
        )
        hs.proxy_cpu_us = (harness.cpu_seconds(pid) - before) * 1e6 / hs.connections
        result.handshake_runs.setdefault(key, []).append(hs)

    running.step(f"handshakes {key}", run)


# --------------------------------------------------------------------------- load


def run_load(target: TlsTarget, settings: Settings, round_no: int, proto: str, tls: bool) -> None:
    """wrk (h1) or h2load (h2) on the ECDSA listener, or with ``tls`` False on the
    plaintext one (h2c with prior knowledge)."""
    running = target.running
    assert isinstance(running.result, TlsResult)
    result: TlsResult = running.result
    name = result.name
    port = running.h1_port if tls else target.ports[PLAIN]
    scheme = "https" if tls else "http"
    label = f"{proto}-{scheme}" + (f"-{round_no}" if settings.rounds > 1 else "")
    c, m = settings.h2_clients, settings.h2_streams

    def load(seconds: int, raw_name: str) -> LoadResult:
        if proto == "h1":
            return harness.wrk(port, seconds, settings.connections, raw_name, scheme=scheme)
        return harness.h2load(port, seconds, c, m, raw_name, scheme=scheme)

    def run() -> None:
        if settings.warmup:
            load(settings.warmup, f"tls-{name}-{label}-warmup.txt")
        measured = harness.measured(
            running.pid, lambda: load(settings.duration, f"tls-{name}-{label}.txt")
        )
        if not tls:
            result.plain_runs.setdefault(proto, []).append(measured)
        elif proto == "h1":
            result.h1_runs.append(measured)
        else:
            result.h2_runs.append(measured)

    running.step(f"{proto} over {scheme}", run)


def bench(
    names: list[str],
    tools: dict[str, str],
    workdir: Path,
    upstream: harness.Upstream,
    settings: TlsSettings,
) -> list[TargetResult]:
    """As the harness: every target serves from the start, and the runs of one figure
    follow each other across the targets, round after round."""
    certs = make_certs(workdir / "pki")
    results: list[TargetResult] = []
    targets: list[TlsTarget] = []
    try:
        for name in names:
            started = start_target(name, tools, workdir, upstream, certs)
            if isinstance(started, TlsTarget):
                targets.append(started)
                results.append(started.running.result)
            else:
                results.append(started)
        time.sleep(1.0)
        for t in targets:
            log(f"== {t.running.result.name}: idle TLS connections")
            harness.measure_memory(t.running, settings, certs.client_context())
        for proto in ("h1", "h2"):
            for round_no in range(1, settings.rounds + 1):
                for t in targets:
                    for tls in (True, False):
                        what = "TLS" if tls else "plaintext"
                        log(f"== {t.running.result.name}: {what} {proto} (round {round_no})")
                        run_load(t, settings, round_no, proto, tls)
        for kind in HANDSHAKES:
            for round_no in range(1, settings.rounds + 1):
                for t in targets:
                    log(f"== {t.running.result.name}: handshakes {kind.key} (round {round_no})")
                    run_handshakes(t, kind, settings, round_no)
        for t in targets:
            harness.record_peak_rss(t.running)
    finally:
        for t in targets:
            if t.running.child is not None:
                t.running.child.stop()
    return results


# ------------------------------------------------------------------------- report


def handshake_table(results: list[TlsResult]) -> list[str]:
    ref = next((r for r in results if r.name == REFERENCE), None)
    rows = []
    for kind in HANDSHAKES:
        ref_hs = ref.handshakes(kind.key) if ref else None
        for r in results:
            hs = r.handshakes(kind.key)
            if hs is None:
                rows.append([kind.label, harness.LABELS[r.name], "not run", "", ""])
                continue
            rate = harness.cell(hs.rate, ref_hs.rate if ref_hs else None, harness.fmt_rps)
            cpu = harness.cell(hs.proxy_cpu_us, ref_hs.proxy_cpu_us if ref_hs else None, fmt_us)
            # ⚠: a resumed run that mostly did not resume, or a full one that did.
            share = hs.resumed_share
            reuse = f"{share:.0%}" + (" ⚠" if (share < 0.9) == kind.resumed else "")
            if hs.failed_clients:
                reuse += f", {hs.failed_clients} client(s) failed ⚠"
            rows.append([kind.label, harness.LABELS[r.name], rate, cpu, reuse])
    headers = ["handshake", "target", "handshakes/s", "proxy CPU / handshake", "resumed"]
    return harness.table(headers, rows)


def tls_cost_table(results: list[TlsResult]) -> list[str]:
    """Proxy CPU per request over TLS against the same proxy's plaintext listener."""

    def cpu(load: LoadResult | None) -> float | None:
        return load.proxy_cpu_us_per_req if load is not None else None

    def added(r: TlsResult, proto: str) -> float | None:
        tls, plain = cpu(getattr(r, proto)), cpu(r.plain(proto))
        return tls - plain if tls is not None and plain is not None else None

    rows = []
    for proto, label in (("h1", "HTTP/1.1"), ("h2", "HTTP/2")):
        for r in results:
            plain = r.plain(proto)
            rows.append(
                [
                    label,
                    harness.LABELS[r.name],
                    harness.cell(cpu(getattr(r, proto)), None, fmt_us),
                    harness.cell(cpu(plain), None, fmt_us),
                    harness.cell(plain.rps if plain else None, None, harness.fmt_rps),
                    harness.cell(added(r, proto), None, lambda v: f"{v:+.1f} µs"),
                ]
            )
    headers = [
        "protocol",
        "target",
        "CPU / request, TLS",
        "CPU / request, plaintext",
        "plaintext requests/s",
        "TLS adds",
    ]
    return harness.table(headers, rows)


def goals_table(results: list[TlsResult]) -> list[str]:
    by_name = {r.name: r for r in results}
    envoyx, peer = by_name.get("envoyx"), by_name.get(REFERENCE)
    if envoyx is None:
        return []
    rows: list[list[str]] = []

    def add(what: str, value: float | None, shown: str, goal: str, met: bool) -> None:
        rows.append([what, "—" if value is None else shown, goal, _met(value, met)])

    def load_ratio(proto: str) -> float | None:
        mine = getattr(envoyx, proto)
        theirs = getattr(peer, proto) if peer else None
        if mine is None or theirs is None:
            return None
        a, b = mine.proxy_cpu_us_per_req, theirs.proxy_cpu_us_per_req
        return a / b if a is not None and b else None

    for proto, label in (("h1", "HTTP/1.1"), ("h2", "HTTP/2")):
        v = load_ratio(proto)
        add(
            f"TLS keep-alive CPU per {label} request, ratio to HAProxy's",
            v,
            f"{v or 0:.2f}{TIMES}",
            f"≤ 1.00{TIMES}",
            v is not None and v <= 1.0,
        )
    for kind in HANDSHAKES:
        mine = envoyx.handshakes(kind.key)
        theirs = peer.handshakes(kind.key) if peer else None
        v = mine.rate / theirs.rate if mine and theirs and theirs.rate else None
        add(
            f"handshakes/s ({kind.label}), ratio to HAProxy's",
            v,
            f"{v or 0:.2f}{TIMES}",
            f"≥ 1.00{TIMES}",
            v is not None and v >= 1.0,
        )
    v = envoyx.per_idle_conn
    add(
        "RSS per idle TLS connection",
        v,
        fmt_kib(v or 0),
        "≤ 8 KiB",
        v is not None and v <= IDLE_GOAL_BYTES,
    )
    return harness.table(["issue 9 target", "envoyx", "goal", "met"], rows)


def _met(value: float | None, met: bool) -> str:
    if value is None:
        return "not measured"
    return "yes" if met else "**no**"


def report(
    results: list[TlsResult], settings: TlsSettings, context: dict[str, str], args: str
) -> str:
    out = [
        "# TLS benchmarks",
        "",
        f"`python benches/tls.py {args}`".replace(" `", "`"),
        "",
        *(f"- {k}: {v}" for k, v in context.items()),
        *(
            f"- negotiated with {harness.LABELS[r.name]} (openssl s_client defaults): "
            f"{r.negotiated}"
            for r in results
            if r.negotiated
        ),
        "",
        "Each figure is followed by its ratio to HAProxy's in the same run (for "
        "requests/s and handshakes/s higher is better, for everything else lower is "
        "better). Absolute figures move with the machine's load; compare within one run."
        + (
            f" Each figure is the median of {settings.rounds} rounds."
            if settings.rounds > 1
            else ""
        ),
        "",
        f"## TLS keep-alive, HTTP/1.1 — wrk -t1 -c{settings.connections} "
        f"-d{settings.duration}s https://",
        "",
        *harness.load_table(results, "h1", REFERENCE),
        "",
        f"## TLS keep-alive, HTTP/2 (ALPN h2) — h2load -t1 -c{settings.h2_clients} "
        f"-m{settings.h2_streams} -D{settings.duration} https://",
        "",
        *harness.load_table(results, "h2", REFERENCE),
        "",
        f"## Handshakes — {settings.handshake_clients}{TIMES} openssl s_time -new / -reuse "
        f"-time {settings.duration}, one HTTP/1.1 request (`Connection: close`) per "
        "connection but in the TLS 1.2 row (`-tls1_2`, the handshake alone); the proxy "
        "CPU includes accepting and closing the connection",
        "",
        *handshake_table(results),
        "",
        "## What TLS adds per keep-alive request",
        "",
        "The same load on each proxy's plaintext listener (h2c with prior knowledge for "
        "HTTP/2), right after the TLS run; *TLS adds* is the difference of the proxy CPU "
        "per request.",
        "",
        *tls_cost_table(results),
        "",
        "## Memory",
        "",
        *harness.memory_table(results, settings.idle_connections, REFERENCE),
        "",
    ]
    goals = goals_table(results)
    if goals:
        out += ["## envoyx against its targets", "", *goals, ""]
    failures = [r for r in results if r.errors]
    if failures:
        out += ["## Notes", ""]
        for r in failures:
            for error in r.errors:
                lines = [x.strip() for x in error.splitlines() if x.strip()]
                out.append(f"- {harness.LABELS[r.name]} failed: " + " / ".join(lines[:6]))
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = harness.load_arguments(__doc__, list(TARGETS), RESULTS / "tls.md")
    p.add_argument(
        "--idle-connections", type=int, default=1000, help="idle TLS connections for memory (1000)"
    )
    p.add_argument(
        "--handshake-clients",
        type=int,
        default=4,
        help="openssl s_time processes at once for the handshake figures (4)",
    )
    return harness.parse_load_arguments(p, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    settings = TlsSettings(
        duration=args.duration,
        warmup=args.warmup,
        connections=args.connections,
        h2_clients=args.h2_clients,
        h2_streams=args.h2_streams,
        idle_connections=args.idle_connections,
        rounds=args.rounds,
        handshake_clients=args.handshake_clients,
    )
    names = harness.select_targets(list(TARGETS), args.targets)

    RAW.mkdir(parents=True, exist_ok=True)
    harness.raise_fd_limit()
    needed = {
        "wrk": ["wrk"],
        "h2load": ["nghttp2-client"],
        "nginx": ["nginx-light", "nginx"],
        "openssl": ["openssl"],
    }
    if "haproxy" in names:
        needed["haproxy"] = ["haproxy"]
    harness.apt_install(needed)
    tools = {cmd: harness.which(cmd) or cmd for cmd in needed}
    versions = {
        "nginx": harness.version_word(harness.first_line([tools["nginx"], "-v"]), "nginx/"),
        "wrk": harness.version_word(harness.first_line(["wrk", "-v"]), "debian/") or "?",
        "h2load": harness.version_word(harness.first_line(["h2load", "--version"]), "nghttp2/"),
        "OpenSSL (s_time)": harness.version_word(
            harness.first_line([tools["openssl"], "version"]), "OpenSSL "
        ),
    }
    if "envoy" in names:
        harness.envoy_tool(args.envoy_bin, tools, versions)
    if "haproxy" in names:
        banner = harness.first_line([tools["haproxy"], "-v"])
        versions["HAProxy"] = harness.version_word(banner, "version ")
    notes: list[str] = []
    results: list[TargetResult] = []
    if "envoyx" in names and not harness.envoyx_tool(args.envoyx_bin, tools, versions, notes):
        results.append(TlsResult("envoyx", errors=["envoyx is not installed (`pip install .`)"]))
        names.remove("envoyx")

    context = harness.run_context(versions)
    context["proxies"] = (
        "one worker each (`--concurrency 1`; HAProxy `nbthread 1`); "
        "upstream nginx over plaintext HTTP/1.1, one worker, 12-byte body"
    )
    results += harness.with_upstream(
        tools["nginx"],
        "envoyx-tls-bench-",
        lambda workdir, upstream: bench(names, tools, workdir, upstream, settings),
    )
    results.sort(key=lambda r: TARGETS.index(r.name))
    context["load average after"] = harness.loadavg()
    context["wall time"] = f"{time.monotonic() - started:.0f} s"
    if notes:
        context["note"] = "; ".join(notes)

    tls_results = [r for r in results if isinstance(r, TlsResult)]
    shown_args = " ".join(argv if argv is not None else sys.argv[1:])
    text = report(tls_results, settings, context, shown_args)
    raw = {
        "context": context,
        "settings": asdict(settings),
        "results": [asdict(r) for r in tls_results],
    }
    harness.write_report(text, args.output, "tls.json", raw)
    # As the harness: envoyx may be mid-development, its failures are in the report.
    return 1 if any(r.errors for r in results if r.name != "envoyx") else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except HarnessError as exc:
        log(f"error: {exc}")
        sys.exit(2)
