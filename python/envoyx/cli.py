"""The ``envoyx`` command (also ``python -m envoyx``), taking Envoy's command-line flags.

``envoyx -c bootstrap.yaml`` serves like ``envoy -c bootstrap.yaml``; ``--mode validate``
checks the configuration without binding anything and prints ``configuration '<path>' OK``.
SIGTERM and SIGINT drain the listeners then stop (a second signal stops at once).
Flags that concern Envoy's process model (hot restart, base id, ...) are accepted so that
existing command lines keep working, and have no effect; ``--help`` says which.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from envoyx import __version__, _core
from envoyx.config import Bootstrap, bootstrap_to_json, load_bootstrap
from envoyx.errors import BindError, ConfigError, EnvoyxError
from envoyx.filters import build_chain
from envoyx.server import LOG_LEVELS, Server
from envoyx.xds.settings import parse_dynamic_resources

__all__ = ["build_parser", "main"]

_log = logging.getLogger("envoyx")

_PYTHON_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": logging.CRITICAL + 10,
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with Envoy's flag names and defaults."""
    parser = argparse.ArgumentParser(
        prog="envoyx",
        allow_abbrev=False,
        description="An Envoy-compatible proxy. Takes Envoy's v3 bootstrap and Envoy's flags.",
        epilog="Flags marked 'no effect' are accepted for compatibility with Envoy command lines.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s version: {__version__}")

    config = parser.add_argument_group("configuration")
    config.add_argument(
        "-c",
        "--config-path",
        default="",
        metavar="PATH",
        help="bootstrap file: .yaml, .yml, .json, .pb_text or .pb",
    )
    config.add_argument(
        "--config-yaml",
        default="",
        metavar="YAML",
        help="inline YAML bootstrap, merged over --config-path (repeated fields appended)",
    )
    config.add_argument(
        "--mode",
        choices=("serve", "validate", "init_only"),
        default="serve",
        help="serve (default); validate: check the configuration and exit without binding; "
        "init_only: start, then exit",
    )
    config.add_argument(
        "--allow-unknown-static-fields",
        "--allow-unknown-fields",
        action="store_true",
        help="log unknown fields of the bootstrap instead of rejecting them",
    )
    config.add_argument(
        "--reject-unknown-dynamic-fields",
        action="store_true",
        help="no effect (xDS resources with unknown fields are always rejected)",
    )
    config.add_argument("--ignore-unknown-dynamic-fields", action="store_true", help="no effect")
    config.add_argument("--disable-extensions", default="", metavar="NAMES", help="no effect")

    node = parser.add_argument_group("node identity (override the bootstrap's node)")
    node.add_argument("--service-node", default="", metavar="ID", help="sets node.id")
    node.add_argument("--service-cluster", default="", metavar="NAME", help="sets node.cluster")
    node.add_argument("--service-zone", default="", metavar="ZONE", help="sets node.locality.zone")

    runtime = parser.add_argument_group("threads and lifecycle")
    runtime.add_argument(
        "--concurrency",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="number of worker threads (default: number of CPUs)",
    )
    runtime.add_argument(
        "--drain-time-s",
        type=_non_negative_int,
        default=600,
        metavar="SECONDS",
        help="how long draining lets connections finish (default 600)",
    )
    runtime.add_argument(
        "--admin-address-path",
        default="",
        metavar="PATH",
        help="write the bound admin address (host:port) to this file once started",
    )
    runtime.add_argument(
        "--drain-strategy", choices=("gradual", "immediate"), default="gradual", help="no effect"
    )
    runtime.add_argument(
        "--parent-shutdown-time-s",
        type=_non_negative_int,
        default=900,
        metavar="SECONDS",
        help="no effect (no hot restart)",
    )
    runtime.add_argument("--cpuset-threads", action="store_true", help="no effect")
    runtime.add_argument(
        "--local-address-ip-version", choices=("v4", "v6"), default="v4", help="no effect"
    )

    logs = parser.add_argument_group("logging")
    logs.add_argument(
        "-l",
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        type=str.lower,
        metavar="LEVEL",
        help=f"one of {', '.join(LOG_LEVELS)} (default info)",
    )
    logs.add_argument(
        "--component-log-level", default="", metavar="COMPONENT:LEVEL,...", help="no effect"
    )
    logs.add_argument(
        "--log-path", default="", metavar="PATH", help="no effect (logs go to stderr)"
    )
    logs.add_argument("--log-format", default="", metavar="FORMAT", help="no effect")
    logs.add_argument("--log-format-escaped", action="store_true", help="no effect")
    logs.add_argument("--enable-fine-grain-logging", action="store_true", help="no effect")
    logs.add_argument(
        "--file-flush-interval-msec",
        type=_non_negative_int,
        default=10000,
        metavar="MS",
        help="how often buffered access-log lines are written (default 10000)",
    )
    logs.add_argument(
        "--file-flush-min-size-kb",
        type=_non_negative_int,
        default=64,
        metavar="KB",
        help="write access-log lines before the interval once a buffer holds more "
        "than this (default 64)",
    )

    hot_restart = parser.add_argument_group("hot restart and process (no effect in envoyx)")
    hot_restart.add_argument("--base-id", type=_non_negative_int, default=0, metavar="N")
    hot_restart.add_argument("--use-dynamic-base-id", action="store_true")
    hot_restart.add_argument("--base-id-path", default="", metavar="PATH")
    hot_restart.add_argument("--restart-epoch", type=_non_negative_int, default=0, metavar="N")
    hot_restart.add_argument("--disable-hot-restart", action="store_true")
    hot_restart.add_argument("--skip-hot-restart-on-no-parent", action="store_true")
    hot_restart.add_argument("--skip-hot-restart-parent-stats", action="store_true")
    hot_restart.add_argument("--socket-path", default="", metavar="PATH")
    hot_restart.add_argument("--socket-mode", default="", metavar="MODE")
    hot_restart.add_argument("--enable-mutex-tracing", action="store_true")
    hot_restart.add_argument("--enable-core-dump", action="store_true")
    hot_restart.add_argument("--stats-tag", action="append", default=[], metavar="NAME:VALUE")
    hot_restart.add_argument(
        "--hot-restart-version", action="store_true", help="print 'disabled' and exit"
    )
    return parser


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:  # Ctrl-C before serving started
        return 130


def _run(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level)
    if args.hot_restart_version:
        print("disabled")  # envoyx has no hot restart
        return 0
    if not args.config_path and not args.config_yaml:
        print(
            "envoyx: error: at least one of --config-path or --config-yaml must be given",
            file=sys.stderr,
        )
        return 1

    # Python filter modules are found from the working directory too, as with
    # `python -m envoyx` (a console script's sys.path starts at its bin directory).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        bootstrap = load_bootstrap(
            args.config_path or None,
            config_yaml=args.config_yaml or None,
            service_node=args.service_node or None,
            service_cluster=args.service_cluster or None,
            service_zone=args.service_zone or None,
            allow_unknown_fields=args.allow_unknown_static_fields,
        )
        if args.mode == "validate":
            return _validate(bootstrap, args.config_path)
        server = Server(
            bootstrap,
            concurrency=args.concurrency,
            drain_time_s=args.drain_time_s,
            log_level=args.log_level,
            file_flush_interval_msec=args.file_flush_interval_msec,
            file_flush_min_size_kb=args.file_flush_min_size_kb,
        )
    except ConfigError as e:
        _print_config_errors(args.config_path, e.errors)
        return 1

    try:
        if args.mode == "init_only":
            server.start()
            server.stop()
            return 0
        return _serve(server, args.admin_address_path)
    except BindError as e:
        print(f"envoyx: error: cannot bind: {e}", file=sys.stderr)
        return 1
    except ConfigError as e:
        _print_config_errors(args.config_path, e.errors)
        return 1
    except EnvoyxError as e:
        print(f"envoyx: error: {e}", file=sys.stderr)
        return 1


class _EnvoyLogFields(logging.Filter):
    """Adds what Envoy's default log format shows: the OS thread id, the level in lower case."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.native_thread_id = threading.get_native_id()
        record.level = record.levelname.lower()
        return True


def _configure_logging(level: str) -> None:
    # Envoy's default format, "[%Y-%m-%d %T.%e][%t][%l][%n] %v", as the core also logs.
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_EnvoyLogFields())
    handler.setFormatter(
        logging.Formatter(
            "[%(asctime)s.%(msecs)03d][%(native_thread_id)d][%(level)s][%(name)s] %(message)s",
            datefmt="%Y-%m-%d %H:%M:%S",
        )
    )
    logging.basicConfig(level=_PYTHON_LEVELS[level], handlers=[handler])


def _validate(bootstrap: Bootstrap, config_path: str) -> int:
    # Python filters are imported and built, as serving would: a missing module fails here.
    errors = _core.validate(
        bootstrap_to_json(bootstrap), functools.partial(build_chain, objects={})
    )
    try:
        # dynamic_resources is the xDS client's to check (the core only carries it).
        parse_dynamic_resources(bootstrap)
    except ConfigError as e:
        errors = [*errors, *e.errors]
    if errors:
        _print_config_errors(config_path, errors)
        return 1
    # Envoy prints exactly this line on success.
    print(f"configuration '{config_path}' OK")
    return 0


def _print_config_errors(config_path: str, errors: Sequence[str]) -> None:
    lines = [f"error initializing configuration '{config_path}':"]
    lines.extend(f"  {error}" for error in errors)
    print("\n".join(lines), file=sys.stderr)


#: How often the main thread wakes to run signal handlers (see _wait_with_signals).
_SIGNAL_POLL_S = 0.2


def _serve(server: Server, admin_address_path: str) -> int:
    stop_requested = threading.Event()
    stopped = threading.Event()
    started = threading.Event()
    caught = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal caught
        caught += 1
        _log.warning("caught %s", signal.Signals(signum).name)
        if caught > 1 or not started.is_set():
            # A second signal does not wait for the drain, and a signal during
            # start-up (an xDS initial fetch may take its timeout) ends it now.
            server.stop()
        stop_requested.set()

    # Installed before start() so that a signal arriving while binding is not lost.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        started.set()
        if admin_address_path:
            _write_admin_address(server, admin_address_path)

        def watch() -> None:
            server.wait()
            stopped.set()
            stop_requested.set()

        threading.Thread(target=watch, name="envoyx-wait", daemon=True).start()
        # A signal may be delivered to any thread (the core's, grpc's), and then
        # nothing interrupts the main thread's wait: wake up regularly so that
        # Python runs the handler.
        _wait_with_signals(stop_requested)
        if not stopped.is_set():
            threading.Thread(
                target=_drain_then_stop, args=(server,), name="envoyx-drain", daemon=True
            ).start()
            _wait_with_signals(stopped)
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_with_signals(event: threading.Event) -> None:
    while not event.wait(_SIGNAL_POLL_S):
        pass


def _drain_then_stop(server: Server) -> None:
    try:
        _log.info("draining listeners")
        server.drain()
    except EnvoyxError as e:
        _log.error("drain failed: %s", e)
    finally:
        _log.info("shutting down")
        server.stop()


def _write_admin_address(server: Server, path: str) -> None:
    address = server.admin_address()
    if address is None:
        return
    host, port = address
    text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        Path(path).write_text(text)
    except OSError as e:
        raise EnvoyxError(f"cannot write the admin address to {path}: {e.strerror or e}") from e
