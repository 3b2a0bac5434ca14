"""HTTP/1 header-name case as Envoy 1.40 writes it, side by side (differential, raw
sockets on both sides): ``http_protocol_options.header_key_format`` on the
connection manager (response names) and on the cluster (request names), with
``proper_case_words`` and the ``preserve_case`` stateful formatter
(``forward_reason_phrase``, ``formatter_type_on_envoy_headers``).

The client sends names in mixed case; a recording upstream answers every request
with a mixed-case head, the reason phrase ``Very Created``, and as body the head it
received, byte for byte. The facts are the names each side received as spelled
(``RawHead`` in ``support/differential.py``): the names the proxy adds itself
(``x-request-id``, ``x-envoy-expected-rq-timeout-ms``, ``x-forwarded-for``,
``x-envoy-upstream-service-time``, ``date``, ``server``) included.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from support.bootstrap import bootstrap, cluster, http_listener, route, virtual_host
from support.differential import Ctx, Json, RawHead, Scenario, differential_tests

pytestmark = pytest.mark.envoy

REPLY_HEAD = (
    b"HTTP/1.1 201 Very Created\r\n"
    b"X-Up-Mixed: 1\r\n"
    b"CONTENT-TYPE: application/json\r\n"
    b"x-lower: 2\r\n"
    b"X-UPPER: 3\r\n"
    b"Set-Cookie: a=1\r\n"
    b"set-cookie: b=2\r\n"
    b"X-Upstream: recorder\r\n"
)


UPGRADE_REPLY = (
    b"HTTP/1.1 101 Switching Protocols\r\nUPGRADE: websocket\r\nConnection: Upgrade\r\n"
    b"X-Up-Mixed: 1\r\n\r\n"
)
UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"X-Mixed-Case: a\r\n\r\n"
)


class RecordingUpstream:
    """HTTP/1.1 upstream on a raw socket: answers each request (keep-alive) with
    ``REPLY_HEAD`` and, as a JSON body, the request head exactly as received; a
    request with ``x-fail-once: <token>`` gets a 503 the first time its token is
    seen, and is served the next time (for retries)."""

    def __init__(self) -> None:
        self.failed: set[bytes] = set()
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.address: tuple[str, int] = self.sock.getsockname()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn, contextlib.suppress(OSError):
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                length = 0
                fail = None
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                    if name.strip().lower() == b"x-fail-once":
                        fail = value.strip()
                while len(buf) < length:
                    buf += conn.recv(65536)
                buf = buf[length:]
                if b"\r\nupgrade:" in head.lower():
                    # Switch, then end the tunnel at once.
                    conn.sendall(UPGRADE_REPLY)
                    return
                with self.lock:
                    # Failed, then served: the next proxy's run of the token fails again.
                    first = fail is not None and fail not in self.failed
                    if first:
                        self.failed.add(fail)
                    elif fail is not None:
                        self.failed.discard(fail)
                if first:
                    conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
                    continue
                body = json.dumps({"head": head.decode("latin-1")}).encode()
                conn.sendall(REPLY_HEAD + b"content-length: %d\r\n\r\n" % len(body) + body)


_UPSTREAM: dict[str, tuple[str, int]] = {}


@pytest.fixture(scope="module", autouse=True)
def recording_upstream() -> Iterator[RecordingUpstream]:
    up = RecordingUpstream()
    _UPSTREAM["recorder"] = up.address
    yield up
    up.close()


PRESERVE_TYPE = (
    "type.googleapis.com/"
    "envoy.extensions.http.header_formatters.preserve_case.v3.PreserveCaseFormatterConfig"
)


def proper() -> Json:
    return {"header_key_format": {"proper_case_words": {}}}


def preserve(reason: bool = False, envoy_headers: str | None = None) -> Json:
    config: Json = {"@type": PRESERVE_TYPE, "forward_reason_phrase": reason}
    if envoy_headers is not None:
        config["formatter_type_on_envoy_headers"] = envoy_headers
    return {
        "header_key_format": {
            "stateful_formatter": {"name": "preserve_case", "typed_config": config}
        }
    }


HPO = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def proxy(
    hcm_h1: Json | None = None,
    cluster_h1: Json | None = None,
    *,
    cluster_form: str = "explicit",
    **hcm: Any,
) -> Callable[[Ctx], Json]:
    """Everything under ``/`` to the recording upstream (``/direct`` answered by
    the proxy); ``hcm_h1`` is the connection manager's ``http_protocol_options``,
    ``cluster_h1`` the cluster's, in ``explicit_http_config`` or the cluster's
    deprecated ``http_protocol_options`` (``cluster_form``). (``auto_config``
    needs TLS: Envoy refuses it on a plaintext cluster.)"""

    def build(ctx: Ctx) -> Json:
        listener = http_listener(
            port=ctx.port,
            virtual_hosts=[
                virtual_host(
                    "all",
                    ["*"],
                    [
                        {
                            "match": {"path": "/direct"},
                            "direct_response": {"status": 200, "body": {"inline_string": "d"}},
                        },
                        {
                            "match": {"prefix": "/retry"},
                            "route": {
                                "cluster": "backend",
                                "retry_policy": {"retry_on": "5xx", "num_retries": 1},
                            },
                        },
                        route({"prefix": "/"}, cluster="backend"),
                    ],
                ),
            ],
        )
        tc = listener["filter_chains"][0]["filters"][0]["typed_config"]
        tc.update(hcm)
        if hcm_h1 is not None:
            tc["http_protocol_options"] = hcm_h1
        c = cluster("backend", [_UPSTREAM["recorder"]])
        if cluster_h1 is not None:
            if cluster_form == "deprecated":
                c["http_protocol_options"] = cluster_h1
            else:
                config = {"explicit_http_config": {"http_protocol_options": cluster_h1}}
                c["typed_extension_protocol_options"] = {
                    HPO: {"@type": f"type.googleapis.com/{HPO}", **config}
                }
        return bootstrap(admin_port=ctx.admin_port, listeners=[listener], clusters=[c])

    return build


def request(path: str = "/x", extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: example.com\r\nX-Mixed-Case: a\r\nUSER-AGENT: t\r\n"
        f"x-lower: b\r\nAccept: */*\r\n{extra}\r\n"
    ).encode()


# The same names spelled otherwise (a second request on the pooled upstream
# connection: the case is each request's own); a name repeated in another case.
OTHER_SPELLING = b"GET /y HTTP/1.1\r\nhost: example.com\r\nx-MIXED-case: a\r\nuser-Agent: t\r\n\r\n"
REPEATED = (
    b"GET /z HTTP/1.1\r\nHost: example.com\r\nX-Dup: 1\r\nx-DUP: 2\r\n"
    b"X-Forwarded-Proto: http\r\n\r\n"
)
POST = (
    b"POST /p HTTP/1.1\r\nHost: example.com\r\nContent-Length: 5\r\n"
    b"Content-TYPE: text/plain\r\n\r\nhello"
)
CHUNKED_POST = (
    b"POST /c HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n"
)
DIRECT = b"GET /direct HTTP/1.1\r\nHost: example.com\r\nX-Mixed-Case: a\r\n\r\n"
BAD = b"GET / HTTP/1.1\r\nHost: example.com\r\nbad header\r\n\r\n"

LOWER_UP = [
    "accept",
    "host",
    "user-agent",
    "x-envoy-expected-rq-timeout-ms",
    "x-forwarded-proto",
    "x-lower",
    "x-mixed-case",
    "x-request-id",
]
REPLY_AS_SENT = [
    "CONTENT-TYPE",
    "Set-Cookie",
    "Set-Cookie",
    "X-UPPER",
    "X-Up-Mixed",
    "X-Upstream",
    "content-length",
    "date",
    "server",
    "x-envoy-upstream-service-time",
    "x-lower",
]


def requests(*extra: bytes) -> tuple[RawHead, ...]:
    return tuple(RawHead(data) for data in (request(), OTHER_SPELLING, REPEATED, *extra))


SCENARIOS = [
    Scenario(
        "default_lowercase_both_ways",
        proxy(),
        (
            RawHead(request(), expect={"reason": "Created", "up.names": LOWER_UP}),
            *requests(POST, DIRECT)[1:],
        ),
    ),
    Scenario(
        "hcm_proper_case_responses",
        proxy(proper()),
        (
            RawHead(request(), expect={"up.names": LOWER_UP}),
            *requests(DIRECT, BAD)[1:],
            # A route miss: the connection manager's own reply.
            RawHead(b"GET /x HTTP/1.1\r\nHost: example.com\r\n\r\n"),
        ),
    ),
    Scenario(
        "cluster_proper_case_requests",
        proxy(cluster_h1=proper()),
        requests(POST, CHUNKED_POST),
    ),
    Scenario(
        "cluster_proper_case_deprecated_field",
        proxy(cluster_h1=proper(), cluster_form="deprecated"),
        requests(POST),
    ),
    Scenario(
        "hcm_preserve_case_requests",
        proxy(preserve(reason=True)),
        (
            RawHead(request(), expect={"reason": "Created"}),
            *requests(POST, CHUNKED_POST, DIRECT)[1:],
        ),
    ),
    Scenario(
        "cluster_preserve_case_responses_and_reason",
        proxy(cluster_h1=preserve(reason=True)),
        (
            RawHead(request(), expect={"reason": "Very Created", "names": REPLY_AS_SENT}),
            *requests(POST, DIRECT)[1:],
        ),
    ),
    Scenario(
        "cluster_preserve_case_without_reason",
        proxy(cluster_h1=preserve(reason=False)),
        (RawHead(request(), expect={"reason": "Created"}),),
    ),
    Scenario(
        "preserve_case_both_sides",
        proxy(preserve(), preserve(reason=True)),
        requests(POST, CHUNKED_POST, DIRECT, BAD),
    ),
    Scenario(
        "preserve_case_both_sides_proper_case_envoy_headers",
        proxy(preserve(envoy_headers="PROPER_CASE"), preserve(envoy_headers="PROPER_CASE")),
        requests(POST, DIRECT),
    ),
    Scenario(
        "hcm_preserve_cluster_proper_case",
        # The request's recorded case wins over the cluster's proper case.
        proxy(preserve(envoy_headers="DEFAULT"), proper()),
        requests(POST),
    ),
    Scenario(
        "hcm_proper_case_cluster_preserve",
        # The response's recorded case wins over the connection manager's.
        proxy(proper(), preserve(reason=True)),
        requests(DIRECT),
    ),
    Scenario(
        "preserve_case_on_a_retried_request",
        # The first try gets a 503; the retry carries the client's spelling too.
        proxy(preserve(), preserve(reason=True)),
        tuple(
            RawHead(
                f"GET /retry HTTP/1.1\r\nHost: example.com\r\nX-Fail-Once: {run}\r\n"
                "X-Mixed-Case: a\r\n\r\n".encode(),
                expect={
                    "status": 201,
                    "reason": "Very Created",
                    "up.names": [
                        "Host",
                        "X-Fail-Once",
                        "X-Mixed-Case",
                        "x-envoy-expected-rq-timeout-ms",
                        "x-forwarded-proto",
                        "x-request-id",
                    ],
                },
            )
            for run in ("r1", "r2")
        ),
        stats={"cluster.backend.upstream_rq_retry": 2},
    ),
    Scenario(
        "upgrade_response_proper_case",
        proxy(proper(), upgrade_configs=[{"upgrade_type": "websocket"}]),
        (RawHead(UPGRADE, expect={"status": 101}),),
    ),
    Scenario(
        "upgrade_response_preserve_case",
        proxy(preserve(), preserve(), upgrade_configs=[{"upgrade_type": "websocket"}]),
        (RawHead(UPGRADE, expect={"status": 101}),),
    ),
    Scenario(
        "hcm_preserve_case_at_the_edge",
        # use_remote_address: x-forwarded-for and x-envoy-external-address added.
        proxy(preserve(envoy_headers="PROPER_CASE"), use_remote_address=True),
        requests(),
    ),
]


test_header_case = differential_tests(SCENARIOS)
