#!/usr/bin/env python3
"""Load balancing beside Envoy on the same load: CPU per request by policy and host
count, and the time a ring or Maglev table of many hosts costs a cluster's start.

    python benches/lb_cost.py [--hosts 10,100,1000,10000] [--requests 20000]

Each proxy (envoyx and Envoy 1.40, one worker each) gets the same bootstrap: one
cluster of N hosts 127.x.y.z:P — distinct addresses that all reach one nginx bound
to 0.0.0.0:P — under one policy (ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH and
MAGLEV; the hash policies hash a request's ``k`` query parameter, a different value
per request, so picks spread over the hosts as the others do). A warm-up pass of
2 x N requests (at least 1,000) gives the hosts their pooled connections first
(otherwise the figure would be connection set-up, not host picking); then h2load
sends the measured requests over one HTTP/1.1 keep-alive connection and the proxy's
CPU time (utime + stime from /proc) over them, divided by their count, is the
figure. CPU time moves with this machine's load: compare the two proxies and the
policies within one run.

Build time: for 10,000 hosts, the time from spawning the proxy to its first proxied
answer, under RING_HASH and MAGLEV minus the same under ROUND_ROBIN (median of
three), for both proxies: what building the ring or table adds to a cluster's start
(Envoy builds it on the main thread before the cluster is ready, envoyx on the
worker at its first pick).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    RAW,
    HarnessError,
    apt_install,
    cpu_seconds,
    ensure_envoy,
    free_ports,
    log,
    spawn,
    wait_ready,
    which,
)

HCM_TYPE = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
POLICIES = ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "RING_HASH", "MAGLEV")
#: The URIs of the hash policies' runs (``-i``): 20,000 keys, PORT filled in per run.
KEYS = Path(tempfile.gettempdir()) / f"envoyx-lb-keys-{os.getpid()}.txt"

NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 65536; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    default_type text/plain;
    server {{
        listen 0.0.0.0:{port} backlog=4096;
        location / {{ return 200 "hello world\\n"; }}
    }}
}}
"""


def host_address(i: int) -> str:
    """The i-th of many loopback addresses (127.0.1.0 upwards), all on this machine."""
    n = 256 + i
    return f"127.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def bootstrap(policy: str, hosts: int, upstream_port: int, listen: int, admin: int) -> str:
    endpoints = "\n".join(
        "        - endpoint: { address: { socket_address: "
        f"{{ address: {host_address(i)}, port_value: {upstream_port} }} }} }}"
        for i in range(hosts)
    )
    hash_policy = (
        "\n                  hash_policy: [{ query_parameter: { name: k } }]"
        if policy in ("RING_HASH", "MAGLEV")
        else ""
    )
    return f"""\
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
  - name: bench
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listen} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM_TYPE}
          stat_prefix: bench
          route_config:
            name: bench
            virtual_hosts:
            - name: upstream
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route:
                  cluster: many{hash_policy}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: many
    type: STATIC
    connect_timeout: 1s
    lb_policy: {policy}
    load_assignment:
      cluster_name: many
      endpoints:
      - lb_endpoints:
{endpoints}
"""


def command(proxy: str, envoy: Path, cfg: Path) -> list[str]:
    if proxy == "envoyx":
        return [sys.executable, "-m", "envoyx", "-c", str(cfg), "--concurrency", "1"]
    return [
        str(envoy),
        "-c",
        str(cfg),
        "--concurrency",
        "1",
        "--disable-hot-restart",
        "-l",
        "error",
    ]


def h2load(port: int, requests: int, uris: Path | None) -> None:
    """``requests`` HTTP/1.1 requests over one connection; with ``uris`` (a file of
    ``/?k=<n>`` paths) each carries its own hash key."""
    cmd = ["h2load", "--h1", "-n", str(requests), "-c", "1"]
    if uris is not None:
        # Each URI of the file in turn (h2load's -i): the host of the same port.
        path = uris.with_suffix(f".{port}")
        path.write_text(uris.read_text().replace("PORT", str(port)))
        cmd += ["-i", str(path)]
    else:
        cmd.append(f"http://127.0.0.1:{port}/")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900).stdout
    if f", {requests} succeeded" not in out:
        raise HarnessError(f"h2load did not complete {requests} requests:\n{out}")


def cpu_per_request(
    proxy: str, envoy: Path, policy: str, hosts: int, requests: int, upstream: int, work: Path
) -> float:
    listen, admin = free_ports(2)
    cfg = work / f"{proxy}-{policy}-{hosts}.yaml"
    cfg.write_text(bootstrap(policy, hosts, upstream, listen, admin))
    child = spawn(f"{proxy} {policy} {hosts}", command(proxy, envoy, cfg), RAW / f"lb-{proxy}.log")
    try:
        wait_ready(listen, child)
        keyed = KEYS if policy in ("RING_HASH", "MAGLEV") else None
        h2load(listen, max(2 * hosts, 1000), keyed)  # every host's connection first
        before = cpu_seconds(child.pid)
        h2load(listen, requests, keyed)
        return (cpu_seconds(child.pid) - before) / requests * 1e6
    finally:
        child.stop()


def start_to_first_answer(
    proxy: str, envoy: Path, policy: str, hosts: int, upstream: int, work: Path
) -> float:
    listen, admin = free_ports(2)
    cfg = work / f"start-{proxy}-{policy}.yaml"
    cfg.write_text(bootstrap(policy, hosts, upstream, listen, admin))
    started = time.monotonic()
    child = spawn(f"{proxy} start {policy}", command(proxy, envoy, cfg), RAW / f"lb-{proxy}.log")
    try:
        wait_ready(listen, child)
        return time.monotonic() - started
    finally:
        child.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--hosts", default="10,100,1000,10000")
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--proxies", default="envoyx,envoy")
    p.add_argument("--envoy-bin", default=None)
    p.add_argument("--no-build", action="store_true", help="skip the build-time figures")
    args = p.parse_args(argv)
    apt_install({"h2load": ["nghttp2-client"], "nginx": ["nginx-light"]})
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 200_000), hard))
    envoy = ensure_envoy(args.envoy_bin)
    KEYS.write_text("".join(f"http://127.0.0.1:PORT/?k={i}\n" for i in range(20000)))
    RAW.mkdir(parents=True, exist_ok=True)
    hosts = [int(h) for h in args.hosts.split(",")]
    policies = args.policies.split(",")
    proxies = args.proxies.split(",")
    cpu: dict[tuple[str, str, int], float] = {}
    build: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory(prefix="envoyx-lb-") as tmp:
        work = Path(tmp)
        prefix = work / "nginx"
        prefix.mkdir()
        (port,) = free_ports(1)
        (prefix / "nginx.conf").write_text(NGINX_CONF.format(prefix=prefix, port=port))
        nginx = which("nginx")
        if nginx is None:
            raise HarnessError("nginx is not installed")
        upstream = spawn(
            "nginx",
            [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
            RAW / "lb-nginx.log",
        )
        try:
            wait_ready(port, upstream)
            for n in hosts:
                for policy in policies:
                    for proxy in proxies:
                        us = cpu_per_request(proxy, envoy, policy, n, args.requests, port, work)
                        cpu[(proxy, policy, n)] = us
                        log(f"{proxy} {policy} {n} hosts: {us:.1f} µs CPU per request")
            if not args.no_build:
                for proxy in proxies:
                    for policy in ("ROUND_ROBIN", "RING_HASH", "MAGLEV"):
                        runs = [
                            start_to_first_answer(proxy, envoy, policy, 10_000, port, work)
                            for _ in range(3)
                        ]
                        build[(proxy, policy)] = statistics.median(runs)
                        log(f"{proxy} {policy} start to first answer: {runs}")
        finally:
            upstream.stop()
    print(f"\nCPU per request (µs), {args.requests} requests after a warm-up, one worker\n")
    print("| policy | hosts | " + " | ".join(proxies) + " |")
    print("|---|---|" + "---|" * len(proxies))
    for n in hosts:
        for policy in policies:
            row = " | ".join(f"{cpu[(proxy, policy, n)]:.1f}" for proxy in proxies)
            print(f"| {policy} | {n:,} | {row} |")
    if build:
        print("\nStart to first answer with 10,000 hosts (median of 3, seconds)\n")
        print("| policy | " + " | ".join(proxies) + " |")
        print("|---|" + "---|" * len(proxies))
        for policy in ("ROUND_ROBIN", "RING_HASH", "MAGLEV"):
            row = " | ".join(f"{build[(proxy, policy)]:.2f}" for proxy in proxies)
            print(f"| {policy} | {row} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
