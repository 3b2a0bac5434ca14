"""WebSocket messages per second through envoyx and Envoy, on the same load.

    python benches/websocket.py [--messages 50000] [--connections 8] [--size 64] [--rounds 3]

A WebSocket echo upstream (tests/support/websocket_upstream.py, the `websockets`
package's asyncio server) runs in this process; each proxy (one worker) gets the same
bootstrap: HTTP/1.1 upgrades allowed by the connection manager, one route to the
upstream. `--connections` client connections (websockets' asyncio client, in a child
process so that the client does not share a core with the upstream) each send
`--messages / --connections` messages of `--size` bytes, pipelined, and read every
echo back. Printed per proxy: messages per second (each message counted once, both
ways), and the proxies' CPU seconds per 10k messages (from /proc: user + system).
The client and the upstream cost the same for both proxies; the direct row (no proxy)
shows what they cost alone.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.bootstrap import bootstrap, cluster, http_listener, route, virtual_host  # noqa: E402
from support.envoy import EnvoyProcess, ensure_envoy_binary  # noqa: E402
from support.proxy import EnvoyxProcess, ProxyProcess  # noqa: E402
from support.wait import free_port  # noqa: E402
from support.websocket_upstream import WebSocketUpstream  # noqa: E402


def config(port: int, admin: int, upstream: tuple[str, int]) -> dict[str, Any]:
    listener = http_listener(
        port=port,
        virtual_hosts=[virtual_host("all", ["*"], [route({"prefix": "/"}, cluster="ws")])],
    )
    listener["filter_chains"][0]["filters"][0]["typed_config"]["upgrade_configs"] = [
        {"upgrade_type": "websocket"}
    ]
    return bootstrap(admin_port=admin, listeners=[listener], clusters=[cluster("ws", [upstream])])


async def _client(url: str, messages: int, size: int) -> None:
    from websockets.asyncio.client import connect

    payload = b"x" * size
    async with connect(url, compression=None, max_size=None, ping_interval=None) as ws:

        async def send() -> None:
            for _ in range(messages):
                await ws.send(payload)

        sender = asyncio.create_task(send())
        for _ in range(messages):
            await ws.recv()
        await sender


def _load(url: str, connections: int, messages: int, size: int) -> float:
    async def run() -> float:
        started = time.perf_counter()
        per = messages // connections
        await asyncio.gather(*(_client(url, per, size) for _ in range(connections)))
        return time.perf_counter() - started

    return asyncio.run(run())


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(url: str, pid: int | None, args: argparse.Namespace) -> tuple[float, float | None]:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        before = _cpu_seconds(pid) if pid else 0.0
        elapsed = pool.apply(_load, (url, args.connections, args.messages, args.size))
        cpu = _cpu_seconds(pid) - before if pid else None
    rate = args.messages / elapsed
    per_10k = cpu / args.messages * 10_000 if cpu is not None else None
    return rate, per_10k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    upstream = WebSocketUpstream("ws").start()
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"envoyx-bench-ws-{os.getpid()}"
    results: dict[str, list[tuple[float, float | None]]] = {}
    try:
        targets: list[tuple[str, ProxyProcess | None, int]] = [
            ("direct", None, upstream.address[1])
        ]
        for kind in ("envoyx", "envoy"):
            port = free_port()
            bs = config(port, free_port(), upstream.address)
            proxy: ProxyProcess = (
                EnvoyxProcess(bs, workdir / kind, concurrency=1)
                if kind == "envoyx"
                else EnvoyProcess(ensure_envoy_binary(), bs, workdir / kind, concurrency=1)
            )
            proxy.start()
            targets.append((kind, proxy, port))
        for _ in range(args.rounds):
            for name, proxy, port in targets:
                pid = proxy.pid if proxy is not None else None
                results.setdefault(name, []).append(
                    measure(f"ws://127.0.0.1:{port}/bench", pid, args)
                )
        for _, proxy, _ in targets:
            if proxy is not None:
                proxy.stop()
    finally:
        upstream.stop()
    print(
        f"{args.messages} messages of {args.size} B over {args.connections} connections, "
        f"{args.rounds} rounds (median)"
    )
    print(f"{'target':<8} {'msg/s':>10} {'proxy CPU s / 10k msg':>22}")
    for name, rows in results.items():
        rate = statistics.median(r for r, _ in rows)
        cpus = [c for _, c in rows if c is not None]
        cpu = f"{statistics.median(cpus):.3f}" if cpus else "-"
        print(f"{name:<8} {rate:>10.0f} {cpu:>22}")


if __name__ == "__main__":
    main()
