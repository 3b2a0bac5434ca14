"""Differential tests of HTTP filters: Envoy 1.40's Lua filter against envoyx's Python
filters, on the same routes, upstream and requests.

Envoy has no Python filter; its ``envoy.filters.http.lua`` with the same header
mutations and ``respond()`` is the reference (docs/filters.md, *Differences from
Envoy*). Each :class:`Scenario` names its filters as :class:`Pair` s: a Lua script
(given to Envoy as ``envoy.extensions.filters.http.lua.v3.Lua``) and the equivalent
Python class in ``tests/filters_fixtures/lua_equivalents.py`` (given to envoyx as an
``xds.type.v3.TypedStruct`` of ``type_url: envoyx.filters.http.python``). Everything
else in the bootstrap is the same document for both, per-route ``FilterConfig``
included.

Every response is reduced to *facts*: the status; ``upstream``, how many times the
upstream received the request (each request carries a unique ``x-test-id``, looked up
in what the upstream recorded); for replies the proxy made itself the body and
content-length; and what ``observe`` names: ``up:NAME`` the values of a header as the
upstream received it, ``resp:NAME`` the values of a response header as the client
received it (both lists, in order, so that ``add`` versus ``replace`` shows). ``expect``
pins Envoy's facts (checked on both proxies) and envoyx's facts must equal Envoy's;
``stats`` are stat deltas, checked on both.

Each scenario runs as two tests, ``[envoy-NAME]`` (Envoy alone against the table) and
``[envoyx-NAME]`` (envoyx compared with Envoy); ``ENVOYX_DIFF_TARGETS=envoy`` runs only
the Envoy half, as for tests/test_differential.py.

Where Envoy's Lua filter and envoyx's Python filters differ on purpose, the fact is not
observed and a comment at the scenario says why:

- response hooks on a filter's local reply: Envoy runs the encoder side of every
  filter of the chain on it, before or after the one that called ``respond()`` (their
  ``envoy_on_response`` sees and may change the local reply); envoyx runs no response
  hook on a Python ``LocalReply`` (docs/filters.md, *Differences from Envoy*);
- a script error: Lua logs it and lets the request through; a Python hook that raises
  answers 500 — not a scenario here (tests/test_filters_e2e.py covers envoyx's).
"""

from __future__ import annotations

import itertools
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.bootstrap import bootstrap, cluster, http_listener, route, virtual_host
from support.envoy import EnvoyProcess, targets_from_env
from support.proxy import EnvoyxProcess, ProxyProcess
from support.upstreams import HttpUpstream
from support.wait import free_port

pytestmark = pytest.mark.envoy

Facts = dict[str, Any]
Json = dict[str, Any]

TESTS_DIR = Path(__file__).resolve().parent
FIXTURES_MODULE = "filters_fixtures.lua_equivalents"
LUA_TYPE = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
TYPED_STRUCT_TYPE = "type.googleapis.com/xds.type.v3.TypedStruct"
PYTHON_FILTER_URL = "envoyx.filters.http.python"
FILTER_CONFIG_TYPE = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
TOKEN = "s3cret"  # lua_equivalents.TOKEN

# ---------------------------------------------------------------------------------
# The Lua scripts (Envoy's side); each has its Python twin in lua_equivalents.py
# ---------------------------------------------------------------------------------

LUA_REQUEST_HEADERS = """
function envoy_on_request(request_handle)
  local headers = request_handle:headers()
  headers:add("x-added", "lua")
  headers:replace("x-replace", "new")
  headers:remove("x-remove")
end
"""

LUA_RESPONSE_HEADERS = """
function envoy_on_response(response_handle)
  local headers = response_handle:headers()
  headers:add("x-resp-added", "lua")
  headers:add("x-status-seen", headers:get(":status"))
  headers:replace("content-type", "text/x-replaced")
  headers:remove("x-upstream")
end
"""

LUA_GATE = f"""
function envoy_on_request(request_handle)
  local headers = request_handle:headers()
  if headers:get(":path") == "/throttled" then
    request_handle:respond({{[":status"] = "429", ["retry-after"] = "7"}}, "")
  elseif headers:get("x-token") ~= "{TOKEN}" then
    request_handle:respond({{[":status"] = "403", ["x-denied-by"] = "lua"}}, "denied\\n")
  end
end
"""

LUA_TAG = """
function envoy_on_request(request_handle)
  request_handle:headers():add("x-tag", "lua")
end
function envoy_on_response(response_handle)
  response_handle:headers():add("x-tag-resp", "lua")
end
"""

LUA_ORDER_FIRST = """
function envoy_on_request(request_handle)
  request_handle:headers():add("x-order", "first")
end
function envoy_on_response(response_handle)
  response_handle:headers():add("x-resp-order", "first")
end
"""

LUA_ORDER_SECOND = """
function envoy_on_request(request_handle)
  local headers = request_handle:headers()
  headers:replace("x-order-seen", headers:get("x-order") or "none")
  headers:add("x-order", "second")
end
function envoy_on_response(response_handle)
  local headers = response_handle:headers()
  headers:replace("x-resp-order-seen", headers:get("x-resp-order") or "none")
  headers:add("x-resp-order", "second")
end
"""


# ---------------------------------------------------------------------------------
# The table's vocabulary
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One HTTP filter: ``name`` in ``http_filters`` (and in ``typed_per_filter_config``),
    the Lua script Envoy runs and the Python class envoyx runs."""

    name: str
    lua: str
    python: str

    def http_filter(self, target: str) -> Json:
        if target == "envoy":
            # default_source_code is the current spelling of the deprecated inline_code
            # (Envoy 1.40 still accepts inline_code, with a deprecation warning).
            typed: Json = {"@type": LUA_TYPE, "default_source_code": {"inline_string": self.lua}}
        else:
            typed = {
                "@type": TYPED_STRUCT_TYPE,
                "type_url": PYTHON_FILTER_URL,
                "value": {"module": FIXTURES_MODULE, "class": self.python},
            }
        return {"name": self.name, "typed_config": typed}


@dataclass(frozen=True)
class Req:
    """One HTTP request (HTTP/1.1 on one keep-alive connection, or h2c)."""

    path: str = "/"
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    host: str | None = None
    http2: bool = False
    observe: tuple[str, ...] = ()
    expect: Facts = field(default_factory=dict)


@dataclass(frozen=True)
class Scenario:
    name: str
    filters: tuple[Pair, ...]
    requests: tuple[Req, ...]
    # The virtual hosts (cluster "backend" is the test upstream); default: all to it.
    virtual_hosts: tuple[Json, ...] = ()
    # Clusters without endpoints, for 503s.
    empty_clusters: tuple[str, ...] = ()
    stats: dict[str, int] = field(default_factory=dict)


def disabled(*names: str) -> Json:
    """``typed_per_filter_config`` turning the named filters off (route or vhost)."""
    return {name: {"@type": FILTER_CONFIG_TYPE, "disabled": True} for name in names}


def with_config(entry: Json, per_filter: Json) -> Json:
    return {**entry, "typed_per_filter_config": per_filter}


def build(scenario: Scenario, target: str, port: int, admin_port: int, up: HttpUpstream) -> Json:
    vhosts = list(scenario.virtual_hosts) or [
        virtual_host("all", ["*"], [route({"prefix": "/"}, cluster="backend")])
    ]
    listener = http_listener(port=port, virtual_hosts=vhosts)
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"][:0] = [pair.http_filter(target) for pair in scenario.filters]
    return bootstrap(
        admin_port=admin_port,
        listeners=[listener],
        clusters=[
            cluster("backend", [up.address]),
            *(cluster(name, []) for name in scenario.empty_clusters),
        ],
    )


class FilterEnvoyxProcess(EnvoyxProcess):
    """envoyx with ``tests/`` on its PYTHONPATH, so that it imports the fixtures."""

    def env(self) -> dict[str, str]:
        env = super().env()
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(TESTS_DIR), env.get("PYTHONPATH", "")) if p
        )
        return env


# ---------------------------------------------------------------------------------
# Observing
# ---------------------------------------------------------------------------------

LOCAL = {"upstream": 0}
TOKEN_HEADER = (("x-token", TOKEN),)
_ids = itertools.count()


def received(up: HttpUpstream, test_id: str) -> list[list[tuple[str, str]]]:
    """The header lists of every request the upstream received with this x-test-id."""
    out = []
    for req in list(up.requests):
        if req.header("x-test-id") == test_id:
            out.append(req.headers)
    return out


def facts_of(req: Req, resp: httpx.Response, up: HttpUpstream, test_id: str) -> Facts:
    seen = received(up, test_id)
    facts: Facts = {"status": resp.status_code, "upstream": len(seen)}
    if not seen:  # a reply the proxy made itself
        facts["body"] = resp.content.decode("utf-8", "replace")
        facts["resp:content-length"] = resp.headers.get_list("content-length")
    for name in req.observe:
        kind, _, header = name.partition(":")
        if kind == "up":
            facts[name] = [v for k, v in seen[0] if k == header] if seen else "<not received>"
        elif kind == "resp":
            facts[name] = resp.headers.get_list(header)
        else:
            raise ValueError(f"unknown fact {name!r}")
    return facts


@dataclass
class Result:
    facts: list[Facts]
    stats: dict[str, int]


def run_scenario(scenario: Scenario, proxy: ProxyProcess, up: HttpUpstream) -> Result:
    port = proxy.listener_address()[1]
    proxy.start()
    try:
        before = proxy.stats()
        facts = []
        base = f"http://127.0.0.1:{port}"
        with (
            httpx.Client(base_url=base, timeout=30.0) as h1,
            httpx.Client(base_url=base, timeout=30.0, http1=False, http2=True) as h2,
        ):
            for req in scenario.requests:
                test_id = f"{scenario.name}-{next(_ids)}-{uuid.uuid4().hex[:8]}"
                headers = [*req.headers, ("x-test-id", test_id)]
                if req.host is not None:
                    headers.append(("host", req.host))
                client = h2 if req.http2 else h1
                resp = client.request(req.method, req.path, headers=headers, content=req.body)
                facts.append(facts_of(req, resp, up, test_id))
        stats = proxy.wait_stats(scenario.stats, before)
        rc = proxy.stop()
        assert rc == 0, f"{proxy.kind} exited with {rc} on SIGTERM; log:\n{proxy.log_text()}"
    finally:
        if proxy.running:
            proxy.stop()
    return Result(facts, stats)


# ---------------------------------------------------------------------------------
# The scenarios
# ---------------------------------------------------------------------------------

HEADERS = Pair("headers", LUA_REQUEST_HEADERS, "RequestHeaders")
ASYNC_HEADERS = Pair("headers", LUA_REQUEST_HEADERS, "AsyncRequestHeaders")
RESPONSE = Pair("response", LUA_RESPONSE_HEADERS, "ResponseHeaders")
GATE = Pair("gate", LUA_GATE, "Gate")
TAG = Pair("tag", LUA_TAG, "Tag")
FIRST = Pair("first", LUA_ORDER_FIRST, "OrderFirst")
SECOND = Pair("second", LUA_ORDER_SECOND, "OrderSecond")

REQUEST_FACTS = ("up:x-added", "up:x-replace", "up:x-remove", "up:x-keep")


def request_header_requests() -> tuple[Req, ...]:
    return (
        Req(
            headers=(("x-replace", "old"), ("x-remove", "gone"), ("x-keep", "1")),
            observe=REQUEST_FACTS,
            expect={
                "status": 200,
                "upstream": 1,
                "up:x-added": ["lua"],
                "up:x-replace": ["new"],
                "up:x-remove": [],
                "up:x-keep": ["1"],
            },
        ),
        # add() appends to a value the client sent; replace() of an absent header adds it.
        Req(
            headers=(("x-added", "client"),),
            observe=REQUEST_FACTS,
            expect={"up:x-added": ["client", "lua"], "up:x-replace": ["new"], "up:x-remove": []},
        ),
        # remove() removes every value; replace() leaves one.
        Req(
            headers=(
                ("x-remove", "1"),
                ("x-remove", "2"),
                ("x-replace", "a"),
                ("x-replace", "b"),
            ),
            observe=REQUEST_FACTS,
            expect={"up:x-remove": [], "up:x-replace": ["new"]},
        ),
        Req(
            headers=(("x-replace", "old"), ("x-remove", "gone"), ("x-keep", "1")),
            http2=True,
            observe=REQUEST_FACTS,
            expect={
                "status": 200,
                "up:x-added": ["lua"],
                "up:x-replace": ["new"],
                "up:x-remove": [],
                "up:x-keep": ["1"],
            },
        ),
    )


RESPONSE_FACTS = (
    "resp:x-resp-added",
    "resp:x-status-seen",
    "resp:content-type",
    "resp:x-upstream",
)
DENIED = {**LOCAL, "status": 403, "body": "denied\n", "resp:content-length": ["7"]}
DENIED_FACTS = {"resp:x-denied-by": ["lua"], "resp:content-type": ["text/plain"]}
GATE_FACTS = ("resp:x-denied-by", "resp:content-type")
TAG_FACTS = ("up:x-tag", "resp:x-tag-resp")

SCENARIOS: list[Scenario] = [
    Scenario(
        "request_headers",
        (HEADERS,),
        request_header_requests(),
        stats={
            "http.ingress_http.downstream_rq_2xx": 4,
            "cluster.backend.upstream_rq_total": 4,
        },
    ),
    # The same through an `async def` hook: the awaits between the mutations change
    # nothing the upstream sees.
    Scenario(
        "request_headers_async",
        (ASYNC_HEADERS,),
        request_header_requests(),
        stats={
            "http.ingress_http.downstream_rq_2xx": 4,
            "cluster.backend.upstream_rq_total": 4,
        },
    ),
    Scenario(
        "response_headers",
        (RESPONSE,),
        (
            Req(
                observe=RESPONSE_FACTS,
                expect={
                    "status": 200,
                    "upstream": 1,
                    "resp:x-resp-added": ["lua"],
                    "resp:x-status-seen": ["200"],
                    "resp:content-type": ["text/x-replaced"],
                    "resp:x-upstream": [],
                },
            ),
            # The hook sees the upstream's status.
            Req(
                headers=(("x-test-status", "418"),),
                observe=RESPONSE_FACTS,
                expect={"status": 418, "upstream": 1, "resp:x-status-seen": ["418"]},
            ),
            Req(
                http2=True,
                observe=RESPONSE_FACTS,
                expect={"status": 200, "resp:x-resp-added": ["lua"], "resp:x-upstream": []},
            ),
        ),
        stats={
            "http.ingress_http.downstream_rq_2xx": 2,
            "http.ingress_http.downstream_rq_4xx": 1,
            "cluster.backend.upstream_rq_total": 3,
        },
    ),
    # Responses the proxy makes itself go through the response hooks too: Envoy runs
    # the encoder filters on every response of the stream, the local replies of the
    # router (a route's direct_response, 503 no healthy upstream) and of a request no
    # route matched (404) included. docs/filters.md exempts only a Python filter's own
    # LocalReply.
    Scenario(
        "response_hooks_on_proxy_replies",
        (RESPONSE,),
        (
            Req(
                "/direct",
                observe=RESPONSE_FACTS,
                expect={
                    **LOCAL,
                    "status": 200,
                    "body": "direct\n",
                    "resp:x-resp-added": ["lua"],
                    "resp:x-status-seen": ["200"],
                    "resp:content-type": ["text/x-replaced"],
                },
            ),
            Req(
                "/empty",
                observe=RESPONSE_FACTS,
                expect={
                    **LOCAL,
                    "status": 503,
                    "body": "no healthy upstream",
                    "resp:x-resp-added": ["lua"],
                    "resp:x-status-seen": ["503"],
                    "resp:content-type": ["text/x-replaced"],
                },
            ),
            Req(
                "/nomatch",
                host="only.example",
                observe=RESPONSE_FACTS,
                expect={
                    **LOCAL,
                    "status": 404,
                    "body": "",
                    "resp:x-resp-added": ["lua"],
                    "resp:x-status-seen": ["404"],
                },
            ),
        ),
        virtual_hosts=(
            virtual_host("only", ["only.example"], [route({"prefix": "/api"}, cluster="backend")]),
            virtual_host(
                "all",
                ["*"],
                [
                    route({"path": "/direct"}, direct=(200, "direct\n")),
                    route({"prefix": "/empty"}, cluster="empty"),
                ],
            ),
        ),
        empty_clusters=("empty",),
        stats={
            "http.ingress_http.downstream_rq_2xx": 1,
            "http.ingress_http.downstream_rq_4xx": 1,
            "http.ingress_http.downstream_rq_5xx": 1,
            "cluster.empty.upstream_cx_none_healthy": 1,
        },
    ),
    # respond(): status, body and headers from the filter, the upstream never asked.
    # Envoy's respond() goes through its local-reply path, which adds content-type
    # text/plain to a non-empty body (and none to an empty one); envoyx's LocalReply
    # does the same, so content-type is compared too.
    Scenario(
        "local_reply",
        (GATE,),
        (
            Req(observe=GATE_FACTS, expect={**DENIED, **DENIED_FACTS}),
            Req(
                headers=TOKEN_HEADER,
                observe=GATE_FACTS,
                expect={"status": 200, "upstream": 1, "resp:x-denied-by": []},
            ),
            Req(
                "/throttled",
                headers=TOKEN_HEADER,
                observe=("resp:retry-after", "resp:content-type"),
                expect={
                    **LOCAL,
                    "status": 429,
                    "body": "",
                    "resp:content-length": ["0"],
                    "resp:retry-after": ["7"],
                    "resp:content-type": [],
                },
            ),
            # A request body the filter never reads: still no upstream request.
            Req(
                method="POST",
                body=b"payload",
                observe=GATE_FACTS,
                expect={**DENIED, **DENIED_FACTS},
            ),
            Req(http2=True, observe=GATE_FACTS, expect={**DENIED, **DENIED_FACTS}),
            # The keep-alive connection still serves after the local replies.
            Req(headers=TOKEN_HEADER, expect={"status": 200, "upstream": 1}),
        ),
        stats={
            "http.ingress_http.downstream_rq_2xx": 2,
            "http.ingress_http.downstream_rq_4xx": 4,
            "http.ingress_http.downstream_rq_total": 6,
            "cluster.backend.upstream_rq_total": 2,
        },
    ),
    # Request hooks in http_filters order, each seeing the previous one's change;
    # response hooks in reverse order (Envoy's decoder and encoder filter chains).
    Scenario(
        "chain_order",
        (FIRST, SECOND),
        tuple(
            Req(
                http2=h2,
                observe=(
                    "up:x-order",
                    "up:x-order-seen",
                    "resp:x-resp-order",
                    "resp:x-resp-order-seen",
                ),
                expect={
                    "status": 200,
                    "upstream": 1,
                    "up:x-order": ["first", "second"],
                    "up:x-order-seen": ["first"],
                    "resp:x-resp-order": ["second", "first"],
                    "resp:x-resp-order-seen": ["none"],  # second's response hook runs first
                },
            )
            for h2 in (False, True)
        ),
        stats={"http.ingress_http.downstream_rq_2xx": 2},
    ),
    # A local reply stops the request hooks after it: "tag" (after "gate") does not
    # run, and nothing reaches the upstream. Not observed on the local reply:
    # x-tag-resp — Envoy runs tag's envoy_on_response on gate's local reply (every
    # encoder filter of the chain runs on a local reply), envoyx runs no response hook
    # on a Python LocalReply (on purpose, see the module docstring).
    Scenario(
        "local_reply_stops_chain",
        (GATE, TAG),
        (
            Req(observe=GATE_FACTS, expect={**DENIED, **DENIED_FACTS}),
            Req(
                headers=TOKEN_HEADER,
                observe=TAG_FACTS,
                expect={"status": 200, "up:x-tag": ["lua"], "resp:x-tag-resp": ["lua"]},
            ),
        ),
        stats={
            "http.ingress_http.downstream_rq_4xx": 1,
            "cluster.backend.upstream_rq_total": 1,
        },
    ),
    # typed_per_filter_config with envoy.config.route.v3.FilterConfig {disabled: true},
    # keyed by the filter's name, on routes and on a virtual host.
    Scenario(
        "per_route_disable",
        (GATE, TAG),
        (
            Req("/open", observe=TAG_FACTS, expect={"status": 200, "up:x-tag": ["lua"]}),
            Req(
                "/bare",
                observe=TAG_FACTS,
                expect={"status": 200, "up:x-tag": [], "resp:x-tag-resp": []},
            ),
            Req("/guarded", expect=DENIED),
            Req(
                "/guarded",
                headers=TOKEN_HEADER,
                observe=TAG_FACTS,
                expect={"status": 200, "up:x-tag": ["lua"], "resp:x-tag-resp": ["lua"]},
            ),
            Req(
                "/open",
                http2=True,
                observe=TAG_FACTS,
                expect={"status": 200, "up:x-tag": ["lua"], "resp:x-tag-resp": ["lua"]},
            ),
            # The virtual host "quiet" turns "tag" off for all its routes; "gate" runs.
            Req(
                "/guarded",
                host="quiet.example",
                headers=TOKEN_HEADER,
                observe=TAG_FACTS,
                expect={"status": 200, "up:x-tag": [], "resp:x-tag-resp": []},
            ),
            Req("/guarded", host="quiet.example", expect=DENIED),
            # Entries of the route and of its virtual host apply together, each to the
            # filter it names: "quiet" /open turns "gate" off, "quiet" turns "tag" off.
            Req(
                "/open",
                host="quiet.example",
                observe=TAG_FACTS,
                expect={"status": 200, "up:x-tag": [], "resp:x-tag-resp": []},
            ),
        ),
        virtual_hosts=(
            with_config(
                virtual_host(
                    "quiet",
                    ["quiet.example"],
                    [
                        with_config(
                            route({"prefix": "/open"}, cluster="backend"), disabled("gate")
                        ),
                        route({"prefix": "/"}, cluster="backend"),
                    ],
                ),
                disabled("tag"),
            ),
            virtual_host(
                "all",
                ["*"],
                [
                    with_config(route({"prefix": "/open"}, cluster="backend"), disabled("gate")),
                    with_config(
                        route({"prefix": "/bare"}, cluster="backend"), disabled("gate", "tag")
                    ),
                    route({"prefix": "/"}, cluster="backend"),
                ],
            ),
        ),
        stats={
            "http.ingress_http.downstream_rq_2xx": 6,
            "http.ingress_http.downstream_rq_4xx": 2,
            "cluster.backend.upstream_rq_total": 6,
        },
    ),
]


# ---------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------

_ENVOY_RESULTS: dict[str, Result] = {}


def _describe(req: Req) -> str:
    host = f" host={req.host}" if req.host else ""
    return f"{req.method} {req.path}{host}" + (" h2" if req.http2 else "")


def check_expectations(scenario: Scenario, result: Result, who: str) -> None:
    problems = []
    for i, (req, facts) in enumerate(zip(scenario.requests, result.facts, strict=True)):
        for key, want in req.expect.items():
            got = facts.get(key, "<not observed>")
            if got != want:
                problems.append(
                    f"request {i} ({_describe(req)}): {key} = {got!r}, expected {want!r}"
                )
    for name, want in scenario.stats.items():
        got = result.stats.get(name)
        if got != want:
            problems.append(f"stat {name}: delta {got}, expected {want}")
    assert not problems, f"{who} on scenario {scenario.name}:\n  " + "\n  ".join(problems)


@pytest.fixture(scope="module")
def upstream(http_upstreams: dict[str, HttpUpstream]) -> HttpUpstream:
    return http_upstreams["a"]


def _run(
    scenario: Scenario, target: str, envoy_binary: Path, up: HttpUpstream, workdir: Path
) -> Result:
    port, admin_port = free_port(), free_port()
    config = build(scenario, target, port, admin_port, up)
    proxy: ProxyProcess
    if target == "envoy":
        proxy = EnvoyProcess(envoy_binary, config, workdir / "envoy", concurrency=1)
    else:
        proxy = FilterEnvoyxProcess(config, workdir / "envoyx", concurrency=1)
    return run_scenario(scenario, proxy, up)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
@pytest.mark.parametrize("target", targets_from_env("ENVOYX_DIFF_TARGETS"))
def test_filter_scenario(
    target: str,
    scenario: Scenario,
    envoy_binary: Path,
    upstream: HttpUpstream,
    tmp_path: Path,
) -> None:
    if scenario.name not in _ENVOY_RESULTS:
        _ENVOY_RESULTS[scenario.name] = _run(scenario, "envoy", envoy_binary, upstream, tmp_path)
    envoy = _ENVOY_RESULTS[scenario.name]
    if target == "envoy":
        check_expectations(scenario, envoy, "Envoy")
        return
    ours = _run(scenario, "envoyx", envoy_binary, upstream, tmp_path)
    diffs = []
    for i, (req, e, x) in enumerate(zip(scenario.requests, envoy.facts, ours.facts, strict=True)):
        for key in sorted(set(e) | set(x)):
            if e.get(key) != x.get(key):
                diffs.append(
                    f"request {i} ({_describe(req)}): {key}: "
                    f"envoy={e.get(key)!r} envoyx={x.get(key)!r}"
                )
    for name in scenario.stats:
        if envoy.stats.get(name) != ours.stats.get(name):
            diffs.append(
                f"stat {name}: envoy={envoy.stats.get(name)} envoyx={ours.stats.get(name)}"
            )
    assert not diffs, f"envoyx differs from Envoy on {scenario.name}:\n  " + "\n  ".join(diffs)
    check_expectations(scenario, ours, "envoyx")


def test_every_pair_has_its_python_twin() -> None:
    """Each Lua script's Python class exists in the fixtures module (read, not imported:
    importing it needs envoyx's filter runtime)."""
    source = (TESTS_DIR / "filters_fixtures" / "lua_equivalents.py").read_text()
    pairs = {p for s in SCENARIOS for p in s.filters}
    for pair in pairs:
        assert f"\nclass {pair.python}(Filter):" in source, pair.python
