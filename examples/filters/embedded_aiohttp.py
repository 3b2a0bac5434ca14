"""An aiohttp app that runs envoyx as its own sidecar, in-process.

The app starts the proxy in its lifespan (``await server.start()`` on startup, stop on
cleanup); the proxy fronts the app, and a Python filter built by the app — attached as
an object with ``envoyx.Server(config, filters={"gate": Gate(state)})``, not imported
from config — shares the app's live state:

- ``/internal/...`` is refused through the proxy (403): it is for the app's own port.
- while the app is in maintenance mode every proxied request gets ``503`` from the
  filter, without reaching the app.
- every other request reaches the app with ``x-via-sidecar: envoyx``.

At runtime the app mounts more upstreams under the proxy with ``server.update(...)``:
``POST /internal/routes {"prefix": "/reports/", "host": "127.0.0.1", "port": 9000}`` on
the app's own port adds a cluster and a route in one atomic update, as an xDS update
would. (The proxy's listener takes its routes by RDS for that reason: routes given
inline in a static listener cannot be replaced.)

    pip install aiohttp
    python examples/filters/embedded_aiohttp.py     # app on :8080, its proxy on :8000
    curl localhost:8000/                            # hello, via envoyx
    curl -X POST localhost:8080/internal/maintenance -d '{"on": true}'
    curl -i localhost:8000/                         # 503 from the filter
    curl localhost:9901/stats/prometheus | grep envoy_python_gate
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

import envoyx
from envoyx.filters import Counter, Filter, LocalReply, RequestContext

__all__ = ["AppState", "Gate", "Settings", "create_app", "main"]

HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
    ".HttpConnectionManager"
)
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
TYPED_STRUCT = "type.googleapis.com/xds.type.v3.TypedStruct"
ROUTES_NAME = "app_routes"

Json = dict[str, Any]


@dataclass
class Settings:
    host: str = "127.0.0.1"
    app_port: int = 8080
    proxy_port: int = 8000
    admin_port: int = 9901


@dataclass
class AppState:
    """What the app and its filter share (the filter runs on envoyx's filter thread;
    plain attribute reads and writes are safe across threads)."""

    maintenance: bool = False
    #: Upstreams mounted at runtime: (prefix, cluster name), in the order added.
    mounts: list[tuple[str, str]] = field(default_factory=list)


class Gate(Filter):
    """Guards the proxied side of the app with the app's live state."""

    def __init__(self, state: AppState) -> None:
        super().__init__(None)
        self.state = state
        self._counters: dict[str, Counter] = {}

    def on_request_headers(self, ctx: RequestContext) -> LocalReply | None:
        if ctx.path.startswith("/internal/"):
            self._count("internal")
            return LocalReply(403, body=b"not through the proxy\n")
        if self.state.maintenance:
            self._count("maintenance")
            return LocalReply(503, body=b"down for maintenance\n", headers={"retry-after": "30"})
        self._count("passed")
        ctx.request_headers["x-via-sidecar"] = "envoyx"
        return None

    def _count(self, outcome: str) -> None:
        # Built lazily: this object exists before the server that gives it its metrics.
        counter = self._counters.get(outcome)
        if counter is None:
            counter = self._counters[outcome] = self.metrics.counter(
                "gate.requests", tags={"outcome": outcome}
            )
        counter.inc()


# -- the proxy's configuration ---------------------------------------------------------


def _address(host: str, port: int) -> Json:
    return {"socket_address": {"address": host, "port_value": port}}


def cluster(name: str, host: str, port: int) -> Json:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(host, port)}}]}],
        },
    }


def bootstrap(settings: Settings) -> Json:
    return {
        "node": {"id": "embedded-aiohttp"},
        "admin": {"address": _address(settings.host, settings.admin_port)},
        "static_resources": {"clusters": [cluster("app", settings.host, settings.app_port)]},
    }


def listener(settings: Settings) -> Json:
    gate = {
        "name": "gate",
        "typed_config": {
            "@type": TYPED_STRUCT,
            "type_url": "envoyx.filters.http.python",
            "value": {"object": "gate"},
        },
    }
    hcm = {
        "@type": HCM,
        "stat_prefix": "sidecar",
        "rds": {"route_config_name": ROUTES_NAME, "config_source": {"ads": {}}},
        "http_filters": [
            gate,
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}},
        ],
    }
    return {
        "name": "sidecar",
        "address": _address(settings.host, settings.proxy_port),
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


def route_config(mounts: list[tuple[str, str]]) -> Json:
    routes: list[Json] = [{"match": {"prefix": p}, "route": {"cluster": c}} for p, c in mounts]
    routes.append({"match": {"prefix": "/"}, "route": {"cluster": "app"}})
    return {
        "name": ROUTES_NAME,
        "virtual_hosts": [{"name": "app", "domains": ["*"], "routes": routes}],
    }


# -- the app ---------------------------------------------------------------------------

SETTINGS = web.AppKey("settings", Settings)
STATE = web.AppKey("state", AppState)
SERVER = web.AppKey("server", envoyx.Server)


async def sidecar(app: web.Application) -> AsyncIterator[None]:
    """The proxy's lifespan, inside the app's: started before the app serves, stopped
    after it stops."""
    settings, state = app[SETTINGS], app[STATE]
    server = envoyx.Server(
        bootstrap(settings), filters={"gate": Gate(state)}, concurrency=1, log_level="warning"
    )
    await server.start()
    try:
        await asyncio.to_thread(
            server.update, listeners=[listener(settings)], routes=[route_config(state.mounts)]
        )
        app[SERVER] = server
        yield
    finally:
        await asyncio.to_thread(server.stop)


async def hello(request: web.Request) -> web.Response:
    via = request.headers.get("x-via-sidecar", "direct")
    return web.Response(text=f"hello from aiohttp, via {via}\n")


async def set_maintenance(request: web.Request) -> web.Response:
    body = await request.json()
    request.app[STATE].maintenance = bool(body.get("on"))
    return web.json_response({"maintenance": request.app[STATE].maintenance})


async def add_route(request: web.Request) -> web.Response:
    """Mount an upstream under ``prefix`` in the proxy: one cluster, one route."""
    body = await request.json()
    prefix, host, port = str(body["prefix"]), str(body["host"]), int(body["port"])
    if not prefix.startswith("/"):
        raise web.HTTPBadRequest(text="prefix must start with /\n")
    state, server = request.app[STATE], request.app[SERVER]
    name = f"mount{len(state.mounts)}"
    mounts = [*state.mounts, (prefix, name)]
    try:
        await asyncio.to_thread(
            server.update, clusters=[cluster(name, host, port)], routes=[route_config(mounts)]
        )
    except envoyx.ConfigError as e:
        raise web.HTTPBadRequest(text=f"{e}\n") from e
    state.mounts = mounts
    return web.json_response({"prefix": prefix, "cluster": name})


def create_app(settings: Settings | None = None) -> web.Application:
    app = web.Application()
    app[SETTINGS] = settings or Settings()
    app[STATE] = AppState()
    app.cleanup_ctx.append(sidecar)
    app.router.add_get("/", hello)
    app.router.add_post("/internal/maintenance", set_maintenance)
    app.router.add_post("/internal/routes", add_route)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="an aiohttp app with envoyx as its sidecar")
    defaults = Settings()
    parser.add_argument("--app-port", type=int, default=defaults.app_port)
    parser.add_argument("--proxy-port", type=int, default=defaults.proxy_port)
    parser.add_argument("--admin-port", type=int, default=defaults.admin_port)
    args = parser.parse_args(argv)
    settings = Settings(
        app_port=args.app_port, proxy_port=args.proxy_port, admin_port=args.admin_port
    )
    web.run_app(create_app(settings), host=settings.host, port=settings.app_port)


if __name__ == "__main__":
    main()
