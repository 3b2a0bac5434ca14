"""What the bootstrap says about dynamic resources: the ADS stream, the LDS/CDS
subscriptions, the node, and how to reach each management server.

Everything envoyx cannot honour is a :class:`~envoyx.ConfigError` naming the field
(``dynamic_resources.ads_config.api_type: ...``), never silently ignored, except the
settings that concern only Envoy's own gRPC client (``timeout``, ``refresh_delay``,
...), listed in :data:`IGNORED_FIELDS`. ``rate_limit_settings`` is honoured as in Envoy:
a token bucket on the discovery requests of the stream (:class:`RateLimit`).

TLS to a management server: ``google_grpc`` with ``channel_credentials.ssl_credentials``,
or ``envoy_grpc`` naming a static cluster whose ``transport_socket`` is
``envoy.transport_sockets.tls`` (``UpstreamTlsContext``). Of the latter, grpcio honours
``validation_context.trusted_ca`` (or ``system_root_certs``) as the roots,
``tls_certificates[0]`` as the client certificate (mutual TLS), ``sni``, ``alpn_protocols``
``[h2]``, one DNS name in ``match_typed_subject_alt_names`` (``exact``), and the same
pieces from ``static_resources.secrets`` named by ``tls_certificate_sds_secret_configs`` /
``validation_context_sds_secret_config`` without ``sds_config``; any other field set is an
error naming it. gRPC always checks that the server's certificate names the host it
connects to: the ``sni`` (or the DNS name to match) when set, else the cluster
endpoint's address. Envoy checks names only when ``match_typed_subject_alt_names`` asks
(and, without a validation context, accepts any certificate: envoyx refuses that).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2, grpc_service_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

from envoyx.errors import ConfigError

__all__ = [
    "CLIENT_FEATURES",
    "DEFAULT_BACKOFF",
    "DEFAULT_INITIAL_FETCH_TIMEOUT",
    "GrpcTarget",
    "RateLimit",
    "ResolvedSource",
    "Source",
    "SourceError",
    "XdsSettings",
    "build_node",
    "parse_dynamic_resources",
]

_log = logging.getLogger("envoyx.xds")

#: Envoy's default ``initial_fetch_timeout``.
DEFAULT_INITIAL_FETCH_TIMEOUT = 15.0
#: Envoy's ``RateLimitSettings`` defaults: a bucket of 100 tokens refilled at 10 a second.
DEFAULT_RATE_LIMIT = (100, 10.0)
#: Envoy's reconnect back-off of an xDS stream: 500 ms doubling up to 30 s, full jitter.
DEFAULT_BACKOFF = (0.5, 30.0)
#: Envoy's default cluster ``connect_timeout``, the management server's cluster's too.
DEFAULT_CONNECT_TIMEOUT = 5.0
#: What envoyx's xDS client supports, sent in ``node.client_features``.
CLIENT_FEATURES = (
    "envoy.lb.does_not_support_overprovisioning",
    "xds.config.resource-in-sotw",
)
#: Fields that only tune Envoy's own gRPC client; they have no effect in envoyx.
IGNORED_FIELDS = (
    "ApiConfigSource.refresh_delay",
    "ApiConfigSource.request_timeout",
    "GrpcService.timeout",
    "GrpcService.retry_policy",
    "GrpcService.EnvoyGrpc.skip_envoy_headers",
    "GrpcService.GoogleGrpc.stat_prefix",
    "GrpcService.GoogleGrpc.per_stream_buffer_limit_bytes",
)

_API = config_source_pb2.ApiConfigSource
_CS = config_source_pb2.ConfigSource
_TLS_PREFIX = "type.googleapis.com/envoy.extensions.transport_sockets."
_UPSTREAM_TLS = _TLS_PREFIX + "tls.v3.UpstreamTlsContext"
_RAW_BUFFER = _TLS_PREFIX + "raw_buffer.v3.RawBuffer"


class SourceError(ValueError):
    """A ConfigSource envoyx cannot subscribe through; ``errors`` are ``path: why``."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("; ".join(errors))


@dataclass(frozen=True)
class GrpcTarget:
    """How grpcio reaches one management server."""

    target: str  # a grpcio target: "127.0.0.1:18000", "dns:///xds:18000", "unix:/run/xds"
    description: str  # for logs: "cluster xds_cluster (127.0.0.1:18000)"
    authority: str | None = None
    root_certs: bytes | None = None
    private_key: bytes | None = None
    cert_chain: bytes | None = None
    secure: bool = False
    local_credentials: bool = False
    metadata: tuple[tuple[str, str], ...] = ()
    channel_options: tuple[tuple[str, int | str], ...] = ()
    backoff_base: float = DEFAULT_BACKOFF[0]
    backoff_max: float = DEFAULT_BACKOFF[1]
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT  # the cluster's connect_timeout


@dataclass(frozen=True)
class RateLimit:
    """``api_config_source.rate_limit_settings``: at most ``max_tokens`` discovery
    requests at once, then ``fill_rate`` a second (Envoy's token bucket of a stream)."""

    max_tokens: int = DEFAULT_RATE_LIMIT[0]
    fill_rate: float = DEFAULT_RATE_LIMIT[1]


@dataclass(frozen=True)
class Source:
    """One management server stream: the ADS stream (``aggregated``), or the gRPC
    stream of an ``api_config_source`` (one stream per type, as in Envoy)."""

    key: str
    aggregated: bool
    delta: bool
    target: GrpcTarget
    node_first_only: bool = False
    rate_limit: RateLimit | None = None  # None: requests are not rate limited


@dataclass(frozen=True)
class ResolvedSource:
    """A ConfigSource resolved: the stream (None when no xDS client runs, e.g. for a
    resource given to ``Server.update`` without dynamic_resources) and its
    ``initial_fetch_timeout`` in seconds (None: wait for ever)."""

    source: Source | None
    initial_fetch_timeout: float | None


@dataclass(frozen=True)
class XdsSettings:
    """The parsed ``dynamic_resources`` (and what static resources need)."""

    bootstrap: Bootstrap
    node: base_pb2.Node
    ads: Source | None
    lds: ResolvedSource | None
    cds: ResolvedSource | None

    def resolve(
        self, config_source: config_source_pb2.ConfigSource, path: str, parent: Source | None
    ) -> ResolvedSource:
        """Resolve a ConfigSource found in a resource (an HCM's ``rds``, an EDS
        cluster's ``eds_config``); ``parent`` is the stream that delivered the resource
        (for ``self``). Raises :class:`SourceError`."""
        return _resolve_config_source(
            config_source, path, bootstrap=self.bootstrap, ads=self.ads, parent=parent
        )


def envoyx_version() -> str:
    try:
        return package_version("envoyx")
    except PackageNotFoundError:
        return "0.0.0"


def build_node(bootstrap_node: base_pb2.Node, version: str | None = None) -> base_pb2.Node:
    """The node sent to management servers: the bootstrap's (with --service-node /
    --service-cluster already applied), plus envoyx's user agent and client features."""
    node = base_pb2.Node()
    node.CopyFrom(bootstrap_node)
    node.user_agent_name = "envoyx"
    parts = [int(p) if p.isdigit() else 0 for p in _numeric_prefix(version or envoyx_version())]
    parts += [0] * (3 - len(parts))
    build = node.user_agent_build_version
    build.version.major_number, build.version.minor_number, build.version.patch = parts[:3]
    for feature in CLIENT_FEATURES:
        if feature not in node.client_features:
            node.client_features.append(feature)
    return node


def _numeric_prefix(version: str) -> list[str]:
    out: list[str] = []
    for piece in version.split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        out.append(digits or "0")
        if digits != piece:
            break
    return out


def parse_dynamic_resources(bootstrap: Bootstrap) -> XdsSettings | None:
    """The xDS settings of ``bootstrap``; None when it has no ``dynamic_resources``.

    Raises :class:`~envoyx.ConfigError` listing every unsupported or invalid setting.
    """
    if not bootstrap.HasField("dynamic_resources"):
        return None
    dynamic = bootstrap.dynamic_resources
    base = "dynamic_resources"
    errors: list[str] = []
    for name in ("lds_resources_locator", "cds_resources_locator"):
        if getattr(dynamic, name):  # xdstp:// locator strings
            errors.append(f"{base}.{name}: xdstp:// resource locators are not supported")
    ads: Source | None = None
    if dynamic.HasField("ads_config"):
        try:
            ads = _api_source(dynamic.ads_config, f"{base}.ads_config", bootstrap, aggregated=True)
        except SourceError as e:
            errors.extend(e.errors)
    resolved: dict[str, ResolvedSource | None] = {"lds": None, "cds": None}
    for kind in ("lds", "cds"):
        name = f"{kind}_config"
        if not dynamic.HasField(name):
            continue
        cs = getattr(dynamic, name)
        path = f"{base}.{name}"
        if cs.WhichOneof("config_source_specifier") == "ads" and ads is None:
            if not dynamic.HasField("ads_config"):
                errors.append(f"{path}.ads: there is no dynamic_resources.ads_config")
            continue
        try:
            resolved[kind] = _resolve_config_source(
                cs, path, bootstrap=bootstrap, ads=ads, parent=None
            )
        except SourceError as e:
            errors.extend(e.errors)
    if errors:
        raise ConfigError(errors)
    return XdsSettings(
        bootstrap=bootstrap,
        node=build_node(bootstrap.node),
        ads=ads,
        lds=resolved["lds"],
        cds=resolved["cds"],
    )


def _seconds(duration: Duration) -> float:
    return int(duration.seconds) + int(duration.nanos) / 1e9


def _resolve_config_source(
    cs: config_source_pb2.ConfigSource,
    path: str,
    *,
    bootstrap: Bootstrap,
    ads: Source | None,
    parent: Source | None,
) -> ResolvedSource:
    errors: list[str] = []
    if cs.authorities:
        errors.append(f"{path}.authorities: xdstp:// authorities are not supported")
    if cs.resource_api_version == config_source_pb2.V2:
        errors.append(f"{path}.resource_api_version: the v2 xDS API is not supported (use V3)")
    timeout = DEFAULT_INITIAL_FETCH_TIMEOUT
    if cs.HasField("initial_fetch_timeout"):
        timeout = _seconds(cs.initial_fetch_timeout)
    fetch_timeout = timeout if timeout > 0 else None
    kind = cs.WhichOneof("config_source_specifier")
    source: Source | None = None
    if kind == "ads":
        source = ads
    elif kind == "self":
        if parent is None:
            errors.append(f"{path}.self: only a resource received over xDS can name `self`")
        source = parent
    elif kind == "api_config_source":
        try:
            source = _api_source(
                cs.api_config_source, f"{path}.api_config_source", bootstrap, aggregated=False
            )
        except SourceError as e:
            errors.extend(e.errors)
    elif kind in ("path", "path_config_source"):
        errors.append(
            f"{path}.{kind}: filesystem subscriptions are not supported "
            "(envoyx takes dynamic resources over gRPC: ads or api_config_source)"
        )
    else:
        errors.append(f"{path}: a config source is required (ads, self or api_config_source)")
    if errors:
        raise SourceError(errors)
    return ResolvedSource(source, fetch_timeout)


def _api_source(
    api: config_source_pb2.ApiConfigSource, path: str, bootstrap: Bootstrap, *, aggregated: bool
) -> Source:
    errors: list[str] = []
    api_type = _API.ApiType.Name(api.api_type)
    if api.api_type not in (_API.GRPC, _API.DELTA_GRPC):
        if api.api_type == _API.REST:
            why = "REST subscriptions are not supported (use GRPC or DELTA_GRPC)"
        elif api.api_type in (_API.AGGREGATED_GRPC, _API.AGGREGATED_DELTA_GRPC):
            why = "xdstp:// aggregated config sources are not supported (use GRPC or DELTA_GRPC)"
        else:
            why = "an api_type is required (GRPC or DELTA_GRPC)"
        errors.append(f"{path}.api_type: {api_type}: {why}")
    if api.transport_api_version != config_source_pb2.V3:
        version = config_source_pb2.ApiVersion.Name(api.transport_api_version)
        errors.append(
            f"{path}.transport_api_version: {version}: V2 (and AUTO) xDS transport protocol "
            "versions are not supported; set transport_api_version: V3"
        )
    if api.cluster_names:
        errors.append(f"{path}.cluster_names: not used by gRPC subscriptions (use grpc_services)")
    if api.config_validators:
        errors.append(f"{path}.config_validators: config validators are not supported")
    if len(api.grpc_services) != 1:
        errors.append(
            f"{path}.grpc_services: exactly one gRPC service is required, got "
            f"{len(api.grpc_services)}"
        )
        target = None
    else:
        try:
            target = _grpc_target(api.grpc_services[0], f"{path}.grpc_services[0]", bootstrap)
        except SourceError as e:
            errors.extend(e.errors)
            target = None
    rate_limit = _rate_limit(api, f"{path}.rate_limit_settings", errors)
    if errors or target is None:
        raise SourceError(errors)
    delta = api.api_type == _API.DELTA_GRPC
    if aggregated:
        key = "ads"
    else:
        key = "api:" + hashlib.sha256(api.SerializeToString(deterministic=True)).hexdigest()[:16]
    return Source(
        key=key,
        aggregated=aggregated,
        delta=delta,
        target=target,
        node_first_only=api.set_node_on_first_message_only,
        rate_limit=rate_limit,
    )


def _rate_limit(
    api: config_source_pb2.ApiConfigSource, path: str, errors: list[str]
) -> RateLimit | None:
    """Envoy's ``Utility::parseRateLimitSettings``: limited only when the message is
    set, each unset field taking its default."""
    if not api.HasField("rate_limit_settings"):
        return None
    settings = api.rate_limit_settings
    max_tokens, fill_rate = DEFAULT_RATE_LIMIT
    if settings.HasField("max_tokens"):
        max_tokens = settings.max_tokens.value
    if settings.HasField("fill_rate"):
        fill_rate = settings.fill_rate.value
    if math.isnan(fill_rate) or math.isinf(fill_rate):
        errors.append(
            f"{path}.fill_rate: The value of fill_rate in RateLimitSettings ({fill_rate}) "
            "must not be NaN nor Inf"
        )
        return None
    return RateLimit(max_tokens=max_tokens, fill_rate=fill_rate)


def _grpc_target(
    service: grpc_service_pb2.GrpcService, path: str, bootstrap: Bootstrap
) -> GrpcTarget:
    errors: list[str] = []
    metadata = tuple(
        (h.key.lower(), h.value or h.raw_value.decode("utf-8", "replace"))
        for h in service.initial_metadata
    )
    kind = service.WhichOneof("target_specifier")
    if kind == "envoy_grpc":
        target = _envoy_grpc_target(service.envoy_grpc, f"{path}.envoy_grpc", bootstrap, errors)
    elif kind == "google_grpc":
        target = _google_grpc_target(service.google_grpc, f"{path}.google_grpc", errors)
    else:
        errors.append(f"{path}: envoy_grpc or google_grpc is required")
        target = None
    if errors or target is None:
        raise SourceError(errors)
    if metadata:
        target = replace(target, metadata=metadata)
    return target


def _envoy_grpc_target(
    envoy_grpc: grpc_service_pb2.GrpcService.EnvoyGrpc,
    path: str,
    bootstrap: Bootstrap,
    errors: list[str],
) -> GrpcTarget | None:
    name = envoy_grpc.cluster_name
    cluster = next((c for c in bootstrap.static_resources.clusters if c.name == name), None)
    if cluster is None:
        errors.append(
            f"{path}.cluster_name: unknown cluster {name!r} (the management server's "
            "cluster must be a static cluster of the bootstrap)"
        )
        return None
    index = list(bootstrap.static_resources.clusters).index(cluster)
    cpath = f"static_resources.clusters[{index}]"
    address = _cluster_address(cluster, cpath, errors)
    tls = _cluster_tls(cluster, cpath, bootstrap, errors)
    options: list[tuple[str, int | str]] = []
    if tls is not None and tls.target_name is not None:
        options.append(("grpc.ssl_target_name_override", tls.target_name))
    if envoy_grpc.authority:
        options.append(("grpc.default_authority", envoy_grpc.authority))
    if envoy_grpc.HasField("max_receive_message_length"):
        limit = envoy_grpc.max_receive_message_length.value
        options.append(("grpc.max_receive_message_length", limit))
    base, maximum = DEFAULT_BACKOFF
    if envoy_grpc.HasField("retry_policy") and envoy_grpc.retry_policy.HasField("retry_back_off"):
        back_off = envoy_grpc.retry_policy.retry_back_off
        base = _seconds(back_off.base_interval)
        maximum = base * 10  # Envoy's default max_interval
        if back_off.HasField("max_interval"):
            maximum = _seconds(back_off.max_interval)
        if maximum < base:
            errors.append(
                f"{path}.retry_policy.retry_back_off.max_interval: must be at least base_interval"
            )
    if address is None:
        return None
    return GrpcTarget(
        target=address,
        description=f"cluster {name} ({address}{', TLS' if tls is not None else ''})",
        authority=envoy_grpc.authority or None,
        root_certs=tls.root_certs if tls is not None else None,
        private_key=tls.private_key if tls is not None else None,
        cert_chain=tls.cert_chain if tls is not None else None,
        secure=tls is not None,
        channel_options=tuple(options),
        backoff_base=base,
        backoff_max=maximum,
        connect_timeout=(
            _seconds(cluster.connect_timeout)
            if cluster.HasField("connect_timeout")
            else DEFAULT_CONNECT_TIMEOUT
        ),
    )


def _cluster_address(cluster: cluster_pb2.Cluster, path: str, errors: list[str]) -> str | None:
    kind = cluster.WhichOneof("cluster_discovery_type")
    # An unset discovery type is STATIC (the enum's zero), as in Envoy: go-control-plane's
    # sample bootstrap names no type for its xds_cluster.
    ctype = cluster.type if kind in ("type", None) else None
    dns = ctype in (cluster_pb2.Cluster.STRICT_DNS, cluster_pb2.Cluster.LOGICAL_DNS)
    if ctype != cluster_pb2.Cluster.STATIC and not dns:
        shown = cluster_pb2.Cluster.DiscoveryType.Name(ctype) if ctype is not None else kind
        errors.append(
            f"{path}.type: {shown}: the management server's cluster must be STATIC, "
            "STRICT_DNS or LOGICAL_DNS"
        )
        return None
    for i, locality in enumerate(cluster.load_assignment.endpoints):
        for j, lb_endpoint in enumerate(locality.lb_endpoints):
            if lb_endpoint.WhichOneof("host_identifier") != "endpoint":
                continue
            address = lb_endpoint.endpoint.address
            where = f"{path}.load_assignment.endpoints[{i}].lb_endpoints[{j}].endpoint.address"
            which = address.WhichOneof("address")
            if which == "socket_address":
                sa = address.socket_address
                if sa.WhichOneof("port_specifier") != "port_value":
                    errors.append(f"{where}.socket_address.port_value: a port is required")
                    return None
                host = f"[{sa.address}]" if ":" in sa.address else sa.address
                target = f"{host}:{sa.port_value}"
                return f"dns:///{target}" if dns else target
            if which == "pipe":
                return f"unix:{address.pipe.path}"
            errors.append(f"{where}: a socket_address or pipe is required")
            return None
    errors.append(f"{path}.load_assignment: the management server's cluster has no endpoint")
    return None


@dataclass(frozen=True)
class _ChannelTls:
    """What grpcio's ``ssl_channel_credentials`` and channel options take from an
    UpstreamTlsContext."""

    root_certs: bytes | None  # None: gRPC's default roots (system_root_certs)
    private_key: bytes | None
    cert_chain: bytes | None
    target_name: str | None  # grpc.ssl_target_name_override: SNI and the name checked


def _cluster_tls(
    cluster: cluster_pb2.Cluster, path: str, bootstrap: Bootstrap, errors: list[str]
) -> _ChannelTls | None:
    """The TLS of the management server's cluster (None: plaintext)."""
    if cluster.transport_socket_matches:
        errors.append(
            f"{path}.transport_socket_matches: not supported for the management server's "
            "cluster (use transport_socket)"
        )
    if not cluster.HasField("transport_socket"):
        return None
    socket = cluster.transport_socket
    tpath = f"{path}.transport_socket"
    if socket.WhichOneof("config_type") != "typed_config":
        errors.append(f"{tpath}.typed_config: required (an UpstreamTlsContext)")
        return None
    type_url = socket.typed_config.type_url
    if type_url == _RAW_BUFFER:
        return None
    if type_url != _UPSTREAM_TLS:
        errors.append(
            f"{tpath}.typed_config: {type_url}: the management server's connection takes "
            "envoy.transport_sockets.tls (UpstreamTlsContext) or raw_buffer"
        )
        return None
    ctx = tls_pb2.UpstreamTlsContext()
    socket.typed_config.Unpack(ctx)
    return _upstream_tls(ctx, f"{tpath}.typed_config", bootstrap, errors)


def _upstream_tls(
    ctx: tls_pb2.UpstreamTlsContext, path: str, bootstrap: Bootstrap, errors: list[str]
) -> _ChannelTls | None:
    before = len(errors)
    _unsupported_fields(ctx, ("common_tls_context", "sni"), path, errors)
    common = ctx.common_tls_context
    cpath = f"{path}.common_tls_context"
    _unsupported_fields(
        common,
        (
            "tls_certificates",
            "tls_certificate_sds_secret_configs",
            "validation_context",
            "validation_context_sds_secret_config",
            "alpn_protocols",
        ),
        cpath,
        errors,
    )
    for i, protocol in enumerate(common.alpn_protocols):
        if protocol != "h2":
            errors.append(f"{cpath}.alpn_protocols[{i}]: {protocol!r}: gRPC speaks h2 only")

    certificates: list[tuple[str, common_pb2.TlsCertificate]] = [
        (f"{cpath}.tls_certificates[{i}]", cert) for i, cert in enumerate(common.tls_certificates)
    ]
    for i, sds in enumerate(common.tls_certificate_sds_secret_configs):
        where = f"{cpath}.tls_certificate_sds_secret_configs[{i}]"
        secret = _static_secret(sds, where, "tls_certificate", bootstrap, errors)
        if secret is not None:
            certificates.append((where, secret.tls_certificate))
    private_key = cert_chain = None
    if len(certificates) > 1:
        errors.append(
            f"{certificates[1][0]}: gRPC presents one client certificate; "
            f"{len(certificates)} are configured"
        )
    elif certificates:
        where, cert = certificates[0]
        private_key, cert_chain = _tls_certificate(cert, where, errors)

    validation: tuple[str, common_pb2.CertificateValidationContext] | None = None
    if common.HasField("validation_context"):
        validation = (f"{cpath}.validation_context", common.validation_context)
    elif common.HasField("validation_context_sds_secret_config"):
        where = f"{cpath}.validation_context_sds_secret_config"
        sds = common.validation_context_sds_secret_config
        secret = _static_secret(sds, where, "validation_context", bootstrap, errors)
        if secret is not None:
            validation = (where, secret.validation_context)
    elif not common.HasField("combined_validation_context"):
        errors.append(
            f"{cpath}.validation_context: required for the management server's connection: "
            "envoyx verifies the server's certificate (set trusted_ca, or system_root_certs "
            "for the system's CAs), where Envoy would accept any certificate"
        )
    root_certs = san_name = None
    if validation is not None:
        vpath, vc = validation
        root_certs, san_name = _validation_context(vc, vpath, errors)

    target_name = ctx.sni or None
    if san_name is not None:
        if target_name is not None and target_name != san_name:
            errors.append(
                f"{path}.sni: {target_name!r}: gRPC checks the certificate against the name "
                f"it sends as SNI, so it cannot also match {san_name!r} "
                "(match_typed_subject_alt_names)"
            )
        target_name = san_name
    if len(errors) > before:
        return None
    return _ChannelTls(root_certs, private_key, cert_chain, target_name)


def _tls_certificate(
    cert: common_pb2.TlsCertificate, path: str, errors: list[str]
) -> tuple[bytes | None, bytes | None]:
    """The (private key, certificate chain) of a TlsCertificate."""
    _unsupported_fields(cert, ("certificate_chain", "private_key"), path, errors)
    for name in ("certificate_chain", "private_key"):
        if not cert.HasField(name):
            errors.append(f"{path}.{name}: required (with the other) for a client certificate")
    key = _data_source(cert, "private_key", path, errors)
    chain = _data_source(cert, "certificate_chain", path, errors)
    return key, chain


def _validation_context(
    vc: common_pb2.CertificateValidationContext, path: str, errors: list[str]
) -> tuple[bytes | None, str | None]:
    """The root certificates (None: gRPC's default roots) and the one DNS name the
    server's certificate must carry, if any."""
    _unsupported_fields(
        vc, ("trusted_ca", "system_root_certs", "match_typed_subject_alt_names"), path, errors
    )
    root = _data_source(vc, "trusted_ca", path, errors)
    if vc.HasField("trusted_ca") and vc.HasField("system_root_certs"):
        errors.append(
            f"{path}.system_root_certs: gRPC takes trusted_ca or the system's CAs, not both"
        )
    elif not vc.HasField("trusted_ca") and not vc.HasField("system_root_certs"):
        errors.append(
            f"{path}.trusted_ca: required for the management server's connection "
            "(or system_root_certs): envoyx verifies the server's certificate"
        )
    name: str | None = None
    matchers = list(vc.match_typed_subject_alt_names)
    for i, matcher in enumerate(matchers):
        where = f"{path}.match_typed_subject_alt_names[{i}]"
        dns = matcher.san_type == common_pb2.SubjectAltNameMatcher.DNS
        kind = matcher.matcher.WhichOneof("match_pattern")
        if len(matchers) > 1 or not dns or kind != "exact" or matcher.matcher.ignore_case:
            errors.append(
                f"{where}: gRPC checks the server's certificate against one DNS name: "
                "one matcher with san_type DNS and an exact (case-sensitive) name is "
                "supported"
            )
            continue
        name = matcher.matcher.exact
    return root, name


def _static_secret(
    sds: Any, path: str, kind: str, bootstrap: Bootstrap, errors: list[str]
) -> Any | None:
    """The ``static_resources.secrets`` entry an SdsSecretConfig without ``sds_config``
    names (its ``kind`` set: ``tls_certificate``, ``validation_context``)."""
    if sds.HasField("sds_config"):
        errors.append(
            f"{path}.sds_config: secrets of the management server's own connection cannot "
            "come by SDS; name one of static_resources.secrets (no sds_config)"
        )
        return None
    name = sds.name
    for secret in bootstrap.static_resources.secrets:
        if secret.name == name:
            if secret.WhichOneof("type") != kind:
                errors.append(f"{path}.name: static secret {name!r} is not a {kind}")
                return None
            return secret
    errors.append(f"{path}.name: unknown static secret {name!r} (static_resources.secrets)")
    return None


def _unsupported_fields(
    msg: Message, handled: tuple[str, ...], path: str, errors: list[str]
) -> None:
    """Report every field set in ``msg`` that is not ``handled``."""
    for field, _ in msg.ListFields():
        if field.name not in handled:
            errors.append(
                f"{path}.{field.name}: not supported for the management server's connection"
            )


def _google_grpc_target(
    google: grpc_service_pb2.GrpcService.GoogleGrpc, path: str, errors: list[str]
) -> GrpcTarget | None:
    if not google.target_uri:
        errors.append(f"{path}.target_uri: a target is required")
    unsupported = [
        name
        for name in (
            "channel_credentials_plugin",
            "call_credentials",
            "call_credentials_plugin",
            "credentials_factory_name",
            "config",
        )
        if _is_set(google, name)
    ]
    for name in unsupported:
        errors.append(f"{path}.{name}: not supported")
    root = key = chain = None
    secure = local = False
    if google.HasField("channel_credentials"):
        creds = google.channel_credentials
        which = creds.WhichOneof("credential_specifier")
        cpath = f"{path}.channel_credentials"
        if which == "ssl_credentials":
            secure = True
            ssl = creds.ssl_credentials
            root = _data_source(ssl, "root_certs", f"{cpath}.ssl_credentials", errors)
            key = _data_source(ssl, "private_key", f"{cpath}.ssl_credentials", errors)
            chain = _data_source(ssl, "cert_chain", f"{cpath}.ssl_credentials", errors)
        elif which == "local_credentials":
            local = True
        elif which is not None:
            errors.append(f"{cpath}.{which}: not supported")
    options: list[tuple[str, int | str]] = []
    for arg_name, value in sorted(google.channel_args.args.items()):
        vkind = value.WhichOneof("value_specifier")
        if vkind == "string_value":
            options.append((arg_name, value.string_value))
        elif vkind == "int_value":
            options.append((arg_name, int(value.int_value)))
    if errors:
        return None
    return GrpcTarget(
        target=google.target_uri,
        description=f"google_grpc {google.target_uri}",
        root_certs=root,
        private_key=key,
        cert_chain=chain,
        secure=secure,
        local_credentials=local,
        channel_options=tuple(options),
    )


def _is_set(msg: object, name: str) -> bool:
    value = getattr(msg, name)
    if isinstance(value, str | bytes):
        return bool(value)
    try:
        return bool(msg.HasField(name))  # type: ignore[attr-defined]
    except ValueError:  # repeated
        return len(value) > 0


def _data_source(msg: object, name: str, path: str, errors: list[str]) -> bytes | None:
    if not msg.HasField(name):  # type: ignore[attr-defined]
        return None
    ds = getattr(msg, name)
    which = ds.WhichOneof("specifier")
    where = f"{path}.{name}"
    if which == "filename":
        try:
            with open(ds.filename, "rb") as f:
                data: bytes = f.read()
                return data
        except OSError as e:
            errors.append(f"{where}.filename: cannot read {ds.filename}: {e.strerror or e}")
            return None
    if which == "inline_bytes":
        return bytes(ds.inline_bytes)
    if which == "inline_string":
        return str(ds.inline_string).encode()
    if which == "environment_variable":
        value = os.environ.get(ds.environment_variable)
        if value is None:
            errors.append(f"{where}.environment_variable: {ds.environment_variable} is not set")
            return None
        return value.encode()
    errors.append(f"{where}: a data source is required")
    return None
