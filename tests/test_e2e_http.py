"""End-to-end HTTP through the proxy with real upstreams and real clients.

Tests taking ``start_proxy`` run against envoyx and, as a second parametrization,
against the real Envoy with the same bootstrap (proof that what they assert is
Envoy's behaviour). Tests taking ``start_envoyx`` concern envoyx alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.bootstrap import bootstrap, cluster, http_listener, route, simple_proxy, virtual_host
from support.clients import raw_requests
from support.proxy import ProxyProcess
from support.upstreams import H2cUpstream, HttpUpstream, pattern, pattern_sha256
from support.wait import free_port, stable, until

StartProxy = Callable[..., ProxyProcess]
MB = 1024 * 1024


def _proxy(start: StartProxy, upstream: tuple[str, int], **kw: Any) -> ProxyProcess:
    http2 = kw.pop("http2_upstream", False)
    concurrency = kw.pop("concurrency", 1)
    bs = simple_proxy(
        port=free_port(), admin_port=free_port(), upstream=upstream, http2_upstream=http2, **kw
    )
    return start(bs, concurrency=concurrency)


def _echo(resp: httpx.Response) -> dict[str, Any]:
    assert resp.headers.get("content-type") == "application/json", resp.text[:300]
    data: dict[str, Any] = json.loads(resp.content)
    return data


# -- HTTP/1.1 connection handling ------------------------------------------------------


def test_keepalive_reuses_one_downstream_and_one_upstream_connection(
    start_proxy: StartProxy, http_upstream: HttpUpstream
) -> None:
    proxy = _proxy(start_proxy, http_upstream.address)
    req = b"GET /ka/%d HTTP/1.1\r\nhost: example\r\n\r\n"
    responses = raw_requests(proxy.listener_address(), [req % i for i in range(5)])
    assert [r.status for r in responses] == [200] * 5
    assert all(not r.closed for r in responses)
    echoes = [json.loads(r.body) for r in responses]
    assert [e["path"] for e in echoes] == [f"/ka/{i}" for i in range(5)]
    # The proxy pools its upstream connection: one connection served all five.
    assert len({e["connection_id"] for e in echoes}) == 1
    stats = proxy.stats()
    assert stats["cluster.backend.upstream_cx_total"] == 1
    assert stats["cluster.backend.upstream_rq_total"] == 5
    assert stats[f"listener.127.0.0.1_{proxy.listener_address()[1]}.downstream_cx_total"] == 1


def test_connection_close_from_client_closes_after_response(
    start_proxy: StartProxy, http_upstream: HttpUpstream
) -> None:
    proxy = _proxy(start_proxy, http_upstream.address)
    with socket.create_connection(proxy.listener_address(), timeout=10) as s:
        s.sendall(b"GET /close HTTP/1.1\r\nhost: example\r\nconnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):  # the proxy closes: recv returns b"" (no timeout)
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nconnection: close" in head.lower()
    assert json.loads(body)["path"] == "/close"


def test_upstream_connection_close_is_not_passed_downstream(
    start_proxy: StartProxy, http_upstream: HttpUpstream
) -> None:
    """The upstream closing its connection does not close the client's."""
    proxy = _proxy(start_proxy, http_upstream.address)
    reqs = [
        b"GET /1 HTTP/1.1\r\nhost: e\r\nx-test-close: 1\r\n\r\n",
        b"GET /2 HTTP/1.1\r\nhost: e\r\n\r\n",
    ]
    r1, r2 = raw_requests(proxy.listener_address(), reqs)
    assert (r1.status, r2.status) == (200, 200)
    assert not r1.closed
    assert json.loads(r1.body)["connection_id"] != json.loads(r2.body)["connection_id"]


# -- bodies --------------------------------------------------------------------------


@pytest.mark.parametrize("request_framing", ["content-length", "chunked"])
@pytest.mark.parametrize("response_framing", ["content-length", "chunked"])
def test_bodies_both_ways(
    start_proxy: StartProxy,
    http_upstream: HttpUpstream,
    request_framing: str,
    response_framing: str,
) -> None:
    proxy = _proxy(start_proxy, http_upstream.address)
    size = 700_000
    data = b"".join(pattern(size))
    content: bytes | Iterator[bytes] = (
        data if request_framing == "content-length" else pattern(size)
    )
    headers = {"x-test-response-size": str(size)}
    if response_framing == "chunked":
        headers["x-test-response-chunked"] = "1"
    token = uuid.uuid4().hex
    headers["x-test-token"] = token
    with httpx.Client(timeout=30) as client:
        resp = client.post(proxy.url("/body"), content=content, headers=headers)
    assert resp.status_code == 200
    assert hashlib.sha256(resp.content).hexdigest() == pattern_sha256(size)
    if response_framing == "chunked":
        assert resp.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in resp.headers
    else:
        assert resp.headers.get("content-length") == str(size)
    seen = next(r for r in http_upstream.requests if r.header("x-test-token") == token)
    assert seen.path == "/body"
    assert (seen.body_length, seen.body_sha256) == (size, hashlib.sha256(data).hexdigest())
    if request_framing == "chunked":
        assert seen.header("transfer-encoding") == "chunked"
        assert seen.header("content-length") is None
    else:
        assert seen.header("content-length") == str(size)
        assert seen.header("transfer-encoding") is None


class _RssSampler:
    """Samples a process's RSS in the background; ``peak_kb`` is the largest seen."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.proxy = proxy
        self.peak_kb = proxy.rss_kb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            try:
                self.peak_kb = max(self.peak_kb, self.proxy.rss_kb())
            except (OSError, KeyError):
                return

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


BIG = 64 * MB
RSS_GROWTH_LIMIT_KB = 32 * 1024
CLIENT_RCVBUF = 1024 * 1024


def _warm(proxy: ProxyProcess) -> int:
    """A few requests so that pools and allocator arenas exist; returns RSS in kB."""
    with httpx.Client(timeout=30) as c:
        for _ in range(3):
            c.post(proxy.url("/warm"), content=b"x" * MB).raise_for_status()
            c.get(proxy.url("/warm"), headers={"x-test-response-size": str(MB)}).raise_for_status()
    return proxy.rss_kb()


def test_large_upload_is_streamed_with_bounded_memory(
    start_proxy: StartProxy, http_upstream: HttpUpstream
) -> None:
    """64 MB upload while the upstream does not read: the proxy must push back on the
    client instead of buffering the body, and its RSS must stay far below the size."""
    proxy = _proxy(start_proxy, http_upstream.address)
    baseline = _warm(proxy)
    token = uuid.uuid4().hex
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        for chunk in pattern(BIG):
            sent += len(chunk)
            yield chunk

    result: dict[str, Any] = {}

    def upload() -> None:
        try:
            with httpx.Client(timeout=60) as c:
                result["resp"] = c.post(
                    proxy.url("/upload"),
                    content=body(),
                    headers={"x-test-token": token, "x-test-hold": "1"},
                )
        except Exception as exc:  # reported by the main thread
            result["error"] = exc

    with _RssSampler(proxy) as sampler:
        t = threading.Thread(target=upload, daemon=True)
        t.start()
        until(lambda: http_upstream.holding(token), timeout=20, what="upload to reach upstream")
        plateau = stable(lambda: sent, quiet_s=0.5, timeout=30, done=lambda v: v >= BIG)
        held_rss = proxy.rss_kb()
        http_upstream.release(token)
        t.join(60)
    assert "error" not in result, result.get("error")
    resp = result["resp"]
    assert resp.status_code == 200
    echo = _echo(resp)
    assert (echo["body_length"], echo["body_sha256"]) == (BIG, pattern_sha256(BIG))
    # Flow control: what is in flight (socket buffers + the proxy's own) stays far
    # below the body; Envoy's plateau on this machine is about 10 MB.
    assert plateau < BIG // 2, (
        "the whole body was accepted while the upstream was not reading",
        plateau,
    )
    assert held_rss - baseline < RSS_GROWTH_LIMIT_KB, (held_rss, baseline)
    assert sampler.peak_kb - baseline < RSS_GROWTH_LIMIT_KB, (sampler.peak_kb, baseline)


def test_large_download_is_streamed_with_bounded_memory(
    start_proxy: StartProxy, http_upstream: HttpUpstream
) -> None:
    """64 MB download while the client stops reading: the upstream must be held back,
    and the proxy's RSS must stay far below the body size."""
    proxy = _proxy(start_proxy, http_upstream.address)
    baseline = _warm(proxy)
    token = uuid.uuid4().hex
    digest = hashlib.sha256()
    got = 0
    # The client's receive buffer is fixed: loopback autotuning may grow it to
    # tcp_rmem's maximum (32 MB on this machine), which would hide the proxy's flow
    # control behind the kernel's buffering.
    transport = httpx.HTTPTransport(
        socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)]
    )
    with (
        _RssSampler(proxy) as sampler,
        httpx.Client(timeout=60, transport=transport) as c,
        c.stream(
            "GET",
            proxy.url("/download"),
            headers={"x-test-token": token, "x-test-response-size": str(BIG)},
        ) as resp,
    ):
        assert resp.status_code == 200
        chunks = resp.iter_raw(64 * 1024)
        for chunk in chunks:  # read 1 MB, then stop reading for a while
            digest.update(chunk)
            got += len(chunk)
            if got >= MB:
                break
        plateau = stable(
            lambda: http_upstream.progress(token), quiet_s=0.5, timeout=30, done=lambda v: v >= BIG
        )
        held_rss = proxy.rss_kb()
        for chunk in chunks:
            digest.update(chunk)
            got += len(chunk)
    assert (got, digest.hexdigest()) == (BIG, pattern_sha256(BIG))
    # Flow control: what is in flight (socket buffers + the proxy's own) stays far
    # below the body; Envoy's plateau on this machine is about 10 MB.
    assert plateau < BIG // 2, (
        "the upstream sent everything while the client was not reading",
        plateau,
    )
    assert held_rss - baseline < RSS_GROWTH_LIMIT_KB, (held_rss, baseline)
    assert sampler.peak_kb - baseline < RSS_GROWTH_LIMIT_KB, (sampler.peak_kb, baseline)


# -- HTTP/2 --------------------------------------------------------------------------


def test_h2c_downstream_multiplexes_streams(
    start_proxy: StartProxy, http_upstream: HttpUpstream
) -> None:
    proxy = _proxy(start_proxy, http_upstream.address)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(http1=False, http2=True, timeout=30) as c:
            gets = [c.get(proxy.url(f"/s/{i}")) for i in range(20)]
            post = c.post(proxy.url("/post"), content=b"".join(pattern(300_000)))
            return list(await asyncio.gather(*gets, post))

    responses = asyncio.run(run())
    assert all(r.http_version == "HTTP/2" for r in responses)
    assert [r.status_code for r in responses] == [200] * 21
    assert sorted(_echo(r)["path"] for r in responses[:20]) == sorted(f"/s/{i}" for i in range(20))
    assert _echo(responses[20])["body_length"] == 300_000
    stats = proxy.stats()
    assert stats["http.ingress_http.downstream_cx_http2_total"] == 1
    assert stats["http.ingress_http.downstream_rq_http2_total"] == 21


def test_h2c_upstream(start_proxy: StartProxy, h2c_upstream: H2cUpstream) -> None:
    proxy = _proxy(start_proxy, h2c_upstream.address, http2_upstream=True)
    with httpx.Client(timeout=30) as c:
        r1 = c.get(proxy.url("/h2up"))
        r2 = c.post(proxy.url("/h2up"), content=b"".join(pattern(2 * MB)))
        r3 = c.get(proxy.url("/h2up"), headers={"x-test-response-size": str(3 * MB)})
    e1, e2 = _echo(r1), _echo(r2)
    assert (e1["http_version"], e2["http_version"]) == ("2", "2")
    assert (e2["body_length"], e2["body_sha256"]) == (2 * MB, pattern_sha256(2 * MB))
    assert hashlib.sha256(r3.content).hexdigest() == pattern_sha256(3 * MB)
    assert r1.headers["x-upstream"] == "h2"
    stats = proxy.stats()
    assert stats["cluster.backend.upstream_cx_http2_total"] == 1
    assert stats["cluster.backend.upstream_rq_total"] == 3


def test_h2c_both_sides(start_proxy: StartProxy, h2c_upstream: H2cUpstream) -> None:
    proxy = _proxy(start_proxy, h2c_upstream.address, http2_upstream=True)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(http1=False, http2=True, timeout=30) as c:
            return list(
                await asyncio.gather(
                    *[c.post(proxy.url(f"/b/{i}"), content=b"y" * (i * 1000)) for i in range(10)]
                )
            )

    responses = asyncio.run(run())
    for i, r in enumerate(responses):
        assert r.http_version == "HTTP/2"
        echo = _echo(r)
        assert (echo["path"], echo["http_version"], echo["body_length"]) == (
            f"/b/{i}",
            "2",
            i * 1000,
        )


# -- clusters --------------------------------------------------------------------------


@pytest.mark.parametrize("cluster_type", ["STRICT_DNS", "LOGICAL_DNS"])
def test_dns_cluster_on_localhost(
    start_proxy: StartProxy, http_upstream: HttpUpstream, cluster_type: str
) -> None:
    port = free_port()
    bs = bootstrap(
        admin_port=free_port(),
        listeners=[
            http_listener(
                port=port,
                virtual_hosts=[virtual_host("all", ["*"], [route({"prefix": "/"}, cluster="dns")])],
            )
        ],
        clusters=[
            cluster(
                "dns",
                [("localhost", http_upstream.port)],
                type=cluster_type,
                dns_lookup_family="V4_ONLY",
            )
        ],
    )
    proxy = start_proxy(bs)
    with httpx.Client(timeout=30) as c:
        responses = [c.get(proxy.url("/dns")) for _ in range(3)]
    assert [r.status_code for r in responses] == [200] * 3
    assert {r.headers["x-upstream"] for r in responses} == {"a"}
    proxy.wait_stat("cluster.dns.upstream_rq_2xx", 3)


def test_round_robin_over_three_upstreams(
    start_proxy: StartProxy, http_upstreams: dict[str, HttpUpstream]
) -> None:
    bs = bootstrap(
        admin_port=free_port(),
        listeners=[
            http_listener(
                port=free_port(),
                virtual_hosts=[virtual_host("all", ["*"], [route({"prefix": "/"}, cluster="rr")])],
            )
        ],
        clusters=[cluster("rr", [u.address for u in http_upstreams.values()])],
    )
    proxy = start_proxy(bs)
    with httpx.Client(timeout=30) as c:
        served = [c.get(proxy.url("/rr")).headers["x-upstream"] for _ in range(30)]
    assert {name: served.count(name) for name in "abc"} == {"a": 10, "b": 10, "c": 10}
    # Strict rotation: every window of three holds all three upstreams.
    assert all(len(set(served[i : i + 3])) == 3 for i in range(28))


# -- workers ---------------------------------------------------------------------------


def test_several_workers_serve_many_connections(
    start_proxy: StartProxy, http_upstream: HttpUpstream
) -> None:
    proxy = _proxy(start_proxy, http_upstream.address, concurrency=2)
    n = 200

    def one(i: int) -> int:
        with socket.create_connection(proxy.listener_address(), timeout=30) as s:
            s.sendall(f"GET /w/{i} HTTP/1.1\r\nhost: w\r\nconnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return int(data.split(b" ", 2)[1])

    with ThreadPoolExecutor(max_workers=32) as pool:
        statuses = list(pool.map(one, range(n)))
    assert statuses == [200] * n
    listener = f"listener.127.0.0.1_{proxy.listener_address()[1]}"
    expected = {f"{listener}.downstream_cx_total": n, "http.ingress_http.downstream_rq_2xx": n}
    assert proxy.wait_stats(expected, before={}) == expected
    stats = proxy.stats()
    assert stats.get("server.concurrency") == 2
    per_worker = [stats.get(f"{listener}.worker_{w}.downstream_cx_total") for w in (0, 1)]
    # SO_REUSEPORT spreads connections by hash: both workers get some of the 200.
    assert None not in per_worker, f"no per-worker listener stats: {per_worker}"
    assert sum(per_worker) == n  # type: ignore[arg-type]
    assert all(c > 0 for c in per_worker), f"connections per worker: {per_worker}"  # type: ignore[operator]


# -- admin -----------------------------------------------------------------------------


def test_admin_endpoints(start_proxy: StartProxy, http_upstream: HttpUpstream) -> None:
    proxy = _proxy(start_proxy, http_upstream.address)
    lport = proxy.listener_address()[1]
    with httpx.Client(timeout=30) as c:
        for _ in range(3):
            c.get(proxy.url("/")).raise_for_status()
    proxy.wait_stat("http.ingress_http.downstream_rq_2xx", 3)  # charged as streams end

    status, _, body = proxy.admin("/ready")
    assert (status, body) == (200, b"LIVE\n")

    status, headers, body = proxy.admin("/server_info")
    assert status == 200 and headers["content-type"].startswith("application/json")
    info = json.loads(body)
    assert info["state"] == "LIVE"
    assert info["command_line_options"]["concurrency"] == 1
    assert "version" in info

    status, _, body = proxy.admin("/stats")
    assert status == 200
    lines = body.decode().splitlines()
    assert "cluster.backend.upstream_rq_total: 3" in lines
    assert "http.ingress_http.downstream_rq_2xx: 3" in lines
    assert f"listener.127.0.0.1_{lport}.downstream_cx_total: 1" in lines
    assert all(re.fullmatch(r"[\w.:\-]+: .*", line) for line in lines), lines[:5]

    stats = proxy.stats()  # /stats?format=json
    assert stats["cluster.backend.upstream_rq_total"] == 3
    assert stats["cluster.backend.upstream_cx_active"] == 1  # a gauge

    status, _, body = proxy.admin("/stats/prometheus")
    assert status == 200
    prom = body.decode()
    assert "# TYPE envoy_cluster_upstream_rq_total counter\n" in prom
    assert 'envoy_cluster_upstream_rq_total{envoy_cluster_name="backend"} 3\n' in prom
    assert "# TYPE envoy_cluster_upstream_cx_active gauge\n" in prom
    assert (
        'envoy_http_downstream_rq_xx{envoy_response_code_class="2",'
        'envoy_http_conn_manager_prefix="ingress_http"} 3\n'
    ) in prom
    assert (
        f'envoy_listener_downstream_cx_total{{envoy_listener_address="127.0.0.1_{lport}"}} 1\n'
        in prom
    )

    status, _, body = proxy.admin("/clusters")
    assert status == 200
    clusters = body.decode().splitlines()
    host = f"backend::127.0.0.1:{http_upstream.port}"
    assert f"{host}::rq_total::3" in clusters
    assert f"{host}::health_flags::healthy" in clusters
    assert f"{host}::cx_active::1" in clusters

    status, _, body = proxy.admin("/clusters?format=json")
    cs = json.loads(body)["cluster_statuses"]
    assert [c["name"] for c in cs] == ["backend"]
    sa = cs[0]["host_statuses"][0]["address"]["socket_address"]
    assert (sa["address"], sa["port_value"]) == ("127.0.0.1", http_upstream.port)

    status, _, body = proxy.admin("/listeners")
    assert (status, body.decode().splitlines()) == (200, [f"ingress::127.0.0.1:{lport}"])
    status, _, body = proxy.admin("/listeners?format=json")
    ls = json.loads(body)["listener_statuses"]
    assert ls == [
        {
            "name": "ingress",
            "local_address": {"socket_address": {"address": "127.0.0.1", "port_value": lport}},
        }
    ]

    status, _, body = proxy.admin("/config_dump")
    assert status == 200
    types = [c["@type"] for c in json.loads(body)["configs"]]
    assert "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump" in types
    assert "type.googleapis.com/envoy.admin.v3.ClustersConfigDump" in types
    assert "type.googleapis.com/envoy.admin.v3.ListenersConfigDump" in types
    dump = json.loads(body)
    boot = next(c for c in dump["configs"] if c["@type"].endswith("BootstrapConfigDump"))
    assert boot["bootstrap"]["static_resources"]["clusters"][0]["name"] == "backend"

    status, _, body = proxy.admin("/quitquitquit", method="POST")
    assert (status, body) == (200, b"OK\n")
    assert proxy.wait_exit(20) == 0


# -- access log ------------------------------------------------------------------------

DEFAULT_FORMAT_RE = re.compile(
    r'^\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\] "(\S+) (\S+) (\S+)" (\d{3}) (\S+) (\d+) (\d+) '
    r'(\d+) (\S+) "([^"]*)" "([^"]*)" "([^"]*)" "([^"]*)" "([^"]*)"$'
)


def test_access_log_file_default_format(
    start_proxy: StartProxy, http_upstream: HttpUpstream, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    port = free_port()
    bs = bootstrap(
        admin_port=free_port(),
        listeners=[
            http_listener(
                port=port,
                access_log_path=str(log),
                virtual_hosts=[
                    virtual_host(
                        "all",
                        ["*"],
                        [
                            route({"path": "/direct"}, direct=(200, "hi")),
                            route({"prefix": "/dead"}, cluster="empty"),
                            route({"prefix": "/up"}, cluster="backend"),
                        ],
                    )
                ],
            )
        ],
        clusters=[cluster("backend", [http_upstream.address]), cluster("empty", [])],
    )
    proxy = start_proxy(bs)
    with httpx.Client(timeout=30) as c:
        c.post(
            proxy.url("/up/x?q=1"),
            content=b"12345",
            headers={"user-agent": "ua/1", "x-request-id": "rid-1", "x-test-response-size": "7"},
        )
        c.get(proxy.url("/direct"), headers={"user-agent": "ua/2"})
        c.get(proxy.url("/dead"), headers={"user-agent": "ua/3", "x-forwarded-for": "10.1.2.3"})
        c.get(proxy.url("/none"), headers={"user-agent": "ua/4", "host": "h.example"})
    assert proxy.stop() == 0  # Envoy flushes its access log buffer on exit
    lines = log.read_text().splitlines()
    parsed = []
    for line in lines:
        m = DEFAULT_FORMAT_RE.match(line)
        assert m, f"not Envoy's default format: {line!r}"
        parsed.append(m.groups())
    up = f"127.0.0.1:{http_upstream.port}"
    auth = f"127.0.0.1:{port}"
    # method path protocol code flags rx tx duration ust xff ua rid authority upstream_host
    assert [p[:7] + p[9:] for p in parsed[:1]] == [
        ("POST", "/up/x?q=1", "HTTP/1.1", "200", "-", "5", "7", "-", "ua/1", "rid-1", auth, up)
    ]
    assert parsed[0][8].isdigit()  # x-envoy-upstream-service-time
    rest = [
        (p[0], p[1], p[3], p[4], p[5], p[6], p[8], p[9], p[10], p[12], p[13]) for p in parsed[1:]
    ]
    assert rest == [
        ("GET", "/direct", "200", "-", "0", "2", "-", "-", "ua/2", auth, "-"),
        ("GET", "/dead", "503", "UH", "0", "19", "-", "10.1.2.3", "ua/3", auth, "-"),
        ("GET", "/none", "404", "NR", "0", "0", "-", "-", "ua/4", "h.example", "-"),
    ]
    assert all(re.fullmatch(r"[0-9a-f-]{36}", p[11]) for p in parsed[1:])


# -- signals -------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_exits_cleanly(
    start_envoyx: StartProxy, http_upstream: HttpUpstream, sig: signal.Signals
) -> None:
    proxy = _proxy(start_envoyx, http_upstream.address)
    with httpx.Client(timeout=30) as c:
        assert c.get(proxy.url("/")).status_code == 200
    assert proxy.stop(sig=sig, timeout=20) == 0, proxy.log_text()


def test_envoy_exits_zero_on_sigterm(start_envoy: StartProxy, http_upstream: HttpUpstream) -> None:
    """The reference: Envoy exits 0 on SIGTERM, as envoyx must."""
    proxy = _proxy(start_envoy, http_upstream.address)
    assert proxy.stop(sig=signal.SIGTERM) == 0


# -- the Python API in-process ---------------------------------------------------------


def test_in_process_server_proxies_and_reports_stats(http_upstream: HttpUpstream) -> None:
    import envoyx

    config = simple_proxy(port=0, admin_port=0, upstream=http_upstream.address)
    with envoyx.Server(config) as server:
        (host, port) = server.listener_addresses()["ingress"]
        assert port != 0
        admin = server.admin_address()
        assert admin is not None and admin[1] != 0
        with httpx.Client(timeout=30) as c:
            for _ in range(3):
                r = c.get(f"http://{host}:{port}/inproc")
                assert r.status_code == 200 and r.headers["x-upstream"] == "a"
            assert c.get(f"http://{admin[0]}:{admin[1]}/ready").text == "LIVE\n"
        until(
            lambda: server.stats().get("cluster.backend.upstream_rq_2xx") == 3,
            timeout=5,
            what="three 2xx counted",
        )
        stats = server.stats()
        assert stats["cluster.backend.upstream_rq_total"] == 3
        assert stats["http.ingress_http.downstream_rq_2xx"] == 3
        dump = server.config_dump()
        assert any(c["@type"].endswith("BootstrapConfigDump") for c in dump["configs"])
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{host}:{port}/after-stop", timeout=5)
