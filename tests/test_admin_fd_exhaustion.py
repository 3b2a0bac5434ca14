"""The proxy out of file descriptors: its accept loops back off instead of spinning, and
the admin endpoint serves again once descriptors are free.

envoyx runs as a child process (``python -m envoyx``); once it is ready its soft
``RLIMIT_NOFILE`` is lowered (``prlimit``) to a few descriptors above what it holds,
and clients connect to the admin port and to the listener until every descriptor is
taken: the connections left in the kernel's accept queues make both accept loops fail
with EMFILE for as long as the clients stay. An accept loop that retried at once would
burn a core for that time (the admin loop once did).
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import time
from collections.abc import Callable, Iterator

import httpx

from support.bootstrap import simple_proxy
from support.proxy import ProxyProcess
from support.upstreams import HttpUpstream
from support.wait import Timeout, free_port, stable, until

StartProxy = Callable[..., ProxyProcess]

HEADROOM = 16  # descriptors left free under the lowered limit
EXHAUSTED_WINDOW_S = 1.5  # how long the CPU use is measured while exhausted
MAX_CPU_S = 0.5  # a spinning accept loop uses ~1 s of CPU per second; an idle one ~0


def fd_numbers(pid: int) -> set[int]:
    return {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread), from ``/proc/<pid>/stat``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def unaccepted(port: int) -> int:
    """Connections to ``port`` waiting in its accept queue: established server-side
    sockets that no process holds yet (inode 0 in ``/proc/net/tcp``)."""
    n = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "01" and inode == "0" and int(local.rsplit(":", 1)[1], 16) == port:
                n += 1
    return n


@contextlib.contextmanager
def clients(addresses: list[tuple[str, int]]) -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        for address in addresses:
            socks.append(socket.create_connection(address, timeout=5))
        yield socks
    finally:
        for s in socks:
            s.close()


def test_admin_serves_again_after_descriptor_exhaustion_without_spinning(
    start_envoyx: StartProxy, http_upstream: HttpUpstream
) -> None:
    proxy = start_envoyx(
        simple_proxy(port=free_port(), admin_port=free_port(), upstream=http_upstream.address)
    )
    pid = proxy.pid
    admin, listener = proxy.admin_address, proxy.listener_address()

    before_stats = proxy.stats()
    admin_total_before = before_stats["listener.admin.downstream_cx_total"]

    # The limit bounds descriptor numbers (a new one must be below it): leave `free`
    # numbers below it unused, at least HEADROOM.
    held = stable(lambda: frozenset(fd_numbers(pid)), quiet_s=0.3, what="the proxy's descriptors")
    limit = max(max(held) + 1, len(held) + HEADROOM)
    free = limit - len(held)
    _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))

    # free + 2 clients to each port: at most `free` are accepted in all, so some stay
    # queued on each port whatever the order the loops accept in.
    per_port = free + 2
    addresses = [admin, listener] * per_port
    with clients(addresses):
        until(
            lambda: fd_numbers(pid) >= set(range(limit)),
            what=f"the proxy to hold every descriptor below {limit}",
        )
        assert unaccepted(admin[1]) >= 1 and unaccepted(listener[1]) >= 1

        # A measurement window, not a synchronisation: both accept loops face EMFILE
        # for all of it.
        before, started = cpu_seconds(pid), time.monotonic()
        time.sleep(EXHAUSTED_WINDOW_S)
        used, wall = cpu_seconds(pid) - before, time.monotonic() - started

        # Still exhausted at the end of the window, still running.
        assert unaccepted(admin[1]) >= 1 and unaccepted(listener[1]) >= 1
        assert proxy.running, proxy.log_text()
        assert used < MAX_CPU_S, (
            f"the proxy used {used:.2f} s of CPU in {wall:.2f} s while out of descriptors; "
            f"log:\n{proxy.log_text()[-3000:]}"
        )

    # The clients are gone: descriptors free up, the admin endpoint and the listener
    # serve again, and every connection made meanwhile was accepted and let go.
    until(proxy.ready, what="admin /ready after the descriptors are freed")
    lis = f"listener.{listener[0]}_{listener[1]}"
    expected = {
        # The one serving this /stats request is the only admin connection left.
        "listener.admin.downstream_cx_active": 1,
        f"{lis}.downstream_cx_active": 0,
        f"{lis}.downstream_cx_total": before_stats.get(f"{lis}.downstream_cx_total", 0) + per_port,
    }
    seen: dict[str, int] = {}

    def settled() -> bool:
        nonlocal seen
        now = proxy.stats()
        seen = {k: now.get(k, 0) for k in expected}
        admin_total = now.get("listener.admin.downstream_cx_total", 0)
        return seen == expected and admin_total > admin_total_before + per_port

    try:
        until(settled, what="the connections made while exhausted to be served and closed")
    except Timeout:
        raise AssertionError(
            f"stats {seen}, expected {expected}; log:\n{proxy.log_text()}"
        ) from None
    resp = httpx.get(proxy.url("/after"), timeout=10)
    assert resp.status_code == 200
    assert resp.headers["x-upstream"] == http_upstream.name
