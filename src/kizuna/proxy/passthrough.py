"""Connections to where the app meant to go, for traffic the mesh does not know (Istio's PassthroughCluster and
InboundPassthroughCluster), and the source address that keeps the sidecar's own local traffic from being
captured again.

With iptables capture the sidecar forwards inbound traffic to the app on the pod address. The pod's rules
redirect sidecar traffic to its own pod address back to the inbound capture port, except traffic from
``127.0.0.6`` (``-o lo -s 127.0.0.6/32 -j RETURN``): Istio's inbound passthrough source. So every connection
this sidecar opens to its own pod address binds that source (``SourcePool``, ``CapturePoolRegistry``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Final, TypeVar

from kizuna.proxy.pool import C, ClientTls, EndpointPool, PoolRegistry
from kizuna.proxy.state import NO_RETRY_RULES, ClusterState, Destination, ProxyState
from kizuna.proxy.stats import Stats
from kizuna.proxy.upstream import UpstreamConnection
from kizuna.proxyconfig.model import Cluster

INBOUND_PASSTHROUGH_SOURCE: Final = "127.0.0.6"
"""Istio's source address for sidecar → app connections; the capture rules RETURN it."""
PASSTHROUGH_CLUSTER: Final = "PassthroughCluster"
"""Envoy/Istio's name for "the original destination, untouched" (ALLOW_ANY); its responses count under it."""
PASSTHROUGH_CONNECT_TIMEOUT: Final = 10.0
MAX_PASSTHROUGH_DESTINATIONS: Final = 256

P = TypeVar("P", bound=asyncio.BaseProtocol)


class SourcePool(EndpointPool[C]):
    """An endpoint pool whose connections leave from a fixed source address."""

    __slots__ = ("source",)

    def __init__(self, address: str, port: int, source: str) -> None:
        super().__init__(address, port)
        self.source = source

    async def connect(self, factory: Callable[[], P], timeout: float) -> P:
        """Open a new connection from ``source``; raises OSError or TimeoutError."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            _, protocol = await loop.create_connection(factory, self.address, self.port,
                                                       local_addr=(self.source, 0))
        return protocol


class CapturePoolRegistry(PoolRegistry[C]):
    """Pools as usual, except that pools to ``local`` addresses (the pod's own) bind ``source``."""

    __slots__ = ("local", "source")

    def __init__(self, local: Iterable[str], source: str = INBOUND_PASSTHROUGH_SOURCE,
                 tls: ClientTls | None = None) -> None:
        super().__init__(tls)
        self.local = frozenset(local)
        self.source = source

    def get(self, address: str, port: int, identity: str = "") -> EndpointPool[C]:
        """The pool for an endpoint, created on first use (to the pod's own addresses: plaintext)."""
        if address not in self.local:
            return super().get(address, port, identity)
        key = (address, port)
        pool = self.pools.get(key)
        if pool is None or pool.draining:
            pool = self.pools[key] = SourcePool(address, port, self.source)
        return pool


class Passthrough:
    """HTTP destinations for original destinations the mesh has no service for, one per (address, port),
    remembered for the snapshot in use (a new snapshot drains their pools like any other left behind)."""

    __slots__ = ("pools", "stats", "_state", "_destinations")

    def __init__(self, pools: PoolRegistry[UpstreamConnection], stats: Stats) -> None:
        self.pools = pools
        self.stats = stats
        self._state: ProxyState | None = None
        self._destinations: dict[tuple[str, int], Destination] = {}

    def destination(self, state: ProxyState, address: str, port: int) -> Destination:
        """Where a request to ``address:port`` goes: there, without retries (the mesh knows nothing of it)."""
        if state is not self._state:
            self._state = state
            self._destinations = {}
        key = (address, port)
        dest = self._destinations.get(key)
        if dest is None:
            if len(self._destinations) >= MAX_PASSTHROUGH_DESTINATIONS:
                self._destinations.clear()
            cluster = Cluster(PASSTHROUGH_CLUSTER, PASSTHROUGH_CLUSTER, port, "", "http", "ROUND_ROBIN", (),
                              PASSTHROUGH_CONNECT_TIMEOUT)
            pool = self.pools.get(address, port)
            dest = self._destinations[key] = Destination(ClusterState(cluster, [pool], self.stats), None,
                                                         NO_RETRY_RULES)
        return dest
