"""Micro-benchmarks of route tables: compiling a large one, and matching in it.

The route configuration has 1000 virtual hosts x 10 routes (plus a catch-all virtual
host): each virtual host has an exact domain, a `*.suffix` and a `prefix.*` domain,
and routes of every kind (prefix, path, safe_regex, a final "/" prefix).

- Compile cost: `envoyx._core.validate` maps the whole document onto the core's model,
  which builds the route tables (domain maps, compiled regexes) as a config apply does.
- Match cost: `envoyx._core.route_match(bootstrap_json, listener, authority, path,
  iterations) -> float` compiles the listener's route table once and returns the mean
  nanoseconds of one route selection over `iterations` lookups. It is a hook the core
  exposes for this benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from envoyx import _core as core
from envoyx import config

VIRTUAL_HOSTS = 1000
ROUTES_PER_HOST = 10
LISTENER = "bench"
MATCH_ITERATIONS = 200_000

HCM = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def routes(kind: str, i: int) -> list[dict[str, Any]]:
    """Ten routes of every kind; each kind goes to its own cluster, so that a match
    names which route was selected ("fallback-*" for the catch-all virtual host's)."""

    def to(cluster: str) -> dict[str, str]:
        return {"cluster": f"{kind}{cluster}"}

    out: list[dict[str, Any]] = [
        {"match": {"prefix": f"/api/v{j}/"}, "route": to("prefix")} for j in range(7)
    ]
    out.append({"match": {"path": f"/exact/{i}"}, "route": to("path")})
    out.append({"match": {"safe_regex": {"regex": "^/users/[0-9]+/orders$"}}, "route": to("regex")})
    out.append({"match": {"prefix": "/"}, "route": to("slash")})
    assert len(out) == ROUTES_PER_HOST
    return out


CLUSTERS = [
    f"{kind}{c}" for kind in ("", "fallback-") for c in ("prefix", "path", "regex", "slash")
]


def large_route_bootstrap() -> dict[str, Any]:
    virtual_hosts = [
        {
            "name": f"vh{i}",
            "domains": [f"svc{i}.example.com", f"*.svc{i}.example.net", f"svc{i}.example.*"],
            "routes": routes("", i),
        }
        for i in range(VIRTUAL_HOSTS)
    ]
    virtual_hosts.append({"name": "catch-all", "domains": ["*"], "routes": routes("fallback-", -1)})
    hcm = {
        "@type": HCM,
        "stat_prefix": "bench",
        "codec_type": "AUTO",
        "route_config": {"name": "large", "virtual_hosts": virtual_hosts},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
    }
    endpoint = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 8080}}}
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": LISTENER,
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": name,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": name,
                        "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
                    },
                }
                for name in CLUSTERS
            ],
        }
    }


@pytest.fixture(scope="module")
def large_bootstrap_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("routes") / "large-routes.json"
    path.write_text(json.dumps(large_route_bootstrap()))
    return path


@pytest.fixture(scope="module")
def large_bootstrap_json(large_bootstrap_path: Path) -> str:
    result: str = config.bootstrap_to_json(config.load_bootstrap(str(large_bootstrap_path)))
    return result


def test_load_large_route_table(benchmark: BenchmarkFixture, large_bootstrap_path: Path) -> None:
    """Python side: parse and schema-validate 1000 x 10 routes."""
    message = benchmark.pedantic(
        config.load_bootstrap, args=(str(large_bootstrap_path),), rounds=3, iterations=1
    )
    assert len(message.static_resources.listeners) == 1


def test_compile_large_route_table(benchmark: BenchmarkFixture, large_bootstrap_json: str) -> None:
    """Core side: map 1000 x 10 routes onto the model (domain maps, regexes compiled)."""
    errors = benchmark.pedantic(core.validate, args=(large_bootstrap_json,), rounds=5, iterations=1)
    assert errors == []


# --- route match -----------------------------------------------------------------
# Timed by envoyx._core.route_match, the core's hook for this benchmark: it compiles the
# listener's route table once, selects a route `iterations` times and returns the mean
# ns of one selection and the cluster selected. The figure that matters is that ns per
# match (printed in the summary, stored in extra_info), not the call's wall time, which
# includes compiling the table. Each case names what decides the match, and checks the
# route that was selected.

MATCH_CASES = {
    "exact domain, first route": ("svc0.example.com", "/api/v0/items", "prefix"),
    "exact domain, last vhost, catch-all route": ("svc999.example.com", "/anything", "slash"),
    "suffix wildcard, regex route": ("a.svc500.example.net", "/users/42/orders", "regex"),
    "prefix wildcard, path route": ("svc7.example.org", "/exact/7", "path"),
    "no domain matches, catch-all vhost": ("unknown.test", "/api/v6/x", "fallback-prefix"),
}


@pytest.mark.parametrize("case", list(MATCH_CASES))
def test_route_match(
    benchmark: BenchmarkFixture,
    large_bootstrap_json: str,
    record_route_match: dict[str, float],
    case: str,
) -> None:
    route_match = core.route_match
    authority, path, cluster = MATCH_CASES[case]
    ns_per_match, selected = benchmark.pedantic(
        route_match,
        args=(large_bootstrap_json, LISTENER, authority, path, MATCH_ITERATIONS),
        rounds=3,
        iterations=1,
    )
    assert selected == cluster
    assert ns_per_match > 0
    benchmark.extra_info["ns_per_match"] = ns_per_match
    record_route_match[case] = ns_per_match
