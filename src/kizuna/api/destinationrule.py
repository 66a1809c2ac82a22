"""Istio DestinationRule (networking.istio.io v1 / v1beta1 / v1alpha3), every field of destination_rule.proto.

Subsets name groups of endpoints by label; traffic policies (load balancing, connection pool, outlier
detection, TLS) apply to the whole host, a port, or a subset. Checks follow Istio's validateTrafficPolicy.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import Field, model_validator

from kizuna.api.fields import (
    DnsLabel,
    Duration,
    FieldErrors,
    IntPercentage,
    IstioModel,
    Labels,
    NonNegative,
    OptionalTimeout,
    Percentage,
    Port,
    PositiveDuration,
    at_most_one,
)
from kizuna.api.virtualservice import PortSelector

SimpleLB = Literal["UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST"]


class WorkloadSelector(IstioModel):
    """Limit a DestinationRule to the workloads (clients) with these labels, in its namespace."""

    match_labels: Labels = Field(default_factory=dict)


class CookieAttribute(IstioModel):
    """An attribute added to a generated hash cookie."""

    name: str
    value: str = ""


class HTTPCookie(IstioModel):
    """Hash on a cookie (generated with ``ttl`` when absent)."""

    name: str
    path: str = ""
    ttl: Duration | None = None
    attributes: list[CookieAttribute] = Field(default_factory=list)


class RingHash(IstioModel):
    """Ring hash parameters."""

    minimum_ring_size: NonNegative | None = None


class MagLev(IstioModel):
    """Maglev parameters (table size must be prime)."""

    table_size: NonNegative | None = None


class ConsistentHashLB(IstioModel):
    """Session affinity: hash a header, cookie, source IP or query parameter."""

    http_header_name: str | None = None
    http_cookie: HTTPCookie | None = None
    use_source_ip: bool | None = None
    http_query_parameter_name: str | None = None
    ring_hash: RingHash | None = None
    maglev: MagLev | None = None
    minimum_ring_size: NonNegative | None = None  # deprecated: use ringHash

    @model_validator(mode="after")
    def _one(self) -> Self:
        errors = at_most_one(self, "http_header_name", "http_cookie", "use_source_ip",
                             "http_query_parameter_name")
        errors += at_most_one(self, "ring_hash", "maglev", "minimum_ring_size")
        if errors:
            raise FieldErrors(errors)
        return self


class LocalityDistribute(IstioModel):
    """Traffic from one locality split across others by weight."""

    from_: str = Field(default="", alias="from")
    to: dict[str, NonNegative] = Field(default_factory=dict)


class LocalityFailover(IstioModel):
    """Fail over from one region to another."""

    from_: str = Field(default="", alias="from")
    to: str = ""


class LocalityLoadBalancerSetting(IstioModel):
    """Locality-weighted load balancing and failover."""

    distribute: list[LocalityDistribute] = Field(default_factory=list)
    failover: list[LocalityFailover] = Field(default_factory=list)
    failover_priority: list[str] = Field(default_factory=list)
    enabled: bool | None = None


class WarmupConfiguration(IstioModel):
    """Slow start: ramp new endpoints' share up over ``duration``."""

    duration: PositiveDuration
    minimum_percent: Percentage | None = None
    aggression: Annotated[float, Field(ge=1)] | None = None


class LoadBalancerSettings(IstioModel):
    """``simple`` algorithm or ``consistentHash``, plus locality and warmup settings."""

    simple: SimpleLB | None = None
    consistent_hash: ConsistentHashLB | None = None
    locality_lb_setting: LocalityLoadBalancerSetting | None = None
    warmup_duration_secs: Duration | None = None
    warmup: WarmupConfiguration | None = None
    # Newer than the protos checked here; accepted as given (contents not validated), not used by kizuna.
    zone_aware_lb_setting: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one(self) -> Self:
        errors = at_most_one(self, "simple", "consistent_hash")
        errors += at_most_one(self, "warmup_duration_secs", "warmup")
        if errors:
            raise FieldErrors(errors)
        return self


class TcpKeepalive(IstioModel):
    """TCP keepalive probes on upstream connections."""

    probes: NonNegative | None = None
    time: PositiveDuration | None = None
    interval: PositiveDuration | None = None


class TCPSettings(IstioModel):
    """Connection limits and timeouts common to HTTP and TCP upstreams."""

    max_connections: NonNegative | None = None
    connect_timeout: PositiveDuration | None = None
    tcp_keepalive: TcpKeepalive | None = None
    max_connection_duration: PositiveDuration | None = None
    idle_timeout: OptionalTimeout | None = None


class HTTPSettings(IstioModel):
    """HTTP request limits (circuit breaking) and connection reuse."""

    http1_max_pending_requests: NonNegative | None = None
    http2_max_requests: NonNegative | None = None
    max_requests_per_connection: NonNegative | None = None
    max_retries: NonNegative | None = None
    idle_timeout: PositiveDuration | None = None
    h2_upgrade_policy: Literal["DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"] | None = None
    use_client_protocol: bool | None = None
    max_concurrent_streams: NonNegative | None = None
    # Newer than the protos checked here; accepted as given (contents not validated), not used by kizuna.
    http2_keep_alive: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.h2_upgrade_policy == "UPGRADE" and self.use_client_protocol:
            raise FieldErrors([("useClientProtocol", "must not be true when h2UpgradePolicy is UPGRADE")])
        return self


class ConnectionPoolSettings(IstioModel):
    """Per-host connection pool limits; exceeding them answers 503 (circuit breaking)."""

    tcp: TCPSettings | None = None
    http: HTTPSettings | None = None

    @model_validator(mode="after")
    def _some(self) -> Self:
        if self.tcp is None and self.http is None:
            raise FieldErrors([("", "must set tcp and/or http")])
        return self


class OutlierDetection(IstioModel):
    """Eject endpoints that keep failing."""

    consecutive_errors: int | None = None  # deprecated: use consecutive5xxErrors / consecutiveGatewayErrors
    split_external_local_origin_errors: bool = False
    consecutive_local_origin_failures: NonNegative | None = None
    consecutive_gateway_errors: NonNegative | None = None
    consecutive_5xx_errors: NonNegative | None = Field(default=None, alias="consecutive5xxErrors")
    interval: PositiveDuration | None = None
    base_ejection_time: PositiveDuration | None = None
    max_ejection_percent: IntPercentage | None = None
    min_health_percent: IntPercentage | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.consecutive_local_origin_failures and not self.split_external_local_origin_errors:
            raise FieldErrors([("consecutiveLocalOriginFailures",
                                "requires splitExternalLocalOriginErrors: true")])
        return self


class ClientTLSSettings(IstioModel):
    """TLS the client side originates to the upstream."""

    mode: Literal["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"] = "DISABLE"
    client_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    credential_name: str = ""
    subject_alt_names: list[str] = Field(default_factory=list)
    sni: str = ""
    insecure_skip_verify: bool | None = None
    ca_crl: str = ""


class PortTrafficPolicy(IstioModel):
    """Policy for one port of the destination, overriding the enclosing policy's fields."""

    port: PortSelector | None = None
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors: list[tuple[str, str]] = []
        if self.port is None:
            errors.append(("port", "required"))
        if not (self.load_balancer or self.connection_pool or self.outlier_detection or self.tls):
            errors.append(("", "must set at least one of loadBalancer, connectionPool, outlierDetection "
                               "or tls"))
        if errors:
            raise FieldErrors(errors)
        return self


class TunnelSettings(IstioModel):
    """Tunnel TCP to the destination through a proxy (HTTP CONNECT or POST)."""

    protocol: Literal["CONNECT", "POST"] | None = None
    target_host: str
    target_port: Port


class ProxyProtocol(IstioModel):
    """Send a PROXY protocol header upstream."""

    version: Literal["V1", "V2"] | None = None


class RetryBudget(IstioModel):
    """Limit concurrent retries to a share of active requests."""

    percent: Percentage | None = None
    min_retry_concurrency: NonNegative | None = None
    budget_interval: Duration | None = None


class TrafficPolicy(IstioModel):
    """Policies for a host, overridable per port (``portLevelSettings``) and per subset."""

    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None
    port_level_settings: list[PortTrafficPolicy] = Field(default_factory=list)
    tunnel: TunnelSettings | None = None
    proxy_protocol: ProxyProtocol | None = None
    retry_budget: RetryBudget | None = None

    def for_port(self, port: int) -> PortTrafficPolicy | None:
        """The ``portLevelSettings`` entry for ``port``, if any."""
        return next((p for p in self.port_level_settings if p.port and p.port.number == port), None)

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors: list[tuple[str, str]] = []
        if not any((self.load_balancer, self.connection_pool, self.outlier_detection, self.tls,
                    self.port_level_settings, self.tunnel, self.proxy_protocol, self.retry_budget)):
            errors.append(("", "must set at least one policy"))
        if self.tunnel and self.proxy_protocol:
            errors.append(("", "tunnel and proxyProtocol cannot be set together"))
        seen: set[int] = set()
        for i, pls in enumerate(self.port_level_settings):
            if pls.port and pls.port.number in seen:
                errors.append((f"portLevelSettings[{i}].port.number", f"duplicate port {pls.port.number}"))
            if pls.port:
                seen.add(pls.port.number)
        if errors:
            raise FieldErrors(errors)
        return self


class Subset(IstioModel):
    """A named group of the host's endpoints (those whose labels include ``labels``), with its own policy."""

    name: DnsLabel
    labels: Labels = Field(default_factory=dict)
    traffic_policy: TrafficPolicy | None = None


class DestinationRuleSpec(IstioModel):
    """Policies and subsets for one host (short name resolved in the rule's namespace)."""

    host: Annotated[str, Field(min_length=1)]
    traffic_policy: TrafficPolicy | None = None
    subsets: list[Subset] = Field(default_factory=list)
    export_to: list[str] = Field(default_factory=list)
    workload_selector: WorkloadSelector | None = None

    def subset(self, name: str) -> Subset | None:
        """The subset called ``name``, if defined here."""
        return next((s for s in self.subsets if s.name == name), None)

    @model_validator(mode="after")
    def _unique_subsets(self) -> Self:
        errors = [(f"subsets[{i}].name", f"duplicate subset name {s.name!r}")
                  for i, s in enumerate(self.subsets) if s.name in {t.name for t in self.subsets[:i]}]
        if self.host == "*":
            errors.append(("host", "must name a service, not *"))
        if errors:
            raise FieldErrors(errors)
        return self
