"""Outlier detection, end to end, against envoyx and (as a second parametrization of
``start_proxy``) the real Envoy 1.40 with the same bootstrap and the same expected
stats.

Two real upstream processes (:mod:`support.health_upstream`) behind a round-robin
cluster: one answers well, the other with the status the test sets (or is killed).
Requests go one at a time, so round robin alternates and the n-th error of the bad
host is known: the ejection stats are exact, not "at least".
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from support.bootstrap import bootstrap, cluster, http_listener, route, virtual_host
from support.health_upstream import HealthUpstream
from support.proxy import ProxyProcess
from support.wait import free_port, until

StartProxy = Callable[..., ProxyProcess]
Json = dict[str, Any]
CLUSTER = "backend"
OD = f"cluster.{CLUSTER}.outlier_detection."


@pytest.fixture
def upstreams() -> Iterator[Callable[[str], HealthUpstream]]:
    started: list[HealthUpstream] = []

    def make(name: str) -> HealthUpstream:
        up = HealthUpstream(name).start()
        started.append(up)
        return up

    yield make
    for up in started:
        up.stop()


def proxy_config(endpoints: list[tuple[str, int]], outlier: Json) -> Json:
    c = cluster(CLUSTER, endpoints)
    c["outlier_detection"] = outlier
    return bootstrap(
        admin_port=free_port(),
        listeners=[
            http_listener(
                port=free_port(),
                virtual_hosts=[
                    virtual_host("all", ["*"], [route({"prefix": "/"}, cluster=CLUSTER)])
                ],
            )
        ],
        clusters=[c],
    )


def host_flags(proxy: ProxyProcess) -> dict[str, str]:
    _, _, body = proxy.admin("/clusters")
    out = {}
    for line in body.decode().splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == CLUSTER and parts[2] == "health_flags":
            out[parts[1]] = parts[3]
    return out


def addr(up: HealthUpstream) -> str:
    return f"127.0.0.1:{up.port}"


def wait_flags(proxy: ProxyProcess, expected: dict[str, str], timeout: float = 10.0) -> None:
    seen: dict[str, str] = {}

    def check() -> bool:
        nonlocal seen
        seen = host_flags(proxy)
        return seen == expected

    try:
        until(check, timeout=timeout, what="health flags")
    except Exception:
        raise AssertionError(f"{proxy.kind}: flags {seen}, expected {expected}") from None


def send(proxy: ProxyProcess, n: int) -> list[tuple[int, str]]:
    """``n`` requests one after another: (status, upstream name or "")."""
    out = []
    with httpx.Client(timeout=5) as client:
        for _ in range(n):
            r = client.get(proxy.url("/work"))
            out.append((r.status_code, r.headers.get("x-upstream", "")))
    return out


def od_stats(proxy: ProxyProcess) -> dict[str, int]:
    return {k[len(OD) :]: v for k, v in proxy.stats().items() if k.startswith(OD)}


ALL_ZERO = {
    "ejections_active": 0,
    "ejections_overflow": 0,
    "ejections_total": 0,
    "ejections_consecutive_5xx": 0,
    "ejections_success_rate": 0,
    "ejections_enforced_total": 0,
    "ejections_detected_degradation": 0,
    "ejections_detected_consecutive_5xx": 0,
    "ejections_enforced_consecutive_5xx": 0,
    "ejections_detected_consecutive_gateway_failure": 0,
    "ejections_enforced_consecutive_gateway_failure": 0,
    "ejections_detected_consecutive_local_origin_failure": 0,
    "ejections_enforced_consecutive_local_origin_failure": 0,
    "ejections_detected_success_rate": 0,
    "ejections_enforced_success_rate": 0,
    "ejections_detected_local_origin_success_rate": 0,
    "ejections_enforced_local_origin_success_rate": 0,
    "ejections_detected_failure_percentage": 0,
    "ejections_enforced_failure_percentage": 0,
    "ejections_detected_local_origin_failure_percentage": 0,
    "ejections_enforced_local_origin_failure_percentage": 0,
}


def wait_od(proxy: ProxyProcess, expected: dict[str, int]) -> None:
    want = {**ALL_ZERO, **expected}
    seen: dict[str, int] = {}

    def check() -> bool:
        nonlocal seen
        seen = od_stats(proxy)
        return seen == want

    try:
        until(check, timeout=5, what="outlier stats")
    except Exception:
        diff = {k: (seen.get(k), v) for k, v in want.items() if seen.get(k) != v}
        raise AssertionError(f"{proxy.kind}: outlier stats (seen, expected) {diff}") from None


def test_consecutive_5xx_ejects_then_the_host_returns(
    start_proxy: StartProxy, upstreams: Callable[[str], HealthUpstream]
) -> None:
    a, b = upstreams("a"), upstreams("b")
    b.set(status=500)
    outlier = {
        "consecutive_5xx": 3,
        "interval": "0.2s",
        "base_ejection_time": "2s",
        "max_ejection_percent": 100,
    }
    proxy = start_proxy(proxy_config([a.address, b.address], outlier))
    wait_od(proxy, {})
    results = send(proxy, 6)  # a, b, a, b, a, b: b's third 500 ejects it
    assert results.count((500, "b")) == 3
    wait_flags(proxy, {addr(a): "healthy", addr(b): "/failed_outlier_check"})
    wait_od(
        proxy,
        {
            "ejections_active": 1,
            "ejections_total": 1,
            "ejections_consecutive_5xx": 1,
            "ejections_enforced_total": 1,
            "ejections_detected_consecutive_5xx": 1,
            "ejections_enforced_consecutive_5xx": 1,
        },
    )
    # Traffic goes on, error-free, on the remaining host.
    assert send(proxy, 8) == [(200, "a")] * 8
    b.set(status=200)
    # Back after base_ejection_time (x1: its first ejection), on an interval tick.
    wait_flags(proxy, {addr(a): "healthy", addr(b): "healthy"})
    assert od_stats(proxy)["ejections_active"] == 0
    until(lambda: {n for _, n in send(proxy, 4)} == {"a", "b"}, timeout=5, what="both serve")


def test_max_ejection_percent_overflow(
    start_proxy: StartProxy, upstreams: Callable[[str], HealthUpstream]
) -> None:
    """With the default max_ejection_percent (10%), ejecting one of two hosts (50%)
    is refused: counted as an overflow, and the host stays in rotation."""
    a, b = upstreams("a"), upstreams("b")
    b.set(status=500)
    proxy = start_proxy(proxy_config([a.address, b.address], {"consecutive_5xx": 3}))
    send(proxy, 6)
    wait_od(
        proxy,
        {
            "ejections_overflow": 1,
            "ejections_consecutive_5xx": 1,
            "ejections_detected_consecutive_5xx": 1,
        },
    )
    assert host_flags(proxy) == {addr(a): "healthy", addr(b): "healthy"}
    assert {n for _, n in send(proxy, 2)} == {"a", "b"}


@pytest.mark.parametrize("enforcing", [0, 100])
def test_consecutive_gateway_failure_and_its_enforcement(
    start_proxy: StartProxy, upstreams: Callable[[str], HealthUpstream], enforcing: int
) -> None:
    """503s are gateway failures; enforcing_consecutive_gateway_failure defaults to 0
    (detected, not ejected)."""
    a, b = upstreams("a"), upstreams("b")
    b.set(status=503)
    outlier: Json = {
        "consecutive_5xx": 100,
        "consecutive_gateway_failure": 2,
        "interval": "0.2s",
        "max_ejection_percent": 100,
    }
    if enforcing:
        outlier["enforcing_consecutive_gateway_failure"] = enforcing
    proxy = start_proxy(proxy_config([a.address, b.address], outlier))
    send(proxy, 4)
    if enforcing:
        wait_od(
            proxy,
            {
                "ejections_active": 1,
                "ejections_enforced_total": 1,
                "ejections_detected_consecutive_gateway_failure": 1,
                "ejections_enforced_consecutive_gateway_failure": 1,
            },
        )
        wait_flags(proxy, {addr(a): "healthy", addr(b): "/failed_outlier_check"})
    else:
        wait_od(proxy, {"ejections_detected_consecutive_gateway_failure": 1})
        assert host_flags(proxy) == {addr(a): "healthy", addr(b): "healthy"}


def test_killed_upstream_is_ejected_by_connect_failures(
    start_proxy: StartProxy, upstreams: Callable[[str], HealthUpstream]
) -> None:
    """Connection failures count as 503s (no split_external_local_origin_errors)."""
    a, b = upstreams("a"), upstreams("b")
    outlier = {"consecutive_5xx": 2, "interval": "0.2s", "max_ejection_percent": 100}
    proxy = start_proxy(proxy_config([a.address, b.address], outlier))
    assert {n for _, n in send(proxy, 2)} == {"a", "b"}
    b.kill()
    results = send(proxy, 4)
    assert results.count((503, "")) == 2
    wait_flags(proxy, {addr(a): "healthy", addr(b): "/failed_outlier_check"})
    assert send(proxy, 6) == [(200, "a")] * 6


def test_split_local_origin_errors(
    start_proxy: StartProxy, upstreams: Callable[[str], HealthUpstream]
) -> None:
    """With split_external_local_origin_errors, connect failures count on their own
    (consecutive_local_origin_failure), not as 5xx."""
    a, b = upstreams("a"), upstreams("b")
    outlier = {
        "split_external_local_origin_errors": True,
        "consecutive_local_origin_failure": 2,
        "consecutive_5xx": 2,
        "interval": "0.2s",
        "max_ejection_percent": 100,
    }
    proxy = start_proxy(proxy_config([a.address, b.address], outlier))
    b.kill()
    send(proxy, 4)
    wait_od(
        proxy,
        {
            "ejections_active": 1,
            "ejections_enforced_total": 1,
            "ejections_detected_consecutive_local_origin_failure": 1,
            "ejections_enforced_consecutive_local_origin_failure": 1,
        },
    )


def test_failure_percentage(
    start_proxy: StartProxy, upstreams: Callable[[str], HealthUpstream]
) -> None:
    a, b = upstreams("a"), upstreams("b")
    b.set(status=500)
    outlier = {
        "consecutive_5xx": 1000,
        "interval": "1s",
        "max_ejection_percent": 100,
        "failure_percentage_minimum_hosts": 2,
        "failure_percentage_request_volume": 5,
        "failure_percentage_threshold": 50,
        "enforcing_failure_percentage": 100,
    }
    proxy = start_proxy(proxy_config([a.address, b.address], outlier))
    send(proxy, 40)
    wait_flags(proxy, {addr(a): "healthy", addr(b): "/failed_outlier_check"})
    stats = od_stats(proxy)
    assert stats["ejections_detected_failure_percentage"] == 1
    assert stats["ejections_enforced_failure_percentage"] == 1
    assert stats["ejections_active"] == 1


def test_clusters_json_reports_the_ejection(
    start_proxy: StartProxy, upstreams: Callable[[str], HealthUpstream]
) -> None:
    a, b = upstreams("a"), upstreams("b")
    b.set(status=500)
    outlier = {"consecutive_5xx": 2, "interval": "0.2s", "max_ejection_percent": 100}
    proxy = start_proxy(proxy_config([a.address, b.address], outlier))
    send(proxy, 4)
    wait_flags(proxy, {addr(a): "healthy", addr(b): "/failed_outlier_check"})
    _, _, body = proxy.admin("/clusters?format=json")
    (status,) = [c for c in json.loads(body)["cluster_statuses"] if c["name"] == CLUSTER]
    by_port = {
        h["address"]["socket_address"]["port_value"]: h["health_status"]
        for h in status["host_statuses"]
    }
    assert by_port[b.port] == {"failed_outlier_check": True, "eds_health_status": "HEALTHY"}
    assert by_port[a.port] == {"eds_health_status": "HEALTHY"}


def test_outlier_event_service_is_refused_by_name(tmp_path: Any) -> None:
    """The bootstrap's ``cluster_manager.outlier_detection.event_log_path`` is written
    (tests/test_event_logs.py); a gRPC ``event_service`` is refused, not ignored."""
    import envoyx

    config = proxy_config([("127.0.0.1", 1)], {"consecutive_5xx": 2})
    config["cluster_manager"] = {
        "outlier_detection": {
            "event_log_path": str(tmp_path / "od.log"),
            "event_service": {"grpc_service": {"envoy_grpc": {"cluster_name": CLUSTER}}},
        }
    }
    with pytest.raises(
        envoyx.ConfigError,
        match=r"cluster_manager\.outlier_detection\.event_service: not supported",
    ):
        envoyx.Server(config)


@pytest.mark.parametrize("uneject", [True, False])
def test_passing_health_check_unejects(
    start_proxy: StartProxy, upstreams: Callable[[str], HealthUpstream], uneject: bool
) -> None:
    """With active health checking, a check that passes brings an ejected host back
    long before base_ejection_time (``successful_active_health_check_uneject_host``,
    default true); with it false the host stays ejected."""
    a, b = upstreams("a"), upstreams("b")
    config = proxy_config(
        [a.address, b.address],
        {
            "consecutive_5xx": 2,
            "interval": "0.2s",
            "base_ejection_time": "60s",
            "max_ejection_percent": 100,
            "successful_active_health_check_uneject_host": uneject,
        },
    )
    config["static_resources"]["clusters"][0]["health_checks"] = [
        {
            "timeout": "1s",
            "interval": "0.5s",
            "no_traffic_interval": "0.5s",
            "unhealthy_threshold": 2,
            "healthy_threshold": 1,
            "http_health_check": {"path": "/healthz"},
        }
    ]
    proxy = start_proxy(config)
    until(lambda: host_flags(proxy) == {addr(a): "healthy", addr(b): "healthy"}, timeout=5)
    b.set(status=500)  # traffic fails, its health checks pass
    send(proxy, 4)
    if uneject:
        wait_flags(proxy, {addr(a): "healthy", addr(b): "healthy"})
        assert od_stats(proxy)["ejections_enforced_consecutive_5xx"] == 1
    else:
        wait_flags(proxy, {addr(a): "healthy", addr(b): "/failed_outlier_check"})
        time.sleep(1.5)  # three passing checks
        assert host_flags(proxy) == {addr(a): "healthy", addr(b): "/failed_outlier_check"}


def test_success_rate(start_proxy: StartProxy, upstreams: Callable[[str], HealthUpstream]) -> None:
    """Three hosts, one failing every request: its success rate (0) is below
    mean - 1.0 x stdev (66.7 - 47.1) of the interval, so it is ejected."""
    a, b, c = upstreams("a"), upstreams("b"), upstreams("c")
    c.set(status=500)
    outlier = {
        "consecutive_5xx": 1000,
        "interval": "1s",
        "max_ejection_percent": 100,
        "success_rate_minimum_hosts": 3,
        "success_rate_request_volume": 5,
        "success_rate_stdev_factor": 1000,
    }
    proxy = start_proxy(proxy_config([a.address, b.address, c.address], outlier))
    send(proxy, 60)
    wait_flags(proxy, {addr(a): "healthy", addr(b): "healthy", addr(c): "/failed_outlier_check"})
    stats = od_stats(proxy)
    assert stats["ejections_detected_success_rate"] == 1
    assert stats["ejections_enforced_success_rate"] == 1
    assert stats["ejections_success_rate"] == 1
    assert stats["ejections_total"] == 1
