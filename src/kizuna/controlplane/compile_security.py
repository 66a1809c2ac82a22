"""PeerAuthentication, AuthorizationPolicy and RequestAuthentication → one workload's ``SecurityPolicy``.

Istio's selection: a policy in the root namespace (``istio-system``) applies mesh-wide, a policy elsewhere to
its own namespace, and ``selector.matchLabels`` narrows it to the workloads whose labels contain them (for
AuthorizationPolicy and RequestAuthentication a selector in the root namespace matches workloads of every
namespace; a PeerAuthentication with a selector only ever selects workloads of its own namespace). Policies
with ``targetRef(s)`` attach to Gateway API resources, which kizuna does not run: they select no workload.

For PeerAuthentication the most specific policy wins (workload > namespace > mesh; at one level the first by
name, as Istio takes the oldest), ``UNSET`` inherits from the level above, the mesh default is PERMISSIVE, and
``portLevelMtls`` counts only for ports the workload serves.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

from kizuna.api.security import (
    ROOT_NAMESPACE,
    AuthorizationPolicySpec,
    PeerAuthenticationSpec,
    RequestAuthenticationSpec,
    WorkloadSelector,
)
from kizuna.api.security import Condition as ApiCondition
from kizuna.api.security import Rule as ApiRule
from kizuna.api.security import Source as ApiSource
from kizuna.api.validate import Resource
from kizuna.controlplane.compile_index import MeshIndex, labels_match
from kizuna.controlplane.credentials import DEFAULT_TRUST_DOMAIN
from kizuna.proxyconfig.bootstrap import Node
from kizuna.proxyconfig.security import (
    AuthorizationPolicy,
    Condition,
    JwtRule,
    MtlsMode,
    Operation,
    PeerAuthentication,
    Rule,
    SecurityPolicy,
    Source,
)

DRY_RUN_ANNOTATION = "istio.io/dry-run"
_ACTION_ORDER = {"CUSTOM": 0, "DENY": 1, "ALLOW": 2, "AUDIT": 3}


def compile_security(index: MeshIndex, node: Node, ports: Iterable[int] = ()) -> SecurityPolicy | None:
    """What ``node``'s proxy enforces inbound on ``ports``; None when no security policy selects it."""
    peer = _peer_authentication(index.security, node, set(ports)) if node.kind == "sidecar" else None
    policies: list[AuthorizationPolicy] = []
    rules: list[JwtRule] = []
    for r in index.security:
        if isinstance(r.spec, AuthorizationPolicySpec) and _applies(r, r.spec.selector, r.spec, node):
            policies.append(_policy(r, r.spec, index.trust_domain))
        elif isinstance(r.spec, RequestAuthenticationSpec) and _applies(r, r.spec.selector, r.spec, node):
            rules.extend(_jwt_rules(r, r.spec))
    if peer is None and not policies and not rules:
        return None
    policies.sort(key=lambda p: (_ACTION_ORDER[p.action], p.name))
    return SecurityPolicy(peer, tuple(policies), tuple(rules))


def _applies(r: Resource, selector: WorkloadSelector | None,
             spec: AuthorizationPolicySpec | RequestAuthenticationSpec, node: Node) -> bool:
    if spec.target_ref is not None or spec.target_refs:
        return False
    if r.namespace != ROOT_NAMESPACE and r.namespace != node.namespace:
        return False
    return selector is None or labels_match(selector.match_labels, node.labels)


def mtls_disabled(index: MeshIndex, node: Node, port: int) -> bool:
    """True when PeerAuthentication turns mTLS off for ``node`` on its container ``port``: clients then talk
    plaintext to it, as Istio's auto mTLS does for such endpoints (a TLS client would reach the app as noise)."""
    if not any(isinstance(r.spec, PeerAuthenticationSpec) for r in index.security):
        return False
    peer = _peer_authentication(index.security, node, {port})
    return peer is not None and peer.mode_for(port) == "DISABLE"


def _peer_authentication(resources: Sequence[Resource], node: Node, ports: set[int]) -> PeerAuthentication | None:
    mesh = namespace = workload = None
    for r in resources:  # sorted by (kind, namespace, name): the first at each level wins
        spec = r.spec
        if not isinstance(spec, PeerAuthenticationSpec):
            continue
        if spec.selector is not None and spec.selector.match_labels:
            if r.namespace == node.namespace and labels_match(spec.selector.match_labels, node.labels):
                workload = workload or r
        elif r.namespace == node.namespace and r.namespace != ROOT_NAMESPACE:
            namespace = namespace or r
        elif r.namespace == ROOT_NAMESPACE:
            mesh = mesh or r
    if mesh is None and namespace is None and workload is None:
        return None
    mode: MtlsMode = "PERMISSIVE"
    source = ""
    for chosen in (mesh, namespace, workload):  # least specific first: a set mode overrides what came before
        if chosen is None:
            continue
        assert isinstance(chosen.spec, PeerAuthenticationSpec)
        if chosen.spec.mtls is not None and chosen.spec.mtls.mode != "UNSET":
            mode, source = chosen.spec.mtls.mode, f"{chosen.namespace}/{chosen.name}"
    port_modes: list[tuple[int, MtlsMode]] = []
    if workload is not None:
        assert isinstance(workload.spec, PeerAuthenticationSpec)
        for port, setting in sorted(workload.spec.port_level_mtls.items()):
            if port in ports:
                port_modes.append((port, mode if setting.mode == "UNSET" else setting.mode))
    return PeerAuthentication(mode, tuple(port_modes), source)


def _policy(r: Resource, spec: AuthorizationPolicySpec, trust_domain: str) -> AuthorizationPolicy:
    dry_run = r.metadata.annotations.get(DRY_RUN_ANNOTATION, "").lower() == "true"
    rules = tuple(_local(_rule(rule), trust_domain) for rule in spec.rules)
    return AuthorizationPolicy(f"{r.namespace}/{r.name}", spec.action, rules,
                               spec.provider.name if spec.provider is not None else "", dry_run)


def _rule(rule: ApiRule) -> Rule:
    sources = tuple(_source(f.source) for f in rule.from_ if f.source is not None)
    operations = tuple(Operation(tuple(op.hosts), tuple(op.not_hosts), tuple(op.ports), tuple(op.not_ports),
                                 tuple(op.methods), tuple(op.not_methods), tuple(op.paths), tuple(op.not_paths))
                       for op in (t.operation for t in rule.to) if op is not None)
    return Rule(sources, operations, tuple(_condition(c) for c in rule.when))


def _local(rule: Rule, trust_domain: str) -> Rule:
    """Istio's rule for principals naming ``cluster.local``: it stands for the mesh's own trust domain (so
    Istio's samples work unchanged in a mesh with another one); principals in other domains stay as written."""
    if trust_domain == DEFAULT_TRUST_DOMAIN:
        return rule

    def local(values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(trust_domain + v[len(DEFAULT_TRUST_DOMAIN):] if v.startswith(DEFAULT_TRUST_DOMAIN + "/")
                     else v for v in values)

    sources = tuple(replace(s, principals=local(s.principals), not_principals=local(s.not_principals))
                    for s in rule.sources)
    conditions = tuple(replace(c, values=local(c.values), not_values=local(c.not_values))
                       if c.key == "source.principal" else c for c in rule.conditions)
    return replace(rule, sources=sources, conditions=conditions)


def _account_principal(account: str) -> str:
    # serviceAccounts "ns/sa" is the principal "<any trust domain>/ns/ns/sa/sa" (a suffix match).
    namespace, _, name = account.partition("/")
    return f"*/ns/{namespace}/sa/{name}"


def _source(s: ApiSource) -> Source:
    return Source(tuple(s.principals) + tuple(_account_principal(a) for a in s.service_accounts),
                  tuple(s.not_principals) + tuple(_account_principal(a) for a in s.not_service_accounts),
                  tuple(s.request_principals), tuple(s.not_request_principals), tuple(s.namespaces),
                  tuple(s.not_namespaces), tuple(s.ip_blocks), tuple(s.not_ip_blocks), tuple(s.remote_ip_blocks),
                  tuple(s.not_remote_ip_blocks))


def _condition(c: ApiCondition) -> Condition:
    if c.key == "source.serviceAccount":
        return Condition("source.principal", tuple(_account_principal(v) for v in c.values),
                         tuple(_account_principal(v) for v in c.not_values))
    return Condition(c.key, tuple(c.values), tuple(c.not_values))


def _jwt_rules(r: Resource, spec: RequestAuthenticationSpec) -> list[JwtRule]:
    source = f"{r.namespace}/{r.name}"
    return [JwtRule(rule.issuer, tuple(rule.audiences), rule.jwks_uri, rule.jwks,
                    tuple((h.name, h.prefix) for h in rule.from_headers), tuple(rule.from_params),
                    tuple(rule.from_cookies), rule.output_payload_to_header,
                    tuple((h.header, h.claim) for h in rule.output_claim_to_headers), rule.forward_original_token,
                    rule.timeout if rule.timeout is not None else 5.0, source)
            for rule in spec.jwt_rules]
