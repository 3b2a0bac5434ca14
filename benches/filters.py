#!/usr/bin/env python3
"""What an HTTP filter costs: envoyx with Python filters and Envoy with Lua, in one run.

    python benches/filters.py [--duration 10] [--rounds 1] [--quick] [--http2]
                              [--before-envoyx-bin CMD]
    python benches/filters.py --instructions [--requests 2000] [--before-pythonpath DIR]


The load harness's setup (benches/harness.py, whose functions this reuses): one nginx
upstream with a 12-byte body, one worker per proxy, the same bootstrap
(benches/configs/bootstrap.yaml) with one HTTP filter added before the router:

- envoyx without a filter, the baseline of every envoyx row;
- envoyx with a no-op Python filter (``on_request_headers`` returning None);
- envoyx with a header-mutating Python filter (adds a request and a response header);
- envoyx with an ``async def`` filter (``await asyncio.sleep(0)``);
- envoyx with the header-mutating filter written with ``async def`` hooks that never
  suspend;
- Envoy without a filter, and Envoy with the header-mutating filter in Lua
  (``envoy.filters.http.lua``).

With ``--before-envoyx-bin CMD`` every envoyx row is also run with another build
(e.g. the main branch's, for a before/after in one run), against that build's own
no-filter baseline.

``--instructions`` counts instead of timing (callgrind, as benches/instructions.py: a
figure that does not move with the machine's load): each envoyx row runs twice under
valgrind, serving 200 and 200 + N requests (h2load --h1, 16 connections), and the
difference per request is printed, in all and per thread (the worker, the Python
filter executor). Kernel time (wake-ups, context switches) is not in it.

The Python filters are benches/configs/python_filters.py. Each target gets wrk -t1
-c64 (HTTP/1.1 keep-alive; with --http2 also h2load over h2c); the figures are
requests/s, p50/p99 and the proxy's CPU time per request (utime+stime of the whole
process, the embedded Python interpreter included), and the CPU each filter adds per
request over the same proxy without a filter. DESIGN.md §7's target: a Python filter
costs ≤ 10 µs per request. The table goes to stdout and benches/results/filters.md.
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
from harness import (
    RAW,
    RESULTS,
    Child,
    HarnessError,
    LoadResult,
    Running,
    Settings,
    TargetResult,
    fmt_ms,
    fmt_rps,
    fmt_us,
    log,
)

CONFIGS = harness.CONFIGS
FILTER_MODULE = "python_filters"  # benches/configs/python_filters.py
LUA_TYPE = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
TYPED_STRUCT_TYPE = "type.googleapis.com/xds.type.v3.TypedStruct"
PYTHON_FILTER_URL = "envoyx.filters.http.python"
GOAL_US = 10.0  # DESIGN.md §7: Python filter cost per request

# The Lua twin of python_filters.AddHeaders.
LUA_ADD_HEADERS = """
function envoy_on_request(request_handle)
  request_handle:headers():add("x-bench", "1")
end
function envoy_on_response(response_handle)
  response_handle:headers():add("x-bench-resp", "1")
end
"""


@dataclass(frozen=True)
class Variant:
    """One row: a proxy and the filter added to the bootstrap (None: no filter)."""

    name: str
    proxy: str  # "envoyx", "envoyx-before" (--before-envoyx-bin) or "envoy"
    label: str
    python_class: str | None = None
    lua: str | None = None
    # A response header the filter adds: checked once before the load, so that a
    # filter that does not run cannot pass for a cheap one.
    marker: str | None = None

    @property
    def baseline(self) -> str:
        return {"envoyx": "envoyx", "envoyx-before": "before-envoyx"}.get(self.proxy, "envoy")


VARIANTS = (
    Variant("envoyx", "envoyx", "envoyx, no filter"),
    Variant("envoyx-noop", "envoyx", "envoyx, no-op Python filter", python_class="NoOp"),
    Variant(
        "envoyx-headers",
        "envoyx",
        "envoyx, header-mutating Python filter",
        python_class="AddHeaders",
        marker="x-bench-resp",
    ),
    Variant("envoyx-async", "envoyx", "envoyx, async Python filter", python_class="AsyncNoOp"),
    Variant(
        "envoyx-async-headers",
        "envoyx",
        "envoyx, header-mutating async Python filter (never suspends)",
        python_class="AsyncAddHeaders",
        marker="x-bench-resp",
    ),
    Variant("envoy", "envoy", "Envoy, no filter"),
    Variant(
        "envoy-lua",
        "envoy",
        "Envoy, header-mutating Lua filter",
        lua=LUA_ADD_HEADERS,
        marker="x-bench-resp",
    ),
)
# The same envoyx rows run by another build (--before-envoyx-bin).
BEFORE_VARIANTS = tuple(
    Variant(
        f"before-{v.name}",
        "envoyx-before",
        f"before: {v.label}",
        python_class=v.python_class,
        marker=v.marker,
    )
    for v in VARIANTS
    if v.proxy == "envoyx"
)
ALL_VARIANTS = VARIANTS + BEFORE_VARIANTS
BY_NAME = {v.name: v for v in ALL_VARIANTS}
# The figure DESIGN.md §7 sets a target for.
GOAL_VARIANT = "envoyx-headers"


# ------------------------------------------------------------------------ targets


def http_filter(variant: Variant) -> dict[str, Any] | None:
    if variant.python_class is not None:
        return {
            "name": "bench_filter",
            "typed_config": {
                "@type": TYPED_STRUCT_TYPE,
                "type_url": PYTHON_FILTER_URL,
                "value": {"module": FILTER_MODULE, "class": variant.python_class},
            },
        }
    if variant.lua is not None:
        return {
            "name": "bench_filter",
            "typed_config": {
                "@type": LUA_TYPE,
                "default_source_code": {"inline_string": variant.lua},
            },
        }
    return None


def write_bootstrap(
    variant: Variant, workdir: Path, upstream: harness.Upstream
) -> tuple[Path, int]:
    """The harness's bootstrap with the variant's filter before the router."""
    listen, admin = harness.free_ports(2)
    path = harness.render(
        "bootstrap.yaml",
        workdir / f"{variant.name}-bootstrap.yaml",
        listen_port=listen,
        admin_port=admin,
        upstream_port=upstream.h1_port,
    )
    entry = http_filter(variant)
    if entry is not None:
        doc = yaml.safe_load(path.read_text())
        listener = doc["static_resources"]["listeners"][0]
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["http_filters"].insert(0, entry)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path, listen


def check_marker(port: int, header: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/", headers={"host": "bench"})
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200 or resp.getheader(header) is None:
            raise HarnessError(
                f"the filter did not run: status {resp.status}, no {header} response header"
            )
    finally:
        conn.close()


def start_variant(
    variant: Variant, tools: dict[str, str], workdir: Path, upstream: harness.Upstream, seq: int
) -> Running | TargetResult:
    result = TargetResult(variant.name)
    child: Child | None = None
    try:
        cfg, port = write_bootstrap(variant, workdir, upstream)
        if variant.proxy.startswith("envoyx"):
            cmd = [tools[variant.proxy], "-c", str(cfg), "--concurrency", "1"]
        else:
            # A base id of its own: two Envoys run side by side.
            base_id = str((os.getpid() % 10000) * 10 + seq)
            cmd = [tools["envoy"], "-c", str(cfg), "--concurrency", "1"]
            cmd += ["--disable-hot-restart", "--base-id", base_id]
        child = harness.spawn(variant.name, cmd, RAW / f"filters-{variant.name}.log")
        harness.wait_ready(port, child)
        if variant.marker is not None:
            check_marker(port, variant.marker)
        return Running(result, port, port, child.pid, child)
    except harness.STEP_ERRORS as exc:
        if child is not None:
            message = f"{exc}\n{child.log_tail()}" if not child.alive() else str(exc)
            child.stop()
        else:
            message = str(exc)
        result.errors.append(f"start: {message.strip() or repr(exc)}")
        log(f"{variant.name}: FAILED to start: {message}")
        return result


def thread_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of the process's worker threads and of its other threads.

    Worker threads are those named ``*wrk*`` (envoyx's ``envoyx-wrk-N``, Envoy's
    ``wrk:worker_N``); for envoyx the others are chiefly the Python filter executor.
    """
    worker = other = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            comm = (task / "comm").read_text().strip()
        except OSError:  # the thread exited
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        seconds = (int(fields[11]) + int(fields[12])) / harness.CLK_TCK
        if "wrk" in comm:
            worker += seconds
        else:
            other += seconds
    return worker, other


# (target, protocol) -> µs per request outside the worker threads, one per round
OutsideWorkers = dict[tuple[str, str], list[float]]


def run_load(
    target: Running, settings: Settings, round_no: int, proto: str, outside: OutsideWorkers
) -> None:
    """harness.run_http1/run_http2, with the CPU outside the worker threads noted too."""
    name, port, pid = target.result.name, target.h1_port, target.pid
    assert pid is not None
    suffix = f"-{round_no}" if settings.rounds > 1 else ""
    c, m = settings.h2_clients, settings.h2_streams

    def load(seconds: int, raw_name: str) -> LoadResult:
        if proto == "h1":
            return harness.wrk(port, seconds, settings.connections, raw_name)
        return harness.h2load(port, seconds, c, m, raw_name)

    def run() -> None:
        if settings.warmup:
            load(settings.warmup, f"filters-{name}-{proto}-warmup{suffix}.txt")
        before = thread_cpu(pid)
        result = harness.measured(
            pid, lambda: load(settings.duration, f"filters-{name}-{proto}{suffix}.txt")
        )
        after = thread_cpu(pid)
        if result.requests:
            us = (after[1] - before[1]) * 1e6 / result.requests
            outside.setdefault((name, proto), []).append(us)
        (target.result.h1_runs if proto == "h1" else target.result.h2_runs).append(result)

    target.step("HTTP/1.1" if proto == "h1" else "HTTP/2", run)


def bench(
    variants: list[Variant],
    tools: dict[str, str],
    workdir: Path,
    upstream: harness.Upstream,
    settings: Settings,
    http2: bool,
    outside: OutsideWorkers,
) -> list[TargetResult]:
    """All variants serve from the start; the runs go round-robin over them (round after
    round), so that the figures compared were taken close together in time."""
    results: list[TargetResult] = []
    running: list[Running] = []
    try:
        for seq, variant in enumerate(variants):
            started = start_variant(variant, tools, workdir, upstream, seq)
            if isinstance(started, Running):
                running.append(started)
                results.append(started.result)
            else:
                results.append(started)
        time.sleep(1.0)
        for proto in ("h1", "h2") if http2 else ("h1",):
            for round_no in range(1, settings.rounds + 1):
                for target in running:
                    log(f"== {target.result.name}: {proto} (round {round_no})")
                    run_load(target, settings, round_no, proto, outside)
    finally:
        for target in running:
            if target.child is not None:
                target.child.stop()
    return results


# -------------------------------------------------------------------- instructions


def callgrind_run(
    variant: Variant,
    pythonpath: str | None,
    workdir: Path,
    upstream: harness.Upstream,
    requests: int,
) -> dict[str, int]:
    """Instructions per thread of one envoyx serving ``requests``; ``pythonpath``
    first on the path selects another build of envoyx."""
    cfg, port = write_bootstrap(variant, workdir, upstream)
    dump = workdir / f"{variant.name}-{requests}.callgrind"
    cmd = ["valgrind", "--tool=callgrind", "--separate-threads=yes"]
    cmd += [f"--callgrind-out-file={dump}", sys.executable, "-m", "envoyx", "-c", str(cfg)]
    cmd += ["--concurrency", "1"]
    saved = os.environ["PYTHONPATH"]
    if pythonpath is not None:
        os.environ["PYTHONPATH"] = os.pathsep.join((pythonpath, saved))
    try:
        log_path = RAW / f"filters-cg-{variant.name}.log"
        child = harness.spawn(f"{variant.name} (callgrind)", cmd, log_path)
    finally:
        os.environ["PYTHONPATH"] = saved
    try:
        harness.wait_ready(port, child)
        url = f"http://127.0.0.1:{port}/"
        out = subprocess.run(
            ["h2load", "--h1", "-n", str(requests), "-c", "16", url],
            capture_output=True,
            text=True,
            timeout=900,
        ).stdout
        if f"{requests} succeeded" not in out:
            raise HarnessError(f"h2load did not complete {requests} requests:\n{out}")
    finally:
        child.popen.send_signal(signal.SIGTERM)
        child.popen.wait(timeout=300)
    per_thread: dict[str, int] = {}
    for part in workdir.glob(f"{dump.name}-*"):
        thread, total = "?", 0
        for line in part.read_text().splitlines():
            if line.startswith("thread:"):
                thread = line.split()[1]
            elif line.startswith("totals:"):
                total = int(line.split()[1])
        per_thread[thread] = per_thread.get(thread, 0) + total
    return per_thread


def instructions(args: argparse.Namespace, variants: list[Variant]) -> int:
    harness.apt_install({"valgrind": ["valgrind"], "h2load": ["nghttp2-client"]})
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(CONFIGS), os.environ.get("PYTHONPATH", "")) if p
    )
    nginx = harness.which("nginx")
    if nginx is None:
        raise HarnessError("nginx is not installed")
    small, n = 200, args.requests

    def measure(workdir: Path, upstream: harness.Upstream) -> list[str]:
        rows = []
        for v in variants:
            if v.proxy == "envoy":
                continue
            path = args.before_pythonpath if v.proxy == "envoyx-before" else None
            a = callgrind_run(v, path, workdir, upstream, small)
            b = callgrind_run(v, path, workdir, upstream, small + n)
            per = {t: (b[t] - a.get(t, 0)) / n for t in b}
            # The busiest thread is the worker; the executor is the next one.
            threads = sorted(per.values(), reverse=True)
            rest = threads[1] if len(threads) > 1 and threads[1] > 500 else 0.0
            rows.append(
                f"| {v.label} | {sum(per.values()):,.0f} | {threads[0]:,.0f} | {rest:,.0f} |"
            )
            log(rows[-1])
        return rows

    rows = harness.with_upstream(nginx, "envoyx-filters-cg-", measure)
    print(f"\ninstructions per request (callgrind, {n} requests, one worker)\n")
    print("| target | all threads | the worker | the Python executor |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    return 0


# ------------------------------------------------------------------------- report


def added(load: LoadResult | None, base: LoadResult | None) -> float | None:
    if load is None or base is None:
        return None
    if load.proxy_cpu_us_per_req is None or base.proxy_cpu_us_per_req is None:
        return None
    return load.proxy_cpu_us_per_req - base.proxy_cpu_us_per_req


def fmt_added(value: float | None) -> str:
    return "—" if value is None else f"{value:+.1f} µs"


def load_table(results: list[TargetResult], proto: str, outside: OutsideWorkers) -> list[str]:
    by_name = {r.name: r for r in results}
    rows = []
    for r in results:
        variant = BY_NAME[r.name]
        load: LoadResult | None = getattr(r, proto)
        if load is None:
            rows.append([variant.label, "not run", "", "", "", "", "", ""])
            continue
        base_result = by_name.get(variant.baseline)
        base = getattr(base_result, proto) if base_result is not None else None
        delta = None if r.name == variant.baseline else added(load, base)
        baseline = "" if r.name == variant.baseline else f" (vs {BY_NAME[variant.baseline].label})"
        cpu = load.proxy_cpu_us_per_req
        rest = outside.get((r.name, proto))
        bad = load.errors + load.non_2xx
        rows.append(
            [
                variant.label,
                fmt_rps(load.rps),
                fmt_ms(load.p50_us),
                fmt_ms(load.p99_us),
                "—" if cpu is None else fmt_us(cpu),
                ("baseline" if r.name == variant.baseline else fmt_added(delta) + baseline),
                "—" if not rest else fmt_us(statistics.median(rest)),
                f"{bad:,}" + (" ⚠" if bad else ""),
            ]
        )
    headers = [
        "target",
        "requests/s",
        "p50",
        "p99",
        "proxy CPU / request",
        "added by the filter",
        "of the CPU: outside the worker thread",
        "errors + non-2xx",
    ]
    return harness.table(headers, rows)


def goal_lines(results: list[TargetResult]) -> list[str]:
    by_name = {r.name: r for r in results}

    def cost(name: str, baseline: str) -> float | None:
        mine, base = by_name.get(name), by_name.get(baseline)
        return added(mine.h1 if mine else None, base.h1 if base else None)

    def met(ok: bool) -> str:
        return "met" if ok else "**not met**"

    lines = []
    sync = cost(GOAL_VARIANT, "envoyx")
    if sync is None:
        lines.append(f"- Python filter cost (DESIGN.md §7, ≤ {GOAL_US:.0f} µs): not measured")
    else:
        lines.append(
            f"- Python filter cost (DESIGN.md §7, ≤ {GOAL_US:.0f} µs per request): the "
            f"header-mutating filter adds {sync:.1f} µs per HTTP/1.1 request — "
            f"{met(sync <= GOAL_US)}"
        )
    lua = cost("envoy-lua", "envoy")
    if sync is not None and lua is not None:
        lines.append(
            f"- issue 8, a sync filter adds no more than Lua: {sync:.1f} µs against Lua's "
            f"{lua:.1f} µs — {met(sync <= lua)}"
        )
    # issue 8: an async filter ≤ 1.5x a sync one, each against its sync twin.
    for async_name, sync_name in (
        ("envoyx-async-headers", GOAL_VARIANT),
        ("envoyx-async", "envoyx-noop"),
    ):
        a, b = cost(async_name, "envoyx"), cost(sync_name, "envoyx")
        if a is None or b is None or b <= 0:
            continue
        lines.append(
            f"- issue 8, async ≤ 1.5x sync: {BY_NAME[async_name].label} adds {a:.1f} µs, "
            f"{a / b:.2f}x {BY_NAME[sync_name].label} ({b:.1f} µs) — {met(a <= 1.5 * b)}"
        )
    return lines


def report(
    results: list[TargetResult],
    settings: Settings,
    http2: bool,
    outside: OutsideWorkers,
    context: dict[str, str],
    args: str,
) -> str:
    out = [
        "# Filter cost",
        "",
        f"`python benches/filters.py {args}`".replace(" `", "`"),
        "",
        *(f"- {k}: {v}" for k, v in context.items()),
        "",
        "Each proxy runs with one worker; *added by the filter* is the proxy CPU per "
        "request minus that of the same proxy without a filter in the same run "
        "(envoyx rows against envoyx without a filter, the Lua row against Envoy "
        "without a filter). *Outside the worker thread* is the part of the proxy CPU "
        "spent in threads other than the one worker: for envoyx chiefly the Python "
        "filter executor, for Envoy its main thread. Absolute figures move with the "
        "machine's load; compare within one run."
        + (
            f" Each figure is the median of {settings.rounds} rounds."
            if settings.rounds > 1
            else ""
        ),
        "",
        f"## HTTP/1.1 keep-alive — wrk -t1 -c{settings.connections} -d{settings.duration}s",
        "",
        *load_table(results, "h1", outside),
        "",
    ]
    if http2:
        out += [
            f"## HTTP/2 (h2c) — h2load -t1 -c{settings.h2_clients} -m{settings.h2_streams} "
            f"-D{settings.duration}",
            "",
            *load_table(results, "h2", outside),
            "",
        ]
    out += ["## Target", "", *goal_lines(results), ""]
    failures = [r for r in results if r.errors]
    if failures:
        out += ["## Notes", ""]
        for r in failures:
            for error in r.errors:
                lines = [x.strip() for x in error.splitlines() if x.strip()]
                out.append(f"- {BY_NAME[r.name].label} failed: " + " / ".join(lines[:6]))
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = harness.load_arguments(__doc__, [v.name for v in VARIANTS], RESULTS / "filters.md")
    p.add_argument("--http2", action="store_true", help="also h2load over h2c")
    p.add_argument(
        "--before-envoyx-bin",
        help="another envoyx build's command: its rows run beside this build's",
    )
    p.add_argument("--instructions", action="store_true", help="count with callgrind")
    p.add_argument("--requests", type=int, default=2000, help="requests counted (2000)")
    p.add_argument(
        "--before-pythonpath",
        help="with --instructions: a directory holding another build's envoyx package, "
        "counted beside this one",
    )
    return harness.parse_load_arguments(p, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    settings = Settings(
        duration=args.duration,
        warmup=args.warmup,
        connections=args.connections,
        h2_clients=args.h2_clients,
        h2_streams=args.h2_streams,
        idle_connections=0,
        rounds=args.rounds,
    )
    before = args.before_envoyx_bin or (args.instructions and args.before_pythonpath)
    candidates = VARIANTS + (BEFORE_VARIANTS if before else ())
    names = harness.select_targets([v.name for v in candidates], args.targets)
    variants = [BY_NAME[n] for n in names]
    if args.instructions:
        return instructions(args, variants)

    RAW.mkdir(parents=True, exist_ok=True)
    harness.raise_fd_limit()
    needed = {"wrk": ["wrk"], "nginx": ["nginx-light", "nginx"]}
    if args.http2:
        needed["h2load"] = ["nghttp2-client"]
    harness.apt_install(needed)
    tools = {cmd: harness.which(cmd) or cmd for cmd in needed}
    versions = {"nginx": harness.version_word(harness.first_line([tools["nginx"], "-v"]), "nginx/")}
    notes: list[str] = []
    results: list[TargetResult] = []
    outside: OutsideWorkers = {}
    if any(v.proxy == "envoy" for v in variants):
        harness.envoy_tool(args.envoy_bin, tools, versions)
    if any(v.proxy == "envoyx" for v in variants) and not harness.envoyx_tool(
        args.envoyx_bin, tools, versions, notes
    ):
        for v in [v for v in variants if v.proxy == "envoyx"]:
            results.append(TargetResult(v.name, errors=["envoyx is not installed"]))
            variants.remove(v)
    if args.before_envoyx_bin:
        tools["envoyx-before"] = args.before_envoyx_bin
        versions["envoyx (before)"] = args.before_envoyx_bin
    # envoyx imports the filter classes by module name from benches/configs/.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(CONFIGS), os.environ.get("PYTHONPATH", "")) if p
    )

    context = harness.run_context(versions)
    results += harness.with_upstream(
        tools["nginx"],
        "envoyx-filters-bench-",
        lambda workdir, upstream: bench(
            variants, tools, workdir, upstream, settings, args.http2, outside
        ),
    )
    order = [v.name for v in ALL_VARIANTS]
    results.sort(key=lambda r: order.index(r.name))
    context["load average after"] = harness.loadavg()
    context["wall time"] = f"{time.monotonic() - started:.0f} s"
    if notes:
        context["note"] = "; ".join(notes)

    shown_args = " ".join(argv if argv is not None else sys.argv[1:])
    text = report(results, settings, args.http2, outside, context, shown_args)
    raw = {
        "context": context,
        "settings": asdict(settings),
        "results": [asdict(r) for r in results],
        "outside_worker_us_per_req": {f"{n}/{p}": v for (n, p), v in outside.items()},
    }
    harness.write_report(text, args.output, "filters.json", raw)
    # As the harness: envoyx may be mid-development, its failures are in the report.
    return 1 if any(r.errors for r in results if not r.name.startswith("envoyx")) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except HarnessError as exc:
        log(f"error: {exc}")
        sys.exit(2)
