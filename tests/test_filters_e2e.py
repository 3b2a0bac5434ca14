"""Python HTTP filters end to end (docs/filters.md): a real envoyx run in-process with
``envoyx.Server``, real upstreams and real clients (httpx on HTTP/1.1 and HTTP/2, grpcio,
raw sockets and the ``h2`` state machine where request trailers are needed).

The filters live in ``tests/filters_fixtures/sample_filters.py`` and are named in the
configs as ``module: filters_fixtures.sample_filters``; since envoyx runs in this process,
module-level records there (``LOGS``, ``GATES``, ...) are what the filters observed.
Hook tests run each filter twice: as written (sync) and as its ``Async<Name>`` twin.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from filters_fixtures import sample_filters
from filters_fixtures.h2_peers import H2TrailersUpstream, h2_request

import envoyx
import envoyx.filters
from support.bootstrap import ROUTER_TYPE, bootstrap, cluster, http_listener, virtual_host
from support.clients import _Reader, read_response
from support.upstreams import STREAM_METHOD, UNARY_METHOD, GrpcUpstream, HttpUpstream, pattern
from support.wait import until

Json = dict[str, Any]

MODULE = "filters_fixtures.sample_filters"
TYPED_STRUCT = "type.googleapis.com/xds.type.v3.TypedStruct"
PYTHON_FILTER = "envoyx.filters.http.python"
FILTER_CONFIG = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
HCM_PATH = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"
ERRORS = "http.ingress_http.python.errors"
TIMEOUTS = "http.ingress_http.python.timeouts"

SYNC_ASYNC = pytest.mark.parametrize("flavor", ["sync", "async"])


def cls_name(name: str, flavor: str) -> str:
    return name if flavor == "sync" else f"Async{name}"


# -- config builders (Envoy's own spelling) --------------------------------------------


def py_filter(name: str, cls: str, *, config: Any = None, **settings: Any) -> Json:
    """An ``envoyx.filters.http.python`` HTTP filter of class ``cls`` of the fixtures."""
    value: Json = {"module": MODULE, "class": cls}
    if config is not None:
        value["config"] = config
    value.update(settings)
    return typed_struct_filter(name, value)


def typed_struct_filter(name: str, value: Json) -> Json:
    return {
        "name": name,
        "typed_config": {"@type": TYPED_STRUCT, "type_url": PYTHON_FILTER, "value": value},
    }


def router() -> Json:
    return {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}


def override(config: Any) -> Json:
    """A ``typed_per_filter_config`` entry replacing a Python filter's ``config``."""
    return {"@type": TYPED_STRUCT, "type_url": PYTHON_FILTER, "value": {"config": config}}


DISABLED: Json = {"@type": FILTER_CONFIG, "disabled": True}


def rt(
    prefix: str,
    cluster_name: str = "backend",
    *,
    name: str | None = None,
    per_filter: Json | None = None,
) -> Json:
    r: Json = {"match": {"prefix": prefix}, "route": {"cluster": cluster_name}}
    if name is not None:
        r["name"] = name
    if per_filter is not None:
        r["typed_per_filter_config"] = per_filter
    return r


def proxy_config(
    http_filters: list[Json],
    clusters: list[Json],
    *,
    routes: list[Json] | None = None,
    virtual_hosts: list[Json] | None = None,
    with_router: bool = True,
) -> Json:
    """One listener on port 0 (``ingress``, stat prefix ``ingress_http``), admin on 0."""
    if virtual_hosts is None:
        virtual_hosts = [virtual_host("all", ["*"], routes or [rt("/")])]
    listener = http_listener(port=0, virtual_hosts=virtual_hosts)
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [*http_filters, router()] if with_router else http_filters
    return bootstrap(admin_port=0, listeners=[listener], clusters=clusters)


# -- the running proxy -----------------------------------------------------------------


@dataclass
class Proxy:
    server: envoyx.Server

    @property
    def address(self) -> tuple[str, int]:
        return self.server.listener_addresses()["ingress"]

    def url(self, path: str = "/") -> str:
        host, port = self.address
        return f"http://{host}:{port}{path}"

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url(path), timeout=5, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.post(self.url(path), timeout=5, **kw)

    def stat(self, name: str) -> int:
        return self.server.stats().get(name, 0)

    def admin(self, path: str) -> httpx.Response:
        address = self.server.admin_address()
        assert address is not None
        host, port = address
        return httpx.get(f"http://{host}:{port}{path}", timeout=5)


Serve = Callable[..., Proxy]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Start an in-process ``envoyx.Server`` (one worker); stopped at teardown."""
    servers: list[envoyx.Server] = []

    def start(config: Json, filters: dict[str, Any] | None = None) -> Proxy:
        kwargs: Json = {} if filters is None else {"filters": filters}
        server = envoyx.Server(config, concurrency=1, **kwargs)
        servers.append(server)
        server.start()
        return Proxy(server)

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def h2t_upstream() -> Iterator[H2TrailersUpstream]:
    up = H2TrailersUpstream().start()
    yield up
    up.stop()


def backend(up: HttpUpstream, name: str = "backend") -> Json:
    return cluster(name, [up.address])


def seen_headers(resp: httpx.Response) -> dict[str, list[str]]:
    """The request headers the echoing upstream received, by name."""
    assert resp.status_code == 200, (resp.status_code, resp.text[:300])
    out: dict[str, list[str]] = {}
    for name, value in resp.json()["headers"]:
        out.setdefault(name, []).append(value)
    return out


def served(up: HttpUpstream, path: str) -> int:
    return sum(1 for r in up.requests if r.path == path)


def unique(prefix: str) -> str:
    return f"{prefix}/{uuid.uuid4().hex}"


# -- request headers -------------------------------------------------------------------


@SYNC_ASYNC
def test_request_headers_are_edited_before_the_upstream(
    serve: Serve, http_upstream: HttpUpstream, flavor: str
) -> None:
    proxy = serve(
        proxy_config([py_filter("edit", cls_name("HeaderEdit", flavor))], [backend(http_upstream)])
    )
    resp = proxy.get(
        "/edit",
        headers=[("x-replaced", "old"), ("x-multi", "one"), ("x-remove", "x"), ("x-client", "c")],
    )
    seen = seen_headers(resp)
    assert seen["x-replaced"] == ["new"]
    assert seen["x-multi"] == ["one", "two"]
    assert "x-remove" not in seen
    assert seen["x-added"] == ["one,two"]
    assert seen["x-seen-get"] == ["c"]
    assert seen["x-remove-gone"] == ["True"]
    assert seen["x-pseudo-in-map"] == ["False"]  # pseudo-headers are not in the map


@SYNC_ASYNC
def test_local_reply_from_request_headers(
    serve: Serve, http_upstream: HttpUpstream, flavor: str
) -> None:
    proxy = serve(
        proxy_config(
            [py_filter("deny", cls_name("DenyLocalReply", flavor))], [backend(http_upstream)]
        )
    )
    path = unique("/deny")
    denied = proxy.get(path, headers={"x-deny": "1"})
    assert denied.status_code == 403
    assert denied.content == b"denied\n"
    assert denied.headers["x-denied-by"] == "python"
    assert denied.headers["content-length"] == str(len(b"denied\n"))
    # The upstream was skipped, and response hooks do not run on the filter's own reply.
    assert served(http_upstream, path) == 0
    assert "x-response-hook" not in denied.headers

    allowed = proxy.get(path)
    assert allowed.status_code == 200
    assert allowed.headers["x-response-hook"] == "ran"
    assert served(http_upstream, path) == 1


# -- request body and trailers ---------------------------------------------------------


@SYNC_ASYNC
def test_request_body_is_replaced_or_appended(
    serve: Serve, http_upstream: HttpUpstream, flavor: str
) -> None:
    proxy = serve(
        proxy_config([py_filter("body", cls_name("BodyEdit", flavor))], [backend(http_upstream)])
    )
    original = b"hello world"
    cases = [
        ("replace", original, b"replaced:11"),
        ("append", original, original + b"+appended"),
        ("none", original, original),
        # A chunked request body is buffered too: the upstream gets the edited bytes.
        ("append", iter([b"hello ", b"world"]), original + b"+appended"),
    ]
    for op, content, expected in cases:
        resp = proxy.post("/body", content=content, headers={"x-body-op": op})
        echo = resp.json()
        assert resp.status_code == 200, resp.text
        assert echo["body_length"] == len(expected), op
        assert echo["body_sha256"] == hashlib.sha256(expected).hexdigest(), op
        length = seen_headers(resp).get("content-length")
        if isinstance(content, bytes):
            assert length == [str(len(expected))], op
        else:  # chunked in: a content-length, if the proxy sets one, must be right
            assert length in (None, [str(len(expected))]), op


@SYNC_ASYNC
def test_request_trailers_are_seen_and_edited(
    serve: Serve, h2t_upstream: H2TrailersUpstream, flavor: str
) -> None:
    """HTTP/2 both sides: the client sends trailers, the filter edits them, the upstream
    receives the edited trailers; a LocalReply from the trailers hook stops the request."""
    proxy = serve(
        proxy_config(
            [py_filter("trailers", cls_name("RequestTrailers", flavor))],
            [cluster("backend", [h2t_upstream.address], http2=True)],
        )
    )
    path = unique("/trailers")
    resp = h2_request(proxy.address, path, body=b"abc", trailers=[("x-t", "1")])
    assert resp.status == 200, resp
    assert json.loads(resp.header("x-seen-trailers") or "null") == [["x-t", "1"]]
    (seen,) = h2t_upstream.seen(path)
    assert seen.body == b"abc"
    assert seen.trailer("x-t") == "modified-1"
    assert seen.trailer("x-trailer-added") == "py"

    denied_path = unique("/trailers-denied")
    denied = h2_request(proxy.address, denied_path, body=b"abc", trailers=[("x-deny-trailer", "1")])
    assert denied.status == 403
    assert denied.body == b"trailer denied"
    assert h2t_upstream.seen(denied_path) == []


# -- response headers, body, trailers --------------------------------------------------


@SYNC_ASYNC
def test_response_headers_are_edited_or_replaced(
    serve: Serve, http_upstream: HttpUpstream, flavor: str
) -> None:
    proxy = serve(
        proxy_config(
            [py_filter("resp", cls_name("ResponseHeaderEdit", flavor))], [backend(http_upstream)]
        )
    )
    resp = proxy.get("/resp", headers={"x-test-status": "201"})
    assert resp.status_code == 201
    assert resp.headers["x-status-seen"] == "201"
    assert "x-upstream" not in resp.headers
    assert resp.headers.get_list("x-resp-multi") == ["a", "b"]
    assert resp.json()["path"] == "/resp"

    replaced = proxy.get("/resp", headers={"x-test-status": "203"})
    assert replaced.status_code == 418
    assert replaced.content == b"replaced by python"
    assert replaced.headers["x-replaced"] == "yes"
    assert replaced.headers["content-length"] == str(len(b"replaced by python"))
    assert "x-upstream" not in replaced.headers


@SYNC_ASYNC
def test_response_body_is_replaced_or_appended(
    serve: Serve, http_upstream: HttpUpstream, flavor: str
) -> None:
    proxy = serve(
        proxy_config(
            [py_filter("resp-body", cls_name("ResponseBodyEdit", flavor))],
            [backend(http_upstream)],
        )
    )
    upstream_body = b"".join(pattern(1000))
    cases = [  # the upstream's status tells the filter what to do
        (201, {}, b"new response body"),
        (202, {}, upstream_body + b"<tail>"),
        (202, {"x-test-response-chunked": "1"}, upstream_body + b"<tail>"),
        (200, {}, upstream_body),
    ]
    for status, extra, expected in cases:
        headers = {"x-test-status": str(status), "x-test-response-size": "1000", **extra}
        resp = proxy.get("/resp-body", headers=headers)
        assert resp.status_code == status, extra
        assert resp.content == expected, (status, extra)
        length = resp.headers.get("content-length")
        assert length is None or length == str(len(expected)), (status, extra, length)


def test_request_headers_are_readable_in_response_hooks(
    serve: Serve, http_upstream: HttpUpstream
) -> None:
    """A filter with response hooks only still reads the request's headers there."""
    proxy = serve(
        proxy_config([py_filter("late", "RequestHeadersInResponse")], [backend(http_upstream)])
    )
    resp = proxy.get("/late", headers={"x-probe": "p1"})
    assert resp.status_code == 200
    assert resp.headers["x-probe-seen"] == "p1"
    assert resp.content == b"x-probe=p1"


@SYNC_ASYNC
def test_response_trailers_of_grpc_calls_are_edited(
    serve: Serve, grpc_upstream: GrpcUpstream, flavor: str
) -> None:
    proxy = serve(
        proxy_config(
            [py_filter("grpc-trailers", cls_name("ResponseTrailers", flavor))],
            [cluster("backend", [grpc_upstream.address], http2=True)],
        )
    )
    host, port = proxy.address
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        reply, call = channel.unary_unary(UNARY_METHOD).with_call(b"ping", timeout=5)
        assert reply == b"echo:ping"
        assert call.code() == grpc.StatusCode.OK
        trailing = dict(call.trailing_metadata())
        assert trailing["x-trailer"] == "py:unary"
        assert trailing["x-py-trailer"] == "added"
        assert trailing["x-seen-grpc-status"] == "0"
        assert trailing["x-trailer-bin"] == GrpcUpstream.TRAILER_BIN

        # A streaming response is buffered for the trailers hook, and arrives whole.
        stream = channel.unary_stream(STREAM_METHOD)(b"50", timeout=5)
        assert list(stream) == [f"msg-{i}".encode() for i in range(50)]
        assert stream.code() == grpc.StatusCode.OK
        assert dict(stream.trailing_metadata())["x-trailer"] == "py:stream"


# -- on_log ----------------------------------------------------------------------------


@SYNC_ASYNC
def test_on_log_receives_the_finished_request(
    serve: Serve, http_upstream: HttpUpstream, flavor: str
) -> None:
    proxy = serve(
        proxy_config(
            [
                py_filter("log", cls_name("LogRecorder", flavor)),
                py_filter("deny", "DenyLocalReply"),
            ],
            [backend(http_upstream)],
            routes=[rt("/", name="r-main")],
        )
    )
    ok_id, denied_id = uuid.uuid4().hex, uuid.uuid4().hex
    before = time.time()
    ok = proxy.post("/log/ok?q=1", content=b"12345", headers={"x-log-id": ok_id})
    denied = proxy.get("/log/denied", headers={"x-log-id": denied_id, "x-deny": "1"})
    assert (ok.status_code, denied.status_code) == (200, 403)

    (entry, _), *more = until(lambda: sample_filters.LOGS.get(ok_id), what="on_log of ok")
    assert more == []
    host, port = proxy.address
    assert entry.method == "POST"
    assert entry.path == "/log/ok?q=1"
    assert entry.authority == f"{host}:{port}"
    assert entry.protocol == "HTTP/1.1"
    assert entry.response_code == 200
    assert entry.route_name == "r-main"
    assert entry.upstream_cluster == "backend"
    assert entry.upstream_host == f"{http_upstream.host}:{http_upstream.port}"
    assert entry.bytes_received == 5
    assert entry.bytes_sent == len(ok.content)
    assert entry.downstream_remote_address.startswith("127.0.0.1:")
    assert entry.duration_ms >= 0
    assert before - 1 <= entry.start_time <= time.time() + 1

    # on_log also runs when a later filter answered with a LocalReply.
    (denied_entry, _), *_ = until(lambda: sample_filters.LOGS.get(denied_id), what="on_log")
    assert denied_entry.response_code == 403
    assert denied_entry.path == "/log/denied"
    assert denied_entry.bytes_sent == len(b"denied\n")
    assert denied_entry.route_name == "r-main"  # the route had matched before the reply


# -- chains, context, clusters ---------------------------------------------------------


def test_chain_order_and_state_shared_across_filters_and_hooks(
    serve: Serve, http_upstream: HttpUpstream
) -> None:
    proxy = serve(
        proxy_config(
            [
                py_filter("first", "Order", config={"tag": "first"}),
                py_filter("second", "Order", config={"tag": "second"}),
            ],
            [backend(http_upstream)],
        )
    )
    resp = proxy.get("/order")
    assert seen_headers(resp)["x-request-order"] == ["first,second"]
    # Response hooks run in reverse order and see what the request hooks left in state.
    assert resp.headers["x-response-order"] == "second,first"
    assert resp.headers["x-request-state-at-second"] == "first,second"
    assert resp.headers["x-request-state-at-first"] == "first,second"

    # A LocalReply stops the chain: the second filter and the upstream are skipped.
    path = unique("/order")
    stopped = proxy.get(path, headers={"x-stop-at": "first"})
    assert stopped.status_code == 429
    assert stopped.content == b"first"
    assert "x-response-order" not in stopped.headers
    assert served(http_upstream, path) == 0


def test_context_fields(serve: Serve, http_upstream: HttpUpstream) -> None:
    proxy = serve(
        proxy_config(
            [py_filter("probe", "ContextProbe", config={"k": "v"})],
            [backend(http_upstream)],
            routes=[rt("/probe", name="probe-route"), rt("/unnamed")],
        )
    )
    probe = uuid.uuid4().hex
    with socket.create_connection(proxy.address, timeout=5) as sock:
        sock.sendall(
            b"GET /probe/x?y=1 HTTP/1.1\r\nhost: example.test:8080\r\n"
            b"x-probe: %s\r\n\r\n" % probe.encode()
        )
        resp = read_response(_Reader(sock))
        client_port = sock.getsockname()[1]
    assert resp.status == 200, resp
    headers = dict(json.loads(resp.body)["headers"])
    assert json.loads(headers["x-ctx"]) == {
        "method": "GET",
        "path": "/probe/x?y=1",
        "authority": "example.test:8080",
        "scheme": "http",
        "downstream_address": f"127.0.0.1:{client_port}",
        "downstream_peer_identity": None,
        "route_name": "probe-route",
        "cluster": "backend",
        "status": None,
        "response_headers_is_none": True,
        "config": {"k": "v"},
    }
    assert resp.header("x-ctx-status") == "200"
    assert resp.header("x-ctx-request-header") == probe  # request headers readable later
    assert resp.header("x-ctx-state") == probe  # state kept from the request hook

    # No route matched: the filter still runs, with route_name None.
    unmatched = uuid.uuid4().hex
    assert proxy.get("/nowhere", headers={"x-probe": unmatched}).status_code == 404
    (fields,) = sample_filters.PROBES.get(unmatched)
    assert fields["route_name"] is None


def test_filter_chooses_the_upstream_cluster(
    serve: Serve, http_upstreams: dict[str, HttpUpstream]
) -> None:
    proxy = serve(
        proxy_config(
            [py_filter("pick", "ClusterPicker"), py_filter("log", "LogRecorder")],
            [backend(http_upstreams["a"]), backend(http_upstreams["b"], "other")],
        )
    )
    default = proxy.get("/pick")
    assert default.headers["x-upstream"] == "a"
    assert seen_headers(default)["x-cluster-before"] == ["backend"]

    log_id = uuid.uuid4().hex
    picked = proxy.get("/pick", headers={"x-pick": "other", "x-log-id": log_id})
    assert picked.status_code == 200
    assert picked.headers["x-upstream"] == "b"
    assert picked.headers["x-picked-cluster"] == "other"
    assert seen_headers(picked)["x-cluster-before"] == ["backend"]
    (entry, _), *_ = until(lambda: sample_filters.LOGS.get(log_id), what="on_log")
    assert entry.upstream_cluster == "other"

    missing_id = uuid.uuid4().hex
    missing = proxy.get("/pick", headers={"x-pick": "nope", "x-log-id": missing_id})
    assert missing.status_code == 503
    (entry, _), *_ = until(lambda: sample_filters.LOGS.get(missing_id), what="on_log")
    assert "NC" in entry.response_flags


# -- configuration per filter and per route --------------------------------------------


def test_config_per_filter_and_per_route_override(
    serve: Serve, http_upstream: HttpUpstream
) -> None:
    routes = [
        rt(
            "/route-override",
            per_filter={"one": override({"who": "one-route"}), "two": override("two-route")},
        ),
        rt("/"),
    ]
    vhost = virtual_host("all", ["*"], routes)
    vhost["typed_per_filter_config"] = {"two": override({"who": "two-vhost"})}
    proxy = serve(
        proxy_config(
            [
                py_filter("one", "ConfigEcho", config={"who": "one"}),
                py_filter("two", "ConfigEcho", config={"who": "two"}),
            ],
            [backend(http_upstream)],
            virtual_hosts=[vhost],
        )
    )
    default = seen_headers(proxy.get("/default"))
    assert json.loads(default["x-config-one"][0]) == {"who": "one"}
    assert json.loads(default["x-config-two"][0]) == {"who": "two-vhost"}  # virtual host's

    routed = seen_headers(proxy.get("/route-override"))
    assert json.loads(routed["x-config-one"][0]) == {"who": "one-route"}
    assert json.loads(routed["x-config-two"][0]) == "two-route"  # the route's entry wins
    # self.config stays the filter's own config; ctx.config is per request.
    assert json.loads(routed["x-self-config-one"][0]) == {"who": "one"}
    assert json.loads(routed["x-self-config-two"][0]) == {"who": "two"}


def test_filter_disabled_per_route_and_per_virtual_host(
    serve: Serve, http_upstream: HttpUpstream
) -> None:
    off_host = virtual_host("off", ["off.test"], [rt("/")])
    off_host["typed_per_filter_config"] = {"echo": DISABLED}
    on_host = virtual_host("on", ["*"], [rt("/off", per_filter={"echo": DISABLED}), rt("/")])
    proxy = serve(
        proxy_config(
            [py_filter("echo", "ConfigEcho", config={"on": True})],
            [backend(http_upstream)],
            virtual_hosts=[off_host, on_host],
        )
    )
    assert "x-config-echo" in seen_headers(proxy.get("/on"))
    assert "x-config-echo" not in seen_headers(proxy.get("/off"))
    assert "x-config-echo" not in seen_headers(proxy.get("/on", headers={"host": "off.test"}))


# -- failures --------------------------------------------------------------------------


@SYNC_ASYNC
def test_raising_hook_gives_500_and_counts_an_error(
    serve: Serve, http_upstream: HttpUpstream, flavor: str
) -> None:
    proxy = serve(
        proxy_config([py_filter("raiser", cls_name("Raiser", flavor))], [backend(http_upstream)])
    )
    errors = proxy.stat(ERRORS)
    for phase in ("request", "response"):
        resp = proxy.get("/raise", headers={"x-raise": phase})
        assert resp.status_code == 500, phase
        assert resp.content == b"python filter error", phase
    assert proxy.stat(ERRORS) == errors + 2
    # The process and later requests go on.
    for _ in range(3):
        assert proxy.get("/raise").status_code == 200


def test_error_status_is_configurable(serve: Serve, http_upstream: HttpUpstream) -> None:
    proxy = serve(
        proxy_config([py_filter("raiser", "Raiser", error_status=503)], [backend(http_upstream)])
    )
    resp = proxy.get("/raise", headers={"x-raise": "request"})
    assert resp.status_code == 503
    assert resp.content == b"python filter error"
    assert proxy.stat(ERRORS) == 1


def test_async_hook_past_its_timeout_gives_504_and_is_cancelled(
    serve: Serve, http_upstream: HttpUpstream
) -> None:
    proxy = serve(
        proxy_config(
            [py_filter("sleeper", "AsyncSleeper", timeout="0.2s")], [backend(http_upstream)]
        )
    )
    sleep_id = uuid.uuid4().hex
    resp = proxy.get("/sleep", headers={"x-sleep": "30", "x-sleep-id": sleep_id})
    assert resp.status_code == 504
    assert resp.content == b"python filter timeout"
    assert proxy.stat(TIMEOUTS) == 1
    until(lambda: sample_filters.CANCELLED.get(sleep_id), timeout=2, what="the hook cancelled")
    assert proxy.get("/sleep", headers={"x-sleep": "0.01"}).status_code == 200


def test_sync_hook_past_its_timeout_gives_504(serve: Serve, http_upstream: HttpUpstream) -> None:
    proxy = serve(
        proxy_config(
            [py_filter("sleeper", "SyncSleeper", timeout="0.2s")], [backend(http_upstream)]
        )
    )
    sleep_id = uuid.uuid4().hex
    resp = proxy.get("/sleep", headers={"x-sleep": "1", "x-sleep-id": sleep_id})
    assert resp.status_code == 504
    assert not sample_filters.SLEPT.get(sleep_id)  # answered while the hook still ran
    assert resp.content == b"python filter timeout"
    assert proxy.stat(TIMEOUTS) == 1
    # The hook could not be interrupted; once it has returned, the executor goes on.
    until(lambda: sample_filters.SLEPT.get(sleep_id), timeout=2, what="the sync hook to return")
    assert proxy.get("/sleep").status_code == 200


def test_request_body_over_max_request_bytes_gives_413(
    serve: Serve, http_upstream: HttpUpstream
) -> None:
    proxy = serve(
        proxy_config(
            [py_filter("buffer", "BodyBuffering", max_request_bytes=1024)],
            [backend(http_upstream)],
        )
    )
    path = unique("/big")
    assert proxy.post(path, content=b"x" * 2048).status_code == 413
    assert proxy.post(path, content=iter([b"x" * 1000, b"x" * 1000])).status_code == 413
    assert served(http_upstream, path) == 0
    ok = proxy.post(path, content=b"x" * 1000)
    assert ok.status_code == 200
    assert ok.json()["body_length"] == 1000


def test_response_over_max_response_bytes_gives_500(
    serve: Serve, http_upstream: HttpUpstream
) -> None:
    proxy = serve(
        proxy_config(
            [py_filter("buffer", "BodyBuffering", max_response_bytes=1024)],
            [backend(http_upstream)],
        )
    )
    big = proxy.get("/big", headers={"x-test-response-size": "5000"})
    assert big.status_code == 500
    ok = proxy.get("/big", headers={"x-test-response-size": "1000"})
    assert ok.status_code == 200
    assert ok.content == b"".join(pattern(1000))


def test_slow_filter_does_not_delay_a_route_where_it_is_disabled(
    serve: Serve, http_upstream: HttpUpstream
) -> None:
    """A sync hook holds the executor thread; requests on a route where the filter is
    disabled complete meanwhile (one worker: the held request does not block it)."""
    proxy = serve(
        proxy_config(
            [py_filter("slow", "Blocker", timeout="10s")],
            [backend(http_upstream)],
            routes=[rt("/fast", per_filter={"slow": DISABLED}), rt("/")],
        )
    )
    token = uuid.uuid4().hex
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(proxy.get, "/slow", headers={"x-block": token})
        try:
            until(lambda: sample_filters.GATES.entered(token), timeout=5, what="hook to block")
            with httpx.Client(timeout=5) as client:
                for i in range(5):
                    resp = client.get(proxy.url(f"/fast/{i}"))
                    assert resp.status_code == 200
                    assert resp.json()["path"] == f"/fast/{i}"
            assert not slow.done()  # all of the above completed while it was held
        finally:
            sample_filters.GATES.release(token)
        assert slow.result(timeout=5).status_code == 200


# -- metrics ---------------------------------------------------------------------------


def test_filter_metrics_in_stats_and_prometheus(serve: Serve, http_upstream: HttpUpstream) -> None:
    proxy = serve(proxy_config([py_filter("metrics", "MetricsFilter")], [backend(http_upstream)]))
    for method in ("GET", "GET", "POST"):
        assert httpx.request(method, proxy.url("/m"), timeout=5).status_code == 200

    stats = proxy.server.stats()
    assert stats["python.x.y.method.GET"] == 2
    assert stats["python.x.y.method.POST"] == 1
    assert stats["python.queue.depth"] == 7
    assert stats["python.filters.built"] >= 1

    text = proxy.admin("/stats").text
    assert "python.x.y.method.GET: 2" in text.splitlines()
    prometheus = proxy.admin("/stats/prometheus").text
    lines = prometheus.splitlines()
    assert "# TYPE envoy_python_x_y counter" in lines
    assert 'envoy_python_x_y{method="GET"} 2' in lines
    assert 'envoy_python_x_y{method="POST"} 1' in lines
    assert "envoy_python_queue_depth 7" in lines
    assert "# TYPE envoy_python_lat_ms histogram" in lines
    assert "envoy_python_lat_ms_count 3" in lines


# -- configuration errors --------------------------------------------------------------

VALUE_PATH = f"{HCM_PATH}.http_filters[0].typed_config.value"

CONFIG_ERRORS: list[tuple[str, list[Json], bool, list[str]]] = [
    (
        "unknown-key",
        [typed_struct_filter("f", {"module": MODULE, "class": "HeaderEdit", "modul": "x"})],
        True,
        [f"{VALUE_PATH}.modul"],
    ),
    (
        "module-does-not-import",
        [typed_struct_filter("f", {"module": "filters_fixtures.no_such_module", "class": "X"})],
        True,
        [f"{VALUE_PATH}.module", "filters_fixtures.no_such_module"],
    ),
    (
        "class-not-a-filter",
        [py_filter("f", "NotAFilter")],
        True,
        [f"{VALUE_PATH}.class", "NotAFilter"],
    ),
    (
        "unknown-object",
        [typed_struct_filter("f", {"object": "missing"})],
        True,
        [f"{VALUE_PATH}.object", "missing"],
    ),
    (
        "router-not-last",
        [router(), py_filter("f", "HeaderEdit")],
        False,
        [f"{HCM_PATH}.http_filters", "last"],
    ),
    (
        "unsupported-envoy-filter",
        [
            {
                "name": "envoy.filters.http.buffer",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                    "max_request_bytes": 1024,
                },
            }
        ],
        True,
        [f"{HCM_PATH}.http_filters[0]", "not supported by envoyx"],
    ),
]


@pytest.mark.parametrize(
    ("filters", "with_router", "expected"),
    [pytest.param(f, r, e, id=i) for i, f, r, e in CONFIG_ERRORS],
)
def test_config_errors_name_the_field(
    http_upstream: HttpUpstream, filters: list[Json], with_router: bool, expected: list[str]
) -> None:
    config = proxy_config(filters, [backend(http_upstream)], with_router=with_router)
    server: envoyx.Server | None = None
    try:
        with pytest.raises(envoyx.ConfigError) as info:
            server = envoyx.Server(config, concurrency=1)
            server.start()
    finally:
        if server is not None and server.running:
            server.stop()
    message = str(info.value)
    for fragment in expected:
        assert fragment in message, message


# -- embedding -------------------------------------------------------------------------


def test_filter_objects_and_await_start_in_a_running_loop(http_upstream: HttpUpstream) -> None:
    instance = sample_filters.Counting({"from": "object"})
    config = proxy_config(
        [typed_struct_filter("counting", {"object": "obj"})], [backend(http_upstream)]
    )

    async def main() -> list[httpx.Response]:
        server = envoyx.Server(config, concurrency=1, filters={"obj": instance})
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        tick_task = asyncio.create_task(ticker())
        await server.start()
        tick_task.cancel()
        try:
            assert server.running
            assert ticks > 0  # the loop ran other tasks while the server started
            host, port = server.listener_addresses()["ingress"]
            async with httpx.AsyncClient(timeout=5) as client:
                return [await client.get(f"http://{host}:{port}/obj/{i}") for i in range(2)]
        finally:
            server.stop()

    responses = asyncio.run(main())
    assert [seen_headers(r)["x-object-calls"] for r in responses] == [["1"], ["2"]]
    assert json.loads(seen_headers(responses[0])["x-object-config"][0]) == {"from": "object"}
    assert instance.calls == 2  # the very object given to the server ran


class _KeepsContext(envoyx.filters.Filter):
    """Request and response hooks: the context lives across the request's phases."""

    def on_request_headers(self, ctx: envoyx.filters.RequestContext) -> None:
        ctx.state["path"] = ctx.path

    async def on_response_headers(self, ctx: envoyx.filters.RequestContext) -> None:
        assert ctx.response_headers is not None
        ctx.response_headers["x-path"] = ctx.state["path"]


def test_request_contexts_are_freed_when_requests_end(
    serve: Serve, http_upstream: HttpUpstream
) -> None:
    # A context reads the request lazily from the proxy's side; that side must not
    # keep the context alive in turn (a cycle through Rust, which gc cannot see).
    proxy = serve(
        proxy_config([typed_struct_filter("keeps", {"object": "obj"})], [backend(http_upstream)]),
        filters={"obj": _KeepsContext()},
    )

    def contexts() -> int:
        gc.collect()
        return sum(isinstance(o, envoyx.filters.RequestContext) for o in gc.get_objects())

    before = contexts()
    with httpx.Client(timeout=5) as client:
        for i in range(100):
            resp = client.get(proxy.url(f"/free/{i}"))
            assert resp.headers["x-path"] == f"/free/{i}"
    # Contexts of ended requests are released at the executor's next wake-up.
    proxy.get("/free/last")
    assert contexts() - before < 10


def test_async_with_server(http_upstream: HttpUpstream) -> None:
    instance = sample_filters.Counting({"n": 1})
    config = proxy_config(
        [typed_struct_filter("counting", {"object": "obj"})], [backend(http_upstream)]
    )

    async def main() -> tuple[envoyx.Server, httpx.Response]:
        async with envoyx.Server(config, concurrency=1, filters={"obj": instance}) as server:
            host, port = server.listener_addresses()["ingress"]
            async with httpx.AsyncClient(timeout=5) as client:
                return server, await client.get(f"http://{host}:{port}/async-with")

    server, resp = asyncio.run(main())
    assert seen_headers(resp)["x-object-calls"] == ["1"]
    assert not server.running


def test_http2_client_through_python_filters(serve: Serve, http_upstream: HttpUpstream) -> None:
    proxy = serve(
        proxy_config(
            [
                py_filter("edit", "HeaderEdit"),
                py_filter("body", "BodyEdit"),
                py_filter("resp-body", "AsyncResponseBodyEdit"),
            ],
            [backend(http_upstream)],
        )
    )
    with httpx.Client(http1=False, http2=True, timeout=5) as client:
        for i in range(3):
            resp = client.post(
                proxy.url(f"/h2/{i}"),
                content=b"h2 body",
                headers={
                    "x-multi": "one",
                    "x-remove": "x",
                    "x-body-op": "append",
                    "x-test-status": "202",  # ResponseBodyEdit appends to a 202
                },
            )
            assert resp.http_version == "HTTP/2"
            assert resp.status_code == 202
            assert resp.content.endswith(b"<tail>")
            echo = json.loads(resp.content.removesuffix(b"<tail>"))
            headers = dict(echo["headers"])
            assert headers["x-added"] == "one,two"
            assert "x-remove" not in headers
            assert echo["body_length"] == len(b"h2 body+appended")
            length = resp.headers.get("content-length")
            assert length is None or length == str(len(resp.content))


# -- dynamic listeners and validation ---------------------------------------------------


def test_listener_added_at_runtime_builds_its_python_filters(
    serve: Serve, http_upstream: HttpUpstream
) -> None:
    """Server.update applies listeners as LDS does: their filters are imported then, and
    a filter that cannot be built rejects that listener only, with its field path."""
    proxy = serve(proxy_config([], [backend(http_upstream)]))

    def listener(name: str, filters: list[Json]) -> Json:
        lst = http_listener(port=0, virtual_hosts=[virtual_host("all", ["*"], [rt("/")])])
        lst["name"] = name
        lst["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"] = [
            *filters,
            router(),
        ]
        return lst

    proxy.server.update(listeners=[listener("dynamic", [py_filter("edit", "HeaderEdit")])])
    host, port = proxy.server.listener_addresses()["dynamic"]
    resp = httpx.get(
        f"http://{host}:{port}/dyn", headers={"x-multi": "one", "x-remove": "x"}, timeout=5
    )
    assert seen_headers(resp)["x-added"] == ["one,two"]

    bad = listener("broken", [py_filter("f", "NoSuchClass")])
    with pytest.raises(envoyx.ConfigError) as raised:
        proxy.server.update(listeners=[bad])
    assert any("http_filters[0].typed_config.value.class" in e for e in raised.value.errors)
    assert "broken" not in proxy.server.listener_addresses()
    # The static listener still serves.
    assert proxy.get("/still").status_code == 200


def test_validate_mode_imports_the_filters(tmp_path: Path) -> None:
    def check(cls: str) -> subprocess.CompletedProcess[str]:
        config = proxy_config([py_filter("f", cls)], [cluster("backend", [("127.0.0.1", 9)])])
        path = tmp_path / f"{cls}.yaml"
        path.write_text(yaml.safe_dump(config))
        return subprocess.run(
            [sys.executable, "-m", "envoyx", "--mode", "validate", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=str(tmp_path),
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
        )

    ok = check("HeaderEdit")
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    bad = check("NoSuchClass")
    assert bad.returncode == 1
    assert f"{VALUE_PATH}.class" in bad.stderr


def test_two_workers_share_the_executor(http_upstream: HttpUpstream) -> None:
    """With --concurrency 2 both workers queue jobs for the one executor; concurrent
    requests on both (sync and async hooks) each get their own context."""
    config = proxy_config(
        [py_filter("edit", "HeaderEdit"), py_filter("async-edit", "AsyncResponseHeaderEdit")],
        [backend(http_upstream)],
    )
    server = envoyx.Server(config, concurrency=2)
    server.start()
    try:
        host, port = server.listener_addresses()["ingress"]

        def one(i: int) -> tuple[int, list[str], str | None]:
            # A connection per request, so that SO_REUSEPORT spreads them over workers.
            with httpx.Client(timeout=10) as client:
                resp = client.get(
                    f"http://{host}:{port}/w/{i}",
                    headers={"x-multi": f"m{i}", "x-remove": "x"},
                )
            return i, seen_headers(resp).get("x-added", []), resp.headers.get("x-status-seen")

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(40)))
        assert all(added == [f"m{i},two"] for i, added, _ in results), results
        assert all(seen == "200" for _, _, seen in results), results
        stats = server.stats()
        per_worker = [
            v
            for k, v in stats.items()
            if k.startswith("listener.") and k.endswith(".downstream_cx_total") and "worker_" in k
        ]
        # SO_REUSEPORT hashes 40 connections: both workers serve some (all on one: 2^-39).
        assert len(per_worker) == 2 and min(per_worker) > 0, per_worker
    finally:
        server.stop()


def test_buffering_keeps_the_framing_of_bodiless_messages(
    serve: Serve, http_upstream: HttpUpstream
) -> None:
    """Body hooks buffer, but a GET is not given `content-length: 0` and a HEAD
    response keeps the length the upstream announced."""
    proxy = serve(
        proxy_config(
            [py_filter("req-body", "BodyEdit"), py_filter("resp-body", "ResponseBodyEdit")],
            [backend(http_upstream)],
        )
    )
    seen = seen_headers(proxy.get("/framing"))
    assert "content-length" not in seen and "transfer-encoding" not in seen, seen
    head = httpx.head(proxy.url("/framing-head"), timeout=5)
    assert head.status_code == 200
    assert head.content == b""
    # The upstream's echo would be this long for a GET; buffering the empty HEAD body
    # must not turn it into 0.
    assert int(head.headers["content-length"]) > 0


class _InvalidReply(envoyx.filters.Filter):
    def on_request_headers(self, ctx: envoyx.filters.RequestContext) -> envoyx.filters.LocalReply:
        return envoyx.filters.LocalReply(403, headers={"bad header name": "x"})


def test_invalid_local_reply_is_the_filters_error(
    serve: Serve, http_upstream: HttpUpstream
) -> None:
    """A LocalReply the proxy cannot send (an invalid header name) fails like a raising
    hook: the filter's error_status, counted, and the process goes on."""
    config = proxy_config(
        [typed_struct_filter("bad-reply", {"object": "bad", "error_status": 503})],
        [backend(http_upstream)],
    )
    proxy = serve(config, filters={"bad": _InvalidReply()})
    resp = proxy.get("/invalid-reply")
    assert resp.status_code == 503
    assert resp.text == "python filter error"
    assert proxy.stat(ERRORS) == 1
    assert served(http_upstream, "/invalid-reply") == 0


def test_headers_mapping_api() -> None:
    """The whole `Headers` surface docs/filters.md describes, on a map of its own."""
    h = envoyx.filters.Headers([("X-A", "1"), ("x-a", "2"), ("x-b", "3")])
    assert isinstance(h, MutableMapping)
    assert len(h) == 2 and list(h) == ["x-a", "x-b"] and h.keys() == ["x-a", "x-b"]
    assert h["X-A"] == "1" and h.get_all("x-a") == ["1", "2"] and h.values() == ["1", "2", "3"]
    assert h.items() == [("x-a", "1"), ("x-a", "2"), ("x-b", "3")]
    assert h.get("missing") is None and h.get("missing", "d") == "d"
    assert h.pop("x-a") == "1" and "x-a" not in h
    assert h.pop("x-a", "gone") == "gone"
    with pytest.raises(KeyError):
        h.pop("x-a")
    with pytest.raises(KeyError):
        del h["x-a"]
    with pytest.raises(ValueError):
        h[":path"] = "/"  # pseudo-headers are not in the map
    with pytest.raises(ValueError):
        h["x-bad"] = "line\nbreak"
    assert repr(h) == 'Headers([("x-b", "3")])'


class _MetricOps(envoyx.filters.Filter):
    def on_request_headers(self, ctx: envoyx.filters.RequestContext) -> None:
        gauge = self.metrics.gauge("ops.inflight", tags={"route": "r"})
        gauge.inc()
        gauge.inc(4)
        gauge.dec(2)
        counter = self.metrics.counter("ops.calls")
        counter.inc(3)
        histogram = self.metrics.histogram("ops.ms")
        histogram.record(7)
        ctx.request_headers["x-metrics"] = f"{gauge.value},{counter.value},{histogram.count}"
        if ctx.path == "/bad-name":
            self.metrics.counter("bad name")  # raises ValueError: a filter error
        if ctx.path == "/kind-clash":
            self.metrics.gauge("ops.calls")  # a counter already: ValueError


def test_metric_handles(serve: Serve, http_upstream: HttpUpstream) -> None:
    config = proxy_config([typed_struct_filter("ops", {"object": "ops"})], [backend(http_upstream)])
    proxy = serve(config, filters={"ops": _MetricOps()})
    assert seen_headers(proxy.get("/ops"))["x-metrics"] == ["3,3,1"]
    assert seen_headers(proxy.get("/ops"))["x-metrics"] == ["6,6,2"]
    stats = proxy.server.stats()
    assert stats["python.ops.inflight.route.r"] == 6
    assert stats["python.ops.calls"] == 6
    assert proxy.get("/bad-name").status_code == 500
    assert proxy.stat(ERRORS) == 1
    assert proxy.get("/kind-clash").status_code == 500
    assert proxy.stat(ERRORS) == 2


def test_cli_finds_filter_modules_in_its_working_directory(tmp_path: Path) -> None:
    """The `envoyx` console script imports `module:` from the directory it runs in, as
    `python -m envoyx` does (its own sys.path starts at its bin directory)."""
    (tmp_path / "cwd_filters.py").write_text(
        "from envoyx.filters import Filter\n\nclass Here(Filter):\n"
        "    def on_request_headers(self, ctx):\n        return None\n"
    )
    config = proxy_config(
        [typed_struct_filter("f", {"module": "cwd_filters", "class": "Here"})],
        [cluster("backend", [("127.0.0.1", 9)])],
    )
    (tmp_path / "here.yaml").write_text(yaml.safe_dump(config))
    script = Path(sys.executable).with_name("envoyx")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [str(script), "--mode", "validate", "-c", "here.yaml"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(tmp_path),
        env=env,
    )
    assert run.returncode == 0, run.stderr
    assert "configuration 'here.yaml' OK" in run.stdout
