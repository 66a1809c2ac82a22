"""Outbound clusters: a (service, port, subset)'s ready endpoints and the DestinationRule policy that applies.

DestinationRules for one host are merged as Istio does: the client's namespace first, then the service's,
then the rest; subsets keep their first definition, the first top-level ``trafficPolicy`` wins. A route to a
subset no rule defines gets a cluster without endpoints, so the proxy answers 503 "no healthy upstream".
"""

from __future__ import annotations

from kizuna.api.destinationrule import (
    ConnectionPoolSettings,
    DestinationRuleSpec,
    LoadBalancerSettings,
    Subset,
    TrafficPolicy,
)
from kizuna.controlplane.compile_index import MeshIndex, exported_to, labels_match, port_protocol
from kizuna.controlplane.compile_routes import ClusterRef
from kizuna.proxyconfig.bootstrap import Node
from kizuna.proxyconfig.model import Cluster, Endpoint, LbPolicy

DEFAULT_LB: LbPolicy = "LEAST_REQUEST"
"""Istio's default since 1.14; LEAST_CONN (deprecated) means the same."""
DEFAULT_CONNECT_TIMEOUT = 10.0

_LB: dict[str, LbPolicy] = {"ROUND_ROBIN": "ROUND_ROBIN", "LEAST_REQUEST": "LEAST_REQUEST",
                            "LEAST_CONN": "LEAST_REQUEST", "RANDOM": "RANDOM", "PASSTHROUGH": "PASSTHROUGH"}


def merged_rule(index: MeshIndex, node: Node,
                service_fqdn: str) -> tuple[TrafficPolicy | None, dict[str, Subset]]:
    """The host-level policy and the subsets that apply to ``service_fqdn`` for ``node``."""
    service = index.by_fqdn.get(service_fqdn)
    service_ns = service.namespace if service is not None else ""
    rules = []
    for rule in index.destination_rules:
        spec = rule.spec
        assert isinstance(spec, DestinationRuleSpec)
        if not index.host_matches(spec.host, rule.namespace, service_fqdn):
            continue
        if not exported_to(spec.export_to, rule.namespace, node):
            continue
        selector = spec.workload_selector
        if selector is not None and (rule.namespace != node.namespace
                                     or not labels_match(selector.match_labels, node.labels)):
            continue
        rank = 0 if rule.namespace == node.namespace else 1 if rule.namespace == service_ns else 2
        rules.append((rank, rule.namespace, rule.name, spec))
    policy: TrafficPolicy | None = None
    subsets: dict[str, Subset] = {}
    for *_, spec in sorted(rules, key=lambda r: r[:3]):
        policy = policy or spec.traffic_policy
        for subset in spec.subsets:
            subsets.setdefault(subset.name, subset)
    return policy, subsets


def effective_policy(top: TrafficPolicy | None, subset: TrafficPolicy | None, port: int,
                     ) -> tuple[LoadBalancerSettings | None, ConnectionPoolSettings | None]:
    """Istio's MergeTrafficPolicy for the two settings kizuna applies: the host policy, replaced wholesale by
    its ``portLevelSettings`` for ``port``; then the subset's settings where set; then the subset's own
    port-level settings (port-level entries do not inherit: an unset field there means the default)."""
    lb: LoadBalancerSettings | None = None
    pool: ConnectionPoolSettings | None = None
    if top is not None:
        lb, pool = top.load_balancer, top.connection_pool
        level = top.for_port(port)
        if level is not None:
            lb, pool = level.load_balancer, level.connection_pool
    if subset is not None:
        lb = subset.load_balancer or lb
        pool = subset.connection_pool or pool
        level = subset.for_port(port)
        if level is not None:
            lb, pool = level.load_balancer, level.connection_pool
    return lb, pool


def lb_policy(lb: LoadBalancerSettings | None) -> LbPolicy:
    """The balancer for a ``loadBalancer`` setting; consistent hashing is not implemented yet (default)."""
    return _LB.get(lb.simple or "", DEFAULT_LB) if lb is not None else DEFAULT_LB


def connect_timeout(pool: ConnectionPoolSettings | None) -> float:
    """``connectionPool.tcp.connectTimeout`` in seconds, or Istio's 10 s default."""
    if pool is not None and pool.tcp is not None and pool.tcp.connect_timeout is not None:
        return pool.tcp.connect_timeout
    return DEFAULT_CONNECT_TIMEOUT


def build_cluster(index: MeshIndex, node: Node, name: str, ref: ClusterRef) -> Cluster:
    """The cluster ``name`` for ``ref`` with the endpoints ``node`` may use."""
    service_fqdn, port, subset_name = ref
    service = index.by_fqdn.get(service_fqdn)
    service_port = service.port(port) if service is not None else None
    top, subsets = merged_rule(index, node, service_fqdn)
    subset = subsets.get(subset_name) if subset_name else None
    lb, pool = effective_policy(top, subset.traffic_policy if subset is not None else None, port)
    endpoints: list[Endpoint] = []
    if service is not None and service_port is not None and (not subset_name or subset is not None):
        wanted = subset.labels if subset is not None else {}
        for instance in index.instances:
            inst = instance.node
            if not (instance.ready and service.selects(inst) and labels_match(wanted, inst.labels)):
                continue
            target = index.target_port(service_port, inst)
            if target is not None:
                endpoints.append(Endpoint(inst.mesh_address, target, inst.workload, inst.labels))
    endpoints.sort(key=lambda e: (e.address, e.port, e.workload))
    protocol = port_protocol(service_port) if service_port is not None else "auto"
    return Cluster(name, service_fqdn, port, subset_name, protocol, lb_policy(lb), tuple(endpoints),
                   connect_timeout(pool))
