"""The Python filter examples (examples/filters/), run end-to-end as a user runs them.

Each YAML example is started with ``python -m envoyx -c <file>`` (``PYTHONPATH`` names
the examples' folder, as their README says), with its fixed ports rewritten to free
ones and, where a test says so, its clusters and filter config pointed at real servers:
the HTTP/1.1 and gRPC upstreams of ``tests/support`` and a small auth service here.
The embedded example runs in this process: its aiohttp app starts envoyx as its sidecar.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import httpx
import pytest
import yaml

from support.proxy import ProxyProcess
from support.upstreams import GRPC_SERVICE, STREAM_METHOD, UNARY_METHOD, GrpcUpstream, HttpUpstream
from support.wait import RefusedPort, free_port, until

StartProxy = Callable[..., ProxyProcess]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "filters"


# -- loading an example -----------------------------------------------------------------


def load_example(name: str) -> dict[str, Any]:
    """The example's bootstrap with every fixed port (admin, listeners, endpoints, and
    ``127.0.0.1:<port>`` in strings such as URLs) moved to a free one, consistently."""
    doc: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    ports: dict[int, int] = {}

    def new_port(old: int) -> int:
        if old not in ports:
            ports[old] = free_port()
        return ports[old]

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "port_value" in node and isinstance(node["port_value"], int):
                node["port_value"] = new_port(node["port_value"])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, str):
            return re.sub(r"127\.0\.0\.1:(\d+)", lambda m: f"127.0.0.1:{new_port(int(m[1]))}", node)
        return node

    result: dict[str, Any] = walk(doc)
    return result


def hcm(doc: dict[str, Any], listener: str) -> dict[str, Any]:
    for lis in doc["static_resources"]["listeners"]:
        if lis["name"] == listener:
            typed: dict[str, Any] = lis["filter_chains"][0]["filters"][0]["typed_config"]
            return typed
    raise KeyError(listener)


def filter_value(doc: dict[str, Any], listener: str, name: str) -> dict[str, Any]:
    """The TypedStruct ``value`` of the Python filter ``name`` ({module, class, config})."""
    for flt in hcm(doc, listener)["http_filters"]:
        if flt["name"] == name:
            value: dict[str, Any] = flt["typed_config"]["value"]
            return value
    raise KeyError(name)


def point_cluster(doc: dict[str, Any], name: str, address: tuple[str, int]) -> None:
    for c in doc["static_resources"]["clusters"]:
        if c["name"] == name:
            sa = c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
            sa["socket_address"] = {"address": address[0], "port_value": address[1]}
            return
    raise KeyError(name)


@pytest.fixture
def run_example(
    start_envoyx: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> Callable[[dict[str, Any]], ProxyProcess]:
    """Start ``python -m envoyx`` on a bootstrap, the examples' modules importable."""
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(EXAMPLES), path])))
    return start_envoyx


def prometheus(proxy: ProxyProcess) -> str:
    status, _, body = proxy.admin("/stats/prometheus")
    assert status == 200, body[:200]
    return body.decode()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def series(text: str, name: str, **labels: str) -> float | None:
    """The value of the Prometheus sample ``name`` with exactly ``labels``, or None."""
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m[1] == name and dict(_LABEL.findall(m[2] or "")) == labels:
            return float(m[3])
    return None


def wait_series(proxy: ProxyProcess, expected: dict[tuple[str, frozenset[Any]], float]) -> str:
    """Poll /stats/prometheus until every (name, labels) has its value; return the text."""
    text = ""

    def check() -> bool:
        nonlocal text
        text = prometheus(proxy)
        return all(series(text, n, **dict(lab)) == v for (n, lab), v in expected.items())

    try:
        until(check, timeout=10, what="prometheus series")
    except AssertionError:
        seen = {(n, lab): series(text, n, **dict(lab)) for (n, lab) in expected}
        raise AssertionError(f"expected {expected}, saw {seen}\n{text}") from None
    return text


def key(name: str, **labels: str) -> tuple[str, frozenset[Any]]:
    return (name, frozenset(labels.items()))


# -- auth -------------------------------------------------------------------------------


class AuthService:
    """An HTTP auth service: ``alice-token`` is allowed (x-user: alice),
    ``mallory-token`` forbidden, ``slow-token`` answers after 3 s, ``broken-token`` 500,
    anything else 401. Records the headers of every check."""

    def __init__(self) -> None:
        self.checks: list[dict[str, str]] = []
        checks = self.checks

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                headers[":path"] = self.path
                checks.append(headers)
                token = headers.get("authorization", "").removeprefix("Bearer ")
                if token == "slow-token":
                    time.sleep(3)
                status, extra = {
                    "alice-token": (200, {"x-user": "alice"}),
                    "slow-token": (200, {"x-user": "slow"}),
                    "mallory-token": (403, {}),
                    "broken-token": (500, {}),
                }.get(token, (401, {"www-authenticate": 'Bearer realm="test"'}))
                self.send_response(status)
                for k, v in extra.items():
                    self.send_header(k, v)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/check"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def auth_service() -> Iterator[AuthService]:
    service = AuthService()
    yield service
    service.stop()


@pytest.fixture
def auth_proxy(
    run_example: Callable[[dict[str, Any]], ProxyProcess],
    auth_service: AuthService,
    http_upstream: HttpUpstream,
) -> ProxyProcess:
    doc = load_example("auth.yaml")
    filter_value(doc, "front", "auth")["config"]["auth_url"] = auth_service.url
    point_cluster(doc, "backend", http_upstream.address)
    return run_example(doc)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_auth_allows_a_valid_token_and_sets_x_user(
    auth_proxy: ProxyProcess, auth_service: AuthService
) -> None:
    resp = httpx.get(
        auth_proxy.url("/orders?page=2"),
        headers={**bearer("alice-token"), "x-user": "mallory"},  # a spoofed identity
        timeout=5,
    )
    assert resp.status_code == 200, resp.text
    seen = resp.json()
    assert [v for k, v in seen["headers"] if k == "x-user"] == ["alice"]
    assert seen["path"] == "/orders?page=2"
    check = auth_service.checks[-1]
    assert check[":path"] == "/check"
    assert check["authorization"] == "Bearer alice-token"
    assert check["x-original-method"] == "GET"
    assert check["x-original-uri"] == "/orders?page=2"


def test_auth_denies_with_401_and_403_before_the_upstream(
    auth_proxy: ProxyProcess, http_upstream: HttpUpstream
) -> None:
    none = httpx.get(auth_proxy.url("/denied-401"), timeout=5)
    assert none.status_code == 401
    assert none.headers["www-authenticate"] == 'Bearer realm="test"'
    forbidden = httpx.get(auth_proxy.url("/denied-403"), headers=bearer("mallory-token"), timeout=5)
    assert forbidden.status_code == 403
    assert httpx.get(auth_proxy.url("/ok"), headers=bearer("alice-token"), timeout=5).is_success
    assert not [r for r in http_upstream.requests if r.path.startswith("/denied-")]
    wait_series(
        auth_proxy,
        {
            key("envoy_python_auth_allowed"): 1,
            key("envoy_python_auth_denied", reason="unauthenticated"): 1,
            key("envoy_python_auth_denied", reason="forbidden"): 1,
            key("envoy_python_auth_check_ms_count"): 3,
        },
    )


def test_auth_fails_closed_and_the_public_route_skips_the_check(
    run_example: Callable[[dict[str, Any]], ProxyProcess],
    auth_service: AuthService,
    http_upstream: HttpUpstream,
    refused_port: RefusedPort,
) -> None:
    doc = load_example("auth.yaml")
    point_cluster(doc, "backend", http_upstream.address)
    doc_down = load_example("auth.yaml")
    point_cluster(doc_down, "backend", http_upstream.address)
    filter_value(doc, "front", "auth")["config"]["auth_url"] = auth_service.url
    filter_value(doc_down, "front", "auth")["config"]["auth_url"] = (
        f"http://127.0.0.1:{refused_port.port}/check"
    )
    proxy, proxy_down = run_example(doc), run_example(doc_down)

    started = time.monotonic()
    slow = httpx.get(proxy.url("/x"), headers=bearer("slow-token"), timeout=5)
    assert (slow.status_code, slow.text) == (403, "auth service unavailable\n")
    assert time.monotonic() - started < 2.5  # timeout_s 0.5, not the service's 3 s
    assert httpx.get(proxy.url("/x"), headers=bearer("broken-token"), timeout=5).status_code == 403
    down = httpx.get(proxy_down.url("/x"), headers=bearer("alice-token"), timeout=5)
    assert (down.status_code, down.text) == (403, "auth service unavailable\n")

    checks_before = len(auth_service.checks)
    public = httpx.get(proxy.url("/public/page"), timeout=5)  # no credentials at all
    assert public.status_code == 200
    assert public.json()["path"] == "/public/page"
    assert len(auth_service.checks) == checks_before
    wait_series(proxy, {key("envoy_python_auth_denied", reason="error"): 2})
    wait_series(proxy_down, {key("envoy_python_auth_denied", reason="error"): 1})


def test_auth_example_runs_as_shipped(
    run_example: Callable[[dict[str, Any]], ProxyProcess],
) -> None:
    """Only the ports moved: the stand-in backend and auth service of the file serve."""
    proxy = run_example(load_example("auth.yaml"))
    assert httpx.get(proxy.url("/hello"), timeout=5).status_code == 401
    assert (
        httpx.get(proxy.url("/hello"), headers=bearer("mallory-token"), timeout=5).status_code
        == 403
    )
    ok = httpx.get(proxy.url("/hello"), headers=bearer("alice-token"), timeout=5)
    assert (ok.status_code, ok.text) == (200, "Hello from the backend\n")
    until(
        lambda: "backend: /hello x-user=alice" in proxy.log_text(),
        timeout=5,
        what="the backend's access log line",
    )


# -- canary -----------------------------------------------------------------------------


@pytest.fixture
def canary_proxy(
    run_example: Callable[[dict[str, Any]], ProxyProcess],
    http_upstreams: dict[str, HttpUpstream],
) -> ProxyProcess:
    doc = load_example("canary.yaml")
    point_cluster(doc, "stable", http_upstreams["a"].address)
    point_cluster(doc, "canary", http_upstreams["b"].address)
    return run_example(doc)


def served_by(proxy: ProxyProcess, path: str, **headers: str) -> str:
    resp = httpx.get(proxy.url(path), headers=headers, timeout=5)
    assert resp.status_code == 200, resp.text
    return {"a": "stable", "b": "canary"}[resp.headers["x-upstream"]]


def test_canary_opt_in_by_header_or_cookie(canary_proxy: ProxyProcess) -> None:
    assert served_by(canary_proxy, "/app") == "stable"
    assert served_by(canary_proxy, "/app", **{"x-canary": "1"}) == "canary"
    assert served_by(canary_proxy, "/app", **{"x-canary": "0"}) == "stable"
    assert served_by(canary_proxy, "/app", cookie="session=abc; canary=1") == "canary"
    assert served_by(canary_proxy, "/app", cookie="session=abc; canary=0") == "stable"
    assert served_by(canary_proxy, "/app", cookie="notcanary=1") == "stable"
    wait_series(canary_proxy, {key("envoy_python_canary_requests", cluster="canary"): 2})


def test_canary_per_route_override_and_disabled_route(canary_proxy: ProxyProcess) -> None:
    # /checkout: its route's config replaces the filter's: a header of its own, no cookie.
    assert served_by(canary_proxy, "/checkout", cookie="canary=1") == "stable"
    assert served_by(canary_proxy, "/checkout", **{"x-canary": "1"}) == "stable"
    assert served_by(canary_proxy, "/checkout", **{"x-canary-checkout": "1"}) == "canary"
    # /healthz: the filter is disabled on the route.
    assert served_by(canary_proxy, "/healthz", **{"x-canary": "1"}) == "stable"
    stats = canary_proxy.wait_stat("cluster.canary.upstream_rq_total", 1)
    assert stats["python.canary.requests.cluster.canary"] == 1


# -- rpc metrics ------------------------------------------------------------------------


@pytest.fixture
def rpc_proxy_factory(
    run_example: Callable[[dict[str, Any]], ProxyProcess], grpc_upstream: GrpcUpstream
) -> Callable[..., ProxyProcess]:
    def start(**config: Any) -> ProxyProcess:
        doc = load_example("rpc_metrics.yaml")
        point_cluster(doc, "grpc_backend", grpc_upstream.address)
        filter_value(doc, "grpc_front", "rpc_metrics")["config"].update(config)
        return run_example(doc)

    return start


def grpc_call(proxy: ProxyProcess, method: str, request: bytes, code: int | None = None) -> str:
    host, port = proxy.listener_address()
    metadata = (("x-test-grpc-code", str(code)),) if code is not None else ()
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            if method == STREAM_METHOD:
                list(channel.unary_stream(method)(request, timeout=10))
            else:
                channel.unary_unary(method)(request, timeout=10, metadata=metadata)
        except grpc.RpcError as e:
            return str(e.code().name)
    return "OK"


def test_rpc_metrics_by_method_and_grpc_status(
    rpc_proxy_factory: Callable[..., ProxyProcess],
) -> None:
    proxy = rpc_proxy_factory()
    svc = GRPC_SERVICE
    assert [grpc_call(proxy, UNARY_METHOD, b"hi") for _ in range(3)] == ["OK"] * 3
    assert [grpc_call(proxy, UNARY_METHOD, b"x", code=5) for _ in range(2)] == ["NOT_FOUND"] * 2
    assert grpc_call(proxy, STREAM_METHOD, b"3") == "OK"
    # A method the server does not have: a trailers-only response (grpc-status in headers).
    assert grpc_call(proxy, f"/{svc}/Nope", b"") == "UNIMPLEMENTED"
    wait_series(
        proxy,
        {
            key("envoy_python_rpc_requests", service=svc, method="Unary"): 5,
            key("envoy_python_rpc_requests", service=svc, method="Stream"): 1,
            key("envoy_python_rpc_requests", service=svc, method="Nope"): 1,
            key("envoy_python_rpc_responses", service=svc, method="Unary", grpc_code="OK"): 3,
            key(
                "envoy_python_rpc_responses", service=svc, method="Unary", grpc_code="NOT_FOUND"
            ): 2,
            key("envoy_python_rpc_responses", service=svc, method="Stream", grpc_code="OK"): 1,
            key(
                "envoy_python_rpc_responses", service=svc, method="Nope", grpc_code="UNIMPLEMENTED"
            ): 1,
            key("envoy_python_rpc_duration_ms_count", service=svc, method="Unary"): 5,
            key("envoy_python_rpc_in_flight", service=svc): 0,
        },
    )
    stats = proxy.stats()
    assert stats[f"python.rpc.requests.service.{svc}.method.Unary"] == 5


def test_rpc_metrics_skip_plain_http_and_cap_method_names(
    rpc_proxy_factory: Callable[..., ProxyProcess],
) -> None:
    proxy = rpc_proxy_factory(max_methods=1)
    svc = GRPC_SERVICE
    assert grpc_call(proxy, UNARY_METHOD, b"a") == "OK"
    assert grpc_call(proxy, f"/{svc}/Invented1", b"") == "UNIMPLEMENTED"
    assert grpc_call(proxy, f"/{svc}/Invented2", b"") == "UNIMPLEMENTED"
    # Not gRPC (whatever the server answers): not counted.
    httpx.post(proxy.url(UNARY_METHOD), content=b"x", headers={"content-type": "text/plain"})
    text = wait_series(
        proxy,
        {
            key("envoy_python_rpc_requests", service=svc, method="Unary"): 1,
            key("envoy_python_rpc_requests", service="other", method="other"): 2,
            key(
                "envoy_python_rpc_responses",
                service="other",
                method="other",
                grpc_code="UNIMPLEMENTED",
            ): 2,
        },
    )
    assert "Invented" not in text


# -- embedded aiohttp -------------------------------------------------------------------


def load_embedded() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "embedded_aiohttp", EXAMPLES / "embedded_aiohttp.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def embedded() -> ModuleType:
    return load_embedded()


async def run_app(
    embedded: ModuleType, scenario: Callable[[Any, httpx.AsyncClient], Any]
) -> tuple[str, int]:
    """Start the app (and so its sidecar) on free ports, run ``scenario(settings,
    client)``, clean up; return the proxy's address."""
    from aiohttp import web

    settings = embedded.Settings(
        app_port=free_port(), proxy_port=free_port(), admin_port=free_port()
    )
    runner = web.AppRunner(embedded.create_app(settings), access_log=None)
    await runner.setup()  # runs the app's lifespan: the sidecar starts here
    try:
        await web.TCPSite(runner, settings.host, settings.app_port).start()
        async with httpx.AsyncClient(timeout=5) as client:
            await scenario(settings, client)
    finally:
        await runner.cleanup()  # and stops here
    return settings.host, settings.proxy_port


def test_embedded_app_serves_through_its_sidecar(embedded: ModuleType) -> None:
    async def scenario(s: Any, client: httpx.AsyncClient) -> None:
        proxy, app = f"http://{s.host}:{s.proxy_port}", f"http://{s.host}:{s.app_port}"
        assert (await client.get(f"{proxy}/")).text == "hello from aiohttp, via envoyx\n"
        assert (await client.get(f"{app}/")).text == "hello from aiohttp, via direct\n"
        blocked = await client.post(f"{proxy}/internal/maintenance", json={"on": True})
        assert blocked.status_code == 403
        assert (await client.post(f"{app}/internal/maintenance", json={"on": True})).is_success
        down = await client.get(f"{proxy}/")
        assert (down.status_code, down.headers["retry-after"]) == (503, "30")
        assert (await client.post(f"{app}/internal/maintenance", json={"on": False})).is_success
        assert (await client.get(f"{proxy}/")).status_code == 200
        metrics = (await client.get(f"http://{s.host}:{s.admin_port}/stats/prometheus")).text
        assert series(metrics, "envoy_python_gate_requests", outcome="passed") == 2
        assert series(metrics, "envoy_python_gate_requests", outcome="maintenance") == 1
        assert series(metrics, "envoy_python_gate_requests", outcome="internal") == 1

    host, port = asyncio.run(run_app(embedded, scenario))
    with pytest.raises(httpx.ConnectError):  # the sidecar stopped with the app
        httpx.get(f"http://{host}:{port}/", timeout=2)


def test_embedded_app_adds_a_route_at_runtime(
    embedded: ModuleType, http_upstream: HttpUpstream
) -> None:
    async def scenario(s: Any, client: httpx.AsyncClient) -> None:
        proxy, app = f"http://{s.host}:{s.proxy_port}", f"http://{s.host}:{s.app_port}"
        assert (await client.get(f"{proxy}/reports/q1")).status_code == 404  # the app's
        mount = {"prefix": "/reports/", "host": http_upstream.host, "port": http_upstream.port}
        added = await client.post(f"{app}/internal/routes", json=mount)
        assert added.json() == {"prefix": "/reports/", "cluster": "mount0"}
        resp = await client.get(f"{proxy}/reports/q1")
        assert (resp.status_code, resp.headers["x-upstream"]) == (200, http_upstream.name)
        seen = json.loads(resp.content)
        assert ["x-via-sidecar", "envoyx"] in seen["headers"]  # the filter runs there too
        assert (await client.get(f"{proxy}/")).text == "hello from aiohttp, via envoyx\n"

    asyncio.run(run_app(embedded, scenario))
