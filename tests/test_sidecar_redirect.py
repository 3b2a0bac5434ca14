"""A sidecar behind a real iptables REDIRECT (issue 12), Envoy 1.40 and envoyx alike.

Each proxy runs with its client and upstreams in a private network namespace
(``unshare --net``; tests/support/redirect.py sets it up: loopback, two service
addresses, Istio's nat OUTPUT rule redirecting the client's mesh traffic to the
proxy's port 15001, the proxy's own connections excluded by uid). The client connects
to each service's real address and port:

- 10.10.0.1:9080, where nothing listens: ``virtualOutbound`` (``use_original_dst``)
  restores the original destination and hands the connection to the
  ``bind_to_port: false`` listener 0.0.0.0:9080, whose HTTP route reaches upstream a
  (which sees the proxy's ``x-request-id``);
- 10.10.0.2:<b>, where b listens and no listener of the proxy is: virtualOutbound's
  own tcp_proxy chain passes the bytes to the ORIGINAL_DST ``PassthroughCluster``,
  which connects to the original destination (b sees no proxy header);
- 10.10.0.2:<c>: handed off to 0.0.0.0:<c>, an HTTP listener routing to the
  PassthroughCluster (Istio's HTTP passthrough), so c sees the proxy's headers.

- 10.10.1.1:<workload>, a workload behind the sidecar: redirected to Istio's
  ``virtualInbound`` (15006): the ``original_dst`` listener filter restores the
  destination, the http_inspector (``filter_disabled`` for port 15006, evaluated on the
  restored address) finds HTTP, and the ORIGINAL_DST ``InboundPassthroughCluster``
  connects from its ``upstream_bind_config`` source 127.0.0.6, which the workload sees.

The stats say which listener took each connection: a handed-off connection counts on
the listener that serves it, not on virtualOutbound, as in Envoy.

Needs root (CAP_SYS_ADMIN for the namespace, CAP_NET_ADMIN for its nat table) and
iptables (``make install-test`` installs it); without them the test fails saying so.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.envoy

SCRIPT = Path(__file__).parent / "support" / "redirect.py"
_PROXIED = {"status": 200, "up.has:x-request-id": True}
EXPECTED_FACTS = {
    # Upstream a is the STATIC cluster's 127.0.0.1; b and c listen on 10.10.0.2.
    "service": {**_PROXIED, "upstream": "a", "up.peer_ip": "127.0.0.1"},
    "tcp passthrough": {
        "status": 200,
        "upstream": "b",
        "up.has:x-request-id": False,
        "up.peer_ip": "10.10.0.2",
    },
    "http passthrough": {**_PROXIED, "upstream": "c", "up.peer_ip": "10.10.0.2"},
    "inbound": {**_PROXIED, "upstream": "workload", "up.peer_ip": "127.0.0.6"},
}
EXPECTED_STATS = {
    "virtualOutbound connections": 1,
    "service listener connections": 1,
    "passthrough HTTP listener connections": 1,
    "cluster a requests": 1,
    "PassthroughCluster connections": 2,
    "http_inspector http11_found": 3,
    "virtualInbound connections": 1,
    "inbound passthrough connections": 1,
}

_ENVOY: dict[str, Any] = {}


def run_in_namespace(kind: str, envoy_binary: Path, workdir: Path) -> dict[str, Any]:
    command = ["unshare", "--net", "--", sys.executable, str(SCRIPT), kind]
    result = subprocess.run(
        [*command, str(envoy_binary), str(workdir)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(
            f"the iptables REDIRECT test needs root (a private network namespace with its "
            f"own nat table: CAP_SYS_ADMIN and CAP_NET_ADMIN) and iptables; "
            f"{' '.join(command)} exited {result.returncode}:\n"
            f"{result.stderr[-4000:]}",
            pytrace=False,
        )
    out: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


@pytest.mark.parametrize("kind", ["envoy", "envoyx"])
def test_redirected_connections_reach_the_services_through_the_proxy(
    kind: str, envoy_binary: Path, tmp_path: Path
) -> None:
    if "result" not in _ENVOY:
        _ENVOY["result"] = run_in_namespace("envoy", envoy_binary, tmp_path / "envoy")
    envoy = _ENVOY["result"]
    assert envoy["facts"] == EXPECTED_FACTS
    assert envoy["stats"] == EXPECTED_STATS
    assert envoy["upstream_requests"] == {"a": 1, "b": 1, "c": 1, "workload": 1}
    if kind == "envoy":
        return
    envoyx = run_in_namespace("envoyx", envoy_binary, tmp_path / "envoyx")
    assert envoyx == envoy
