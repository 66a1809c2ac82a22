"""The sans-I/O HTTP/2 adapter: two endpoints talking through byte buffers, no sockets."""

from __future__ import annotations

from kizuna.protocols.http2 import (
    DataReceived,
    Event,
    GoAwayReceived,
    H2Endpoint,
    HeadersReceived,
    StreamReset,
    TrailersReceived,
    WindowOpened,
    grpc_timeout,
)
from kizuna.proxy.errors import NO_HEALTHY_UPSTREAM, NO_ROUTE, UPSTREAM_TIMEOUT, fault_abort
from kizuna.proxy.h2_routing import grpc_retry_codes, synthetic_headers

REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"echo:50051"),
           (b":path", b"/echo.Echo/Say"), (b"content-type", b"application/grpc")]


def _exchange(a: H2Endpoint, b: H2Endpoint) -> list[Event]:
    """Move a's pending bytes to b; b's events."""
    return b.receive(a.data_to_send())


def _pair() -> tuple[H2Endpoint, H2Endpoint]:
    client, server = H2Endpoint(client_side=True), H2Endpoint(client_side=False)
    _exchange(client, server)
    _exchange(server, client)
    _exchange(client, server)
    return client, server


def test_request_response_with_trailers() -> None:
    client, server = _pair()
    sid = client.next_stream_id()
    client.send_headers(sid, REQUEST)
    assert client.send_data(sid, b"hello", end_stream=True) == 5
    events = _exchange(client, server)
    assert events[0] == HeadersReceived(sid, REQUEST, False)
    assert events[1] == DataReceived(sid, b"hello", 5, True)
    server.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    server.send_data(sid, b"world")
    server.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
    events = [e for e in _exchange(server, client) if not isinstance(e, WindowOpened)]
    assert [type(e) for e in events] == [HeadersReceived, DataReceived, TrailersReceived]
    assert events[2] == TrailersReceived(sid, [(b"grpc-status", b"0")])


def test_send_data_stops_at_the_window_until_acknowledged() -> None:
    client, server = _pair()
    sid = client.next_stream_id()
    client.send_headers(sid, REQUEST)
    body = b"x" * 100_000
    sent = client.send_data(sid, body)
    assert sent == 65_535  # the default window: the rest waits
    received = [e for e in _exchange(client, server) if isinstance(e, DataReceived)]
    assert sum(len(e.data) for e in received) == sent
    assert client.send_data(sid, body[sent:]) == 0  # nothing credited yet
    for event in received:
        server.acknowledge(sid, event.flow_length)
    assert any(isinstance(e, WindowOpened) for e in _exchange(server, client))
    assert client.send_data(sid, body[sent:]) > 0


def test_reset_and_goaway_become_events() -> None:
    client, server = _pair()
    sid = client.next_stream_id()
    client.send_headers(sid, REQUEST)
    _exchange(client, server)
    server.reset(sid)
    assert StreamReset(sid, 8) in _exchange(server, client)
    server.goaway()
    assert GoAwayReceived(sid, 0) in _exchange(server, client)


def test_garbage_fails_the_connection() -> None:
    server = H2Endpoint(client_side=False)
    events = server.receive(b"GET / HTTP/1.1\r\n\r\n" + b"x" * 30)
    assert events and type(events[0]).__name__ == "ConnectionFailed"


def test_grpc_timeout_units() -> None:
    assert grpc_timeout(b"200m") == 0.2
    assert grpc_timeout(b"5S") == 5.0
    assert grpc_timeout(b"1H") == 3600.0
    assert grpc_timeout(b"100u") == 100e-6
    assert grpc_timeout(b"5") is None
    assert grpc_timeout(b"5x") is None
    assert grpc_timeout(b"123456789S") is None  # at most 8 digits


def test_proxy_errors_become_grpc_statuses() -> None:
    headers, body = synthetic_headers(NO_HEALTHY_UPSTREAM, grpc=True)
    found = dict(headers)
    assert (found[b":status"], found[b"grpc-status"]) == (b"200", b"14")
    assert found[b"grpc-message"] == b"no healthy upstream"
    assert found[b"x-kizuna-flags"] == b"UH" and body == b""
    assert dict(synthetic_headers(NO_ROUTE, grpc=True)[0])[b"grpc-status"] == b"12"
    assert dict(synthetic_headers(UPSTREAM_TIMEOUT, grpc=True)[0])[b"grpc-status"] == b"4"
    assert dict(synthetic_headers(fault_abort(None, 7), grpc=True)[0])[b"grpc-status"] == b"7"


def test_proxy_errors_for_plain_http2_keep_their_status() -> None:
    headers, body = synthetic_headers(NO_HEALTHY_UPSTREAM, grpc=False)
    found = dict(headers)
    assert found[b":status"] == b"503" and b"grpc-status" not in found
    assert body == b"no healthy upstream\n" and found[b"content-length"] == b"%d" % len(body)


def test_grpc_retry_on_names() -> None:
    assert grpc_retry_codes(frozenset({"unavailable", "cancelled", "5xx"})) == {14, 1}
    assert grpc_retry_codes(frozenset({"deadline-exceeded", "internal", "resource-exhausted"})) == {4, 13, 8}
