"""Python filters equivalent to the Lua scripts of tests/test_filters_differential.py.

Each class here is the envoyx side of one Lua script that the real Envoy runs with
``envoy.filters.http.lua``; its docstring names the script's constant in the test, and
the two say the same thing line for line. The envoyx
processes of the differential tests import this module as
``filters_fixtures.lua_equivalents`` (the test puts ``tests/`` on their PYTHONPATH).

Lua's ``headers():remove(name)`` of an absent header is a no-op; ``del headers[name]``
on a mapping raises KeyError, so the equivalents suppress it.
"""

from __future__ import annotations

import asyncio
import contextlib

from envoyx.filters import Filter, LocalReply, RequestContext

TOKEN = "s3cret"


class RequestHeaders(Filter):
    """The envoyx side of ``LUA_REQUEST_HEADERS``."""

    def on_request_headers(self, ctx: RequestContext) -> None:
        headers = ctx.request_headers
        headers.add("x-added", "lua")
        headers["x-replace"] = "new"
        with contextlib.suppress(KeyError):
            del headers["x-remove"]


class AsyncRequestHeaders(Filter):
    """The same as :class:`RequestHeaders`, as an ``async def`` hook that yields to the
    loop between the mutations (Lua's script is the same as RequestHeaders')."""

    async def on_request_headers(self, ctx: RequestContext) -> None:
        headers = ctx.request_headers
        headers.add("x-added", "lua")
        await asyncio.sleep(0)
        headers["x-replace"] = "new"
        await asyncio.sleep(0)
        with contextlib.suppress(KeyError):
            del headers["x-remove"]


class ResponseHeaders(Filter):
    """The envoyx side of ``LUA_RESPONSE_HEADERS``."""

    def on_response_headers(self, ctx: RequestContext) -> None:
        headers = ctx.response_headers
        assert headers is not None
        headers.add("x-resp-added", "lua")
        headers.add("x-status-seen", str(ctx.status))
        headers["content-type"] = "text/x-replaced"
        with contextlib.suppress(KeyError):
            del headers["x-upstream"]


class Gate(Filter):
    """The envoyx side of ``LUA_GATE``."""

    def on_request_headers(self, ctx: RequestContext) -> LocalReply | None:
        if ctx.path == "/throttled":
            return LocalReply(429, headers={"retry-after": "7"})
        if ctx.request_headers.get("x-token") != TOKEN:
            return LocalReply(403, body=b"denied\n", headers={"x-denied-by": "lua"})
        return None


class Tag(Filter):
    """The envoyx side of ``LUA_TAG``."""

    def on_request_headers(self, ctx: RequestContext) -> None:
        ctx.request_headers.add("x-tag", "lua")

    def on_response_headers(self, ctx: RequestContext) -> None:
        assert ctx.response_headers is not None
        ctx.response_headers.add("x-tag-resp", "lua")


class OrderFirst(Filter):
    """The envoyx side of ``LUA_ORDER_FIRST``."""

    def on_request_headers(self, ctx: RequestContext) -> None:
        ctx.request_headers.add("x-order", "first")

    def on_response_headers(self, ctx: RequestContext) -> None:
        assert ctx.response_headers is not None
        ctx.response_headers.add("x-resp-order", "first")


class OrderSecond(Filter):
    """The envoyx side of ``LUA_ORDER_SECOND``."""

    def on_request_headers(self, ctx: RequestContext) -> None:
        headers = ctx.request_headers
        headers["x-order-seen"] = headers.get("x-order") or "none"
        headers.add("x-order", "second")

    def on_response_headers(self, ctx: RequestContext) -> None:
        headers = ctx.response_headers
        assert headers is not None
        headers["x-resp-order-seen"] = headers.get("x-resp-order") or "none"
        headers.add("x-resp-order", "second")
