"""istiod's REDIRECT sidecar config with real traffic capture, inside a private network
namespace (``unshare --net``, as tests/support/redirect.py): istiod, the upstreams v1
and v2, the proxy (Envoy 1.40 or envoyx) with a ``sidecar~`` node whose interception
is REDIRECT, and Istio's nat OUTPUT rule sending the client's traffic to the mesh range
to the mesh's proxyListenPort (istiod's ``virtualOutbound``).

    unshare --net -- python tests/support/istio_redirect.py KIND MODE ENVOY PILOT WORKDIR

The client (curl as ``nobody``) connects to 10.10.0.1:<service port> with the
VirtualService's Host: virtualOutbound restores the original destination and hands the
connection to istiod's ``bind_to_port: false`` listener 0.0.0.0_<service port>, whose
RDS route sends ``web.example`` to v1; then the VirtualService is rewritten (``/`` to
v2, ``/v1`` to v1) and both routes must be in force. Prints one JSON object (traffic
facts, NACKs, the listeners' connection counts); exit code 3 when the namespace cannot
be set up.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from support.envoy import EnvoyProcess
from support.istio import (
    Istiod,
    MeshFiles,
    in_sync,
    istio_bootstrap,
    proxy_id,
    sidecar_node,
)
from support.proxy import EnvoyxProcess, ProxyProcess
from support.redirect import SERVICE_ADDRESS, fetch, set_up_namespace
from support.upstreams import HttpUpstream
from support.wait import Timeout, free_port, until

Json = dict[str, Any]
API_TYPES = {"ads": "GRPC", "delta-ads": "DELTA_GRPC"}
TIMEOUT_S = 20.0


def main() -> None:
    kind, mode = sys.argv[1], sys.argv[2]
    envoy, pilot, workdir = Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5])
    workdir.mkdir(parents=True, exist_ok=True)
    ups = {name: HttpUpstream(name).start() for name in ("v1", "v2")}
    files = MeshFiles(
        folder=workdir / "istio-config",
        upstreams={name: u.port for name, u in ups.items()},
        gateway_port=free_port(),
        service_port=free_port(),
    )
    files.write_all({"/": "v1"})
    istiod = Istiod(pilot, workdir / "istiod", files.folder)
    set_up_namespace(istiod.outbound_port)
    node = sidecar_node("REDIRECT")
    bootstrap = istio_bootstrap(
        node=node, admin_port=free_port(), xds_port=istiod.xds_port, api_type=API_TYPES[mode]
    )
    proxy: ProxyProcess
    if kind == "envoy":
        proxy = EnvoyProcess(envoy, bootstrap, workdir / "proxy")
    else:
        proxy = EnvoyxProcess(bootstrap, workdir / "proxy")
    url = f"http://{SERVICE_ADDRESS}:{files.service_port}"
    host = f"{files.host}:{files.service_port}"
    out: Json = {}
    try:
        istiod.wait_ready()
        proxy.start()
        until(
            lambda: in_sync(istiod.sync_of(proxy_id(node))),
            timeout=TIMEOUT_S,
            interval=0.1,
            what="the proxy in sync with istiod",
        )
        before = proxy.stats()

        def reaches(path: str, upstream: str) -> Json:
            seen: list[Json] = [{}]

            def check() -> bool:
                seen[0] = fetch(url + path, host)
                return seen[0].get("upstream") == upstream

            with contextlib.suppress(Timeout):
                until(check, timeout=TIMEOUT_S, interval=0.2, what=f"{path} -> {upstream}")
            return seen[0]

        out["first"] = reaches("/", "v1")
        files.set_routes({"/v1": "v1", "/": "v2"})
        out["after change /"] = reaches("/", "v2")
        out["after change /v1/x"] = reaches("/v1/x", "v1")
        after = proxy.stats()
        out["connections"] = {
            name: after.get(stat, 0) - before.get(stat, 0)
            for name, stat in (
                ("virtualOutbound", f"listener.0.0.0.0_{istiod.outbound_port}.downstream_cx_total"),
                ("service listener", f"listener.0.0.0.0_{files.service_port}.downstream_cx_total"),
            )
        }
        out["nacks"] = [str(n) for n in istiod.nacks()]
    except (AssertionError, Timeout) as e:
        out["error"] = str(e)[-3000:]
        out["proxy log"] = proxy.log_text()[-3000:] if proxy.proc is not None else ""
    finally:
        if proxy.proc is not None:
            proxy.stop()
        istiod.stop()
        for u in ups.values():
            u.stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
