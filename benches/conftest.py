"""pytest configuration of the micro-benchmarks (`pytest benches --benchmark-enable`).

The benchmark modules are named bench_*.py so that plain `pytest` (testpaths = tests)
never picks them up; this conftest makes `pytest benches` collect them. It also gives
the benchmarks the bootstrap that benches/harness.py serves, and prints the route-match
figures (ns per match, measured inside the core) after the run.
"""

from __future__ import annotations

from pathlib import Path
from string import Template

import pytest

CONFIGS = Path(__file__).resolve().parent / "configs"
ROUTE_MATCH_NS = pytest.StashKey[dict[str, float]]()


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    # A bench_*.py named on the command line is collected by pytest itself already.
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.stash[ROUTE_MATCH_NS] = {}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    figures = terminalreporter.config.stash.get(ROUTE_MATCH_NS, {})
    if not figures:
        return
    terminalreporter.section("route match (ns per match, timed inside the core)")
    width = max(len(name) for name in figures)
    for name, ns in figures.items():
        terminalreporter.write_line(f"{name.ljust(width)}  {ns:10.1f} ns")


@pytest.fixture
def record_route_match(request: pytest.FixtureRequest) -> dict[str, float]:
    """Where a route-match benchmark puts its ns-per-match figure for the summary."""
    return request.config.stash[ROUTE_MATCH_NS]


@pytest.fixture(scope="session")
def harness_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """benches/configs/bootstrap.yaml (the harness's config) with fixed ports, as a file."""
    text = Template((CONFIGS / "bootstrap.yaml").read_text()).substitute(
        listen_port=10000, admin_port=9901, upstream_port=8080
    )
    path = tmp_path_factory.mktemp("bootstrap") / "bootstrap.yaml"
    path.write_text(text)
    return path
