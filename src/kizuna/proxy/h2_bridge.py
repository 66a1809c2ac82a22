"""HTTP/2 downstream, HTTP/1.1 upstream: a stream whose destination port speaks HTTP/1.1 only (Istio port name
or ``appProtocol`` ``http``) goes to it as an HTTP/1.1 request, and the answer comes back as HTTP/2.

The upstream side is the HTTP/1.1 path itself (``BridgeExchange`` is a ``PolicyExchange``): pooled keep-alive
connections, retries, timeouts, circuit breaking, outlier detection, consistent hashing, fault delay and
mirrors all behave as for an HTTP/1.1 client. ``H1Call`` is what that exchange sees as its client: it turns
the stream's pseudo-headers into a request line and Host, drops connection-specific headers both ways, and
relays the response body as DATA within the client's window (the upstream is paused while the client lags).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Final

from kizuna.protocols.http1 import RequestHead, ResponseHead
from kizuna.protocols.http2 import Headers
from kizuna.proxy.errors import SyntheticResponse
from kizuna.proxy.exchange import HTTP
from kizuna.proxy.h2_policy import CONNECTION_SPECIFIC
from kizuna.proxy.h2_routing import Routed, header, send_synthetic, synthetic_headers
from kizuna.proxy.route_actions import PolicyExchange
from kizuna.proxy.tcp import Relay

if TYPE_CHECKING:
    from kizuna.proxy.h2 import H2ServerConnection
    from kizuna.proxy.telemetry_stream import StreamRecord

HIGH_WATER: Final = 256 * 1024
"""Response bytes held for a slow HTTP/2 client before the HTTP/1.1 upstream is paused."""
LOW_WATER: Final = 64 * 1024


def request_head(headers: Headers, routed: Routed, end_stream: bool) -> tuple[RequestHead, bytes, bytes]:
    """An HTTP/2 request head as HTTP/1.1: the head, the target and the Host to send."""
    plan = routed.plan
    method = header(headers, b":method") or b"GET"
    target = plan.target if plan is not None else header(headers, b":path") or b"/"
    host = plan.authority if plan is not None else header(headers, b":authority") or header(headers, b"host") or b""
    source = plan.headers if plan is not None else headers
    kept = tuple((n, v) for n, v in source
                 if n[:1] != b":" and n not in CONNECTION_SPECIFIC and n != b"content-length")
    raw = header(headers, b"content-length")
    length = int(raw) if raw is not None and raw.isdigit() else None
    chunked = length is None and not end_stream  # a body of unknown length: streamed chunked if it grows
    has_id = any(n == b"x-request-id" for n, _ in kept)
    head = RequestHead(method, target, b"1.1", kept, host, length, chunked, True, False, None, has_id)
    return head, target, host


def response_headers(head: ResponseHead) -> Headers:
    """An HTTP/1.1 response head as HTTP/2 headers (names lower-case, connection-specific ones dropped)."""
    out: Headers = [(b":status", b"%d" % head.status)]
    for name, value in head.headers:
        lower = name.lower()
        if lower not in CONNECTION_SPECIFIC and lower != b"content-length":
            out.append((lower, value))
    if head.content_length is not None:
        out.append((b"content-length", b"%d" % head.content_length))
    return out


class BridgeExchange(PolicyExchange):
    """An HTTP/1.1 exchange whose response goes to an HTTP/2 stream (``H1Call``) instead of a socket."""

    __slots__ = ("call",)

    def __init__(self, call: H1Call, head: RequestHead, routed: Routed, target: bytes, host: bytes) -> None:
        plan = routed.plan
        super().__init__(call, head, routed.dest, target, host, call.down.stats, call.loop, HTTP,
                         plan.delay if plan is not None else None,
                         plan.delayed_abort if plan is not None else None,
                         plan.response_ops if plan is not None else (),
                         plan.mirror_to if plan is not None else ())
        self.call = call

    def _write_head(self, head: ResponseHead) -> None:
        self.call.response_head(head)

    def response_body(self, data: bytes) -> None:
        self.call.response_body(data)

    def flush(self) -> None:
        self.call.flush_down()

    def response_end(self) -> None:
        conn = self.conn
        self.conn = None
        self._finish()
        if conn is not None:
            conn.finish(self.request_sent, self.loop.time())
        self.call.response_complete()


class H1Call:
    """One HTTP/2 stream proxied to an HTTP/1.1 upstream; to its ``BridgeExchange`` it is the client
    (``exchange.Downstream``)."""

    def __init__(self, down: H2ServerConnection, stream_id: int, headers: Headers, end_stream: bool) -> None:
        assert down.transport is not None
        self.down = down
        self.stream_id = stream_id
        self.headers = headers
        self.grpc = (header(headers, b"content-type") or b"").startswith(b"application/grpc")
        self.end_stream = end_stream
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = down.transport
        self.registry = down.registry
        self.write_paused = False
        self.paused = 0
        self.held = 0  # request flow credit withheld while the upstream cannot take more
        self.exchange: BridgeExchange | None = None
        self.pending_down: deque[bytes] = deque()
        self.pending_size = 0
        self.response_done = False
        self.done = False
        self.record: StreamRecord | None = None
        """The stream's telemetry (``telemetry_stream``), when its connection records."""

    # -- the stream, from the HTTP/2 connection ---------------------------------------------------------

    def start(self, routed: Routed | SyntheticResponse) -> None:
        if isinstance(routed, SyntheticResponse):
            self.down.stats.flag(routed.flag)
            self.respond(routed, False)
            return
        head, target, host = request_head(self.headers, routed, self.end_stream)
        record = self.record
        if record is not None:
            head = head._replace(headers=tuple(record.upstream(list(head.headers), routed)))
        self.exchange = BridgeExchange(self, head, routed, target, host)
        if record is not None and record.request_id is None and self.exchange.extra:
            record.request_id = self.exchange.extra[0][1].decode("latin-1")  # the x-request-id it made
        if self.end_stream:
            self.exchange.request_end()

    def request_data(self, data: bytes, flow: int, end: bool) -> None:
        exchange = self.exchange
        if self.done or exchange is None:
            self.down.h2.acknowledge(self.stream_id, flow)
            return
        if data:
            if self.record is not None:
                self.record.received += len(data)
            exchange.request_body(data)
        if self.paused:
            self.held += flow
        else:
            self.down.h2.acknowledge(self.stream_id, flow)
        if end:
            exchange.request_end()
        self.down.flush()

    def request_end(self, trailers: Headers) -> None:
        """Request trailers have no HTTP/1.1 form here: the request just ends."""
        if self.exchange is not None and not self.done:
            self.exchange.request_end()

    def downstream_gone(self) -> None:
        if self.exchange is not None:
            self.exchange.abort()  # counts DC
        if self.record is not None:
            self.record.flag("DC")
        self.finish()

    # -- the response, from the exchange -----------------------------------------------------------------

    def response_head(self, head: ResponseHead) -> None:
        if self.done:
            return
        if self.record is not None:
            self.record.status = head.status
        self.down.h2.send_headers(self.stream_id, response_headers(head))

    def response_body(self, data: bytes) -> None:
        if self.done or not data:
            return
        self.pending_down.append(data)
        self.pending_size += len(data)
        if self.pending_size > HIGH_WATER and not self.write_paused and self.exchange is not None:
            self.write_paused = True
            self.exchange.downstream_write_paused(True)

    def response_complete(self) -> None:
        self.response_done = True
        self.flush_down()

    def flush_down(self) -> None:
        """Send held response body as far as the client's window allows; resume a paused upstream."""
        if self.done:
            return
        h2 = self.down.h2
        pending = self.pending_down
        while pending:
            data = pending[0]
            sent = h2.send_data(self.stream_id, data)
            self.pending_size -= sent
            if self.record is not None:
                self.record.sent += sent
            if sent < len(data):
                pending[0] = data[sent:]
                break
            pending.popleft()
        if self.write_paused and self.pending_size < LOW_WATER and self.exchange is not None:
            self.write_paused = False
            self.exchange.downstream_write_paused(False)
        if not pending and self.response_done:
            h2.end_stream(self.stream_id)
            self.down.flush()
            self.finish()
            return
        self.down.flush()

    # -- exchange.Downstream ------------------------------------------------------------------------------

    def respond(self, response: SyntheticResponse, keep_alive: bool) -> None:
        """A proxy-made answer (a gRPC error for a gRPC request); the stream is over."""
        if self.done:
            return
        self.down.stats.error(response.reason)
        if self.record is not None:
            self.record.synthetic(response, synthetic_headers(response, self.grpc)[0])
        send_synthetic(self.down.h2, self.stream_id, response, self.grpc)
        self.down.flush()
        self.finish()

    def exchange_done(self, keep_alive: bool) -> None:
        """Not called: ``BridgeExchange.response_end`` reports to ``response_complete``."""

    def abort(self) -> None:
        """The response was cut short: reset the stream."""
        if not self.done:
            self.down.h2.reset(self.stream_id)
            self.down.flush()
            self.finish()

    def pause_reading(self, reason: int) -> None:
        self.paused |= reason

    def resume_reading(self, reason: int) -> None:
        self.paused &= ~reason
        if not self.paused and self.held:
            held, self.held = self.held, 0
            self.down.h2.acknowledge(self.stream_id, held)
            self.down.flush()

    def start_tunnel(self, upstream: Relay) -> None:
        """HTTP/2 streams carry no CONNECT or upgrade here: unreachable, the relay is closed."""
        if upstream.transport is not None:
            upstream.transport.close()
        self.abort()

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        if self.held:
            self.down.h2.acknowledge(self.stream_id, self.held)
            self.held = 0
        self.pending_down.clear()
        record = self.record
        if record is not None:
            if self.exchange is not None:
                record.pool = self.exchange.last
            record.close()
        self.down.finished(self.stream_id)
