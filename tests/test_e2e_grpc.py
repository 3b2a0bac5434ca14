"""gRPC through the proxy: a grpcio client and a grpcio server (generic handlers,
raw-bytes messages), h2c on both sides; trailers must arrive intact.

Each test runs against envoyx and, as a second parametrization, the real Envoy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest

from support.bootstrap import bootstrap, cluster, http_listener, route, virtual_host
from support.proxy import ProxyProcess
from support.upstreams import STREAM_METHOD, UNARY_METHOD, GrpcUpstream
from support.wait import free_port

StartProxy = Callable[..., ProxyProcess]


@dataclass
class Through:
    channel: grpc.Channel
    proxy: ProxyProcess


@pytest.fixture
def through(start_proxy: StartProxy, grpc_upstream: GrpcUpstream) -> Iterator[Through]:
    bs = bootstrap(
        admin_port=free_port(),
        listeners=[
            http_listener(
                port=free_port(),
                stat_prefix="grpc_in",
                virtual_hosts=[
                    virtual_host("all", ["*"], [route({"prefix": "/"}, cluster="grpc")])
                ],
            )
        ],
        clusters=[cluster("grpc", [grpc_upstream.address], http2=True)],
    )
    proxy = start_proxy(bs)
    host, port = proxy.listener_address()
    with grpc.insecure_channel(f"{host}:{port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=15)
        yield Through(ch, proxy)


def test_unary_call_with_metadata_and_trailers(through: Through) -> None:
    call = through.channel.unary_unary(UNARY_METHOD)
    reply, state = call.with_call(b"ping", timeout=10, metadata=(("x-client", "1"),))
    assert reply == b"echo:ping"
    assert state.code() == grpc.StatusCode.OK
    assert ("x-upstream", "grpc") in state.initial_metadata()
    trailing = dict(state.trailing_metadata())
    assert trailing["x-trailer"] == "unary"
    assert trailing["x-trailer-bin"] == GrpcUpstream.TRAILER_BIN


def test_server_streaming_call(through: Through) -> None:
    stream = through.channel.unary_stream(STREAM_METHOD)(b"200", timeout=10)
    messages = list(stream)
    assert messages == [f"msg-{i}".encode() for i in range(200)]
    assert stream.code() == grpc.StatusCode.OK
    assert dict(stream.trailing_metadata())["x-trailer"] == "stream"


def test_error_status_and_details_pass_through(through: Through) -> None:
    call = through.channel.unary_unary(UNARY_METHOD)
    with pytest.raises(grpc.RpcError) as info:
        call(b"x", timeout=10, metadata=(("x-test-grpc-code", "7"),))
    err = info.value
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == "requested failure"
    assert dict(err.trailing_metadata())["x-trailer"] == "unary"


def test_large_message_and_concurrent_calls(through: Through) -> None:
    call = through.channel.unary_unary(UNARY_METHOD)
    big = bytes(range(256)) * 8192  # 2 MiB, under grpcio's 4 MiB default limit
    assert call(big, timeout=20) == b"echo:" + big
    with ThreadPoolExecutor(max_workers=16) as pool:
        replies = list(pool.map(lambda i: call(f"n{i}".encode(), timeout=20), range(64)))
    assert replies == [f"echo:n{i}".encode() for i in range(64)]
    stats = through.proxy.wait_stat("cluster.grpc.upstream_rq_200", 65)
    # Everything went over one multiplexed HTTP/2 connection on each side.
    assert stats["http.grpc_in.downstream_cx_http2_total"] == 1
    assert stats["cluster.grpc.upstream_cx_http2_total"] == 1
