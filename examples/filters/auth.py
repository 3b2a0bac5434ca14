"""Authentication against an external HTTP auth service, as a Python filter.

``AuthFilter`` asks an auth service about every request before it goes upstream, the
way nginx's ``auth_request`` or Envoy's ``ext_authz`` (HTTP service) do, from an
``async def`` hook: the proxy's workers never wait for it.

The check is ``GET <auth_url>`` over a fresh HTTP/1.1 connection (stdlib asyncio
streams, no client library) carrying the request's ``authorization`` header (and any
other header named in ``forward_headers``) plus ``x-original-method`` and
``x-original-uri``. The service answers:

- ``2xx``: allowed. Its ``x-user`` response header is set on the request that goes
  upstream, replacing any ``x-user`` the client sent.
- ``401``: the client gets ``401`` (with the service's ``www-authenticate``, if any).
- ``403``: the client gets ``403``.
- anything else, no answer within ``timeout_s``, or a connection error: the client gets
  ``status_on_error`` (default ``403``, as Envoy's ext_authz) — the filter fails closed.

Metrics (``self.metrics``; the Prometheus series on the admin ``/stats/prometheus``):

- ``auth.allowed``                    -> ``envoy_python_auth_allowed``
- ``auth.denied{reason}``             -> ``envoy_python_auth_denied{reason="unauthenticated"}``,
  ``reason`` one of ``unauthenticated`` (401), ``forbidden`` (403), ``error``
- ``auth.check_ms`` (histogram)       -> ``envoy_python_auth_check_ms_bucket{le=...}``

``TokenTable`` is the other half of the self-contained example (``auth.yaml``): a
stand-in auth service written as a filter that answers every request itself with a
``LocalReply``, from a table of bearer tokens. Put a real service in its place by
changing ``auth_url``.

Filter configuration (the TypedStruct's ``value.config``)::

    auth_url: http://127.0.0.1:10002/check   # required, http only
    timeout_s: 0.5                            # the whole check, connect included
    forward_headers: [authorization]          # request headers the service sees
    status_on_error: 403
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from envoyx.filters import Filter, LocalReply, RequestContext

__all__ = ["AuthFilter", "TokenTable"]

#: The most of the auth service's response head that is read.
MAX_HEAD_BYTES = 16 * 1024


class AuthError(Exception):
    """The auth service could not be asked, or gave no usable answer."""


class AuthFilter(Filter):
    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        url = urlsplit(str(config["auth_url"]))
        if url.scheme != "http" or url.hostname is None:
            raise ValueError(f"auth_url must be an http:// URL, got {config['auth_url']!r}")
        self.host: str = url.hostname
        self.port: int = url.port or 80
        self.path: str = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self.timeout_s = float(config.get("timeout_s", 0.5))
        self.forward = [str(h).lower() for h in config.get("forward_headers", ["authorization"])]
        self.status_on_error = int(config.get("status_on_error", 403))
        # Metric handles, declared once (self.metrics is available from __init__ on).
        self.allowed = self.metrics.counter("auth.allowed")
        self.denied = {
            reason: self.metrics.counter("auth.denied", tags={"reason": reason})
            for reason in ("unauthenticated", "forbidden", "error")
        }
        self.check_ms = self.metrics.histogram("auth.check_ms")

    async def on_request_headers(self, ctx: RequestContext) -> LocalReply | None:
        headers = [("x-original-method", ctx.method), ("x-original-uri", ctx.path)]
        for name in self.forward:
            headers.extend((name, value) for value in ctx.request_headers.get_all(name))
        started = time.monotonic()
        try:
            status, answer = await self.check(headers)
        except AuthError:
            self.denied["error"].inc()
            return LocalReply(self.status_on_error, body=b"auth service unavailable\n")
        finally:
            self.check_ms.record(int((time.monotonic() - started) * 1000))
        if 200 <= status < 300:
            self.allowed.inc()
            user = answer.get("x-user")
            if user is not None:
                ctx.request_headers["x-user"] = user
            elif "x-user" in ctx.request_headers:
                del ctx.request_headers["x-user"]  # never trust a client-sent identity
            return None
        if status == 401:
            self.denied["unauthenticated"].inc()
            challenge = answer.get("www-authenticate", "Bearer")
            return LocalReply(
                401, body=b"unauthenticated\n", headers={"www-authenticate": challenge}
            )
        if status == 403:
            self.denied["forbidden"].inc()
            return LocalReply(403, body=b"forbidden\n")
        self.denied["error"].inc()
        return LocalReply(self.status_on_error, body=b"auth service error\n")

    async def check(self, headers: list[tuple[str, str]]) -> tuple[int, dict[str, str]]:
        """One round trip to the auth service: its status and (lower-cased) headers."""
        if any("\r" in value or "\n" in value for _, value in headers):
            return 401, {}  # cannot be forwarded faithfully: as good as no credentials
        lines = [f"GET {self.path} HTTP/1.1", f"host: {self.host}:{self.port}", "connection: close"]
        lines += [f"{name}: {value}" for name, value in headers]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
        try:
            async with asyncio.timeout(self.timeout_s):
                reader, writer = await asyncio.open_connection(
                    self.host, self.port, limit=MAX_HEAD_BYTES
                )
                try:
                    writer.write(request)
                    await writer.drain()
                    head = await reader.readuntil(b"\r\n\r\n")
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            raise AuthError(f"{self.host}:{self.port}: {e!r}") from e
        return _parse_head(head)


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise AuthError(f"not an HTTP response: {status_line!r}")
    fields: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if sep:
            fields.setdefault(name.strip().lower(), value.strip())
    return int(parts[1]), fields


class TokenTable(Filter):
    """A stand-in auth service: answers every request itself from a token table.

    Config: ``tokens`` maps a bearer token to its user; users in ``forbidden`` are
    known but not allowed (403). No or an unknown token: 401.
    """

    def on_request_headers(self, ctx: RequestContext) -> LocalReply:
        tokens: Mapping[str, str] = self.config.get("tokens", {})
        forbidden: list[str] = self.config.get("forbidden", [])
        scheme, _, token = (ctx.request_headers.get("authorization") or "").partition(" ")
        user = tokens.get(token) if scheme.lower() == "bearer" else None
        if user is None:
            return LocalReply(401, headers={"www-authenticate": 'Bearer realm="example"'})
        if user in forbidden:
            return LocalReply(403)
        return LocalReply(200, headers={"x-user": user})
