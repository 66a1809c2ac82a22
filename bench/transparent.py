"""The transparent path: the kizuna 2-hop path with each side in its own network namespace, captured by iptables.

::

    transparent   client (netns A) ─REDIRECT─► kizuna sidecar A (:15001) ─► VIP routed by Host to pod B:8080
                  ─REDIRECT─► kizuna sidecar B (:15006) ─► origin (netns B, pod B:8080)

The same request as the other paths, sent by the same load tools, run inside namespace A (``ip netns exec``)
to the Service VIP: what an app that knows nothing about the mesh does. The namespaces, bridge and rules are
the runtime's own (``kizuna.runtime.netns`` / ``capture``); the sidecars run on static snapshots
(``kizuna.testing.mesh.transparent_snapshots``), as UID 1337, without a control plane. Its own origin (HAProxy,
same config) runs in namespace B. Everything is removed when the path is done (``cleanup``), also on failure.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from bench.paths import (
    HAPROXY,
    SERVICE,
    SERVICE_PORT,
    START_TIMEOUT,
    Layout,
    PathUnderTest,
    render_haproxy,
)
from bench.procs import Processes, Started, log_tail

MESH = "bench1"
"""Names the bench's host objects: bridge ``kzbench1``, namespaces ``kzbench1-0`` and ``kzbench1-1``."""
ORIGIN_PORT = 8080
REPO = Path(__file__).resolve().parent.parent


def transparent_unavailable() -> str | None:
    """Why the transparent path cannot run here (root, ip, iptables), or None."""
    from kizuna.runtime.modes import missing_capability

    return missing_capability()


def cleanup() -> None:
    """Remove the bench's namespaces, veths, bridge and chains (idempotent)."""
    from kizuna.runtime.netns import Names, teardown

    teardown(Names(MESH))


def start_transparent(procs: Processes, layout: Layout, workdir: Path,
                      cpus: frozenset[int] | None) -> PathUnderTest:
    """Namespaces A (client) and B (server), capture in both, two sidecars and an origin in B."""
    from kizuna.proxyconfig.bootstrap import Bootstrap, Node
    from kizuna.runtime import capture, netns
    from kizuna.testing.mesh import transparent_snapshots

    cleanup()
    names = netns.Names(MESH)
    used = netns.used_networks()
    pods = netns.choose_range(MESH, netns.POD_BLOCK, used)
    vip = str(netns.choose_range(MESH, netns.SERVICE_BLOCK, [*used, pods])[10])
    gateway, client_pod, server_pod = (str(pods[i]) for i in (1, 2, 3))
    netns.create_bridge(names, gateway, pods.prefixlen)
    netns.isolate_forward(names)
    client_ns, server_ns = names.netns(0), names.netns(1)
    for index, address in ((0, client_pod), (1, server_pod)):
        netns.create_pod(names, index, address, pods.prefixlen, gateway)
        capture.apply_rules(names.netns(index), capture.capture_rules(capture.CaptureSpec()))

    body = workdir / "body-1k.txt"  # written by start_origin for the shared origin
    cfg = render_haproxy("haproxy-origin.cfg.tmpl", workdir / "haproxy-origin-netns.cfg",
                         bind=f"{server_pod}:{ORIGIN_PORT}", body_file=str(body))
    origin = procs.start("origin-haproxy-netns", ["ip", "netns", "exec", server_ns, HAPROXY, "-db", "-f",
                                                  str(cfg)], cpus)

    client_snap, server_snap = transparent_snapshots(client_pod, server_pod,
                                                     [(SERVICE, SERVICE_PORT, vip, ORIGIN_PORT, "http")])
    run_dir = netns.prepare_run_dir(names)
    started = []
    for role, ns, pod, snap in (("server", server_ns, server_pod, server_snap),
                                ("client", client_ns, client_pod, client_snap)):
        snap_file = run_dir / f"{role}-snapshot.json"
        snap_file.write_text(json.dumps(snap.to_json()))
        boot_file = run_dir / f"{role}-bootstrap.json"
        node = Node(id=f"bench-{role}-0.default", workload=f"bench-{role}", pod_address=pod, mesh_address=pod,
                    ports=(ORIGIN_PORT,) if role == "server" else ())
        Bootstrap(node=node, static_snapshot=str(snap_file), capture="iptables").dump(boot_file)
        for path in (snap_file, boot_file):
            path.chmod(0o644)
        argv = ["ip", "netns", "exec", ns, "setpriv", "--reuid", str(capture.PROXY_UID), "--regid",
                str(capture.PROXY_GID), "--clear-groups", sys.executable, "-m", "kizuna", "proxy",
                "--bootstrap", str(boot_file)]
        started.append(procs.start(f"transparent-{role}-sidecar", argv, cpus))
    server, client = started
    entry = (vip, SERVICE_PORT)
    # The VIP means something only inside a captured namespace: check the path from inside A.
    _wait_serving_from(client_ns, entry, [client, server, origin])
    path = PathUnderTest("transparent", entry, [client, server],
                         notes=f"client (netns) -> VIP {vip}:{SERVICE_PORT} captured -> kizuna outbound (:15001) "
                               "-> captured -> kizuna inbound (:15006) -> origin (netns)")
    path.netns = client_ns
    path.origin = origin
    return path


_PROBE = """
import sys
from bench.paced import EXPECTED_BODY, probe, request_bytes
from bench.paths import HOST_HEADER, TARGET
status, body = probe(sys.argv[1], int(sys.argv[2]), request_bytes(TARGET, HOST_HEADER))
sys.exit(0 if status == 200 and body == EXPECTED_BODY else 1)
"""


def _wait_serving_from(ns: str, entry: tuple[str, int], procs: list[Started]) -> None:
    """Send the benchmark request from inside ``ns`` until it comes back right."""
    deadline = time.monotonic() + START_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited ({p.popen.returncode}) while starting the transparent "
                                   f"path:\n{log_tail(p)}")
        done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", _PROBE, entry[0], str(entry[1])],
                              capture_output=True, text=True, timeout=30, cwd=REPO)
        if done.returncode == 0:
            return
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        time.sleep(0.2)
    logs = "\n".join(f"--- {p.name}\n{log_tail(p)}" for p in procs)
    raise TimeoutError(f"the transparent path did not serve the benchmark request in {START_TIMEOUT:.0f}s "
                       f"({last})\n{logs}")
