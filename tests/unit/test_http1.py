"""The sans-I/O HTTP/1.1 adapter: bytes in, events out, and heads serialized back."""

from __future__ import annotations

import pytest

from kizuna.protocols.http1 import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    MAX_HEAD_BYTES,
    BodyReceived,
    Event,
    MessageEnded,
    ParseFailed,
    RequestHead,
    RequestParser,
    RequestReceived,
    ResponseParser,
    ResponseReceived,
    Upgraded,
    encode_chunk,
    encode_request_head,
    encode_response_head,
    response_has_body,
    split_absolute_target,
    split_authority,
)


def feed_all(parser: RequestParser | ResponseParser, data: bytes, step: int | None = None) -> list[Event]:
    if step is None:
        return parser.feed(data)
    events: list[Event] = []
    for i in range(0, len(data), step):
        events += parser.feed(data[i:i + step])
    return events


def body_of(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, BodyReceived))


def heads(events: list[Event]) -> list[RequestHead]:
    return [e.head for e in events if isinstance(e, RequestReceived)]


GET = (b"GET /headers?x=1 HTTP/1.1\r\nHost: httpbin:8000\r\nUser-Agent: t\r\nAccept: */*\r\n"
       b"X-Request-Id: abc\r\n\r\n")


@pytest.mark.parametrize("step", [None, 1, 7])
def test_simple_get_gives_head_then_end_whatever_the_split(step: int | None) -> None:
    events = feed_all(RequestParser(), GET, step)
    assert [type(e) for e in events] == [RequestReceived, MessageEnded]
    head = heads(events)[0]
    assert (head.method, head.target, head.version, head.host) == (b"GET", b"/headers?x=1", b"1.1",
                                                                    b"httpbin:8000")
    assert head.headers == ((b"User-Agent", b"t"), (b"Accept", b"*/*"), (b"X-Request-Id", b"abc"))
    assert head.keep_alive and head.has_request_id and not head.has_body and head.upgrade is None


def test_hop_by_hop_and_connection_named_headers_are_not_forwarded() -> None:
    data = (b"GET http://a/ HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: 5\r\n"
            b"Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic x\r\nTE: trailers\r\nX-Secret: s\r\n"
            b"Upgrade: h2c\r\nX-Kept: 1\r\n\r\n")
    head = heads(RequestParser().feed(data))[0]
    assert head.headers == ((b"X-Kept", b"1"),)
    assert head.upgrade is None  # Upgrade without "Connection: upgrade" is not a protocol switch
    assert not head.has_request_id


@pytest.mark.parametrize("extra", [b"", b"Content-Length: 2\r\n"])
def test_the_mesh_peer_header_is_lifted_out_of_the_headers(extra: bytes) -> None:
    data = (b"POST / HTTP/1.1\r\nHost: a\r\nX-Kizuna-Peer: sleep;default;sleep;v1;a.default.svc\r\n"
            b"X-Kept: 1\r\n" + extra + b"\r\n" + (b"ok" if extra else b""))
    head = heads(RequestParser().feed(data))[0]
    assert head.peer == b"sleep;default;sleep;v1;a.default.svc"
    assert head.headers == ((b"X-Kept", b"1"),)  # the app never sees it
    assert heads(RequestParser().feed(GET))[0].peer is None


def test_a_clients_own_client_cert_header_is_never_passed_on() -> None:
    data = b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-Client-Cert: URI=spiffe://forged\r\nX-Kept: 1\r\n\r\n"
    assert heads(RequestParser().feed(data))[0].headers == ((b"X-Kept", b"1"),)  # Envoy's SANITIZE


def test_content_length_body() -> None:
    events = RequestParser().feed(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    head = heads(events)[0]
    assert head.content_length == 5 and not head.chunked and head.has_body
    assert body_of(events) == b"hello"
    assert isinstance(events[-1], MessageEnded)


@pytest.mark.parametrize("step", [None, 1, 5])
def test_chunked_body_is_dechunked_and_trailers_dropped(step: int | None) -> None:
    data = (b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: t\r\n\r\n")
    events = feed_all(RequestParser(), data, step)
    head = heads(events)[0]
    assert head.chunked and head.content_length is None and head.has_body
    assert body_of(events) == b"abc0123456789abcdef"
    assert isinstance(events[-1], MessageEnded)
    assert all(b"X-Trailer" not in name for name, _ in head.headers)


def test_pipelined_requests_come_out_in_order() -> None:
    data = (b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok"
            b"GET /3 HTTP/1.1\r\nHost: a\r\n\r\n")
    events = RequestParser().feed(data)
    assert [type(e) for e in events] == [RequestReceived, MessageEnded, RequestReceived, BodyReceived,
                                         MessageEnded, RequestReceived, MessageEnded]
    assert [h.target for h in heads(events)] == [b"/1", b"/2", b"/3"]


@pytest.mark.parametrize("data", [
    b"GARBAGE\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
    b"3\r\nabc\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
])
def test_malformed_input_fails_and_parsing_stops(data: bytes) -> None:
    parser = RequestParser()
    events = parser.feed(data)
    assert isinstance(events[-1], ParseFailed)
    assert parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") == []


def test_malformed_request_after_a_good_one_keeps_the_good_one_first() -> None:
    events = RequestParser().feed(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nBAD\x00 / HTTP/1.1\r\n\r\n")
    assert [type(e) for e in events] == [RequestReceived, MessageEnded, ParseFailed]


def test_oversized_head_is_refused() -> None:
    data = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * (MAX_HEAD_BYTES + 1) + b"\r\n\r\n"
    events = RequestParser().feed(data)
    assert isinstance(events[-1], ParseFailed) and "too large" in events[-1].reason


def test_connect_ends_http_and_hands_over_the_tail() -> None:
    parser = RequestParser()
    events = parser.feed(b"CONNECT httpbin:443 HTTP/1.1\r\nHost: httpbin:443\r\n\r\n\x16\x03\x01tls")
    assert [type(e) for e in events] == [RequestReceived, MessageEnded, Upgraded]
    assert heads(events)[0].target == b"httpbin:443"
    assert heads(events)[0].upgrade is None
    assert events[-1] == Upgraded(b"\x16\x03\x01tls")
    assert parser.upgraded


def test_websocket_upgrade_request() -> None:
    data = (b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: k\r\n\r\nframe")
    events = RequestParser().feed(data)
    head = heads(events)[0]
    assert head.upgrade == b"websocket"
    assert head.headers == ((b"Sec-WebSocket-Key", b"k"),)
    assert events[-1] == Upgraded(b"frame")


@pytest.mark.parametrize(("request_line", "extra", "keep_alive"), [
    (b"GET / HTTP/1.0", b"", False),
    (b"GET / HTTP/1.0", b"Connection: keep-alive\r\n", True),
    (b"GET / HTTP/1.1", b"Connection: close\r\n", False),
    (b"GET / HTTP/1.1", b"", True),
])
def test_keep_alive_follows_version_and_connection(request_line: bytes, extra: bytes,
                                                   keep_alive: bool) -> None:
    head = heads(RequestParser().feed(request_line + b"\r\nHost: a\r\n" + extra + b"\r\n"))[0]
    assert head.keep_alive is keep_alive


def test_expect_continue_is_noted_and_removed() -> None:
    head = heads(RequestParser().feed(
        b"PUT /p HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"))[0]
    assert head.expect_continue
    assert head.headers == ()


# -- responses ----------------------------------------------------------------------------------------------

def response_events(data: bytes, method: bytes = b"GET", step: int | None = None,
                    eof: bool = False) -> list[Event]:
    parser = ResponseParser()
    parser.expect(method)
    events = feed_all(parser, data, step)
    if eof:
        events += parser.feed_eof()
    return events


def test_response_with_length() -> None:
    events = response_events(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nX-A: b\r\n\r\nok")
    head = events[0].head  # type: ignore[union-attr]
    assert (head.status, head.reason, head.content_length, head.keep_alive) == (201, b"Created", 2, True)
    assert head.headers == ((b"X-A", b"b"),)
    assert body_of(events) == b"ok" and isinstance(events[-1], MessageEnded)


@pytest.mark.parametrize("step", [None, 1, 4])
def test_chunked_response(step: int | None) -> None:
    events = response_events(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", step=step)
    assert events[0].head.chunked  # type: ignore[union-attr]
    assert body_of(events) == b"hello world" and isinstance(events[-1], MessageEnded)


def test_body_until_close_ends_at_eof() -> None:
    parser = ResponseParser()
    parser.expect(b"GET")
    events = parser.feed(b"HTTP/1.0 200 OK\r\n\r\nsome ")
    events += parser.feed(b"bytes")
    assert not any(isinstance(e, MessageEnded) for e in events)
    events += parser.feed_eof()
    assert body_of(events) == b"some bytes" and isinstance(events[-1], MessageEnded)
    assert not events[0].head.keep_alive  # type: ignore[union-attr]


def test_truncated_response_fails_at_eof() -> None:
    events = response_events(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", eof=True)
    assert isinstance(events[-1], ParseFailed)


def test_head_response_has_no_body_and_the_next_response_parses() -> None:
    parser = ResponseParser()
    parser.expect(b"HEAD")
    events = parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    assert [type(e) for e in events] == [ResponseReceived, MessageEnded]
    assert events[0].head.content_length == 1000  # type: ignore[union-attr]
    parser.expect(b"GET")
    events = parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert body_of(events) == b"ok" and isinstance(events[-1], MessageEnded)


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(status: int) -> None:
    events = response_events(b"HTTP/1.1 %d X\r\n\r\n" % status)
    assert [type(e) for e in events] == [ResponseReceived, MessageEnded]


def test_informational_response_then_final() -> None:
    events = response_events(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
    statuses = [e.head.status for e in events if isinstance(e, ResponseReceived)]
    assert statuses == [100, 200] and body_of(events) == b"x"


def test_switching_protocols_hands_over_the_tail() -> None:
    events = response_events(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\n\r\nraw")
    assert events[0].head.upgrade == b"websocket"  # type: ignore[union-attr]
    assert events[-1] == Upgraded(b"raw")


def test_garbage_response_fails() -> None:
    assert isinstance(response_events(b"SSH-2.0-OpenSSH\r\n")[-1], ParseFailed)


# -- serialization ------------------------------------------------------------------------------------------

def test_request_head_round_trips_through_the_parser() -> None:
    headers = ((b"X-A", b"1"), (b"x-b", b"2"))
    data = encode_request_head(b"POST", b"/p?q=1", b"svc:80", headers, BODY_LENGTH, 3,
                               extra=((b"x-request-id", b"id"),)) + b"abc"
    assert data.startswith(b"POST /p?q=1 HTTP/1.1\r\nHost: svc:80\r\n")
    events = RequestParser().feed(data)
    head = heads(events)[0]
    assert head.headers == ((b"X-A", b"1"), (b"x-b", b"2"), (b"x-request-id", b"id"))
    assert head.content_length == 3 and body_of(events) == b"abc"


def test_upgrade_request_head() -> None:
    data = encode_request_head(b"GET", b"/ws", b"a", (), BODY_NONE, upgrade=b"websocket")
    events = RequestParser().feed(data)
    assert heads(events)[0].upgrade == b"websocket" and isinstance(events[-1], Upgraded)


def test_chunked_response_head_and_chunks_parse_back() -> None:
    data = (encode_response_head(200, b"OK", ((b"X-A", b"1"),), BODY_CHUNKED, connection=b"close")
            + encode_chunk(b"hello") + encode_chunk(b"!" * 300) + b"0\r\n\r\n")
    events = response_events(data)
    head = events[0].head  # type: ignore[union-attr]
    assert head.chunked and not head.keep_alive
    assert body_of(events) == b"hello" + b"!" * 300


@pytest.mark.parametrize(("method", "status", "has_body"), [
    (b"GET", 200, True), (b"HEAD", 200, False), (b"GET", 204, False), (b"GET", 304, False),
    (b"GET", 100, False), (b"CONNECT", 200, False), (b"CONNECT", 403, True), (b"POST", 500, True),
])
def test_response_has_body(method: bytes, status: int, has_body: bool) -> None:
    assert response_has_body(method, status) is has_body


@pytest.mark.parametrize(("authority", "expected"), [
    (b"httpbin:8000", ("httpbin", 8000)),
    (b"HTTPBIN", ("httpbin", 80)),
    (b"httpbin.default.svc.cluster.local.:9080", ("httpbin.default.svc.cluster.local", 9080)),
    (b"[::1]:8080", ("::1", 8080)),
    (b"[::1]", ("::1", 80)),
])
def test_split_authority(authority: bytes, expected: tuple[str, int]) -> None:
    assert split_authority(authority) == expected


def test_split_authority_rejects_a_bad_port() -> None:
    with pytest.raises(ValueError):
        split_authority(b"httpbin:http")


@pytest.mark.parametrize(("target", "expected"), [
    (b"http://httpbin:8000/headers?x=1", (b"http", b"httpbin:8000", b"/headers?x=1")),
    (b"http://httpbin", (b"http", b"httpbin", b"/")),
    (b"HTTP://user:pw@httpbin:80?q", (b"http", b"httpbin:80", b"/?q")),
    (b"http://h/p#frag", (b"http", b"h", b"/p")),
])
def test_split_absolute_target(target: bytes, expected: tuple[bytes, bytes, bytes]) -> None:
    assert split_absolute_target(target) == expected


def test_split_absolute_target_rejects_origin_form() -> None:
    with pytest.raises(ValueError):
        split_absolute_target(b"/just/a/path")


def test_split_absolute_target_answers_the_same_when_asked_again() -> None:
    # The second call is served from the cache of recent targets; a long one is never cached.
    long_target = b"http://h:81/" + b"p" * 400 + b"?q=1"
    for _ in range(2):
        assert split_absolute_target(b"http://h:81/a?b") == (b"http", b"h:81", b"/a?b")
        assert split_absolute_target(long_target) == (b"http", b"h:81", b"/" + b"p" * 400 + b"?q=1")
        with pytest.raises(ValueError):
            split_absolute_target(b"h:81/a")


def test_back_to_back_responses_in_one_feed_each_get_their_own_head() -> None:
    parser = ResponseParser()
    parser.expect(b"GET")
    events = parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\n\r\nok"
                         b"HTTP/1.0 404 Nope\r\ncontent-length: 3\r\nConnection: close\r\n\r\nbad")
    first, second = (e.head for e in events if isinstance(e, ResponseReceived))
    assert (first.status, first.version, first.content_length, first.keep_alive, first.headers) == (
        200, b"1.1", 2, True, ((b"X-A", b"1"),))
    assert (second.status, second.reason, second.version, second.content_length, second.keep_alive) == (
        404, b"Nope", b"1.0", 3, False)
    assert second.headers == ()
    assert body_of(events) == b"okbad"
    assert sum(isinstance(e, MessageEnded) for e in events) == 2


def test_a_repeated_content_length_is_refused() -> None:
    # llhttp refuses it (a request-smuggling vector); the parser must not pick one of the two.
    events = response_events(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok")
    assert [type(e) for e in events] == [ParseFailed]


def test_oversized_response_head_is_refused() -> None:
    parser = ResponseParser()
    parser.expect(b"GET")
    events = parser.feed(b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"v" * MAX_HEAD_BYTES + b"\r\n\r\n")
    assert isinstance(events[-1], ParseFailed)
