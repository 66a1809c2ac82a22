"""The client side of the sidecar: one HTTP/1.1 server connection, inbound or outbound alike.

Bytes go through the sans-I/O ``RequestParser``; each request head is handed to a ``Dispatcher`` (outbound
routes it, inbound sends it to the local app), which answers with an ``Exchange`` or a synthetic error.
Requests on one connection are answered in order: while an exchange waits for its response, pipelined events
are queued and reading pauses. Flow control: when the client's write buffer is full, the upstream connection
stops reading; reading from the client pauses for queued requests or a full upstream buffer.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Final, Protocol, cast

from kizuna.protocols.http1 import (
    CONTINUE_RESPONSE,
    BodyReceived,
    Event,
    MessageEnded,
    RequestHead,
    RequestParser,
    RequestReceived,
    Upgraded,
)
from kizuna.proxy.errors import MALFORMED_REQUEST, SyntheticResponse
from kizuna.proxy.exchange import CONNECT_ESTABLISHED, Exchange
from kizuna.proxy.stats import Stats
from kizuna.proxy.tcp import WRITE_HIGH_WATER, Relay, adopt, link
from kizuna.proxy.telemetry_tap import HttpTap
from kizuna.proxy.tunnel_http import OpenedTunnel

# Reasons to stop reading from the client (bits; reading resumes when none is left). The exchange's own
# reason, a full upstream buffer, is exchange.PAUSE_UPSTREAM_FULL (2).
PAUSE_PIPELINE: Final = 1
PAUSE_TUNNEL: Final = 4


class Dispatcher(Protocol):
    """Decides what to do with a request: an exchange to run, or a response to give right away."""

    def dispatch(self, down: HttpServerConnection,
                 head: RequestHead) -> Exchange | SyntheticResponse | OpenedTunnel: ...


class HttpServerConnection(asyncio.Protocol):
    """One client connection speaking HTTP/1.1 (or 1.0) to the sidecar."""

    __slots__ = ("dispatcher", "stats", "registry", "transport", "parser", "exchange", "in_request",
                 "queue", "paused", "write_paused", "closing", "peer_eof", "raw", "tap")

    def __init__(self, dispatcher: Dispatcher, stats: Stats, registry: set[asyncio.BaseProtocol]) -> None:
        self.dispatcher = dispatcher
        self.stats = stats
        self.registry = registry
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set in connection_made
        self.parser = RequestParser()
        self.exchange: Exchange | OpenedTunnel | None = None
        self.in_request = False
        """The current request's head arrived and its end has not."""
        self.queue: deque[Event] = deque()
        self.paused = 0
        self.write_paused = False
        self.closing = False
        self.peer_eof = False
        self.raw: list[bytes] | None = None
        """After a CONNECT or Upgrade head: client bytes held for the tunnel."""
        self.tap: HttpTap | None = None
        """Istio metrics and access log of this connection's requests (None: telemetry is off)."""

    # -- asyncio.Protocol ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER)
        self.registry.add(self)
        self.stats.downstream_cx_total += 1
        self.stats.downstream_cx_active += 1
        telemetry = getattr(self.stats, "telemetry", None)
        if telemetry is not None:
            self.tap = HttpTap(telemetry, transport)

    def data_received(self, data: bytes) -> None:
        if self.raw is not None:
            self.raw.append(data)
            return
        events = self.parser.feed(data)
        if self.parser.upgraded:
            self.raw = []  # the parser is done; later bytes belong to the tunnel
        if self.queue:
            self.queue.extend(events)
        else:
            self._handle(events)

    def eof_received(self) -> bool:
        # A client that half-closes after its requests still gets the answers; close once they are sent.
        if self.exchange is None and not self.queue:
            return False
        self.peer_eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.stats.downstream_cx_active -= 1
        self.registry.discard(self)
        self.queue.clear()
        if self.exchange is not None:
            if self.tap is not None and isinstance(self.exchange, Exchange):
                # An exchange already done cut the response short itself (UC, UT): not the client's doing.
                self.tap.done(self.exchange, 0, self.exchange.flags if self.exchange.done else "DC")
            self.exchange.abort()
            self.exchange = None

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.exchange is not None:
            self.exchange.downstream_write_paused(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.exchange is not None:
            self.exchange.downstream_write_paused(False)

    # -- requests -----------------------------------------------------------------------------------------

    def _handle(self, events: list[Event]) -> None:
        """Act on parsed events in order, queueing those of a request that must wait for the one before."""
        # Event classes are final: ``type(e) is C`` is a pointer compare where isinstance is a call.
        for i, event in enumerate(events):
            exchange = self.exchange
            if exchange is None and self.closing:
                return
            kind = type(event)
            if kind is MessageEnded:
                self.in_request = False
                if exchange is not None:
                    exchange.request_end()
            elif kind is BodyReceived:
                if exchange is not None:
                    exchange.request_body(event.data)  # type: ignore[union-attr]
            elif kind is Upgraded:
                # Always follows the CONNECT/Upgrade request just handled, so never waits in the queue.
                self._on_upgraded(event.tail)  # type: ignore[union-attr]
            elif exchange is not None and not self.in_request:
                # The next request (or garbage) waits for the current response.
                self.queue.extend(events[i:])
                self.pause_reading(PAUSE_PIPELINE)
                return
            elif kind is RequestReceived:
                self._on_request(event.head)  # type: ignore[union-attr,arg-type]
            else:
                self._on_malformed()

    def _on_request(self, head: RequestHead) -> None:
        self.in_request = True
        self.stats.downstream_rq_total += 1
        tap = self.tap
        if tap is not None and tap.reporter:  # destination side: who calls, from the client sidecar's header
            head = tap.inbound(head)
        result = self.dispatcher.dispatch(self, head)
        if tap is not None:
            if isinstance(result, Exchange):
                tap.routed(result)
            elif isinstance(result, SyntheticResponse):
                tap.refused(head, result)
        if isinstance(result, SyntheticResponse):
            # A body we will not read, or a protocol switch we refuse, leaves the connection unusable.
            keep_alive = (head.keep_alive and not head.has_body and head.upgrade is None
                          and head.method != b"CONNECT")
            self.respond(result, keep_alive)
            return
        self.exchange = result
        if head.expect_continue:
            # Envoy's behaviour: answer 100 ourselves, and the upstream never sees the Expect header.
            self.transport.write(CONTINUE_RESPONSE)

    def _on_upgraded(self, tail: bytes) -> None:
        """The parser stopped after a CONNECT/Upgrade head; what follows is for the tunnel."""
        if self.raw is None:
            self.raw = []
        if tail:
            self.raw.insert(0, tail)
        if self.exchange is None:
            self._close()
        else:
            self.pause_reading(PAUSE_TUNNEL)

    def _on_malformed(self) -> None:
        self.stats.downstream_rq_total += 1
        exchange = self.exchange
        if exchange is not None:
            # Garbage inside a request body: that request cannot be completed either.
            self.exchange = None
            started = exchange.started
            exchange.abort()
            if started:
                self.abort()
                return
        self.respond(MALFORMED_REQUEST, keep_alive=False)

    # -- what an exchange calls ---------------------------------------------------------------------------

    def respond(self, response: SyntheticResponse, keep_alive: bool) -> None:
        """Send a response the proxy made up, then carry on (or close) as after any response."""
        self.stats.error(response.reason)
        exchange = self.exchange
        if self.tap is not None and isinstance(exchange, Exchange):
            self.tap.done(exchange, response.status, response.flag)
        if not self.transport.is_closing():
            self.transport.write(response.encode(close=not keep_alive))
        self._next(keep_alive)

    def exchange_done(self, keep_alive: bool) -> None:
        """The current response went out in full; serve the next queued request, or close."""
        exchange = self.exchange
        if self.tap is not None and isinstance(exchange, Exchange):
            self.tap.done(exchange)
        self._next(keep_alive)

    def _next(self, keep_alive: bool) -> None:
        self.exchange = None
        if not keep_alive or self.closing:
            self._close()
            return
        if self.queue:
            events = list(self.queue)
            self.queue.clear()
            self._handle(events)
        if not self.queue:
            if self.paused & PAUSE_PIPELINE:
                self.resume_reading(PAUSE_PIPELINE)
            if self.peer_eof and self.exchange is None:
                self._close()

    def abort(self) -> None:
        """Drop the connection: a response was cut short and cannot be finished properly."""
        self.closing = True
        self.transport.abort()

    def pause_reading(self, reason: int) -> None:
        if not self.paused and not self.transport.is_closing():
            self.transport.pause_reading()
        self.paused |= reason

    def resume_reading(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and not self.transport.is_closing():
                self.transport.resume_reading()

    def start_tunnel(self, upstream: Relay) -> None:
        """Hand the client connection to a raw relay with ``upstream``."""
        self.exchange = None
        transport = self.transport
        if transport.is_closing():
            if upstream.transport is not None:
                upstream.transport.close()
            return
        held = b"".join(self.raw or ())
        self.raw = None
        # From here the relay owns the connection and its accounting.
        self.stats.downstream_cx_active -= 1
        self.registry.discard(self)
        link(adopt(transport, self.stats, self.registry), upstream, to_a=b"", to_b=held)

    def open_tunnel(self, protocol: asyncio.Protocol) -> None:
        """Answer the CONNECT just received ourselves and let ``protocol`` serve what the client sends in the
        tunnel (see ``tunnel_http``)."""
        self.exchange = None
        transport = self.transport
        if transport.is_closing():
            return
        held = b"".join(self.raw or ())
        self.raw = None
        # From here ``protocol`` owns the connection and its accounting.
        self.stats.downstream_cx_active -= 1
        self.registry.discard(self)
        transport.write(CONNECT_ESTABLISHED)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if held:
            protocol.data_received(held)
        transport.resume_reading()

    def _close(self) -> None:
        self.closing = True
        self.transport.close()
