"""The Python handle of one envoyx data plane.

A thin layer over the native ``_core.Server``: it loads and validates the bootstrap in
Python (see :mod:`envoyx.config`), hands its canonical proto-JSON to the core, and forwards
the lifecycle calls. Every blocking call releases the GIL inside the core.

When the bootstrap has ``dynamic_resources``, the xDS client (:mod:`envoyx.xds`) runs
next to the core from :meth:`Server.start` to :meth:`Server.stop`; :meth:`Server.update`
applies resources from Python through the same path.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
from collections.abc import Generator, Iterable, Mapping
from types import TracebackType
from typing import Any

from google.protobuf.message import Message

from envoyx import _core
from envoyx.config import Bootstrap, BootstrapSource, bootstrap_to_json, load_bootstrap
from envoyx.errors import ConfigError
from envoyx.filters import Filter, build_chain
from envoyx.xds.applier import Applier
from envoyx.xds.client import XdsClient
from envoyx.xds.local import LocalUpdate, apply_update
from envoyx.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET
from envoyx.xds.settings import XdsSettings, parse_dynamic_resources

__all__ = ["LOG_LEVELS", "Server", "Started"]

#: Envoy's ``--log-level`` names; ``warn`` is an alias of ``warning``.
LOG_LEVELS = ("trace", "debug", "info", "warning", "warn", "error", "critical", "off")


class Started:
    """What :meth:`Server.start` returns: already done in a plain program; inside a
    running asyncio loop, the start running in a thread, awaitable."""

    __slots__ = ("_future",)

    def __init__(self, future: asyncio.Future[None] | None) -> None:
        self._future = future

    def __await__(self) -> Generator[Any, None, None]:
        if self._future is not None:
            yield from self._future.__await__()


#: A resource given to :meth:`Server.update`: a dict in Envoy's v3 spelling or a message.
Resource = Mapping[str, Any] | Message


class Server:
    """One envoyx proxy, configured with an Envoy v3 bootstrap.

    ``config`` is a path, YAML/JSON text, a dict or an ``envoy.config.bootstrap.v3.Bootstrap``
    message. It is validated against Envoy's schema, then against what envoyx implements;
    every problem is reported together in :class:`~envoyx.ConfigError`.

    ``concurrency`` is the number of worker threads (Envoy's ``--concurrency``; ``None``
    means one per CPU). ``drain_time_s`` bounds how long :meth:`drain` lets connections
    finish. ``service_node``, ``service_cluster`` and ``service_zone`` override the
    bootstrap's node identity like Envoy's flags of the same names.
    ``file_flush_interval_msec`` and ``file_flush_min_size_kb`` are Envoy's flags of
    those names: access-log lines are buffered and written every interval, sooner once
    a buffer holds more than the minimum size, and all of them by :meth:`stop`.

    Use as a context manager to start on entry and stop on exit::

        with envoyx.Server("front-proxy.yaml", concurrency=2) as server:
            host, port = server.listener_addresses()["listener_0"]
    """

    def __init__(
        self,
        config: BootstrapSource,
        *,
        concurrency: int | None = None,
        drain_time_s: float = 600,
        log_level: str = "info",
        service_node: str | None = None,
        service_cluster: str | None = None,
        service_zone: str | None = None,
        filters: Mapping[str, Filter] | None = None,
        file_flush_interval_msec: int = 10000,
        file_flush_min_size_kb: int = 64,
    ) -> None:
        if concurrency is None:
            concurrency = os.cpu_count() or 1
        if concurrency < 0:
            raise ValueError(f"concurrency must be at least 0, got {concurrency}")
        if drain_time_s < 0:
            raise ValueError(f"drain_time_s must be at least 0, got {drain_time_s}")
        if file_flush_interval_msec < 0 or file_flush_min_size_kb < 0:
            raise ValueError(
                "file_flush_interval_msec and file_flush_min_size_kb must be at least 0, "
                f"got {file_flush_interval_msec} and {file_flush_min_size_kb}"
            )
        level = log_level.lower()
        if level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
        self._bootstrap = load_bootstrap(
            config,
            service_node=service_node,
            service_cluster=service_cluster,
            service_zone=service_zone,
        )
        self._xds_settings: XdsSettings | None = parse_dynamic_resources(self._bootstrap)
        objects = dict(filters or {})
        for key, instance in objects.items():
            if not isinstance(instance, Filter):
                raise TypeError(f"filters[{key!r}] must be a envoyx.filters.Filter: {instance!r}")
        self._core = _core.Server(
            bootstrap_to_json(self._bootstrap),
            # Envoy runs one worker when asked for none.
            concurrency=max(1, concurrency),
            drain_time_s=float(drain_time_s),
            log_level="warning" if level == "warn" else level,
            filter_factory=functools.partial(build_chain, objects=objects),
            file_flush_interval_msec=file_flush_interval_msec,
            file_flush_min_size_kb=file_flush_min_size_kb,
        )
        self._applier = Applier(self._core, self._bootstrap, self._xds_settings)
        self._xds: XdsClient | None = None  # while started

    @property
    def bootstrap(self) -> Bootstrap:
        """The validated bootstrap this server runs (CLI overrides applied)."""
        return self._bootstrap

    def start(self) -> Started:
        """Bind every listener and the admin endpoint and start the workers.

        In a plain program this returns once everything is bound (the result can be
        ignored). Called inside a running asyncio loop, it does the same work in a
        thread and returns an awaitable: ``await server.start()`` does not block the loop.

        Returns once everything is bound; raises :class:`~envoyx.BindError` otherwise.
        With ``dynamic_resources``, then starts the xDS client and returns once the
        initial fetch is done as Envoy's initialization does it: clusters (CDS and the
        endpoints of EDS clusters), then listeners (LDS and the route configurations
        they name), each answered or past its ``initial_fetch_timeout``.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._start()
            return Started(None)
        return Started(loop.run_in_executor(None, self._start))

    def _start(self) -> None:
        if self._xds_settings is None or self._xds is not None:
            self._core.start()
            return
        # Not LIVE (admin /ready answers 503) until the initial fetch is over.
        self._core.start(live=False)
        client = XdsClient(self._xds_settings, self._applier)
        self._xds = client
        try:
            client.start()
            # In slices: a signal delivered to another thread would not interrupt an
            # unbounded wait, and the CLI's handler must get to run.
            while not client.wait_initialized(0.2) and not client.stopping:
                pass
        except BaseException:
            client.stop()
            raise
        self._core.mark_live()

    def stop(self) -> None:
        """Stop the xDS client, then stop accepting, close every connection and join
        the workers. Idempotent."""
        client, self._xds = self._xds, None
        if client is not None:
            client.stop()
        self._core.stop()

    def xds_status(self) -> dict[str, dict[str, Any]]:
        """The state of each xDS subscription, by type URL
        (``type.googleapis.com/envoy.config.cluster.v3.Cluster``, ...): ``version`` (the
        ``version_info`` last accepted), ``nonce`` (of the latest response),
        ``last_error`` (the ``error_detail`` of the latest NACK, None once an update is
        accepted) and ``resources`` (the names held). Empty without a running xDS client.
        """
        client = self._xds
        if client is None:
            return {}
        return client.status()

    def update(
        self,
        *,
        listeners: Iterable[Resource] = (),
        clusters: Iterable[Resource] = (),
        routes: Iterable[Resource] = (),
        endpoints: Iterable[Resource] = (),
        secrets: Iterable[Resource] = (),
        remove_listeners: Iterable[str] = (),
        remove_clusters: Iterable[str] = (),
        remove_routes: Iterable[str] = (),
        remove_endpoints: Iterable[str] = (),
        remove_secrets: Iterable[str] = (),
        version_info: str | None = None,
    ) -> None:
        """Add, replace or remove dynamic resources without a management server.

        ``listeners``, ``clusters``, ``routes`` (RouteConfiguration), ``endpoints``
        (ClusterLoadAssignment) and ``secrets`` (SDS Secrets: TLS certificates and
        validation contexts named by TLS contexts with an ``sds_config``) are dicts in
        Envoy's v3 spelling or messages, named by their own ``name`` (``cluster_name``);
        the ``remove_*`` arguments name resources to remove. They are applied as an xDS
        update would be (listeners and clusters warm until their routes, endpoints and
        secrets are there), make before break: secrets, clusters, endpoints, listeners,
        routes, then removed clusters and endpoints. A new secret is used by new TLS
        handshakes; open connections keep theirs.
        ``version_info`` is what ``/config_dump`` shows for them (default
        ``update-<n>``).

        Raises :class:`~envoyx.ConfigError`: with every schema error (field paths such
        as ``clusters[0].connect_timeout``) before anything is applied; or, once the
        other resources are applied, listing those the proxy rejected.
        """
        request = LocalUpdate(
            add={
                SECRET: list(secrets),
                CLUSTER: list(clusters),
                ENDPOINT: list(endpoints),
                LISTENER: list(listeners),
                ROUTE: list(routes),
            },
            remove={
                SECRET: list(remove_secrets),
                CLUSTER: list(remove_clusters),
                ENDPOINT: list(remove_endpoints),
                LISTENER: list(remove_listeners),
                ROUTE: list(remove_routes),
            },
            version_info=version_info,
        )
        rejected = apply_update(self._applier, request)
        client = self._xds
        if client is not None:
            client.refresh()
        if rejected:
            raise ConfigError(rejected)

    def drain(self) -> None:
        """Stop accepting new connections and let in-flight requests finish."""
        self._core.drain()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or ``timeout`` seconds pass); True if it stopped."""
        return self._core.wait(timeout)

    @property
    def running(self) -> bool:
        """Whether the server is started and not yet stopped."""
        return self._core.running

    def stats(self) -> dict[str, int]:
        """Every counter and gauge by Envoy's stat name (``cluster.<name>.upstream_rq_total``)."""
        return self._core.stats()

    def config_dump(self) -> dict[str, Any]:
        """The admin ``/config_dump`` document."""
        document: dict[str, Any] = json.loads(self._core.config_dump())
        return document

    def listener_addresses(self) -> dict[str, tuple[str, int]]:
        """The bound ``(host, port)`` of each listener by name (port 0 resolved)."""
        return self._core.listener_addresses()

    def admin_address(self) -> tuple[str, int] | None:
        """The bound admin ``(host, port)``, or None when the bootstrap has no admin."""
        return self._core.admin_address()

    def __enter__(self) -> Server:
        if not self.running:
            self._start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Server:
        if not self.running:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # stop() joins the workers: off the loop, so that in-flight requests through
        # Python filters (which may await on this loop) can finish.
        await asyncio.get_running_loop().run_in_executor(None, self.stop)

    def __repr__(self) -> str:
        return f"<envoyx.Server {'running' if self.running else 'stopped'}>"
