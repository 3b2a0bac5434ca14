"""A fleet under one management server: N proxies, one 10,000-endpoint EDS push.

    python benches/fleet.py [--targets envoyx,envoy] [--instances 50] [--endpoints 10000]
                            [--rounds 3]

The management server is go-control-plane v0.14 (``tests/xds_go`` with ``--clusters-only
--any-node --stable-names``: one EDS cluster ``cluster-0`` over SotW ADS, the same
snapshot for every node). Each proxy (``--concurrency 1``, its own node id and admin
port) has a static listener routing everything to ``cluster-0``. At first cluster 0 has
one endpoint, upstream *old* on 127.0.0.1; each round pushes an assignment of
``--endpoints`` endpoints 127.1.0.0, 127.1.0.1, ... on the port of upstream *new*
(bound to 0.0.0.0, so every one of them answers: "grow"), then the same addresses on
the port of upstream *moved* (every host replaced: "move"), then goes back to the one
endpoint.

Per round, from the ``update`` written to the server (t0):

- *ACKed*: when the server has received the EDS ACK of the new version from every
  proxy (the proxy ACKs once the assignment is applied);
- *serving*: when a request through every proxy's listener has reached *new* (one
  thread sends requests to the proxies in turn, over a kept-alive connection each, so
  a proxy is looked at every few milliseconds);
- the management server's CPU seconds (utime + stime from /proc) from t0 until every
  ACK is in, per proxy; and the proxies' own CPU seconds in that time, per proxy.

Prints a table per target and writes benches/results/fleet.md.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_xds_go import ENDPOINT_TYPE, XdsGoServer, ads_bootstrap  # noqa: E402
from test_xds_nack_storm import build_xds_go, cpu_seconds  # noqa: E402

from support.envoy import EnvoyProcess, ensure_envoy_binary  # noqa: E402
from support.proxy import EnvoyxProcess, ProxyProcess  # noqa: E402
from support.upstreams import HttpUpstream  # noqa: E402
from support.wait import free_port  # noqa: E402

START_TIMEOUT_S = 600.0
ROUND_TIMEOUT_S = 120.0

Json = dict[str, Any]


def bootstrap(i: int, xds_port: int, listener_port: int) -> Json:
    doc = ads_bootstrap(admin_port=free_port(), xds_port=xds_port, api_type="GRPC")
    doc["node"]["id"] = f"fleet-{i}"
    doc["static_resources"]["listeners"] = [
        {
            "name": "fleet",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": listener_port}},
            "filter_chains": [
                {
                    "filters": [
                        {
                            "name": "envoy.filters.network.http_connection_manager",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                "http_connection_manager.v3.HttpConnectionManager",
                                "stat_prefix": "fleet",
                                "route_config": {
                                    # cluster-0 comes over CDS, after the listener
                                    "validate_clusters": False,
                                    "virtual_hosts": [
                                        {
                                            "name": "all",
                                            "domains": ["*"],
                                            "routes": [
                                                {
                                                    "match": {"prefix": "/"},
                                                    "route": {"cluster": "cluster-0"},
                                                }
                                            ],
                                        }
                                    ],
                                },
                                "http_filters": [
                                    {
                                        "name": "envoy.filters.http.router",
                                        "typed_config": {
                                            "@type": "type.googleapis.com/envoy.extensions."
                                            "filters.http.router.v3.Router"
                                        },
                                    }
                                ],
                            },
                        }
                    ]
                }
            ],
        }
    ]
    return doc


class Poller:
    """One thread asking each proxy in turn which upstream answers, over a kept-alive
    connection per proxy; records when each proxy was first seen answering from
    ``want`` after :meth:`arm`."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.conns: list[http.client.HTTPConnection | None] = [None] * len(ports)
        self.want: str | None = None
        self.t0 = 0.0
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._armed = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def arm(self, want: str, t0: float) -> None:
        self.seen = {}
        self.want, self.t0 = want, t0
        self._armed.set()

    def disarm(self) -> None:
        self._armed.clear()

    def _ask(self, i: int) -> str | None:
        conn = self.conns[i]
        if conn is None:
            conn = self.conns[i] = http.client.HTTPConnection("127.0.0.1", self.ports[i], timeout=5)
        try:
            conn.request("GET", "/")
            resp = conn.getresponse()
            resp.read()
            return resp.getheader("x-upstream")
        except (OSError, http.client.HTTPException):
            conn.close()
            self.conns[i] = None
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._armed.wait(0.1):
                continue
            if len(self.seen) == len(self.ports):
                time.sleep(0.01)
                continue
            for i in range(len(self.ports)):
                if i in self.seen or not self._armed.is_set():
                    continue
                if self._ask(i) == self.want:
                    self.seen[i] = time.monotonic() - self.t0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def eds_acks(server: XdsGoServer, version: str, start: int) -> list[float]:
    with server._cond:
        return [
            e.at
            for e in server.events[start:]
            if e.kind == "ack" and e.args[0] == ENDPOINT_TYPE and e.args[1] == version
        ]


def wait_acks(server: XdsGoServer, version: str, start: int, n: int) -> list[float]:
    deadline = time.monotonic() + ROUND_TIMEOUT_S
    while True:
        acks = eds_acks(server, version, start)
        if len(acks) >= n:
            return acks
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(acks)} of {n} proxies ACKed {version}")
        time.sleep(0.005)


def run(kind: str, n: int, n_endpoints: int, rounds: int, workdir: Path) -> dict[str, Any]:
    old = HttpUpstream("old").start()
    new = HttpUpstream("new", host="0.0.0.0").start()
    moved = HttpUpstream("moved", host="0.0.0.0").start()
    server = XdsGoServer(
        build_xds_go(),
        mode="ads",
        upstream_port=old.port,
        base_port=free_port(),
        listeners=1,
        log_path=workdir / f"xds-go-{kind}.log",
        extra_args=("--clusters-only", "--any-node", "--stable-names"),
    )
    ports = [free_port() for _ in range(n)]
    proxies: list[ProxyProcess] = []
    envoy = ensure_envoy_binary() if kind == "envoy" else None
    out: dict[str, Any] = {"instances": n, "rounds": []}
    poller: Poller | None = None
    try:
        t_start = time.monotonic()
        for i in range(n):
            doc = bootstrap(i, server.port, ports[i])
            proxy: ProxyProcess = (
                EnvoyProcess(envoy, doc, workdir / f"{kind}-{i}")
                if envoy is not None
                else EnvoyxProcess(doc, workdir / f"{kind}-{i}")
            )
            proxies.append(proxy.spawn())
        wait_acks(server, "v0", 0, n)
        out["start_s"] = time.monotonic() - t_start
        poller = Poller(ports)
        poller.arm("old", time.monotonic())
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(poller.seen) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n - len(poller.seen)} proxies never served")
            time.sleep(0.05)
        out["rss_mib"] = sum(p.rss_kb() for p in proxies) / 1024
        for r in range(rounds):
            steps = (
                (n_endpoints, new.port, "new", "grow"),  # 1 endpoint -> 10,000
                (n_endpoints, moved.port, "moved", "move"),  # 10,000 -> 10,000 others
                (0, old.port, "old", None),  # back to the one endpoint
            )
            for size, port, want, push in steps:
                poller.disarm()
                time.sleep(0.5)  # quiet before the push
                mark = server.mark()
                server_cpu0 = cpu_seconds(server.proc.pid)
                proxy_cpu0 = sum(cpu_seconds(p.pid) for p in proxies)
                server.command(f"endpoints {size} {port}")
                t0 = time.monotonic()
                poller.arm(want, t0)
                version = server.update()
                acks = wait_acks(server, version, mark, n)
                server_cpu = cpu_seconds(server.proc.pid) - server_cpu0
                proxy_cpu = sum(cpu_seconds(p.pid) for p in proxies) - proxy_cpu0
                deadline = time.monotonic() + ROUND_TIMEOUT_S
                while len(poller.seen) < n:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{n - len(poller.seen)} proxies never served {want}")
                    time.sleep(0.005)
                if push is None:
                    continue
                served = sorted(poller.seen.values())
                row = {
                    "push": push,
                    "acked_s": max(acks) - t0,
                    "acked_median_s": statistics.median(acks) - t0,
                    "serving_s": served[-1],
                    "serving_median_s": statistics.median(served),
                    "server_cpu_ms_per_instance": server_cpu * 1000 / n,
                    "proxy_cpu_ms_per_instance": proxy_cpu * 1000 / n,
                }
                print(f"{kind} round {r}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
                out["rounds"].append(row)
        out["rss_mib_after"] = sum(p.rss_kb() for p in proxies) / 1024
    finally:
        if poller is not None:
            poller.stop()
        for p in proxies:
            p.stop()
        server.stop()
        old.stop()
        new.stop()
        moved.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="envoyx,envoy")
    parser.add_argument("--instances", type=int, default=50)
    parser.add_argument("--endpoints", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="envoyx-fleet-") as tmp:
        for kind in args.targets.split(","):
            results[kind] = run(kind, args.instances, args.endpoints, args.rounds, Path(tmp))
    rows = [
        ("every proxy ACKed (s), worst round", "acked_s", max),
        ("every proxy serving (s), worst round", "serving_s", max),
        ("every proxy serving (s), median round", "serving_s", statistics.median),
        ("half the proxies serving (s), median round", "serving_median_s", statistics.median),
        ("server CPU per proxy (ms), median", "server_cpu_ms_per_instance", statistics.median),
        ("proxy CPU per proxy (ms), median", "proxy_cpu_ms_per_instance", statistics.median),
    ]
    pushes = {
        "grow": f"1 endpoint → {args.endpoints}",
        "move": f"{args.endpoints} → {args.endpoints} others",
    }
    lines = [
        "| push | figure | " + " | ".join(results) + " |",
        "|---|---|" + "---|" * len(results),
    ]
    for push, title in pushes.items():
        for label, key, agg in rows:
            cells = [
                f"{agg([r[key] for r in res['rounds'] if r['push'] == push]):.3f}"
                for res in results.values()
            ]
            lines.append(f"| {title} | {label} | " + " | ".join(cells) + " |")
    lines.append(
        "| | RSS of the fleet (MiB), serving 10k endpoints | "
        + " | ".join(f"{res['rss_mib_after']:.0f}" for res in results.values())
        + " |"
    )
    lines.append(
        "| | fleet start to every proxy ACKed (s) | "
        + " | ".join(f"{res['start_s']:.1f}" for res in results.values())
        + " |"
    )
    table = "\n".join(lines)
    load = os.getloadavg()
    header = (
        f"{args.instances} proxies, {args.endpoints} endpoints, {args.rounds} rounds; "
        f"{os.cpu_count()} CPUs, load average {load[0]:.1f} at the end"
    )
    print(header)
    print(table)
    out = ROOT / "benches" / "results" / "fleet.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        "# Fleet benchmark\n\n`python benches/fleet.py`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n{header}\n\n{table}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
