"""The sidecar process: ``kizuna proxy --bootstrap FILE`` (or ``python -m kizuna.proxy.main FILE``).

Runs one ``Sidecar`` on uvloop until SIGTERM or SIGINT, then withdraws its endpoint from the mesh, stops
listening, lets requests in flight finish and exits 0. Imports nothing heavier than the proxy itself: no
pydantic, no YAML, no control plane.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import signal
import sys

import uvloop

from kizuna.proxy.sidecar import Sidecar
from kizuna.proxyconfig.bootstrap import Bootstrap


def run(bootstrap_path: str) -> int:
    """Run a sidecar from its bootstrap file; returns the process exit code."""
    try:
        bootstrap = Bootstrap.load(bootstrap_path)
        if bootstrap.credential_file and not bootstrap.credential:
            # The credential lives apart from the bootstrap, private to this workload (see Bootstrap).
            with open(bootstrap.credential_file) as source:
                bootstrap = dataclasses.replace(bootstrap, credential=source.read().strip())
    except (OSError, ValueError, KeyError) as exc:
        print(f"kizuna proxy: cannot read bootstrap {bootstrap_path}: {exc}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(bootstrap))


async def serve(bootstrap: Bootstrap) -> int:
    """Start the sidecar, wait for a stop signal, stop it gracefully."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    sidecar = Sidecar(bootstrap)
    try:
        await sidecar.start()
    except (OSError, ValueError) as exc:
        print(f"kizuna proxy: cannot start: {exc}", file=sys.stderr)
        await sidecar.stop(drain=0)
        return 1
    node = bootstrap.node
    serving = (f"gateway {sidecar.gateway.describe()}" if sidecar.gateway is not None
               else f"outbound {node.mesh_address}:{bootstrap.outbound_port}")
    print(f"kizuna proxy {node.id}: {serving}, admin {node.mesh_address}:{bootstrap.admin_port}, "
          f"config {sidecar.version or '(none)'}", file=sys.stderr, flush=True)
    # Start-up objects live for the whole process: keep the collector from scanning them again and again,
    # and let it run less often (the request path makes few reference cycles).
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    await stopping.wait()
    await sidecar.terminate()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m kizuna.proxy.main BOOTSTRAP.json", file=sys.stderr)
        sys.exit(2)
    sys.exit(run(sys.argv[1]))
