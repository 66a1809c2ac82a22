"""One pooled HTTP/1.1 connection to an upstream endpoint: sends a request, parses the response for it.

It is an ``asyncio.Protocol``: response bytes arrive in ``data_received`` and go to the exchange as calls,
with no coroutine per read. Between requests the connection sits idle in its endpoint pool.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

from kizuna.protocols.http1 import (
    BodyReceived,
    MessageEnded,
    ParseFailed,
    ResponseHead,
    ResponseParser,
    ResponseReceived,
    Upgraded,
)
from kizuna.proxy.errors import UPSTREAM_PROTOCOL_ERROR, UPSTREAM_RESET
from kizuna.proxy.pool import EndpointPool
from kizuna.proxy.stats import Stats
from kizuna.proxy.tcp import WRITE_HIGH_WATER

if TYPE_CHECKING:
    from kizuna.proxy.exchange import Exchange


class UpstreamConnection(asyncio.Protocol):
    """A keep-alive client connection owned by an ``EndpointPool``; serves one exchange at a time."""

    __slots__ = ("pool", "stats", "transport", "parser", "exchange", "idle_since", "keep_alive", "closed",
                 "received", "_informational", "_counted", "served", "opened")

    def __init__(self, pool: EndpointPool[UpstreamConnection], stats: Stats) -> None:
        self.pool = pool
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser()
        self.exchange: Exchange | None = None
        self.idle_since = 0.0
        self.keep_alive = True
        self.closed = False
        self.received = False
        """Bytes of the current response have arrived (a failure after that is not a stale connection)."""
        self._informational = False
        self._counted = False
        self.served = 0
        """Requests finished on this connection (for ``maxRequestsPerConnection``)."""
        self.opened: float | None = None
        """Loop time the connection was made, set only when the pool has a ``maxConnectionDuration``."""

    # -- what the pool asks -------------------------------------------------------------------------------

    def is_available(self) -> bool:
        return (not self.closed and self.exchange is None and self.keep_alive
                and self.transport is not None and not self.transport.is_closing())

    def is_idle(self) -> bool:
        return self.exchange is None

    def has_expired(self, now: float) -> bool:
        pool = self.pool
        if now - self.idle_since > pool.idle_timeout:
            return True
        # ``opened`` is only set when the pool has a maxConnectionDuration.
        return self.opened is not None and pool.max_duration is not None and now - self.opened > pool.max_duration

    def close(self) -> None:
        self.keep_alive = False
        if self.transport is not None:
            self.transport.close()

    # -- what the exchange does ---------------------------------------------------------------------------

    def send(self, exchange: Exchange, method: bytes, data: bytes) -> None:
        """Start a request: ``data`` is its head and as much of its body as is known."""
        assert self.transport is not None
        self.exchange = exchange
        self.received = False
        self.parser.expect(method)
        self.transport.write(data)

    def write(self, data: bytes) -> None:
        """More request body."""
        assert self.transport is not None
        self.transport.write(data)

    def finish(self, reusable: bool, now: float) -> None:
        """The exchange is over: back to the pool when the connection can carry another request."""
        self.exchange = None
        self.served += 1
        if self.pool.max_requests and self.served >= self.pool.max_requests:
            reusable = False
        if reusable and self.keep_alive and self.transport is not None:
            self.idle_since = now
            self.pool.release(self)
        else:
            self.close()

    def detach(self) -> asyncio.Transport:
        """Hand the transport over to another protocol (tunnels); the pool forgets this connection."""
        assert self.transport is not None
        transport = self.transport
        self.exchange = None
        self.closed = True
        self._uncount()
        return transport

    # -- asyncio.Protocol ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER)
        self._counted = True
        if self.pool.max_duration is not None:
            self.opened = asyncio.get_running_loop().time()
        self.stats.upstream_cx_total += 1
        self.stats.upstream_cx_active += 1

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            # Bytes nobody asked for on an idle connection: its framing cannot be trusted any more.
            self.close()
            return
        self.received = True
        events = self.parser.feed(data)
        # Event classes are final: ``type(e) is C`` is a pointer compare where isinstance is a call.
        for i, event in enumerate(events):
            kind = type(event)
            if kind is BodyReceived:
                ex.response_body(event.data)  # type: ignore[union-attr]
                continue  # a body piece never ends the exchange
            if kind is ResponseReceived:
                head: ResponseHead = event.head  # type: ignore[union-attr,assignment]
                # 1xx heads end a message of their own, which is not the response's end (for 101 the
                # new protocol's bytes follow as Upgraded).
                self._informational = head.status < 200
                self.keep_alive = head.keep_alive
                ex.response_head(head)
            elif kind is MessageEnded:
                if self._informational:
                    self._informational = False
                    continue
                ex.response_end()
            elif kind is Upgraded:
                ex.response_upgraded(event.tail)  # type: ignore[union-attr]
                return
            elif kind is ParseFailed:
                self.keep_alive = False
                ex.upstream_failed(UPSTREAM_PROTOCOL_ERROR)
            if self.exchange is not ex:
                # The exchange ended or gave up on this connection. Bytes beyond the response it asked for
                # mean the framing is off: this connection must not carry another request. (An exchange
                # that ended has written its response out already.)
                # (By index: MessageEnded is one shared object, so ``is events[-1]`` cannot tell.)
                if self.parser.in_message or i != len(events) - 1:
                    self.close()
                return
        ex.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._uncount()
        self.pool.discard(self)
        ex = self.exchange
        if ex is None:
            return
        for event in self.parser.feed_eof():
            if type(event) is MessageEnded:
                ex.response_end()
                return
        if self.exchange is ex:
            self.exchange = None
            ex.upstream_failed(UPSTREAM_RESET)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_write_paused(True)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_write_paused(False)

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self.stats.upstream_cx_active -= 1
