"""Circuit breaking for one cluster (Envoy's circuit breakers, as Istio's ``connectionPool`` sets them).

With HTTP/1.1 a request in flight holds one upstream connection, so ``maxConnections`` bounds the requests in
flight to the cluster (and ``http2MaxRequests`` too); a request beyond it waits in a queue of at most
``http1MaxPendingRequests``; beyond that it is refused at once with 503 UO. When a request ends, its slot goes
to the oldest waiting one. ``maxRetries`` bounds the requests that are retrying at the same time. The limits
are cluster-wide within each client sidecar.

A relayed opaque TCP connection holds one upstream connection for its whole life: it takes a slot of
``maxConnections`` (shared with the cluster's HTTP requests) or, with none free, is refused at once (Envoy's
TCP proxy has no queue): the caller closes it and counts it as overflow (UO).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Final

from kizuna.proxyconfig.policy import ConnectionPool

ADMITTED: Final = 1
QUEUED: Final = 0
OVERFLOW: Final = -1


class CircuitBreaker:
    """Counts of one cluster's requests in flight, waiting and retrying, against its limits."""

    __slots__ = ("limit", "max_connections", "max_pending", "max_retries", "holders", "pending", "retrying",
                 "overflows", "retry_overflows", "cx_overflows")

    def __init__(self, pool: ConnectionPool) -> None:
        self.limit = min(pool.max_connections, pool.max_requests)
        self.max_connections = pool.max_connections
        self.max_pending = pool.max_pending_requests
        self.max_retries = pool.max_retries
        self.holders: set[object] = set()
        self.pending: deque[tuple[object, Callable[[], None]]] = deque()
        self.retrying: set[object] = set()
        self.overflows = 0
        """Requests refused with 503 UO."""
        self.retry_overflows = 0
        """Retries not made because ``maxRetries`` were outstanding."""
        self.cx_overflows = 0
        """Opaque TCP connections refused because ``maxConnections`` were open."""

    def enter(self, request: object, start: Callable[[], None]) -> int:
        """``ADMITTED`` (go ahead now), ``QUEUED`` (``start`` is called when a slot frees) or ``OVERFLOW``."""
        if len(self.holders) < self.limit:
            self.holders.add(request)
            return ADMITTED
        if len(self.pending) < self.max_pending:
            self.pending.append((request, start))
            return QUEUED
        self.overflows += 1
        return OVERFLOW

    def connect(self, connection: object) -> bool:
        """Whether a new opaque TCP ``connection`` may open (it then holds a slot until it ``leave``s)."""
        if len(self.holders) >= self.max_connections:
            self.cx_overflows += 1
            return False
        self.holders.add(connection)
        return True

    def leave(self, request: object) -> Callable[[], None] | None:
        """``request`` is over (or gave up waiting). Returns the ``start`` of the waiting request that now
        holds the freed slot, for the caller to run (outside its own bookkeeping)."""
        self.retrying.discard(request)
        if request in self.holders:
            self.holders.discard(request)
            if self.pending and len(self.holders) < self.limit:
                nxt, start = self.pending.popleft()
                self.holders.add(nxt)
                return start
            return None
        for i, (waiting, _) in enumerate(self.pending):
            if waiting is request:
                del self.pending[i]
                break
        return None

    def may_retry(self, request: object) -> bool:
        """Whether ``request`` may retry now (``maxRetries`` across the cluster); it counts as retrying until
        it leaves."""
        if request in self.retrying:
            return True
        if len(self.retrying) >= self.max_retries:
            self.retry_overflows += 1
            return False
        self.retrying.add(request)
        return True

    def to_json(self) -> dict[str, Any]:
        return {"rq_active": len(self.holders), "rq_pending": len(self.pending), "overflows": self.overflows,
                "retry_overflows": self.retry_overflows, "cx_overflows": self.cx_overflows}
