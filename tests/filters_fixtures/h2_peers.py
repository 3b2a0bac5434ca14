"""A minimal HTTP/2 (prior knowledge) client and upstream that carry request trailers.

httpx cannot send request trailers and the ASGI upstream cannot see them, so the
trailer tests speak HTTP/2 through the ``h2`` state machine over plain sockets.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events

Pairs = list[tuple[str, str]]


@dataclass
class H2Response:
    status: int
    headers: Pairs
    body: bytes
    trailers: Pairs = field(default_factory=list)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)


def h2_request(
    address: tuple[str, int],
    path: str,
    *,
    method: str = "POST",
    headers: Pairs = (),  # type: ignore[assignment]
    body: bytes = b"",
    trailers: Pairs = (),  # type: ignore[assignment]
    authority: str = "example.test",
    timeout: float = 5.0,
) -> H2Response:
    """One request on a fresh HTTP/2 connection; ``body`` must fit the initial window."""
    config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    conn = h2.connection.H2Connection(config=config)
    with socket.create_connection(address, timeout=timeout) as sock:
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        request = [
            (":method", method),
            (":scheme", "http"),
            (":authority", authority),
            (":path", path),
            *headers,
        ]
        conn.send_headers(stream, request, end_stream=not body and not trailers)
        if body:
            conn.send_data(stream, body, end_stream=not trailers)
        if trailers:
            conn.send_headers(stream, list(trailers), end_stream=True)
        sock.sendall(conn.data_to_send())
        status, resp_headers, resp_trailers, chunks = 0, [], [], []
        done = False
        while not done:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed before the response ended")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    resp_headers = [(str(k), str(v)) for k, v in event.headers]
                    status = int(dict(resp_headers)[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    chunks.append(event.data)
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.TrailersReceived):
                    resp_trailers = [(str(k), str(v)) for k, v in event.headers]
                elif isinstance(event, h2.events.StreamReset):
                    raise ConnectionError(f"stream reset with error code {event.error_code}")
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                    done = True
            sock.sendall(conn.data_to_send())
        with contextlib.suppress(OSError):
            conn.close_connection()
            sock.sendall(conn.data_to_send())
    return H2Response(status, resp_headers, b"".join(chunks), resp_trailers)


@dataclass
class H2Seen:
    """What :class:`H2TrailersUpstream` received of one request."""

    path: str
    headers: Pairs
    body: bytes
    trailers: Pairs

    def trailer(self, name: str) -> str | None:
        return next((v for k, v in self.trailers if k == name), None)


class H2TrailersUpstream:
    """HTTP/2 prior-knowledge upstream that records request trailers and answers
    ``200`` with a JSON echo ``{"path", "body_length", "trailers"}``."""

    def __init__(self, name: str = "h2t") -> None:
        self.name = name
        self.requests: list[H2Seen] = []
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.address = ("127.0.0.1", int(self._sock.getsockname()[1]))
        self._thread = threading.Thread(target=self._accept, name="h2-trailers", daemon=True)

    def start(self) -> H2TrailersUpstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)

    def seen(self, path: str) -> list[H2Seen]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        conn = h2.connection.H2Connection(config=config)
        conn.initiate_connection()
        streams: dict[int, dict[str, Any]] = {}
        sock.settimeout(60)
        try:
            sock.sendall(conn.data_to_send())
            while data := sock.recv(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        hdrs = [(str(k), str(v)) for k, v in event.headers]
                        streams[event.stream_id] = {"headers": hdrs, "body": b"", "trailers": []}
                    elif isinstance(event, h2.events.DataReceived):
                        streams[event.stream_id]["body"] += event.data
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.TrailersReceived):
                        trailers = [(str(k), str(v)) for k, v in event.headers]
                        streams[event.stream_id]["trailers"] = trailers
                    elif isinstance(event, h2.events.StreamEnded):
                        self._answer(conn, event.stream_id, streams.pop(event.stream_id))
                sock.sendall(conn.data_to_send())
        except OSError:
            pass
        finally:
            sock.close()

    def _answer(self, conn: h2.connection.H2Connection, stream: int, req: dict[str, Any]) -> None:
        headers = req["headers"]
        path = dict(headers)[":path"]
        seen = H2Seen(path, headers, req["body"], req["trailers"])
        with self._lock:
            self.requests.append(seen)
        echo = json.dumps(
            {"path": path, "body_length": len(seen.body), "trailers": seen.trailers}
        ).encode()
        conn.send_headers(
            stream,
            [
                (":status", "200"),
                ("content-type", "application/json"),
                ("content-length", str(len(echo))),
                ("x-upstream", self.name),
            ],
        )
        conn.send_data(stream, echo, end_stream=True)
