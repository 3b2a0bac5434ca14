#!/usr/bin/env python3
"""Route lookup cost: envoyx and Envoy with 10, 1,000 and 10,000 routes, in one run.

    python benches/routes.py [--duration 5] [--connections 64] [--sizes 10,1000,10000]

The load harness's setup (benches/harness.py, whose functions this reuses): one nginx
upstream with a 12-byte body, one worker per proxy, wrk -t1 over HTTP/1.1 keep-alive.
Each row is one route table in one virtual host, the same bootstrap for both proxies,
and the route that matches the load's requests (``GET /``) is the LAST one, so every
request walks the whole table:

- ``prefix``: N-1 routes ``prefix: /p<i>/``, then ``prefix: /``;
- ``regex``: N-1 routes ``safe_regex: /r<i>/[0-9]+``, then ``safe_regex: /.*``;
- ``header``: N routes ``prefix: /`` with a header matcher ``x-route`` exact ``v<i>``;
  wrk sends ``x-route: v<N-1>``.

The figure is the proxy's CPU time per request (utime+stime of the whole process over
the run, divided by the requests served), beside requests/s. Rows are measured one after
the other on a shared machine: compare envoyx with Envoy within a row, and rows with
each other only roughly. The table goes to stdout and benches/results/routes.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
from harness import RAW, RESULTS, Child, HarnessError, LoadResult, log

HCM = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
KINDS = ("prefix", "regex", "header")


def routes(kind: str, n: int) -> tuple[list[dict[str, Any]], list[str]]:
    """The route table and the headers wrk sends; the last route is the one taken."""
    to = {"cluster": "nginx"}
    if kind == "prefix":
        table = [{"match": {"prefix": f"/p{i}/"}, "route": to} for i in range(n - 1)]
        return [*table, {"match": {"prefix": "/"}, "route": to}], []
    if kind == "regex":
        table = [
            {"match": {"safe_regex": {"regex": f"/r{i}/[0-9]+"}}, "route": to} for i in range(n - 1)
        ]
        return [*table, {"match": {"safe_regex": {"regex": "/.*"}}, "route": to}], []
    table = [
        {
            "match": {
                "prefix": "/",
                "headers": [{"name": "x-route", "string_match": {"exact": f"v{i}"}}],
            },
            "route": to,
        }
        for i in range(n)
    ]
    return table, [f"x-route: v{n - 1}"]


def bootstrap(kind: str, n: int, listen: int, admin: int, upstream: int) -> dict[str, Any]:
    table, _ = routes(kind, n)
    endpoint = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream}}}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "bench",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": HCM,
                                        "stat_prefix": "bench",
                                        "route_config": {
                                            "name": "bench",
                                            "virtual_hosts": [
                                                {"name": "all", "domains": ["*"], "routes": table}
                                            ],
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {"@type": ROUTER},
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "nginx",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "nginx",
                        "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
                    },
                }
            ],
        },
    }


def wrk(port: int, seconds: int, connections: int, headers: list[str], raw: str) -> LoadResult:
    """harness.wrk with request headers."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for h in headers:
        cmd += ["-H", h]
    cmd += ["-s", str(harness.CONFIGS / "wrk_report.lua"), f"http://127.0.0.1:{port}/"]
    out = harness.run_tool(cmd, seconds + 60, raw)
    line = next((x for x in out.splitlines() if x.startswith("WRK_JSON ")), None)
    if line is None:
        raise HarnessError(f"wrk printed no summary:\n{out[-1000:]}")
    s = json.loads(line.removeprefix("WRK_JSON "))
    secs = s["duration_us"] / 1e6
    return LoadResult(
        tool="wrk",
        requests=s["requests"],
        seconds=secs,
        rps=s["requests"] / secs if secs else 0.0,
        p50_us=s["p50_us"],
        p99_us=s["p99_us"],
        errors=s["connect_errors"] + s["read_errors"] + s["write_errors"] + s["timeouts"],
        non_2xx=s["status_errors"],
    )


def wait_ready(port: int, child: Child, headers: list[str]) -> None:
    """harness.wait_ready, with the headers that select the last route."""
    deadline = time.monotonic() + harness.READY_TIMEOUT_S
    extra = "".join(f"{h}\r\n" for h in headers).encode()
    last = "no attempt"
    while time.monotonic() < deadline:
        if not child.alive():
            raise HarnessError(f"{child.name} exited before it served:\n{child.log_tail()}")
        try:
            with harness.connect(port, 2.0) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n" + extra + b"\r\n")
                status, body = harness.read_response(sock)
            if status == 200 and body == harness.BODY:
                return
            last = f"status {status}"
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise HarnessError(f"port {port} not serving after {harness.READY_TIMEOUT_S:.0f}s ({last})")


def measure(
    proxy: str,
    kind: str,
    n: int,
    tools: dict[str, str],
    workdir: Path,
    upstream: harness.Upstream,
    args: argparse.Namespace,
) -> LoadResult | str:
    listen, admin = harness.free_ports(2)
    cfg = workdir / f"{proxy}-{kind}-{n}.json"
    cfg.write_text(json.dumps(bootstrap(kind, n, listen, admin, upstream.h1_port)))
    cmd = [tools[proxy], "-c", str(cfg), "--concurrency", "1"]
    if proxy == "envoy":
        cmd += ["--disable-hot-restart", "--base-id", str(os.getpid() % 10000)]
    child: Child | None = None
    try:
        child = harness.spawn(proxy, cmd, RAW / f"routes-{proxy}-{kind}-{n}.log")
        headers = routes(kind, n)[1]
        wait_ready(listen, child, headers)
        name = f"routes-{proxy}-{kind}-{n}"
        if args.warmup:
            wrk(listen, args.warmup, args.connections, headers, f"{name}-warmup.txt")
        result = harness.measured(
            child.pid,
            lambda: wrk(listen, args.duration, args.connections, headers, f"{name}.txt"),
        )
        if result.non_2xx:
            return f"{result.non_2xx} non-2xx"
        # Socket errors (wrk's 2 s timeouts when a table is slow) are shown, not fatal.
        return result
    except harness.STEP_ERRORS as exc:
        return f"failed: {str(exc).splitlines()[0]}"
    finally:
        if child is not None:
            child.stop()


def fmt(r: LoadResult | str | None) -> tuple[str, str]:
    if not isinstance(r, LoadResult):
        return (r or "-", "-")
    cpu = f"{r.proxy_cpu_us_per_req:.1f}" if r.proxy_cpu_us_per_req else "-"
    errors = f" ({r.errors} socket errors)" if r.errors else ""
    return (cpu, f"{r.rps:,.0f}{errors}")


def report(
    rows: list[tuple[str, int, dict[str, LoadResult | str]]], context: dict[str, str]
) -> str:
    lines = ["# Route lookup: CPU per request with the matching route last", ""]
    lines += [f"- {k}: {v}" for k, v in context.items()]
    lines.append("")
    table = []
    for kind, n, by_proxy in rows:
        x_cpu, x_rps = fmt(by_proxy.get("envoyx"))
        e_cpu, e_rps = fmt(by_proxy.get("envoy"))
        x, e = by_proxy.get("envoyx"), by_proxy.get("envoy")
        ratio = (
            f"{x.proxy_cpu_us_per_req / e.proxy_cpu_us_per_req:.2f}"
            if isinstance(x, LoadResult)
            and isinstance(e, LoadResult)
            and x.proxy_cpu_us_per_req
            and e.proxy_cpu_us_per_req
            else "-"
        )
        table.append([kind, f"{n:,}", x_cpu, e_cpu, ratio, x_rps, e_rps])
    headers = [
        "routes",
        "N",
        "envoyx µs/req",
        "Envoy µs/req",
        "envoyx/Envoy",
        "envoyx rps",
        "Envoy rps",
    ]
    lines += harness.table(headers, table)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--sizes", default="10,1000,10000")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--envoy-bin")
    p.add_argument("--envoyx-bin")
    p.add_argument("--output", type=Path, default=RESULTS / "routes.md")
    args = p.parse_args(argv)
    RAW.mkdir(parents=True, exist_ok=True)
    harness.raise_fd_limit()
    needed = {"wrk": ["wrk"], "nginx": ["nginx-light", "nginx"]}
    harness.apt_install(needed)
    tools = {cmd: harness.which(cmd) or cmd for cmd in needed}
    versions: dict[str, str] = {}
    notes: list[str] = []
    harness.envoy_tool(args.envoy_bin, tools, versions)
    if not harness.envoyx_tool(args.envoyx_bin, tools, versions, notes):
        raise HarnessError("envoyx is not installed")
    context = harness.run_context(versions)
    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = args.kinds.split(",")
    started = time.monotonic()

    def run(workdir: Path, upstream: harness.Upstream) -> list[Any]:
        rows = []
        for kind in kinds:
            for n in sizes:
                by_proxy: dict[str, LoadResult | str] = {}
                for proxy in ("envoyx", "envoy"):
                    log(f"== {proxy}: {kind} x {n}")
                    by_proxy[proxy] = measure(proxy, kind, n, tools, workdir, upstream, args)
                rows.append((kind, n, by_proxy))
        return rows

    rows = harness.with_upstream(tools["nginx"], "envoyx-routes-bench-", run)
    context["load average after"] = harness.loadavg()
    context["wall time"] = f"{time.monotonic() - started:.0f} s"
    text = report(rows, context)
    raw = {
        "context": context,
        "rows": [{"kind": k, "n": n, **{p: str(r) for p, r in by.items()}} for k, n, by in rows],
    }
    harness.write_report(text, args.output, "routes.json", raw)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except HarnessError as exc:
        log(f"error: {exc}")
        sys.exit(2)
