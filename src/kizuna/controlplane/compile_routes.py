"""VirtualService rules → the ordered routes of one virtual host, narrowed to one proxy (Istio semantics).

Matches that cannot apply to this proxy (``sourceLabels``, ``sourceNamespace``, ``gateways``) or to this port
are dropped here, so the data plane only ever evaluates request attributes. A route left with no match is
dropped; a route without ``match`` takes everything. Actions the data plane does not implement yet
(redirect, directResponse, delegate) are skipped, and fault, mirror, rewrite, headers and CORS are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kizuna.api.virtualservice import (
    HTTPMatchRequest,
    HTTPRetry,
    HTTPRoute,
    HTTPRouteDestination,
    L4MatchAttributes,
    RouteDestination,
    StringMatch,
    TCPRoute,
    VirtualServiceSpec,
)
from kizuna.controlplane.compile_index import KubeService, MeshIndex, Rule, exported_to, labels_match
from kizuna.proxyconfig.bootstrap import Node
from kizuna.proxyconfig.model import (
    DEFAULT_RETRIABLE_STATUS_CODES,
    DEFAULT_RETRY_ON,
    NO_RETRY,
    HeaderMatch,
    Protocol,
    RetryPolicy,
    Route,
    RouteAction,
    RouteMatch,
    WeightedCluster,
    cluster_name,
)
from kizuna.proxyconfig.model import StringMatch as MatchSpec

ClusterRef = tuple[str, int, str]
"""(service FQDN, service port, subset) of an outbound cluster."""

DEFAULT_ROUTE = "default"


def select_virtual_service(index: MeshIndex, node: Node, service_fqdn: str) -> Rule | None:
    """The VirtualService that routes ``service_fqdn`` for this sidecar, if any.

    Sidecars take one VirtualService per host (Istio does not merge them outside gateways): an exact host
    beats a wildcard, then the first by (namespace, name).
    """
    candidates = []
    for rule in index.virtual_services:
        spec = rule.spec
        assert isinstance(spec, VirtualServiceSpec)
        if spec.applies_to_mesh and exported_to(spec.export_to, rule.namespace, node):
            candidates.append(rule)
    for wildcard in (False, True):
        for rule in candidates:
            hosts = [h for h in rule.hosts if h.startswith("*") == wildcard]
            if any(index.host_matches(h, rule.namespace, service_fqdn) for h in hosts):
                return rule
    return None


@dataclass
class _Scope:
    """One virtual host being compiled for one proxy; collects the clusters its routes send to."""

    index: MeshIndex
    node: Node
    port: int
    refs: dict[str, ClusterRef] = field(default_factory=dict)

    def cluster(self, service_fqdn: str, port: int, subset: str = "") -> str:
        """The outbound cluster name for a destination, remembered for the snapshot's cluster list."""
        name = cluster_name("outbound", port, subset, service_fqdn)
        self.refs.setdefault(name, (service_fqdn, port, subset))
        return name

    def source_fits(self, labels: dict[str, str], namespace: str, gateways: list[str]) -> bool:
        """Do a match's ``sourceLabels``, ``sourceNamespace`` and ``gateways`` admit this proxy?"""
        return (labels_match(labels, self.node.labels)
                and (not namespace or namespace == self.node.namespace)
                and (not gateways or "mesh" in gateways))


def build_routes(index: MeshIndex, node: Node, service: KubeService, port: int,
                 protocol: Protocol) -> tuple[tuple[Route, ...], dict[str, ClusterRef]]:
    """The routes of ``service``:``port`` as seen by ``node``, and the clusters they reference."""
    scope = _Scope(index, node, port)
    rule = select_virtual_service(index, node, service.fqdn)
    spec = rule.spec if rule is not None else None
    routes: list[Route] | None = None
    if rule is not None and isinstance(spec, VirtualServiceSpec):
        if protocol != "tcp" and spec.http:
            routes = [r for i, h in enumerate(spec.http) if (r := _http_route(scope, rule, i, h)) is not None]
        elif protocol != "http" and spec.tcp:
            routes = [r for i, t in enumerate(spec.tcp) if (r := _tcp_route(scope, rule, i, t)) is not None]
    if routes is None:
        # No rule for this host (or none for this protocol): Istio's default route to the whole service.
        wc = WeightedCluster(scope.cluster(service.fqdn, port), 100)
        routes = [Route(DEFAULT_ROUTE, (), RouteAction((wc,), None, RetryPolicy()))]
    return tuple(routes), scope.refs


def _http_route(scope: _Scope, rule: Rule, i: int, http: HTTPRoute) -> Route | None:
    matches: list[RouteMatch] = []
    for m in http.match:
        converted = _route_match(scope, m)
        if converted is not None:
            matches.append(converted)
    if (http.match and not matches) or not http.route:
        return None
    action = RouteAction(_weighted(scope, rule, http.route), http.timeout, retry_policy(http.retries))
    return Route(http.name or f"{rule.name}.http[{i}]", tuple(matches), action, rule.source)


def _tcp_route(scope: _Scope, rule: Rule, i: int, tcp: TCPRoute) -> Route | None:
    # L4 matches are all about the connection's source and port, so they are decided here; the first TCP
    # route left is the one the proxy uses. (destinationSubnets / sourceSubnet are not evaluated.)
    if tcp.match and not any(_l4_fits(scope, m) for m in tcp.match):
        return None
    return Route(f"{rule.name}.tcp[{i}]", (), RouteAction(_weighted(scope, rule, tcp.route), None, NO_RETRY),
                 rule.source)


def _l4_fits(scope: _Scope, m: L4MatchAttributes) -> bool:
    return (m.port is None or m.port == scope.port) and scope.source_fits(
        m.source_labels, m.source_namespace, m.gateways)


def _string_match(sm: StringMatch | None, ignore_case: bool = False) -> MatchSpec | None:
    if sm is None:
        return None
    if sm.exact is not None:
        return MatchSpec("exact", sm.exact, ignore_case)
    if sm.prefix is not None:
        return MatchSpec("prefix", sm.prefix, ignore_case)
    if sm.regex is not None and sm.regex != "*":
        return MatchSpec("regex", sm.regex, ignore_case)
    return None  # empty match (or withoutHeaders' "*"): the header only has to be present


def _conditions(values: dict[str, StringMatch]) -> tuple[HeaderMatch, ...]:
    # Names lower-case: HTTP header names are case-insensitive, and the snapshot contract stores query
    # parameter names lower-case too (HeaderMatch.from_json).
    return tuple(HeaderMatch(name.lower(), _string_match(values[name]))
                 for name in sorted(values, key=lambda n: (n.lower(), n)))


def _route_match(scope: _Scope, m: HTTPMatchRequest) -> RouteMatch | None:
    if not scope.source_fits(m.source_labels, m.source_namespace, m.gateways):
        return None
    if m.port is not None and m.port != scope.port:
        return None
    return RouteMatch(
        uri=_string_match(m.uri, m.ignore_uri_case), method=_string_match(m.method),
        authority=_string_match(m.authority), scheme=_string_match(m.scheme),
        headers=_conditions(dict(m.headers)), without_headers=_conditions(dict(m.without_headers)),
        query_params=_conditions(dict(m.query_params)), port=m.port, name=m.name)


def _weighted(scope: _Scope, rule: Rule,
              destinations: Sequence[RouteDestination | HTTPRouteDestination]) -> tuple[WeightedCluster, ...]:
    entries: list[tuple[str, int]] = []
    for d in destinations:
        dest = d.destination
        target = scope.index.resolve(dest.host, rule.namespace)
        service = scope.index.by_fqdn.get(target)
        if dest.port is not None:
            port = dest.port.number
        elif service is not None and len(service.spec.ports) == 1:
            port = service.spec.ports[0].port
        else:
            port = scope.port
        entries.append((scope.cluster(target, port, dest.subset), d.weight))
    if not any(w for _, w in entries):
        # No weights: one destination takes everything, several share equally (remainder to the first ones).
        share, extra = divmod(100, len(entries))
        entries = [(name, share + (1 if i < extra else 0)) for i, (name, _) in enumerate(entries)]
    merged: dict[str, int] = {}
    for name, weight in entries:
        if weight:
            merged[name] = merged.get(name, 0) + weight
    return tuple(WeightedCluster(name, weight) for name, weight in merged.items())


def retry_policy(retries: HTTPRetry | None) -> RetryPolicy:
    """Istio's retry policy for a route: the mesh default (2 attempts) when ``retries`` is absent.

    ``retryOn`` replaces the default conditions; numeric entries become retriable status codes.
    """
    if retries is None:
        return RetryPolicy()
    if retries.attempts == 0:
        return NO_RETRY
    retry_on, codes = DEFAULT_RETRY_ON, DEFAULT_RETRIABLE_STATUS_CODES
    parts = [p.strip() for p in retries.retry_on.split(",") if p.strip()]
    if parts:
        codes = frozenset(int(p) for p in parts if p.isdigit())
        retry_on = frozenset(p for p in parts if not p.isdigit())
        if codes:
            retry_on |= {"retriable-status-codes"}
    return RetryPolicy(retries.attempts, retries.per_try_timeout, retry_on, codes)
