"""envoyx: an Envoy-compatible proxy with a Rust data plane, embeddable in Python.

``envoyx.Server(config)`` runs a proxy configured with an Envoy v3 bootstrap (a path,
YAML/JSON text, a dict or a Bootstrap message); ``envoyx -c bootstrap.yaml`` does the same
from the command line with Envoy's flags.
"""

from importlib.metadata import PackageNotFoundError, version

from envoyx.config import load_bootstrap
from envoyx.errors import BindError, ConfigError, EnvoyxError, XdsError
from envoyx.server import Server

try:
    __version__: str = version("envoyx")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "BindError",
    "ConfigError",
    "EnvoyxError",
    "Server",
    "XdsError",
    "__version__",
    "load_bootstrap",
]
