"""An HTTP/1.1 upstream whose answers follow a script per request, for retry and
timeout tests: the request header ``x-script`` lists what to do on each attempt of
that request (attempts are told apart by ``x-script-id``), comma-separated:

``<status>``   answer with that status and a short body
``reset``      close the connection without answering
``hang``       never answer (until the proxy gives up and closes)
``stall``      send the response headers and half the body, then never the rest
``cut``        send the response headers and half the body, then reset (RST)
``slow:<ms>``  answer 200 after that many milliseconds

A status step may carry response headers (``429;retry-after=1;x-a=b``) and come after
a delay (``503@450``: a 503 after 450 ms).

The last entry repeats once the script is used up. Every attempt is recorded
(id, method, body, headers) so a test can count what the upstream saw.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Attempt:
    script_id: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class ScriptedUpstream:
    name: str = "scripted"
    attempts: list[Attempt] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()
        return str(host), int(port)

    def start(self) -> ScriptedUpstream:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._sock.close()
        with self._lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.close()

    def count(self, script_id: str) -> int:
        with self._lock:
            return sum(1 for a in self.attempts if a.script_id == script_id)

    def seen(self, script_id: str) -> list[Attempt]:
        with self._lock:
            return [a for a in self.attempts if a.script_id == script_id]

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
                body = b""
                if "content-length" in headers:
                    n = int(headers["content-length"])
                    while len(buf) < n:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buf += data
                    body, buf = buf[:n], buf[n:]
                elif headers.get("transfer-encoding", "").lower() == "chunked":
                    body, buf = self._read_chunked(conn, buf)
                script_id = headers.get("x-script-id", "")
                with self._lock:
                    n_before = sum(1 for a in self.attempts if a.script_id == script_id)
                    self.attempts.append(Attempt(script_id, method, path, headers, body))
                steps = [s.strip() for s in headers.get("x-script", "200").split(",")]
                step = steps[min(n_before, len(steps) - 1)]
                if not self._act(conn, step, n_before + 1):
                    return
        except OSError:
            return
        finally:
            conn.close()

    @staticmethod
    def _read_chunked(conn: socket.socket, buf: bytes) -> tuple[bytes, bytes]:
        body = b""
        while True:
            while b"\r\n" not in buf:
                buf += conn.recv(65536)
            size_line, buf = buf.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            while len(buf) < size + 2:
                buf += conn.recv(65536)
            chunk, buf = buf[:size], buf[size + 2 :]
            if size == 0:
                return body, buf
            body += chunk

    def _act(self, conn: socket.socket, step: str, attempt: int) -> bool:
        """Performs one step; False when the connection is done."""
        if step == "reset":
            conn.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            return False
        if step == "hang":
            self._stop.wait(30)
            return False
        if step == "cut":
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\nx-upstream: "
                + self.name.encode()
                + b"\r\n\r\nhalf!"
            )
            time.sleep(0.05)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, bytes([1, 0, 0, 0, 0, 0, 0, 0]))
            return False
        if step == "stall":
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\nx-upstream: "
                + self.name.encode()
                + b"\r\n\r\nhalf!"
            )
            self._stop.wait(30)
            return False
        status = 200
        step, *extra = step.split(";")
        if "@" in step:
            step, delay = step.split("@")
            time.sleep(int(delay) / 1000)
        if step.startswith("slow:"):
            time.sleep(int(step[5:]) / 1000)
        else:
            status = int(step)
        body = f"attempt {attempt} {status}".encode()
        headers = "".join(f"{h.partition('=')[0]}: {h.partition('=')[2]}\r\n" for h in extra)
        conn.sendall(
            f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n"
            f"x-upstream: {self.name}\r\nx-attempt: {attempt}\r\n{headers}\r\n".encode()
            + body
        )
        return True
