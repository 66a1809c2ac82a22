"""HTTP/2 (h2c, prior knowledge) and gRPC proxying: a downstream connection, upstream connections shared by
many streams, and one ``H2Call`` per request stream joining the two.

Each stream is routed on its own (``:authority``, ``:path``, ``:method``, headers) with the same ``Router``
and ``ProxyState.destination`` as HTTP/1.1. Flow control is end to end: DATA received on one side is credited
back (WINDOW_UPDATE) only once it went out on the other, so a slow reader slows its writer and the proxy holds
at most one window per stream. Trailers are forwarded (gRPC's status lives there). A request with
``content-type: application/grpc*`` gets proxy-made errors as gRPC errors (HTTP 200, trailers-only,
``grpc-status`` and ``grpc-message``), its ``grpc-timeout`` bounds the request (with the route timeout), and
retries follow ``grpc-status`` of trailers-only answers (``unavailable``, ``cancelled``, ...).

Each stream gets the route's policy and the cluster's resilience policies as an HTTP/1.1 request does
(see ``h2_call``).

A stream whose destination speaks HTTP/1.1 only (``Routed.http1``) is bridged to it by an ``H1Call``
(``h2_bridge``).

Writes are batched: while a read is being handled, every connection it touches only notes that it has frames
to send, and each writes them in one ``transport.write`` when the read is done (``WriteBatch``). A request
answered from one upstream read therefore costs one write per connection, not one per event.

This module holds the two connection protocols and the upstream pool; ``h2_call`` the per-stream ``H2Call``,
``h2_routing`` what a stream router answers and the gRPC helpers (re-exported here for existing importers).
"""

from __future__ import annotations

import asyncio
from typing import cast

from kizuna.protocols.http2 import (
    REFUSED_STREAM,
    ConnectionFailed,
    DataReceived,
    Event,
    GoAwayReceived,
    H2Endpoint,
    Headers,
    HeadersReceived,
    StreamReset,
    TrailersReceived,
    WindowOpened,
)
from kizuna.proxy.h2_bridge import H1Call
from kizuna.proxy.h2_call import H2Call
from kizuna.proxy.h2_routing import Routed, StreamRouter
from kizuna.proxy.pool import ClientTls
from kizuna.proxy.stats import Stats
from kizuna.proxy.telemetry_stream import StreamTap


class WriteBatch:
    """Connections with frames queued while a read is handled, written once it is done.

    ``depth`` counts the reads being handled (a read may call into another connection's code, never into
    another read, but the count keeps nesting safe). Outside a read (timers, connect tasks) writes go at once.
    """

    __slots__ = ("depth", "dirty")

    def __init__(self) -> None:
        self.depth = 0
        self.dirty: list[H2Connection] = []

    def end(self) -> None:
        """One read is done: at the outermost, every connection it touched writes what it queued."""
        self.depth -= 1
        if self.depth or not self.dirty:
            return
        dirty, self.dirty = self.dirty, []
        for conn in dirty:  # all first: should a write raise, the others still batch their next frames
            conn.dirty = False
        for conn in dirty:
            conn.write_now()


class H2Connection(asyncio.Protocol):
    """What both ends of our HTTP/2 connections share: frames queued by ``h2`` go out in one write per read."""

    h2: H2Endpoint
    transport: asyncio.Transport | None
    batch: WriteBatch
    dirty: bool

    def flush(self) -> None:
        """Write what ``h2`` queued: at once, or when the read being handled is done."""
        if self.batch.depth:
            if not self.dirty:
                self.dirty = True
                self.batch.dirty.append(self)
            return
        self.write_now()

    def write_now(self) -> None:
        data = self.h2.data_to_send()
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)


class H2ServerConnection(H2Connection):
    """A downstream HTTP/2 connection: every stream is routed and proxied by its own ``H2Call``."""

    def __init__(self, route: StreamRouter, pools: H2Pools, stats: Stats,
                 registry: set[asyncio.BaseProtocol]) -> None:
        self.route = route
        self.pools = pools
        self.stats = stats
        self.registry = registry
        self.h2 = H2Endpoint(client_side=False)
        self.transport: asyncio.Transport | None = None
        self.calls: dict[int, H2Call | H1Call] = {}
        self.closing = False
        self.tap: StreamTap | None = None
        self.batch = pools.batch
        self.dirty = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.registry.add(self)
        self.stats.downstream_cx_total += 1
        self.stats.downstream_cx_active += 1
        telemetry = getattr(self.stats, "telemetry", None)
        if telemetry is not None:
            self.tap = StreamTap(telemetry, transport)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.discard(self)
        self.stats.downstream_cx_active -= 1
        self.transport = None
        for call in list(self.calls.values()):
            call.downstream_gone()
        self.calls.clear()

    def data_received(self, data: bytes) -> None:
        batch = self.batch
        batch.depth += 1
        try:
            for event in self.h2.receive(data):
                self.handle(event)
            self.flush()
        finally:
            batch.end()

    def handle(self, event: Event) -> None:
        if isinstance(event, HeadersReceived):
            if self.closing:  # raced our GOAWAY: the client may retry it elsewhere
                self.h2.reset(event.stream_id, REFUSED_STREAM)
                return
            self.stats.downstream_rq_total += 1
            headers, record = event.headers, None
            if self.tap is not None:
                record, headers = self.tap.open(headers)
            routed = self.route(headers)
            call: H2Call | H1Call
            if isinstance(routed, Routed) and routed.http1:
                call = H1Call(self, event.stream_id, headers, event.end_stream)
            else:
                call = H2Call(self, event.stream_id, headers, event.end_stream)
            call.record = record
            self.calls[event.stream_id] = call
            call.start(routed)
        elif isinstance(event, DataReceived):
            found = self.calls.get(event.stream_id)
            if found is None:
                self.h2.acknowledge(event.stream_id, event.flow_length)
            else:
                found.request_data(event.data, event.flow_length, event.end_stream)
        elif isinstance(event, TrailersReceived):
            found = self.calls.get(event.stream_id)
            if found is not None:
                found.request_end(event.headers)
        elif isinstance(event, StreamReset):
            found = self.calls.pop(event.stream_id, None)
            if found is not None:
                found.downstream_gone()
        elif isinstance(event, WindowOpened):
            for call in list(self.calls.values()):
                call.flush_down()
        elif isinstance(event, ConnectionFailed) and self.transport is not None:
            self.write_now()
            self.transport.close()

    def finished(self, stream_id: int) -> None:
        self.calls.pop(stream_id, None)
        if self.closing and not self.calls and self.transport is not None:
            self.write_now()
            self.transport.close()

    def drain(self) -> None:
        """GOAWAY: streams in flight finish, no new ones; the connection closes when idle."""
        if self.closing or self.transport is None:
            return
        self.closing = True
        self.h2.goaway()
        self.write_now()
        if not self.calls:
            self.transport.close()


class H2ClientConnection(H2Connection):
    """An upstream HTTP/2 connection to one endpoint, carrying many streams."""

    def __init__(self, stats: Stats, batch: WriteBatch | None = None) -> None:
        self.stats = stats
        self.h2 = H2Endpoint(client_side=True)
        self.transport: asyncio.Transport | None = None
        self.calls: dict[int, H2Call] = {}
        self.usable = True
        self.batch = batch if batch is not None else WriteBatch()
        self.dirty = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.stats.upstream_cx_total += 1
        self.stats.upstream_cx_active += 1
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.upstream_cx_active -= 1
        self.usable = False
        self.transport = None
        calls, self.calls = list(self.calls.values()), {}
        for call in calls:
            call.upstream_failed(0)

    def available(self) -> bool:
        return self.usable and self.transport is not None and self.h2.can_open_stream()

    def open(self, call: H2Call, headers: Headers, end_stream: bool = False) -> int:
        stream_id = self.h2.next_stream_id()
        self.h2.send_headers(stream_id, headers, end_stream)
        self.calls[stream_id] = call
        return stream_id

    def forget(self, stream_id: int) -> None:
        self.calls.pop(stream_id, None)

    def data_received(self, data: bytes) -> None:
        batch = self.batch
        batch.depth += 1
        try:
            self._handle(self.h2.receive(data))
        finally:
            batch.end()
        if not self.usable and not self.calls and self.transport is not None:
            self.transport.close()

    def _handle(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, HeadersReceived):
                found = self.calls.get(event.stream_id)
                if found is not None:
                    found.response_headers(event.headers, event.end_stream)
            elif isinstance(event, DataReceived):
                found = self.calls.get(event.stream_id)
                if found is None:
                    self.h2.acknowledge(event.stream_id, event.flow_length)
                else:
                    found.response_data(event.data, event.flow_length, event.end_stream)
            elif isinstance(event, TrailersReceived):
                found = self.calls.get(event.stream_id)
                if found is not None:
                    found.response_end(event.headers)
            elif isinstance(event, StreamReset):
                found = self.calls.pop(event.stream_id, None)
                if found is not None:
                    found.upstream_failed(event.error_code)
            elif isinstance(event, WindowOpened):
                for call in list(self.calls.values()):
                    call.flush_up()
            elif isinstance(event, GoAwayReceived):
                self.usable = False
                for stream_id in [s for s in self.calls if s > event.last_stream_id]:
                    self.calls.pop(stream_id).upstream_failed(REFUSED_STREAM)
            elif isinstance(event, ConnectionFailed):
                self.usable = False
                if self.transport is not None:
                    self.write_now()
                    self.transport.close()
        self.flush()


class H2Pools:
    """Upstream HTTP/2 connections per endpoint: streams share a connection until it refuses more."""

    def __init__(self, stats: Stats, bind: str | None = None) -> None:
        self.stats = stats
        self.bind = bind
        self.conns: dict[tuple[str, int], list[H2ClientConnection]] = {}
        self.connecting: dict[tuple[str, int], asyncio.Future[H2ClientConnection]] = {}
        self.batch = WriteBatch()
        """Shared by the server connections using these pools and the pools' connections."""

    def ready(self, address: str, port: int) -> H2ClientConnection | None:
        """An open connection to ``address:port`` with room for a stream, if one is pooled (no connecting)."""
        for conn in self.conns.get((address, port), ()):
            if conn.available():
                return conn
        return None

    async def get(self, address: str, port: int, timeout: float, identity: str = "",
                  tls: ClientTls | None = None) -> H2ClientConnection:
        """An open connection to ``address:port`` with room for a stream (connecting if none has; with mTLS
        when the endpoint has an ``identity`` and ``tls`` a certificate, as HTTP/1.1 pools do)."""
        key = (address, port)
        conns = self.conns.setdefault(key, [])
        conns[:] = [c for c in conns if c.usable]
        for conn in conns:
            if conn.available():
                return conn
        pending = self.connecting.get(key)
        if pending is not None:
            conn = await asyncio.shield(pending)
            if conn.available():
                return conn
        loop = asyncio.get_running_loop()
        future: asyncio.Future[H2ClientConnection] = loop.create_future()
        self.connecting[key] = future
        try:
            local = (self.bind, 0) if self.bind else None
            context = tls.context("h2") if identity and tls is not None else None
            transport, conn = await asyncio.wait_for(loop.create_connection(
                lambda: H2ClientConnection(self.stats, self.batch), address, port, local_addr=local,
                ssl=context), timeout)
            if context is not None:
                assert tls is not None
                problem = tls.check_peer(transport.get_extra_info("peercert"), identity)
                if problem:
                    transport.abort()
                    raise ConnectionRefusedError(problem)
        except BaseException as exc:
            future.set_exception(OSError(str(exc)))
            future.exception()  # retrieved: waiters re-raise it, an unawaited future must not warn
            raise
        finally:
            if self.connecting.get(key) is future:
                del self.connecting[key]
        if not future.done():
            future.set_result(conn)
        self.conns.setdefault(key, []).append(conn)
        return conn

    def close(self) -> None:
        for conns in self.conns.values():
            for conn in conns:
                if conn.transport is not None:
                    conn.transport.close()
        self.conns.clear()
