"""Fields control planes set for observability, beside Envoy 1.40 (issue 12): cluster
``alt_stat_name`` and ``metadata``, endpoint ``metadata``, route ``metadata`` and
``decorator``, listener ``traffic_direction`` and
``max_connections_to_accept_per_socket_event``.

Both proxies get the same bootstrap; the access-log lines (metadata operators,
``%UPSTREAM_CLUSTER%``), what the upstream received and the cluster stats' names are
compared.
"""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import envoyx
from support.bootstrap import bootstrap, cluster, file_access_log, http_listener, virtual_host
from support.envoy import EnvoyProcess
from support.proxy import EnvoyxProcess, ProxyProcess
from support.upstreams import HttpUpstream
from support.wait import free_port, until

pytestmark = pytest.mark.envoy

Json = dict

LOG_FORMAT = (
    "%UPSTREAM_CLUSTER% w=%UPSTREAM_METADATA(istio:workload)% "
    "c=%UPSTREAM_METADATA(envoy.lb:canary)% n=%CLUSTER_METADATA(istio:n)% "
    "all=%CLUSTER_METADATA(istio:labels)% "
    "r=%METADATA(ROUTE:ns:k)% h=%METADATA(UPSTREAM_HOST:istio:workload)% "
    "missing=%UPSTREAM_METADATA(istio:nope)%\n"
)
REQUESTS = 6
STRUCT_ANY = {"@type": "type.googleapis.com/google.protobuf.Struct", "value": {}}


def _bootstrap(port: int, admin: int, upstream: tuple[str, int], log: Path) -> Json:
    backend = cluster("backend", [upstream])
    backend["alt_stat_name"] = "backend_obs"
    backend["metadata"] = {
        "filter_metadata": {"istio": {"svc": "reviews", "n": 5, "labels": {"app": "r"}}}
    }
    backend["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["metadata"] = {
        "filter_metadata": {"istio": {"workload": "reviews-v1"}, "envoy.lb": {"canary": True}}
    }
    route = {
        "match": {"prefix": "/"},
        "route": {"cluster": "backend"},
        "metadata": {"filter_metadata": {"ns": {"k": "route-value"}}},
        "decorator": {"operation": "reviews-op"},
    }
    listener = http_listener(port=port, virtual_hosts=[virtual_host("all", ["*"], [route])])
    listener["traffic_direction"] = "OUTBOUND"
    listener["max_connections_to_accept_per_socket_event"] = 2
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["access_log"] = [file_access_log(str(log), LOG_FORMAT)]
    hcm["route_config"]["metadata"] = {"filter_metadata": {"ns": {"rc": 1}}}
    hcm["route_config"]["virtual_hosts"][0]["metadata"] = {"filter_metadata": {"ns": {"vh": 1}}}
    return bootstrap(admin_port=admin, listeners=[listener], clusters=[backend])


@pytest.fixture
def upstream() -> Iterator[HttpUpstream]:
    with HttpUpstream("up").start() as up:
        yield up


def _run(proxy: ProxyProcess, port: int, log: Path) -> tuple[list[str], list[Json], dict[str, int]]:
    proxy.start()
    try:
        # Concurrent connections: more than max_connections_to_accept_per_socket_event.
        def one(i: int) -> Json:
            with httpx.Client() as client:
                r = client.get(f"http://127.0.0.1:{port}/item/{i}")
                assert r.status_code == 200
                return json.loads(r.text)

        with concurrent.futures.ThreadPoolExecutor(REQUESTS) as pool:
            echoed = list(pool.map(one, range(REQUESTS)))
        until(lambda: log.exists() and len(log.read_text().splitlines()) >= REQUESTS)
        stats = proxy.stats()
    finally:
        proxy.stop()
    return sorted(log.read_text().splitlines()), echoed, stats


def test_metadata_and_observability_names_as_envoy(
    envoy_binary: Path, tmp_path: Path, upstream: HttpUpstream
) -> None:
    results = {}
    for kind in ("envoy", "envoyx"):
        port, admin = free_port(), free_port()
        log = tmp_path / f"{kind}.log"
        bs = _bootstrap(port, admin, upstream.address, log)
        proxy: ProxyProcess = (
            EnvoyProcess(envoy_binary, bs, tmp_path / kind, concurrency=1)
            if kind == "envoy"
            else EnvoyxProcess(bs, tmp_path / kind, concurrency=1)
        )
        results[kind] = _run(proxy, port, log)

    envoy_lines, envoy_echoed, envoy_stats = results["envoy"]
    lines, echoed, stats = results["envoyx"]
    assert (
        envoy_lines
        == [
            'backend_obs w=reviews-v1 c=true n=5 all={"app":"r"} r=route-value '
            "h=reviews-v1 missing=-"
        ]
        * REQUESTS
    )
    assert lines == envoy_lines
    # Without tracing the decorator changes nothing upstream, in either proxy.
    for seen in (envoy_echoed, echoed):
        assert all("x-envoy-decorator-operation" not in e["headers"] for e in seen)
    # Cluster stats are named by alt_stat_name.
    for s in (envoy_stats, stats):
        assert s["cluster.backend_obs.upstream_rq_total"] == REQUESTS
        assert "cluster.backend.upstream_rq_total" not in s


def _access_log(bs: Json) -> Json:
    hcm = bs["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["access_log"][0]["typed_config"]


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (
            lambda bs: bs["static_resources"]["clusters"][0].update(
                metadata={"typed_filter_metadata": {"x": STRUCT_ANY}}
            ),
            "static_resources.clusters[0].metadata.typed_filter_metadata: not supported by envoyx",
        ),
        (
            lambda bs: _access_log(bs).update(
                log_format={"text_format_source": {"inline_string": "%UPSTREAM_METADATA(a:b):3%"}}
            ),
            "UPSTREAM_METADATA does not allow length to be specified.",
        ),
        (
            lambda bs: bs["static_resources"]["listeners"][0].update(
                max_connections_to_accept_per_socket_event=0
            ),
            "static_resources.listeners[0].max_connections_to_accept_per_socket_event: value must "
            "be greater than 0",
        ),
    ],
)
def test_bad_values_name_their_field(edit: object, error: str, tmp_path: Path) -> None:
    bs = _bootstrap(1, 2, ("127.0.0.1", 3), tmp_path / "log")
    edit(bs)  # type: ignore[operator]
    with pytest.raises(envoyx.ConfigError) as info:
        envoyx.Server(bs)
    assert any(e.endswith(error) for e in info.value.errors), info.value.errors
