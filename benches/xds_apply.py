"""xDS apply latency and memory, envoyx beside Envoy, driven by the same ADS server.

    python benches/xds_apply.py [--targets envoyx,envoy] [--endpoints 10000] [--clusters 1000]

For each proxy: start the test suite's ADS management server (tests/support/xds_server.py),
start the proxy with an ADS bootstrap, then measure

- EDS: one EDS cluster warm with one endpoint; then a ClusterLoadAssignment with N
  endpoints is pushed at t0; the time until the proxy's admin shows
  ``cluster.big.membership_total == N`` is "receipt to in force" (plus one admin poll,
  at most ~2 ms, identical for both proxies), three rounds, median;
- CDS: N STATIC clusters pushed at t0; time until ``cluster_manager.active_clusters``
  reaches them all;
- memory: RSS growth of the proxy process per cluster and per endpoint.

Prints a table with each figure and its ratio to Envoy; writes benches/results/xds.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.envoy import EnvoyProcess, ensure_envoy_binary  # noqa: E402
from support.proxy import EnvoyxProcess, ProxyProcess  # noqa: E402
from support.wait import free_port  # noqa: E402
from support.xds_resources import (  # noqa: E402
    ads_bootstrap,
    cluster_load_assignment,
    eds_cluster,
)
from support.xds_server import CLUSTER, ENDPOINT, LISTENER, XdsServer  # noqa: E402

POLL_S = 0.002


def stat(proxy: ProxyProcess, name: str) -> int:
    _, _, body = proxy.admin(f"/stats?filter=^{name}$")
    for line in body.decode().splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return -1


def wait_stat(proxy: ProxyProcess, name: str, value: int, timeout: float = 60.0) -> float:
    """Seconds until ``name`` reads ``value``."""
    start = time.perf_counter()
    while stat(proxy, name) != value:
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"{proxy.kind}: {name} never reached {value}")
        time.sleep(POLL_S)
    return time.perf_counter() - start


def endpoints(n: int, port: int = 9) -> list[tuple[str, int]]:
    return [(f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}", port) for i in range(n)]


def static_cluster(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": cluster_load_assignment(name, [("127.0.0.1", 9)]),
    }


def measure(kind: str, n_endpoints: int, n_clusters: int, workdir: Path) -> dict[str, float]:
    xds = XdsServer().start()
    bootstrap = ads_bootstrap(xds_address=xds.address, admin_port=free_port())
    proxy: ProxyProcess = (
        EnvoyProcess(ensure_envoy_binary(), bootstrap, workdir / kind)
        if kind == "envoy"
        else EnvoyxProcess(bootstrap, workdir / kind)
    )
    xds.set_snapshot(
        {
            CLUSTER: {"big": eds_cluster("big")},
            ENDPOINT: {"big": cluster_load_assignment("big", endpoints(1))},
            LISTENER: {},
        }
    )
    proxy.start()
    out: dict[str, float] = {}
    try:
        wait_stat(proxy, "cluster.big.membership_total", 1)
        rss0 = proxy.rss_kb()
        rounds = []
        for r in range(3):
            # Alternate the port so that every round is a real change.
            cla = cluster_load_assignment("big", endpoints(n_endpoints, port=9 + r))
            xds.set_resources(ENDPOINT, {"big": cla})
            rounds.append(wait_stat(proxy, "cluster.big.membership_total", n_endpoints))
            xds.set_resources(ENDPOINT, {"big": cluster_load_assignment("big", endpoints(1))})
            wait_stat(proxy, "cluster.big.membership_total", 1)
        xds.set_resources(ENDPOINT, {"big": cluster_load_assignment("big", endpoints(n_endpoints))})
        wait_stat(proxy, "cluster.big.membership_total", n_endpoints)
        rss1 = proxy.rss_kb()
        out["eds_ms"] = statistics.median(rounds) * 1000
        out["bytes_per_endpoint"] = max(rss1 - rss0, 0) * 1024 / n_endpoints

        before = stat(proxy, "cluster_manager.active_clusters")
        clusters = {f"c{i}": static_cluster(f"c{i}") for i in range(n_clusters)}
        clusters["big"] = eds_cluster("big")
        rss2 = proxy.rss_kb()
        xds.set_resources(CLUSTER, clusters)
        out["cds_ms"] = (
            wait_stat(proxy, "cluster_manager.active_clusters", before + n_clusters) * 1000
        )
        rss3 = proxy.rss_kb()
        out["bytes_per_cluster"] = max(rss3 - rss2, 0) * 1024 / n_clusters
    finally:
        proxy.stop()
        xds.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="envoyx,envoy")
    parser.add_argument("--endpoints", type=int, default=10000)
    parser.add_argument("--clusters", type=int, default=1000)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="envoyx-xds-bench-") as tmp:
        for kind in args.targets.split(","):
            results[kind] = measure(kind, args.endpoints, args.clusters, Path(tmp))
    rows = [
        ("EDS update applied (ms)", "eds_ms", f"{args.endpoints} endpoints"),
        ("CDS update applied (ms)", "cds_ms", f"{args.clusters} clusters"),
        ("memory per endpoint (bytes)", "bytes_per_endpoint", "RSS growth"),
        ("memory per cluster (bytes)", "bytes_per_cluster", "RSS growth"),
    ]
    lines = [
        "| figure | " + " | ".join(results) + " | note |",
        "|---|" + "---|" * len(results) + "---|",
    ]
    for label, key, note in rows:
        cells = []
        for kind, r in results.items():
            cell = f"{r[key]:.1f}"
            if kind != "envoy" and "envoy" in results and results["envoy"][key] > 0:
                cell += f" ({r[key] / results['envoy'][key]:.2f}x)"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {note} |")
    table = "\n".join(lines)
    print(table)
    out = ROOT / "benches" / "results" / "xds.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        "# xDS apply benchmark\n\n`python benches/xds_apply.py`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n{table}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
