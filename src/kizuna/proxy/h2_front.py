"""HTTP/1.1 downstream, HTTP/2 upstream: a request whose destination port speaks HTTP/2 only (Istio port name or
``appProtocol`` ``http2`` / ``grpc`` / ``h2c``, an app that serves h2c alone) goes to it as an HTTP/2 stream.

The upstream side is the HTTP/2 path itself (an ``H2Call`` on the shared ``H2Pools``: retries, timeouts,
circuit breaking, outlier detection, hashing). ``H2Front`` is the ``Exchange`` the HTTP/1.1 connection
drives and, to its call, the client stream (``h2_call.CallOwner``): the request head becomes pseudo-headers
(Host → ``:authority``, ``te: trailers`` for gRPC), and what the call sends back is written as an HTTP/1.1
response (connection-specific headers dropped, chunked when no length is known, trailers dropped).
Flow control: the call credits request bytes as they go upstream, and the client is paused past a window
of uncredited bytes; response DATA is taken only while the client's socket is not full.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import TYPE_CHECKING, Final

from kizuna.protocols.http1 import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    BODY_UNTIL_CLOSE,
    LAST_CHUNK,
    NO_BODY_STATUSES,
    RequestHead,
    encode_chunk,
    encode_response_head,
)
from kizuna.protocols.http2 import CANCEL, Headers
from kizuna.proxy.exchange import HTTP, PAUSE_UPSTREAM_FULL, Downstream, Exchange
from kizuna.proxy.h2_call import H2Call
from kizuna.proxy.h2_policy import CONNECTION_SPECIFIC
from kizuna.proxy.h2_routing import Routed, header
from kizuna.proxy.stats import Stats

if TYPE_CHECKING:
    from kizuna.proxy.h2 import H2Pools

WINDOW: Final = 64 * 1024
"""Request bytes read from the client and not yet sent upstream before the client is paused."""
STREAM_ID: Final = 1
"""The call's stream id towards this front (one request, one stream)."""


def stream_headers(head: RequestHead, target: bytes, scheme: bytes = b"http") -> Headers:
    """An HTTP/1.1 request head as HTTP/2 request headers."""
    out: Headers = [(b":method", head.method), (b":scheme", scheme), (b":authority", head.host),
                    (b":path", target)]
    grpc = False
    for name, value in head.headers:
        lower = name.lower()
        if lower in CONNECTION_SPECIFIC:
            continue
        if lower == b"content-type" and value.startswith(b"application/grpc"):
            grpc = True
        out.append((lower, value))
    if head.content_length is not None:
        out.append((b"content-length", b"%d" % head.content_length))
    if grpc:
        out.append((b"te", b"trailers"))  # gRPC servers insist on it
    return out


class H2Front(Exchange):
    """One HTTP/1.1 request proxied as an HTTP/2 stream (see the module docstring)."""

    __slots__ = ("call", "pools", "unacked", "framing_out", "head_sent", "ended", "aborted", "response_done",
                 "request_over")

    def __init__(self, down: Downstream, head: RequestHead, routed: Routed, target: bytes, stats: Stats,
                 loop: asyncio.AbstractEventLoop, pools: H2Pools) -> None:
        super().__init__(down, head, routed.dest, target, head.host, stats, loop, HTTP)
        self.pools = pools
        self.unacked = 0
        self.framing_out = BODY_NONE
        self.head_sent = False
        self.response_done = False
        self.aborted = False
        self.request_over = not head.has_body
        self.call = H2Call(self, STREAM_ID, stream_headers(head, target), self.request_over)
        # Started on the next loop turn: a call may answer at once (circuit breaker overflow), and the
        # HTTP/1.1 connection must hold this exchange before its end is reported (and its telemetry may
        # have added headers: the caller's x-kizuna-peer, trace context).
        loop.call_soon(self._begin, routed)

    def _begin(self, routed: Routed) -> None:
        if self.done:
            return
        self.call.headers = [*stream_headers(self.head, self.target), *self.extra]
        self.call.start(routed)

    # -- what the HTTP/1.1 connection drives (Exchange) -----------------------------------------------

    def request_body(self, data: bytes) -> None:
        if self.done or not data:
            return
        self.unacked += len(data)
        self.body_size += len(data)
        self.call.request_data(data, len(data), False)
        if self.unacked > WINDOW:
            self.down.pause_reading(PAUSE_UPSTREAM_FULL)

    def request_end(self) -> None:
        self.request_done = True
        if not self.request_over:
            self.request_over = True
            if not self.done:
                self.call.request_data(b"", 0, True)

    def abort(self) -> None:
        if not self.done:
            self.call.downstream_gone()  # counts DC

    def downstream_write_paused(self, paused: bool) -> None:
        if not paused:
            self.call.flush_down()

    # -- the call's client stream (h2_call.CallOwner, StreamSink) ----------------------------------------

    @property
    def h2(self) -> H2Front:
        return self

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.down.transport

    def flush(self) -> None:
        """Nothing queued: every write below goes straight to the client."""

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> None:
        if self.head_sent:  # trailers: no HTTP/1.1 form here, the response just ends
            self._end_body()
            return
        self.head_sent = True
        status = int(header(headers, b":status") or b"502")
        self.status = status
        length_raw = header(headers, b"content-length")
        length = int(length_raw) if length_raw is not None and length_raw.isdigit() else None
        kept = tuple((n, v) for n, v in headers
                     if n[:1] != b":" and n not in CONNECTION_SPECIFIC and n != b"content-length")
        if status in NO_BODY_STATUSES or self.head.method == b"HEAD":
            self.framing_out = BODY_NONE
            announce = BODY_LENGTH if length is not None and status != 204 else BODY_NONE
        elif end_stream:
            self.framing_out = announce = BODY_LENGTH
            length = 0
        elif length is not None:
            self.framing_out = announce = BODY_LENGTH
        elif self.head.version == b"1.1":
            self.framing_out = announce = BODY_CHUNKED
        else:  # an HTTP/1.0 client knows no chunks: the body ends with the connection
            self.framing_out = announce = BODY_UNTIL_CLOSE
            self.keep_alive = False
        try:
            reason = HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b"Unknown"
        self.keep_alive = self.keep_alive and self.request_over
        if self.head.version == b"1.1":
            connection = None if self.keep_alive else b"close"
        else:
            connection = b"keep-alive" if self.keep_alive else b"close"
        self.down.transport.write(encode_response_head(status, reason, kept, announce, length, connection))
        self.started = True
        if end_stream:
            self._end_body()

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> int:
        if self.down.write_paused and self.call.started:
            return 0  # the client's socket is full: the call keeps the rest and credits the upstream later
        if data and self.framing_out != BODY_NONE:
            chunk = bytes(data)
            self.sent += len(chunk)
            self.down.transport.write(encode_chunk(chunk) if self.framing_out == BODY_CHUNKED else chunk)
        if end_stream:
            self._end_body()
        return len(data)

    def end_stream(self, stream_id: int) -> None:
        self._end_body()

    def acknowledge(self, stream_id: int, length: int) -> None:
        """The call sent ``length`` request bytes upstream: read more from the client."""
        self.unacked = max(0, self.unacked - length)
        if self.unacked <= WINDOW:
            self.down.resume_reading(PAUSE_UPSTREAM_FULL)

    def reset(self, stream_id: int, code: int = CANCEL) -> None:
        """The response cannot be completed: the client connection is dropped."""
        if not self.aborted:
            self.aborted = True
            self.done = True
            self.down.abort()

    def finished(self, stream_id: int) -> None:
        call = self.call
        self.last = call.tried[-1] if call.tried else None
        self.flags = call.flags
        if self.aborted:
            return
        self.done = True
        self.down.resume_reading(PAUSE_UPSTREAM_FULL)
        if self.response_done:
            self.down.exchange_done(self.keep_alive and self.request_done)

    def _end_body(self) -> None:
        if self.response_done:
            return
        self.response_done = True
        if self.framing_out == BODY_CHUNKED:
            self.down.transport.write(LAST_CHUNK)
