"""Polling with a deadline, free ports, and process memory readings."""

from __future__ import annotations

import socket
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

POLL_INTERVAL_S = 0.02


class Timeout(AssertionError):
    """A condition polled with :func:`until` did not hold before its deadline."""


class Fatal(Exception):
    """Raised by a condition to stop :func:`until` at once (e.g. the process died)."""


def until(
    condition: Callable[[], T],
    *,
    timeout: float = 10.0,
    interval: float = POLL_INTERVAL_S,
    what: str = "condition",
) -> T:
    """Poll ``condition`` until it returns a truthy value; return that value.

    Exceptions raised by ``condition`` count as "not yet" (except :class:`Fatal`,
    which propagates at once); the last one is chained to the :class:`Timeout`
    raised when ``timeout`` seconds pass.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
            last_exc = None
        except Fatal:
            raise
        except Exception as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            raise Timeout(f"timed out after {timeout}s waiting for {what}") from last_exc
        time.sleep(interval)


def stable(
    read: Callable[[], T],
    *,
    quiet_s: float = 0.5,
    timeout: float = 30.0,
    done: Callable[[T], bool] | None = None,
    what: str = "value to settle",
) -> T:
    """Poll ``read`` until its value has not changed for ``quiet_s`` (or ``done(value)``).

    Used to find the point where a flow-controlled transfer stops advancing.
    """
    deadline = time.monotonic() + timeout
    value = read()
    changed_at = time.monotonic()
    while True:
        if done is not None and done(value):
            return value
        now = time.monotonic()
        if now - changed_at >= quiet_s:
            return value
        if now >= deadline:
            raise Timeout(f"timed out after {timeout}s waiting for {what} (last {value!r})")
        time.sleep(POLL_INTERVAL_S)
        new = read()
        if new != value:
            value = new
            changed_at = time.monotonic()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind port 0, read, close).

    Only for configs that must name a port up front (the same bootstrap run through
    Envoy and envoyx); prefer port 0 where the server reports its bound port.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _recent_ports:  # never hand out the same port twice in a row
            _recent_ports.append(port)
            return port
    raise OSError("no fresh free port found")


_recent_ports: deque[int] = deque(maxlen=256)


class RefusedPort:
    """A port that refuses connections: bound (so nobody else takes it) but not listening."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((host, 0))
        self.host = host
        self.port = int(self._sock.getsockname()[1])

    def close(self) -> None:
        self._sock.close()


def proc_status_kb(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` memory field (``VmRSS``, ``VmHWM``) in kB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/{pid}/status")
