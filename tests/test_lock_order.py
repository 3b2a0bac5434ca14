"""No deadlock between Python threads and the core's locks (DESIGN.md §2).

One thread applies listeners with Python filters (building them needs the GIL) while
others read stats and the config dump (which wait on core locks). Before the fix the
core built the filters holding its listener lock while a stats call held the GIL and
waited for that lock: the process hung forever. A hang cannot be interrupted from
inside the hung interpreter, so the scenario runs in a child process with a deadline.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).parent

SCENARIO = textwrap.dedent(
    """
    import sys, threading, urllib.request
    import envoyx

    TS = "type.googleapis.com/xds.type.v3.TypedStruct"
    HCM = ("type.googleapis.com/envoy.extensions.filters.network."
           "http_connection_manager.v3.HttpConnectionManager")
    ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"

    def listener(i):
        return {
            "name": f"l{i % 4}",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": HCM, "stat_prefix": f"l{i}",
                    "route_config": {"virtual_hosts": [{
                        "name": "all", "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"},
                                    "direct_response": {"status": 200}}]}]},
                    "http_filters": [
                        {"name": "py", "typed_config": {
                            "@type": TS, "type_url": "envoyx.filters.http.python",
                            "value": {"module": "filters_fixtures.sample_filters",
                                      "class": "HeaderEdit", "config": {"n": i}}}},
                        {"name": "envoy.filters.http.router",
                         "typed_config": {"@type": ROUTER}},
                    ],
                },
            }]}],
        }

    rounds = int(sys.argv[1])
    bootstrap = {"admin": {"address": {"socket_address":
                 {"address": "127.0.0.1", "port_value": 0}}}}
    with envoyx.Server(bootstrap, concurrency=1) as server:
        host, port = server.admin_address()
        stop = threading.Event()
        errors = []

        def updater():
            try:
                for i in range(rounds):
                    server.update(listeners=[listener(i)])
            except BaseException as e:
                errors.append(e)
            finally:
                stop.set()

        def reader(kind):
            try:
                while not stop.is_set():
                    if kind == "stats":
                        server.stats()
                    elif kind == "dump":
                        server.config_dump()
                    else:
                        urllib.request.urlopen(f"http://{host}:{port}/stats", timeout=10).read()
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=updater)] + [
            threading.Thread(target=reader, args=(k,)) for k in ("stats", "dump", "admin")
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        assert len(server.listener_addresses()) == 4, server.listener_addresses()
    print("ok")
    """
)


def test_update_with_python_filters_while_reading_stats_never_deadlocks() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCENARIO, "200"],
        cwd=TESTS,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
