"""Build Istio's control plane (istiod's ``pilot-discovery``) for the tests.

The source comes from the Go module proxy (``istio.io/istio``; only master snapshots are
served, so the version is a pseudo-version). ``go mod download -json`` puts the module in
the module cache (read-only) and says where; it is copied to a writable directory under
``~/.cache/envoyx/istio/`` (never inside the clone), the patches in ``tests/istio/*.patch``
are applied in name order, and ``go build ./pilot/cmd/pilot-discovery`` runs there. The
binary is cached under a key made of the version and the patches' contents, so a CI run
rebuilds only when one of them changes; Go's own build cache makes a rebuild after a patch
change cheap.

Why patched: with ``--registries=`` (no Kubernetes) the stock build dereferences the nil
multicluster controller in ``serviceentry.NewController``; see
``tests/istio/serviceentry-without-kubernetes.patch``.

Run as a script (stdlib only, so it works before the test requirements are installed)::

    python3 tests/support/istio_build.py        # builds if needed, prints the binary path

``ISTIO_BUILD_JOBS`` (default: Go's, one per core) caps ``go build -p``; a build on a
busy shared machine can pass ``1``. Needs Go 1.26 (the module's ``go`` line).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ISTIO_MODULE = "istio.io/istio"
# The newest master snapshot the Go module proxy served that builds with Go 1.26.
ISTIO_VERSION = "v0.0.0-20260827124520-eed52ebb66ad"
PATCH_DIR = Path(__file__).resolve().parent.parent / "istio"
CACHE_DIR = Path(os.environ.get("ENVOYX_CACHE", Path.home() / ".cache" / "envoyx")) / "istio"


class IstioBuildError(RuntimeError):
    """pilot-discovery could not be fetched, patched or built."""


def go_binary() -> str:
    found = shutil.which("go")
    if found:
        return found
    if Path("/usr/local/go/bin/go").exists():
        return "/usr/local/go/bin/go"
    raise IstioBuildError("the go toolchain is not installed (needed to build pilot-discovery)")


def patches() -> list[Path]:
    return sorted(PATCH_DIR.glob("*.patch"))


def build_key() -> str:
    """The version and every patch's name and content: what the binary is made of."""
    h = hashlib.sha256(ISTIO_VERSION.encode())
    for p in patches():
        h.update(b"\0" + p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def binary_path() -> Path:
    return CACHE_DIR / f"pilot-discovery-{build_key()}"


def _run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise IstioBuildError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    flags = env.get("GOFLAGS", "").split()
    # -mod=mod: resolve from the module's own go.mod/go.sum (downloading on a fresh
    # machine); -buildvcs=false: the copy is not a repository.
    flags += ["-mod=mod", "-buildvcs=false"]
    jobs = env.get("ISTIO_BUILD_JOBS")
    if jobs:
        flags.append(f"-p={int(jobs)}")
    env["GOFLAGS"] = " ".join(flags)
    env.setdefault("CGO_ENABLED", "0")
    return env


def ensure_pilot_discovery(log: bool = False) -> Path:
    """The cached binary for the current version and patches, built first if missing."""
    target = binary_path()
    if target.exists():
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    # One build at a time (two test sessions, or CI and a developer, on one machine).
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        return _build(target, log)


def _build(target: Path, log: bool) -> Path:
    go = go_binary()
    env = _go_env()
    started = time.monotonic()

    def say(msg: str) -> None:
        if log:
            print(
                f"[istio build {time.monotonic() - started:6.0f}s] {msg}",
                file=sys.stderr,
                flush=True,
            )

    say(f"go mod download {ISTIO_MODULE}@{ISTIO_VERSION}")
    info = json.loads(
        _run(
            [go, "mod", "download", "-json", f"{ISTIO_MODULE}@{ISTIO_VERSION}"],
            cwd=CACHE_DIR,
            env=env,
        )
    )
    if info.get("Error") or not info.get("Dir"):
        raise IstioBuildError(
            f"go mod download {ISTIO_MODULE}@{ISTIO_VERSION}: {info.get('Error')}"
        )
    src = CACHE_DIR / f"src-{build_key()}"
    if src.exists():
        shutil.rmtree(src)
    say(f"copy {info['Dir']} -> {src}")
    shutil.copytree(info["Dir"], src, copy_function=shutil.copy)
    for d, _dirs, files in os.walk(src):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    for p in patches():
        say(f"patch -p1 < {p.name}")
        _run(["patch", "-p1", "--forward", "--no-backup-if-mismatch", "-i", str(p)], cwd=src)
    say(f"go build ./pilot/cmd/pilot-discovery (GOFLAGS={env['GOFLAGS']})")
    tmp = target.with_suffix(".tmp")
    _run([go, "build", "-o", str(tmp), "./pilot/cmd/pilot-discovery"], cwd=src, env=env)
    tmp.rename(target)
    # The patched source is only needed for the build; the Go build cache keeps the
    # compiled packages for the next one.
    shutil.rmtree(src, ignore_errors=True)
    say(f"built {target}")
    return target


def main() -> int:
    try:
        print(ensure_pilot_discovery(log=True))
    except IstioBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
