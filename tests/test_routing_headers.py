"""Header mutations beside Envoy 1.40: ``request_headers_to_add`` / ``_to_remove`` and
``response_headers_to_add`` / ``_to_remove`` at route-configuration, virtual-host and
route level, each ``append_action`` (and the deprecated ``append``),
``keep_empty_value``, Envoy's order and ``most_specific_header_mutations_wins``, the
header formatters (``%REQ%``, ``%RESP%``, addresses, ``%PROTOCOL%``, ``%START_TIME%``,
``%HOSTNAME%``, ``%UPSTREAM_HOST%``, ``%%``), mutations on local replies and direct
responses, bytes no header may carry, and the configurations Envoy refuses.

Each :class:`Scenario` runs through the real Envoy and through envoyx (the machinery
is ``support/differential.py``); the refused configurations run through
``envoy --mode validate`` and envoyx's own validation.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from envoyx import _core
from envoyx.config import bootstrap_to_json, load_bootstrap
from envoyx.errors import ConfigError
from support.bootstrap import bootstrap, cluster, http_listener
from support.differential import (
    Ctx,
    Http,
    Json,
    Raw,
    Scenario,
    differential_tests,
)

pytestmark = pytest.mark.envoy


# ---------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------


def hv(
    key: str,
    value: str,
    action: str | None = None,
    *,
    append: bool | None = None,
    keep_empty: bool | None = None,
) -> Json:
    """A ``HeaderValueOption``."""
    option: Json = {"header": {"key": key, "value": value}}
    if action is not None:
        option["append_action"] = action
    if append is not None:
        option["append"] = append
    if keep_empty is not None:
        option["keep_empty_value"] = keep_empty
    return option


def fwd(prefix: str = "/", cluster_name: str = "backend", **extra: Any) -> Json:
    return {"match": {"prefix": prefix}, "route": {"cluster": cluster_name}, **extra}


def direct(path: str, status: int, body: str | None, **extra: Any) -> Json:
    dr: Json = {"status": status}
    if body is not None:
        dr["body"] = {"inline_string": body}
    return {"match": {"path": path}, "direct_response": dr, **extra}


def setup(
    routes: list[Json] | None = None,
    *,
    vhost: Json | None = None,
    rc: Json | None = None,
    domains: tuple[str, ...] = ("*",),
) -> Callable[[Ctx], Json]:
    """One virtual host (``vhost`` adds fields to it) of ``routes`` in a route
    configuration (``rc`` adds fields to it); clusters ``backend`` (upstream a),
    ``empty`` (no endpoint) and ``refused`` (a port that refuses)."""

    def build(ctx: Ctx) -> Json:
        vh: Json = {
            "name": "vh",
            "domains": list(domains),
            "routes": routes if routes is not None else [fwd()],
            **(vhost or {}),
        }
        bs = bootstrap(
            admin_port=ctx.admin_port,
            listeners=[http_listener(port=ctx.port, virtual_hosts=[vh])],
            clusters=[
                cluster("backend", [ctx.up("a")]),
                cluster("empty", []),
                cluster("refused", [ctx.refused]),
            ],
        )
        hcm = bs["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        hcm["typed_config"]["route_config"].update(rc or {})
        return bs

    return build


def respond_with(*headers: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    """Request headers asking the test upstream to answer with ``headers``."""
    return tuple(("x-test-response-header", f"{k}: {v}") for k, v in headers)


def levels(direction: str, key: str, action: str | None = None) -> dict[str, Json]:
    """The same header set at route, virtual-host and route-configuration level, each
    level's value naming the level."""
    field = f"{direction}_headers_to_add"
    return {name: {field: [hv(key, name, action)]} for name in ("route", "vhost", "global")}


def leveled(most_specific_wins: bool) -> Callable[[Ctx], Json]:
    req = levels("request", "x-order")
    resp = levels("response", "x-order")
    req_ow = levels("request", "x-win", "OVERWRITE_IF_EXISTS_OR_ADD")
    resp_ow = levels("response", "x-win", "OVERWRITE_IF_EXISTS_OR_ADD")

    def merged(level: str) -> Json:
        return {
            "request_headers_to_add": req[level]["request_headers_to_add"]
            + req_ow[level]["request_headers_to_add"],
            "response_headers_to_add": resp[level]["response_headers_to_add"]
            + resp_ow[level]["response_headers_to_add"],
        }

    rc = merged("global")
    if most_specific_wins:
        rc["most_specific_header_mutations_wins"] = True
    return setup([fwd(**merged("route"))], vhost=merged("vhost"), rc=rc)


ORDER_FACTS = ("up.header_all:x-order", "up.header_all:x-win", "header_all:x-order", "header:x-win")

ACTIONS = [
    hv("x-append", "new"),
    hv("x-append-absent", "new"),
    hv("x-if-absent", "new", "ADD_IF_ABSENT"),
    hv("x-if-absent-absent", "new", "ADD_IF_ABSENT"),
    hv("x-overwrite-or-add", "new", "OVERWRITE_IF_EXISTS_OR_ADD"),
    hv("x-overwrite-or-add-absent", "new", "OVERWRITE_IF_EXISTS_OR_ADD"),
    hv("x-overwrite", "new", "OVERWRITE_IF_EXISTS"),
    hv("x-overwrite-absent", "new", "OVERWRITE_IF_EXISTS"),
    hv("x-append-true", "new", append=True),
    hv("x-append-false", "new", append=False),
]
PRESENT = (
    "x-append",
    "x-if-absent",
    "x-overwrite-or-add",
    "x-overwrite",
    "x-append-true",
    "x-append-false",
)
ACTION_NAMES = tuple(o["header"]["key"] for o in ACTIONS)


def mask_port(value: str | None) -> str | None:
    return None if value is None else re.sub(r":\d+$", ":<port>", value)


START_TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


# ---------------------------------------------------------------------------------
# The scenarios
# ---------------------------------------------------------------------------------

SCENARIOS: list[Scenario] = [
    Scenario(
        "request_add_at_route_level",
        setup([fwd(request_headers_to_add=[hv("x-a", "route")])]),
        (
            Http(
                headers=(("x-a", "client"),),
                observe=("up.header_all:x-a",),
                expect={"up.header_all:x-a": ["client", "route"]},
            ),
        ),
    ),
    Scenario(
        "request_add_at_virtual_host_level",
        setup(vhost={"request_headers_to_add": [hv("x-a", "vhost")]}),
        (Http(observe=("up.header_all:x-a",), expect={"up.header_all:x-a": ["vhost"]}),),
    ),
    Scenario(
        "request_add_at_route_configuration_level",
        setup(rc={"request_headers_to_add": [hv("x-a", "global")]}),
        (Http(observe=("up.header_all:x-a",), expect={"up.header_all:x-a": ["global"]}),),
    ),
    Scenario(
        "levels_in_envoys_default_order",
        leveled(most_specific_wins=False),
        (
            Http(
                observe=ORDER_FACTS,
                expect={
                    "up.header_all:x-order": ["route", "vhost", "global"],
                    "up.header_all:x-win": ["global"],
                    "header:x-win": "global",
                },
            ),
        ),
    ),
    Scenario(
        "levels_with_most_specific_header_mutations_wins",
        leveled(most_specific_wins=True),
        (
            Http(
                observe=ORDER_FACTS,
                expect={
                    "up.header_all:x-order": ["global", "vhost", "route"],
                    "up.header_all:x-win": ["route"],
                    "header:x-win": "route",
                },
            ),
        ),
    ),
    Scenario(
        "a_level_sees_the_headers_an_earlier_level_added",
        setup(
            [fwd(request_headers_to_add=[hv("x-first", "route")])],
            vhost={"request_headers_to_add": [hv("x-second", "saw %REQ(x-first)%")]},
        ),
        (Http(observe=("up.header:x-second",), expect={"up.header:x-second": "saw route"}),),
    ),
    Scenario(
        "each_append_action_on_the_request",
        setup([fwd(request_headers_to_add=ACTIONS)]),
        (
            Http(
                headers=tuple((name, "old") for name in PRESENT),
                observe=tuple(f"up.header_all:{n}" for n in ACTION_NAMES),
                expect={
                    "up.header_all:x-append": ["old", "new"],
                    "up.header_all:x-append-absent": ["new"],
                    "up.header_all:x-if-absent": ["old"],
                    "up.header_all:x-if-absent-absent": ["new"],
                    "up.header_all:x-overwrite-or-add": ["new"],
                    "up.header_all:x-overwrite-or-add-absent": ["new"],
                    "up.header_all:x-overwrite": ["new"],
                    "up.header_all:x-overwrite-absent": [],
                    "up.header_all:x-append-true": ["old", "new"],
                    "up.header_all:x-append-false": ["new"],
                },
            ),
        ),
    ),
    Scenario(
        "each_append_action_on_the_response",
        setup([fwd(response_headers_to_add=ACTIONS)]),
        (
            Http(
                headers=respond_with(*((name, "old") for name in PRESENT)),
                observe=tuple(f"header_all:{n}" for n in ACTION_NAMES),
                expect={
                    "header_all:x-append": ["old", "new"],
                    "header_all:x-if-absent": ["old"],
                    "header_all:x-if-absent-absent": ["new"],
                    "header_all:x-overwrite": ["new"],
                    "header_all:x-overwrite-absent": [],
                    "header_all:x-append-false": ["new"],
                },
            ),
        ),
    ),
    Scenario(
        "an_overwrite_replaces_every_value",
        setup([fwd(request_headers_to_add=[hv("x-m", "one", "OVERWRITE_IF_EXISTS_OR_ADD")])]),
        (
            Http(
                headers=(("x-m", "a"), ("x-m", "b")),
                observe=("up.header_all:x-m",),
                expect={"up.header_all:x-m": ["one"]},
            ),
        ),
    ),
    Scenario(
        "overwrites_are_set_before_additions_and_presence_is_checked_first",
        setup(
            [
                fwd(
                    request_headers_to_add=[
                        hv("x-o", "appended"),
                        hv("x-o", "set", "OVERWRITE_IF_EXISTS_OR_ADD"),
                        hv("x-p", "first"),
                        hv("x-p", "second", "ADD_IF_ABSENT"),
                    ]
                )
            ]
        ),
        (
            Http(
                observe=("up.header_all:x-o", "up.header_all:x-p"),
                expect={
                    "up.header_all:x-o": ["set", "appended"],
                    "up.header_all:x-p": ["first", "second"],
                },
            ),
        ),
    ),
    Scenario(
        "empty_values_are_left_out_unless_kept",
        setup(
            [
                fwd(
                    request_headers_to_add=[
                        hv("x-empty", ""),
                        hv("x-kept", "", keep_empty=True),
                        hv("x-missing", "%REQ(x-nope)%"),
                        hv("x-missing-kept", "%REQ(x-nope)%", keep_empty=True),
                        hv("x-around", "a-%REQ(x-nope)%-b"),
                    ],
                    response_headers_to_add=[
                        hv("x-r-empty", ""),
                        hv("x-r-kept", "", keep_empty=True),
                    ],
                )
            ]
        ),
        (
            Http(
                observe=(
                    "up.has:x-empty",
                    "up.header_all:x-kept",
                    "up.has:x-missing",
                    "up.header_all:x-missing-kept",
                    "up.header:x-around",
                    "has:x-r-empty",
                    "header_all:x-r-kept",
                ),
                expect={
                    "up.has:x-empty": False,
                    "up.header_all:x-kept": [""],
                    "up.has:x-missing": False,
                    "up.header:x-around": "a--b",
                },
            ),
        ),
    ),
    Scenario(
        "removal_at_each_level_and_before_addition",
        setup(
            [
                fwd(
                    request_headers_to_remove=["x-route"],
                    request_headers_to_add=[hv("x-readd", "new")],
                    response_headers_to_remove=["x-resp-route"],
                )
            ],
            vhost={
                "request_headers_to_remove": ["x-vhost", "x-readd"],
                "response_headers_to_remove": ["x-resp-vhost"],
            },
            rc={
                "request_headers_to_remove": ["X-Global"],
                "response_headers_to_remove": ["x-resp-global"],
            },
        ),
        (
            Http(
                headers=(
                    ("x-route", "1"),
                    ("x-route", "2"),
                    ("x-vhost", "1"),
                    ("x-global", "1"),
                    ("x-kept", "1"),
                    ("x-readd", "old"),
                    *respond_with(
                        ("x-resp-route", "1"),
                        ("x-resp-vhost", "1"),
                        ("x-resp-global", "1"),
                        ("x-resp-kept", "1"),
                    ),
                ),
                observe=(
                    "up.has:x-route",
                    "up.has:x-vhost",
                    "up.has:x-global",
                    "up.has:x-kept",
                    "up.header_all:x-readd",
                    "has:x-resp-route",
                    "has:x-resp-vhost",
                    "has:x-resp-global",
                    "has:x-resp-kept",
                ),
                expect={"up.has:x-route": False, "up.has:x-kept": True, "has:x-resp-kept": True},
            ),
        ),
    ),
    Scenario(
        "a_value_is_formatted_after_the_removals",
        setup(
            [
                fwd(
                    request_headers_to_remove=["x-a"],
                    request_headers_to_add=[hv("x-copy", "[%REQ(x-a)%]")],
                )
            ]
        ),
        (
            Http(
                headers=(("x-a", "old"),),
                observe=("up.header:x-copy", "up.has:x-a"),
                expect={"up.header:x-copy": "[]", "up.has:x-a": False},
            ),
        ),
    ),
    Scenario(
        "headers_the_proxy_adds_may_be_removed_or_read",
        setup(
            [
                fwd(
                    request_headers_to_remove=[
                        "x-forwarded-proto",
                        "x-envoy-expected-rq-timeout-ms",
                    ],
                    request_headers_to_add=[
                        hv("x-saw-timeout", "%REQ(x-envoy-expected-rq-timeout-ms)%")
                    ],
                    response_headers_to_remove=["x-envoy-upstream-service-time"],
                    response_headers_to_add=[
                        hv("server", "mine", "OVERWRITE_IF_EXISTS_OR_ADD"),
                        hv("x-saw-server", "%RESP(server)%"),
                    ],
                )
            ]
        ),
        (
            Http(
                observe=(
                    "up.has:x-forwarded-proto",
                    "up.has:x-envoy-expected-rq-timeout-ms",
                    "up.header:x-saw-timeout",
                    "has:x-envoy-upstream-service-time",
                    "header:x-saw-server",
                ),
            ),
        ),
    ),
    Scenario(
        "request_formatters",
        setup(
            [
                fwd(
                    request_headers_to_add=[
                        hv("x-f-path", "%REQ(:path)%"),
                        hv("x-f-method", "%REQ(:method)%"),
                        hv("x-f-authority", "%REQ(:authority)%"),
                        hv("x-f-host", "%REQ(host)%"),
                        hv("x-f-alt", "%REQ(x-nope?x-b)%"),
                        hv("x-f-trunc", "%REQ(x-b):3%"),
                        hv("x-f-multi", "%REQ(x-multi)%"),
                        hv("x-f-case", "%REQ(X-B)%"),
                        hv("x-f-peer", "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"),
                        hv("x-f-local", "%DOWNSTREAM_LOCAL_ADDRESS%"),
                        hv("x-f-protocol", "%PROTOCOL%"),
                        hv("x-f-percent", "100%% of %REQ(x-b)%"),
                        hv("x-f-upstream", "%UPSTREAM_HOST%"),
                    ]
                )
            ]
        ),
        (
            Http(
                path="/p?q=1",
                method="POST",
                body=b"x",
                headers=(("x-b", "bravo"), ("x-multi", "one"), ("x-multi", "two")),
                observe=(
                    "up.header:x-f-path",
                    "up.header:x-f-method",
                    "up.header:x-f-authority",
                    "up.header:x-f-host",
                    "up.header:x-f-alt",
                    "up.header:x-f-trunc",
                    "up.header:x-f-multi",
                    "up.header:x-f-case",
                    "up.header:x-f-peer",
                    "up.header:x-f-local",
                    "up.header:x-f-protocol",
                    "up.header:x-f-percent",
                    "up.has:x-f-upstream",
                ),
                expect={
                    "up.header:x-f-path": "/p?q=1",
                    "up.header:x-f-method": "POST",
                    "up.header:x-f-alt": "bravo",
                    "up.header:x-f-trunc": "bra",
                    "up.header:x-f-peer": "127.0.0.1",
                    "up.header:x-f-local": "127.0.0.1:{port}",
                    "up.header:x-f-protocol": "HTTP/1.1",
                    "up.header:x-f-percent": "100% of bravo",
                },
            ),
        ),
    ),
    Scenario(
        "request_formatters_over_http2",
        setup(
            [
                fwd(
                    request_headers_to_add=[
                        hv("x-f-protocol", "%PROTOCOL%"),
                        hv("x-f-authority", "%REQ(:authority)%"),
                        hv("x-f-path", "%REQ(:path)%"),
                    ],
                    response_headers_to_add=[hv("x-r-protocol", "%PROTOCOL%")],
                )
            ]
        ),
        (
            Http(
                path="/h2",
                http2=True,
                observe=(
                    "up.header:x-f-protocol",
                    "up.header:x-f-authority",
                    "up.header:x-f-path",
                    "header:x-r-protocol",
                ),
                expect={"up.header:x-f-protocol": "HTTP/2", "header:x-r-protocol": "HTTP/2"},
            ),
        ),
    ),
    Scenario(
        "downstream_remote_address_with_its_port",
        setup(
            [
                fwd(
                    request_headers_to_add=[hv("x-remote", "%DOWNSTREAM_REMOTE_ADDRESS%")],
                    response_headers_to_add=[hv("x-remote", "%DOWNSTREAM_REMOTE_ADDRESS%")],
                )
            ]
        ),
        (Http(observe=("up.header:x-remote", "header:x-remote")),),
        sequence=lambda facts: [
            (mask_port(f["up.header:x-remote"]), mask_port(f["header:x-remote"])) for f in facts
        ],
        expect_sequence=[("127.0.0.1:<port>", "127.0.0.1:<port>")],
        not_compared={
            "up.header:x-remote": "the client's ephemeral port differs; compared masked",
            "header:x-remote": "the client's ephemeral port differs; compared masked",
        },
    ),
    Scenario(
        "response_formatters",
        setup(
            [
                fwd(
                    response_headers_to_add=[
                        hv("x-r-req", "%REQ(x-a)%"),
                        hv("x-r-resp", "%RESP(x-from-upstream)%"),
                        hv("x-r-upstream-host", "%UPSTREAM_HOST%"),
                        hv("x-r-path", "%REQ(:path)%"),
                        hv("x-r-peer", "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"),
                        hv("x-r-missing", "%RESP(x-nope)%"),
                        hv("x-r-code", "%RESPONSE_CODE%"),
                    ]
                )
            ]
        ),
        (
            Http(
                path="/resp",
                headers=(("x-a", "alpha"), *respond_with(("x-from-upstream", "up"))),
                observe=(
                    "header:x-r-req",
                    "header:x-r-resp",
                    "header:x-r-upstream-host",
                    "header:x-r-path",
                    "header:x-r-peer",
                    "has:x-r-missing",
                    "header:x-r-code",
                ),
                expect={
                    "header:x-r-code": "200",
                    "header:x-r-req": "alpha",
                    "header:x-r-resp": "up",
                    "header:x-r-path": "/resp",
                    "has:x-r-missing": False,
                },
            ),
        ),
    ),
    Scenario(
        "the_response_reads_the_request_its_mutations_made",
        setup(
            [
                fwd(
                    request_headers_to_add=[hv("x-added", "by-route")],
                    request_headers_to_remove=["x-gone"],
                    response_headers_to_add=[
                        hv("x-saw-added", "%REQ(x-added)%"),
                        hv("x-saw-gone", "%REQ(x-gone)%"),
                    ],
                )
            ]
        ),
        (
            Http(
                headers=(("x-gone", "1"),),
                observe=("header:x-saw-added", "has:x-saw-gone"),
                expect={"header:x-saw-added": "by-route", "has:x-saw-gone": False},
            ),
        ),
    ),
    Scenario(
        "request_id_echoed_in_the_response",
        setup([fwd(response_headers_to_add=[hv("x-echo-id", "%REQ(x-request-id)%")])]),
        (
            Http(observe=("header:x-echo-id", "up.header:x-request-id")),
            Http(headers=(("x-request-id", "given"),), observe=("header:x-echo-id",)),
        ),
        sequence=lambda facts: [
            facts[0]["header:x-echo-id"] == facts[0]["up.header:x-request-id"],
            facts[1]["header:x-echo-id"],
        ],
        expect_sequence=[True, "given"],
        not_compared={
            "header:x-echo-id": "a generated uuid; compared with what the upstream saw",
            "up.header:x-request-id": "a generated uuid",
        },
    ),
    Scenario(
        "start_time_and_hostname",
        setup(
            [
                fwd(
                    request_headers_to_add=[
                        hv("x-year", "%START_TIME(%Y)%"),
                        hv("x-start", "%START_TIME%"),
                        hv("x-host", "%HOSTNAME%"),
                    ],
                    response_headers_to_add=[hv("x-r-year", "%START_TIME(%Y)%")],
                )
            ]
        ),
        (
            Http(
                observe=(
                    "up.header:x-year",
                    "up.header:x-host",
                    "header:x-r-year",
                    "up.header:x-start",
                )
            ),
        ),
        sequence=lambda facts: bool(START_TIME_RE.match(facts[0]["up.header:x-start"] or "")),
        expect_sequence=True,
        not_compared={"up.header:x-start": "the time of the run; its format is compared"},
    ),
    Scenario(
        "direct_response_with_mutations_of_every_level",
        setup(
            [
                direct(
                    "/json",
                    200,
                    '{"ok": true}',
                    response_headers_to_add=[
                        hv("content-type", "application/json", "OVERWRITE_IF_EXISTS_OR_ADD"),
                        hv("x-route", "%REQ(x-a)%"),
                    ],
                ),
                direct("/plain", 201, "made", response_headers_to_add=[hv("x-route", "r")]),
                fwd(),
            ],
            vhost={"response_headers_to_add": [hv("x-vhost", "v")]},
            rc={"response_headers_to_add": [hv("x-global", "g")]},
        ),
        (
            Http(
                path="/json",
                headers=(("x-a", "alpha"),),
                observe=("header:x-route", "header:x-vhost", "header:x-global"),
                expect={
                    "status": 200,
                    "header:content-type": "application/json",
                    "header:x-route": "alpha",
                    "header:x-vhost": "v",
                    "header:x-global": "g",
                },
            ),
            Http(
                path="/plain",
                observe=("header_all:x-route", "header:x-vhost"),
                expect={"status": 201, "header_all:x-route": ["r"]},
            ),
        ),
    ),
    Scenario(
        "local_replies_of_a_forwarding_route",
        setup(
            [
                fwd(
                    "/empty",
                    "empty",
                    response_headers_to_add=[hv("x-route", "r"), hv("x-code", "%RESPONSE_CODE%")],
                ),
                fwd(
                    "/refused",
                    "refused",
                    response_headers_to_add=[hv("x-route", "r"), hv("x-up", "%UPSTREAM_HOST%")],
                ),
                fwd("/nocluster", "missing", response_headers_to_add=[hv("x-route", "r")]),
            ],
            vhost={"response_headers_to_add": [hv("x-vhost", "v")]},
            rc={"validate_clusters": False},
        ),
        (
            Http(
                path="/empty",
                observe=("header_all:x-route", "header:x-vhost", "header:x-code"),
                # Envoy formats a local reply's headers before it records the status.
                expect={"status": 503, "header_all:x-route": ["r"], "header:x-code": "0"},
            ),
            Http(
                path="/refused",
                observe=("header_all:x-route", "header:x-vhost", "header:x-up"),
                expect={"status": 503, "header_all:x-route": ["r"]},
            ),
            Http(
                path="/nocluster",
                observe=("header_all:x-route", "header:x-vhost"),
                expect={"status": 503},
            ),
        ),
    ),
    Scenario(
        "no_route_no_mutations",
        setup(
            [fwd("/only")],
            vhost={"response_headers_to_add": [hv("x-vhost", "v")]},
            rc={"response_headers_to_add": [hv("x-global", "g")]},
        ),
        (
            Http(
                path="/elsewhere",
                observe=("has:x-vhost", "has:x-global"),
                expect={"status": 404, "has:x-vhost": False, "has:x-global": False},
            ),
        ),
    ),
    Scenario(
        "mutations_follow_the_route_taken",
        setup(
            [
                fwd("/a", request_headers_to_add=[hv("x-route", "a")]),
                fwd("/b", request_headers_to_add=[hv("x-route", "b")]),
                fwd("/"),
            ]
        ),
        (
            Http(
                path="/a",
                observe=("up.header_all:x-route",),
                expect={"up.header_all:x-route": ["a"]},
            ),
            Http(
                path="/b",
                observe=("up.header_all:x-route",),
                expect={"up.header_all:x-route": ["b"]},
            ),
            Http(
                path="/c", observe=("up.header_all:x-route",), expect={"up.header_all:x-route": []}
            ),
        ),
    ),
    Scenario(
        "mutated_names_are_lower_case_and_values_keep_their_bytes",
        setup(
            [
                fwd(
                    request_headers_to_add=[hv("X-Upper", 'MiXeD \tvalue; q=1, "x"')],
                    response_headers_to_add=[hv("X-Resp-Upper", "Ok")],
                )
            ]
        ),
        (
            Http(
                observe=("up.header:x-upper", "header:x-resp-upper"),
                expect={"header:x-resp-upper": "Ok"},
            ),
        ),
    ),
    Scenario(
        "bytes_no_header_may_carry_never_reach_a_formatter",
        setup([fwd(request_headers_to_add=[hv("x-copy", "%REQ(x-bad)%")])]),
        (
            Raw(
                b"GET / HTTP/1.1\r\nhost: h\r\nx-bad: a\x00b\r\n\r\n",
                expect={"status": 400, "upstream": None},
            ),
            Http(
                headers=(("x-bad", "fine"),),
                observe=("up.header:x-copy",),
                expect={"up.header:x-copy": "fine"},
            ),
        ),
    ),
    Scenario(
        "obs_text_is_copied_as_it_came",
        setup([fwd(request_headers_to_add=[hv("x-copy", "<%REQ(x-latin)%>")])]),
        (
            Raw(
                b"GET / HTTP/1.1\r\nhost: h\r\nx-latin: caf\xe9\r\n\r\n",
                observe=("up.header:x-copy", "up.header:x-latin"),
            ),
        ),
    ),
    Scenario(
        "mutations_apply_once_to_every_try",
        setup(
            [
                fwd(
                    request_headers_to_add=[hv("x-a", "route")],
                    response_headers_to_add=[hv("x-r", "route")],
                    route={
                        "cluster": "backend",
                        "retry_policy": {"retry_on": "5xx", "num_retries": 2},
                    },
                )
            ]
        ),
        (
            Http(
                headers=(("x-test-status", "503"),),
                observe=("up.header_all:x-a", "header_all:x-r"),
                expect={"status": 503, "up.header_all:x-a": ["route"], "header_all:x-r": ["route"]},
            ),
        ),
        stats={"cluster.backend.upstream_rq_retry": 2},
    ),
    Scenario(
        "values_read_the_request_before_its_rewrites",
        setup(
            [
                fwd(
                    "/old/",
                    request_headers_to_add=[
                        hv("x-saw-path", "%REQ(:path)%"),
                        hv("x-saw-host", "%REQ(:authority)%"),
                    ],
                    request_headers_to_remove=["x-envoy-original-path"],
                    route={
                        "cluster": "backend",
                        "prefix_rewrite": "/new/",
                        "host_rewrite_literal": "rewritten.example",
                    },
                )
            ]
        ),
        (
            Http(
                path="/old/x",
                headers=(("host", "original.example"),),
                observe=(
                    "up.path",
                    "up.header:host",
                    "up.header:x-saw-path",
                    "up.header:x-saw-host",
                    "up.header:x-envoy-original-path",
                ),
                expect={
                    "up.path": "/new/x",
                    "up.header:x-saw-path": "/old/x",
                    "up.header:x-saw-host": "original.example",
                },
            ),
        ),
    ),
    Scenario(
        "each_virtual_host_its_own_mutations",
        lambda ctx: _two_vhosts(ctx),
        (
            Http(
                headers=(("host", "one.example"),),
                observe=("up.header_all:x-vh", "header_all:x-vh"),
                expect={"up.header_all:x-vh": ["one"], "header_all:x-vh": ["one"]},
            ),
            Http(
                headers=(("host", "two.example"),),
                observe=("up.header_all:x-vh", "header_all:x-vh"),
                expect={"up.header_all:x-vh": ["two"], "header_all:x-vh": ["two"]},
            ),
        ),
    ),
    Scenario(
        "a_content_type_without_a_body",
        setup(
            [
                direct(
                    "/nobody",
                    200,
                    None,
                    response_headers_to_add=[hv("content-type", "application/json")],
                ),
                direct(
                    "/body",
                    200,
                    "{}",
                    response_headers_to_add=[hv("content-type", "application/json")],
                ),
            ]
        ),
        (Http(path="/nobody"), Http(path="/body")),
    ),
]


def _two_vhosts(ctx: Ctx) -> Json:
    def vh(name: str) -> Json:
        return {
            "name": name,
            "domains": [f"{name}.example"],
            "routes": [fwd()],
            "request_headers_to_add": [hv("x-vh", name)],
            "response_headers_to_add": [hv("x-vh", name)],
        }

    return bootstrap(
        admin_port=ctx.admin_port,
        listeners=[http_listener(port=ctx.port, virtual_hosts=[vh("one"), vh("two")])],
        clusters=[cluster("backend", [ctx.up("a")])],
    )


# ---------------------------------------------------------------------------------
# Configurations Envoy refuses
# ---------------------------------------------------------------------------------

HCM_PATH = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config"

# (name, where (route / vhost / rc), field and value, envoyx's error path under the
# route configuration, Envoy's message; None: Envoy accepts it)
REFUSED: list[tuple[str, str, Json, str, str | None]] = [
    (
        "pseudo_header_added",
        "route",
        {"request_headers_to_add": [hv(":path", "/x")]},
        "virtual_hosts[0].routes[0].request_headers_to_add[0].header.key",
        ":-prefixed or host headers may not be modified",
    ),
    (
        "host_added",
        "vhost",
        {"response_headers_to_add": [hv("Host", "h")]},
        "virtual_hosts[0].response_headers_to_add[0].header.key",
        ":-prefixed or host headers may not be modified",
    ),
    (
        "pseudo_header_removed",
        "rc",
        {"request_headers_to_remove": [":authority"]},
        "request_headers_to_remove[0]",
        ":-prefixed or host headers may not be removed",
    ),
    (
        "host_removed",
        "route",
        {"response_headers_to_remove": ["host"]},
        "virtual_hosts[0].routes[0].response_headers_to_remove[0]",
        ":-prefixed or host headers may not be removed",
    ),
    (
        "append_with_append_action",
        "route",
        {"request_headers_to_add": [hv("x", "1", "ADD_IF_ABSENT", append=True)]},
        "virtual_hosts[0].routes[0].request_headers_to_add[0].append",
        "Both append and append_action are set and it's not allowed",
    ),
    (
        "unknown_operator",
        "route",
        {"request_headers_to_add": [hv("x", "%NOT_AN_OPERATOR%")]},
        "virtual_hosts[0].routes[0].request_headers_to_add[0].header.value",
        "Not supported field in StreamInfo: NOT_AN_OPERATOR",
    ),
    (
        "unterminated_operator",
        "route",
        {"request_headers_to_add": [hv("x", "100%")]},
        "virtual_hosts[0].routes[0].request_headers_to_add[0].header.value",
        "Incorrect configuration: 100%",
    ),
]

# Where envoyx refuses what Envoy accepts, on purpose: route headers are written
# before the upstream host is picked, and envoyx keeps no dynamic metadata, so these
# operators would be empty; they are refused by name instead.
REFUSED_BY_ENVOYX_ONLY: list[tuple[str, str, Json, str, str]] = [
    (
        "upstream_metadata",
        "route",
        {"response_headers_to_add": [hv("x", "%UPSTREAM_METADATA(envoy.lb:canary)%")]},
        "virtual_hosts[0].routes[0].response_headers_to_add[0].header.value",
        "metadata operators (%UPSTREAM_METADATA% and kin) are not supported in header "
        "mutations by envoyx",
    ),
    (
        "dynamic_metadata",
        "vhost",
        {"request_headers_to_add": [hv("x", "%DYNAMIC_METADATA(ns:key)%")]},
        "virtual_hosts[0].request_headers_to_add[0].header.value",
        "%DYNAMIC_METADATA% is not supported by envoyx (envoyx keeps no dynamic or "
        "virtual-cluster metadata)",
    ),
]

# Values Envoy's schema refuses (CR, LF, NUL: HTTP_HEADER_VALUE); the field path is
# the same in both.
BAD_BYTES = [("cr_lf", "a\r\nx-injected: 1"), ("nul", "a\x00b"), ("lf", "a\nb")]


def placed(where: str, fields: Json) -> Callable[[Ctx], Json]:
    if where == "route":
        return setup([fwd(**fields)])
    if where == "vhost":
        return setup(vhost=fields)
    return setup(rc=fields)


def dummy_ctx(tmp_path: Path) -> Ctx:
    return Ctx(
        port=10000,
        admin_port=10001,
        upstreams={"a": ("127.0.0.1", 10002)},
        refused=("127.0.0.1", 10003),
        access_log=str(tmp_path / "access.log"),
    )


def envoy_refusal(envoy_binary: Path, document: Json, tmp_path: Path) -> str | None:
    """Envoy's ``--mode validate`` error text, None when it accepts the document."""
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(document))
    result = subprocess.run(
        [str(envoy_binary), "--mode", "validate", "-c", str(path), "-l", "critical"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    return None if result.returncode == 0 else result.stdout + result.stderr


def envoyx_errors(document: Json) -> list[str]:
    try:
        bootstrap_pb = load_bootstrap(document)
    except ConfigError as e:
        return list(e.errors)
    return list(_core.validate(bootstrap_to_json(bootstrap_pb)))


# ---------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------


test_scenario = differential_tests(SCENARIOS)


@pytest.mark.parametrize(
    ("where", "fields", "path", "message"),
    [r[1:] for r in REFUSED],
    ids=[r[0] for r in REFUSED],
)
def test_refused_like_envoy(
    where: str, fields: Json, path: str, message: str, envoy_binary: Path, tmp_path: Path
) -> None:
    document = placed(where, fields)(dummy_ctx(tmp_path))
    refusal = envoy_refusal(envoy_binary, document, tmp_path)
    assert refusal is not None, "Envoy accepts it"
    assert message in refusal
    errors = envoyx_errors(document)
    assert any(e.startswith(f"{HCM_PATH}.{path}: ") and message in e for e in errors), errors


@pytest.mark.parametrize(
    ("where", "fields", "path", "message"),
    [r[1:] for r in REFUSED_BY_ENVOYX_ONLY],
    ids=[r[0] for r in REFUSED_BY_ENVOYX_ONLY],
)
def test_metadata_operators_are_refused_by_name(
    where: str, fields: Json, path: str, message: str, envoy_binary: Path, tmp_path: Path
) -> None:
    document = placed(where, fields)(dummy_ctx(tmp_path))
    assert envoy_refusal(envoy_binary, document, tmp_path) is None, "Envoy accepts it"
    assert f"{HCM_PATH}.{path}: {message}" in envoyx_errors(document)


@pytest.mark.parametrize(("name", "value"), BAD_BYTES, ids=[b[0] for b in BAD_BYTES])
def test_values_with_cr_lf_nul_are_refused(
    name: str, value: str, envoy_binary: Path, tmp_path: Path
) -> None:
    document = setup([fwd(request_headers_to_add=[hv("x-bad", value)])])(dummy_ctx(tmp_path))
    refusal = envoy_refusal(envoy_binary, document, tmp_path)
    assert refusal is not None, "Envoy accepts it"
    assert "HeaderValueValidationError.Value: value does not match regex pattern" in refusal
    field = f"{HCM_PATH}.virtual_hosts[0].routes[0].request_headers_to_add[0].header.value"
    assert envoyx_errors(document) == [f"{field}: value must be a valid HTTP header value"]


def test_table_is_large_enough() -> None:
    names = [s.name for s in SCENARIOS]
    assert len(names) >= 25
    assert len(set(names)) == len(names)
