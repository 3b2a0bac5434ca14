"""The xDS resource types envoyx subscribes to, and what the client needs to know of each.

Adding a type (SDS's ``Secret`` next) is adding a :class:`ResourceType` to :data:`TYPES`
(and, when its resources name other resources, a case in :func:`dependencies`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from google.protobuf.message import DecodeError, Message

__all__ = [
    "CLUSTER",
    "ENDPOINT",
    "LISTENER",
    "ORDER",
    "RESOURCE_WRAPPER",
    "ROUTE",
    "TYPES",
    "TYPE_PREFIX",
    "Dependency",
    "ResourceType",
    "dependencies",
    "resource_type",
]

TYPE_PREFIX = "type.googleapis.com/"
LISTENER = TYPE_PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = TYPE_PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER = TYPE_PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = TYPE_PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
#: SotW responses may wrap each resource in a ``Resource`` (client feature
#: ``xds.config.resource-in-sotw``).
RESOURCE_WRAPPER = TYPE_PREFIX + "envoy.service.discovery.v3.Resource"
_HCM = (
    TYPE_PREFIX
    + "envoy.extensions.filters.network.http_connection_manager.v3."
    + ("HttpConnectionManager")
)


@dataclass(frozen=True)
class ResourceType:
    """One xDS resource type.

    ``wildcard`` types (LDS, CDS) are subscribed to as a whole and, in State of the
    World, a resource absent from a response is removed; the others (RDS, EDS) are
    subscribed to by name, as the core needs them, and never removed by absence.
    """

    type_url: str
    short: str  # "LDS"
    noun: str  # "listener", as in Envoy's "Error adding/updating listener(s) ..."
    message: type[Message]
    name_field: str
    wildcard: bool
    service: str  # the non-aggregated discovery service
    sotw_method: str
    delta_method: str

    @property
    def full_name(self) -> str:
        return self.type_url.removeprefix(TYPE_PREFIX)

    def name_of(self, msg: Message) -> str:
        name: str = getattr(msg, self.name_field)
        return name

    def decode(self, value: bytes) -> Message:
        """Parse a serialized resource; raises ``ValueError`` when it does not decode."""
        msg = self.message()
        try:
            msg.ParseFromString(value)
        except DecodeError as e:
            raise ValueError(f"cannot decode a {self.full_name}: {e}") from e
        return msg

    def method_path(self, delta: bool) -> str:
        return f"/{self.service}/{self.delta_method if delta else self.sotw_method}"


TYPES: dict[str, ResourceType] = {
    t.type_url: t
    for t in (
        ResourceType(
            CLUSTER,
            "CDS",
            "cluster",
            cluster_pb2.Cluster,
            "name",
            True,
            "envoy.service.cluster.v3.ClusterDiscoveryService",
            "StreamClusters",
            "DeltaClusters",
        ),
        ResourceType(
            ENDPOINT,
            "EDS",
            "cluster load assignment",
            endpoint_pb2.ClusterLoadAssignment,
            "cluster_name",
            False,
            "envoy.service.endpoint.v3.EndpointDiscoveryService",
            "StreamEndpoints",
            "DeltaEndpoints",
        ),
        ResourceType(
            LISTENER,
            "LDS",
            "listener",
            listener_pb2.Listener,
            "name",
            True,
            "envoy.service.listener.v3.ListenerDiscoveryService",
            "StreamListeners",
            "DeltaListeners",
        ),
        ResourceType(
            ROUTE,
            "RDS",
            "route configuration",
            route_pb2.RouteConfiguration,
            "name",
            False,
            "envoy.service.route.v3.RouteDiscoveryService",
            "StreamRoutes",
            "DeltaRoutes",
        ),
    )
}

#: Make-before-break order: the order of initial requests on a stream, and of the
#: groups of :meth:`envoyx.Server.update`.
ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)

ADS_METHODS = {
    False: "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
    True: "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources",
}


def resource_type(type_url: str) -> ResourceType:
    try:
        return TYPES[type_url]
    except KeyError:
        raise ValueError(f"envoyx does not subscribe to {type_url}") from None


@dataclass(frozen=True)
class Dependency:
    """A resource named by another: the route configuration of an HCM's ``rds``, the
    ClusterLoadAssignment of an EDS cluster.

    ``source`` is the ConfigSource to fetch it from (``path`` its field path inside the
    parent); ``stat_prefix`` is where Envoy counts that subscription's updates
    (``http.<stat_prefix>.rds.<name>.``, ``cluster.<cluster>.``).
    """

    type_url: str
    name: str
    source: config_source_pb2.ConfigSource
    path: str
    stat_prefix: str


def _listener_dependencies(msg: Message) -> list[Dependency]:
    assert isinstance(msg, listener_pb2.Listener)
    out: list[Dependency] = []
    chains: list[tuple[str, listener_pb2.FilterChain]] = [
        (f"filter_chains[{i}]", chain) for i, chain in enumerate(msg.filter_chains)
    ]
    if msg.HasField("default_filter_chain"):
        chains.append(("default_filter_chain", msg.default_filter_chain))
    for chain_path, chain in chains:
        for j, flt in enumerate(chain.filters):
            if flt.typed_config.type_url != _HCM:
                continue
            hcm = http_connection_manager_pb2.HttpConnectionManager()
            if not flt.typed_config.Unpack(hcm) or not hcm.HasField("rds"):
                continue
            name = hcm.rds.route_config_name
            out.append(
                Dependency(
                    ROUTE,
                    name,
                    hcm.rds.config_source,
                    f"{chain_path}.filters[{j}].typed_config.rds.config_source",
                    f"http.{hcm.stat_prefix}.rds.{name}.",
                )
            )
    return out


def _cluster_dependencies(msg: Message) -> list[Dependency]:
    assert isinstance(msg, cluster_pb2.Cluster)
    if msg.WhichOneof("cluster_discovery_type") != "type" or msg.type != cluster_pb2.Cluster.EDS:
        return []
    eds = msg.eds_cluster_config
    return [
        Dependency(
            ENDPOINT,
            eds.service_name or msg.name,
            eds.eds_config,
            "eds_cluster_config.eds_config",
            f"cluster.{msg.name}.",
        )
    ]


_DEPENDENCIES: dict[str, Callable[[Message], list[Dependency]]] = {
    LISTENER: _listener_dependencies,
    CLUSTER: _cluster_dependencies,
}

#: Types whose resources name resources of another type (LDS -> RDS, CDS -> EDS).
DEPENDENT_TYPES: dict[str, str] = {LISTENER: ROUTE, CLUSTER: ENDPOINT}


def dependencies(type_url: str, msg: Message) -> list[Dependency]:
    """The resources ``msg`` (a resource of ``type_url``) names, with their sources."""
    extract = _DEPENDENCIES.get(type_url)
    return extract(msg) if extract is not None else []
