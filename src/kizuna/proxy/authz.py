"""Istio's authorization, evaluated: pure functions of a request's attributes, no sockets.

Order (Istio): CUSTOM first, then DENY, then ALLOW; AUDIT only records. A matching DENY denies; with no ALLOW
policy everything else is allowed; with ALLOW policies a request must match one of them. A policy matches
when one of its rules does; a rule when one ``from`` source (if any), one ``to`` operation (if any) and every
``when`` condition hold. A string value is exact, ``prefix*``, ``*suffix`` or ``*`` (any non-empty value).

Opaque TCP has no HTTP attributes. As Istio documents ("Authorization on TCP traffic"): an ALLOW rule using an
HTTP-only field (hosts, methods, paths, requestPrincipals, ``request.*`` conditions) is dropped, so it allows
nothing; in a DENY (or AUDIT / CUSTOM) rule the HTTP-only fields are dropped and the rest applies, which
denies more rather than less.

kizuna has no external authorization provider, so CUSTOM denies what its rules match (fail closed, as Istio
does for a provider it cannot find). Policies annotated ``istio.io/dry-run`` are evaluated and counted only.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from kizuna.proxyconfig.security import AuthorizationPolicy, Condition, Operation, Rule, Source

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class PeerIdentity(Protocol):
    """What authorization reads of a connection's mTLS peer (``proxy/identity.Peer`` is one)."""

    @property
    def principal(self) -> str:
        """``<trust domain>/ns/<namespace>/sa/<service account>`` (the SPIFFE ID without ``spiffe://``)."""

    @property
    def namespace(self) -> str:
        """The ``ns`` part of the principal ("" when it has none)."""


@dataclass(frozen=True, slots=True)
class Peer:
    """A peer identity as plain data (tests, ``explain``); the mTLS layer hands over its own equivalent."""

    principal: str
    namespace: str = ""


@dataclass(frozen=True, slots=True)
class JwtIdentity:
    """The end user a verified JWT names (``request.auth.*``)."""

    principal: str
    """``iss/sub``."""
    audiences: tuple[str, ...] = ()
    presenter: str = ""
    """The ``azp`` claim."""
    claims: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Attributes:
    """What authorization sees of a request (or, with ``http`` False, of an opaque TCP connection)."""

    source_ip: str
    destination_ip: str = ""
    destination_port: int = 0
    peer: PeerIdentity | None = None
    remote_ip: str = ""
    """The original client (``remote.ip``); empty: the same as ``source_ip``."""
    sni: str = ""
    http: bool = True
    method: str = ""
    path: str = ""
    """Without the query string."""
    host: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Lower-case names; repeated headers joined with ``,``."""
    auth: JwtIdentity | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome: allowed or not, the policy that decided (``namespace/name``, empty for the default)."""

    allowed: bool
    policy: str = ""
    audited: tuple[str, ...] = ()
    """AUDIT policies that matched."""
    dry_run: tuple[str, ...] = ()
    """Dry-run policies whose action would have applied (``name:DENY`` / ``name:ALLOW``)."""


ALLOW_ALL: Final = Decision(True)

Predicate = Callable[[Attributes], bool]
SPACE_DELIMITED_CLAIMS: Final = frozenset({"scope", "permission"})
"""Claims Istio also matches word by word when they hold a space-separated string (OAuth ``scope``)."""
HTTP_ONLY_SOURCE: Final = frozenset({"request_principals", "not_request_principals"})
HTTP_ONLY_OPERATION: Final = frozenset({"hosts", "not_hosts", "methods", "not_methods", "paths", "not_paths"})


def string_matcher(pattern: str, ignore_case: bool = False) -> Callable[[str], bool]:
    """Istio's string value: exact, ``prefix*``, ``*suffix``, or ``*`` for any non-empty value."""
    if pattern == "*":
        return bool
    if ignore_case:
        inner = string_matcher(pattern.lower())
        return lambda value: inner(value.lower())
    if pattern.startswith("*"):
        suffix = pattern[1:]
        return lambda value: value.endswith(suffix)
    if pattern.endswith("*"):
        prefix = pattern[:-1]
        return lambda value: value.startswith(prefix)
    return lambda value: value == pattern


def path_matcher(pattern: str) -> Callable[[str], bool]:
    """A path value: as :func:`string_matcher`, plus Istio's ``{*}`` (one segment) / ``{**}`` templates."""
    if "{" not in pattern:
        return string_matcher(pattern)
    regex = re.compile("".join("[^/]+" if part == "{*}" else ".*" if part == "{**}" else re.escape(part)
                               for part in re.split(r"(\{\*\*?\})", pattern)))
    return lambda value: regex.fullmatch(value) is not None


def ip_matcher(blocks: Sequence[str]) -> Callable[[str], bool]:
    """True for an address inside one of ``blocks`` (single IPs or CIDRs)."""
    networks: list[Network] = [ipaddress.ip_network(b, strict=False) for b in blocks]

    def match(value: str) -> bool:
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            return False
        return any(address.version == n.version and address in n for n in networks)

    return match


def normalize_path(target: str) -> str:
    """The path authorization matches: query dropped, ``.``/``..`` segments resolved (Istio's BASE
    normalization), so ``/ip/../headers`` cannot slip past a rule on ``/headers``."""
    path = target.split("?", 1)[0].split("#", 1)[0]
    if "/." not in path:
        return path
    out: list[str] = []
    for segment in path.split("/")[1:]:
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    return "/" + "/".join(out)


def _any(values: Sequence[str], make: Callable[[str], Callable[[str], bool]] = string_matcher
         ) -> Callable[[str], bool]:
    matchers = [make(v) for v in values]
    return lambda value: any(m(value) for m in matchers)


def _field(get: Callable[[Attributes], str], values: Sequence[str], negate: bool,
           make: Callable[[str], Callable[[str], bool]] = string_matcher) -> Predicate:
    match = _any(values, make)
    if negate:
        return lambda a: not match(get(a))
    return lambda a: match(get(a))


def _principal(a: Attributes) -> str:
    return a.peer.principal if a.peer is not None else ""


def _peer_namespace(a: Attributes) -> str:
    return a.peer.namespace if a.peer is not None else ""


def _request_principal(a: Attributes) -> str:
    return a.auth.principal if a.auth is not None else ""


def _remote_ip(a: Attributes) -> str:
    return a.remote_ip or a.source_ip


def _host(a: Attributes) -> str:
    return a.host


def _host_matcher(pattern: str) -> Callable[[str], bool]:
    # Case-insensitive; a Host header with a port matches a value without one.
    inner = string_matcher(pattern, ignore_case=True)

    def match(host: str) -> bool:
        if inner(host):
            return True
        name, colon, port = host.rpartition(":")
        return bool(colon) and port.isdigit() and "]" not in port and inner(name)

    return match


_SOURCE_FIELDS: Final[dict[str, tuple[Callable[[Attributes], str], Callable[[str], Callable[[str], bool]]]]] = {
    "principals": (_principal, string_matcher),
    "request_principals": (_request_principal, string_matcher),
    "namespaces": (_peer_namespace, string_matcher),
}


def _source_predicates(source: Source, drop_http: bool) -> list[Predicate]:
    preds: list[Predicate] = []
    for name, (get, make) in _SOURCE_FIELDS.items():
        for negate, key in ((False, name), (True, "not_" + name)):
            values = getattr(source, key)
            if values and not (drop_http and key in HTTP_ONLY_SOURCE):
                preds.append(_field(get, values, negate, make))
    for key, get in (("ip_blocks", _source_ip), ("remote_ip_blocks", _remote_ip)):
        for negate, name in ((False, key), (True, "not_" + key)):
            values = getattr(source, name)
            if values:
                preds.append(_field(get, values, negate, _one_block))
    return preds


def _source_ip(a: Attributes) -> str:
    return a.source_ip


def _one_block(block: str) -> Callable[[str], bool]:
    return ip_matcher((block,))


def _operation_predicates(op: Operation, drop_http: bool) -> list[Predicate]:
    preds: list[Predicate] = []
    fields_: tuple[tuple[str, Callable[[Attributes], str], Callable[[str], Callable[[str], bool]]], ...] = (
        ("hosts", _host, _host_matcher), ("methods", lambda a: a.method, string_matcher),
        ("paths", lambda a: a.path, path_matcher),
        ("ports", lambda a: str(a.destination_port), lambda p: p.__eq__))
    for name, get, make in fields_:
        for negate, key in ((False, name), (True, "not_" + name)):
            values = getattr(op, key)
            if values and not (drop_http and key in HTTP_ONLY_OPERATION):
                preds.append(_field(get, values, negate, make))
    return preds


def _claim(claims: Mapping[str, Any], path: Sequence[str]) -> list[str]:
    value: Any = claims
    for name in path:
        if not isinstance(value, Mapping) or name not in value:
            return []
        value = value[name]
    items = value if isinstance(value, list) else [value]
    if isinstance(value, str) and path[-1] in SPACE_DELIMITED_CLAIMS:
        items = [value, *value.split()]
    out = []
    for item in items:
        if isinstance(item, bool):
            out.append("true" if item else "false")
        elif isinstance(item, (str, int, float)):
            out.append(str(item))
    return out


def attribute_values(key: str) -> Callable[[Attributes], list[str]]:
    """How a ``when`` key reads its values (a list: claims and audiences may hold several)."""
    if key.startswith("request.headers["):
        name = key[len("request.headers["):-1].lower()
        return lambda a: [a.headers[name]] if name in a.headers else []
    if key.startswith("request.regex.headers["):
        name = key[len("request.regex.headers["):-1].lower()
        return lambda a: [a.headers[name]] if name in a.headers else []
    if key.startswith("request.auth.claims["):
        path = key[len("request.auth.claims["):-1].split("][")
        return lambda a: _claim(a.auth.claims, path) if a.auth is not None else []
    simple: dict[str, Callable[[Attributes], list[str]]] = {
        "source.ip": lambda a: [a.source_ip],
        "remote.ip": lambda a: [_remote_ip(a)],
        "source.namespace": lambda a: [ns] if (ns := _peer_namespace(a)) else [],
        "source.principal": lambda a: [p] if (p := _principal(a)) else [],
        "request.auth.principal": lambda a: [p] if (p := _request_principal(a)) else [],
        "request.auth.audiences": lambda a: list(a.auth.audiences) if a.auth is not None else [],
        "request.auth.presenter": lambda a: [a.auth.presenter] if a.auth and a.auth.presenter else [],
        "destination.ip": lambda a: [a.destination_ip] if a.destination_ip else [],
        "destination.port": lambda a: [str(a.destination_port)],
        "connection.sni": lambda a: [a.sni] if a.sni else [],
    }
    return simple.get(key, lambda a: [])  # experimental.envoy.filters.*: nothing kizuna can read


def _condition_predicate(c: Condition) -> Predicate:
    get = attribute_values(c.key)
    if c.key in ("source.ip", "remote.ip", "destination.ip"):
        def make_ip(values: tuple[str, ...]) -> Callable[[str], bool]:
            return ip_matcher(values)
        make_set: Callable[[tuple[str, ...]], Callable[[str], bool]] = make_ip
    elif c.key.startswith("request.regex.headers["):
        def make_regex(values: tuple[str, ...]) -> Callable[[str], bool]:
            patterns = [re.compile(v) for v in values]
            return lambda value: any(p.fullmatch(value) for p in patterns)
        make_set = make_regex
    elif c.key == "destination.port":
        make_set = lambda values: values.__contains__  # noqa: E731
    else:
        make_set = _any
    want = make_set(c.values) if c.values else None
    refuse = make_set(c.not_values) if c.not_values else None

    def check(a: Attributes) -> bool:
        values = get(a)
        if want is not None and not any(want(v) for v in values):
            return False
        return refuse is None or not any(refuse(v) for v in values)

    return check


def _is_http_only(rule: Rule) -> bool:
    return (any(getattr(s, k) for s in rule.sources for k in HTTP_ONLY_SOURCE)
            or any(getattr(o, k) for o in rule.operations for k in HTTP_ONLY_OPERATION)
            or any(c.key.startswith("request.") for c in rule.conditions))


def compile_rule(rule: Rule, tcp: bool = False, allow: bool = True) -> Predicate | None:
    """A rule as one predicate; None when it can never match (an HTTP-only ALLOW rule on TCP)."""
    if tcp and allow and _is_http_only(rule):
        return None
    drop = tcp
    sources = [_source_predicates(s, drop) for s in rule.sources]
    operations = [_operation_predicates(o, drop) for o in rule.operations]
    conditions = [_condition_predicate(c) for c in rule.conditions if not (drop and c.key.startswith("request."))]

    def match(a: Attributes) -> bool:
        if sources and not any(all(p(a) for p in preds) for preds in sources):
            return False
        if operations and not any(all(p(a) for p in preds) for preds in operations):
            return False
        return all(p(a) for p in conditions)

    return match


class CompiledPolicy:
    """A policy's rules as predicates, for HTTP requests and for opaque TCP connections."""

    __slots__ = ("name", "action", "dry_run", "http", "tcp")

    def __init__(self, policy: AuthorizationPolicy) -> None:
        self.name = policy.name
        self.action = policy.action
        self.dry_run = policy.dry_run
        allow = policy.action == "ALLOW"
        self.http = [(i, p) for i, r in enumerate(policy.rules) if (p := compile_rule(r)) is not None]
        self.tcp = [(i, p) for i, r in enumerate(policy.rules)
                    if (p := compile_rule(r, tcp=True, allow=allow)) is not None]

    def matches(self, a: Attributes) -> bool:
        """True when one of the rules matches ``a``."""
        return any(p(a) for _, p in (self.http if a.http else self.tcp))

    def matching_rule(self, a: Attributes) -> int | None:
        """The index (in ``rules``) of the first rule that matches ``a``, if any."""
        return next((i for i, p in (self.http if a.http else self.tcp) if p(a)), None)


@dataclass(frozen=True, slots=True)
class PolicyVerdict:
    """For ``explain``: one policy and the first of its rules that matched the request (None: none did)."""

    name: str
    action: str
    rule: int | None
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "action": self.action, "rule": self.rule, "dryRun": self.dry_run}


class Authorizer:
    """A workload's authorization policies, ready to decide."""

    __slots__ = ("custom", "deny", "allow", "audit", "has_allow")

    def __init__(self, policies: Sequence[AuthorizationPolicy]) -> None:
        compiled = [CompiledPolicy(p) for p in policies]
        self.custom = [p for p in compiled if p.action == "CUSTOM"]
        self.deny = [p for p in compiled if p.action == "DENY"]
        self.allow = [p for p in compiled if p.action == "ALLOW"]
        self.audit = [p for p in compiled if p.action == "AUDIT"]
        self.has_allow = any(not p.dry_run for p in self.allow)
        """Enforced ALLOW policies exist: then a request must match one."""

    def decide(self, a: Attributes) -> Decision:
        """Istio's decision for ``a``."""
        audited = tuple(p.name for p in self.audit if p.matches(a))
        shadow: list[str] = []
        for p in (*self.custom, *self.deny):
            if p.matches(a):
                if p.dry_run:
                    shadow.append(f"{p.name}:DENY")
                    continue
                return Decision(False, p.name, audited, tuple(shadow))
        if not self.allow:
            return Decision(True, "", audited, tuple(shadow)) if audited or shadow else ALLOW_ALL
        for p in self.allow:
            if p.matches(a):
                if p.dry_run:
                    shadow.append(f"{p.name}:ALLOW")
                    continue
                return Decision(True, p.name, audited, tuple(shadow))
        if not self.has_allow:
            return Decision(True, "", audited, tuple(shadow))
        return Decision(False, "", audited, tuple(shadow))

    def explain(self, a: Attributes) -> tuple[Decision, tuple[PolicyVerdict, ...]]:
        """The decision for ``a`` and, in evaluation order, every policy with the rule that matched."""
        verdicts = tuple(PolicyVerdict(p.name, p.action, p.matching_rule(a), p.dry_run)
                         for p in (*self.custom, *self.deny, *self.allow, *self.audit))
        return self.decide(a), verdicts
