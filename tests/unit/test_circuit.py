"""Circuit breaker bookkeeping: admitted, queued, overflowed; slots handed to the oldest waiting request."""

from __future__ import annotations

from kizuna.proxy.circuit import ADMITTED, OVERFLOW, QUEUED, CircuitBreaker
from kizuna.proxyconfig.policy import UNLIMITED, ConnectionPool


def test_istio_circuit_breaking_limits() -> None:
    breaker = CircuitBreaker(ConnectionPool(max_connections=1, max_pending_requests=1))
    started: list[str] = []
    assert breaker.enter("r1", lambda: started.append("r1")) == ADMITTED
    assert breaker.enter("r2", lambda: started.append("r2")) == QUEUED
    assert breaker.enter("r3", lambda: started.append("r3")) == OVERFLOW
    assert breaker.overflows == 1
    start = breaker.leave("r1")
    assert start is not None
    start()
    assert started == ["r2"] and breaker.holders == {"r2"} and not breaker.pending
    assert breaker.leave("r2") is None
    assert breaker.to_json() == {"rq_active": 0, "rq_pending": 0, "overflows": 1, "retry_overflows": 0,
                                 "cx_overflows": 0}


def test_a_waiting_request_that_gives_up_leaves_the_queue() -> None:
    breaker = CircuitBreaker(ConnectionPool(max_connections=1, max_pending_requests=2))
    breaker.enter("r1", lambda: None)
    breaker.enter("r2", lambda: None)
    breaker.enter("r3", lambda: None)
    assert breaker.leave("r2") is None  # timed out while waiting
    assert [r for r, _ in breaker.pending] == ["r3"]
    assert breaker.leave("r1") is not None and breaker.holders == {"r3"}


def test_http2_max_requests_bounds_in_flight_too() -> None:
    breaker = CircuitBreaker(ConnectionPool(max_requests=2, max_pending_requests=0))
    assert [breaker.enter(i, lambda: None) for i in range(3)] == [ADMITTED, ADMITTED, OVERFLOW]


def test_max_retries_is_cluster_wide() -> None:
    breaker = CircuitBreaker(ConnectionPool(max_retries=1))
    assert breaker.may_retry("a") and breaker.may_retry("a")  # the same request retrying again
    assert not breaker.may_retry("b")
    assert breaker.retry_overflows == 1
    breaker.leave("a")
    assert breaker.may_retry("b")


def test_defaults_are_unlimited() -> None:
    pool = ConnectionPool()
    assert pool.is_default() and not pool.has_limits()
    assert CircuitBreaker(pool).limit == UNLIMITED
    assert ConnectionPool(max_retries=3).has_limits()
    assert not ConnectionPool(idle_timeout=5.0).has_limits()
