"""Outlier detection (Envoy's consecutive-errors kind): endpoints that keep failing leave the balancer a while.

Counted per cluster in each client sidecar, as Envoy does. An endpoint is ejected the moment its consecutive
5xx (or gateway-error) count reaches the limit, unless another endpoint is already ejected and this one would
take the ejected share above ``max_ejection_percent``; it returns after ``base_ejection_time`` times the
number of times it was ejected. Every ``interval`` an endpoint that is back and behaving has that number
lowered by one. Time is passed in, so this
is plain arithmetic that tests drive with any clock.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Final

from kizuna.proxyconfig.policy import OutlierDetection

MAX_EJECTION_TIME: Final = 300.0
"""Envoy's max_ejection_time default: an ejection never lasts longer."""

GATEWAY_ERRORS: Final = frozenset({502, 503, 504})


class HostState:
    """Counts for one endpoint of one cluster."""

    __slots__ = ("consecutive_5xx", "consecutive_gateway", "ejected_until", "times_ejected")

    def __init__(self) -> None:
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.ejected_until: float | None = None
        self.times_ejected = 0


class OutlierDetector:
    """Ejection state of a cluster's endpoints (any hashable keys, in practice the endpoint pools)."""

    __slots__ = ("config", "hosts", "ejections_total", "ejections_overflow", "_next_sweep")

    def __init__(self, config: OutlierDetection, keys: Sequence[Hashable]) -> None:
        self.config = config
        self.hosts: dict[Hashable, HostState] = {k: HostState() for k in keys}
        self.ejections_total = 0
        self.ejections_overflow = 0
        """Ejections skipped because of ``max_ejection_percent``."""
        self._next_sweep = 0.0

    def observe(self, key: Hashable, status: int, now: float) -> None:
        """A response status from endpoint ``key`` (a connect failure or reset counts as 503)."""
        host = self.hosts.get(key)
        if host is None:
            return
        if now >= self._next_sweep:
            self.sweep(now)
        if status < 500:
            host.consecutive_5xx = 0
            host.consecutive_gateway = 0
            return
        config = self.config
        host.consecutive_5xx += 1
        if status in GATEWAY_ERRORS:
            host.consecutive_gateway += 1
        else:
            host.consecutive_gateway = 0
        if host.ejected_until is not None:
            if host.ejected_until > now:
                return
            host.ejected_until = None  # its time is over: it answers like any other endpoint again
        if ((config.consecutive_5xx and host.consecutive_5xx >= config.consecutive_5xx)
                or (config.consecutive_gateway and host.consecutive_gateway >= config.consecutive_gateway)):
            self._eject(host, now)

    def _eject(self, host: HostState, now: float) -> None:
        host.consecutive_5xx = host.consecutive_gateway = 0
        ejected = sum(1 for h in self.hosts.values() if h.ejected_until is not None and h.ejected_until > now)
        # Envoy (outlier detection overview): with no host ejected, the first one is ejected at once; after
        # that only while the share ejected stays within the maximum (Istio's 10 % default would otherwise
        # never eject anything in a cluster of fewer than ten endpoints).
        if ejected and 100.0 * (ejected + 1) / len(self.hosts) > self.config.max_ejection_percent:
            self.ejections_overflow += 1
            return
        host.times_ejected += 1
        host.ejected_until = now + min(self.config.base_ejection_time * host.times_ejected, MAX_EJECTION_TIME)
        self.ejections_total += 1

    def sweep(self, now: float) -> None:
        """Return endpoints whose ejection is over; lower the ejection count of those that behave."""
        self._next_sweep = now + self.config.interval
        for host in self.hosts.values():
            if host.ejected_until is not None:
                if host.ejected_until <= now:
                    host.ejected_until = None
            elif host.times_ejected:
                host.times_ejected -= 1

    def is_ejected(self, key: Hashable, now: float) -> bool:
        """True while ``key`` is out of the balancer."""
        host = self.hosts.get(key)
        until = host.ejected_until if host is not None else None
        return until is not None and until > now

    def ejected(self, now: float) -> list[Hashable]:
        """The keys ejected at ``now``."""
        return [k for k, h in self.hosts.items() if h.ejected_until is not None and h.ejected_until > now]

    def panic(self, now: float) -> bool:
        """True when too few endpoints are healthy (``min_health_percent``): then ejections are ignored."""
        if not self.config.min_health_percent or not self.hosts:
            return False
        healthy = len(self.hosts) - len(self.ejected(now))
        return 100.0 * healthy / len(self.hosts) < self.config.min_health_percent

    def to_json(self, now: float) -> dict[str, Any]:
        return {"ejections_total": self.ejections_total, "ejections_active": len(self.ejected(now)),
                "ejections_overflow": self.ejections_overflow}
