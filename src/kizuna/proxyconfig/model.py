"""What the control plane sends a sidecar: one immutable, versioned snapshot per proxy.

Both planes import this module and nothing heavier: the proxy must start fast and stay small, so the snapshot
is plain frozen dataclasses decoded from JSON by hand (no pydantic, no YAML on the data plane). Durations are
float seconds; ``None`` means "disabled" (Istio's route timeout is off by default).

Names follow Envoy/Istio where they exist: a *cluster* is one (service, port, subset) with its endpoints, a
*virtual host* holds the ordered routes of one service port, a *route* picks weighted clusters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from kizuna.proxyconfig.actions import HeaderRules, RoutePolicy
from kizuna.proxyconfig.policy import DEFAULT_POOL, ConnectionPool, HashPolicy, OutlierDetection
from kizuna.proxyconfig.security import SecurityPolicy

MatchKind = Literal["exact", "prefix", "regex"]
Protocol = Literal["http", "tcp", "auto"]
HttpVersion = Literal["", "1.1", "2"]
"""The HTTP version a destination port speaks (Istio port name / appProtocol: ``http`` → 1.1; ``http2``,
``grpc``, ``h2c`` → 2); empty: not declared, each request goes upstream in the version it came in."""
OutboundPolicy = Literal["ALLOW_ANY", "REGISTRY_ONLY"]
LbPolicy = Literal["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "PASSTHROUGH"]

# Istio's mesh default retry policy (pilot networking/core/route/retry: DefaultPolicy).
DEFAULT_RETRY_ON = frozenset({"connect-failure", "refused-stream", "unavailable", "cancelled",
                              "retriable-status-codes"})
DEFAULT_RETRIABLE_STATUS_CODES = frozenset({503})


def cluster_name(direction: str, port: int, subset: str, host: str) -> str:
    """Istio's cluster naming: ``outbound|9080|v1|reviews.default.svc.cluster.local``."""
    return f"{direction}|{port}|{subset}|{host}"


@dataclass(frozen=True, slots=True)
class StringMatch:
    """Istio StringMatch: exactly one of exact / prefix / regex (RE2 full match; Python ``re`` here)."""

    kind: MatchKind
    value: str
    ignore_case: bool = False
    _regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind == "regex":
            flags = re.IGNORECASE if self.ignore_case else 0
            object.__setattr__(self, "_regex", re.compile(self.value, flags))

    def matches(self, text: str) -> bool:
        """True when ``text`` satisfies this match."""
        if self.kind == "exact":
            return text.lower() == self.value.lower() if self.ignore_case else text == self.value
        if self.kind == "prefix":
            return text.lower().startswith(self.value.lower()) if self.ignore_case else text.startswith(self.value)
        assert self._regex is not None
        return self._regex.fullmatch(text) is not None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {self.kind: self.value}
        if self.ignore_case:
            out["ignoreCase"] = True
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StringMatch:
        ignore = bool(data.get("ignoreCase", False))
        for kind in ("exact", "prefix", "regex"):
            if kind in data:
                return cls(kind, str(data[kind]), ignore)
        raise ValueError(f"string match needs exact, prefix or regex: {data!r}")


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """A header condition. ``match`` None means "header present" (Istio's empty StringMatch)."""

    name: str  # lower-case
    match: StringMatch | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "match": self.match.to_json() if self.match else None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HeaderMatch:
        m = data.get("match")
        return cls(str(data["name"]).lower(), StringMatch.from_json(m) if m else None)


CLAIM_KEY_PREFIX = "@request.auth.claims."
"""A VirtualService ``headers`` / ``withoutHeaders`` key with this prefix matches a claim of the request's
verified JWT, not a header (Istio's JWT claim based routing; supported at gateways only)."""


@dataclass(frozen=True, slots=True)
class ClaimMatch:
    """A condition on the verified JWT's claims: ``path`` walks nested claims (``@request.auth.claims.a.b`` →
    ``("a", "b")``); a string claim must match, a list claim holds when any string element matches;
    ``match`` None means "present". No verified token: the claim is absent."""

    path: tuple[str, ...]
    match: StringMatch | None = None

    @property
    def key(self) -> str:
        """The VirtualService key this came from (``@request.auth.claims.groups``)."""
        return CLAIM_KEY_PREFIX + ".".join(self.path)

    def to_json(self) -> dict[str, Any]:
        return {"path": list(self.path), "match": self.match.to_json() if self.match else None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClaimMatch:
        m = data.get("match")
        return cls(tuple(str(p) for p in data["path"]), StringMatch.from_json(m) if m else None)


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """One HTTPMatchRequest, already narrowed to this proxy (sourceLabels/sourceNamespace resolved at compile).

    All set conditions must hold (AND). A route's matches are OR-ed; a route with no matches matches all.
    """

    uri: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    scheme: StringMatch | None = None
    headers: tuple[HeaderMatch, ...] = ()
    without_headers: tuple[HeaderMatch, ...] = ()
    query_params: tuple[HeaderMatch, ...] = ()
    port: int | None = None
    name: str = ""
    sni_hosts: tuple[str, ...] = ()
    """A TLS route's ``sniHosts`` (only on routes of opaque TCP virtual hosts; see ``proxy/sni.py``)."""
    claims: tuple[ClaimMatch, ...] = ()
    """``@request.auth.claims.*`` keys of ``headers`` (gateways only): claims of the verified JWT."""
    without_claims: tuple[ClaimMatch, ...] = ()
    """``@request.auth.claims.*`` keys of ``withoutHeaders``."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("uri", "method", "authority", "scheme"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value.to_json()
        if self.headers:
            out["headers"] = [h.to_json() for h in self.headers]
        if self.without_headers:
            out["withoutHeaders"] = [h.to_json() for h in self.without_headers]
        if self.query_params:
            out["queryParams"] = [h.to_json() for h in self.query_params]
        if self.port is not None:
            out["port"] = self.port
        if self.name:
            out["name"] = self.name
        if self.sni_hosts:
            out["sniHosts"] = list(self.sni_hosts)
        if self.claims:
            out["claims"] = [c.to_json() for c in self.claims]
        if self.without_claims:
            out["withoutClaims"] = [c.to_json() for c in self.without_claims]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RouteMatch:
        def sm(key: str) -> StringMatch | None:
            return StringMatch.from_json(data[key]) if key in data else None

        return cls(
            uri=sm("uri"), method=sm("method"), authority=sm("authority"), scheme=sm("scheme"),
            headers=tuple(HeaderMatch.from_json(h) for h in data.get("headers", ())),
            without_headers=tuple(HeaderMatch.from_json(h) for h in data.get("withoutHeaders", ())),
            query_params=tuple(HeaderMatch.from_json(h) for h in data.get("queryParams", ())),
            port=data.get("port"), name=str(data.get("name", "")),
            sni_hosts=tuple(str(h) for h in data.get("sniHosts", ())),
            claims=tuple(ClaimMatch.from_json(c) for c in data.get("claims", ())),
            without_claims=tuple(ClaimMatch.from_json(c) for c in data.get("withoutClaims", ())),
        )


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    """A route destination: the cluster to send to and its relative weight."""

    cluster: str
    weight: int
    headers: HeaderRules | None = None
    """Istio's per-destination ``route[].headers``, applied before the route's own (Envoy's order: on a
    conflict the route's ``set`` wins)."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cluster": self.cluster, "weight": self.weight}
        if self.headers is not None:
            out["headers"] = self.headers.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WeightedCluster:
        headers = data.get("headers")
        return cls(str(data["cluster"]), int(data["weight"]),
                   HeaderRules.from_json(headers) if headers is not None else None)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """HTTPRetry: ``attempts`` retries after the first try (Istio semantics), each bounded by ``per_try_timeout``."""

    attempts: int = 2
    per_try_timeout: float | None = None
    retry_on: frozenset[str] = DEFAULT_RETRY_ON
    retriable_status_codes: frozenset[int] = DEFAULT_RETRIABLE_STATUS_CODES
    backoff: float | None = None
    """HTTPRetry ``backoff``: the base interval between retries (None: Envoy's 25 ms)."""

    def to_json(self) -> dict[str, Any]:
        out = {"attempts": self.attempts, "perTryTimeout": self.per_try_timeout,
               "retryOn": sorted(self.retry_on), "retriableStatusCodes": sorted(self.retriable_status_codes)}
        if self.backoff is not None:
            out["backoff"] = self.backoff
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RetryPolicy:
        return cls(int(data.get("attempts", 2)), data.get("perTryTimeout"),
                   frozenset(data.get("retryOn", DEFAULT_RETRY_ON)),
                   frozenset(int(c) for c in data.get("retriableStatusCodes", DEFAULT_RETRIABLE_STATUS_CODES)),
                   data.get("backoff"))


NO_RETRY = RetryPolicy(attempts=0)


@dataclass(frozen=True, slots=True)
class RouteAction:
    """Where a matched request goes: weighted clusters, an overall timeout (None = off) and the retry policy."""

    clusters: tuple[WeightedCluster, ...]
    timeout: float | None = None
    retry: RetryPolicy = RetryPolicy()
    policy: RoutePolicy | None = None
    """Redirect, direct response, rewrite, headers, fault, mirrors (``actions.py``); None when the route has
    none of them. A redirect or direct response route has no clusters."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"clusters": [c.to_json() for c in self.clusters], "timeout": self.timeout,
                               "retry": self.retry.to_json()}
        if self.policy is not None:
            out["policy"] = self.policy.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RouteAction:
        policy = data.get("policy")
        return cls(tuple(WeightedCluster.from_json(c) for c in data["clusters"]), data.get("timeout"),
                   RetryPolicy.from_json(data.get("retry", {})),
                   RoutePolicy.from_json(policy) if policy is not None else None)


@dataclass(frozen=True, slots=True)
class Route:
    """An ordered HTTP route; first match wins. ``source`` names the VirtualService it came from (for explain)."""

    name: str
    matches: tuple[RouteMatch, ...]
    action: RouteAction
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "matches": [m.to_json() for m in self.matches],
                "action": self.action.to_json(), "source": self.source}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Route:
        return cls(str(data["name"]), tuple(RouteMatch.from_json(m) for m in data.get("matches", ())),
                   RouteAction.from_json(data["action"]), str(data.get("source", "")))


@dataclass(frozen=True, slots=True)
class VirtualHost:
    """The routes for one service port. ``hosts`` are every name the service answers to, without port:
    ``httpbin``, ``httpbin.default``, ``httpbin.default.svc``, ``httpbin.default.svc.cluster.local``.
    A request matches on (host, port); a Host header without a port means port 80."""

    name: str
    hosts: tuple[str, ...]
    port: int
    protocol: Protocol
    routes: tuple[Route, ...]
    addresses: tuple[str, ...] = ()
    """The service's virtual IPs (``spec.clusterIP``; a ServiceEntry's addresses, CIDR blocks written
    ``a.b.c.d/n``): with transparent capture, a connection whose original destination is ``address:port``
    (or in such a block, the longest prefix winning) belongs to this virtual host (how opaque TCP is routed)."""

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "hosts": list(self.hosts), "port": self.port, "protocol": self.protocol,
               "routes": [r.to_json() for r in self.routes]}
        if self.addresses:
            out["addresses"] = list(self.addresses)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VirtualHost:
        return cls(str(data["name"]), tuple(data["hosts"]), int(data["port"]), data.get("protocol", "http"),
                   tuple(Route.from_json(r) for r in data["routes"]), tuple(data.get("addresses", ())))


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A ready workload instance that serves a cluster: dial ``address:port`` (the instance's sidecar inbound)."""

    address: str
    port: int
    workload: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    identity: str = ""
    """The SPIFFE identity (``cluster.local/ns/default/sa/httpbin``) of an endpoint with a sidecar: the
    client talks mTLS to it and accepts no other peer certificate (secure naming); empty: plaintext."""

    def to_json(self) -> dict[str, Any]:
        out = {"address": self.address, "port": self.port, "workload": self.workload, "labels": dict(self.labels)}
        if self.identity:
            out["identity"] = self.identity
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Endpoint:
        return cls(str(data["address"]), int(data["port"]), str(data.get("workload", "")),
                   tuple(sorted(dict(data.get("labels", {})).items())), str(data.get("identity", "")))


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """TLS a proxy originates to a cluster's endpoints (DestinationRule ``tls.mode`` SIMPLE or MUTUAL).

    Paths are files on the proxy's host, read by the proxy itself. With no ``ca_certificates`` the system
    trust store verifies the server; ``insecure_skip_verify`` verifies nothing. ``sni`` defaults to the
    cluster's service host; ``subject_alt_names``, when set, replace host-name checking: the server
    certificate must carry one of them."""

    mode: str
    """``SIMPLE`` (server authentication) or ``MUTUAL`` (plus ``client_certificate`` / ``private_key``)."""
    ca_certificates: str = ""
    client_certificate: str = ""
    private_key: str = ""
    sni: str = ""
    subject_alt_names: tuple[str, ...] = ()
    insecure_skip_verify: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode}
        for key, value in (("caCertificates", self.ca_certificates), ("clientCertificate", self.client_certificate),
                           ("privateKey", self.private_key), ("sni", self.sni)):
            if value:
                out[key] = value
        if self.subject_alt_names:
            out["subjectAltNames"] = list(self.subject_alt_names)
        if self.insecure_skip_verify:
            out["insecureSkipVerify"] = True
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UpstreamTls:
        return cls(str(data["mode"]), str(data.get("caCertificates", "")), str(data.get("clientCertificate", "")),
                   str(data.get("privateKey", "")), str(data.get("sni", "")),
                   tuple(str(n) for n in data.get("subjectAltNames", ())), bool(data.get("insecureSkipVerify")))


@dataclass(frozen=True, slots=True)
class ServerTls:
    """How a gateway server terminates (``SIMPLE``, ``MUTUAL``, ``OPTIONAL_MUTUAL``) or passes on (``PASSTHROUGH``) TLS.

    Certificates are files on the gateway's host that the gateway proxy reads itself (private keys never pass
    through the control plane): ``server_certificate`` / ``private_key`` / ``ca_certificates`` as written in
    the Gateway, or ``credential_name``, which the proxy resolves to ``<credentials dir>/<name>/`` holding
    Istio's secret keys ``tls.crt``, ``tls.key`` and ``ca.crt``. ``hosts`` (no namespace part) select this
    server by the ClientHello's SNI."""

    hosts: tuple[str, ...]
    mode: str
    server_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    credential_name: str = ""
    min_protocol_version: str = ""
    """``TLSV1_2`` etc.; empty: TLS 1.2 (Istio's gateway default)."""
    max_protocol_version: str = ""
    subject_alt_names: tuple[str, ...] = ()
    """MUTUAL: a client certificate must carry one of these (empty: any the CA signed)."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"hosts": list(self.hosts), "mode": self.mode}
        for key, value in (("serverCertificate", self.server_certificate), ("privateKey", self.private_key),
                           ("caCertificates", self.ca_certificates), ("credentialName", self.credential_name),
                           ("minProtocolVersion", self.min_protocol_version),
                           ("maxProtocolVersion", self.max_protocol_version)):
            if value:
                out[key] = value
        if self.subject_alt_names:
            out["subjectAltNames"] = list(self.subject_alt_names)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServerTls:
        return cls(tuple(str(h) for h in data.get("hosts", ())), str(data["mode"]),
                   str(data.get("serverCertificate", "")), str(data.get("privateKey", "")),
                   str(data.get("caCertificates", "")), str(data.get("credentialName", "")),
                   str(data.get("minProtocolVersion", "")), str(data.get("maxProtocolVersion", "")),
                   tuple(str(n) for n in data.get("subjectAltNames", ())))


@dataclass(frozen=True, slots=True)
class Cluster:
    """One (service, port, subset) and its ready endpoints, with the DestinationRule policy that applies."""

    name: str
    service: str  # FQDN, e.g. httpbin.default.svc.cluster.local
    port: int
    subset: str
    protocol: Protocol
    lb_policy: LbPolicy
    endpoints: tuple[Endpoint, ...]
    connect_timeout: float = 10.0
    connection_pool: ConnectionPool = DEFAULT_POOL
    outlier_detection: OutlierDetection | None = None
    hash_policy: HashPolicy | None = None
    """Set for ``consistentHash``: the balancer hashes a request key instead of using ``lb_policy``."""
    http_version: HttpVersion = ""
    """The HTTP version the endpoints speak; empty: as the request came."""
    tls: UpstreamTls | None = None
    """TLS originated to the endpoints (DestinationRule SIMPLE / MUTUAL); None: plaintext or mesh mTLS."""
    undefined_subset: bool = False
    """A route names ``subset`` but no DestinationRule defines it: Istio generates no such cluster, so the
    proxy answers 503 cluster not found (NC) rather than no healthy upstream."""

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "service": self.service, "port": self.port, "subset": self.subset,
               "protocol": self.protocol, "lbPolicy": self.lb_policy,
               "endpoints": [e.to_json() for e in self.endpoints], "connectTimeout": self.connect_timeout}
        if not self.connection_pool.is_default():
            out["connectionPool"] = self.connection_pool.to_json()
        if self.outlier_detection is not None:
            out["outlierDetection"] = self.outlier_detection.to_json()
        if self.hash_policy is not None:
            out["hashPolicy"] = self.hash_policy.to_json()
        if self.http_version:
            out["httpVersion"] = self.http_version
        if self.tls is not None:
            out["tls"] = self.tls.to_json()
        if self.undefined_subset:
            out["undefinedSubset"] = True
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Cluster:
        return cls(str(data["name"]), str(data["service"]), int(data["port"]), str(data.get("subset", "")),
                   data.get("protocol", "http"), data.get("lbPolicy", "LEAST_REQUEST"),
                   tuple(Endpoint.from_json(e) for e in data.get("endpoints", ())),
                   float(data.get("connectTimeout", 10.0)),
                   ConnectionPool.from_json(data["connectionPool"]) if "connectionPool" in data else DEFAULT_POOL,
                   OutlierDetection.from_json(data["outlierDetection"]) if "outlierDetection" in data else None,
                   HashPolicy.from_json(data["hashPolicy"]) if "hashPolicy" in data else None,
                   data.get("httpVersion", ""),
                   UpstreamTls.from_json(data["tls"]) if "tls" in data else None,
                   bool(data.get("undefinedSubset", False)))


@dataclass(frozen=True, slots=True)
class InboundPort:
    """Traffic for this workload: the sidecar listens on ``port`` of its inbound address and forwards to the app
    at ``target_address:target_port``. ``protocol`` "auto" means sniff (HTTP/1.1 or opaque TCP)."""

    port: int
    target_address: str
    target_port: int
    protocol: Protocol = "auto"
    http_version: HttpVersion = ""
    """The HTTP version the app speaks on this port; empty: as the request came."""

    def to_json(self) -> dict[str, Any]:
        out = {"port": self.port, "targetAddress": self.target_address, "targetPort": self.target_port,
               "protocol": self.protocol}
        if self.http_version:
            out["httpVersion"] = self.http_version
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InboundPort:
        return cls(int(data["port"]), str(data["targetAddress"]), int(data["targetPort"]),
                   data.get("protocol", "auto"), data.get("httpVersion", ""))


@dataclass(frozen=True, slots=True)
class GatewayListener:
    """A port of a gateway proxy (``Node.kind == "gateway"``): the Gateway servers on it, merged.

    ``port`` is the gateway workload's port, after Istio's ingress Service mapping (server port 80 → 8080,
    443 → 8443, any other port as itself); the proxy binds it where its bootstrap says. HTTP listeners route
    by Host over the snapshot's virtual hosts of this ``port`` (hosts may be ``*`` or ``*.suffix``); TCP
    listeners send every connection along the first route of the virtual host ``*`` of this ``port``.
    ``problem`` names the servers on this port that are not served and why (ISTIO_MUTUAL, for one, is
    not supported); a listener with no ``server_ports`` served is not bound at all."""

    port: int
    protocol: Protocol
    server_ports: tuple[int, ...] = ()
    """The Gateway server ports (``port.number``) served here (empty: nothing is, see ``problem``)."""
    gateways: tuple[str, ...] = ()
    """``namespace/name`` of the Gateways with servers on this port (for status and explain)."""
    problem: str = ""
    tls: tuple[ServerTls, ...] = ()
    """The TLS servers of this port, in Gateway order: all terminate (then HTTP or TCP as ``protocol``
    says) or all are ``PASSTHROUGH`` (a ``tcp`` listener routing each connection by SNI over the ``tls[]``
    routes of virtual host ``*``). Empty: plaintext."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"port": self.port, "protocol": self.protocol,
                               "serverPorts": list(self.server_ports), "gateways": list(self.gateways)}
        if self.problem:
            out["problem"] = self.problem
        if self.tls:
            out["tls"] = [t.to_json() for t in self.tls]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GatewayListener:
        return cls(int(data["port"]), data.get("protocol", "http"),
                   tuple(int(p) for p in data.get("serverPorts", ())), tuple(data.get("gateways", ())),
                   str(data.get("problem", "")), tuple(ServerTls.from_json(t) for t in data.get("tls", ())))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one proxy needs, swapped in whole. Connections in flight keep the snapshot they started with."""

    version: str
    inbound: tuple[InboundPort, ...] = ()
    virtual_hosts: tuple[VirtualHost, ...] = ()
    clusters: tuple[Cluster, ...] = ()
    outbound_policy: OutboundPolicy = "ALLOW_ANY"
    """Istio's ``outboundTrafficPolicy.mode``: what happens to traffic for a destination the snapshot does not
    know. ALLOW_ANY passes it through (transparent capture); REGISTRY_ONLY refuses it (HTTP 502, TCP closed)."""
    gateway_listeners: tuple[GatewayListener, ...] = ()
    """A gateway proxy's ports (empty for a sidecar)."""
    security: SecurityPolicy | None = None
    """Inbound peer authentication, authorization and JWT rules (``security.py``); None: nothing enforced."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "inbound": [p.to_json() for p in self.inbound],
                               "virtualHosts": [v.to_json() for v in self.virtual_hosts],
                               "clusters": [c.to_json() for c in self.clusters]}
        if self.outbound_policy != "ALLOW_ANY":
            out["outboundPolicy"] = self.outbound_policy
        if self.gateway_listeners:
            out["gatewayListeners"] = [g.to_json() for g in self.gateway_listeners]
        if self.security is not None:
            out["security"] = self.security.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Snapshot:
        policy = data.get("outboundPolicy", "ALLOW_ANY")
        if policy not in ("ALLOW_ANY", "REGISTRY_ONLY"):
            raise ValueError(f"outboundPolicy: {policy!r} is not ALLOW_ANY or REGISTRY_ONLY")
        return cls(str(data["version"]),
                   tuple(InboundPort.from_json(p) for p in data.get("inbound", ())),
                   tuple(VirtualHost.from_json(v) for v in data.get("virtualHosts", ())),
                   tuple(Cluster.from_json(c) for c in data.get("clusters", ())),
                   "REGISTRY_ONLY" if policy == "REGISTRY_ONLY" else "ALLOW_ANY",
                   tuple(GatewayListener.from_json(g) for g in data.get("gatewayListeners", ())),
                   SecurityPolicy.from_json(data["security"]) if "security" in data else None)


EMPTY_SNAPSHOT = Snapshot(version="")
