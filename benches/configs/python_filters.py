"""The Python filters of benches/filters.py; envoyx imports this module by name
(``python_filters``, with this directory on its PYTHONPATH)."""

from __future__ import annotations

import asyncio

from envoyx.filters import Filter, RequestContext


class NoOp(Filter):
    """Overrides one hook and does nothing: the fixed cost of a Python filter."""

    def on_request_headers(self, ctx: RequestContext) -> None:
        return None


class AddHeaders(Filter):
    """Adds a request header and a response header, as the Lua script of
    benches/filters.py does for Envoy."""

    def on_request_headers(self, ctx: RequestContext) -> None:
        ctx.request_headers.add("x-bench", "1")

    def on_response_headers(self, ctx: RequestContext) -> None:
        assert ctx.response_headers is not None
        ctx.response_headers.add("x-bench-resp", "1")


class AsyncNoOp(Filter):
    """An ``async def`` hook that yields to the loop once: the cost of a task."""

    async def on_request_headers(self, ctx: RequestContext) -> None:
        await asyncio.sleep(0)


class AsyncAddHeaders(Filter):
    """AddHeaders with ``async def`` hooks that never suspend: what an async hook
    costs when it does not wait for anything."""

    async def on_request_headers(self, ctx: RequestContext) -> None:
        ctx.request_headers.add("x-bench", "1")

    async def on_response_headers(self, ctx: RequestContext) -> None:
        assert ctx.response_headers is not None
        ctx.response_headers.add("x-bench-resp", "1")
