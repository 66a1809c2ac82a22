"""When a failed try is retried: Istio's HTTPRetry evaluated as Envoy's retry state does, per route.

``retry_on`` conditions: ``5xx`` (any 5xx, resets and connect failures), ``gateway-error`` (502/503/504,
resets, connect failures), ``reset`` (no response: disconnect, reset, per-try timeout), ``connect-failure``,
``retriable-status-codes`` (the codes in ``retriable_status_codes``, where Istio also puts numeric retryOn
entries; a per-try timeout counts as 504), ``retriable-4xx`` (409 Conflict, as Envoy). HTTP/2 stream
conditions (``refused-stream``, and the gRPC ``cancelled``, ``deadline-exceeded``, ``internal``,
``resource-exhausted``, ``unavailable``: see ``h2_routing``) never occur on HTTP/1.1.
"""

from __future__ import annotations

import random
from typing import Final

from kizuna.proxyconfig.model import RetryPolicy

BACKOFF_BASE: Final = 0.025
BACKOFF_MAX: Final = 0.25
CONFLICT: Final = 409


class RetryRules:
    """A route's retry policy as flags, so the hot path tests booleans instead of parsing strings."""

    __slots__ = ("attempts", "per_try_timeout", "on_connect_failure", "on_reset", "on_timeout",
                 "on_5xx", "on_gateway_error", "on_4xx", "status_codes", "retriable_statuses", "backoff_base")

    def __init__(self, policy: RetryPolicy) -> None:
        on = policy.retry_on
        self.attempts = max(0, policy.attempts)
        self.per_try_timeout = policy.per_try_timeout or None
        self.backoff_base = policy.backoff or BACKOFF_BASE
        self.on_5xx = "5xx" in on
        self.on_gateway_error = "gateway-error" in on
        self.on_4xx = "retriable-4xx" in on
        self.on_reset = self.on_5xx or self.on_gateway_error or "reset" in on
        self.on_connect_failure = self.on_reset or "connect-failure" in on
        self.status_codes = (frozenset(policy.retriable_status_codes) if "retriable-status-codes" in on
                             else frozenset())
        self.on_timeout = self.on_reset or 504 in self.status_codes
        self.retriable_statuses = frozenset(c for c in range(100, 600) if self.status_retriable(c))
        """Every status ``status_retriable`` accepts, for a set lookup per response."""

    def status_retriable(self, status: int) -> bool:
        """True when a response with ``status`` is discarded and retried."""
        if status < 500:
            # Envoy's retriable-4xx retries 409 only: a conflict may clear; other 4xx would fail again.
            return status in self.status_codes or (self.on_4xx and status == CONFLICT)
        if self.on_5xx or status in self.status_codes:
            return True
        return self.on_gateway_error and status in (502, 503, 504)


def backoff(retry: int, base: float = BACKOFF_BASE) -> float:
    """Delay before retry number ``retry`` (1-based): jittered exponential from ``base`` (by default 25 ms:
    25-50 ms, 50-100 ms, 100-200 ms), then 125-250 ms: at most ten times ``base`` (Envoy's maximum), and still
    jittered there so that retries spread out.

    Envoy draws from [0, 25 ms x (2^n - 1)), so its first retry may follow at once; the floor of one base
    interval here keeps a retry from landing on an upstream in the same breath as the failure it answers."""
    floor = min(base * (BACKOFF_MAX / BACKOFF_BASE) / 2, base * (2 ** (min(retry, 8) - 1)))
    return float(floor * random.uniform(1.0, 2.0))
