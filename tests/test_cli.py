"""The ``envoyx`` command as a user runs it (``python -m envoyx``), and the Server API under it."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import envoyx
from support.wait import until

RUN_TIMEOUT_S = 60.0
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
HCM = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)


def bootstrap(listener_port: int = 0) -> dict[str, Any]:
    """A listener and an admin on 127.0.0.1 (port 0 unless told), one static cluster."""
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "listener_0",
                    "address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": listener_port}
                    },
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": HCM,
                                        "stat_prefix": "ingress_http",
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {"@type": ROUTER},
                                            }
                                        ],
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "route": {"cluster": "backend"},
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "backend",
                    "connect_timeout": "1s",
                    "type": "STATIC",
                    "load_assignment": {
                        "cluster_name": "backend",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": 9,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }


def write(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def envoyx_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "envoyx", *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port with a listening socket on it (no SO_REUSEPORT), so binding it fails."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# -- --mode validate -------------------------------------------------------------------


def test_validate_prints_envoys_ok_line(tmp_path: Path) -> None:
    path = write(tmp_path / "good.yaml", bootstrap())
    result = envoyx_cli("--mode", "validate", "-c", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"configuration '{path}' OK\n"


def test_validate_binds_nothing(tmp_path: Path, taken_port: int) -> None:
    path = write(tmp_path / "good.yaml", bootstrap(listener_port=taken_port))
    result = envoyx_cli("--mode", "validate", "-c", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_validate_json_file(tmp_path: Path) -> None:
    path = tmp_path / "good.json"
    path.write_text(json.dumps(bootstrap()))
    result = envoyx_cli("--mode", "validate", "--config-path", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"configuration '{path}' OK\n"


def test_validate_reports_every_error_with_its_path(tmp_path: Path) -> None:
    document = bootstrap()
    document["static_resources"]["clusters"][0]["type"] = "STATIK"
    document["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"
    ]["virtual_hosts"][0]["domainz"] = ["x"]
    path = write(tmp_path / "bad.yaml", document)
    result = envoyx_cli("--mode", "validate", "-c", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == f"error initializing configuration '{path}':"
    assert any(
        line.strip().startswith('static_resources.clusters[0].type: invalid value string "STATIK"')
        for line in lines
    )
    assert any(
        line.strip().startswith(
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"
            '.route_config.virtual_hosts[0].domainz: unknown field "domainz"'
        )
        for line in lines
    )
    assert "Traceback" not in result.stderr


def test_validate_reports_fields_envoyx_does_not_implement(tmp_path: Path) -> None:
    document = bootstrap()
    document["static_resources"]["clusters"][0]["lb_subset_config"] = {
        "subset_selectors": [{"keys": ["version"]}]
    }
    path = write(tmp_path / "unsupported.yaml", document)
    result = envoyx_cli("--mode", "validate", "-c", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert "static_resources.clusters[0].lb_subset_config" in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_invalid_yaml_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("admin:\n  address: {socket_address: {port_value: 0}\n")
    result = envoyx_cli("--mode", "validate", "-c", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert f"{path}:3:1: invalid YAML" in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_missing_file(tmp_path: Path) -> None:
    result = envoyx_cli("--mode", "validate", "-c", "nope.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert "nope.yaml: cannot read configuration file" in result.stderr


def test_config_yaml_is_merged_over_the_file(tmp_path: Path) -> None:
    document = bootstrap()
    del document["static_resources"]["clusters"]  # the route's cluster comes from the override
    path = write(tmp_path / "partial.yaml", document)
    override = yaml.safe_dump(
        {"static_resources": {"clusters": bootstrap()["static_resources"]["clusters"]}}
    )
    result = envoyx_cli(
        "--mode", "validate", "-c", str(path), "--config-yaml", override, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr

    result = envoyx_cli(
        "--mode", "validate", "-c", str(path), "--config-yaml", "node: {idd: x}", cwd=tmp_path
    )
    assert result.returncode == 1
    assert 'node.idd: unknown field "idd"' in result.stderr
    assert "(in --config-yaml)" in result.stderr


def test_config_yaml_alone(tmp_path: Path) -> None:
    result = envoyx_cli(
        "--mode", "validate", "--config-yaml", yaml.safe_dump(bootstrap()), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "configuration '' OK\n"


def test_no_configuration_is_an_error(tmp_path: Path) -> None:
    result = envoyx_cli("--mode", "validate", cwd=tmp_path)
    assert result.returncode == 1
    assert "at least one of --config-path or --config-yaml" in result.stderr


def test_flags_without_effect_are_accepted(tmp_path: Path) -> None:
    path = write(tmp_path / "good.yaml", bootstrap())
    result = envoyx_cli(
        "--mode", "validate", "-c", str(path),
        "--base-id", "7", "--parent-shutdown-time-s", "30", "--log-path", "envoy.log",
        "--component-log-level", "upstream:debug,connection:trace", "--disable-hot-restart",
        "--restart-epoch", "0", "--drain-strategy", "immediate", "--service-zone", "z1",
        "--service-node", "n1", "--service-cluster", "c1", "--drain-time-s", "5",
        "--concurrency", "2", "-l", "warn",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_bad_flag_values_are_usage_errors(tmp_path: Path) -> None:
    result = envoyx_cli("--mode", "validate", "-c", "x.yaml", "-l", "loud", cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid choice: 'loud'" in result.stderr
    result = envoyx_cli("--mode", "check", "-c", "x.yaml", cwd=tmp_path)
    assert result.returncode == 2


def test_version(tmp_path: Path) -> None:
    result = envoyx_cli("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"envoyx version: {envoyx.__version__}"


# -- serving ---------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_until_signal_then_exit_zero(tmp_path: Path, sig: signal.Signals) -> None:
    path = write(tmp_path / "serve.yaml", bootstrap())
    admin_file = tmp_path / "admin.txt"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "envoyx", "-c", str(path), "--concurrency", "1",
            "--drain-time-s", "1", "--admin-address-path", str(admin_file),
        ],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:

        def started() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"envoyx exited with {proc.returncode}")
            return admin_file.exists() and bool(admin_file.read_text())

        until(started, timeout=RUN_TIMEOUT_S, what="envoyx to write its admin address")
        host, _, port = admin_file.read_text().rpartition(":")
        with socket.create_connection((host, int(port)), timeout=5):
            pass  # the admin endpoint is bound
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr


def test_serve_bind_error_is_a_clear_message(tmp_path: Path, taken_port: int) -> None:
    path = write(tmp_path / "taken.yaml", bootstrap(listener_port=taken_port))
    result = envoyx_cli("-c", str(path), "--concurrency", "1", cwd=tmp_path)
    assert result.returncode == 1
    assert "cannot bind" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_invalid_configuration_exits_one(tmp_path: Path) -> None:
    document = bootstrap()
    document["static_resources"]["clusters"][0]["connect_timeout"] = "soon"
    path = write(tmp_path / "bad.yaml", document)
    result = envoyx_cli("-c", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert "static_resources.clusters[0].connect_timeout: expected a duration" in result.stderr
    assert "Traceback" not in result.stderr


def test_init_only_starts_and_exits(tmp_path: Path) -> None:
    path = write(tmp_path / "good.yaml", bootstrap())
    result = envoyx_cli("--mode", "init_only", "-c", str(path), "--concurrency", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


# -- the Python API the command is built on --------------------------------------------


def test_server_lifecycle_as_context_manager() -> None:
    server = envoyx.Server(bootstrap(), concurrency=1, drain_time_s=1)
    assert not server.running
    with server as running:
        assert running is server and server.running
        host, port = server.listener_addresses()["listener_0"]
        assert host == "127.0.0.1" and port > 0
        admin = server.admin_address()
        assert admin is not None and admin[1] > 0
        assert all(isinstance(value, int) for value in server.stats().values())
        assert isinstance(server.config_dump(), dict)
    assert not server.running
    assert server.wait(timeout=10)


def test_server_applies_node_overrides() -> None:
    server = envoyx.Server(bootstrap(), concurrency=1, service_node="n1", service_cluster="c1")
    assert (server.bootstrap.node.id, server.bootstrap.node.cluster) == ("n1", "c1")


def test_server_config_errors() -> None:
    document = bootstrap()
    document["static_resources"]["clusters"][0]["lb_subset_config"] = {
        "subset_selectors": [{"keys": ["version"]}]
    }
    document["static_resources"]["clusters"][0]["type"] = "STATIK"
    with pytest.raises(envoyx.ConfigError) as info:
        envoyx.Server(document)
    # Schema errors come first; the core is asked only about a schema-valid document.
    assert info.value.errors == [
        'static_resources.clusters[0].type: invalid value string "STATIK" for enum '
        "envoy.config.cluster.v3.Cluster.DiscoveryType "
        "(one of: STATIC, STRICT_DNS, LOGICAL_DNS, EDS, ORIGINAL_DST)"
    ]
    del document["static_resources"]["clusters"][0]["type"]
    with pytest.raises(envoyx.ConfigError, match="lb_subset_config"):
        envoyx.Server(document)


def test_server_bind_error_is_an_oserror(taken_port: int) -> None:
    server = envoyx.Server(bootstrap(listener_port=taken_port), concurrency=1)
    with pytest.raises(envoyx.BindError) as info:
        server.start()
    assert isinstance(info.value, OSError)
    server.stop()


def test_server_argument_checks() -> None:
    with pytest.raises(ValueError, match="log_level"):
        envoyx.Server(bootstrap(), log_level="loud")
    with pytest.raises(ValueError, match="concurrency"):
        envoyx.Server(bootstrap(), concurrency=-1)
