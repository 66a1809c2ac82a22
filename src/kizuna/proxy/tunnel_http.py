"""CONNECT to an HTTP port, answered by the sidecar: what the app then sends inside the tunnel is served as if it
had connected to the outbound listener, so each request (each HTTP/2 stream) is routed on its own.

gRPC clients in proxy mode need this: grpcio honours ``grpc_proxy`` / ``http_proxy`` by opening a CONNECT tunnel
and speaking h2c inside it. Relayed as opaque bytes, the whole channel would stick to one endpoint, with no
header routing, retries or timeouts per call. A tunnel to a port that is not declared HTTP (TLS, TCP, or a port
whose protocol is sniffed) stays a raw relay.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kizuna.proxy.downstream import HttpServerConnection

ServeTunnel = Callable[[], asyncio.Protocol]
"""Makes the protocol that serves a tunnel's inner bytes (the outbound listener's HTTP/1.x-or-h2 switch)."""


class OpenedTunnel:
    """Stands where an exchange would for a CONNECT the sidecar answers itself (see the module docstring).

    The hand-over waits for the end of the current read: by then the parser has passed on the bytes that came
    after the CONNECT head, which belong to the tunnel."""

    __slots__ = ("down", "serve", "handle", "started", "done")

    def __init__(self, down: HttpServerConnection, serve: ServeTunnel, loop: asyncio.AbstractEventLoop) -> None:
        self.down = down
        self.serve = serve
        self.started = False
        self.done = False
        self.handle: asyncio.Handle | None = loop.call_soon(self._open)

    def request_body(self, data: bytes) -> None:
        """A CONNECT has no body; what follows its head is the tunnel's (held by the connection)."""

    def request_end(self) -> None:
        pass

    def downstream_write_paused(self, paused: bool) -> None:
        pass

    def abort(self) -> None:
        self.done = True
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _open(self) -> None:
        self.handle = None
        if not self.done:
            self.started = self.done = True
            self.down.open_tunnel(self.serve())
