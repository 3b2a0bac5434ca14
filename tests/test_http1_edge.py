"""HTTP/1 edge cases as Envoy 1.40 answers them, side by side (differential, raw
sockets): a request without ``Host``, a ``Transfer-Encoding`` that is not exactly one
``chunked``, ``Expect: 100-continue``, absolute-form targets, ``OPTIONS *``,
``CONNECT`` without an upgrade config, HTTP/1.0 (refused, accepted, keep-alive,
without ``Host``), pipelined requests, and ``http_protocol_options``
(``accept_http_10``, ``default_host_for_http_10``, ``allow_chunked_length``).
The machinery is in ``support/differential.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

from support.bootstrap import bootstrap, cluster, http_listener, route, virtual_host
from support.differential import Ctx, Json, Raw, RawSeq, Scenario, differential_tests

pytestmark = pytest.mark.envoy


def proxy(ctx: Ctx, **hcm: Any) -> Json:
    """Everything to the echo upstream ``a``; ``hcm`` fields set on the connection
    manager as written."""
    listener = http_listener(
        port=ctx.port,
        virtual_hosts=[
            virtual_host("all", ["*"], [route({"prefix": "/"}, cluster="backend")]),
        ],
    )
    listener["filter_chains"][0]["filters"][0]["typed_config"].update(hcm)
    return bootstrap(
        admin_port=ctx.admin_port,
        listeners=[listener],
        clusters=[cluster("backend", [ctx.up("a")])],
    )


def plain(ctx: Ctx) -> Json:
    return proxy(ctx)


def http10(**options: Any) -> Any:
    return lambda ctx: proxy(ctx, http_protocol_options={"accept_http_10": True, **options})


def http_options(**options: Any) -> Any:
    return lambda ctx: proxy(ctx, http_protocol_options=options)


H = "http.ingress_http."
UP = ("up.path", "up.header:host")


def get(target: str = "/", headers: str = "Host: example.com\r\n", version: str = "1.1") -> bytes:
    return f"GET {target} HTTP/{version}\r\n{headers}\r\n".encode()


SHA_HELLO = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
SHA_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
SHA_EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
NOT_IMPLEMENTED = {"status": 501, "body": "Not Implemented", "closed": True}


def te(value: str, extra: str = "") -> Raw:
    return Raw(
        f"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {value}\r\n{extra}\r\n"
        "0\r\n\r\n".encode(),
        expect=NOT_IMPLEMENTED,
    )


def proxied(*facts: Any) -> dict[str, Any]:
    return {"responses": [(200, "a", None, *facts)]}


SCENARIOS: list[Scenario] = [
    Scenario(
        "h11_without_host",
        plain,
        (
            # HTTP/1.1 needs a Host: 400 with an empty body, and the close.
            Raw(
                b"GET / HTTP/1.1\r\n\r\n",
                expect={"status": 400, "body": "", "header:content-type": None, "closed": True},
            ),
            # An empty Host is a Host.
            Raw(b"GET / HTTP/1.1\r\nHost:\r\n\r\n", expect={"status": 200}),
            Raw(get(), expect={"status": 200}),
        ),
        stats={
            H + "downstream_rq_4xx": 1,
            H + "downstream_rq_2xx": 2,
            H + "downstream_cx_protocol_error": 0,
        },
    ),
    Scenario(
        "transfer_encoding_not_chunked",
        plain,
        (
            te("gzip"),
            te("gzip, chunked"),
            te("chunked, chunked"),
            te("identity"),
            te("chunked, gzip"),
            te("x"),
            # Two headers of one `chunked` each are not one `chunked`.
            te("chunked", "Transfer-Encoding: chunked\r\n"),
            # The coding's name is case-insensitive.
            Raw(
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: CHUNKED\r\n\r\n0\r\n\r\n",
                expect={"status": 200},
            ),
            # Both framings: 400 before the coding is looked at.
            Raw(
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n"
                b"Content-Length: 0\r\n\r\n",
                expect={"status": 400, "body": "Bad Request"},
            ),
        ),
        stats={
            H + "downstream_rq_5xx": 7,
            H + "downstream_rq_4xx": 1,
            H + "downstream_rq_2xx": 1,
            H + "downstream_cx_protocol_error": 8,
        },
    ),
    Scenario(
        "expect_100_continue",
        plain,
        (
            # The proxy answers 100 itself and does not forward the Expect.
            RawSeq(
                b"POST /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                b"Content-Length: 5\r\n\r\nhello",
                responses=2,
                observe=("up.path", "up.has:expect", "up.body"),
                expect={
                    "responses": [
                        (100, None, "", "<no echo>", "<no echo>", "<no echo>"),
                        (200, "a", None, "/up", False, (5, SHA_HELLO)),
                    ]
                },
            ),
            RawSeq(
                b"POST /up HTTP/1.0\r\nHost: x\r\nExpect: 100-continue\r\n"
                b"Content-Length: 5\r\n\r\nhello",
                responses=2,
                expect={"responses": [(426, None, "Upgrade Required")]},
            ),
        ),
        stats={H + "downstream_rq_1xx": 1, H + "downstream_rq_2xx": 1, H + "downstream_rq_4xx": 1},
    ),
    Scenario(
        "absolute_form_target",
        plain,
        (
            # The target's authority replaces Host; the path goes on.
            RawSeq(
                get("http://abs.example/p?q=1", "Host: other.example\r\n"),
                observe=UP,
                expect=proxied("/p?q=1", "abs.example"),
            ),
            RawSeq(
                get("http://abs.example:8080/p", "Host: other.example\r\n"),
                observe=UP,
                expect=proxied("/p", "abs.example:8080"),
            ),
            RawSeq(
                get("https://abs.example/p", "Host: other.example\r\n"),
                observe=UP,
                expect=proxied("/p", "abs.example"),
            ),
            RawSeq(
                get("http://abs.example", "Host: other.example\r\n"),
                observe=UP,
                expect=proxied("/", "abs.example"),
            ),
        ),
    ),
    Scenario(
        "options_star_and_connect",
        plain,
        (
            # `*` is not a path: 404 (downstream_rq_non_relative_path), kept open.
            RawSeq(
                b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
                observe=("header:connection",),
                expect={"responses": [(404, None, "", None)]},
            ),
            # CONNECT without an upgrade config matches no route; the request
            # never ends, so the connection closes.
            RawSeq(
                b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
                observe=("header:connection",),
                expect={"responses": [(404, None, "", "close")]},
            ),
            # `*` is a target of OPTIONS only: a codec error.
            RawSeq(
                b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
                expect={"responses": [(400, None, "Bad Request")]},
            ),
        ),
        stats={
            H + "downstream_rq_4xx": 3,
            H + "no_route": 1,
            H + "downstream_rq_non_relative_path": 1,
            H + "downstream_cx_protocol_error": 1,
        },
    ),
    Scenario(
        "http10_refused_by_default",
        plain,
        (
            RawSeq(get(version="1.0"), expect={"responses": [(426, None, "Upgrade Required")]}),
            RawSeq(
                get(version="1.0", headers=""),
                expect={"responses": [(426, None, "Upgrade Required")]},
            ),
        ),
        stats={H + "downstream_rq_4xx": 2, H + "downstream_cx_protocol_error": 2},
    ),
    Scenario(
        "http10_accepted",
        http10(),
        (
            # Proxied as HTTP/1.1; the response closes the connection.
            RawSeq(
                get(version="1.0"),
                observe=(*UP, "header:connection", "up.protocol"),
                expect=proxied("/", "example.com", "close", "1.1"),
            ),
            # keep-alive: two requests on one connection, each answer says so.
            RawSeq(
                get(version="1.0", headers="Host: x\r\nConnection: keep-alive\r\n") * 2,
                responses=2,
                observe=("header:connection",),
                expect={"responses": [(200, "a", None, "keep-alive")] * 2},
            ),
            # Without Host and without default_host_for_http_10: 400.
            RawSeq(
                get(version="1.0", headers=""),
                observe=UP,
                expect={"responses": [(400, None, "", "<no echo>", "<no echo>")]},
            ),
        ),
        stats={
            H + "downstream_rq_2xx": 3,
            H + "downstream_rq_4xx": 1,
            H + "downstream_cx_total": 3,
        },
    ),
    Scenario(
        "http10_default_host",
        http10(default_host_for_http_10="default.example"),
        (
            RawSeq(
                get(version="1.0", headers=""), observe=UP, expect=proxied("/", "default.example")
            ),
            RawSeq(
                get(version="1.0", headers="Host: given.example\r\n"),
                observe=UP,
                expect=proxied("/", "given.example"),
            ),
            # Only HTTP/1.0 gets the default.
            RawSeq(
                get(version="1.1", headers=""),
                observe=UP,
                expect={"responses": [(400, None, "", "<no echo>", "<no echo>")]},
            ),
        ),
    ),
    Scenario(
        "pipelined_requests",
        plain,
        (
            RawSeq(
                get("/1") + get("/2") + get("/3"),
                responses=3,
                observe=("up.path",),
                expect={"responses": [(200, "a", None, f"/{i}") for i in (1, 2, 3)]},
            ),
            RawSeq(
                b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc" + get("/after"),
                responses=2,
                observe=("up.path", "up.body"),
                expect={
                    "responses": [
                        (200, "a", None, "/p", (3, SHA_ABC)),
                        (200, "a", None, "/after", (0, SHA_EMPTY)),
                    ]
                },
            ),
            # Nothing after a `connection: close` request is served.
            RawSeq(
                get("/1") + get("/2", "Host: x\r\nConnection: close\r\n") + get("/3"),
                responses=3,
                observe=("up.path",),
                expect={"responses": [(200, "a", None, "/1"), (200, "a", None, "/2")]},
            ),
        ),
        stats={H + "downstream_rq_2xx": 7},
    ),
    Scenario(
        "allow_chunked_length",
        http_options(allow_chunked_length=True),
        (
            # Both framings: chunked wins, the length is not forwarded.
            RawSeq(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                observe=("up.body", "up.has:content-length"),
                expect=proxied((3, SHA_ABC), False),
            ),
        ),
    ),
    Scenario(
        "chunked_and_length_refused",
        plain,
        (
            RawSeq(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                expect={"responses": [(400, None, "Bad Request")]},
            ),
        ),
        stats={H + "downstream_cx_protocol_error": 1},
    ),
]


test_scenario = differential_tests(SCENARIOS)
