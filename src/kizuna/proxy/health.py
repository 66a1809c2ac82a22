"""Is the app ready? The sidecar probes it as the kubelet would and reports each change.

``bootstrap.readiness`` with a path: HTTP GET on ``pod_address:port`` expecting 2xx or 3xx; without a path: a
TCP connect. No probe but container ports: a TCP connect to the first port. Neither: the app counts as ready.
With iptables capture the probe leaves from ``source`` (127.0.0.6, as Istio's agent probes), which the capture
rules let through, so probes are not counted as inbound traffic.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from kizuna.proxyconfig.bootstrap import Node, ReadinessProbe


class ReadinessProber:
    """Probes every ``period`` seconds and calls ``on_change(ready)`` when the answer changes."""

    def __init__(self, node: Node, probe: ReadinessProbe | None, on_change: Callable[[bool], None],
                 source: str | None = None) -> None:
        if probe is None and node.ports:
            probe = ReadinessProbe(port=node.ports[0])
        self.address = node.pod_address
        self.local_addr = (source, 0) if source else None
        self.probe = probe
        self.on_change = on_change
        self.ready = False

    async def run(self) -> None:
        """Probe forever (until cancelled)."""
        probe = self.probe
        if probe is None:
            self._report(True)
            return
        while True:
            self._report(await self.check())
            await asyncio.sleep(probe.period)

    async def check(self) -> bool:
        """One probe: True when the app answers as a ready app would."""
        probe = self.probe
        if probe is None:
            return True
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(probe.timeout):
                reader, writer = await asyncio.open_connection(self.address, probe.port,
                                                              local_addr=self.local_addr)
                if probe.path is None:
                    return True
                writer.write(f"GET {probe.path} HTTP/1.1\r\nHost: {self.address}:{probe.port}\r\n"
                             "User-Agent: kizuna-probe\r\nConnection: close\r\n\r\n".encode())
                status_line = await reader.readline()
            status = int(status_line.split()[1])
            return 200 <= status < 400
        except (OSError, TimeoutError, ValueError, IndexError):
            return False
        finally:
            if writer is not None:
                writer.close()

    def _report(self, ready: bool) -> None:
        if ready != self.ready:
            self.ready = ready
            self.on_change(ready)
