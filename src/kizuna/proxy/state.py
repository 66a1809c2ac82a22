"""What a sidecar derives from one snapshot, built once per ``apply`` and then only read.

A request captures the ``ProxyState`` current when it starts and keeps it to the end, so a config swap never
changes a request's route, cluster or policy halfway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, Protocol

from kizuna.proxy.balancer import Balancer, make_balancer, pick_weighted
from kizuna.proxy.circuit import CircuitBreaker
from kizuna.proxy.hashing import Maglev, Ring, build_table, hash_key, request_key
from kizuna.proxy.outlier import OutlierDetector
from kizuna.proxy.pool import EndpointPool, PoolRegistry
from kizuna.proxy.retry import RetryRules
from kizuna.proxy.router import Router
from kizuna.proxy.stats import Stats
from kizuna.proxy.upstream import UpstreamConnection
from kizuna.proxyconfig.model import NO_RETRY, Cluster, InboundPort, Route, Snapshot

if TYPE_CHECKING:
    from kizuna.proxyconfig.policy import HashPolicy

Pool = EndpointPool[UpstreamConnection]


class Picking(Protocol):
    """What ``ClusterState.pick`` asks of a request: an HTTP/1.1 exchange or an HTTP/2 call."""

    tried: list[Pool]
    loop: asyncio.AbstractEventLoop
    target: bytes

    def request_headers(self) -> Sequence[tuple[bytes, bytes]]: ...

    def peer(self) -> str | None: ...

    def new_hash_cookie(self, policy: HashPolicy) -> bytes: ...


class ClusterState:
    """A cluster's endpoints as pools, its balancer and its response counters, and the DestinationRule
    resilience policy that applies: a circuit breaker, outlier detection, a consistent-hash table.

    ``plain`` is True when none of those is set: then an exchange asks ``balancer.pick`` directly and pays
    nothing for the policies."""

    __slots__ = ("name", "cluster", "balancer", "counters", "connect_timeout", "circuit", "outlier", "hash",
                 "hash_table", "plain")

    def __init__(self, cluster: Cluster, pools: list[Pool], stats: Stats) -> None:
        self.name = cluster.name
        self.cluster = cluster
        self.balancer: Balancer[Pool] = make_balancer(cluster.lb_policy, pools)
        self.counters = stats.cluster_counters(cluster.name)
        self.connect_timeout = cluster.connect_timeout
        policy = cluster.connection_pool
        self.circuit = CircuitBreaker(policy) if policy.has_limits() else None
        if not policy.is_default():
            # Pools are per endpoint and shared by the clusters that include it: the last snapshot's
            # cluster settings for an endpoint apply to its connections.
            for pool in pools:
                pool.configure(policy.idle_timeout, policy.max_requests_per_connection,
                               policy.max_connection_duration)
        self.outlier = OutlierDetector(cluster.outlier_detection, pools) if cluster.outlier_detection else None
        self.hash = cluster.hash_policy
        self.hash_table: Ring | Maglev | None = None
        if self.hash is not None:
            self.hash_table = build_table(self.hash, [f"{p.address}:{p.port}" for p in pools])
        if self.circuit is not None or self.outlier is not None:
            stats.policies[cluster.name] = self
        self.plain = self.outlier is None and self.hash is None

    def pick(self, exchange: Picking) -> Pool | None:
        """The endpoint for ``exchange``'s next try, by hash or balancer, skipping ejected endpoints."""
        items = self.balancer.items
        exclude: list[Pool] = list(exchange.tried)
        outlier = self.outlier
        if outlier is not None:
            now = exchange.loop.time()
            ejected: list[Pool] = [] if outlier.panic(now) else outlier.ejected(now)  # type: ignore[assignment]
            if ejected:
                if len(ejected) >= len(items):
                    return None  # every endpoint ejected, no panic threshold: no healthy upstream
                # A retry may go back to a healthy endpoint already tried rather than to an ejected one.
                exclude = ejected if len(set(exclude + ejected)) >= len(items) else exclude + ejected
        table = self.hash_table
        if table is not None and not exchange.tried:
            assert self.hash is not None
            key = request_key(self.hash, exchange.request_headers(), exchange.target, exchange.peer())
            if key is None and self.hash.cookie and self.hash.cookie_ttl:
                key = exchange.new_hash_cookie(self.hash)
            index = table.lookup(hash_key(key)) if key is not None else None
            if index is not None and items[index] not in exclude:
                return items[index]
            # No key (Envoy picks at random) or the owner is ejected: the balancer chooses among the rest.
        return self.balancer.pick(exclude)


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
        stats.policies.clear()  # the clusters below re-register: a cluster whose policy went is dropped
        self.clusters = {c.name: ClusterState(c, [pools.get(e.address, e.port, e.identity) if c.tls is None
                                                  else pools.originating(e.address, e.port, c.tls, c.service)
                                                  for e in c.endpoints], stats)
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
