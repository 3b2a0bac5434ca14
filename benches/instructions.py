#!/usr/bin/env python3
"""Instructions per proxied request, counted by callgrind: a CPU figure that does not
move with the machine's load.

    python benches/instructions.py [--requests 4000] [--targets envoyx,haproxy]

Each proxy (one worker) runs under ``valgrind --tool=callgrind`` twice per protocol:
once serving a small number of requests, once that many more the measured count
(HTTP/1.1 keep-alive with h2load --h1, then HTTP/2 h2c); start-up, configuration and
shutdown cost the same in both runs, so the difference divided by the extra requests
is the cost of a request. The functions where the extra instructions went (self cost,
from callgrind_annotate of the larger run) are printed with --top. The upstream is the
harness's nginx (not counted).

Wall-clock figures under valgrind mean nothing; only the counts are reported.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    RAW,
    HarnessError,
    apt_install,
    free_ports,
    log,
    render,
    spawn,
    start_upstream,
    wait_ready,
    which,
)

TOP_FUNCTIONS = 25


def callgrind(out: Path) -> list[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
    ]


#: The interpreter whose envoyx is measured (--envoyx-python; another build's venv
#: gives a before/after in one run).
ENVOYX_PYTHON = [sys.executable]


#: The route of the ``envoyx-retry`` target: a retry policy that no request uses
#: (the upstream never fails), to show what configured retries cost.
RETRY_ROUTE = (
    "route: { cluster: nginx, retry_policy: "
    '{ retry_on: "5xx,reset,connect-failure", num_retries: 2, per_try_timeout: 5s } }'
)


#: The routes of the ``envoyx-headers`` / ``envoyx-resp-headers`` targets: four headers
#: added (two literal, two formatted) and two removed at route level, on the request
#: or on the response, to show what header mutation costs per request.
HEADERS_ROUTE = {
    "request": (
        "route: { cluster: nginx }\n"
        "                request_headers_to_remove: [user-agent, accept]\n"
        "                request_headers_to_add:\n"
        '                - header: { key: x-literal-a, value: "a" }\n'
        '                - header: { key: x-literal-b, value: "b" }\n'
        "                  append_action: OVERWRITE_IF_EXISTS_OR_ADD\n"
        "                - header: { key: x-peer,"
        ' value: "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%" }\n'
        '                - header: { key: x-path, value: "%REQ(:path)%" }\n'
    ),
    "response": (
        "route: { cluster: nginx }\n"
        "                response_headers_to_remove: [server, etag]\n"
        "                response_headers_to_add:\n"
        '                - header: { key: x-literal-a, value: "a" }\n'
        '                - header: { key: x-literal-b, value: "b" }\n'
        "                  append_action: OVERWRITE_IF_EXISTS_OR_ADD\n"
        "                - header: { key: x-peer,"
        ' value: "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%" }\n'
        '                - header: { key: x-type, value: "%RESP(content-type)%" }\n'
    ),
}
MUTATION_TARGETS = {"envoyx-headers": "request", "envoyx-resp-headers": "response"}


def proxy_command(name: str, workdir: Path, listen: int, admin: int, upstream: int) -> list[str]:
    if name in ("envoyx", "envoyx-retry", *MUTATION_TARGETS):
        cfg = render(
            "bootstrap.yaml",
            workdir / f"{name}-bootstrap.yaml",
            listen_port=listen,
            admin_port=admin,
            upstream_port=upstream,
        )
        if name == "envoyx-retry":
            text = cfg.read_text()
            if "route: { cluster: nginx }" not in text:
                raise HarnessError("bootstrap.yaml has no route to add a retry policy to")
            cfg.write_text(text.replace("route: { cluster: nginx }", RETRY_ROUTE))
        if name in MUTATION_TARGETS:
            text = cfg.read_text()
            if "route: { cluster: nginx }" not in text:
                raise HarnessError("bootstrap.yaml has no route to add header mutations to")
            route = HEADERS_ROUTE[MUTATION_TARGETS[name]]
            cfg.write_text(text.replace("route: { cluster: nginx }\n", route))
        # The console script is Python; run its module directly so that valgrind
        # follows one process.
        return [*ENVOYX_PYTHON, "-m", "envoyx", "-c", str(cfg), "--concurrency", "1"]
    if name == "haproxy":
        cfg = render(
            "haproxy.cfg", workdir / "haproxy.cfg", listen_port=listen, upstream_port=upstream
        )
        return ["haproxy", "-db", "-f", str(cfg)]
    raise HarnessError(f"unknown target {name}")


def h2load(port: int, requests: int, http1: bool) -> None:
    cmd = ["h2load", "-n", str(requests), "-c", "4", f"http://127.0.0.1:{port}/"]
    cmd[1:1] = ["--h1"] if http1 else ["-m", "10"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout
    m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    if not m or int(m.group(2)) != requests:
        raise HarnessError(f"h2load did not complete {requests} requests:\n{out}")


def total_instructions(dump: Path) -> int:
    for line in dump.read_text().splitlines():
        if line.startswith("summary:") or line.startswith("totals:"):
            return int(line.split()[1])
    raise HarnessError(f"no totals in {dump}")


def function_costs(dump: Path) -> dict[str, int]:
    """Self cost per function of a dump (callgrind_annotate, every function)."""
    out = subprocess.run(
        ["callgrind_annotate", "--inclusive=no", "--threshold=100", str(dump)],
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    costs: dict[str, int] = {}
    for line in out.splitlines():
        m = re.match(r"^\s*([\d,]+) \([ \d.]+%\)\s+(.+?)(?: \[.*\])?$", line)
        if m and "PROGRAM TOTALS" not in line:
            name = m.group(2).split(":", 1)[-1] if ":" in m.group(2) else m.group(2)
            costs[name] = costs.get(name, 0) + int(m.group(1).replace(",", ""))
    return costs


def top_functions(small: Path, large: Path, requests: int) -> list[str]:
    """Where the extra requests' instructions went: per-function difference."""
    before, after = function_costs(small), function_costs(large)
    extra = {f: after[f] - before.get(f, 0) for f in after}
    ranked = sorted(extra.items(), key=lambda kv: kv[1], reverse=True)[:TOP_FUNCTIONS]
    return [f"{cost / requests:10,.0f}  {name[:150]}" for name, cost in ranked]


BASELINE_REQUESTS = 300


def one_run(name: str, proto: str, requests: int, workdir: Path, upstream_port: int) -> Path:
    """Runs the proxy under callgrind for `requests` requests; returns the dump."""
    listen, admin = free_ports(2)
    dump = workdir / f"{name}-{proto}-{requests}.callgrind"
    cmd = callgrind(dump) + proxy_command(name, workdir, listen, admin, upstream_port)
    child = spawn(f"{name} (callgrind)", cmd, RAW / f"instructions-{name}-{proto}.log")
    try:
        wait_ready(listen, child)
        h2load(listen, requests, http1=proto == "http1")
    finally:
        # The dump is written at exit; under valgrind a drain takes a while.
        child.popen.send_signal(signal.SIGTERM)
        try:
            child.popen.wait(timeout=180)
        except subprocess.TimeoutExpired:
            child.popen.kill()
            child.popen.wait(timeout=10)
    if not dump.exists():
        raise HarnessError(f"callgrind wrote no dump for {name} {proto}")
    return dump


def measure(name: str, requests: int, workdir: Path, upstream_port: int) -> dict[str, object]:
    results: dict[str, object] = {}
    for proto in ("http1", "http2"):
        small = one_run(name, proto, BASELINE_REQUESTS, workdir, upstream_port)
        large = one_run(name, proto, BASELINE_REQUESTS + requests, workdir, upstream_port)
        extra = total_instructions(large) - total_instructions(small)
        results[proto] = {
            "per_request": extra / requests,
            "top": top_functions(small, large, requests),
        }
        log(f"{name} {proto}: {extra / requests:,.0f} instructions per request")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--requests", type=int, default=4000, help="requests counted (4000)")
    p.add_argument(
        "--targets",
        default="envoyx,haproxy",
        help="envoyx,haproxy (both); envoyx-retry: envoyx with an unused retry policy; "
        "envoyx-headers / envoyx-resp-headers: 4 headers added and 2 removed at route "
        "level on the request / the response",
    )
    p.add_argument("--top", action="store_true", help="print where the instructions went")
    p.add_argument(
        "--envoyx-python",
        default=sys.executable,
        help="the Python whose installed envoyx is measured (default: this one)",
    )
    args = p.parse_args(argv)
    ENVOYX_PYTHON[0] = args.envoyx_python
    if shutil.which("valgrind") is None:
        apt_install({"valgrind": ["valgrind"]})
    apt_install({"h2load": ["nghttp2-client"], "nginx": ["nginx-light"], "haproxy": ["haproxy"]})
    RAW.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="envoyx-instr-") as tmp:
        workdir = Path(tmp)
        nginx = which("nginx")
        if nginx is None:
            raise HarnessError("nginx is not installed")
        upstream = start_upstream(nginx, workdir)
        try:
            for name in args.targets.split(","):
                results = measure(name, args.requests, workdir, upstream.h1_port)
                rows.append((name, results))
        finally:
            upstream.child.stop()
    print(f"\ninstructions per request (callgrind, {args.requests} requests, one worker)\n")
    print("| target | HTTP/1.1 | HTTP/2 |")
    print("|---|---|---|")
    for name, results in rows:
        h1 = results["http1"]["per_request"]  # type: ignore[index]
        h2 = results["http2"]["per_request"]  # type: ignore[index]
        print(f"| {name} | {h1:,.0f} | {h2:,.0f} |")
    if args.top:
        for name, results in rows:
            for proto in ("http1", "http2"):
                print(f"\n{name} {proto}: instructions per request by function (self cost)")
                for line in results[proto]["top"]:  # type: ignore[index]
                    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
