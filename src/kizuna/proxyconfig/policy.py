"""DestinationRule resilience policy a cluster carries: connection pool limits, outlier detection and hashing.

Plain frozen dataclasses with hand-written JSON, like ``model.py``. Defaults are Istio's (and Envoy's): a field
the DestinationRule leaves out keeps the value here, so a default object means "no policy" and the proxy
skips the work (see ``is_default``). Durations are float seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

UNLIMITED = 2**32 - 1
"""Istio's default for every connection-pool limit (Envoy's circuit breakers set to the maximum)."""
HashAlgorithm = Literal["ring", "maglev"]


@dataclass(frozen=True, slots=True)
class ConnectionPool:
    """``connectionPool``: cluster-wide limits in each client sidecar (Envoy circuit-breaker semantics)."""

    max_connections: int = UNLIMITED
    """tcp.maxConnections: with HTTP/1.1 one request holds one connection, so at most this many in flight."""
    max_pending_requests: int = UNLIMITED
    """http.http1MaxPendingRequests: requests waiting for a connection; more get 503 UO."""
    max_requests: int = UNLIMITED
    """http.http2MaxRequests: requests in flight to the cluster."""
    max_requests_per_connection: int = 0
    """http.maxRequestsPerConnection: a connection closes after this many requests (0 = unlimited)."""
    max_retries: int = UNLIMITED
    """http.maxRetries: retries outstanding at once across the cluster."""
    idle_timeout: float | None = None
    """http.idleTimeout / tcp.idleTimeout: an idle pooled connection closes after this (None: the pool's own)."""
    max_connection_duration: float | None = None
    """tcp.maxConnectionDuration: a connection is not reused once this old (HTTP); a relayed opaque TCP
    connection is closed at this age."""
    tcp_idle_timeout: float | None = None
    """tcp.idleTimeout alone: a relayed opaque TCP connection with no bytes either way for this long is closed
    (None: Istio's 1 h default; 0: never)."""

    def is_default(self) -> bool:
        """True when nothing differs from the defaults (the proxy then does no per-request accounting)."""
        return self == DEFAULT_POOL

    def has_limits(self) -> bool:
        """True when a request-level limit (connections, pending, requests, retries) is set."""
        return (self.max_connections, self.max_pending_requests, self.max_requests,
                self.max_retries) != (UNLIMITED,) * 4

    def to_json(self) -> dict[str, Any]:
        return {"maxConnections": self.max_connections, "maxPendingRequests": self.max_pending_requests,
                "maxRequests": self.max_requests, "maxRequestsPerConnection": self.max_requests_per_connection,
                "maxRetries": self.max_retries, "idleTimeout": self.idle_timeout,
                "maxConnectionDuration": self.max_connection_duration, "tcpIdleTimeout": self.tcp_idle_timeout}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ConnectionPool:
        return cls(int(data.get("maxConnections", UNLIMITED)), int(data.get("maxPendingRequests", UNLIMITED)),
                   int(data.get("maxRequests", UNLIMITED)), int(data.get("maxRequestsPerConnection", 0)),
                   int(data.get("maxRetries", UNLIMITED)), _opt_float(data.get("idleTimeout")),
                   _opt_float(data.get("maxConnectionDuration")), _opt_float(data.get("tcpIdleTimeout")))


DEFAULT_POOL = ConnectionPool()


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """``outlierDetection`` (Envoy consecutive-errors detection). 0 for a consecutive count disables it."""

    consecutive_5xx: int = 5
    """Consecutive 5xx answers (or connect failures / resets) that eject an endpoint; Envoy's default 5."""
    consecutive_gateway: int = 0
    """Consecutive 502/503/504 (or connect failures / resets) that eject an endpoint; off unless set."""
    interval: float = 10.0
    """How often ejection counts decay for endpoints that behave."""
    base_ejection_time: float = 30.0
    """An ejection lasts this times the number of times the endpoint was ejected."""
    max_ejection_percent: int = 10
    """At most this share of the cluster's endpoints ejected at once (an ejection that would exceed it is
    skipped, as in Envoy)."""
    min_health_percent: int = 0
    """Below this share of healthy endpoints the balancer ignores ejections (Envoy's panic threshold)."""

    def to_json(self) -> dict[str, Any]:
        return {"consecutive5xx": self.consecutive_5xx, "consecutiveGateway": self.consecutive_gateway,
                "interval": self.interval, "baseEjectionTime": self.base_ejection_time,
                "maxEjectionPercent": self.max_ejection_percent, "minHealthPercent": self.min_health_percent}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OutlierDetection:
        return cls(int(data.get("consecutive5xx", 5)), int(data.get("consecutiveGateway", 0)),
                   float(data.get("interval", 10.0)), float(data.get("baseEjectionTime", 30.0)),
                   int(data.get("maxEjectionPercent", 10)), int(data.get("minHealthPercent", 0)))


@dataclass(frozen=True, slots=True)
class HashPolicy:
    """``loadBalancer.consistentHash``: what a request's key is taken from, and the hashing table.

    Exactly one source is set: ``header`` (lower-case name), ``cookie`` (with ``cookie_path`` and, when the
    proxy should set it on a response that lacks it, ``cookie_ttl``), ``source_ip`` or ``query_param``.
    """

    header: str = ""
    cookie: str = ""
    cookie_path: str = ""
    cookie_ttl: float | None = None
    source_ip: bool = False
    query_param: str = ""
    algorithm: HashAlgorithm = "ring"
    ring_size: int = 1024
    """ringHash.minimumRingSize (Envoy's default 1024)."""
    table_size: int = 65537
    """maglev.tableSize (a prime; Envoy's default 65537)."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"algorithm": self.algorithm, "ringSize": self.ring_size,
                               "tableSize": self.table_size}
        if self.header:
            out["header"] = self.header
        if self.cookie:
            out["cookie"] = {"name": self.cookie, "path": self.cookie_path, "ttl": self.cookie_ttl}
        if self.source_ip:
            out["sourceIp"] = True
        if self.query_param:
            out["queryParam"] = self.query_param
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HashPolicy:
        cookie = data.get("cookie") or {}
        return cls(str(data.get("header", "")).lower(), str(cookie.get("name", "")), str(cookie.get("path", "")),
                   _opt_float(cookie.get("ttl")), bool(data.get("sourceIp", False)),
                   str(data.get("queryParam", "")), data.get("algorithm", "ring"),
                   int(data.get("ringSize", 1024)), int(data.get("tableSize", 65537)))


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)
