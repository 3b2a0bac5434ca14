"""A sidecar behind a real iptables REDIRECT, run inside a private network namespace.

Run as ``unshare --net -- python tests/support/redirect.py PROXY ENVOY WORKDIR`` (root:
a new network namespace and its nat table need CAP_SYS_ADMIN and CAP_NET_ADMIN), so the
rules never touch the machine's other tests. In the namespace:

- loopback up, and two "service" addresses on it: 10.10.0.1 (a service nothing
  listens on: only the proxy's listener for its port serves it) and 10.10.0.2 (where
  the real upstreams b and c listen, reached by their original destination);
- an nat OUTPUT rule as Istio's istio-iptables writes it: TCP to the mesh range
  10.10.0.0/24 from any user but the proxy's (root here) is redirected to the
  proxy's outbound port 15001; the client (curl) runs as ``nobody``;
- the proxy (Envoy 1.40 or envoyx) with Istio's sidecar shape: ``virtualOutbound``
  on 0.0.0.0:15001 with ``use_original_dst`` and a tcp_proxy to the ORIGINAL_DST
  ``PassthroughCluster``; ``bind_to_port: false`` listeners 0.0.0.0:9080 (HTTP to
  the STATIC cluster of upstream a) and 0.0.0.0:<c's port> (HTTP to the
  PassthroughCluster: Istio's HTTP passthrough), each with an http_inspector.

Three requests by the client, to the services' own addresses: 10.10.0.1:9080 (handed
off to 0.0.0.0:9080 → a), 10.10.0.2:<b> (no listener on it: virtualOutbound's own
chain passes the bytes through to b), 10.10.0.2:<c> (handed off to the HTTP
listener, whose route goes to the original destination, c). A fourth to a workload
behind the sidecar, 10.10.1.1:<workload>, redirected to Istio's ``virtualInbound`` on
15006 (``original_dst`` listener filter, http_inspector ``filter_disabled`` for the
listener's own port, evaluated on the restored address): HTTP to the ORIGINAL_DST
``InboundPassthroughCluster``, whose ``upstream_bind_config`` makes the workload see
127.0.0.6. Prints one JSON object: each response's facts and the stat deltas, stat
names with their ports named.
Exit code 3 with a message when the namespace cannot be set up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from support.envoy import EnvoyProcess
from support.proxy import EnvoyxProcess, ProxyProcess
from support.upstreams import HttpUpstream

Json = dict[str, Any]

OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
WORKLOAD_ADDRESS = "10.10.1.1"
WORKLOAD_RANGE = "10.10.1.0/24"
SERVICE_ADDRESS = "10.10.0.1"
SERVICE_PORT = 9080
UPSTREAM_ADDRESS = "10.10.0.2"
MESH_RANGE = "10.10.0.0/24"
PROXY_UID = 0
CLIENT_UID = 65534
SETUP_FAILED = 3

_HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
_TCP_PROXY_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
_HTTP_INSPECTOR: Json = {
    "name": "envoy.filters.listener.http_inspector",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3."
        "HttpInspector"
    },
}


def _address(host: str, port: int) -> Json:
    return {"socket_address": {"address": host, "port_value": port}}


def _passthrough_chain() -> Json:
    return {
        "name": "PassthroughFilterChain",
        "filters": [
            {
                "name": "envoy.filters.network.tcp_proxy",
                "typed_config": {
                    "@type": _TCP_PROXY_TYPE,
                    "stat_prefix": "PassthroughCluster",
                    "cluster": "PassthroughCluster",
                },
            }
        ],
    }


def _http_chain(stat_prefix: str, cluster: str) -> Json:
    return {
        "filter_chain_match": {
            "transport_protocol": "raw_buffer",
            "application_protocols": ["http/1.1", "h2c"],
        },
        "filters": [
            {
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": _HCM_TYPE,
                    "stat_prefix": stat_prefix,
                    "route_config": {
                        "name": stat_prefix,
                        "virtual_hosts": [
                            {
                                "name": "all",
                                "domains": ["*"],
                                "routes": [
                                    {"match": {"prefix": "/"}, "route": {"cluster": cluster}}
                                ],
                            }
                        ],
                    },
                    "http_filters": [
                        {
                            "name": "envoy.filters.http.router",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http."
                                "router.v3.Router"
                            },
                        }
                    ],
                },
            }
        ],
    }


def _service_listener(port: int, cluster: str) -> Json:
    """Istio's per-service-port outbound listener, reached only through virtualOutbound."""
    return {
        "name": f"0.0.0.0_{port}",
        "address": _address("0.0.0.0", port),
        "bind_to_port": False,
        "listener_filters": [_HTTP_INSPECTOR],
        "filter_chains": [_http_chain(f"outbound_0.0.0.0_{port}", cluster)],
        "default_filter_chain": _passthrough_chain(),
    }


def _virtual_inbound() -> Json:
    """Istio's virtualInbound: the original destination restored by the listener
    filter, the http_inspector disabled for connections to the listener's own port,
    HTTP and TCP passed to the original destination from 127.0.0.6."""
    inspector = dict(_HTTP_INSPECTOR)
    inspector["filter_disabled"] = {
        "destination_port_range": {"start": INBOUND_PORT, "end": INBOUND_PORT + 1}
    }
    passthrough = _passthrough_chain()
    passthrough["filters"][0]["typed_config"]["cluster"] = "InboundPassthroughCluster"
    return {
        "name": "virtualInbound",
        "address": _address("0.0.0.0", INBOUND_PORT),
        "listener_filters": [
            {
                "name": "envoy.filters.listener.original_dst",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.listener."
                    "original_dst.v3.OriginalDst"
                },
            },
            inspector,
        ],
        "filter_chains": [_http_chain("inbound_http", "InboundPassthroughCluster")],
        "default_filter_chain": passthrough,
    }


def sidecar_bootstrap(admin_port: int, a: tuple[str, int], c_port: int) -> Json:
    return {
        "admin": {"address": _address("127.0.0.1", admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "virtualOutbound",
                    "address": _address("0.0.0.0", OUTBOUND_PORT),
                    "use_original_dst": True,
                    "filter_chains": [_passthrough_chain()],
                },
                _service_listener(SERVICE_PORT, "a"),
                _service_listener(c_port, "PassthroughCluster"),
                _virtual_inbound(),
            ],
            "clusters": [
                {
                    "name": "a",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "a",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(*a)}}]}],
                    },
                },
                {
                    "name": "PassthroughCluster",
                    "type": "ORIGINAL_DST",
                    "lb_policy": "CLUSTER_PROVIDED",
                    "connect_timeout": "1s",
                },
                {
                    "name": "InboundPassthroughCluster",
                    "type": "ORIGINAL_DST",
                    "lb_policy": "CLUSTER_PROVIDED",
                    "connect_timeout": "1s",
                    "upstream_bind_config": {
                        "source_address": {"address": "127.0.0.6", "port_value": 0}
                    },
                },
            ],
        },
    }


def _run(*cmd: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(f"{' '.join(cmd)}: {result.stderr.strip()}", file=sys.stderr)
        sys.exit(SETUP_FAILED)


def set_up_namespace(outbound_port: int = OUTBOUND_PORT, inbound: bool = False) -> None:
    # ip and iptables live in the sbin directories, not always on a CI's PATH.
    os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    if shutil.which("iptables") is None:
        print("iptables is not installed (`make install-test` installs it)", file=sys.stderr)
        sys.exit(SETUP_FAILED)
    _run("ip", "link", "set", "lo", "up")
    for address in (SERVICE_ADDRESS, UPSTREAM_ADDRESS, WORKLOAD_ADDRESS):
        _run("ip", "addr", "add", f"{address}/32", "dev", "lo")
    # istio-iptables' ISTIO_OUTPUT: the proxy's own connections (its uid) are left
    # alone, everyone else's to the mesh goes to the proxy's outbound port.
    _run(
        "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", MESH_RANGE,
        "-m", "owner", "!", "--uid-owner", str(PROXY_UID),
        "-j", "REDIRECT", "--to-ports", str(outbound_port),
    )  # fmt: skip
    if inbound:
        # ISTIO_INBOUND stands for the workload's address here: in a pod that is
        # PREROUTING; this client is local, so OUTPUT again.
        _run(
            "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", WORKLOAD_RANGE,
            "-m", "owner", "!", "--uid-owner", str(PROXY_UID),
            "-j", "REDIRECT", "--to-ports", str(INBOUND_PORT),
        )  # fmt: skip


def fetch(url: str, host: str | None = None) -> Json:
    """GET ``url`` with curl as the client user (``host``: its Host header): status,
    x-upstream, and whether the upstream saw the proxy's x-request-id (its echo of the
    request)."""
    extra = ["-H", f"Host: {host}"] if host else []
    out = subprocess.run(
        [
            "setpriv", f"--reuid={CLIENT_UID}", f"--regid={CLIENT_UID}", "--clear-groups",
            "curl", "-s", "-i", "--max-time", "5", *extra, url,
        ],
        capture_output=True,
        check=False,
    )  # fmt: skip
    if out.returncode != 0:
        return {"curl_exit": out.returncode}
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    facts: Json = {"status": int(lines[0].split()[1]), "upstream": headers.get("x-upstream")}
    if headers.get("content-type") == "application/json":
        echo = json.loads(body)
        facts["up.has:x-request-id"] = any(k == "x-request-id" for k, _ in echo["headers"])
        facts["up.peer_ip"] = echo["peer_ip"]
    return facts


def main() -> None:
    kind, envoy, workdir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    set_up_namespace(inbound=True)
    ups = {
        "a": HttpUpstream("a").start(),
        "b": HttpUpstream("b", host=UPSTREAM_ADDRESS).start(),
        "c": HttpUpstream("c", host=UPSTREAM_ADDRESS).start(),
        "workload": HttpUpstream("workload", host=WORKLOAD_ADDRESS).start(),
    }
    b_port, c_port = ups["b"].port, ups["c"].port
    bootstrap = sidecar_bootstrap(19000, ups["a"].address, c_port)
    proxy: ProxyProcess
    if kind == "envoy":
        proxy = EnvoyProcess(envoy, bootstrap, workdir, concurrency=1)
    else:
        proxy = EnvoyxProcess(bootstrap, workdir, concurrency=1)
    names = {
        "listener.0.0.0.0_15001.downstream_cx_total": "virtualOutbound connections",
        f"listener.0.0.0.0_{SERVICE_PORT}.downstream_cx_total": "service listener connections",
        f"listener.0.0.0.0_{c_port}.downstream_cx_total": "passthrough HTTP listener connections",
        "cluster.a.upstream_rq_total": "cluster a requests",
        "cluster.PassthroughCluster.upstream_cx_total": "PassthroughCluster connections",
        "http_inspector.http11_found": "http_inspector http11_found",
        f"listener.0.0.0.0_{INBOUND_PORT}.downstream_cx_total": "virtualInbound connections",
        "cluster.InboundPassthroughCluster.upstream_cx_total": "inbound passthrough connections",
    }
    proxy.start()
    try:
        before = proxy.stats()
        facts = {
            "service": fetch(f"http://{SERVICE_ADDRESS}:{SERVICE_PORT}/svc"),
            "tcp passthrough": fetch(f"http://{UPSTREAM_ADDRESS}:{b_port}/raw"),
            "http passthrough": fetch(f"http://{UPSTREAM_ADDRESS}:{c_port}/http"),
            "inbound": fetch(f"http://{WORKLOAD_ADDRESS}:{ups['workload'].port}/in"),
        }
        expected = {
            "listener.0.0.0.0_15001.downstream_cx_total": 1,
            f"listener.0.0.0.0_{SERVICE_PORT}.downstream_cx_total": 1,
            f"listener.0.0.0.0_{c_port}.downstream_cx_total": 1,
            "cluster.a.upstream_rq_total": 1,
            "cluster.PassthroughCluster.upstream_cx_total": 2,
            "http_inspector.http11_found": 3,
            f"listener.0.0.0.0_{INBOUND_PORT}.downstream_cx_total": 1,
            "cluster.InboundPassthroughCluster.upstream_cx_total": 1,
        }
        seen = proxy.wait_stats(expected, before)
        stats = {names[k]: v for k, v in seen.items()}
        # Connections seen by the upstreams from the client's redirected requests:
        # every request reached its upstream through the proxy.
        upstream_requests = {n: len(u.requests) for n, u in ups.items()}
    finally:
        proxy.stop()
        for u in ups.values():
            u.stop()
    print(json.dumps({"facts": facts, "stats": stats, "upstream_requests": upstream_requests}))


if __name__ == "__main__":
    main()
