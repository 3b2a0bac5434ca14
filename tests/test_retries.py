"""Retries and router timeouts, differential: every test runs against envoyx and the
real Envoy 1.40 with the same bootstrap and asserts the same outcome — the client's
status, body and response flags, how many attempts the upstream saw, and the
cluster's retry and timeout stats.

The upstream is :class:`ScriptedUpstream`: each request carries the script of its
attempts (``503,503,200``: fail twice, then succeed), so a retry's effect is seen on
the upstream's side. Each scenario has its own route and cluster, so its stats are
its own while one proxy serves the whole file.

Also here: the ``x-envoy-*`` control headers are honoured on internal requests only
(``internal_address_config``) and removed from external ones, as Envoy does.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.bootstrap import (
    FILE_LOG_TYPE,
    HCM,
    HCM_TYPE,
    ROUTER_TYPE,
    bootstrap,
    cluster,
    socket_address,
)
from support.envoy import EnvoyProcess, ensure_envoy_binary, targets_from_env
from support.proxy import EnvoyxProcess, ProxyProcess
from support.scripted_upstream import ScriptedUpstream
from support.wait import free_port, until

Json = dict[str, Any]
LOG_FORMAT = "%REQ(X-SCRIPT-ID)% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%\n"

# A second log: what the route's request_headers_to_add made of the request.
ADDED_LOG_FORMAT = "%REQ(X-SCRIPT-ID)% %REQ(X-ADDED)%\n"

_ids = itertools.count()


def _added_log(log: Path) -> Path:
    return log.with_name(log.stem + ".added.log")


def _route(prefix: str, cluster_name: str, **action: Any) -> Json:
    return {"match": {"prefix": prefix}, "route": {"cluster": cluster_name, **action}}


# prefix -> route action fields (each gets a cluster of its own, named after it).
SCENARIOS: dict[str, Json] = {
    "5xx": {"retry_policy": {"retry_on": "5xx", "num_retries": 2}},
    "gw": {"retry_policy": {"retry_on": "gateway-error", "num_retries": 2}},
    "reset": {"retry_policy": {"retry_on": "reset", "num_retries": 1}},
    "cf": {"retry_policy": {"retry_on": "connect-failure", "num_retries": 3}},
    "codes": {
        "retry_policy": {
            "retry_on": "retriable-status-codes",
            "retriable_status_codes": [418],
            "num_retries": 1,
        }
    },
    "4xx": {"retry_policy": {"retry_on": "retriable-4xx", "num_retries": 1}},
    "pertry": {
        "timeout": "5s",
        "retry_policy": {"retry_on": "5xx", "num_retries": 1, "per_try_timeout": "0.3s"},
    },
    "idle": {
        "timeout": "5s",
        "retry_policy": {"retry_on": "reset", "num_retries": 1, "per_try_idle_timeout": "0.3s"},
    },
    "timeout": {"timeout": "0.4s"},
    "grpc": {"timeout": "10s", "max_stream_duration": {"grpc_timeout_header_max": "2s"}},
    "duration": {"timeout": "10s", "max_stream_duration": {"max_stream_duration": "0.3s"}},
    "stall": {"timeout": "0.6s"},
    "stallretry": {"timeout": "0.6s", "retry_policy": {"retry_on": "5xx,reset", "num_retries": 2}},
    "plain": {},
    "buffer": {"retry_policy": {"retry_on": "5xx", "num_retries": 1}},
    "body": {"retry_policy": {"retry_on": "5xx", "num_retries": 2}},
    "ratelimited": {
        "retry_policy": {
            "retry_on": "retriable-status-codes",
            "retriable_status_codes": [429],
            "num_retries": 2,
            "rate_limited_retry_back_off": {
                "reset_headers": [
                    {"name": "retry-after"},
                    {"name": "x-ratelimit-reset", "format": "UNIX_TIMESTAMP"},
                ],
                "max_interval": "5s",
            },
        }
    },
    "hedge": {
        "timeout": "5s",
        "retry_policy": {"retry_on": "5xx", "num_retries": 1, "per_try_timeout": "0.3s"},
        "hedge_policy": {"hedge_on_per_try_timeout": True},
    },
    # With a header the route adds (request_headers_to_add, set below): the access
    # log reads the request as mutated, hedged or not.
    "loghedge": {
        "timeout": "5s",
        "retry_policy": {"retry_on": "5xx", "num_retries": 1, "per_try_timeout": "0.3s"},
        "hedge_policy": {"hedge_on_per_try_timeout": True},
    },
    "retrylog": {"retry_policy": {"retry_on": "5xx", "num_retries": 1}},
    "backoff": {
        "retry_policy": {
            "retry_on": "5xx",
            "num_retries": 3,
            "retry_back_off": {"base_interval": "0.2s", "max_interval": "0.2s"},
        }
    },
}
DEAD = {"dead"}


def _listener(name: str, port: int, log: Path, *, internal: bool) -> Json:
    routes = [_route(f"/{p}", p, **a) for p, a in SCENARIOS.items()]
    routes.append(
        _route("/dead", "dead", retry_policy={"retry_on": "connect-failure", "num_retries": 2})
    )
    routes.append(_route("/cbretry", "cbretry", retry_policy={"retry_on": "5xx", "num_retries": 2}))
    previous_hosts = [
        {
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
            },
        }
    ]
    routes.append(
        _route(
            "/pair",
            "pair",
            retry_policy={
                "retry_on": "connect-failure",
                "num_retries": 2,
                "retry_host_predicate": previous_hosts,
                "host_selection_retry_max_attempts": 3,
            },
        )
    )
    vhosts: list[Json] = [
        {
            "name": "counted",
            "domains": ["counted.test"],
            "include_request_attempt_count": True,
            "include_attempt_count_in_response": True,
            "retry_policy": {"retry_on": "5xx", "num_retries": 2},
            "routes": [_route("/", "counted")],
        },
        {"name": "all", "domains": ["*"], "routes": routes},
    ]
    # `buffer`: a request body above 4 bytes is not kept, so it is not retried.
    for r in routes:
        if r["match"]["prefix"] == "/buffer":
            r["per_request_buffer_limit_bytes"] = 4
        if r["match"]["prefix"] in ("/loghedge", "/retrylog"):
            r["request_headers_to_add"] = [{"header": {"key": "x-added", "value": "by-route"}}]
    hcm: Json = {
        "@type": HCM_TYPE,
        "stat_prefix": name,
        "use_remote_address": True,
        "route_config": {"name": f"{name}_routes", "virtual_hosts": vhosts},
        "http_filters": [
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}
        ],
        "access_log": [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": FILE_LOG_TYPE,
                    "path": str(path),
                    "log_format": {"text_format_source": {"inline_string": fmt}},
                },
            }
            for path, fmt in ((log, LOG_FORMAT), (_added_log(log), ADDED_LOG_FORMAT))
        ],
    }
    if internal:
        hcm["internal_address_config"] = {
            "cidr_ranges": [{"address_prefix": "127.0.0.0", "prefix_len": 8}]
        }
    return {
        "name": name,
        "address": socket_address("127.0.0.1", port),
        "filter_chains": [{"filters": [{"name": HCM, "typed_config": hcm}]}],
    }


class Rig:
    def __init__(self, proxy: ProxyProcess, upstream: ScriptedUpstream, logs: dict[str, Path]):
        self.proxy = proxy
        self.upstream = upstream
        self.logs = logs

    def url(self, path: str, listener: str = "external") -> str:
        return self.proxy.url(path, listener=listener)

    def stat(self, cluster_name: str, name: str) -> int:
        return self.proxy.stats().get(f"cluster.{cluster_name}.{name}", 0)

    def wait_stats(self, cluster_name: str, expected: dict[str, int]) -> None:
        seen: dict[str, int] = {}

        def check() -> bool:
            nonlocal seen
            now = self.proxy.stats()
            seen = {k: now.get(f"cluster.{cluster_name}.{k}", 0) for k in expected}
            return seen == expected

        try:
            until(check, timeout=5, what=f"{cluster_name} stats")
        except AssertionError:
            raise AssertionError(f"{self.proxy.kind}: {seen} != {expected}") from None

    def log_line(self, script_id: str, listener: str = "external") -> list[str]:
        found: list[str] = []

        def check() -> bool:
            text = self.logs[listener].read_text() if self.logs[listener].exists() else ""
            found[:] = [ln for ln in text.splitlines() if ln.startswith(script_id + " ")]
            return bool(found)

        until(check, timeout=5, what=f"access log line of {script_id}")
        return found[-1].split(" ", 3)


@pytest.fixture(scope="module", params=targets_from_env("ENVOYX_E2E_TARGETS", "envoyx,envoy"))
def rig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    work = tmp_path_factory.mktemp(f"retries-{request.param}")
    upstream = ScriptedUpstream("scripted").start()
    dead_port = free_port()
    logs = {"external": work / "external.log", "internal": work / "internal.log"}
    clusters = [cluster(p, [upstream.address]) for p in SCENARIOS]
    clusters.append(cluster("counted", [upstream.address]))
    clusters.append(cluster("dead", [("127.0.0.1", dead_port)]))
    clusters.append(cluster("pair", [upstream.address, ("127.0.0.1", dead_port)]))
    breaker = cluster("cbretry", [upstream.address])
    breaker["circuit_breakers"] = {"thresholds": [{"max_retries": 0}]}
    clusters.append(breaker)
    bs = bootstrap(
        admin_port=free_port(),
        listeners=[
            _listener("external", free_port(), logs["external"], internal=False),
            _listener("internal", free_port(), logs["internal"], internal=True),
        ],
        clusters=clusters,
    )
    args = ("--file-flush-interval-msec", "50")
    proc: ProxyProcess
    if request.param == "envoy":
        proc = EnvoyProcess(ensure_envoy_binary(), bs, work, extra_args=args)
    else:
        proc = EnvoyxProcess(bs, work, extra_args=args)
    proc.start()
    try:
        yield Rig(proc, upstream, logs)
    finally:
        proc.stop()
        upstream.stop()


def _id() -> str:
    return f"s{next(_ids)}-{time.monotonic_ns()}"


def call(
    rig: Rig, path: str, script: str, *, listener: str = "external", **kw: Any
) -> tuple[str, httpx.Response]:
    sid = _id()
    headers = {"x-script": script, "x-script-id": sid, **kw.pop("headers", {})}
    method = kw.pop("method", "GET")
    with httpx.Client(timeout=10) as c:
        r = c.request(method, rig.url(path, listener), headers=headers, **kw)
    return sid, r


# -- retry_on classes ---------------------------------------------------------------------


def test_5xx_is_retried_until_success(rig: Rig) -> None:
    sid, r = call(rig, "/5xx", "503,500,200")
    assert r.status_code == 200
    assert r.text == "attempt 3 200"
    assert rig.upstream.count(sid) == 3
    rig.wait_stats(
        "5xx",
        {
            "upstream_rq_retry": 2,
            "upstream_rq_retry_success": 1,
            "retry.upstream_rq_503": 1,
            "retry.upstream_rq_500": 1,
            "upstream_rq_200": 1,
            "upstream_rq_503": 0,
            "upstream_rq_total": 3,
        },
    )
    assert rig.log_line(sid)[1:3] == ["200", "-"]


def test_retries_exhausted_return_the_last_answer_with_urx(rig: Rig) -> None:
    sid, r = call(rig, "/5xx", "503")
    assert r.status_code == 503
    assert r.text == "attempt 3 503"
    assert rig.upstream.count(sid) == 3
    assert rig.log_line(sid)[1:3] == ["503", "URX"]
    assert rig.stat("5xx", "upstream_rq_retry_limit_exceeded") >= 1


def test_gateway_error_retries_502_to_504_only(rig: Rig) -> None:
    sid, r = call(rig, "/gw", "500")
    assert (r.status_code, rig.upstream.count(sid)) == (500, 1)
    sid, r = call(rig, "/gw", "502,504,200")
    assert (r.status_code, rig.upstream.count(sid)) == (200, 3)


def test_reset_before_headers_is_retried(rig: Rig) -> None:
    sid, r = call(rig, "/reset", "reset,200")
    assert r.status_code == 200
    assert rig.upstream.count(sid) == 2
    # `reset` does not cover a 5xx answer.
    sid, r = call(rig, "/reset", "503,200")
    assert (r.status_code, rig.upstream.count(sid)) == (503, 1)


def test_retriable_status_codes_and_4xx(rig: Rig) -> None:
    sid, r = call(rig, "/codes", "418,200")
    assert (r.status_code, rig.upstream.count(sid)) == (200, 2)
    sid, r = call(rig, "/codes", "503,200")
    assert (r.status_code, rig.upstream.count(sid)) == (503, 1)
    sid, r = call(rig, "/4xx", "409,200")
    assert (r.status_code, rig.upstream.count(sid)) == (200, 2)
    sid, r = call(rig, "/4xx", "404,200")
    assert (r.status_code, rig.upstream.count(sid)) == (404, 1)


def test_a_failure_after_a_retry_that_is_not_retriable_is_not_flagged_urx(rig: Rig) -> None:
    """Retried once (418), then a reset the policy does not retry: the reply is the
    reset's own (``UC``), with the retried wording, and not ``URX``."""
    sid, r = call(rig, "/codes", "418,reset")
    assert (r.status_code, rig.upstream.count(sid)) == (503, 2)
    assert r.text.startswith(
        "upstream connect error or disconnect/reset before headers. "
        "retried and the latest reset reason: "
    )
    assert rig.log_line(sid)[1:3] == ["503", "UC"]


def test_connect_failure_retries_then_fails_with_envoys_reply(rig: Rig) -> None:
    sid, r = call(rig, "/dead", "200")
    assert r.status_code == 503
    assert r.text == (
        "upstream connect error or disconnect/reset before headers. "
        "retried and the latest reset reason: remote connection failure"
    )
    _, code, flags, details = rig.log_line(sid)
    assert (code, flags) == ("503", "URX,UF"), details
    rig.wait_stats(
        "dead",
        {"upstream_rq_retry": 2, "upstream_rq_retry_limit_exceeded": 1, "upstream_rq_503": 1},
    )


def test_a_dead_host_under_load_costs_the_client_nothing(rig: Rig) -> None:
    """Half the cluster refuses connections: every request that lands there is
    retried on the other host (``previous_hosts``), none fails."""
    sid = _id()
    headers = {"x-script": "200", "x-script-id": sid}
    with httpx.Client(timeout=10) as c:
        statuses = [c.get(rig.url("/pair"), headers=headers).status_code for _ in range(200)]
    assert statuses == [200] * 200
    assert rig.upstream.count(sid) == 200
    assert rig.stat("pair", "upstream_rq_retry") > 0
    assert rig.stat("pair", "upstream_rq_retry_limit_exceeded") == 0


def test_max_retries_of_the_cluster_stops_a_retry(rig: Rig) -> None:
    """``circuit_breakers.max_retries: 0``: the retry is not made, the upstream's own
    answer stands, flagged ``UO``."""
    sid, r = call(rig, "/cbretry", "503,200")
    assert (r.status_code, rig.upstream.count(sid)) == (503, 1)
    assert rig.log_line(sid)[1:3] == ["503", "UO"]
    rig.wait_stats("cbretry", {"upstream_rq_retry_overflow": 1, "upstream_rq_retry": 0})


# -- timeouts -----------------------------------------------------------------------------


def test_per_try_timeout_is_retried(rig: Rig) -> None:
    sid, r = call(rig, "/pertry", "hang,200")
    assert r.status_code == 200
    assert rig.upstream.count(sid) == 2
    # Each try is told its per-try timeout (it is shorter than what is left).
    assert [a.headers.get("x-envoy-expected-rq-timeout-ms") for a in rig.upstream.seen(sid)] == [
        "300",
        "300",
    ]
    rig.wait_stats("pertry", {"upstream_rq_per_try_timeout": 1, "upstream_rq_retry": 1})


def test_per_try_timeout_exhausted_is_504_ut(rig: Rig) -> None:
    sid, r = call(rig, "/pertry", "hang")
    assert r.status_code == 504
    assert r.text == "upstream request timeout"
    assert rig.upstream.count(sid) == 2
    _, code, flags, details = rig.log_line(sid)
    # Envoy lists URX before the failure's own flag.
    assert (code, flags, details) == ("504", "URX,UT", "upstream_per_try_timeout")


def test_per_try_idle_timeout_is_retried_then_504(rig: Rig) -> None:
    sid, r = call(rig, "/idle", "hang,200")
    assert (r.status_code, rig.upstream.count(sid)) == (200, 2)
    rig.wait_stats("idle", {"upstream_rq_per_try_idle_timeout": 1, "upstream_rq_retry": 1})
    sid, r = call(rig, "/idle", "hang")
    assert (r.status_code, rig.upstream.count(sid)) == (504, 2)
    _, code, flags, details = rig.log_line(sid)
    assert (code, flags, details) == ("504", "URX,UT", "upstream_per_try_idle_timeout")


def test_route_timeout_before_headers(rig: Rig) -> None:
    sid, r = call(rig, "/timeout", "hang")
    assert r.status_code == 504
    assert r.text == "upstream request timeout"
    _, code, flags, details = rig.log_line(sid)
    assert (code, flags, details) == ("504", "UT", "response_timeout")
    rig.wait_stats("timeout", {"upstream_rq_timeout": 1, "upstream_rq_504": 1})


def test_route_timeout_covers_the_whole_response(rig: Rig) -> None:
    """The route timeout runs until the response is complete: a body that stalls
    after the headers is cut off (the connection closed) at the timeout."""
    sid = _id()
    s = socket.create_connection(rig.proxy.listener_address("external"), timeout=5)
    s.sendall(
        f"GET /stall HTTP/1.1\r\nhost: x\r\nx-script: stall\r\nx-script-id: {sid}\r\n\r\n".encode()
    )
    start = time.monotonic()
    got = b""
    while True:
        data = s.recv(65536)
        if not data:
            break
        got += data
    elapsed = time.monotonic() - start
    s.close()
    assert got.startswith(b"HTTP/1.1 200")
    assert got.endswith(b"half!"), got
    assert elapsed < 4, "cut off at the route timeout, not at the upstream's leisure"
    _, code, flags, _ = rig.log_line(sid)
    assert (code, flags) == ("200", "UT")
    rig.wait_stats("stall", {"upstream_rq_timeout": 1})


@pytest.mark.parametrize("failure", ["stall", "cut"])
def test_no_retry_once_the_response_started(rig: Rig, failure: str) -> None:
    """A response that fails mid-body (stalls past the route timeout, or is reset)
    is not retried: its headers already went to the client (Envoy's rule)."""
    sid = _id()
    s = socket.create_connection(rig.proxy.listener_address("external"), timeout=5)
    head = f"GET /stallretry HTTP/1.1\r\nhost: x\r\nx-script: {failure}\r\nx-script-id: {sid}\r\n"
    s.sendall(head.encode() + b"\r\n")
    got = b""
    while data := s.recv(65536):
        got += data
    s.close()
    assert got.startswith(b"HTTP/1.1 200")
    assert rig.upstream.count(sid) == 1


GRPC = {"content-type": "application/grpc", "te": "trailers"}


def test_grpc_timeout_header_limits_the_stream(rig: Rig) -> None:
    """``grpc_timeout_header_max``: a gRPC request's ``grpc-timeout`` is its stream's
    limit, capped by the route; the reply is a gRPC status (DEADLINE_EXCEEDED)."""
    start = time.monotonic()
    _, r = call(rig, "/grpc", "hang", headers={**GRPC, "grpc-timeout": "200m"})
    assert r.status_code == 200
    assert r.headers["grpc-status"] == "4"
    assert r.headers["grpc-message"] == "downstream duration timeout"
    assert r.content == b""
    assert time.monotonic() - start < 1, "the header's 200 ms, not the route's 2 s cap"
    start = time.monotonic()
    _sid, r = call(rig, "/grpc", "hang", headers={**GRPC, "grpc-timeout": "20S"})
    assert r.headers["grpc-status"] == "4"
    elapsed = time.monotonic() - start
    assert elapsed < 3, "capped at grpc_timeout_header_max"
    assert elapsed > 1.5, "the cap (2 s) applies, not a shorter limit"


def test_route_max_stream_duration(rig: Rig) -> None:
    _sid, r = call(rig, "/duration", "hang")
    assert (r.status_code, r.text) == (504, "downstream duration timeout")


def test_a_grpc_request_gets_its_local_replies_as_grpc_statuses(rig: Rig) -> None:
    _, r = call(rig, "/dead", "200", headers=GRPC)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/grpc"
    assert r.headers["grpc-status"] == "14"  # UNAVAILABLE, from 503
    assert r.headers["grpc-message"] == (
        "upstream connect error or disconnect/reset before headers. "
        "retried and the latest reset reason: remote connection failure"
    )
    _sid, r = call(rig, "/timeout", "hang", headers=GRPC)
    assert (r.status_code, r.headers["grpc-status"]) == (200, "14")  # from 504
    assert r.headers["grpc-message"] == "upstream request timeout"


# -- bodies -------------------------------------------------------------------------------


def test_a_retried_request_sends_its_body_again(rig: Rig) -> None:
    sid, r = call(rig, "/body", "503,503,200", method="POST", content=b"payload-123")
    assert r.status_code == 200
    bodies = [a.body for a in rig.upstream.seen(sid)]
    assert bodies == [b"payload-123"] * 3


def test_a_body_beyond_the_buffer_limit_is_not_retried(rig: Rig) -> None:
    sid, r = call(rig, "/buffer", "503,200", method="POST", content=b"0123456789")
    assert r.status_code == 503
    assert rig.upstream.count(sid) == 1
    sid, r = call(rig, "/buffer", "503,200", method="POST", content=b"012")
    assert (r.status_code, rig.upstream.count(sid)) == (200, 2)


# -- attempt counts, back-off -------------------------------------------------------------


def test_attempt_count_headers(rig: Rig) -> None:
    sid, r = call(rig, "/", "503,200", headers={"host": "counted.test"})
    assert r.status_code == 200
    assert r.headers["x-envoy-attempt-count"] == "2"
    assert [a.headers.get("x-envoy-attempt-count") for a in rig.upstream.seen(sid)] == ["1", "2"]


def test_back_off_spaces_retries(rig: Rig) -> None:
    """Envoy's back-off is random below base, 2 x base, … capped at max: with base =
    max = 200 ms three retries take a random time below 0.6 s, 0.3 s on average. Each
    request is bounded; eight of them (24 back-offs, 2.4 s expected) cannot all be
    near zero unless there is no back-off."""
    total = time.monotonic()
    for _ in range(8):
        start = time.monotonic()
        sid, r = call(rig, "/backoff", "503,503,503,200")
        assert (r.status_code, rig.upstream.count(sid)) == (200, 4)
        assert time.monotonic() - start < 3
    assert time.monotonic() - total > 0.8, "retries were not spaced by a back-off"


def test_rate_limited_back_off_waits_as_the_reset_header_says(rig: Rig) -> None:
    """`rate_limited_retry_back_off`: a retried 429's `retry-after: 1` makes the next
    try wait between 1 and 1.5 s (Envoy's lower-bound jitter), counted as a
    rate-limited back-off; a value above `max_interval` falls back to the exponential
    back-off."""
    start = time.monotonic()
    sid, r = call(rig, "/ratelimited", "429;retry-after=1,200")
    waited = time.monotonic() - start
    assert (r.status_code, r.text, rig.upstream.count(sid)) == (200, "attempt 2 200", 2)
    assert waited >= 1.0, f"the retry came after {waited:.3f} s, before retry-after"
    rig.wait_stats(
        "ratelimited",
        {
            "upstream_rq_retry_backoff_ratelimited": 1,
            "upstream_rq_retry_backoff_exponential": 0,
        },
    )
    # 60 s is above max_interval (5 s): skipped, the second header is absent.
    sid, r = call(rig, "/ratelimited", "429;retry-after=60,200")
    assert (r.status_code, rig.upstream.count(sid)) == (200, 2)
    rig.wait_stats(
        "ratelimited",
        {
            "upstream_rq_retry_backoff_ratelimited": 1,
            "upstream_rq_retry_backoff_exponential": 1,
        },
    )
    # The second header, a Unix time 1-2 s ahead, is read when the first is absent.
    reset = int(time.time()) + 2
    start = time.monotonic()
    sid, r = call(rig, "/ratelimited", f"429;x-ratelimit-reset={reset},200")
    assert (r.status_code, rig.upstream.count(sid)) == (200, 2)
    assert time.monotonic() - start >= 1.0
    rig.wait_stats(
        "ratelimited",
        {
            "upstream_rq_retry_backoff_ratelimited": 2,
            "upstream_rq_retry_backoff_exponential": 1,
        },
    )


def test_hedging_keeps_the_first_try_after_its_per_try_timeout(rig: Rig) -> None:
    """`hedge_on_per_try_timeout`: at the first try's per-try timeout (0.3 s) a second
    try starts beside it; the first answers at 0.45 s and wins, the second (which would
    answer at 1.5 s) is reset. Without hedging the first try would have been reset and
    the second's answer returned (test_per_try_timeout_is_retried)."""
    sid, r = call(rig, "/hedge", "slow:450,slow:1500")
    assert (r.status_code, r.text) == (200, "attempt 1 200")
    assert rig.upstream.count(sid) == 2
    # A hedged request's tries may each run until the route's timeout: the expected
    # timeout the upstream is told is the route's (what is left of it for the hedge),
    # not the per-try one.
    first, hedge = (
        int(a.headers["x-envoy-expected-rq-timeout-ms"]) for a in rig.upstream.seen(sid)
    )
    assert first == 5000
    assert 4000 < hedge <= 5000 - 300
    rig.wait_stats(
        "hedge",
        # A hedge resets nothing: no per-try timeout is counted.
        {"upstream_rq_per_try_timeout": 0, "upstream_rq_retry": 1, "upstream_rq_200": 1},
    )
    _, code, flags, _ = rig.log_line(sid)
    assert (code, flags) == ("200", "-")


@pytest.mark.parametrize(
    ("path", "script"),
    [("/loghedge", "slow:450,200"), ("/loghedge", "slow:1500,200"), ("/retrylog", "503,200")],
)
def test_the_access_log_reads_the_headers_the_route_added(rig: Rig, path: str, script: str) -> None:
    """``%REQ(x)%`` of a header the route's ``request_headers_to_add`` set is logged,
    on a hedged request (two tries in flight) as on a retried one (Envoy's log reads
    the request map its router mutated)."""
    sid, r = call(rig, path, script)
    assert r.status_code == 200
    assert rig.upstream.count(sid) == 2
    log = _added_log(rig.logs["external"])
    found: list[str] = []

    def check() -> bool:
        text = log.read_text() if log.exists() else ""
        found[:] = [ln for ln in text.splitlines() if ln.startswith(sid + " ")]
        return bool(found)

    until(check, timeout=5, what=f"added-header log line of {sid}")
    assert found == [f"{sid} by-route"]


def test_a_hedged_try_answers_when_the_first_is_slower(rig: Rig) -> None:
    sid, r = call(rig, "/hedge", "slow:1500,200")
    assert (r.status_code, r.text) == (200, "attempt 2 200")
    assert rig.upstream.count(sid) == 2


def test_hedging_with_no_retry_left_waits_for_the_outstanding_tries(rig: Rig) -> None:
    """num_retries 1: the second try's per-try timeout finds no retry left (the
    request is flagged URX) but both tries go on; the first to answer wins."""
    sid, r = call(rig, "/hedge", "slow:900,slow:1200")
    assert (r.status_code, r.text) == (200, "attempt 1 200")
    assert rig.upstream.count(sid) == 2
    _, code, flags, _ = rig.log_line(sid)
    assert (code, flags) == ("200", "URX")


def test_a_retriable_answer_of_a_hedged_try_waits_for_the_other(rig: Rig) -> None:
    """The first try, already hedged, answers 503 (retriable under 5xx, but a hedged
    try is not retried again): it is dropped while the hedge is out, and the hedge's
    answer is the request's."""
    sid, r = call(rig, "/hedge", "503@450,slow:900")
    assert (r.status_code, r.text) == (200, "attempt 2 200")
    assert rig.upstream.count(sid) == 2
    _, code, flags, _ = rig.log_line(sid)
    assert (code, flags) == ("200", "URX")


# -- internal and external requests -------------------------------------------------------

CONTROL = {
    "x-envoy-retry-on": "5xx",
    "x-envoy-max-retries": "3",
    "x-envoy-upstream-rq-timeout-ms": "200",
    "x-envoy-upstream-rq-per-try-timeout-ms": "100",
    "x-envoy-retriable-status-codes": "418",
    "x-envoy-force-trace": "1",
}


def test_an_external_request_cannot_steer_retries_or_timeouts(rig: Rig) -> None:
    sid, r = call(rig, "/plain", "503,503,200", headers=CONTROL)
    assert (r.status_code, rig.upstream.count(sid)) == (503, 1)
    seen = rig.upstream.seen(sid)[0].headers
    for name in CONTROL:
        assert name not in seen, f"{name} forwarded from an external client"
    assert seen["x-envoy-expected-rq-timeout-ms"] == "15000"
    assert "x-envoy-internal" not in seen
    assert seen["x-envoy-external-address"] == "127.0.0.1"


def test_an_internal_request_steers_retries_and_timeouts(rig: Rig) -> None:
    sid, r = call(rig, "/plain", "503,503,200", listener="internal", headers=CONTROL)
    assert (r.status_code, rig.upstream.count(sid)) == (200, 3)
    seen = rig.upstream.seen(sid)[0].headers
    assert seen["x-envoy-internal"] == "true"
    assert seen["x-envoy-expected-rq-timeout-ms"] == "100"
    for name in ("x-envoy-retry-on", "x-envoy-max-retries", "x-envoy-upstream-rq-timeout-ms"):
        assert name not in seen, f"{name} is consumed, not forwarded"
    assert seen["x-envoy-force-trace"] == "1"
    # The request's timeout header applies: a hanging upstream gives 504 quickly.
    start = time.monotonic()
    sid, r = call(
        rig,
        "/plain",
        "hang",
        listener="internal",
        headers={"x-envoy-upstream-rq-timeout-ms": "200"},
    )
    assert r.status_code == 504
    assert time.monotonic() - start < 3


# -- what envoyx refuses ------------------------------------------------------------------

ROUTE_PATH = (
    "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"
    ".route_config.virtual_hosts[0].routes[0].route"
)


@pytest.mark.parametrize(
    ("action", "message"),
    [
        pytest.param(
            {"retry_policy": {"retry_on": "5xx,bogus"}},
            f'{ROUTE_PATH}.retry_policy.retry_on: unknown retry condition "bogus"',
            id="unknown-retry-on",
        ),
        pytest.param(
            {"retry_policy": {"retry_on": "http3-post-connect-failure"}},
            "http3-post-connect-failure is not supported by envoyx",
            id="http3",
        ),
        pytest.param(
            {
                "retry_policy": {
                    "retry_on": "5xx",
                    "rate_limited_retry_back_off": {"reset_headers": [{"name": "bad header"}]},
                }
            },
            f"{ROUTE_PATH}.retry_policy.rate_limited_retry_back_off.reset_headers[0].name: "
            'invalid header name "bad header"',
            id="rate-limited-back-off-header",
        ),
        pytest.param(
            {"hedge_policy": {"additional_request_chance": {"numerator": 1}}},
            f"{ROUTE_PATH}.hedge_policy.additional_request_chance: not supported by envoyx",
            id="hedging-chance",
        ),
    ],
)
def test_what_envoyx_does_not_implement_is_refused_by_name(
    tmp_path: Path, action: Json, message: str
) -> None:
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": "c", **action}}]
    lis = _listener("l", free_port(), tmp_path / "l.log", internal=False)
    hcm = lis["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["route_config"]["virtual_hosts"] = [{"name": "v", "domains": ["*"], "routes": routes}]
    bs = bootstrap(
        admin_port=free_port(), listeners=[lis], clusters=[cluster("c", [("127.0.0.1", 1)])]
    )
    proc = EnvoyxProcess(bs, tmp_path).spawn()
    try:
        assert proc.wait_exit(20) != 0
        assert message in proc.log_text()
    finally:
        proc.stop()
