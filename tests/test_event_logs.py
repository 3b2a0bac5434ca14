"""Health-check and outlier-detection event logs, and the health-check fields that
came with them (``service_name_matcher``, gRPC ``initial_metadata``), against envoyx
and (as a second parametrization of ``start_proxy``) the real Envoy 1.40 with the
same bootstrap and the same expected events.

The events are Envoy's proto-JSON lines (``envoy.data.cluster.v3.OutlierDetectionEvent``,
``envoy.data.core.v3.HealthCheckEvent``); a test compares each line whole with its
timestamp (and, where it depends on timing, ``secs_since_last_action``) masked.
Files are read after the proxy stopped: both write what they buffered on exit.
Upstreams are real processes (:mod:`support.health_upstream`) or a grpcio server.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml

from support.bootstrap import (
    HTTP_OPTIONS_TYPE,
    bootstrap,
    cluster,
    http_listener,
    route,
    virtual_host,
)
from support.health_upstream import HealthUpstream
from support.proxy import ProxyProcess
from support.wait import free_port, until

StartProxy = Callable[..., ProxyProcess]
Json = dict[str, Any]
CLUSTER = "backend"
FILE_SINK = (
    "type.googleapis.com/envoy.extensions.health_check.event_sinks.file.v3.HealthCheckEventFileSink"
)
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z$")


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


def config(c: Json, **top: Any) -> Json:
    b = bootstrap(
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
    b.update(top)
    return b


def http_check(**overrides: Any) -> Json:
    hc: Json = {
        "timeout": "1s",
        "interval": "0.1s",
        "no_traffic_interval": "0.1s",
        "unhealthy_threshold": 2,
        "healthy_threshold": 1,
        "http_health_check": {"path": "/healthz"},
    }
    hc.update(overrides)
    return hc


def host_flags(proxy: ProxyProcess) -> dict[str, str]:
    _, _, body = proxy.admin("/clusters")
    out = {}
    for line in body.decode().splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == CLUSTER and parts[2] == "health_flags":
            out[parts[1]] = parts[3]
    return out


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


def at_least(proxy: ProxyProcess, stat: str, n: int) -> dict[str, int]:
    """Waits until the cluster's ``stat`` reaches ``n``; all stats read then."""
    seen: dict[str, int] = {}

    def check() -> bool:
        nonlocal seen
        seen = proxy.stats()
        return seen.get(f"cluster.{CLUSTER}.{stat}", 0) >= n

    until(check, timeout=10, what=f"{stat} >= {n}")
    return seen


def addr(up: HealthUpstream) -> str:
    return f"127.0.0.1:{up.port}"


def send(proxy: ProxyProcess, n: int) -> list[str]:
    with httpx.Client(timeout=5) as client:
        return [client.get(proxy.url("/work")).headers.get("x-upstream", "") for _ in range(n)]


def events(path: Path) -> list[Json]:
    """The file's JSON lines, each timestamp checked for protobuf's form, then masked."""
    out = []
    for line in path.read_text().splitlines():
        event = json.loads(line)
        assert TIMESTAMP.match(event.pop("timestamp")), line
        out.append(event)
    return out


# -- outlier detection ----------------------------------------------------------------


def od_event(
    up: HealthUpstream, kind: str, action: str, n: int, enforced: bool, **rest: Any
) -> Json:
    event = {
        "type": kind,
        "cluster_name": CLUSTER,
        "upstream_url": addr(up),
        "action": action,
        "num_ejections": n,
        "enforced": enforced,
    }
    event.update(rest)
    return event


def since_masked(event: Json) -> Json:
    """``secs_since_last_action`` depends on timing: its presence and form are kept."""
    if "secs_since_last_action" in event:
        assert re.fullmatch(r"\d+", event["secs_since_last_action"]), event
        event = {**event, "secs_since_last_action": "N"}
    return event


def test_outlier_events_eject_unenforced_and_uneject(
    start_proxy: StartProxy, upstreams: Callable[[str], HealthUpstream], tmp_path: Path
) -> None:
    """503s: two consecutive gateway failures are detected but not enforced (logged
    with ``enforced: false``), the third 5xx ejects; base_ejection_time later the
    host comes back (UNEJECT), and a second ejection counts 2."""
    a, b = upstreams("a"), upstreams("b")
    b.set(status=503)
    log = tmp_path / "outlier.log"
    c = cluster(CLUSTER, [a.address, b.address])
    c["outlier_detection"] = {
        "consecutive_5xx": 3,
        "consecutive_gateway_failure": 2,
        "interval": "0.2s",
        "base_ejection_time": "1s",
        "max_ejection_percent": 100,
    }
    proxy = start_proxy(
        config(c, cluster_manager={"outlier_detection": {"event_log_path": str(log)}})
    )
    send(proxy, 6)  # a, b, a, b, a, b
    wait_flags(proxy, {addr(a): "healthy", addr(b): "/failed_outlier_check"})
    wait_flags(proxy, {addr(a): "healthy", addr(b): "healthy"})
    until(lambda: "b" in send(proxy, 2), timeout=5, what="b serves again")
    send(proxy, 6)
    wait_flags(proxy, {addr(a): "healthy", addr(b): "/failed_outlier_check"})
    proxy.stop()
    consecutive = {"eject_consecutive_event": {}}
    got = [since_masked(e) for e in events(log)]
    assert got[:4] == [
        od_event(b, "CONSECUTIVE_GATEWAY_FAILURE", "EJECT", 0, False, **consecutive),
        od_event(b, "CONSECUTIVE_5XX", "EJECT", 1, True, **consecutive),
        od_event(b, "CONSECUTIVE_5XX", "UNEJECT", 1, False, secs_since_last_action="N"),
        od_event(
            b,
            "CONSECUTIVE_GATEWAY_FAILURE",
            "EJECT",
            1,
            False,
            secs_since_last_action="N",
            **consecutive,
        ),
    ], (proxy.kind, got)
    assert got[4:] == [
        od_event(b, "CONSECUTIVE_5XX", "EJECT", 2, True, secs_since_last_action="N", **consecutive)
    ], (proxy.kind, got)


def test_outlier_events_of_success_rate_and_failure_percentage(
    start_proxy: StartProxy, upstreams: Callable[[str], HealthUpstream], tmp_path: Path
) -> None:
    """Three hosts, one failing every request: success rate 0 against a mean of 66
    and a threshold of 19 (mean - 1.0 x stdev); the detail carries the truncated
    uint32 figures."""
    a, b, c3 = upstreams("a"), upstreams("b"), upstreams("c")
    c3.set(status=500)
    log = tmp_path / "outlier.log"
    c = cluster(CLUSTER, [a.address, b.address, c3.address])
    c["outlier_detection"] = {
        "consecutive_5xx": 1000,
        "interval": "1s",
        "base_ejection_time": "60s",
        "max_ejection_percent": 100,
        "success_rate_minimum_hosts": 3,
        "success_rate_request_volume": 5,
        "success_rate_stdev_factor": 1000,
    }
    proxy = start_proxy(
        config(c, cluster_manager={"outlier_detection": {"event_log_path": str(log)}})
    )
    until(
        lambda: (send(proxy, 15), host_flags(proxy).get(addr(c3)) == "/failed_outlier_check")[1],
        timeout=15,
        what="c ejected",
    )
    proxy.stop()
    got = events(log)
    assert got == [
        od_event(
            c3,
            "SUCCESS_RATE",
            "EJECT",
            1,
            True,
            eject_success_rate_event={
                "host_success_rate": 0,
                "cluster_average_success_rate": 66,
                "cluster_success_rate_ejection_threshold": 19,
            },
        )
    ], (proxy.kind, got)


def test_failure_percentage_event(
    start_proxy: StartProxy, upstreams: Callable[[str], HealthUpstream], tmp_path: Path
) -> None:
    a, b = upstreams("a"), upstreams("b")
    b.set(status=500)
    log = tmp_path / "outlier.log"
    c = cluster(CLUSTER, [a.address, b.address])
    c["outlier_detection"] = {
        "consecutive_5xx": 1000,
        "interval": "1s",
        "base_ejection_time": "60s",
        "max_ejection_percent": 100,
        "failure_percentage_minimum_hosts": 2,
        "failure_percentage_request_volume": 5,
        "failure_percentage_threshold": 50,
        "enforcing_failure_percentage": 100,
    }
    proxy = start_proxy(
        config(c, cluster_manager={"outlier_detection": {"event_log_path": str(log)}})
    )
    until(
        lambda: (send(proxy, 12), host_flags(proxy).get(addr(b)) == "/failed_outlier_check")[1],
        timeout=15,
        what="b ejected",
    )
    proxy.stop()
    assert events(log) == [
        od_event(
            b,
            "FAILURE_PERCENTAGE",
            "EJECT",
            1,
            True,
            eject_failure_percentage_event={"host_success_rate": 0},
        )
    ], proxy.kind


# -- health checking ------------------------------------------------------------------


def hc_event(up: HealthUpstream, checker: str = "HTTP", **event: Any) -> Json:
    return {
        "health_checker_type": checker,
        "host": {
            "socket_address": {
                "protocol": "TCP",
                "address": "127.0.0.1",
                "port_value": up.port,
                "resolver_name": "",
                "ipv4_compat": False,
                "network_namespace_filepath": "",
            }
        },
        "cluster_name": CLUSTER,
        **event,
        "locality": {"region": "", "zone": "", "sub_zone": ""},
    }


def by_port(evs: list[Json]) -> dict[int, list[Json]]:
    out: dict[int, list[Json]] = {}
    for e in evs:
        out.setdefault(e["host"]["socket_address"]["port_value"], []).append(e)
    return out


def test_health_check_events_through_failure_kill_and_degradation(
    start_proxy: StartProxy, upstreams: Callable[[str], HealthUpstream], tmp_path: Path
) -> None:
    """Without the always_log switches: each host's first check (healthy or failed),
    then only transitions — healthy again, ejected by network failures after a
    kill -9 (unhealthy_threshold 2), healthy after restart, degraded and back.
    The deprecated ``event_log_path`` and an ``event_logger`` file sink get the
    same lines."""
    a, b = upstreams("a"), upstreams("b")
    b.set(hc=503)
    path_log, sink_log = tmp_path / "hc.log", tmp_path / "sink.log"
    c = cluster(CLUSTER, [a.address, b.address])
    c["health_checks"] = [
        http_check(
            event_log_path=str(path_log),
            event_logger=[
                {
                    "name": "envoy.health_check.event_sink.file",
                    "typed_config": {"@type": FILE_SINK, "event_log_path": str(sink_log)},
                }
            ],
        )
    ]
    proxy = start_proxy(config(c))
    wait_flags(proxy, {addr(a): "healthy", addr(b): "/failed_active_hc"})
    b.set(hc=200)
    wait_flags(proxy, {addr(a): "healthy", addr(b): "healthy"})
    b.kill()
    wait_flags(proxy, {addr(a): "healthy", addr(b): "/failed_active_hc"})
    b.start()
    wait_flags(proxy, {addr(a): "healthy", addr(b): "healthy"})
    b.set(degraded=1)
    wait_flags(proxy, {addr(a): "healthy", addr(b): "/degraded_active_hc"})
    b.set(degraded=0)
    wait_flags(proxy, {addr(a): "healthy", addr(b): "healthy"})
    b.set(hc=500)
    wait_flags(proxy, {addr(a): "healthy", addr(b): "/failed_active_hc"})
    proxy.stop()
    got = events(path_log)
    assert events(sink_log) == got
    assert by_port(got) == {
        a.port: [hc_event(a, add_healthy_event={"first_check": True})],
        b.port: [
            hc_event(
                b,
                health_check_failure_event={
                    "failure_type": "ACTIVE",
                    "first_check": True,
                    "http_status_code": 503,
                },
            ),
            hc_event(b, add_healthy_event={"first_check": False}),
            hc_event(b, eject_unhealthy_event={"failure_type": "NETWORK", "http_status_code": 0}),
            hc_event(b, add_healthy_event={"first_check": False}),
            hc_event(b, degraded_healthy_host={}),
            hc_event(b, no_longer_degraded_host={}),
            hc_event(b, eject_unhealthy_event={"failure_type": "ACTIVE", "http_status_code": 500}),
        ],
    }, proxy.kind


def test_always_log_failures_and_successes(
    start_proxy: StartProxy, upstreams: Callable[[str], HealthUpstream], tmp_path: Path
) -> None:
    """With both switches every check is an event: a passing host's first check is
    the healthy transition, each later one a ``successful_health_check_event``; a
    failing host logs every failure."""
    a, b = upstreams("a"), upstreams("b")
    b.set(hc=503)
    log = tmp_path / "hc.log"
    c = cluster(CLUSTER, [a.address, b.address])
    c["health_checks"] = [
        http_check(
            always_log_health_check_failures=True,
            always_log_health_check_success=True,
            event_logger=[
                {"name": "file", "typed_config": {"@type": FILE_SINK, "event_log_path": str(log)}}
            ],
        )
    ]
    proxy = start_proxy(config(c))
    at_least(proxy, "health_check.attempt", 8)
    proxy.stop()
    got = by_port(events(log))
    first, *rest = got[a.port]
    assert first == hc_event(a, add_healthy_event={"first_check": True})
    assert len(rest) >= 2
    assert all(e == hc_event(a, successful_health_check_event={}) for e in rest), rest
    first, *rest = got[b.port]
    failure = {"failure_type": "ACTIVE", "first_check": True, "http_status_code": 503}
    assert first == hc_event(b, health_check_failure_event=failure)
    assert len(rest) >= 2
    failure["first_check"] = False
    assert all(e == hc_event(b, health_check_failure_event=failure) for e in rest), rest


def test_service_name_matcher(
    start_proxy: StartProxy, upstreams: Callable[[str], HealthUpstream], tmp_path: Path
) -> None:
    """``service_name_matcher``: a 200 passes only with a matching
    ``x-envoy-upstream-healthchecked-cluster``; each answer it looked at counts in
    ``verify_cluster``; a mismatch is an active failure carrying the 200."""
    a, b = upstreams("a"), upstreams("b")
    a.set(healthchecked=1)  # answers "a-svc"
    log = tmp_path / "hc.log"
    c = cluster(CLUSTER, [a.address, b.address])
    c["health_checks"] = [
        http_check(
            event_log_path=str(log),
            http_health_check={"path": "/healthz", "service_name_matcher": {"suffix": "-svc"}},
        )
    ]
    proxy = start_proxy(config(c))
    wait_flags(proxy, {addr(a): "healthy", addr(b): "/failed_active_hc"})
    stats = at_least(proxy, "health_check.verify_cluster", 4)
    assert (
        stats[f"cluster.{CLUSTER}.health_check.verify_cluster"]
        <= stats[f"cluster.{CLUSTER}.health_check.attempt"]
    )
    assert set(send(proxy, 4)) == {"a"}
    b.set(healthchecked=1)
    wait_flags(proxy, {addr(a): "healthy", addr(b): "healthy"})
    proxy.stop()
    failure = {"failure_type": "ACTIVE", "first_check": True, "http_status_code": 200}
    assert by_port(events(log))[b.port] == [
        hc_event(b, health_check_failure_event=failure),
        hc_event(b, add_healthy_event={"first_check": False}),
    ], proxy.kind


class MetadataServicer:
    """``grpc.health.v1.Health/Check`` answering SERVING, recording the metadata."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    def check(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.metadata.append(dict(context.invocation_metadata()))
        return b"\x08\x01"


def test_grpc_initial_metadata_and_event_type(start_proxy: StartProxy, tmp_path: Path) -> None:
    servicer = MetadataServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health",
        {"Check": grpc.unary_unary_rpc_method_handler(servicer.check)},
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        log = tmp_path / "hc.log"
        check = http_check(event_log_path=str(log))
        del check["http_health_check"]
        check["grpc_health_check"] = {
            "service_name": "svc",
            "initial_metadata": [
                {"header": {"key": "x-token", "value": "t1"}},
                {"header": {"key": "x-tenant", "value": "blue"}},
            ],
        }
        c = cluster(CLUSTER, [("127.0.0.1", port)])
        c["health_checks"] = [check]
        c["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_OPTIONS_TYPE,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
        proxy = start_proxy(config(c))
        wait_flags(proxy, {f"127.0.0.1:{port}": "healthy"})
        until(lambda: servicer.metadata, timeout=5, what="a check")
        md = servicer.metadata[0]
        assert (md.get("x-token"), md.get("x-tenant")) == ("t1", "blue"), md
        proxy.stop()
        (event,) = events(log)
        assert event["health_checker_type"] == "GRPC"
        assert event["add_healthy_event"] == {"first_check": True}
    finally:
        server.stop(None)


# -- what stays refused ---------------------------------------------------------------


MULTIPLE = (
    r"health check at index 0 is missing a name; all health checks must have a name "
    r"when multiple health checks are configured"
)


def two_checks() -> Json:
    c = cluster(CLUSTER, [("127.0.0.1", 1)])
    c["health_checks"] = [http_check(), http_check()]
    return config(c)


def test_more_than_one_health_check_is_refused_as_envoy_refuses_it(
    envoy_binary: Path, tmp_path: Path
) -> None:
    """Envoy 1.40 runs several checks only when each has a ``name``, which the v3
    schema of xds-protos (what envoyx validates against) does not know: both refuse
    a list of unnamed checks with Envoy's words."""
    import envoyx

    doc = two_checks()
    with pytest.raises(envoyx.ConfigError, match=MULTIPLE):
        envoyx.Server(doc)
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = subprocess.run(
        [str(envoy_binary), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert re.search(MULTIPLE, out.stdout + out.stderr)


def test_event_service_and_other_cluster_manager_fields_stay_refused() -> None:
    import envoyx

    doc = two_checks()
    doc["static_resources"]["clusters"][0]["health_checks"] = [http_check()]
    doc["cluster_manager"] = {
        "outlier_detection": {
            "event_service": {"grpc_service": {"envoy_grpc": {"cluster_name": CLUSTER}}}
        },
        "local_cluster_name": CLUSTER,
    }
    with pytest.raises(envoyx.ConfigError) as err:
        envoyx.Server(doc)
    assert "cluster_manager.outlier_detection.event_service: not supported" in str(err.value)
    assert "cluster_manager.local_cluster_name: not supported" in str(err.value)


def test_an_unopenable_event_log_path_is_a_config_error(tmp_path: Path) -> None:
    import envoyx

    missing = tmp_path / "no-such-dir" / "events.log"
    c = cluster(CLUSTER, [("127.0.0.1", 1)])
    c["health_checks"] = [http_check(event_log_path=str(missing))]
    with pytest.raises(envoyx.ConfigError, match="unable to open file"):
        envoyx.Server(config(c))
    c["health_checks"] = [http_check()]
    doc = config(c, cluster_manager={"outlier_detection": {"event_log_path": str(missing)}})
    with pytest.raises(envoyx.ConfigError, match="unable to open file"):
        envoyx.Server(doc)
