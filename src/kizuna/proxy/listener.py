"""Listening sockets, independent of how traffic got there.

A ``Listener`` binds at once (so ``apply`` can refuse a port it cannot have, synchronously) and, once started,
hands every accepted connection's metadata to a handler that returns the protocol serving it. Today traffic
arrives in proxy mode (``HTTP_PROXY`` to the outbound port, other sidecars to inbound ports); with iptables
REDIRECT the original destination will be filled in from ``SO_ORIGINAL_DST`` and the handlers stay the same.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

ListenerKind = Literal["outbound", "inbound", "admin"]


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """What is known about an accepted connection before its first byte."""

    kind: ListenerKind
    port: int
    """The listener's port (for inbound, the service port the client dialled)."""
    original_dst: tuple[str, int] | None = None
    """Where the client meant to go, when traffic was captured transparently (not in proxy mode)."""


Handler = Callable[[ConnectionInfo], asyncio.BaseProtocol]


class Listener:
    """One bound TCP socket served by the running loop."""

    def __init__(self, kind: ListenerKind, address: str, port: int, handler: Handler,
                 backlog: int = 1024) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock: socket.socket | None = sock
        self.address = address
        self.port: int = sock.getsockname()[1]
        self.info = ConnectionInfo(kind, self.port)
        self.handler = handler
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Begin accepting (connections that arrived since the bind wait in the backlog)."""
        if self.sock is None:
            return
        info, handler = self.info, self.handler
        self.server = await asyncio.get_running_loop().create_server(lambda: handler(info), sock=self.sock)

    def close(self) -> None:
        """Stop accepting; connections already accepted carry on."""
        if self.server is not None:
            self.server.close()
        elif self.sock is not None:
            self.sock.close()
        self.sock = None
