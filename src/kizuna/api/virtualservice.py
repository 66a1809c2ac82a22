"""Istio VirtualService (networking.istio.io v1 / v1beta1 / v1alpha3), every field of virtual_service.proto.

Field names are the proto's, in snake_case here and camelCase in YAML. Unknown fields are rejected. The checks
are Istio's own (pilot/pkg/config/validation) where they matter to a user: a route needs a destination, a
redirect or a direct response; weights are 0..100; regexes must compile; durations are Go durations >= 1ms.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Self

from pydantic import Field, field_validator, model_validator

from kizuna.api.fields import (
    FieldErrors,
    IntPercentage,
    IstioModel,
    Labels,
    NonNegative,
    Percentage,
    Port,
    PositiveDuration,
    Regex,
    at_most_one,
    between,
    check_regex,
)

# Envoy retry_on conditions Istio accepts in HTTPRetry.retryOn (besides numeric HTTP status codes).
RETRY_ON_POLICIES = frozenset({
    "5xx", "gateway-error", "reset", "reset-before-request", "connect-failure", "envoy-ratelimited",
    "retriable-4xx", "refused-stream", "retriable-status-codes", "retriable-headers",
    "http3-post-connect-failure", "cancelled", "deadline-exceeded", "internal", "resource-exhausted",
    "unavailable",
})


class StringMatch(IstioModel):
    """Exactly one of ``exact``, ``prefix`` or ``regex`` (RE2 syntax in Istio; must compile here)."""

    require_one: ClassVar[bool] = True

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, value: str) -> str:
        # withoutHeaders accepts the literal "*" (header present), which is not a regex.
        return value if value == "*" and not cls.require_one else check_regex(value)

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        errors = at_most_one(self, "exact", "prefix", "regex")
        empty = self.exact is None and self.prefix is None and self.regex is None
        if not errors and self.require_one and empty:
            errors = [("", "must set exactly one of exact, prefix or regex")]
        if errors:
            raise FieldErrors(errors)
        return self


class ValueMatch(StringMatch):
    """A header or query parameter condition; empty (``{}``) means "present" as in Istio."""

    require_one: ClassVar[bool] = False


class PortSelector(IstioModel):
    """A destination port number."""

    number: Port


class Destination(IstioModel):
    """A service (short name resolved in the VirtualService's namespace), optional subset and port."""

    host: str
    subset: str = ""
    port: PortSelector | None = None

    @model_validator(mode="after")
    def _host(self) -> Self:
        if not self.host:
            raise FieldErrors([("host", "required")])
        if self.host == "*":
            raise FieldErrors([("host", "must name a service, not *")])
        return self


class HeaderOperations(IstioModel):
    """Headers to set (overwrite), add (append) and remove."""

    set_: dict[str, str] = Field(default_factory=dict, alias="set")
    add: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)


class Headers(IstioModel):
    """Header manipulation for the request (to the upstream) and the response (to the caller)."""

    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


class HTTPRouteDestination(IstioModel):
    """A weighted destination of an HTTP route."""

    destination: Destination
    weight: IntPercentage = 0
    headers: Headers | None = None


class RouteDestination(IstioModel):
    """A weighted destination of a TCP or TLS route."""

    destination: Destination
    weight: IntPercentage = 0


CLAIM_KEY = "@request.auth.claims"
"""``headers`` / ``withoutHeaders`` keys ``@request.auth.claims.<claim>[.<nested>...]`` match a claim of the
request's verified JWT instead of a header (Istio's JWT claim based routing, at gateways only)."""


def is_claim_key(key: str) -> bool:
    """True for a ``headers`` key that names a JWT claim rather than a header."""
    return key.startswith(CLAIM_KEY)


def claim_path(key: str) -> tuple[str, ...]:
    """``@request.auth.claims.a.b`` → ``("a", "b")``: nested claims are separated by ``.``."""
    return tuple(key[len(CLAIM_KEY) + 1:].split("."))


class HTTPMatchRequest(IstioModel):
    """Conditions ANDed together; a route's matches are ORed."""

    name: str = ""
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: dict[str, ValueMatch] = Field(default_factory=dict)
    port: Port | None = None
    source_labels: Labels = Field(default_factory=dict)
    gateways: list[str] = Field(default_factory=list)
    query_params: dict[str, ValueMatch] = Field(default_factory=dict)
    ignore_uri_case: bool = False
    without_headers: dict[str, ValueMatch] = Field(default_factory=dict)
    source_namespace: str = ""
    stat_prefix: str = ""

    @model_validator(mode="after")
    def _claim_keys(self) -> Self:
        errors = []
        for field, values in (("headers", self.headers), ("withoutHeaders", self.without_headers)):
            for key in values:
                if is_claim_key(key) and (key[len(CLAIM_KEY):len(CLAIM_KEY) + 1] != "."
                                          or not all(claim_path(key))):
                    errors.append((f"{field}[{key}]", f"a JWT claim key is {CLAIM_KEY}.<claim>, nested claims "
                                                      "separated by '.' (no empty names)"))
        if errors:
            raise FieldErrors(errors)
        return self

    def claim_keys(self) -> list[str]:
        """``field[key]`` of each ``@request.auth.claims`` key (for error messages)."""
        return [f"{field}[{key}]" for field, values in (("headers", self.headers),
                                                        ("withoutHeaders", self.without_headers))
                for key in values if is_claim_key(key)]


class HTTPRedirect(IstioModel):
    """A 301 (or ``redirectCode``) response rewriting URI, authority, scheme or port."""

    uri: str = ""
    authority: str = ""
    port: Port | None = None
    derive_port: Literal["FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"] | None = None
    scheme: str = ""
    redirect_code: int | None = None
    prefix_rewrite: str = ""

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors = at_most_one(self, "port", "derive_port")
        if not (self.uri or self.authority or self.scheme or self.port or self.derive_port
                or self.prefix_rewrite):
            errors.append(("", "must set at least one of uri, authority, scheme, port or derivePort"))
        if self.redirect_code is not None and not 300 <= self.redirect_code <= 399:
            errors.append(("redirectCode", "must be a 3xx status"))
        if errors:
            raise FieldErrors(errors)
        return self


class HTTPBody(IstioModel):
    """A direct response body: text or base64 bytes."""

    string: str | None = None
    bytes_: str | None = Field(default=None, alias="bytes")

    @model_validator(mode="after")
    def _one(self) -> Self:
        errors = at_most_one(self, "string", "bytes_")
        if errors:
            raise FieldErrors([("", "only one of string or bytes may be set")])
        return self


class HTTPDirectResponse(IstioModel):
    """Answer without calling an upstream."""

    status: Annotated[int, between(200, 599)]
    body: HTTPBody | None = None


class Delegate(IstioModel):
    """Hand the route over to another VirtualService."""

    name: str
    namespace: str = ""


class RegexRewrite(IstioModel):
    """Rewrite the path with a regex and a substitution (``\\1`` groups)."""

    match: Regex
    rewrite: str


class HTTPRewrite(IstioModel):
    """Rewrite the URI (prefix or regex) and/or the authority before forwarding."""

    uri: str = ""
    authority: str = ""
    uri_regex_rewrite: RegexRewrite | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors = at_most_one(self, "uri", "uri_regex_rewrite")
        if not (self.uri or self.authority or self.uri_regex_rewrite):
            errors.append(("", "must set at least one of uri, authority or uriRegexRewrite"))
        if errors:
            raise FieldErrors(errors)
        return self


class HTTPRetry(IstioModel):
    """Retries after the first try; ``attempts: 0`` disables them (Istio retries twice by default)."""

    attempts: NonNegative = 0
    per_try_timeout: PositiveDuration | None = None
    retry_on: str = ""
    retry_remote_localities: bool | None = None
    retry_ignore_previous_hosts: bool | None = None
    backoff: PositiveDuration | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors: list[tuple[str, str]] = []
        if self.attempts == 0 and (self.per_try_timeout is not None or self.retry_on
                                   or self.retry_remote_localities is not None):
            errors.append(("attempts", "retry policy configured while attempts is 0 (retries disabled)"))
        for policy in filter(None, (p.strip() for p in self.retry_on.split(","))):
            if not (policy.isdigit() and 100 <= int(policy) <= 599) and policy not in RETRY_ON_POLICIES:
                errors.append(("retryOn", f"{policy!r} is not a valid retryOn policy"))
        if errors:
            raise FieldErrors(errors)
        return self


class CorsPolicy(IstioModel):
    """Cross-origin resource sharing answered by the proxy."""

    allow_origins: list[StringMatch] = Field(default_factory=list)
    allow_origin: list[str] = Field(default_factory=list)  # deprecated: use allowOrigins
    allow_methods: list[str] = Field(default_factory=list)
    allow_headers: list[str] = Field(default_factory=list)
    expose_headers: list[str] = Field(default_factory=list)
    max_age: PositiveDuration | None = None
    allow_credentials: bool | None = None
    unmatched_preflights: Literal["UNSPECIFIED", "FORWARD", "IGNORE"] | None = None


class Percent(IstioModel):
    """A percentage 0..100 (fractions allowed)."""

    value: Percentage = 0.0


class _Fault(IstioModel):
    """What a delay and an abort share: the percentage of requests they apply to."""

    percentage: Percent | None = None
    percent: IntPercentage | None = None  # deprecated integer form; read as percentage.value

    @property
    def share(self) -> float:
        """The percentage of requests affected (Istio's default when unset is 100)."""
        if self.percentage is not None:
            return self.percentage.value
        return float(self.percent) if self.percent is not None else 100.0


class Delay(_Fault):
    """Delay a share of requests before forwarding them."""

    fixed_delay: PositiveDuration | None = None
    exponential_delay: PositiveDuration | None = None

    @model_validator(mode="after")
    def _one(self) -> Self:
        errors = at_most_one(self, "fixed_delay", "exponential_delay")
        errors += at_most_one(self, "percentage", "percent")
        if errors:
            raise FieldErrors(errors)
        return self


class Abort(_Fault):
    """Fail a share of requests with an HTTP status, a gRPC status or an HTTP/2 error."""

    http_status: Annotated[int, between(200, 599)] | None = None
    grpc_status: str | None = None
    http2_error: str | None = None

    @model_validator(mode="after")
    def _one(self) -> Self:
        errors = at_most_one(self, "http_status", "grpc_status", "http2_error")
        errors += at_most_one(self, "percentage", "percent")
        if errors:
            raise FieldErrors(errors)
        return self


class HTTPFaultInjection(IstioModel):
    """Client-side fault injection (delay and/or abort)."""

    delay: Delay | None = None
    abort: Abort | None = None

    @model_validator(mode="after")
    def _some(self) -> Self:
        if self.delay is None and self.abort is None:
            raise FieldErrors([("", "must set delay and/or abort")])
        return self


class HTTPMirrorPolicy(IstioModel):
    """Copy a share of requests to another destination (responses are discarded)."""

    destination: Destination
    percentage: Percent | None = None


class HTTPRoute(IstioModel):
    """One ordered HTTP rule: matches, then where matched requests go and with which policies."""

    name: str = ""
    match: list[HTTPMatchRequest] = Field(default_factory=list)
    route: list[HTTPRouteDestination] = Field(default_factory=list)
    redirect: HTTPRedirect | None = None
    direct_response: HTTPDirectResponse | None = None
    delegate: Delegate | None = None
    rewrite: HTTPRewrite | None = None
    timeout: PositiveDuration | None = None
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    mirror: Destination | None = None
    mirrors: list[HTTPMirrorPolicy] = Field(default_factory=list)
    mirror_percent: IntPercentage | None = None  # deprecated: use mirrorPercentage
    mirror_percentage: Percent | None = None
    cors_policy: CorsPolicy | None = None
    headers: Headers | None = None

    @model_validator(mode="after")
    def _action(self) -> Self:
        # Istio's validateHTTPRouteConflict, worded for YAML field names.
        errors: list[tuple[str, str]] = []
        actions = [n for n, v in (("route", self.route), ("redirect", self.redirect),
                                  ("directResponse", self.direct_response), ("delegate", self.delegate)) if v]
        if not actions:
            errors.append(("", "one of route, redirect, directResponse or delegate is required"))
        elif len(actions) > 1:
            errors.append(("", f"only one of route, redirect, directResponse or delegate may be set "
                               f"(got {', '.join(actions)})"))
        if (self.redirect or self.direct_response) and (self.fault or self.rewrite):
            errors.append(("", "redirect and directResponse cannot be combined with fault or rewrite"))
        errors += at_most_one(self, "mirror", "mirrors")
        if errors:
            raise FieldErrors(errors)
        return self


class L4MatchAttributes(IstioModel):
    """TCP route conditions."""

    destination_subnets: list[str] = Field(default_factory=list)
    port: Port | None = None
    source_subnet: str = ""
    source_labels: Labels = Field(default_factory=dict)
    gateways: list[str] = Field(default_factory=list)
    source_namespace: str = ""


class TLSMatchAttributes(IstioModel):
    """TLS (SNI) route conditions."""

    sni_hosts: Annotated[list[str], Field(min_length=1)]
    destination_subnets: list[str] = Field(default_factory=list)
    port: Port | None = None
    source_labels: Labels = Field(default_factory=dict)
    gateways: list[str] = Field(default_factory=list)
    source_namespace: str = ""


class TCPRoute(IstioModel):
    """An opaque TCP rule: optional L4 matches and weighted destinations."""

    match: list[L4MatchAttributes] = Field(default_factory=list)
    route: Annotated[list[RouteDestination], Field(min_length=1)]


class TLSRoute(IstioModel):
    """A non-terminated TLS rule routed on SNI."""

    match: Annotated[list[TLSMatchAttributes], Field(min_length=1)]
    route: Annotated[list[RouteDestination], Field(min_length=1)]


class VirtualServiceSpec(IstioModel):
    """Routing rules for the listed hosts, applied by sidecars (``mesh``) and/or gateways."""

    hosts: list[str] = Field(default_factory=list)
    """Empty only for a delegate: a VirtualService whose ``http`` routes another one's ``delegate`` uses."""
    gateways: list[str] = Field(default_factory=list)
    http: list[HTTPRoute] = Field(default_factory=list)
    tls: list[TLSRoute] = Field(default_factory=list)
    tcp: list[TCPRoute] = Field(default_factory=list)
    export_to: list[str] = Field(default_factory=list)

    @property
    def is_delegate(self) -> bool:
        """A VirtualService without hosts only serves as another one's ``delegate``."""
        return not self.hosts

    @property
    def applies_to_mesh(self) -> bool:
        """True when sidecars use these rules (``gateways`` absent or naming ``mesh``)."""
        return not self.gateways or "mesh" in self.gateways

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors: list[tuple[str, str]] = []
        if not (self.http or self.tcp or self.tls):
            errors.append(("", "one of http, tcp or tls is required"))
        if self.is_delegate:
            # Istio's rules for a delegate (a VirtualService with no hosts).
            for name, value in (("gateways", self.gateways), ("tls", self.tls), ("tcp", self.tcp)):
                if value:
                    errors.append((name, f"a delegate VirtualService (no hosts) must not set {name}"))
            for i, route in enumerate(self.http):
                if route.delegate is not None:
                    errors.append((f"http[{i}].delegate", "a delegate cannot delegate again (one level only)"))
        if not self.is_delegate:
            # Only a gateway has the verified end-user token when it routes (Istio documents claim based
            # routing for ingress gateways only): a match a sidecar applies cannot use claims.
            for i, route in enumerate(self.http):
                for j, match in enumerate(route.match):
                    gateways = match.gateways or self.gateways
                    if not gateways or "mesh" in gateways:
                        errors += [(f"http[{i}].match[{j}].{key}",
                                    f"JWT claim based routing ({CLAIM_KEY}) is only supported at gateways, and "
                                    "this match applies to sidecars (gateways: mesh); bind it to a gateway")
                                   for key in match.claim_keys()]
        for i, host in enumerate(self.hosts):
            if not host:
                errors.append((f"hosts[{i}]", "must not be empty"))
            elif host == "*" and self.applies_to_mesh:
                errors.append((f"hosts[{i}]", "wildcard host * is not allowed for sidecars (gateways: mesh)"))
            elif host in self.hosts[:i]:
                errors.append((f"hosts[{i}]", f"duplicate host {host!r}"))
        if errors:
            raise FieldErrors(errors)
        return self

