"""Micro-benchmarks of configuration loading.

The path every bootstrap takes: YAML file → `envoyx.config.load_bootstrap` (parsed and
validated against Envoy's schema with xds-protos) → `bootstrap_to_json` (canonical
proto-JSON) → `envoyx._core.validate` (mapped onto the core's typed model).
The bootstrap is the one benches/harness.py serves.
"""

from __future__ import annotations

from pathlib import Path

from pytest_benchmark.fixture import BenchmarkFixture

from envoyx import _core as core
from envoyx import config


def test_load_bootstrap(benchmark: BenchmarkFixture, harness_bootstrap: Path) -> None:
    """YAML file → validated Bootstrap message (Python, xds-protos)."""
    message = benchmark(config.load_bootstrap, str(harness_bootstrap))
    assert message.static_resources.clusters[0].name == "nginx"


def test_bootstrap_to_json(benchmark: BenchmarkFixture, harness_bootstrap: Path) -> None:
    """Bootstrap message → canonical proto-JSON handed to the core."""
    message = config.load_bootstrap(str(harness_bootstrap))
    text = benchmark(config.bootstrap_to_json, message)
    assert '"nginx"' in text


def test_core_validate(benchmark: BenchmarkFixture, harness_bootstrap: Path) -> None:
    """Proto-JSON → the core's typed model (Rust), without serving."""
    text = config.bootstrap_to_json(config.load_bootstrap(str(harness_bootstrap)))
    errors = benchmark(core.validate, text)
    assert errors == []


def test_load_and_validate(benchmark: BenchmarkFixture, harness_bootstrap: Path) -> None:
    """The whole path a bootstrap file takes before the server starts."""

    def load_and_validate() -> list[str]:
        message = config.load_bootstrap(str(harness_bootstrap))
        return core.validate(config.bootstrap_to_json(message))

    assert benchmark(load_and_validate) == []
