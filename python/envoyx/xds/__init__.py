"""envoyx's xDS client: dynamic listeners, routes, clusters, endpoints and secrets from a
management server over gRPC (ADS or one stream per type; State of the World or Delta).

:class:`~envoyx.Server` starts it when the bootstrap has ``dynamic_resources``; the
pieces are usable alone for tests and tools:

- :mod:`~envoyx.xds.settings`: the bootstrap's ``dynamic_resources`` parsed (and every
  unsupported setting reported with its field path);
- :mod:`~envoyx.xds.applier`: the one path to the core (``core.apply``), shared with
  ``Server.update``;
- :mod:`~envoyx.xds.protocol`: the protocol of one stream, without I/O;
- :mod:`~envoyx.xds.client`: the grpcio streams, reconnection and start-up sequence.
"""

from envoyx.xds.applier import Applier, Core, XdsStats
from envoyx.xds.client import Backoff, XdsClient
from envoyx.xds.local import LocalUpdate, apply_update
from envoyx.xds.protocol import NACK_CODE, StreamProtocol
from envoyx.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, TYPES
from envoyx.xds.settings import XdsSettings, build_node, parse_dynamic_resources

__all__ = [
    "CLUSTER",
    "ENDPOINT",
    "LISTENER",
    "NACK_CODE",
    "ROUTE",
    "SECRET",
    "TYPES",
    "Applier",
    "Backoff",
    "Core",
    "LocalUpdate",
    "StreamProtocol",
    "XdsClient",
    "XdsSettings",
    "XdsStats",
    "apply_update",
    "build_node",
    "parse_dynamic_resources",
]
