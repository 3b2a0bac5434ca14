"""Small clients: raw HTTP/1 over a socket (for malformed input) and helpers."""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass, field


@dataclass
class RawResponse:
    """One HTTP/1 response parsed from bytes read off a socket."""

    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    closed: bool = False  # the server announced connection: close

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.eof = False

    def fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_until(self, sep: bytes) -> bytes:
        while sep not in self.buf:
            if not self.fill():
                raise ConnectionError(f"connection closed before {sep!r}; got {self.buf!r}")
        head, _, self.buf = self.buf.partition(sep)
        return head

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self.fill():
                raise ConnectionError(f"connection closed with {len(self.buf)}/{n} bytes")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_to_eof(self) -> bytes:
        while self.fill():
            pass
        out, self.buf = self.buf, b""
        return out


def read_response(reader: _Reader, head_request: bool = False) -> RawResponse:
    head = reader.read_until(b"\r\n\r\n").decode("latin-1")
    lines = head.split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    headers = []
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.append((k.strip().lower(), v.strip()))
    resp = RawResponse(status=int(code), reason=reason, version=version, headers=headers)
    te = resp.header("transfer-encoding")
    cl = resp.header("content-length")
    if head_request or resp.status in (204, 304) or 100 <= resp.status < 200:
        body = b""
    elif te is not None and "chunked" in te.lower():
        parts = []
        while True:
            size = int(reader.read_until(b"\r\n").split(b";")[0], 16)
            if size == 0:
                reader.read_until(b"\r\n")  # no trailers expected
                break
            parts.append(reader.read_exact(size))
            reader.read_exact(2)
        body = b"".join(parts)
    elif cl is not None:
        body = reader.read_exact(int(cl))
    else:
        body = reader.read_to_eof()
    resp.body = body
    resp.closed = (resp.header("connection") or "").lower() == "close"
    return resp


def raw_exchange(address: tuple[str, int], data: bytes, *, timeout: float = 10.0) -> RawResponse:
    """Send ``data`` on a fresh connection and read one response.

    After the response the client half-closes and reads to EOF (so a proxy's delayed
    close does not cost its timeout), failing on any bytes after the response.
    ``closed`` is True when the server announced ``connection: close``.
    Raises ``ConnectionError`` if the server closes without answering.
    """
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        reader = _Reader(sock)
        resp = read_response(reader)
        resp.closed = (resp.header("connection") or "").lower() == "close"
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        extra = reader.read_to_eof()
        if extra:
            raise AssertionError(f"unexpected bytes after the response: {extra[:200]!r}")
        return resp


def raw_requests(
    address: tuple[str, int], requests: list[bytes], *, timeout: float = 10.0
) -> list[RawResponse]:
    """Send several requests one after another on ONE connection (keep-alive)."""
    out = []
    with socket.create_connection(address, timeout=timeout) as sock:
        reader = _Reader(sock)
        for req in requests:
            sock.sendall(req)
            out.append(read_response(reader, head_request=req.startswith(b"HEAD ")))
    return out
