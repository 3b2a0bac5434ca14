"""Access logs under load: buffered per worker, written by a flusher, none lost.

envoyx's workers render access-log lines into per-worker buffers; a flusher thread
writes them every ``--file-flush-interval-msec``, sooner once a buffer passes
``--file-flush-min-size-kb``, and all of them when the server stops (Envoy's
defaults and behaviour). Tests taking ``start_proxy`` also run against the real
Envoy with the same bootstrap and flags; ``start_envoyx`` ones concern envoyx alone.
"""

from __future__ import annotations

import collections
import http.client
import json
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from support.bootstrap import bootstrap, cluster, http_listener, route, virtual_host
from support.proxy import ProxyProcess
from support.upstreams import HttpUpstream
from support.wait import free_port, until

StartProxy = Callable[..., ProxyProcess]

# Envoy's default format:
# [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%"
# %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION%
# %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%"
# "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"
DEFAULT_FORMAT_RE = re.compile(
    r'^\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\] "(\S+) (\S+) (\S+)" (\d{3}) (\S+) (\d+) (\d+) '
    r'(\d+) (\S+) "([^"]*)" "([^"]*)" "([^"]*)" "([^"]*)" "([^"]*)"$'
)

CLIENTS = 8
CONNECTIONS_PER_CLIENT = 4
REQUESTS_PER_CONNECTION = 50
HOUR_MS = "3600000"


def _logging_proxy(
    start: StartProxy, upstream: HttpUpstream, log: Path, *, concurrency: int, flags: Iterable[str]
) -> ProxyProcess:
    """One HTTP listener with a file access log (Envoy's default format); ``/up``
    goes to the upstream, everything else is a direct response."""
    bs = bootstrap(
        admin_port=free_port(),
        listeners=[
            http_listener(
                port=free_port(),
                access_log_path=str(log),
                virtual_hosts=[
                    virtual_host(
                        "all",
                        ["*"],
                        [
                            route({"prefix": "/up/"}, cluster="backend"),
                            route({"prefix": "/"}, direct=(200, "direct")),
                        ],
                    )
                ],
            )
        ],
        clusters=[cluster("backend", [upstream.address])],
    )
    return start(bs, concurrency=concurrency, extra_args=tuple(flags))


def _load(proxy: ProxyProcess, batch: str) -> list[str]:
    """CLIENTS threads, each opening CONNECTIONS_PER_CLIENT keep-alive connections in
    turn and sending REQUESTS_PER_CONNECTION requests on each, half through the
    upstream and half answered directly. Returns the unique paths sent."""
    host, port = proxy.listener_address()

    def client(t: int) -> list[str]:
        sent = []
        for c in range(CONNECTIONS_PER_CLIENT):
            conn = http.client.HTTPConnection(host, port, timeout=30)
            try:
                for i in range(REQUESTS_PER_CONNECTION):
                    prefix = "/up" if i % 2 else "/direct"
                    path = f"{prefix}/{batch}/t{t}/c{c}/{i}"
                    conn.request("GET", path, headers={"user-agent": f"load/{t}"})
                    resp = conn.getresponse()
                    resp.read()
                    assert resp.status == 200, (path, resp.status)
                    sent.append(path)
            finally:
                conn.close()
        return sent

    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        return [p for paths in pool.map(client, range(CLIENTS)) for p in paths]


def _parse(log: Path) -> list[str]:
    """The logged paths, asserting that every line is a whole default-format line."""
    text = log.read_text() if log.exists() else ""
    assert text == "" or text.endswith("\n"), f"a torn last line: {text[-300:]!r}"
    paths = []
    for line in text.splitlines():
        m = DEFAULT_FORMAT_RE.match(line)
        assert m, f"not a whole default-format line: {line!r}"
        paths.append(m.group(2))
    return paths


def _line_count(log: Path) -> int:
    return log.read_bytes().count(b"\n") if log.exists() else 0


def _assert_once_each(logged: list[str], sent: list[str]) -> None:
    counts = collections.Counter(logged)
    missing = [p for p in sent if counts[p] == 0]
    repeated = sorted(p for p, n in counts.items() if n > 1)
    assert not missing, f"{len(missing)} requests without a line, e.g. {missing[:5]}"
    assert not repeated, f"requests with several lines, e.g. {repeated[:5]}"
    assert sorted(logged) == sorted(sent)


def _assert_both_workers_served(proxy: ProxyProcess) -> None:
    listener = f"listener.127.0.0.1_{proxy.listener_address()[1]}"
    stats = proxy.stats()
    per_worker = [stats.get(f"{listener}.worker_{w}.downstream_cx_total", 0) for w in (0, 1)]
    # SO_REUSEPORT spreads the 32 connections by hash: both workers log lines.
    assert all(n > 0 for n in per_worker), f"connections per worker: {per_worker}"


def test_every_request_has_one_whole_line_under_concurrent_load(
    start_proxy: StartProxy, http_upstream: HttpUpstream, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    proxy = _logging_proxy(
        start_proxy,
        http_upstream,
        log,
        concurrency=2,
        flags=("--file-flush-interval-msec", "200"),
    )
    status, _, body = proxy.admin("/server_info")
    assert status == 200
    assert json.loads(body)["command_line_options"]["file_flush_interval"] == "0.200s"
    first = _load(proxy, "a")
    assert len(first) == CLIENTS * CONNECTIONS_PER_CLIENT * REQUESTS_PER_CONNECTION
    _assert_both_workers_served(proxy)
    # While the server runs, the flusher writes the lines within its interval.
    until(
        lambda: _line_count(log) >= len(first),
        timeout=30,
        what=f"{len(first)} access-log lines while serving",
    )
    _assert_once_each(_parse(log), first)

    # A second batch, then stop at once: stop writes whatever is still buffered.
    second = _load(proxy, "b")
    assert proxy.stop() == 0, proxy.log_text()
    _assert_once_each(_parse(log), first + second)


def test_the_first_line_is_written_at_once_the_rest_at_the_interval_or_stop(
    start_proxy: StartProxy, http_upstream: HttpUpstream, tmp_path: Path
) -> None:
    """With an hour's interval and a large minimum size, the first line is written at
    once (Envoy's flush thread starts with that write) and the rest stay in the
    workers' buffers: serving does not write them. Stop writes every line."""
    log = tmp_path / "access.log"
    proxy = _logging_proxy(
        start_proxy,
        http_upstream,
        log,
        concurrency=2,
        flags=("--file-flush-interval-msec", HOUR_MS, "--file-flush-min-size-kb", "16384"),
    )
    sent = _load(proxy, "held")
    _assert_both_workers_served(proxy)
    expected = {"http.ingress_http.downstream_rq_2xx": len(sent)}
    assert proxy.wait_stats(expected, before={}) == expected
    written = until(lambda: _parse(log), timeout=10, what="the first access log line")
    # The first flush takes whatever its buffer held by then: a few lines, not all.
    assert len(written) <= len(sent) // 2, "workers wrote to the file on the request path"
    assert proxy.stop() == 0, proxy.log_text()
    _assert_once_each(_parse(log), sent)


def test_a_buffer_past_the_minimum_size_is_written_before_the_interval(
    start_proxy: StartProxy, http_upstream: HttpUpstream, tmp_path: Path
) -> None:
    """Each line is longer than ``--file-flush-min-size-kb 1``, so each one is
    written at once although the interval is an hour."""
    log = tmp_path / "access.log"
    proxy = _logging_proxy(
        start_proxy,
        http_upstream,
        log,
        concurrency=1,
        flags=("--file-flush-interval-msec", HOUR_MS, "--file-flush-min-size-kb", "1"),
    )
    host, port = proxy.listener_address()
    conn = http.client.HTTPConnection(host, port, timeout=30)
    sent = []
    try:
        for i in range(10):
            path = f"/direct/big/{i}"
            conn.request("GET", path, headers={"user-agent": "u" * 1500})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            sent.append(path)
            until(
                lambda n=i + 1: _line_count(log) >= n,
                timeout=20,
                what=f"line {i + 1} written before the interval",
            )
    finally:
        conn.close()
    _assert_once_each(_parse(log), sent)
    assert proxy.stop() == 0, proxy.log_text()
    _assert_once_each(_parse(log), sent)
