"""VirtualService rules → the ordered routes of one virtual host, narrowed to one proxy (Istio semantics).

Matches that cannot apply to this proxy (``sourceLabels``, ``sourceNamespace``, ``gateways``) or to this port
are dropped here, so the data plane only ever evaluates request attributes. A route left with no match is
dropped; a route without ``match`` takes everything; TLS routes keep only their ``sniHosts`` for the proxy.
Redirect, directResponse, rewrite, headers, fault and mirrors and corsPolicy become the route's
``RoutePolicy`` (``proxyconfig/actions.py``); a ``delegate`` is replaced by the delegate's routes
(``compile_delegate.py``). ``@request.auth.claims.*`` keys of ``headers`` / ``withoutHeaders`` become claim
conditions on a gateway's routes (its RequestAuthentication verifies the token); no sidecar gets them.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kizuna.api.virtualservice import (
    CorsPolicy,
    Destination,
    HeaderOperations,
    Headers,
    HTTPFaultInjection,
    HTTPMatchRequest,
    HTTPRetry,
    HTTPRoute,
    HTTPRouteDestination,
    L4MatchAttributes,
    RouteDestination,
    StringMatch,
    TCPRoute,
    TLSMatchAttributes,
    TLSRoute,
    VirtualServiceSpec,
    claim_path,
    is_claim_key,
)
from kizuna.controlplane.compile_delegate import expand
from kizuna.controlplane.compile_index import (
    ExternalHost,
    KubeService,
    MeshIndex,
    Rule,
    exported_to,
    labels_match,
)
from kizuna.proxyconfig.actions import (
    Cors,
    DirectResponse,
    Fault,
    HeaderOps,
    HeaderRules,
    Mirror,
    Redirect,
    Rewrite,
    RoutePolicy,
)
from kizuna.proxyconfig.bootstrap import Node
from kizuna.proxyconfig.model import (
    DEFAULT_RETRIABLE_STATUS_CODES,
    DEFAULT_RETRY_ON,
    NO_RETRY,
    ClaimMatch,
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
class RouteScope:
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


def build_routes(index: MeshIndex, node: Node, service: KubeService | ExternalHost, port: int,
                 protocol: Protocol) -> tuple[tuple[Route, ...], dict[str, ClusterRef]]:
    """The routes of ``service``:``port`` as seen by ``node``, and the clusters they reference."""
    scope = RouteScope(index, node, port)
    rule = select_virtual_service(index, node, service.fqdn)
    spec = rule.spec if rule is not None else None
    routes: list[Route] | None = None
    if rule is not None and isinstance(spec, VirtualServiceSpec):
        if protocol != "tcp" and spec.http:
            routes = [r for label, h in expand(spec.http, rule.namespace, index.virtual_service)
                      if (r := http_route(scope, rule, label, h)) is not None]
        elif protocol != "http" and (spec.tls or spec.tcp):
            # TLS routes (by SNI) first, then TCP routes: a connection no SNI route takes falls to them.
            # (Only ports declared TLS/HTTPS/TCP route on SNI: a sniffed port may carry HTTP.)
            routes = [r for i, t in enumerate(spec.tls) if protocol == "tcp"
                      and (r := tls_route(scope, rule, i, t)) is not None]
            routes += [r for i, t in enumerate(spec.tcp) if (r := tcp_route(scope, rule, i, t)) is not None]
    if routes is None:
        # No rule for this host (or none for this protocol): Istio's default route to the whole service.
        wc = WeightedCluster(scope.cluster(service.fqdn, port), 100)
        routes = [Route(DEFAULT_ROUTE, (), RouteAction((wc,), None, RetryPolicy()))]
    return tuple(routes), scope.refs


def http_route(scope: RouteScope, rule: Rule, label: str, http: HTTPRoute) -> Route | None:
    """One ``http[]`` rule (``label``: its position, e.g. ``http[2]``) as a route for this scope; None when
    no match of it can apply here."""
    matches: list[RouteMatch] = []
    for m in http.match:
        converted = _route_match(scope, m)
        if converted is not None:
            matches.append(converted)
    if (http.match and not matches) or not (http.route or http.redirect or http.direct_response):
        return None
    clusters = _weighted(scope, rule, http.route) if http.route else ()
    policy = _route_policy(scope, rule, http, clusters)
    timeout, retry = http.timeout, retry_policy(http.retries)
    if http.fault is not None:
        # Istio: timeouts and retries are not enabled on a route with fault injection.
        timeout, retry = None, NO_RETRY
    action = RouteAction(clusters, timeout, retry, policy)
    return Route(http.name or f"{rule.name}.{label}", tuple(matches), action, rule.source)


def tcp_route(scope: RouteScope, rule: Rule, i: int, tcp: TCPRoute) -> Route | None:
    # L4 matches are all about the connection's source and port, so they are decided here; the first TCP
    # route left is the one the proxy uses. (destinationSubnets / sourceSubnet are not evaluated.)
    if tcp.match and not any(_l4_fits(scope, m) for m in tcp.match):
        return None
    return Route(f"{rule.name}.tcp[{i}]", (), RouteAction(_weighted(scope, rule, tcp.route), None, NO_RETRY),
                 rule.source)


def tls_route(scope: RouteScope, rule: Rule, i: int, tls: TLSRoute) -> Route | None:
    # Only the SNI is left for the proxy to decide; port and source conditions are decided here.
    names = tuple(dict.fromkeys(h for m in tls.match if _l4_fits(scope, m) for h in m.sni_hosts))
    if not names:
        return None
    return Route(f"{rule.name}.tls[{i}]", (RouteMatch(sni_hosts=names),),
                 RouteAction(_weighted(scope, rule, tls.route), None, NO_RETRY), rule.source)


def _l4_fits(scope: RouteScope, m: L4MatchAttributes | TLSMatchAttributes) -> bool:
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


def _conditions(values: Mapping[str, StringMatch]) -> tuple[HeaderMatch, ...]:
    # Names lower-case: HTTP header names are case-insensitive, and the snapshot contract stores query
    # parameter names lower-case too (HeaderMatch.from_json).
    return tuple(HeaderMatch(name.lower(), _string_match(values[name]))
                 for name in sorted(values, key=lambda n: (n.lower(), n)))


def _claim_conditions(values: Mapping[str, StringMatch]) -> tuple[ClaimMatch, ...]:
    # Claim names are case-sensitive (JSON keys), unlike header names: kept as written.
    return tuple(ClaimMatch(claim_path(name), _string_match(values[name])) for name in sorted(values))


def _route_match(scope: RouteScope, m: HTTPMatchRequest) -> RouteMatch | None:
    if not scope.source_fits(m.source_labels, m.source_namespace, m.gateways):
        return None
    if m.port is not None and m.port != scope.port:
        return None
    headers = {k: v for k, v in m.headers.items() if not is_claim_key(k)}
    without = {k: v for k, v in m.without_headers.items() if not is_claim_key(k)}
    claims = {k: v for k, v in m.headers.items() if is_claim_key(k)}
    without_claims = {k: v for k, v in m.without_headers.items() if is_claim_key(k)}
    if (claims or without_claims) and scope.node.kind != "gateway":
        # Validation refuses these keys on rules sidecars apply; a delegate reached from a mesh-bound root is
        # the case it cannot see. A sidecar has no verified end-user token on outbound, so Istio's claim
        # routing never applies there: the match can never hold and is dropped.
        return None
    return RouteMatch(
        uri=_string_match(m.uri, m.ignore_uri_case), method=_string_match(m.method),
        authority=_string_match(m.authority), scheme=_string_match(m.scheme),
        headers=_conditions(headers), without_headers=_conditions(without),
        query_params=_conditions(dict(m.query_params)), port=m.port, name=m.name,
        claims=_claim_conditions(claims), without_claims=_claim_conditions(without_claims))


def _weighted(scope: RouteScope, rule: Rule,
              destinations: Sequence[RouteDestination | HTTPRouteDestination]) -> tuple[WeightedCluster, ...]:
    entries = [(_cluster_of(scope, rule, d.destination), d.weight) for d in destinations]
    if not any(w for _, w in entries):
        # No weights: one destination takes everything, several share equally (remainder to the first ones).
        share, extra = divmod(100, len(entries))
        entries = [(name, share + (1 if i < extra else 0)) for i, (name, _) in enumerate(entries)]
    merged: dict[str, int] = {}
    headers: dict[str, HeaderRules] = {}
    for (name, weight), d in zip(entries, destinations, strict=True):
        if weight:
            merged[name] = merged.get(name, 0) + weight
            rules = _header_rules(d.headers) if isinstance(d, HTTPRouteDestination) else None
            if rules is not None:
                headers.setdefault(name, rules)
    return tuple(WeightedCluster(name, weight, headers.get(name)) for name, weight in merged.items())


def _cluster_of(scope: RouteScope, rule: Rule, dest: Destination) -> str:
    """The outbound cluster a Destination names (port: given, else the service's only port, else this one)."""
    target = scope.index.resolve(dest.host, rule.namespace)
    service = scope.index.by_fqdn.get(target)
    entry = scope.index.external.get(target)
    if dest.port is not None:
        port = dest.port.number
    elif service is not None and len(service.spec.ports) == 1:
        port = service.spec.ports[0].port
    elif entry is not None and len(entry.spec.ports) == 1:
        port = entry.spec.ports[0].number
    else:
        port = scope.port
    return scope.cluster(target, port, dest.subset)


def retry_policy(retries: HTTPRetry | None) -> RetryPolicy:
    """Istio's retry policy for a route: the mesh default (2 attempts) when ``retries`` is absent.

    ``retryOn`` replaces the default conditions; numeric entries become retriable status codes.
    """
    if retries is None:
        return RetryPolicy()
    if retries.attempts == 0:
        return NO_RETRY
    backoff = retries.backoff
    retry_on, codes = DEFAULT_RETRY_ON, DEFAULT_RETRIABLE_STATUS_CODES
    parts = [p.strip() for p in retries.retry_on.split(",") if p.strip()]
    if parts:
        codes = frozenset(int(p) for p in parts if p.isdigit())
        retry_on = frozenset(p for p in parts if not p.isdigit())
        if codes:
            retry_on |= {"retriable-status-codes"}
    return RetryPolicy(retries.attempts, retries.per_try_timeout, retry_on, codes, backoff)


# gRPC status codes by name (grpc/status.h), for fault.abort.grpcStatus.
GRPC_CODES = {name: code for code, name in enumerate((
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"))}


def _route_policy(scope: RouteScope, rule: Rule, http: HTTPRoute,
                  clusters: tuple[WeightedCluster, ...]) -> RoutePolicy | None:
    """The route's redirect / directResponse / rewrite / headers / fault / mirrors, or None without any."""
    redirect = direct = rewrite = fault = None
    if http.redirect is not None:
        r = http.redirect
        redirect = Redirect(r.uri, r.authority, r.scheme, r.port, r.derive_port, r.redirect_code or 301,
                            r.prefix_rewrite)
    elif http.direct_response is not None:
        body = http.direct_response.body
        data = b""
        if body is not None:
            data = base64.b64decode(body.bytes_) if body.bytes_ is not None else (body.string or "").encode()
        direct = DirectResponse(http.direct_response.status, data)
    if http.rewrite is not None:
        rw = http.rewrite
        regex = rw.uri_regex_rewrite
        rewrite = Rewrite(rw.uri, rw.authority, regex.match if regex else "", regex.rewrite if regex else "")
    if http.fault is not None:
        fault = _fault(http.fault)
    mirrors: list[Mirror] = []
    if http.mirror is not None:
        if http.mirror_percentage is not None:
            share = http.mirror_percentage.value
        else:
            share = float(http.mirror_percent) if http.mirror_percent is not None else 100.0
        mirrors.append(Mirror(_cluster_of(scope, rule, http.mirror), share))
    for m in http.mirrors:
        share = m.percentage.value if m.percentage is not None else 100.0
        mirrors.append(Mirror(_cluster_of(scope, rule, m.destination), share))
    headers = _header_rules(http.headers)
    per_destination = any(c.headers is not None for c in clusters)
    cors = _cors(http.cors_policy) if http.cors_policy is not None else None
    policy = RoutePolicy(redirect, direct, rewrite, headers, fault, tuple(m for m in mirrors if m.percent > 0),
                         per_destination, cors)
    return None if policy == RoutePolicy() else policy


def _cors(c: CorsPolicy) -> Cors | None:
    """corsPolicy as the proxy's Cors; None without any allowed origin (Envoy's filter then does nothing).
    The deprecated ``allowOrigin`` strings are exact matches (``*``: any origin), as Istio translates them."""
    origins = [m for sm in c.allow_origins if (m := _string_match(sm)) is not None]
    origins += [MatchSpec("exact", o) for o in c.allow_origin]
    if not origins:
        return None
    return Cors(tuple(origins), tuple(c.allow_methods), tuple(c.allow_headers), tuple(c.expose_headers),
                round(c.max_age) if c.max_age is not None else None, bool(c.allow_credentials),
                c.unmatched_preflights != "IGNORE")


def _fault(f: HTTPFaultInjection) -> Fault | None:
    # exponentialDelay (newer Istio) is taken as a fixed delay of that length.
    delay = f.delay.fixed_delay or f.delay.exponential_delay if f.delay is not None else None
    status = grpc = None
    if f.abort is not None:
        if f.abort.grpc_status is not None:
            grpc = GRPC_CODES.get(f.abort.grpc_status.upper(), GRPC_CODES["UNKNOWN"])
        elif f.abort.http_status is not None:
            status = f.abort.http_status
        else:
            status = 503  # http2Error: no HTTP/2 downstream yet; Envoy's reset shows as a 503 to HTTP/1.1
    return Fault(delay, f.delay.share if f.delay is not None else 0.0, status, grpc,
                 f.abort.share if f.abort is not None else 0.0)


def _header_rules(h: Headers | None) -> HeaderRules | None:
    if h is None:
        return None

    def ops(o: HeaderOperations | None) -> HeaderOps:
        if o is None:
            return HeaderOps()
        return HeaderOps(tuple((k.lower(), v) for k, v in o.set_.items()),
                         tuple((k.lower(), v) for k, v in o.add.items()), tuple(n.lower() for n in o.remove))

    rules = HeaderRules(ops(h.request), ops(h.response))
    return rules if rules else None
