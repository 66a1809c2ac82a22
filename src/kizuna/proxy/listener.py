"""Listening sockets, independent of how traffic got there.

A ``Listener`` binds at once (so ``apply`` can refuse a port it cannot have, synchronously) and, once started,
hands every accepted connection's metadata to a handler that returns the protocol serving it. In proxy mode
traffic arrives addressed to the listener (``HTTP_PROXY`` to the outbound port, other sidecars to inbound
ports) and the metadata is the same for every connection. A ``capture`` listener (iptables REDIRECT) reads each
connection's original destination (``SO_ORIGINAL_DST``) before its handler is asked for a protocol.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, cast

from kizuna.proxy.original_dst import original_dst

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
                 backlog: int = 1024, capture: bool = False) -> None:
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
        self.capture = capture
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Begin accepting (connections that arrived since the bind wait in the backlog)."""
        if self.sock is None:
            return
        info, handler = self.info, self.handler
        loop = asyncio.get_running_loop()
        if self.capture:
            self.server = await loop.create_server(lambda: _CapturedConnection(info, handler), sock=self.sock)
        else:
            self.server = await loop.create_server(lambda: handler(info), sock=self.sock)

    def close(self) -> None:
        """Stop accepting; connections already accepted carry on."""
        if self.server is not None:
            self.server.close()
        elif self.sock is not None:
            self.sock.close()
        self.sock = None


class _CapturedConnection(asyncio.Protocol):
    """Reads the original destination off the accepted socket, then hands the transport to the protocol the
    handler picks for it (before any byte is read, so nothing is lost)."""

    __slots__ = ("info", "handler")

    def __init__(self, info: ConnectionInfo, handler: Handler) -> None:
        self.info = info
        self.handler = handler

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        dst = original_dst(sock) if sock is not None else None
        protocol = cast(asyncio.Protocol, self.handler(replace(self.info, original_dst=dst)))
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
