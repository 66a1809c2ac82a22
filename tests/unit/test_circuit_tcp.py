"""Opaque TCP connections and ``maxConnections``: a slot per open connection, none queued, shared with HTTP."""

from __future__ import annotations

from kizuna.proxy.circuit import QUEUED, CircuitBreaker
from kizuna.proxyconfig.policy import ConnectionPool


def test_tcp_connections_take_slots_and_are_never_queued() -> None:
    breaker = CircuitBreaker(ConnectionPool(max_connections=2, max_pending_requests=5, max_requests=1))
    assert breaker.connect("c1") and breaker.connect("c2")  # http2MaxRequests does not bound TCP connections
    assert not breaker.connect("c3")
    assert breaker.cx_overflows == 1 and breaker.overflows == 0 and breaker.holders == {"c1", "c2"}
    assert breaker.leave("c1") is None
    assert breaker.connect("c3")


def test_a_closing_tcp_connection_hands_its_slot_to_a_waiting_request() -> None:
    breaker = CircuitBreaker(ConnectionPool(max_connections=1, max_pending_requests=1))
    started: list[str] = []
    assert breaker.connect("tcp")
    assert breaker.enter("r1", lambda: started.append("r1")) == QUEUED
    start = breaker.leave("tcp")
    assert start is not None
    start()
    assert started == ["r1"] and breaker.holders == {"r1"}
