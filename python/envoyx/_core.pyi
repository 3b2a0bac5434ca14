"""Type stubs for the native extension built from rust/envoyx-py.

The extension holds no proxy logic: it owns one envoyx-core server and exposes it.
Errors are raised as the classes of ``envoyx.errors`` (never a private ``_core`` class).
"""

from typing import Self, final

__all__ = ["Server", "route_match", "validate", "version"]

def version() -> str:
    """envoyx's version string."""

def validate(bootstrap_json: str) -> list[str]:
    """Map a canonical proto-JSON Bootstrap onto the core's model without serving.

    Returns every error found (each prefixed with its field path); empty when valid.
    """

def route_match(
    bootstrap_json: str, listener: str, authority: str, path: str, iterations: int = 100_000
) -> tuple[float, str | None]:
    """Nanoseconds per route lookup on one listener's compiled table, and the cluster
    matched (``"<direct_response>"`` for a direct response, None for no route)."""

@final
class Server:
    """One envoyx data plane, configured from a canonical proto-JSON Bootstrap.

    Raises ``envoyx.ConfigError`` (with ``.errors``) when the bootstrap cannot be mapped.
    """

    def __new__(
        cls,
        bootstrap_json: str,
        *,
        concurrency: int = 0,
        drain_time_s: float = 600.0,
        log_level: str = "info",
    ) -> Self: ...
    def start(self, *, live: bool = True) -> None:
        """Bind every listener and the admin endpoint, start workers; returns once bound.

        With ``live=False`` the server stays INITIALIZING (admin ``/ready`` answers 503)
        until :meth:`mark_live`, as Envoy does during its xDS initial fetch.
        Raises ``envoyx.BindError`` (an ``OSError``) when an address cannot be bound.
        """
    def mark_live(self) -> None:
        """End initialization: ``/ready`` answers LIVE."""
    def stop(self) -> None:
        """Stop accepting, close connections, join workers. Idempotent."""
    def drain(self) -> None:
        """Stop accepting new connections; in-flight requests finish (drain_time_s)."""
    def wait(self, timeout: float | None = None) -> bool:
        """Block (GIL released) until the server stops; True if it stopped."""
    @property
    def running(self) -> bool: ...
    def stats(self) -> dict[str, int]:
        """Every counter and gauge by Envoy's stat name."""
    def config_dump(self) -> str:
        """The admin /config_dump document as JSON text."""
    def listener_addresses(self) -> dict[str, tuple[str, int]]:
        """Bound address of each listener by name (port 0 resolved)."""
    def admin_address(self) -> tuple[str, int] | None:
        """Bound admin address, or None without an admin block."""
    def apply(
        self,
        type_url: str,
        resources: list[tuple[str, str]],
        removed: list[str],
        version_info: str,
    ) -> list[tuple[str, str]]:
        """Apply xDS resources of one type (Listener, RouteConfiguration, Cluster or
        ClusterLoadAssignment ``type.googleapis.com/...`` URL).

        ``resources`` are (name, canonical proto-JSON of the resource) to add or
        replace; ``removed`` names go away. Valid resources are applied even when
        others are rejected; returns (name, error) for each rejected one. Listeners
        and clusters warm (until their routes / endpoints arrive) before serving.
        """
    def wanted_resources(self, type_url: str) -> list[str]:
        """Names the core needs of a named-subscription type: route configurations
        named by listeners (RDS) and EDS service names of clusters (EDS)."""
    def counter_add(self, name: str, value: int) -> None:
        """Add to a counter shown with Envoy's stats (created on first use)."""
    def gauge_set(self, name: str, value: int) -> None:
        """Set a gauge shown with Envoy's stats (created on first use)."""
