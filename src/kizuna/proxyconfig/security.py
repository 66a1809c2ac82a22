"""What one workload's sidecar enforces inbound: peer authentication, authorization policies, JWT rules.

The control plane has already narrowed everything to the workload (Istio's selection: root namespace policies
mesh-wide, namespace policies for the namespace, ``selector`` for workloads; the most specific
PeerAuthentication wins), so the proxy only evaluates. Rule values are kept as Istio writes them (``"/api/*"``,
``"*.example.com"``, ``"10.0.0.0/8"``); ``proxy/authz.py`` compiles them into matchers. Plain frozen dataclasses
with hand-written JSON; fields at their defaults are left out, so digests only change when a policy does.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

MtlsMode = Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]
Action = Literal["ALLOW", "DENY", "AUDIT", "CUSTOM"]


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _strings(obj: Any) -> dict[str, Any]:
    """JSON of a dataclass whose fields are all tuples of strings: empty ones left out."""
    return {_camel(f.name): list(getattr(obj, f.name)) for f in fields(obj) if getattr(obj, f.name)}


def _tuple(data: dict[str, Any], name: str) -> tuple[str, ...]:
    return tuple(str(v) for v in data.get(_camel(name), ()))


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    """The workload's effective mTLS mode and its per-port overrides (Istio's PERMISSIVE when nothing says)."""

    mode: MtlsMode = "PERMISSIVE"
    port_modes: tuple[tuple[int, MtlsMode], ...] = ()
    """``portLevelMtls`` for ports the workload exposes, sorted by port."""
    source: str = ""
    """``namespace/name`` of the policy that decided ``mode`` (for status and explain)."""

    def mode_for(self, port: int) -> MtlsMode:
        """The mode on ``port``: its port-level override, else the workload's."""
        for number, mode in self.port_modes:
            if number == port:
                return mode
        return self.mode

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode}
        if self.port_modes:
            out["portModes"] = {str(p): m for p, m in self.port_modes}
        if self.source:
            out["source"] = self.source
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PeerAuthentication:
        return cls(data.get("mode", "PERMISSIVE"),
                   tuple(sorted((int(p), m) for p, m in dict(data.get("portModes", {})).items())),
                   str(data.get("source", "")))


@dataclass(frozen=True, slots=True)
class Source:
    """``rules[].from[].source``: each set field must match (AND), each value list is an OR."""

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return _strings(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Source:
        return cls(*(_tuple(data, f.name) for f in fields(cls)))


@dataclass(frozen=True, slots=True)
class Operation:
    """``rules[].to[].operation``."""

    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()
    not_ports: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return _strings(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Operation:
        return cls(*(_tuple(data, f.name) for f in fields(cls)))


@dataclass(frozen=True, slots=True)
class Condition:
    """``rules[].when[]``: attribute ``key`` has one of ``values`` (if any) and none of ``not_values``."""

    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key}
        if self.values:
            out["values"] = list(self.values)
        if self.not_values:
            out["notValues"] = list(self.not_values)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Condition:
        return cls(str(data["key"]), _tuple(data, "values"), _tuple(data, "not_values"))


@dataclass(frozen=True, slots=True)
class Rule:
    """Matches when one source (if any), one operation (if any) and every condition match."""

    sources: tuple[Source, ...] = ()
    operations: tuple[Operation, ...] = ()
    conditions: tuple[Condition, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.sources:
            out["from"] = [s.to_json() for s in self.sources]
        if self.operations:
            out["to"] = [o.to_json() for o in self.operations]
        if self.conditions:
            out["when"] = [c.to_json() for c in self.conditions]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Rule:
        return cls(tuple(Source.from_json(s) for s in data.get("from", ())),
                   tuple(Operation.from_json(o) for o in data.get("to", ())),
                   tuple(Condition.from_json(c) for c in data.get("when", ())))


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    """One AuthorizationPolicy selecting this workload. No rules: matches nothing (ALLOW: deny all)."""

    name: str
    """``namespace/name``."""
    action: Action = "ALLOW"
    rules: tuple[Rule, ...] = ()
    provider: str = ""
    """CUSTOM's extension provider."""
    dry_run: bool = False
    """``istio.io/dry-run: "true"``: evaluated and counted, never enforced."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "action": self.action, "rules": [r.to_json() for r in self.rules]}
        if self.provider:
            out["provider"] = self.provider
        if self.dry_run:
            out["dryRun"] = True
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AuthorizationPolicy:
        action = data.get("action", "ALLOW")
        if action not in ("ALLOW", "DENY", "AUDIT", "CUSTOM"):
            raise ValueError(f"authorization action must be ALLOW, DENY, AUDIT or CUSTOM, not {action!r}")
        return cls(str(data["name"]), action, tuple(Rule.from_json(r) for r in data.get("rules", ())),
                   str(data.get("provider", "")), bool(data.get("dryRun", False)))


@dataclass(frozen=True, slots=True)
class JwtRule:
    """One RequestAuthentication ``jwtRules`` entry: an accepted issuer, its keys and where tokens are."""

    issuer: str
    audiences: tuple[str, ...] = ()
    jwks_uri: str = ""
    jwks: str = ""
    """Inline JWKS (JSON text); used instead of ``jwks_uri`` when set."""
    from_headers: tuple[tuple[str, str], ...] = ()
    """(header name, prefix); with no from_headers / from_params: ``Authorization: Bearer`` and the
    ``access_token`` query parameter (Envoy's default)."""
    from_params: tuple[str, ...] = ()
    from_cookies: tuple[str, ...] = ()
    output_payload_to_header: str = ""
    output_claim_to_headers: tuple[tuple[str, str], ...] = ()
    """(header, claim)."""
    forward_original_token: bool = False
    timeout: float = 5.0
    """How long a JWKS fetch may take."""
    source: str = ""
    """``namespace/name`` of the RequestAuthentication."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"issuer": self.issuer}
        for name in ("audiences", "from_params", "from_cookies"):
            if getattr(self, name):
                out[_camel(name)] = list(getattr(self, name))
        for name in ("jwks_uri", "jwks", "output_payload_to_header", "source"):
            if getattr(self, name):
                out[_camel(name)] = getattr(self, name)
        if self.from_headers:
            out["fromHeaders"] = [{"name": n, "prefix": p} for n, p in self.from_headers]
        if self.output_claim_to_headers:
            out["outputClaimToHeaders"] = [{"header": h, "claim": c} for h, c in self.output_claim_to_headers]
        if self.forward_original_token:
            out["forwardOriginalToken"] = True
        if self.timeout != 5.0:
            out["timeout"] = self.timeout
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JwtRule:
        return cls(str(data["issuer"]), _tuple(data, "audiences"), str(data.get("jwksUri", "")),
                   str(data.get("jwks", "")),
                   tuple((str(h["name"]), str(h.get("prefix", ""))) for h in data.get("fromHeaders", ())),
                   _tuple(data, "from_params"), _tuple(data, "from_cookies"),
                   str(data.get("outputPayloadToHeader", "")),
                   tuple((str(h["header"]), str(h["claim"])) for h in data.get("outputClaimToHeaders", ())),
                   bool(data.get("forwardOriginalToken", False)), float(data.get("timeout", 5.0)),
                   str(data.get("source", "")))


@dataclass(frozen=True, slots=True)
class SecurityPolicy:
    """Everything one workload enforces on inbound traffic. ``Snapshot.security`` is None when nothing does."""

    peer_authentication: PeerAuthentication | None = None
    """None: no PeerAuthentication selects the workload (Istio's default PERMISSIVE)."""
    authorization: tuple[AuthorizationPolicy, ...] = ()
    """Sorted by (action, name); evaluation order is by action (CUSTOM, DENY, ALLOW), AUDIT aside."""
    jwt_rules: tuple[JwtRule, ...] = ()

    @property
    def enforces_requests(self) -> bool:
        """True when requests must be checked (authorization or JWT), not only connections' mTLS mode."""
        return bool(self.authorization or self.jwt_rules)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.peer_authentication is not None:
            out["peerAuthentication"] = self.peer_authentication.to_json()
        if self.authorization:
            out["authorization"] = [p.to_json() for p in self.authorization]
        if self.jwt_rules:
            out["jwtRules"] = [r.to_json() for r in self.jwt_rules]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SecurityPolicy:
        peer = data.get("peerAuthentication")
        return cls(PeerAuthentication.from_json(peer) if peer is not None else None,
                   tuple(AuthorizationPolicy.from_json(p) for p in data.get("authorization", ())),
                   tuple(JwtRule.from_json(r) for r in data.get("jwtRules", ())))
