"""Counters of one sidecar, bumped on the hot path as plain attribute and list increments, read by admin."""

from __future__ import annotations

import time
from typing import Any

CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class Stats:
    """Everything ``GET /stats`` reports. Counters only grow, except the ``*_active`` gauges."""

    __slots__ = ("downstream_cx_total", "downstream_cx_active", "downstream_rq_total", "outbound_rq_total",
                 "inbound_rq_total", "inbound_rq", "upstream_cx_total", "upstream_cx_active", "upstream_rq",
                 "retries", "timeouts", "errors", "tcp_cx_total", "tcp_cx_active",
                 "flags", "mirror_total", "mirror_dropped", "mirror_active", "mirror_failed", "policies",
                 "security", "jwks")

    def __init__(self) -> None:
        self.downstream_cx_total = 0
        self.downstream_cx_active = 0
        self.downstream_rq_total = 0
        self.outbound_rq_total = 0
        self.inbound_rq_total = 0
        self.inbound_rq: dict[int, list[int]] = {}
        """Inbound requests by listener port (a one-element list, so a listener holds its own counter)."""
        self.upstream_cx_total = 0
        self.upstream_cx_active = 0
        self.upstream_rq: dict[str, list[int]] = {}
        """Upstream responses by cluster: counts for 1xx..5xx at index status // 100 - 1."""
        self.retries = 0
        self.timeouts = 0
        self.errors: dict[str, int] = {}
        """Responses the proxy made up, by reason (``no route``, ``upstream timeout`` ...)."""
        self.tcp_cx_total = 0
        self.tcp_cx_active = 0
        # Route actions (issue 4): Envoy response flags, and mirrored requests sent, dropped (too many in
        # flight), in flight and failed (connect error, reset or timeout; never seen by the client).
        self.flags: dict[str, int] = {}
        self.mirror_total = 0
        self.mirror_dropped = 0
        self.mirror_active = 0
        self.mirror_failed = 0
        # Resilience (DestinationRule connectionPool / outlierDetection): cluster name -> the current
        # snapshot's ClusterState for clusters with a circuit breaker or outlier detection; /stats reads their
        # counters (they restart when a new snapshot rebuilds the cluster).
        self.policies: dict[str, Any] = {}
        # Inbound security (issue 6): authorization decisions and JWT outcomes by name (``rq_allowed``,
        # ``rq_denied``, ``cx_denied``, ``audit``, ``dry_run``, ``jwt_failed`` ...), and the sidecar's JWKS
        # cache (anything with ``to_json()``; fetch failures show there).
        self.security: dict[str, int] = {}
        self.jwks: Any = None

    def cluster_counters(self, cluster: str) -> list[int]:
        """The response-class counters of ``cluster``, created on first use and kept across snapshots."""
        counters = self.upstream_rq.get(cluster)
        if counters is None:
            counters = self.upstream_rq[cluster] = [0, 0, 0, 0, 0]
        return counters

    def inbound_counter(self, port: int) -> list[int]:
        """The request counter of the inbound listener on ``port``."""
        counter = self.inbound_rq.get(port)
        if counter is None:
            counter = self.inbound_rq[port] = [0]
        return counter

    def error(self, reason: str) -> None:
        """Count a synthetic response (a route's own redirect or direct response has no reason: no error)."""
        if reason:
            self.errors[reason] = self.errors.get(reason, 0) + 1

    def flag(self, flags: str) -> None:
        """Count a proxy-made outcome by its response flags (``UF,URX`` counts both)."""
        if flags:
            for name in flags.split(","):
                self.flags[name] = self.flags.get(name, 0) + 1

    def to_json(self) -> dict[str, Any]:
        return {
            "downstream": {"cx_total": self.downstream_cx_total, "cx_active": self.downstream_cx_active,
                           "rq_total": self.downstream_rq_total},
            "outbound": {"rq_total": self.outbound_rq_total},
            "inbound": {"rq_total": self.inbound_rq_total,
                        "rq_by_port": {str(p): c[0] for p, c in sorted(self.inbound_rq.items())}},
            "upstream": {"cx_total": self.upstream_cx_total, "cx_active": self.upstream_cx_active,
                         "rq": {name: {cls: n for cls, n in zip(CLASSES, counts, strict=True) if n}
                                for name, counts in sorted(self.upstream_rq.items())}},
            "tcp": {"cx_total": self.tcp_cx_total, "cx_active": self.tcp_cx_active},
            "retries": self.retries,
            "timeouts": self.timeouts,
            "errors": dict(sorted(self.errors.items())),
            "flags": dict(sorted(self.flags.items())),
            "mirror": {"rq_total": self.mirror_total, "rq_dropped": self.mirror_dropped,
                       "rq_active": self.mirror_active, "rq_failed": self.mirror_failed},
            "resilience": self._resilience(),
            **({"security": dict(sorted(self.security.items()))} if self.security else {}),
            **({"jwks": self.jwks.to_json()} if self.jwks is not None and self.jwks.entries else {}),
        }

    def count(self, name: str) -> None:
        """Bump the security counter ``name``."""
        self.security[name] = self.security.get(name, 0) + 1

    def _resilience(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, cluster in sorted(self.policies.items()):
            entry: dict[str, Any] = {}
            if cluster.circuit is not None:
                entry["circuit_breaker"] = cluster.circuit.to_json()
            if cluster.outlier is not None:
                now = time.monotonic()
                entry["outlier_detection"] = {**cluster.outlier.to_json(now), "ejected": sorted(
                    f"{pool.address}:{pool.port}" for pool in cluster.outlier.ejected(now))}
            out[name] = entry
        return out
