"""The sans-I/O HTTP/2 adapter: two endpoints talking through byte buffers, no sockets."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hpack
import pytest

from bench.settings import BenchSettings
from kizuna.protocols.hpack import CompressionFailure, HeaderDecoder, encode_headers
from kizuna.protocols.http2 import (
    CONNECTION_WINDOW,
    ConnectionFailed,
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
from kizuna.proxy.errors import NO_HEALTHY_UPSTREAM, NO_ROUTE, UPSTREAM_TIMEOUT, SyntheticResponse, fault_abort
from kizuna.proxy.h2_routing import grpc_retry_codes, synthetic_headers
from kizuna.proxy.inbound_policy import RBAC_DENIED
from kizuna.proxy.mtls import late_refusal

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
    # gRPC's HTTP mapping, as Envoy's local replies: a refusal (RBAC, mTLS required) is PERMISSION_DENIED, a token
    # that does not verify UNAUTHENTICATED.
    assert dict(synthetic_headers(RBAC_DENIED, grpc=True)[0])[b"grpc-status"] == b"7"
    assert dict(synthetic_headers(late_refusal(80, "istio-system/default"), grpc=True)[0])[b"grpc-status"] == b"7"
    assert dict(synthetic_headers(SyntheticResponse(401, "jwt", body=b"Jwt is missing"),
                                  grpc=True)[0])[b"grpc-status"] == b"16"


def test_proxy_errors_for_plain_http2_keep_their_status() -> None:
    headers, body = synthetic_headers(NO_HEALTHY_UPSTREAM, grpc=False)
    found = dict(headers)
    assert found[b":status"] == b"503" and b"grpc-status" not in found
    assert body == b"no healthy upstream\n" and found[b"content-length"] == b"%d" % len(body)


def test_grpc_retry_on_names() -> None:
    assert grpc_retry_codes(frozenset({"unavailable", "cancelled", "5xx"})) == {14, 1}
    assert grpc_retry_codes(frozenset({"deadline-exceeded", "internal", "resource-exhausted"})) == {4, 13, 8}


# -- the framing layer against an independent implementation (the h2 library) and at its edges ------------

def _h2lib(client_side: bool, **settings: int) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client_side, header_encoding=None))
    conn.initiate_connection()
    if settings:
        conn.update_settings({getattr(h2.settings.SettingCodes, k): v for k, v in settings.items()})
    return conn


def _to_lib(ours: H2Endpoint, lib: h2.connection.H2Connection) -> list[h2.events.Event]:
    return lib.receive_data(ours.data_to_send())


def _from_lib(lib: h2.connection.H2Connection, ours: H2Endpoint) -> list[Event]:
    return ours.receive(lib.data_to_send())


def test_our_client_talks_to_the_h2_library_server() -> None:
    client, server = H2Endpoint(client_side=True), _h2lib(client_side=False)
    _to_lib(client, server)
    _from_lib(server, client)
    sid = client.next_stream_id()
    client.send_headers(sid, REQUEST)
    client.send_data(sid, b"ping")
    client.send_headers(sid, [(b"x-trailer", b"1")], end_stream=True)
    events = _to_lib(client, server)
    kinds = [type(e).__name__ for e in events]
    assert kinds[-4:] == ["RequestReceived", "DataReceived", "TrailersReceived", "StreamEnded"]
    request = events[-4]
    assert isinstance(request, h2.events.RequestReceived) and request.headers is not None
    assert [tuple(h) for h in request.headers] == REQUEST
    server.send_headers(sid, [(b":status", b"200")])
    server.send_data(sid, b"pong")
    server.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
    answer = [e for e in _from_lib(server, client) if not isinstance(e, WindowOpened)]
    assert answer == [HeadersReceived(sid, [(b":status", b"200")], False), DataReceived(sid, b"pong", 4, False),
                      TrailersReceived(sid, [(b"grpc-status", b"0")])]
    assert not client.stream_open(sid)


def test_the_h2_library_client_talks_to_our_server() -> None:
    client, server = _h2lib(client_side=True), H2Endpoint(client_side=False)
    _from_lib(client, server)
    _to_lib(server, client)
    client.send_headers(1, REQUEST, end_stream=True)
    assert _from_lib(client, server)[-1] == HeadersReceived(1, REQUEST, True)
    big = b"y" * 40_000  # more than one frame and the h2 client's initial window would allow at once
    server.send_headers(1, [(b":status", b"200")])
    assert server.send_data(1, big, end_stream=True) == len(big)
    events = _to_lib(server, client)
    body = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
    assert body == big and isinstance(events[-1], h2.events.StreamEnded)


def test_header_blocks_larger_than_a_frame_use_continuation_both_ways() -> None:
    long_value = b"v" * 40_000
    headers = [*REQUEST, (b"x-long", long_value)]
    client, server = H2Endpoint(client_side=True), _h2lib(client_side=False)
    _to_lib(client, server)
    _from_lib(server, client)
    client.send_headers(1, headers, end_stream=True)
    received = _to_lib(client, server)
    request = next(e for e in received if isinstance(e, h2.events.RequestReceived))
    assert dict(request.headers)[b"x-long"] == long_value
    server.send_headers(1, [(b":status", b"200"), (b"x-long", long_value)], end_stream=True)
    assert _from_lib(server, client)[-1] == HeadersReceived(1, [(b":status", b"200"), (b"x-long", long_value)],
                                                            True)


def test_bytes_split_anywhere_give_the_same_events() -> None:
    client, server = H2Endpoint(client_side=True), H2Endpoint(client_side=False)
    sid = client.next_stream_id()
    client.send_headers(sid, REQUEST)
    client.send_data(sid, b"a" * 1000, end_stream=True)
    wire = client.data_to_send()
    events: list[Event] = []
    for i in range(len(wire)):
        events += [e for e in server.receive(wire[i:i + 1]) if not isinstance(e, WindowOpened)]
    assert events == [HeadersReceived(sid, REQUEST, False), DataReceived(sid, b"a" * 1000, 1000, True)]


def test_ping_is_answered_and_settings_acknowledged() -> None:
    client, server = _h2lib(client_side=True), H2Endpoint(client_side=False)
    _from_lib(client, server)
    events = _to_lib(server, client)
    assert any(isinstance(e, h2.events.SettingsAcknowledged) for e in events)
    client.ping(b"12345678")
    _from_lib(client, server)
    acks = [e for e in _to_lib(server, client) if isinstance(e, h2.events.PingAckReceived)]
    assert [a.ping_data for a in acks] == [b"12345678"]


def test_a_larger_initial_window_from_the_peer_opens_every_stream() -> None:
    client, server = H2Endpoint(client_side=True), _h2lib(client_side=False, INITIAL_WINDOW_SIZE=1_000_000)
    _to_lib(client, server)
    server.increment_flow_control_window(2_000_000)  # the connection window is not a setting
    assert WindowOpened(0) in _from_lib(server, client)
    client.send_headers(1, REQUEST)
    assert client.send_data(1, b"z" * 300_000) == 300_000


def test_the_connection_window_is_wide_but_each_stream_keeps_64k() -> None:
    client, server = H2Endpoint(client_side=True), H2Endpoint(client_side=False)
    _exchange(client, server)
    _exchange(server, client)
    sent = 0
    for _ in range(4):  # four streams' worth, unacknowledged, would stall on a 64 KiB connection window
        sid = client.next_stream_id()
        client.send_headers(sid, REQUEST)
        sent += client.send_data(sid, b"q" * 100_000)
    assert sent == 4 * 65_535
    assert sum(e.flow_length for e in _exchange(client, server) if isinstance(e, DataReceived)) == sent


def test_data_for_a_reset_stream_is_still_credited_to_the_connection() -> None:
    client, server = _h2lib(client_side=True), H2Endpoint(client_side=False)
    _from_lib(client, server)
    _to_lib(server, client)
    start, sent = client.outbound_flow_control_window, 0
    for sid in range(1, 1 + 2 * 132, 2):  # ~8.4 MB, all on streams reset while their DATA was in flight
        client.send_headers(sid, REQUEST)
        _from_lib(client, server)
        server.reset(sid)
        for _ in range(4):
            client.send_data(sid, b"d" * 16_000)
        sent += 64_000
        assert _from_lib(client, server) == []  # dropped: nobody upstream will ever credit it
        _to_lib(server, client)
    # The connection window was credited for it all (once half of it was owed): it never stalls.
    assert client.outbound_flow_control_window >= start - sent + CONNECTION_WINDOW // 2


def test_streams_past_the_limit_are_refused() -> None:
    client, server = H2Endpoint(client_side=True), H2Endpoint(client_side=False)
    _exchange(client, server)
    _exchange(server, client)
    for _ in range(1001):
        client.send_headers(client.next_stream_id(), REQUEST)
    events = _exchange(client, server)
    assert len([e for e in events if isinstance(e, HeadersReceived)]) == 1000
    assert StreamReset(2001, 7) in _exchange(server, client)  # REFUSED_STREAM: safe for the client to retry


def test_informational_responses_are_not_forwarded() -> None:
    client, server = H2Endpoint(client_side=True), _h2lib(client_side=False)
    _to_lib(client, server)
    _from_lib(server, client)
    client.send_headers(1, REQUEST, end_stream=True)
    _to_lib(client, server)
    server.send_headers(1, [(b":status", b"100")])
    server.send_headers(1, [(b":status", b"204")], end_stream=True)
    assert [e for e in _from_lib(server, client) if not isinstance(e, WindowOpened)] == [
        HeadersReceived(1, [(b":status", b"204")], True)]


def test_a_frame_larger_than_allowed_fails_the_connection_with_goaway() -> None:
    client, server = _h2lib(client_side=True), H2Endpoint(client_side=False)
    _from_lib(client, server)
    _to_lib(server, client)
    events = server.receive(b"\x00\x50\x00\x00\x00\x00\x00\x00\x01" + b"x" * 100)  # 20 KiB DATA announced
    assert isinstance(events[-1], ConnectionFailed)
    terminated = [e for e in _to_lib(server, client) if isinstance(e, h2.events.ConnectionTerminated)]
    assert terminated and terminated[0].error_code == h2.errors.ErrorCodes.FRAME_SIZE_ERROR


def test_the_default_benchmark_has_http2_rows() -> None:
    paths = BenchSettings().path_list
    assert "direct" in paths and "kizuna" in paths
    assert paths.index("h2-direct") < paths.index("h2")  # the h2 row's baseline is measured first


# -- HPACK: ours against hpack's encoder and decoder ---------------------------------------------------------

def _varied(i: int) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"POST"), (b":path", b"/svc/%d" % (i % 7)), (b":authority", b"echo:50051"),
            (b"x-request-id", b"%032x" % (i * 7919)), (b"x-custom-%d" % (i % 5), b"v" * (i % 300)),
            (b"content-type", b"application/grpc"), (b"te", b"trailers")]


def test_our_decoder_reads_what_hpack_encodes_with_table_churn_and_huffman() -> None:
    encoder, ours = hpack.Encoder(), HeaderDecoder()
    for i in range(400):
        if i == 150:
            encoder.header_table_size = 256  # a size update inside the next block, entries evicted
        if i == 300:
            encoder.header_table_size = 4096
        headers = _varied(i)
        assert ours.decode(encoder.encode(headers, huffman=bool(i % 2))) == headers


def test_never_indexed_headers_stay_never_indexed_through_us() -> None:
    encoder, ours = hpack.Encoder(), HeaderDecoder()
    secret = hpack.NeverIndexedHeaderTuple(b"authorization", b"Bearer abc")
    decoded = ours.decode(encoder.encode([(b":status", b"200"), secret]))
    assert isinstance(decoded[1], hpack.NeverIndexedHeaderTuple)
    again = hpack.Decoder().decode(encode_headers(decoded), raw=True)
    assert again == [(b":status", b"200"), (b"authorization", b"Bearer abc")]
    assert isinstance(again[1], hpack.NeverIndexedHeaderTuple)


def test_hpack_decodes_what_we_encode() -> None:
    decoder = hpack.Decoder()
    decoder.max_header_list_size = 10**6
    for i in range(300):
        headers = [*_varied(i), (b"x-long", b"L" * (i * 100))]
        assert decoder.decode(encode_headers(headers, size_update=i % 50 == 0), raw=True) == headers


def test_malformed_header_blocks_are_refused() -> None:
    block = hpack.Encoder().encode([(b"x-name", b"value" * 10)], huffman=False)
    with pytest.raises(CompressionFailure):
        HeaderDecoder().decode(block[:-3])  # truncated string
    with pytest.raises(CompressionFailure):
        HeaderDecoder().decode(b"\xbf")  # index 63: past an empty dynamic table
    with pytest.raises(CompressionFailure):
        HeaderDecoder().decode(b"\x3f\xe1\x3f")  # a table size update above the 4096 we allow
    with pytest.raises(CompressionFailure):
        HeaderDecoder(max_list=100).decode(encode_headers([(b"x-big", b"b" * 200)]))


def test_a_broken_header_block_fails_the_connection() -> None:
    client, server = H2Endpoint(client_side=True), H2Endpoint(client_side=False)
    _exchange(client, server)
    events = server.receive(b"\x00\x00\x01\x01\x05\x00\x00\x00\x01\xbf")  # HEADERS: index 63, no table
    assert isinstance(events[-1], ConnectionFailed)


def test_an_endless_header_block_fails_the_connection_instead_of_growing() -> None:
    client, server = H2Endpoint(client_side=True), H2Endpoint(client_side=False)
    _exchange(client, server)
    wire = b"\x00\x00\x01\x01\x00\x00\x00\x00\x01\x82"  # HEADERS without END_HEADERS
    continuation = b"\x00\x40\x00\x09\x00\x00\x00\x00\x01" + b"\x00" * 16_384
    events = server.receive(wire + continuation * 5)
    assert isinstance(events[-1], ConnectionFailed)
