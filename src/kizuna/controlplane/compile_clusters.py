"""Outbound clusters: a (service, port, subset)'s ready endpoints and the DestinationRule policy that applies.

DestinationRules for one host are merged as Istio does: the client's namespace first, then the service's,
then the rest; subsets keep their first definition, the first top-level ``trafficPolicy`` wins. A route to a
subset no rule defines gets a cluster without endpoints marked ``undefined_subset``, so the proxy answers 503
"cluster not found" (NC) naming the subset, as Envoy does for the cluster Istio never generates.
"""

from __future__ import annotations

from kizuna.api.destinationrule import (
    ClientTLSSettings,
    ConnectionPoolSettings,
    DestinationRuleSpec,
    LoadBalancerSettings,
    Subset,
    TrafficPolicy,
)
from kizuna.api.destinationrule import OutlierDetection as OutlierSettings
from kizuna.controlplane.compile_index import (
    ExternalHost,
    MeshIndex,
    entry_protocol,
    exported_to,
    http_version,
    labels_match,
    port_http_version,
    port_protocol,
)
from kizuna.controlplane.compile_routes import ClusterRef
from kizuna.controlplane.compile_security import mtls_disabled
from kizuna.proxyconfig.bootstrap import Node
from kizuna.proxyconfig.model import Cluster, Endpoint, LbPolicy, UpstreamTls
from kizuna.proxyconfig.policy import DEFAULT_POOL, UNLIMITED, ConnectionPool, HashPolicy, OutlierDetection

DEFAULT_LB: LbPolicy = "LEAST_REQUEST"
"""Istio's default since 1.14; LEAST_CONN (deprecated) means the same."""
DEFAULT_CONNECT_TIMEOUT = 10.0

_LB: dict[str, LbPolicy] = {"ROUND_ROBIN": "ROUND_ROBIN", "LEAST_REQUEST": "LEAST_REQUEST",
                            "LEAST_CONN": "LEAST_REQUEST", "RANDOM": "RANDOM", "PASSTHROUGH": "PASSTHROUGH"}


def merged_rule(index: MeshIndex, node: Node,
                service_fqdn: str) -> tuple[TrafficPolicy | None, dict[str, Subset]]:
    """The host-level policy and the subsets that apply to ``service_fqdn`` for ``node``."""
    service = index.by_fqdn.get(service_fqdn)
    entry = index.external.get(service_fqdn)
    service_ns = service.namespace if service is not None else entry.namespace if entry is not None else ""
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
                     ) -> tuple[LoadBalancerSettings | None, ConnectionPoolSettings | None,
                                OutlierSettings | None]:
    """Istio's MergeTrafficPolicy for the settings kizuna applies (load balancer, connection pool, outlier
    detection): the host policy, replaced wholesale by its ``portLevelSettings`` for ``port``; then the
    subset's settings where set; then the subset's own port-level settings (port-level entries do not
    inherit: an unset field there means the default)."""
    lb: LoadBalancerSettings | None = None
    pool: ConnectionPoolSettings | None = None
    outlier: OutlierSettings | None = None
    if top is not None:
        lb, pool, outlier = top.load_balancer, top.connection_pool, top.outlier_detection
        level = top.for_port(port)
        if level is not None:
            lb, pool, outlier = level.load_balancer, level.connection_pool, level.outlier_detection
    if subset is not None:
        lb = subset.load_balancer or lb
        pool = subset.connection_pool or pool
        outlier = subset.outlier_detection or outlier
        level = subset.for_port(port)
        if level is not None:
            lb, pool, outlier = level.load_balancer, level.connection_pool, level.outlier_detection
    return lb, pool, outlier


TLS_MODE_LABEL = "security.istio.io/tlsMode"
"""The label Istio's injector puts on pods with a sidecar (value ``istio``): auto mTLS dials them with mTLS."""


def tls_settings(top: TrafficPolicy | None, subset: TrafficPolicy | None, port: int) -> ClientTLSSettings | None:
    """The DestinationRule ``tls`` for ``port`` (port level, then subset, then host), or None if none."""
    found: ClientTLSSettings | None = None
    for policy in (top, subset):
        if policy is None:
            continue
        if policy.tls is not None:
            found = policy.tls
        level = policy.for_port(port)
        if level is not None and level.tls is not None:
            found = level.tls
    return found


def tls_mode(top: TrafficPolicy | None, subset: TrafficPolicy | None, port: int) -> str:
    """The DestinationRule ``tls.mode`` for ``port`` (port level, then subset, then host), or "" if none."""
    settings = tls_settings(top, subset, port)
    return settings.mode if settings is not None else ""


def upstream_tls(settings: ClientTLSSettings | None) -> UpstreamTls | None:
    """The TLS a proxy originates for DestinationRule ``tls.mode`` SIMPLE or MUTUAL (None for the others:
    ISTIO_MUTUAL and auto mTLS are the endpoints' identities, DISABLE is plaintext). File paths pass as
    written; the proxy reads them."""
    if settings is None or settings.mode not in ("SIMPLE", "MUTUAL"):
        return None
    return UpstreamTls(settings.mode, settings.ca_certificates,
                       settings.client_certificate if settings.mode == "MUTUAL" else "",
                       settings.private_key if settings.mode == "MUTUAL" else "",
                       settings.sni, tuple(settings.subject_alt_names), bool(settings.insecure_skip_verify))


def endpoint_identity(node: Node, mode: str, trust_domain: str = "cluster.local") -> str:
    """The identity a client checks on this endpoint when it talks mTLS to it, or "" for plaintext: Istio's
    auto mTLS (the endpoint has a sidecar) unless the DestinationRule turns TLS off (``DISABLE``) or
    originates its own (``SIMPLE``/``MUTUAL``); ``ISTIO_MUTUAL`` asks for it explicitly."""
    if mode in ("DISABLE", "SIMPLE", "MUTUAL"):
        return ""
    if dict(node.labels).get(TLS_MODE_LABEL) != "istio":
        return ""
    return f"{trust_domain}/ns/{node.namespace}/sa/{node.service_account}"


def lb_policy(lb: LoadBalancerSettings | None) -> LbPolicy:
    """The balancer for a ``loadBalancer.simple`` setting (consistent hashing: see ``hash_policy``)."""
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
    subset_policy = subset.traffic_policy if subset is not None else None
    lb, pool, outlier = effective_policy(top, subset_policy, port)
    tls_policy = tls_settings(top, subset_policy, port)
    tls = tls_policy.mode if tls_policy is not None else ""
    endpoints: list[Endpoint] = []
    if service is not None and service_port is not None and (not subset_name or subset is not None):
        wanted = subset.labels if subset is not None else {}
        for instance in index.instances:
            inst = instance.node
            if not (instance.ready and service.selects(inst) and labels_match(wanted, inst.labels)):
                continue
            target = index.target_port(service_port, inst)
            if target is not None:
                identity = endpoint_identity(inst, tls, index.trust_domain)
                if identity and mtls_disabled(index, inst, target):
                    identity = ""  # the server's PeerAuthentication DISABLE: plaintext, as Istio's auto mTLS
                endpoints.append(Endpoint(inst.mesh_address, target, inst.workload, inst.labels, identity))
    protocol = port_protocol(service_port) if service_port is not None else "auto"
    version = port_http_version(service_port) if service_port is not None else ""
    entry = index.external.get(service_fqdn) if service is None else None
    if entry is not None and (not subset_name or subset is not None):
        endpoints = entry_endpoints(index, entry, port, subset.labels if subset is not None else {}, tls)
        entry_port = entry.spec.port(port)
        protocol = entry_protocol(entry_port.protocol) if entry_port is not None else "auto"
        version = http_version(entry_port.protocol) if entry_port is not None else ""
    endpoints.sort(key=lambda e: (e.address, e.port, e.workload))
    balancer = lb_policy(lb)
    if entry is not None and entry.spec.resolution == "NONE" and entry.spec.workload_selector is None and lb is None:
        balancer = "PASSTHROUGH"  # Istio's ORIGINAL_DST cluster: where the app was connecting (with capture)
    return Cluster(name, service_fqdn, port, subset_name, protocol, balancer, tuple(endpoints),
                   connect_timeout(pool), connection_pool(pool), outlier_detection(outlier), hash_policy(lb),
                   tls=upstream_tls(tls_policy), http_version=version,
                   undefined_subset=bool(subset_name) and subset is None)


def entry_endpoints(index: MeshIndex, entry: ExternalHost, port: int, wanted: dict[str, str], tls: str = ""
                    ) -> list[Endpoint]:
    """A ServiceEntry host's endpoints on ``port``: STATIC/DNS ``endpoints`` (port from the endpoint's
    ``ports`` by port name, else ``targetPort``, else the port); with a ``workloadSelector``, the ready mesh
    instances of the entry's namespace carrying its labels (as Istio selects pods and WorkloadEntries); with
    neither, the host name itself (DNS, NONE: the sidecar resolves it when it connects, or, for NONE with
    capture, forwards to the original destination; see the PASSTHROUGH balancer).

    ``location`` decides auto mTLS as in Istio: a MESH_EXTERNAL host never gets it (only a DestinationRule's
    explicit ``ISTIO_MUTUAL``, ``tls``), a MESH_INTERNAL one does for each endpoint with a sidecar (a selected
    instance, or a STATIC endpoint at an instance's address)."""
    se_port = entry.spec.port(port)
    if se_port is None:
        return []
    default_port = se_port.target_port or se_port.number
    mesh = entry.spec.location == "MESH_INTERNAL" or tls == "ISTIO_MUTUAL"

    def identity(node: Node) -> str:
        return endpoint_identity(node, tls, index.trust_domain) if mesh else ""

    selector = entry.spec.workload_selector
    if selector is not None:
        want = {**selector.labels, **wanted}
        return [Endpoint(i.node.mesh_address, default_port, i.node.workload, i.node.labels, identity(i.node))
                for i in index.instances
                if i.ready and i.node.namespace == entry.namespace and labels_match(want, i.node.labels)]
    if not entry.spec.endpoints:
        if entry.spec.resolution == "STATIC":
            return []
        return [Endpoint(entry.fqdn, default_port, entry.name)] if not wanted else []
    sidecars = {i.node.mesh_address: i.node for i in index.instances if i.ready} if mesh else {}
    return [Endpoint(ep.address, ep.ports.get(se_port.name, default_port), entry.name,
                     tuple(sorted(ep.labels.items())),
                     identity(sidecars[ep.address]) if ep.address in sidecars else "")
            for ep in entry.spec.endpoints if labels_match(wanted, ep.labels)
            and not ep.address.startswith("unix://")]


def connection_pool(pool: ConnectionPoolSettings | None) -> ConnectionPool:
    """``connectionPool`` as the proxy's limits; unset fields keep Istio's defaults (limits 2^32-1)."""
    if pool is None:
        return DEFAULT_POOL
    tcp, http = pool.tcp, pool.http

    def limit(value: int | None) -> int:
        # Istio treats 0 as "not set" for these limits (the proto's zero value).
        return value if value else UNLIMITED

    idle: float | None = None
    if http is not None and http.idle_timeout is not None:
        idle = http.idle_timeout
    elif tcp is not None and tcp.idle_timeout:
        idle = tcp.idle_timeout
    return ConnectionPool(
        max_connections=limit(tcp.max_connections if tcp else None),
        max_pending_requests=limit(http.http1_max_pending_requests if http else None),
        max_requests=limit(http.http2_max_requests if http else None),
        max_requests_per_connection=(http.max_requests_per_connection or 0) if http else 0,
        max_retries=limit(http.max_retries if http else None),
        idle_timeout=idle,
        max_connection_duration=tcp.max_connection_duration if tcp else None,
        tcp_idle_timeout=tcp.idle_timeout if tcp else None)


def outlier_detection(outlier: OutlierSettings | None) -> OutlierDetection | None:
    """``outlierDetection`` with Istio's defaults; None when the rule sets none (no ejection at all).

    The deprecated ``consecutiveErrors`` means consecutive gateway errors, as in Istio."""
    if outlier is None:
        return None
    default = OutlierDetection()
    five = outlier.consecutive_5xx_errors
    gateway = outlier.consecutive_gateway_errors
    if gateway is None and outlier.consecutive_errors is not None:
        gateway = outlier.consecutive_errors
    return OutlierDetection(
        consecutive_5xx=default.consecutive_5xx if five is None else five,
        consecutive_gateway=gateway or 0,
        interval=outlier.interval or default.interval,
        base_ejection_time=outlier.base_ejection_time or default.base_ejection_time,
        max_ejection_percent=(default.max_ejection_percent if outlier.max_ejection_percent is None
                              else outlier.max_ejection_percent),
        min_health_percent=outlier.min_health_percent or 0)


def hash_policy(lb: LoadBalancerSettings | None) -> HashPolicy | None:
    """``loadBalancer.consistentHash`` as a hash policy (ring hash unless ``maglev`` is set); None otherwise.
    ``localityLbSetting`` and ``warmup`` are accepted but not applied."""
    if lb is None or lb.consistent_hash is None:
        return None
    ch = lb.consistent_hash
    cookie = ch.http_cookie
    ring = (ch.ring_hash.minimum_ring_size if ch.ring_hash is not None else None) or ch.minimum_ring_size
    table = ch.maglev.table_size if ch.maglev is not None else None
    return HashPolicy(
        header=(ch.http_header_name or "").lower(),
        cookie=cookie.name if cookie is not None else "",
        cookie_path=cookie.path if cookie is not None else "",
        cookie_ttl=cookie.ttl if cookie is not None else None,
        source_ip=bool(ch.use_source_ip),
        query_param=ch.http_query_parameter_name or "",
        algorithm="maglev" if ch.maglev is not None else "ring",
        ring_size=ring or 1024,
        table_size=table or 65537)
