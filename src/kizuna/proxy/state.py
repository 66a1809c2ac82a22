"""What a sidecar derives from one snapshot, built once per ``apply`` and then only read.

A request captures the ``ProxyState`` current when it starts and keeps it to the end, so a config swap never
changes a request's route, cluster or policy halfway.
"""

from __future__ import annotations

from typing import Final

from kizuna.proxy.balancer import Balancer, make_balancer, pick_weighted
from kizuna.proxy.pool import EndpointPool, PoolRegistry
from kizuna.proxy.retry import RetryRules
from kizuna.proxy.router import Router
from kizuna.proxy.stats import Stats
from kizuna.proxy.upstream import UpstreamConnection
from kizuna.proxyconfig.model import NO_RETRY, Cluster, InboundPort, Route, Snapshot

Pool = EndpointPool[UpstreamConnection]


class ClusterState:
    """A cluster's endpoints as pools, its balancer and its response counters."""

    __slots__ = ("name", "cluster", "balancer", "counters", "connect_timeout")

    def __init__(self, cluster: Cluster, pools: list[Pool], stats: Stats) -> None:
        self.name = cluster.name
        self.cluster = cluster
        self.balancer: Balancer[Pool] = make_balancer(cluster.lb_policy, pools)
        self.counters = stats.cluster_counters(cluster.name)
        self.connect_timeout = cluster.connect_timeout


class Destination:
    """Where a routed request goes: a cluster, with the route's timeout and retry rules."""

    __slots__ = ("cluster", "timeout", "retry")

    def __init__(self, cluster: ClusterState, timeout: float | None, retry: RetryRules) -> None:
        self.cluster = cluster
        self.timeout = timeout or None
        self.retry = retry


class InboundTarget:
    """An inbound listener's settings and the local app it forwards to."""

    __slots__ = ("port", "protocol", "destination")

    def __init__(self, port: InboundPort, destination: Destination) -> None:
        self.port = port
        self.protocol = port.protocol
        self.destination = destination


NO_RETRY_RULES: Final = RetryRules(NO_RETRY)
INBOUND_CONNECT_TIMEOUT: Final = 5.0


class ProxyState:
    """Router, clusters and inbound targets of one snapshot."""

    __slots__ = ("snapshot", "router", "clusters", "inbound", "_routes", "_single")

    def __init__(self, snapshot: Snapshot, pools: PoolRegistry[UpstreamConnection], stats: Stats) -> None:
        self.snapshot = snapshot
        self.router = Router(snapshot)
        self.clusters = {c.name: ClusterState(c, [pools.get(e.address, e.port) for e in c.endpoints], stats)
                         for c in snapshot.clusters}
        # Per route: cluster name -> Destination, so a request only draws the weighted choice; a route with
        # one cluster has its Destination ready (None when that cluster is missing).
        self._routes: dict[int, dict[str, Destination]] = {}
        self._single: dict[int, Destination | None] = {}
        for vh in snapshot.virtual_hosts:
            for route in vh.routes:
                rules = RetryRules(route.action.retry)
                dests = self._routes[id(route)] = {
                    wc.cluster: Destination(self.clusters[wc.cluster], route.action.timeout, rules)
                    for wc in route.action.clusters if wc.cluster in self.clusters}
                if len(route.action.clusters) == 1:
                    self._single[id(route)] = dests.get(route.action.clusters[0].cluster)
        self.inbound: dict[int, InboundTarget] = {}
        for port in snapshot.inbound:
            name = f"inbound|{port.port}||"
            local = Cluster(name, name, port.target_port, "", port.protocol, "ROUND_ROBIN", (),
                            connect_timeout=INBOUND_CONNECT_TIMEOUT)
            cluster = ClusterState(local, [pools.get(port.target_address, port.target_port)], stats)
            self.inbound[port.port] = InboundTarget(port, Destination(cluster, None, NO_RETRY_RULES))

    def destination(self, route: Route) -> Destination | None:
        """The weighted choice among the route's clusters; None when that cluster is not in the snapshot."""
        key = id(route)
        if key in self._single:
            return self._single[key]
        clusters = route.action.clusters
        return self._routes[key].get(pick_weighted(clusters).cluster) if clusters else None

    def endpoints(self) -> set[tuple[str, int]]:
        """Every (address, port) this state may dial; the pools of all others can go."""
        keys = {(e.address, e.port) for c in self.snapshot.clusters for e in c.endpoints}
        keys.update((p.target_address, p.target_port) for p in self.snapshot.inbound)
        return keys
