"""Why a request goes where it goes: the proxy's own route matching, replayed on a snapshot and narrated.

``explain(snapshot, ...)`` runs :class:`~kizuna.proxy.router.Router` (the code the sidecar runs) to pick the
route, and for every route before it the router's ``why_not`` says which condition failed (the same
``_Request.failure`` that chose the route, worded). The answer is plain data (``to_json``) for
``kizuna explain``; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kizuna.proxy.authz import Attributes, Authorizer, Decision, Peer, PolicyVerdict, normalize_path
from kizuna.proxy.router import Router, why_not
from kizuna.proxyconfig.model import Cluster, Route, Snapshot
from kizuna.proxyconfig.security import SecurityPolicy


@dataclass(frozen=True, slots=True)
class RouteVerdict:
    """One route of the virtual host, in order: whether the request matched it, else why not."""

    name: str
    source: str
    matched: bool
    reasons: tuple[str, ...] = ()
    """For a route that did not match: per ``match[]`` entry, the first condition that failed."""


@dataclass(frozen=True, slots=True)
class Explanation:
    """Where a request goes, from one proxy's point of view."""

    host: str
    port: int
    method: str
    path: str
    virtual_host: str | None
    routes: tuple[RouteVerdict, ...] = ()
    route: Route | None = None
    clusters: tuple[tuple[int, Cluster | None, str], ...] = field(default=())
    """(weight, cluster or None when the snapshot lacks it, cluster name) of the chosen route."""
    ejected: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """``address:port`` of the endpoints outlier detection holds out, by cluster name (live sidecar state)."""

    def health(self, cluster: str, address: str, port: int) -> str:
        """``healthy`` (ready, in the balancer) or ``ejected`` (held out by outlier detection)."""
        return "ejected" if f"{address}:{port}" in self.ejected.get(cluster, ()) else "healthy"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"request": {"host": self.host, "port": self.port, "method": self.method,
                                           "path": self.path},
                               "virtualHost": self.virtual_host,
                               "routes": [{"name": v.name, "source": v.source, "matched": v.matched,
                                           "reasons": list(v.reasons)} for v in self.routes]}
        if self.route is not None:
            action = self.route.action
            out["route"] = {"name": self.route.name, "source": self.route.source,
                            "timeout": action.timeout, "retry": action.retry.to_json(),
                            "policy": action.policy.to_json() if action.policy else None}
            out["destinations"] = [
                {"weight": weight, "cluster": name,
                 **({"subset": c.subset, **({"undefinedSubset": True} if c.undefined_subset else {}),
                     "lbPolicy": c.lb_policy, "connectTimeout": c.connect_timeout,
                     "endpoints": [{**e.to_json(), "health": self.health(name, e.address, e.port)}
                                   for e in c.endpoints],
                     "policies": {k: v for k, v in c.to_json().items()
                                  if k in ("connectionPool", "outlierDetection", "hashPolicy")}}
                    if c is not None else {"missing": True})}
                for weight, c, name in self.clusters]
        return out


def explain(snapshot: Snapshot, host: str, port: int, method: str, path: str, headers: Mapping[str, str],
            ejected: Mapping[str, frozenset[str]] | None = None) -> Explanation:
    """Replay the proxy's routing of one request over ``snapshot``; ``headers`` by lower-case name;
    ``ejected``: the sidecar's outlier ejections by cluster, when known."""
    host = host.lower().rstrip(".")
    router = Router(snapshot)
    vh = router.virtual_host(host, port)
    if vh is None:
        return Explanation(host, port, method, path, None)
    chosen = router.select(host, port, method, path, headers)
    verdicts = []
    for route in vh.routes:
        if route is chosen:
            verdicts.append(RouteVerdict(route.name, route.source, True))
            break
        # The router's own verdict, worded (every match of a skipped route fails, so none says None).
        reasons = tuple(why_not(m, port, method, path, headers) or "matches" for m in route.matches)
        verdicts.append(RouteVerdict(route.name, route.source, False, reasons))
    clusters: tuple[tuple[int, Cluster | None, str], ...] = ()
    if chosen is not None:
        by_name = {c.name: c for c in snapshot.clusters}
        clusters = tuple((w.weight, by_name.get(w.cluster), w.cluster) for w in chosen.action.clusters)
    return Explanation(host, port, method, path, vh.name, tuple(verdicts), chosen, clusters, ejected or {})


@dataclass(frozen=True, slots=True)
class AuthzExplanation:
    """The destination sidecar's authorization decision for a request, as its inbound side would make it."""

    destination: str
    """The destination instance (``httpbin-v1-0.default``)."""
    port: int
    principal: str
    """The source identity presented over mTLS ("" when the hop is plaintext: no principal)."""
    mtls_mode: str
    decision: Decision
    verdicts: tuple[PolicyVerdict, ...] = ()
    jwt_rules: tuple[str, ...] = ()
    """RequestAuthentications that select the destination (tokens are not verified here)."""
    refused: str = ""
    """Why the connection is refused before any policy is evaluated (plaintext under STRICT)."""
    source_ip: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"destination": self.destination, "port": self.port, "principal": self.principal or None,
                "sourceIp": self.source_ip,
                "mtls": self.mtls_mode, "allowed": self.decision.allowed,
                "policy": self.decision.policy or None, "audited": list(self.decision.audited),
                "dryRun": list(self.decision.dry_run), "policies": [v.to_json() for v in self.verdicts],
                "requestAuthentication": list(self.jwt_rules),
                **({"refused": self.refused} if self.refused else {})}

    def mode_text(self) -> str:
        """The PeerAuthentication mode on this port."""
        return self.mtls_mode

    def reason(self) -> str:
        """The decision in words, Istio's rules spelled out."""
        d = self.decision
        if self.refused:
            return self.refused
        if not d.allowed:
            return (f"denied by DENY policy {d.policy} -> 403 RBAC: access denied" if d.policy
                    else "denied: ALLOW policies select the workload and none matches -> 403 RBAC: access denied")
        if d.policy:
            return f"allowed by ALLOW policy {d.policy}"
        return "allowed: no ALLOW policy selects the workload and no DENY policy matches"


def explain_authorization(security: SecurityPolicy | None, destination: str, port: int, method: str, path: str,
                          headers: Mapping[str, str], source_ip: str, principal: str) -> AuthzExplanation:
    """Replay the destination's inbound authorization (``Authorizer``, the code its sidecar runs) for one
    request from a source with SPIFFE ``principal`` (without ``spiffe://``; "" for plaintext). End-user
    (JWT) attributes are not evaluated: explain has no token to verify."""
    security = security or SecurityPolicy()
    peer_auth = security.peer_authentication
    mode = peer_auth.mode_for(port) if peer_auth is not None else "PERMISSIVE"
    namespace = ""
    if "/ns/" in principal:
        namespace = principal.split("/ns/", 1)[1].split("/", 1)[0]
    attrs = Attributes(source_ip=source_ip, destination_port=port,
                       peer=Peer(principal, namespace) if principal else None, method=method,
                       path=normalize_path(path), host=headers.get("host", ""),
                       headers={**headers, ":authority": headers.get("host", "")})
    jwt = tuple(dict.fromkeys(r.source or r.issuer for r in security.jwt_rules))
    if mode == "STRICT" and not principal:
        source = peer_auth.source if peer_auth is not None and peer_auth.source else "mesh default"
        return AuthzExplanation(destination, port, principal, mode, Decision(False), (), jwt,
                                f"refused: plaintext under PeerAuthentication STRICT ({source}) -> 403 mTLS required",
                                source_ip)
    if not security.authorization:
        return AuthzExplanation(destination, port, principal, mode, Decision(True), (), jwt, source_ip=source_ip)
    decision, verdicts = Authorizer(security.authorization).explain(attrs)
    return AuthzExplanation(destination, port, principal, mode, decision, verdicts, jwt, source_ip=source_ip)
