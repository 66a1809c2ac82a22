"""Request mirroring (Istio ``mirror`` / ``mirrors``): fire and forget.

A copy of the request goes on its own short-lived connection to an endpoint of the mirror cluster, with Host
suffixed ``-shadow``; its response is read and thrown away. Nothing about it reaches the client or waits for
the primary: a failing mirror only bumps ``mirror.rq_failed``; a slow one is cut off after
``MIRROR_TIMEOUT``; past ``MAX_IN_FLIGHT`` copies in flight, new copies are dropped (``mirror.rq_dropped``).
Only requests whose body was buffered (up to the exchange's replay bound) are mirrored.
"""

from __future__ import annotations

import asyncio
from typing import Final

from kizuna.proxy.stats import Stats

MIRROR_TIMEOUT: Final = 10.0
MAX_IN_FLIGHT: Final = 256


class _MirrorConnection(asyncio.Protocol):
    """Writes one request, discards whatever comes back, closes at EOF or on the deadline."""

    def __init__(self, data: bytes, closed: asyncio.Future[None]) -> None:
        self.data = data
        self.closed = closed
        self.transport: asyncio.Transport | None = None
        self.answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.data)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.answered = True

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)


async def _send(loop: asyncio.AbstractEventLoop, address: str, port: int, data: bytes, stats: Stats,
                connect_timeout: float) -> None:
    proto: _MirrorConnection | None = None
    closed: asyncio.Future[None] = loop.create_future()
    try:
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: _MirrorConnection(data, closed), address, port), connect_timeout)
        proto = conn
        await asyncio.wait_for(closed, MIRROR_TIMEOUT)
        if not conn.answered:
            stats.mirror_failed += 1
    except (TimeoutError, OSError):
        stats.mirror_failed += 1
    finally:
        if proto is not None and proto.transport is not None:
            proto.transport.abort()
        stats.mirror_active -= 1


def send_copy(loop: asyncio.AbstractEventLoop, stats: Stats, address: str, port: int, data: bytes,
              connect_timeout: float, tasks: set[asyncio.Task[None]]) -> None:
    """Start sending ``data`` (a whole request, ``Connection: close``) to ``address:port``; never raises."""
    if stats.mirror_active >= MAX_IN_FLIGHT:
        stats.mirror_dropped += 1
        return
    stats.mirror_total += 1
    stats.mirror_active += 1
    task = loop.create_task(_send(loop, address, port, data, stats, connect_timeout))
    tasks.add(task)  # a strong reference until done, so the task is not collected mid-flight
    task.add_done_callback(tasks.discard)
