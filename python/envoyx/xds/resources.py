"""The xDS resource types envoyx subscribes to, and what the client needs to know of each.

Adding a type is adding a :class:`ResourceType` to :data:`TYPES` (and, when its
resources name other resources, a case in :func:`dependencies`).

Listeners name route configurations (an HCM's ``rds``), scoped route configurations (an
HCM's ``scoped_routes.scoped_rds``: a wildcard subscription, whose scopes name route
configurations in turn, fetched from ``scoped_routes.rds_config_source``) and secrets
(the SDS configs of their filter chains' ``DownstreamTlsContext``); clusters name
ClusterLoadAssignments (``type: EDS``) and secrets (their ``UpstreamTlsContext``). A
secret reference without ``sds_config`` names one of the bootstrap's
``static_resources.secrets``: nothing to subscribe to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2, scoped_route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from google.protobuf.message import DecodeError, Message

__all__ = [
    "CLUSTER",
    "ENDPOINT",
    "LISTENER",
    "ORDER",
    "RESOURCE_WRAPPER",
    "ROUTE",
    "SCOPED_ROUTE",
    "SCOPED_ROUTE_TABLES",
    "SECRET",
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
SCOPED_ROUTE = TYPE_PREFIX + "envoy.config.route.v3.ScopedRouteConfiguration"
#: The name of the ROUTE dependency a ``scoped_rds`` connection manager records: every
#: route configuration its scopes name comes from that source.
SCOPED_ROUTE_TABLES = ""
CLUSTER = TYPE_PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = TYPE_PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = TYPE_PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"
#: SotW responses may wrap each resource in a ``Resource`` (client feature
#: ``xds.config.resource-in-sotw``).
RESOURCE_WRAPPER = TYPE_PREFIX + "envoy.service.discovery.v3.Resource"
_HCM = (
    TYPE_PREFIX
    + "envoy.extensions.filters.network.http_connection_manager.v3."
    + ("HttpConnectionManager")
)
_TLS = TYPE_PREFIX + "envoy.extensions.transport_sockets.tls.v3."
UPSTREAM_TLS_CONTEXT = _TLS + "UpstreamTlsContext"
DOWNSTREAM_TLS_CONTEXT = _TLS + "DownstreamTlsContext"


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
        ResourceType(
            SCOPED_ROUTE,
            "SRDS",
            "scoped route",
            scoped_route_pb2.ScopedRouteConfiguration,
            "name",
            True,
            "envoy.service.route.v3.ScopedRoutesDiscoveryService",
            "StreamScopedRoutes",
            "DeltaScopedRoutes",
        ),
        ResourceType(
            SECRET,
            "SDS",
            "secret",
            secret_pb2.Secret,
            "name",
            False,
            "envoy.service.secret.v3.SecretDiscoveryService",
            "StreamSecrets",
            "DeltaSecrets",
        ),
    )
}

#: Make-before-break order: the order of initial requests on a stream. Secrets come
#: first: a listener or cluster naming one is not in force without it.
ORDER = (SECRET, CLUSTER, ENDPOINT, LISTENER, SCOPED_ROUTE, ROUTE)

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
    ClusterLoadAssignment of an EDS cluster, a secret of a TLS context's SDS config.

    ``source`` is the ConfigSource to fetch it from (``path`` its field path inside the
    parent); ``stat_prefix`` is where Envoy counts that subscription's updates
    (``http.<stat_prefix>.rds.<name>.``, ``cluster.<cluster>.``, ``sds.<secret>.``,
    ``http.<stat_prefix>.scoped_rds.<name>.``).

    A ``scoped_rds`` connection manager names the SRDS subscription (``name``: its
    ``scoped_routes.name``) and, as ROUTE :data:`SCOPED_ROUTE_TABLES`, where the route
    configurations of the scopes come from (``stat_prefix``: ``http.<stat_prefix>.rds.``,
    to which the route configuration's name and a dot are added).
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
        if chain.HasField("transport_socket"):
            out.extend(
                _secret_dependencies(chain.transport_socket, f"{chain_path}.transport_socket")
            )
        for j, flt in enumerate(chain.filters):
            if flt.typed_config.type_url != _HCM:
                continue
            hcm = http_connection_manager_pb2.HttpConnectionManager()
            if not flt.typed_config.Unpack(hcm):
                continue
            hcm_path = f"{chain_path}.filters[{j}].typed_config"
            if hcm.HasField("rds"):
                name = hcm.rds.route_config_name
                out.append(
                    Dependency(
                        ROUTE,
                        name,
                        hcm.rds.config_source,
                        f"{hcm_path}.rds.config_source",
                        f"http.{hcm.stat_prefix}.rds.{name}.",
                    )
                )
            elif hcm.HasField("scoped_routes") and hcm.scoped_routes.HasField("scoped_rds"):
                out.extend(_scoped_rds_dependencies(hcm, f"{hcm_path}.scoped_routes"))
    return out


def _scoped_rds_dependencies(
    hcm: http_connection_manager_pb2.HttpConnectionManager, path: str
) -> list[Dependency]:
    scoped = hcm.scoped_routes
    return [
        Dependency(
            SCOPED_ROUTE,
            scoped.name,
            scoped.scoped_rds.scoped_rds_config_source,
            f"{path}.scoped_rds.scoped_rds_config_source",
            f"http.{hcm.stat_prefix}.scoped_rds.{scoped.name}.",
        ),
        Dependency(
            ROUTE,
            SCOPED_ROUTE_TABLES,
            scoped.rds_config_source,
            f"{path}.rds_config_source",
            f"http.{hcm.stat_prefix}.rds.",
        ),
    ]


def _cluster_dependencies(msg: Message) -> list[Dependency]:
    assert isinstance(msg, cluster_pb2.Cluster)
    out: list[Dependency] = []
    if msg.WhichOneof("cluster_discovery_type") == "type" and msg.type == cluster_pb2.Cluster.EDS:
        eds = msg.eds_cluster_config
        out.append(
            Dependency(
                ENDPOINT,
                eds.service_name or msg.name,
                eds.eds_config,
                "eds_cluster_config.eds_config",
                f"cluster.{msg.name}.",
            )
        )
    if msg.HasField("transport_socket"):
        out.extend(_secret_dependencies(msg.transport_socket, "transport_socket"))
    for i, match in enumerate(msg.transport_socket_matches):
        if match.HasField("transport_socket"):
            path = f"transport_socket_matches[{i}].transport_socket"
            out.extend(_secret_dependencies(match.transport_socket, path))
    return out


def _secret_dependencies(socket: Any, path: str) -> list[Dependency]:
    """The SDS secrets a ``TransportSocket`` (``envoy.transport_sockets.tls``) names:
    its certificates, its validation context, (downstream) its session ticket keys."""
    type_url = socket.typed_config.type_url
    context: Any
    if type_url == UPSTREAM_TLS_CONTEXT:
        context = tls_pb2.UpstreamTlsContext()
    elif type_url == DOWNSTREAM_TLS_CONTEXT:
        context = tls_pb2.DownstreamTlsContext()
    else:
        return []
    if not socket.typed_config.Unpack(context):
        return []
    base = f"{path}.typed_config"
    configs: list[tuple[str, Any]] = []
    common = context.common_tls_context
    cpath = f"{base}.common_tls_context"
    for i, sds in enumerate(common.tls_certificate_sds_secret_configs):
        configs.append((f"{cpath}.tls_certificate_sds_secret_configs[{i}]", sds))
    if common.HasField("validation_context_sds_secret_config"):
        configs.append(
            (
                f"{cpath}.validation_context_sds_secret_config",
                common.validation_context_sds_secret_config,
            )
        )
    combined = common.combined_validation_context
    if common.HasField("combined_validation_context") and combined.HasField(
        "validation_context_sds_secret_config"
    ):
        configs.append(
            (
                f"{cpath}.combined_validation_context.validation_context_sds_secret_config",
                combined.validation_context_sds_secret_config,
            )
        )
    if isinstance(context, tls_pb2.DownstreamTlsContext) and context.HasField(
        "session_ticket_keys_sds_secret_config"
    ):
        configs.append(
            (
                f"{base}.session_ticket_keys_sds_secret_config",
                context.session_ticket_keys_sds_secret_config,
            )
        )
    return [
        Dependency(SECRET, sds.name, sds.sds_config, f"{where}.sds_config", f"sds.{sds.name}.")
        for where, sds in configs
        if sds.HasField("sds_config")  # without: a static secret of the bootstrap
    ]


_DEPENDENCIES: dict[str, Callable[[Message], list[Dependency]]] = {
    LISTENER: _listener_dependencies,
    CLUSTER: _cluster_dependencies,
}

#: Types whose resources name resources of other types (LDS -> RDS, SRDS and SDS, CDS ->
#: EDS and SDS).
DEPENDENT_TYPES: dict[str, tuple[str, ...]] = {
    LISTENER: (ROUTE, SCOPED_ROUTE, SECRET),
    CLUSTER: (ENDPOINT, SECRET),
}


def dependencies(type_url: str, msg: Message) -> list[Dependency]:
    """The resources ``msg`` (a resource of ``type_url``) names, with their sources."""
    extract = _DEPENDENCIES.get(type_url)
    return extract(msg) if extract is not None else []
