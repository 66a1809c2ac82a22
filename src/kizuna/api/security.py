"""Istio's security kinds (security.istio.io v1 / v1beta1): PeerAuthentication, AuthorizationPolicy and
RequestAuthentication, every field of their protos.

Checks follow Istio's ``ValidatePeerAuthentication``, ``ValidateAuthorizationPolicy`` and
``ValidateRequestAuthentication`` for what kizuna can state without a cluster: `when` keys must be attributes
Istio knows, IPs and ports must parse, CUSTOM needs a provider (and nothing else may have one), a ``from``
must hold a non-empty ``source``, values must not be empty, path templates use ``{*}`` / ``{**}`` segments.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal, Self
from urllib.parse import urlparse

from pydantic import Field, model_validator

from kizuna.api.fields import Duration, FieldErrors, IstioModel, Labels, set_fields

SECURITY_API = ("security.istio.io/v1", "security.istio.io/v1beta1")
ROOT_NAMESPACE = "istio-system"
"""Istio's root namespace: policies there apply to the whole mesh."""

MtlsMode = Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]
Action = Literal["ALLOW", "DENY", "AUDIT", "CUSTOM"]

CONDITION_KEYS = frozenset({
    "source.ip", "remote.ip", "source.namespace", "source.principal", "source.serviceAccount",
    "request.auth.principal", "request.auth.audiences", "request.auth.presenter", "destination.ip",
    "destination.port", "connection.sni",
})
"""``when`` keys without a ``[name]`` part (Istio's conditions reference)."""
BRACKET_KEYS = ("request.headers", "request.auth.claims", "request.regex.headers")
"""``when`` keys taking ``[name]`` (claims may nest: ``request.auth.claims[a][b]``)."""
_BRACKETS = re.compile(r"(?:\[[^\[\]]+\])+")
_PATH_TEMPLATE = re.compile(r"(?:/(?:\{\*\*?\}|[^/{}]*))+")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class WorkloadSelector(IstioModel):
    """Workloads by labels (``matchLabels``); an empty selector picks every workload in scope."""

    match_labels: Labels = Field(default_factory=dict)


class PolicyTargetReference(IstioModel):
    """``targetRef``: a Gateway API resource the policy attaches to (accepted, used for gateways only)."""

    group: str = ""
    kind: str
    name: str
    namespace: str = ""


def _wildcard_problem(value: str) -> str | None:
    # Istio refuses empty values; a '*' inside a value is no wildcard, just a character (exact match).
    return "must not be empty" if not value else None


def _ip_problem(value: str) -> str | None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return f"{value!r} is not an IP address or CIDR block"
    return None


def _port_problem(value: str) -> str | None:
    if not value.isdigit() or not 0 < int(value) <= 65535:
        return f"{value!r} is not a port number (1-65535)"
    return None


def _check_values(errors: list[tuple[str, str]], path: str, values: list[str]) -> None:
    for i, value in enumerate(values):
        problem = _wildcard_problem(value)
        if problem:
            errors.append((f"{path}[{i}]", problem))


# -- PeerAuthentication -----------------------------------------------------------------------------------


class MutualTls(IstioModel):
    """The mTLS mode of a scope (UNSET inherits from the enclosing scope)."""

    mode: MtlsMode = "UNSET"


class PeerAuthenticationSpec(IstioModel):
    """Whether the selected workloads accept plaintext, mTLS or both, per workload and per port."""

    selector: WorkloadSelector | None = None
    mtls: MutualTls | None = None
    port_level_mtls: dict[int, MutualTls] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors: list[tuple[str, str]] = []
        for port in self.port_level_mtls:
            if not 0 < port <= 65535:
                errors.append((f"portLevelMtls.{port}", "port must be between 1 and 65535"))
        if self.port_level_mtls and (self.selector is None or not self.selector.match_labels):
            errors.append(("portLevelMtls", "requires a workload selector (portLevelMtls is per workload)"))
        if errors:
            raise FieldErrors(errors)
        return self


# -- AuthorizationPolicy ----------------------------------------------------------------------------------


class Source(IstioModel):
    """Who sends the request: peer identity (mTLS), JWT identity, namespaces, addresses. Fields AND-ed."""

    principals: list[str] = Field(default_factory=list)
    not_principals: list[str] = Field(default_factory=list)
    request_principals: list[str] = Field(default_factory=list)
    not_request_principals: list[str] = Field(default_factory=list)
    namespaces: list[str] = Field(default_factory=list)
    not_namespaces: list[str] = Field(default_factory=list)
    service_accounts: list[str] = Field(default_factory=list)
    not_service_accounts: list[str] = Field(default_factory=list)
    ip_blocks: list[str] = Field(default_factory=list)
    not_ip_blocks: list[str] = Field(default_factory=list)
    remote_ip_blocks: list[str] = Field(default_factory=list)
    not_remote_ip_blocks: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors: list[tuple[str, str]] = []
        for name in ("principals", "not_principals", "request_principals", "not_request_principals",
                     "namespaces", "not_namespaces"):
            _check_values(errors, _camel(name), getattr(self, name))
        for name in ("service_accounts", "not_service_accounts"):
            for i, value in enumerate(getattr(self, name)):
                if value.count("/") != 1 or "*" in value:
                    errors.append((f"{_camel(name)}[{i}]", f"{value!r} must be namespace/serviceAccount"))
        for name in ("ip_blocks", "not_ip_blocks", "remote_ip_blocks", "not_remote_ip_blocks"):
            for i, value in enumerate(getattr(self, name)):
                problem = _ip_problem(value)
                if problem:
                    errors.append((f"{_camel(name)}[{i}]", problem))
        if (self.service_accounts or self.not_service_accounts) and (self.principals or self.not_principals):
            errors.append(("", "serviceAccounts cannot be used together with principals"))
        if errors:
            raise FieldErrors(errors)
        return self


class Operation(IstioModel):
    """What the request does: hosts, ports, methods, paths (``*`` prefix / suffix wildcards). Fields AND-ed."""

    hosts: list[str] = Field(default_factory=list)
    not_hosts: list[str] = Field(default_factory=list)
    ports: list[str] = Field(default_factory=list)
    not_ports: list[str] = Field(default_factory=list)
    methods: list[str] = Field(default_factory=list)
    not_methods: list[str] = Field(default_factory=list)
    paths: list[str] = Field(default_factory=list)
    not_paths: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors: list[tuple[str, str]] = []
        for name in ("hosts", "not_hosts", "methods", "not_methods"):
            _check_values(errors, _camel(name), getattr(self, name))
        for name in ("paths", "not_paths"):
            for i, value in enumerate(getattr(self, name)):
                if not value:
                    errors.append((f"{_camel(name)}[{i}]", "must not be empty"))
                elif "{" in value and not _PATH_TEMPLATE.fullmatch(value):
                    errors.append((f"{_camel(name)}[{i}]", f"{value!r}: a path template may only use {{*}} "
                                                           "and {**} as whole segments"))
        for name in ("ports", "not_ports"):
            for i, value in enumerate(getattr(self, name)):
                problem = _port_problem(value)
                if problem:
                    errors.append((f"{_camel(name)}[{i}]", problem))
        if errors:
            raise FieldErrors(errors)
        return self


class From(IstioModel):
    """One ``from`` entry: a source."""

    source: Source | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.source is None:
            raise FieldErrors([("source", "required")])
        if not set_fields(self.source, *Source.model_fields):
            raise FieldErrors([("source", "must not be empty (set at least one field)")])
        return self


class To(IstioModel):
    """One ``to`` entry: an operation."""

    operation: Operation | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.operation is None:
            raise FieldErrors([("operation", "required")])
        if not set_fields(self.operation, *Operation.model_fields):
            raise FieldErrors([("operation", "must not be empty (set at least one field)")])
        return self


def condition_key_problem(key: str) -> str | None:
    """Why ``key`` is not a ``when`` attribute Istio knows, or None."""
    if key in CONDITION_KEYS or key.startswith("experimental.envoy.filters."):
        return None
    for base in BRACKET_KEYS:
        if key.startswith(base + "["):
            rest = key[len(base):]
            if not _BRACKETS.fullmatch(rest) or (base != "request.auth.claims" and rest.count("[") != 1):
                return f"{key!r}: expected {base}[name]"
            return None
    return f"unknown attribute {key!r} (see Istio's authorization conditions)"


class Condition(IstioModel):
    """An extra condition: attribute ``key`` has one of ``values`` and none of ``notValues``."""

    key: str
    values: list[str] = Field(default_factory=list)
    not_values: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors: list[tuple[str, str]] = []
        problem = condition_key_problem(self.key)
        if problem:
            errors.append(("key", problem))
        if not self.values and not self.not_values:
            errors.append(("", f"at least one of values or notValues must be set for key {self.key!r}"))
        check = (_ip_problem if self.key in ("source.ip", "remote.ip", "destination.ip")
                 else _port_problem if self.key == "destination.port" else None)
        for name in ("values", "not_values"):
            for i, value in enumerate(getattr(self, name)):
                found = check(value) if check is not None else (None if value else "must not be empty")
                if found:
                    errors.append((f"{_camel(name)}[{i}]", found))
        if errors:
            raise FieldErrors(errors)
        return self


class Rule(IstioModel):
    """Matches when one ``from``, one ``to`` and every ``when`` match; an empty rule matches everything."""

    from_: list[From] = Field(default_factory=list, alias="from")
    to: list[To] = Field(default_factory=list)
    when: list[Condition] = Field(default_factory=list)


class ExtensionProvider(IstioModel):
    """The extension (MeshConfig ``extensionProviders``) a CUSTOM policy delegates to."""

    name: str = ""


class AuthorizationPolicySpec(IstioModel):
    """Access control: ALLOW / DENY / AUDIT / CUSTOM requests matching ``rules`` on the selected workloads."""

    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: list[PolicyTargetReference] = Field(default_factory=list)
    rules: list[Rule] = Field(default_factory=list)
    action: Action = "ALLOW"
    provider: ExtensionProvider | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors = _selection_errors(self.selector, self.target_ref, self.target_refs)
        if self.action == "CUSTOM":
            if self.provider is None or not self.provider.name:
                errors.append(("provider.name", "required with action CUSTOM"))
            if not self.rules:
                errors.append(("rules", "CUSTOM action without rules never triggers; add an empty rule {} to "
                                        "apply it to every request"))
        elif self.provider is not None:
            errors.append(("provider", f"only allowed with action CUSTOM (not {self.action})"))
        if errors:
            raise FieldErrors(errors)
        return self


# -- RequestAuthentication --------------------------------------------------------------------------------


class JwtHeader(IstioModel):
    """A header carrying the token, with the prefix before it (``Bearer ``)."""

    name: str
    prefix: str = ""


class ClaimToHeader(IstioModel):
    """Copy a claim of a verified token into a request header."""

    header: str
    claim: str

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors: list[tuple[str, str]] = []
        if not _HEADER_NAME.fullmatch(self.header):
            errors.append(("header", f"{self.header!r} is not a valid header name"))
        if not self.claim:
            errors.append(("claim", "must not be empty"))
        if errors:
            raise FieldErrors(errors)
        return self


class JWTRule(IstioModel):
    """One accepted token issuer: its keys (inline ``jwks`` or ``jwksUri``), audiences, where the token is."""

    issuer: str = ""
    audiences: list[str] = Field(default_factory=list)
    jwks_uri: str = ""
    jwks: str = ""
    from_headers: list[JwtHeader] = Field(default_factory=list)
    from_params: list[str] = Field(default_factory=list)
    from_cookies: list[str] = Field(default_factory=list)
    output_payload_to_header: str = ""
    output_claim_to_headers: list[ClaimToHeader] = Field(default_factory=list)
    forward_original_token: bool = False
    timeout: Duration | None = None
    space_delimited_claims: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors: list[tuple[str, str]] = []
        if not self.issuer:
            errors.append(("issuer", "required"))
        if self.jwks_uri:
            url = urlparse(self.jwks_uri)
            if url.scheme not in ("http", "https") or not url.hostname:
                errors.append(("jwksUri", f"{self.jwks_uri!r} is not an http(s) URL"))
        for i, header in enumerate(self.from_headers):
            if not header.name:
                errors.append((f"fromHeaders[{i}].name", "must not be empty"))
        for i, param in enumerate(self.from_params):
            if not param:
                errors.append((f"fromParams[{i}]", "must not be empty"))
        if self.output_payload_to_header and not _HEADER_NAME.fullmatch(self.output_payload_to_header):
            errors.append(("outputPayloadToHeader", f"{self.output_payload_to_header!r} is not a valid header "
                                                    "name"))
        if self.timeout is not None and self.timeout <= 0:
            errors.append(("timeout", "must be positive"))
        if errors:
            raise FieldErrors(errors)
        return self


class RequestAuthenticationSpec(IstioModel):
    """End-user (JWT) authentication for the selected workloads: which issuers' tokens are accepted."""

    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: list[PolicyTargetReference] = Field(default_factory=list)
    jwt_rules: list[JWTRule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors = _selection_errors(self.selector, self.target_ref, self.target_refs)
        issuers = [r.issuer for r in self.jwt_rules]
        for i, issuer in enumerate(issuers):
            if issuer and issuer in issuers[:i]:
                errors.append((f"jwtRules[{i}].issuer", f"duplicate issuer {issuer!r}"))
        if errors:
            raise FieldErrors(errors)
        return self


def _selection_errors(selector: WorkloadSelector | None, target_ref: PolicyTargetReference | None,
                      target_refs: list[PolicyTargetReference]) -> list[tuple[str, str]]:
    chosen = [name for name, value in (("selector", selector), ("targetRef", target_ref),
                                       ("targetRefs", target_refs)) if value]
    if len(chosen) > 1:
        return [("", f"only one of selector, targetRef and targetRefs may be set (got {', '.join(chosen)})")]
    return []


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)
