"""Opaque byte relay between two connections, with flow control both ways and half-close.

Used for plain TCP ports, for connections that sniffing did not recognise, for CONNECT tunnels and after a
``101 Switching Protocols``. Each side is a ``Relay`` protocol; when one side's write buffer is full the other
side stops reading until it drains.

A connection relayed to a cluster follows its ``connectionPool.tcp`` as Envoy's TCP proxy does under Istio:
``maxConnections`` (``circuit``), ``idleTimeout`` (no bytes either way for that long: both sides close; 1 h
by default) and ``maxConnectionDuration`` (both sides close at that age).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final, cast

from kizuna.proxy.balancer import Loaded
from kizuna.proxy.circuit import CircuitBreaker
from kizuna.proxy.stats import Stats
from kizuna.proxy.telemetry_tap import TcpRecord

WRITE_HIGH_WATER: Final = 64 * 1024
"""Every proxy transport's write buffer high-water mark: above it, the other side stops reading."""
TCP_IDLE_TIMEOUT: Final = 3600.0
"""Istio's default ``connectionPool.tcp.idleTimeout`` (Envoy's TCP proxy default): 1 h."""


class Timers:
    """The idle timeout and maximum duration of one relayed connection: when either passes, both sides
    close. Activity is a timestamp each read writes; the idle timer re-arms for the time left, so no timer
    is touched per read."""

    __slots__ = ("loop", "sides", "idle", "last", "handles")

    def __init__(self, loop: asyncio.AbstractEventLoop, sides: tuple[Relay, Relay], idle: float | None,
                 max_duration: float | None) -> None:
        self.loop = loop
        self.sides = sides
        self.idle = idle
        self.last = loop.time()
        self.handles: list[asyncio.TimerHandle] = []
        if idle:
            self.handles.append(loop.call_later(idle, self._check_idle))
        if max_duration:
            self.handles.append(loop.call_later(max_duration, self.expire))

    def touch(self) -> None:
        """Bytes moved."""
        self.last = self.loop.time()

    def _check_idle(self) -> None:
        assert self.idle is not None
        quiet = self.loop.time() - self.last
        if quiet >= self.idle:
            self.expire()
        else:
            self.handles[0] = self.loop.call_later(self.idle - quiet, self._check_idle)

    def expire(self) -> None:
        """Close both sides (what is buffered is flushed first)."""
        self.cancel()
        for side in self.sides:
            if side.transport is not None and not side.transport.is_closing():
                side.transport.close()

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()
        self.handles.clear()


class Relay(asyncio.Protocol):
    """One side of a relay: what it reads, its peer writes."""

    __slots__ = ("stats", "registry", "transport", "peer", "eof", "on_lost", "nbytes", "record", "downstream",
                 "timers")

    def __init__(self, stats: Stats, registry: set[asyncio.BaseProtocol]) -> None:
        self.stats = stats
        self.registry = registry
        self.transport: asyncio.Transport | None = None
        self.peer: Relay | None = None
        self.eof = False
        self.on_lost: Callable[[], None] | None = None
        """Called once when this side's connection is gone (e.g. to release a balancer's load count)."""
        self.nbytes = 0
        """Bytes read from this side (for telemetry)."""
        self.record: TcpRecord | None = None
        self.downstream = False
        self.timers: Timers | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER)
        self.registry.add(self)
        self.stats.tcp_cx_total += 1
        self.stats.tcp_cx_active += 1

    def data_received(self, data: bytes) -> None:
        self.nbytes += len(data)
        if self.timers is not None:
            self.timers.touch()
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.transport is None or peer.transport.is_closing():
            return False
        if peer.eof or not peer.transport.can_write_eof():
            peer.transport.close()
            return False
        # Half-close: pass the FIN on and keep the other direction open.
        peer.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.tcp_cx_active -= 1
        self.registry.discard(self)
        if self.timers is not None:
            self.timers.cancel()
            self.timers = None
        if self.record is not None:
            self.record.closed(self.downstream, self.nbytes)
            self.record = None
        if self.on_lost is not None:
            self.on_lost()
            self.on_lost = None
        peer = self.peer
        if peer is not None and peer.transport is not None:
            # close() flushes what is still buffered for the peer before it sends FIN.
            peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


def link(a: Relay, b: Relay, to_a: bytes = b"", to_b: bytes = b"") -> None:
    """Join two relays with transports set, send what each already had for the other, start reading."""
    assert a.transport is not None and b.transport is not None
    a.peer, b.peer = b, a
    if to_b:
        b.transport.write(to_b)
    if to_a:
        a.transport.write(to_a)
    for side in (a, b):
        if side.transport is not None and not side.transport.is_closing():
            side.transport.resume_reading()


def adopt(transport: asyncio.Transport, stats: Stats, registry: set[asyncio.BaseProtocol]) -> Relay:
    """Turn a transport that another protocol was reading into one side of a relay."""
    relay = Relay(stats, registry)
    transport.set_protocol(relay)
    relay.connection_made(transport)
    return relay


class TcpForward(asyncio.Protocol):
    """An accepted connection relayed to ``host:port`` once that connection is up (opaque TCP forwarding).

    Reading waits until the upstream side exists; ``initial`` is what was already read (e.g. while sniffing).
    When the upstream cannot be reached the connection is closed: plain TCP has no way to say why.
    ``source`` binds the upstream connection's local address (``127.0.0.6`` for capture passthrough);
    ``load`` (a balanced endpoint) counts this connection as in flight for as long as it lasts, so
    LEAST_REQUEST balances opaque TCP by open connections. ``circuit`` (the cluster's ``maxConnections``)
    refuses the connection at once when the cluster has no slot free (counted as flag UO);
    ``idle_timeout`` (0 or None: never) and ``max_duration`` close the relay (see ``Timers``).
    """

    __slots__ = ("host", "port", "timeout", "stats", "registry", "initial", "source", "load", "transport",
                 "task", "closed", "eof", "circuit", "idle_timeout", "max_duration")

    def __init__(self, host: str, port: int, timeout: float, stats: Stats,
                 registry: set[asyncio.BaseProtocol], initial: bytes = b"", source: str | None = None,
                 load: Loaded | None = None, *, circuit: CircuitBreaker | None = None,
                 idle_timeout: float | None = TCP_IDLE_TIMEOUT, max_duration: float | None = None) -> None:
        self.circuit = circuit
        self.idle_timeout = idle_timeout
        self.max_duration = max_duration
        self.source = source
        self.load = load
        self.host = host
        self.port = port
        self.timeout = timeout
        self.stats = stats
        self.registry = registry
        self.initial = initial
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()
        if self.circuit is not None and not self.circuit.connect(self):
            self.circuit = None  # holds no slot: nothing to give back
            self.load = None
            self.stats.flag("UO")
            self.transport.close()
            return
        if self.load is not None:
            self.load.active += 1
        self.task = asyncio.get_running_loop().create_task(self._connect())

    def data_received(self, data: bytes) -> None:
        self.initial += data  # only before the relay takes over, while reading is being paused

    def eof_received(self) -> bool:
        self.eof = True  # passed on once the relay exists
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._release()
        if self.task is not None:
            self.task.cancel()

    def _release(self) -> None:
        if self.load is not None:
            self.load.active -= 1
            self.load = None
        if self.circuit is not None:
            start = self.circuit.leave(self)
            self.circuit = None
            if start is not None:
                start()  # an HTTP request was waiting for this slot

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.transport is not None
        # An endpoint with a sidecar gets mutual TLS, as HTTP does (its pool knows the identity to expect).
        tls = getattr(self.load, "tls", None)
        identity = getattr(self.load, "identity", "")
        context = tls.context("kizuna-tcp") if tls is not None and identity else None
        try:
            async with asyncio.timeout(self.timeout):
                up, relay = await loop.create_connection(
                    lambda: Relay(self.stats, self.registry), self.host, self.port,
                    local_addr=(self.source, 0) if self.source else None, ssl=context)
            if context is not None and tls is not None:
                problem = tls.check_peer(up.get_extra_info("peercert"), identity)
                if problem:
                    up.abort()
                    raise ConnectionRefusedError(problem)
        except (OSError, TimeoutError) as exc:
            if context is not None:
                self.stats.error(f"mTLS to {self.host}:{self.port}: {exc}")
            self.transport.close()
            return
        if self.closed:
            up.close()
            return
        down = adopt(self.transport, self.stats, self.registry)
        down.on_lost = self._release  # the relay outlives this protocol: it ends the load count
        telemetry = getattr(self.stats, "telemetry", None)
        if telemetry is not None:
            down.record = relay.record = TcpRecord(telemetry, self.transport, self.host, self.port)
            down.downstream = True
            down.nbytes = len(self.initial)
        if self.idle_timeout or self.max_duration:
            down.timers = relay.timers = Timers(loop, (down, relay), self.idle_timeout, self.max_duration)
        link(down, relay, to_a=b"", to_b=self.initial)
        if self.eof:
            down.eof_received()
