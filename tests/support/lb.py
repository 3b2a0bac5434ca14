"""Helpers of the load-balancing tests (tests/test_lb_*.py): a bootstrap of one
HTTP listener in front of one cluster whose endpoints, weights, priorities, health
and policy each test chooses, and a fast keep-alive client that tallies which
upstream served each request (``x-upstream``)."""

from __future__ import annotations

import socket
from collections import Counter
from typing import Any

from support.bootstrap import bootstrap, http_listener, socket_address
from support.wait import free_port

Json = dict[str, Any]
BACKEND = "backend"


def lb_endpoint(
    address: tuple[str, int], *, weight: int | None = None, health: str | None = None
) -> Json:
    ep: Json = {"endpoint": {"address": socket_address(*address)}}
    if weight is not None:
        ep["load_balancing_weight"] = weight
    if health is not None:
        ep["health_status"] = health
    return ep


def lb_proxy(
    localities: list[Json],
    *,
    cluster_extra: Json | None = None,
    hash_policy: list[Json] | None = None,
    policy: Json | None = None,
) -> Json:
    """A bootstrap: listener → route (with ``hash_policy``) → STATIC cluster
    ``backend`` with these ``load_assignment.endpoints`` and extra cluster fields."""
    action: Json = {"cluster": BACKEND}
    if hash_policy:
        action["hash_policy"] = hash_policy
    routes = [{"match": {"prefix": "/"}, "route": action}]
    assignment: Json = {"cluster_name": BACKEND, "endpoints": localities}
    if policy:
        assignment["policy"] = policy
    cluster: Json = {
        "name": BACKEND,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": assignment,
        **(cluster_extra or {}),
    }
    return bootstrap(
        admin_port=free_port(),
        listeners=[
            http_listener(
                port=free_port(),
                virtual_hosts=[{"name": "all", "domains": ["*"], "routes": routes}],
            )
        ],
        clusters=[cluster],
    )


class KeepAliveClient:
    """HTTP/1.1 GETs on one keep-alive connection with raw sockets: a few tens of
    microseconds of client work per request, so that ten thousand requests take
    seconds."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> KeepAliveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(
        self, path: str = "/", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str]]:
        """(status, response headers lower-cased; repeated ones joined by ``\\n``)."""
        lines = [f"GET {path} HTTP/1.1", "host: lb.test"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buf:
            self._read()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        got: dict[str, str] = {}
        for line in header_lines:
            k, v = line.split(":", 1)
            k, v = k.strip().lower(), v.strip()
            got[k] = f"{got[k]}\n{v}" if k in got else v
        length = int(got.get("content-length", "0"))
        while len(self.buf) < length:
            self._read()
        self.buf = self.buf[length:]
        return status, got

    def _read(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("proxy closed the connection")
        self.buf += data

    def served_by(self, n: int, headers: dict[str, str] | None = None) -> Counter[str]:
        """Sends ``n`` requests; how many each upstream served."""
        tally: Counter[str] = Counter()
        for _ in range(n):
            status, got = self.get("/", headers)
            assert status == 200, (status, got)
            tally[got["x-upstream"]] += 1
        return tally
