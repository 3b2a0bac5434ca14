"""A real WebSocket upstream (the ``websockets`` package's asyncio server) in a thread.

Paths:

- ``/refuse``: the upgrade is refused with ``403`` and the body ``refused\\n``;
- anything else: every message is echoed; the text message ``close-me`` makes the
  server close with code 4001 and reason ``server bye``.

Every handshake response carries ``x-upstream: ws``. The close code and reason the
server saw for each connection are kept in :attr:`closes`.
"""

from __future__ import annotations

import asyncio
import threading
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response


class WebSocketUpstream:
    def __init__(self, name: str = "ws") -> None:
        self.name = name
        self.closes: list[tuple[int | None, str | None]] = []
        self.handshakes: list[Headers] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: Server | None = None
        self.address: tuple[str, int] = ("127.0.0.1", 0)

    def start(self) -> WebSocketUpstream:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = (host, port)
        return self

    async def _start(self) -> Server:
        return await serve(
            self._handle,
            "127.0.0.1",
            0,
            process_request=self._process_request,
            process_response=self._process_response,
            compression=None,
            max_size=None,
            ping_interval=None,
        )

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        self.handshakes.append(request.headers)
        if request.path.startswith("/refuse"):
            response = conn.respond(HTTPStatus.FORBIDDEN, "refused\n")
            response.headers["x-upstream"] = self.name
            return response
        return None

    def _process_response(
        self, conn: ServerConnection, request: Request, response: Response
    ) -> None:
        response.headers["x-upstream"] = self.name

    async def _handle(self, ws: ServerConnection) -> None:
        try:
            async for message in ws:
                if message == "close-me":
                    await ws.close(4001, "server bye")
                    break
                await ws.send(message)
        except ConnectionClosed:
            pass  # a close code other than 1000/1001 ends the loop this way
        finally:
            await ws.wait_closed()
            rcvd = ws.protocol.close_rcvd
            self.closes.append((rcvd.code, rcvd.reason) if rcvd is not None else (None, None))

    def stop(self) -> None:
        async def _stop() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> WebSocketUpstream:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
