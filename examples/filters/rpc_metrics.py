"""Per-method gRPC metrics, as a Python filter: the signals an autoscaler scales on.

Every gRPC request (``content-type: application/grpc*``, path ``/pkg.Service/Method``)
is counted by service and method when it arrives; when it finishes, its gRPC status
(``grpc-status`` from the trailers, or from the headers of a trailers-only response,
else derived from the HTTP status as the gRPC spec maps it) and its duration are
recorded. They appear on the admin ``/stats/prometheus`` as::

    envoy_python_rpc_requests{service="helloworld.Greeter",method="SayHello"}         counter
    envoy_python_rpc_responses{service=...,method=...,grpc_code="OK"}                 counter
    envoy_python_rpc_duration_ms_bucket{service=...,method=...,le="..."}              histogram
    envoy_python_rpc_duration_ms_sum / _count{service=...,method=...}
    envoy_python_rpc_in_flight{service="helloworld.Greeter"}                          gauge

and in ``/stats`` as ``python.rpc.requests.service.<service>.method.<method>`` and so on.
For example, scale a deployment on its request rate, error ratio or concurrency (a
Prometheus adapter or KEDA query)::

    sum(rate(envoy_python_rpc_requests{service="helloworld.Greeter"}[1m]))
    sum(rate(envoy_python_rpc_responses{grpc_code!="OK"}[5m]))
      / sum(rate(envoy_python_rpc_responses[5m]))
    histogram_quantile(0.99, sum by (le) (rate(envoy_python_rpc_duration_ms_bucket[5m])))
    sum(envoy_python_rpc_in_flight{service="helloworld.Greeter"})

Filter configuration (the TypedStruct's ``value.config``)::

    max_methods: 1000   # distinct (service, method) pairs; later ones count as "other"

The cap keeps a client that invents method names from creating unbounded series.
Reading ``grpc-status`` from the trailers makes the proxy buffer each response body
(``on_response_trailers``; see docs/filters.md): fine for unary calls, mind
``max_response_bytes`` for large streaming responses.

Run as a script, this module is also the example's demo gRPC service and client
(grpcio, which envoyx depends on; no generated code, raw-bytes messages)::

    python examples/filters/rpc_metrics.py serve              # demo.Greeter on 127.0.0.1:50051
    python examples/filters/rpc_metrics.py call --count 20    # through the proxy on :10000
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from envoyx.filters import (
    Counter,
    Filter,
    Gauge,
    Headers,
    Histogram,
    LogEntry,
    RequestContext,
)

__all__ = ["GRPC_CODES", "RpcMetrics", "grpc_code_for_http_status"]

#: gRPC status codes by number.
GRPC_CODES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)

OTHER = ("other", "other")


def grpc_code_for_http_status(status: int) -> str:
    """The gRPC status a client reports for a non-gRPC HTTP answer (gRPC's
    http-grpc-status-mapping); 0 means the client went away before any response."""
    if status == 0:
        return "CANCELLED"
    return {
        400: "INTERNAL",
        401: "UNAUTHENTICATED",
        403: "PERMISSION_DENIED",
        404: "UNIMPLEMENTED",
        429: "UNAVAILABLE",
        502: "UNAVAILABLE",
        503: "UNAVAILABLE",
        504: "UNAVAILABLE",
    }.get(status, "UNKNOWN")


def _code_name(value: str) -> str:
    return GRPC_CODES[int(value)] if value.isdigit() and int(value) < len(GRPC_CODES) else "UNKNOWN"


@dataclass(slots=True)
class _Call:
    key: tuple[str, str]
    code: str | None = None


class RpcMetrics(Filter):
    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config or {})
        self.max_methods = int(self.config.get("max_methods", 1000))
        self._requests: dict[tuple[str, str], Counter] = {}
        self._responses: dict[tuple[str, str, str], Counter] = {}
        self._durations: dict[tuple[str, str], Histogram] = {}
        self._in_flight: dict[str, tuple[Gauge, list[int]]] = {}

    # -- hooks (all run on the one filter executor thread: plain dicts are safe) -------

    def on_request_headers(self, ctx: RequestContext) -> None:
        if not (ctx.request_headers.get("content-type") or "").startswith("application/grpc"):
            return
        key = self._key(ctx.path)
        ctx.state["rpc"] = _Call(key)
        counter = self._requests.get(key)
        if counter is None:
            tags = {"service": key[0], "method": key[1]}
            counter = self._requests[key] = self.metrics.counter("rpc.requests", tags=tags)
        counter.inc()
        self._in_flight_add(key[0], 1)

    def on_response_headers(self, ctx: RequestContext) -> None:
        call = ctx.state.get("rpc")
        if not isinstance(call, _Call) or ctx.response_headers is None:
            return
        status = ctx.response_headers.get("grpc-status")  # a trailers-only response
        if status is not None:
            call.code = _code_name(status)
        elif ctx.status != 200:
            call.code = grpc_code_for_http_status(ctx.status or 0)

    def on_response_trailers(self, ctx: RequestContext, trailers: Headers) -> None:
        call = ctx.state.get("rpc")
        status = trailers.get("grpc-status")
        if isinstance(call, _Call) and status is not None:
            call.code = _code_name(status)

    def on_log(self, ctx: RequestContext, entry: LogEntry) -> None:
        call = ctx.state.get("rpc")
        if not isinstance(call, _Call):
            return
        code = call.code
        if code is None:  # no gRPC status seen: the proxy answered, or the stream broke
            code = (
                "UNKNOWN"
                if entry.response_code == 200
                else grpc_code_for_http_status(entry.response_code)
            )
        service, method = call.key
        counter = self._responses.get((service, method, code))
        if counter is None:
            counter = self._responses[(service, method, code)] = self.metrics.counter(
                "rpc.responses", tags={"service": service, "method": method, "grpc_code": code}
            )
        counter.inc()
        histogram = self._durations.get(call.key)
        if histogram is None:
            histogram = self._durations[call.key] = self.metrics.histogram(
                "rpc.duration_ms", tags={"service": service, "method": method}
            )
        histogram.record(round(entry.duration_ms))
        self._in_flight_add(service, -1)

    # -- helpers -----------------------------------------------------------------------

    def _key(self, path: str) -> tuple[str, str]:
        """(service, method) of ``/pkg.Service/Method``; "other" past the cap or for a
        path of any other shape."""
        parts = path.split("/")
        if len(parts) != 3 or parts[0] or not parts[1] or not parts[2] or "?" in path:
            return OTHER
        key = (parts[1], parts[2])
        if key not in self._requests and len(self._requests) >= self.max_methods:
            return OTHER
        return key

    def _in_flight_add(self, service: str, delta: int) -> None:
        entry = self._in_flight.get(service)
        if entry is None:
            gauge = self.metrics.gauge("rpc.in_flight", tags={"service": service})
            entry = self._in_flight[service] = (gauge, [0])
        gauge, count = entry
        count[0] += delta
        gauge.set(count[0])


# -- the demo service and client (python rpc_metrics.py serve|call) ---------------------

DEMO_SERVICE = "demo.Greeter"


def serve(address: str) -> None:
    """``demo.Greeter``: ``SayHello`` answers ``hello <request>``; ``Fail`` fails with
    NOT_FOUND; any other method is UNIMPLEMENTED."""
    from concurrent import futures

    import grpc  # type: ignore[import-untyped]

    def say_hello(request: bytes, context: Any) -> bytes:
        time.sleep(0.005)
        return b"hello " + request

    def fail(request: bytes, context: Any) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, "no such greeting")
        raise AssertionError("unreachable")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handlers = {
        "SayHello": grpc.unary_unary_rpc_method_handler(say_hello),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(DEMO_SERVICE, handlers),))
    server.add_insecure_port(address)
    server.start()
    print(f"{DEMO_SERVICE} serving on {address}", flush=True)
    server.wait_for_termination()


def call(target: str, count: int) -> None:
    """``count`` calls of each demo method through ``target`` (the proxy)."""
    import grpc

    with grpc.insecure_channel(target) as channel:
        for method in ("SayHello", "Fail", "Nope"):
            stub = channel.unary_unary(f"/{DEMO_SERVICE}/{method}")
            for i in range(count):
                try:
                    stub(f"world-{i}".encode(), timeout=5)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
            print(f"{method}: {count} calls, last {code}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the demo gRPC service")
    p_serve.add_argument("--address", default="127.0.0.1:50051")
    p_call = sub.add_parser("call", help="call the demo service through the proxy")
    p_call.add_argument("--target", default="127.0.0.1:10000")
    p_call.add_argument("--count", type=int, default=10)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.address)
    else:
        call(args.target, args.count)


if __name__ == "__main__":
    main()
