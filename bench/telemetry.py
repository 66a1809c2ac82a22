"""The ``kizuna-no-telemetry`` path: the ``kizuna`` path's two sidecars with Istio metrics recording turned off
(``Bootstrap.telemetry = False``), so the report can set telemetry's cost against the 10% target (saturation
throughput with telemetry on / off >= 0.9)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from bench.paths import (
    START_TIMEOUT,
    Layout,
    PathUnderTest,
    kizuna_proxy_argv,
    wait_until_serving,
    write_kizuna_bootstraps,
)
from bench.procs import Processes, wait_for_port

NAME = "kizuna-no-telemetry"


def start_kizuna_no_telemetry(procs: Processes, layout: Layout, workdir: Path,
                              cpus: frozenset[int] | None) -> PathUnderTest:
    """As ``start_kizuna``, on addresses of its own, with telemetry off in both bootstraps."""
    from kizuna.proxyconfig.bootstrap import Bootstrap

    client_mesh, client_pod, server_mesh = f"{layout.net}.51", f"{layout.net}.14", f"{layout.net}.52"
    server_boot, client_boot, inbound = write_kizuna_bootstraps(
        layout, workdir, addresses=(client_mesh, client_pod, server_mesh), prefix=NAME)
    for boot in (server_boot, client_boot):
        replace(Bootstrap.load(boot), telemetry=False).dump(boot)
    server = procs.start(f"{NAME}-server-sidecar", kizuna_proxy_argv(server_boot), cpus)
    client = procs.start(f"{NAME}-client-sidecar", kizuna_proxy_argv(client_boot), cpus)
    outbound = Bootstrap.load(client_boot).outbound_port
    wait_for_port(server_mesh, inbound, START_TIMEOUT, server)
    wait_for_port(client_mesh, outbound, START_TIMEOUT, client)
    wait_until_serving((client_mesh, outbound), f"the {NAME} path", [client, server])
    return PathUnderTest(NAME, (client_mesh, outbound), [client, server],
                         notes="as kizuna, with Istio metrics recording off in both sidecars")
