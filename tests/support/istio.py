"""Istio's control plane (istiod's ``pilot-discovery``) run without Kubernetes.

:class:`Istiod` starts the binary built by :mod:`support.istio_build` with
``--registries=`` (no service registry but the ServiceEntries of its config store) and a
mesh config whose ``configSources`` is ``fs://<dir>``: a folder of Istio YAML
(ServiceEntry, Gateway, VirtualService, DestinationRule, PeerAuthentication) that
:class:`MeshFiles` writes and rewrites (istiod watches the folder). Every port is chosen
free on 127.0.0.1; xDS is plaintext gRPC. The environment that makes this work (and why
each variable is set) is :data:`ISTIOD_ENV`; docs/istio.md keeps the same list.

What a proxy was sent and whether it ACKed is read from istiod itself:
``/debug/syncz`` gives, per connected proxy and type, the nonce sent, the nonce ACKed
and the error of the last NACK; ``/debug/config_dump?proxyID=`` gives what istiod
generates for a proxy. That is the same for Envoy and envoyx, so a test compares them
on the control plane's word.

Nodes: :func:`gateway_node` (``router~…``, labels that the Gateway selects) and
:func:`sidecar_node` (``sidecar~…``; interception NONE: outbound listeners bound to
127.0.0.1 on each service port, no iptables; or REDIRECT: the virtual listeners a pod
behind iptables gets, on the free ports :class:`Istiod` puts in the mesh config).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import subprocess
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from support.istio_build import ISTIO_VERSION, IstioBuildError, binary_path, ensure_pilot_discovery
from support.wait import Timeout, free_port, until

__all__ = [
    "ISTIOD_ENV",
    "ISTIO_VERSION",
    "TYPES",
    "IstioBuildError",
    "Istiod",
    "MeshFiles",
    "binary_path",
    "ensure_pilot_discovery",
    "gateway_node",
    "istio_bootstrap",
    "sidecar_node",
]

Json = dict[str, Any]

NAMESPACE = "ns"
DOMAIN = "cluster.local"
# What the proxy says it is: istiod turns on features by the proxy's Istio version.
PROXY_ISTIO_VERSION = "1.31.0"
GATEWAY_LABELS = {"istio": "ingressgateway"}

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
TYPES = {"CDS": CLUSTER, "EDS": ENDPOINT, "LDS": LISTENER, "RDS": ROUTE}

#: istiod's environment besides the flags. Only the first two are needed; the rest
#: make a start and a push quicker. Nothing else is needed without Kubernetes (tried:
#: JWT_POLICY, PILOT_ENABLE_XDS_IDENTITY_CHECK, POD_NAMESPACE, CLUSTER_ID change nothing
#: here; POD_NAMESPACE and CLUSTER_ID default to istio-system and Kubernetes).
ISTIOD_ENV = {
    # istio-proxy's own extensions: stock Envoy has neither, and NACKs every cluster
    # (istio.metadata_exchange, envoy.tcp.metadataexchange.config.MetadataExchange) and
    # every listener (io.istio.http.peer_metadata.Config; istio.alpn) carrying them.
    "PILOT_ENABLE_METADATA_EXCHANGE": "false",
    "PILOT_ENABLE_ALPN_FILTER": "false",
    # No CA: without it istiod makes a self-signed root at each start (~0.5 s); the
    # proxies here use no certificates.
    "ENABLE_CA_SERVER": "false",
    # Pushes follow a config change quickly (defaults: 100 ms quiet, 10 s at most).
    "PILOT_DEBOUNCE_AFTER": "20ms",
    "PILOT_DEBOUNCE_MAX": "500ms",
}

ISTIOD_START_TIMEOUT_S = 60.0


def _loopback(port: int) -> Json:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


# ---------------------------------------------------------------------------------
# Istio config: the files istiod reads
# ---------------------------------------------------------------------------------


@dataclass
class MeshFiles:
    """The ``fs://`` config folder: one backend ServiceEntry per upstream (hosts
    ``<name>.backend.example``, STATIC resolution to 127.0.0.1:<upstream port>, service
    port ``service_port``) and one for ``host`` (to the first upstream), a Gateway on
    127.0.0.1:``gateway_port`` selecting the gateway node, a VirtualService for ``host``
    bound to the gateway and to the mesh that routes ``routes`` (path prefix -> backend
    name), a DestinationRule per backend and a mesh-wide PeerAuthentication; mTLS is off
    (plaintext upstreams, no certificates)."""

    folder: Path
    upstreams: dict[str, int]
    gateway_port: int
    service_port: int
    host: str = "web.example"

    def write_all(self, routes: dict[str, str]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        docs: list[Json] = []
        for name, port in self.upstreams.items():
            docs.append(self._service_entry(name, self.backend_host(name), port))
            docs.append(self._destination_rule(name))
        # The VirtualService's host is a service too: a sidecar gets routes only for the
        # hosts of services (its default destination is the first backend).
        first = next(iter(self.upstreams.values()))
        docs.append(self._service_entry("web", self.host, first))
        self._write("backends.yaml", docs)
        self._write("gateway.yaml", [self._gateway()])
        self._write(
            "peer-authentication.yaml",
            [
                {
                    "apiVersion": "security.istio.io/v1",
                    "kind": "PeerAuthentication",
                    "metadata": {"name": "default", "namespace": "istio-system"},
                    "spec": {"mtls": {"mode": "DISABLE"}},
                }
            ],
        )
        self.set_routes(routes)

    def set_routes(self, routes: dict[str, str]) -> None:
        """(Re)write the VirtualService: each path prefix to its backend, in order."""
        self._write("virtual-service.yaml", [self._virtual_service(routes)])

    def backend_host(self, name: str) -> str:
        return f"{name}.backend.example"

    def _write(self, name: str, docs: list[Json]) -> None:
        # Renamed into place: istiod's folder watch never sees half a file (it reads
        # only *.yaml / *.yml, so the temporary name is ignored).
        tmp = self.folder / f".{name}.tmp"
        tmp.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        tmp.rename(self.folder / name)

    def _service_entry(self, name: str, host: str, port: int) -> Json:
        return {
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": {"name": f"backend-{name}", "namespace": NAMESPACE},
            "spec": {
                "hosts": [host],
                "location": "MESH_INTERNAL",
                "resolution": "STATIC",
                "ports": [{"number": self.service_port, "name": "http", "protocol": "HTTP"}],
                "endpoints": [
                    {"address": "127.0.0.1", "ports": {"http": port}, "labels": {"app": name}}
                ],
            },
        }

    def _destination_rule(self, name: str) -> Json:
        return {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": f"backend-{name}", "namespace": NAMESPACE},
            "spec": {
                "host": self.backend_host(name),
                "trafficPolicy": {
                    "tls": {"mode": "DISABLE"},
                    "connectionPool": {
                        "tcp": {"maxConnections": 100, "connectTimeout": "2s"},
                        "http": {"http1MaxPendingRequests": 100, "maxRetries": 3},
                    },
                },
            },
        }

    def _gateway(self) -> Json:
        return {
            "apiVersion": "networking.istio.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "gw", "namespace": NAMESPACE},
            "spec": {
                "selector": GATEWAY_LABELS,
                "servers": [
                    {
                        "bind": "127.0.0.1",
                        "port": {"number": self.gateway_port, "name": "http", "protocol": "HTTP"},
                        "hosts": ["*"],
                    }
                ],
            },
        }

    def _virtual_service(self, routes: dict[str, str]) -> Json:
        return {
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "web", "namespace": NAMESPACE},
            "spec": {
                "hosts": [self.host],
                "gateways": [f"{NAMESPACE}/gw", "mesh"],
                "http": [
                    {
                        "name": f"to-{backend}",
                        "match": [{"uri": {"prefix": prefix}}],
                        "route": [
                            {
                                "destination": {
                                    "host": self.backend_host(backend),
                                    "port": {"number": self.service_port},
                                }
                            }
                        ],
                        "timeout": "5s",
                        "retries": {"attempts": 2, "retryOn": "connect-failure"},
                    }
                    for prefix, backend in routes.items()
                ],
            },
        }


def mesh_config(config_dir: Path, xds_port: int) -> Json:
    return {
        "configSources": [{"address": f"fs://{config_dir}"}],
        "rootNamespace": "istio-system",
        "trustDomain": DOMAIN,
        # No certificates: auto mTLS would add istio-tls transport socket matches that
        # read SDS from the istio-agent, which is not there.
        "enableAutoMtls": False,
        # The default tracer (zipkin) names a "zipkin" cluster that only istio-proxy's
        # bootstrap has.
        "enableTracing": False,
        "defaultConfig": {"discoveryAddress": f"127.0.0.1:{xds_port}"},
    }


# ---------------------------------------------------------------------------------
# istiod
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Nack:
    """One NACK as istiod logged it: ``ADS:<TYPE>: ACK ERROR <connection> <code>:<message>``."""

    type: str
    connection: str
    message: str


_NACK_LINE = re.compile(r"ADS:(\w+): ACK ERROR (\S+) (\w+):(.*)$")


class Istiod:
    """``pilot-discovery discovery`` as a child process, reading ``config_dir``."""

    def __init__(
        self,
        binary: Path,
        workdir: Path,
        config_dir: Path,
        log_level: str = "default:info,ads:info",
        mesh: Json | None = None,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.xds_port = free_port()
        self.http_port = free_port()
        self.monitoring_port = free_port()
        self.ctrlz_port = free_port()
        self.mesh_path = workdir / "mesh.yaml"
        # A sidecar with traffic capture listens on the mesh's proxyListenPort (15001)
        # and proxyInboundListenPort (15006): free ports here.
        self.outbound_port = free_port()
        self.inbound_port = free_port()
        config = mesh_config(config_dir, self.xds_port)
        config["proxyListenPort"] = self.outbound_port
        config["proxyInboundListenPort"] = self.inbound_port
        config.update(mesh or {})
        self.mesh_path.write_text(yaml.safe_dump(config))
        self.networks_path = workdir / "meshNetworks.yaml"
        self.networks_path.write_text("networks: {}\n")
        self.log_path = workdir / "istiod.log"
        self._log: IO[bytes] = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ)
        env.update(ISTIOD_ENV)
        self.proc = subprocess.Popen(
            [
                str(binary),
                "discovery",
                "--registries=",
                f"--meshConfig={self.mesh_path}",
                f"--networksConfig={self.networks_path}",
                f"--grpcAddr=127.0.0.1:{self.xds_port}",
                f"--httpAddr=127.0.0.1:{self.http_port}",
                f"--monitoringAddr=127.0.0.1:{self.monitoring_port}",
                # No TLS listeners: no certificates here.
                "--secureGRPCAddr=",
                "--httpsAddr=",
                "--ctrlz_address=127.0.0.1",
                f"--ctrlz_port={self.ctrlz_port}",
                f"--domain={DOMAIN}",
                f"--log_output_level={log_level}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
        )

    def wait_ready(self, timeout: float = ISTIOD_START_TIMEOUT_S) -> Istiod:
        """Until istiod serves xDS. Its ``/ready`` never turns 200 here: it also waits
        for the sidecar injector and the validation webhook, which need Kubernetes."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"istiod exited with {self.proc.returncode}:\n{self.log()}")
            if "marking server ready" not in self.log():
                return False
            with socket.create_connection(("127.0.0.1", self.xds_port), timeout=1):
                pass
            status, _ = self._get("/debug/syncz")
            return status == 200

        try:
            until(ready, timeout=timeout, interval=0.1, what="istiod serving xDS")
        except Timeout:
            raise AssertionError(f"istiod not ready in {timeout}s:\n{self.log()[-5000:]}") from None
        return self

    def _get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def debug(self, path: str) -> Any:
        status, body = self._get(path)
        if status != 200:
            raise AssertionError(f"istiod {path} gave {status}: {body[:300]!r}")
        return json.loads(body)

    def syncz(self) -> list[Json]:
        """``/debug/syncz``: per connected proxy, nonces sent and ACKed per type."""
        return list(self.debug("/debug/syncz"))

    def sync_of(self, proxy_id: str) -> Json | None:
        for entry in self.syncz():
            if entry.get("proxy") == proxy_id:
                return entry
        return None

    def config_dump(self, proxy_id: str) -> Json:
        """What istiod generates for the connected proxy ``proxy_id`` (its
        ``/config_dump`` as Envoy would show it)."""
        q = urllib.parse.urlencode({"proxyID": proxy_id, "include_eds": "true"})
        return dict(self.debug(f"/debug/config_dump?{q}"))

    def nacks(self) -> list[Nack]:
        out = []
        for line in self.log().splitlines():
            m = _NACK_LINE.search(line)
            if m:
                out.append(Nack(m.group(1), m.group(2), m.group(4)))
        return out

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        with contextlib.suppress(OSError):
            self._log.close()


def in_sync(entry: Json | None, types: tuple[str, ...] = ("CDS", "EDS", "LDS", "RDS")) -> bool:
    """Every type in ``types`` was sent and the latest nonce sent was ACKed."""
    if entry is None:
        return False
    resources = entry.get("resources", {})
    for short in types:
        st = resources.get(TYPES[short])
        if not st or not st.get("sent") or st.get("sent") != st.get("acked"):
            return False
    return True


def answered(entry: Json | None, types: tuple[str, ...] = ("CDS", "LDS")) -> bool:
    """Every type in ``types`` was answered (ACK or NACK) for its latest nonce: ACKed,
    or NACKed with the error kept (``lastError``)."""
    if entry is None:
        return False
    resources = entry.get("resources", {})
    for short in types:
        st = resources.get(TYPES[short])
        if not st or not st.get("sent"):
            return False
        if st.get("sent") != st.get("acked") and not st.get("lastError"):
            return False
    return True


# ---------------------------------------------------------------------------------
# Proxies: nodes and bootstrap
# ---------------------------------------------------------------------------------


def _node(kind: str, name: str, ip: str, labels: dict[str, str], interception: str | None) -> Json:
    # ``ip`` is only what istiod knows the proxy by; it must not be an endpoint address
    # (127.0.0.1): istiod takes a proxy at an endpoint's address for that workload and
    # gives it the endpoint's labels instead of LABELS, and then no Gateway selects it.
    metadata: Json = {
        "NAMESPACE": NAMESPACE,
        "NAME": name,
        "WORKLOAD_NAME": name,
        "LABELS": labels,
        "ISTIO_VERSION": PROXY_ISTIO_VERSION,
        "INSTANCE_IPS": ip,
        "CLUSTER_ID": "Kubernetes",
        "MESH_ID": DOMAIN,
        "SERVICE_ACCOUNT": "default",
    }
    if interception is not None:
        metadata["INTERCEPTION_MODE"] = interception
    return {
        "id": f"{kind}~{ip}~{name}.{NAMESPACE}~{NAMESPACE}.svc.{DOMAIN}",
        "cluster": f"{name}.{NAMESPACE}",
        "metadata": metadata,
    }


def gateway_node() -> Json:
    """An ingress gateway: selected by the Gateway's ``istio: ingressgateway``."""
    return _node("router", "gw", "127.0.0.10", dict(GATEWAY_LABELS), None)


def sidecar_node(interception: str = "NONE") -> Json:
    """A sidecar. Without traffic capture (interception NONE) its outbound listeners are
    bound to 127.0.0.1 on each service port. With REDIRECT (iptables in a pod) they are
    virtual (``bind_to_port: false``) behind the ``virtualOutbound`` listener on the
    mesh's proxyListenPort (``use_original_dst``), and ``virtualInbound`` listens on
    proxyInboundListenPort."""
    return _node("sidecar", "app", "127.0.0.11", {"app": "client"}, interception)


def proxy_id(node: Json) -> str:
    """The id istiod knows a proxy by in /debug (``name.namespace``)."""
    return str(node["id"].split("~")[2])


def istio_bootstrap(*, node: Json, admin_port: int, xds_port: int, api_type: str) -> Json:
    """An Envoy bootstrap with ADS (``GRPC`` or ``DELTA_GRPC``) to istiod and nothing
    else: listeners, routes, clusters and endpoints all come from the control plane."""
    return {
        "node": node,
        "admin": {"address": _loopback(admin_port)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
                "set_node_on_first_message_only": True,
            },
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "xds-grpc",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                            "HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "xds-grpc",
                        "endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": _loopback(xds_port)}}]}
                        ],
                    },
                }
            ]
        },
    }
