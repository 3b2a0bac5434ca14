"""envoyx's exception hierarchy, rooted at :class:`EnvoyxError`.

The native core raises these classes (mapped in one place, rust/envoyx-py/src/errors.rs),
so callers never see a private ``_core`` exception type.
"""

from __future__ import annotations

__all__ = ["BindError", "ConfigError", "EnvoyxError", "XdsError"]


class EnvoyxError(Exception):
    """Root of every error envoyx raises."""


class ConfigError(EnvoyxError, ValueError):
    """A configuration document is invalid or uses a field envoyx does not implement.

    ``errors`` holds every problem found in the document, each starting with the
    field path it concerns (``static_resources.clusters[0].type: ...``).
    """

    def __init__(self, errors: list[str] | str) -> None:
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


class BindError(EnvoyxError, OSError):
    """A listener or the admin endpoint could not bind its address."""


class XdsError(EnvoyxError):
    """The xDS client could not subscribe or apply resources."""
