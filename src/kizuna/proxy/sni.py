"""TLS routes: an opaque connection to a port with ``tls[]`` routes is held until its ClientHello names a
server (SNI), then routed by that name (Istio's ``tls.match.sniHosts``; the TLS itself passes through).

A route with ``sni_hosts`` matches when one of them equals the SNI or, written ``*.suffix``, ends it; the
first such route wins, in VirtualService order. A connection without SNI, or with one no route names, takes
the first route without matches (a ``tcp[]`` route of the same VirtualService), else is closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Final, cast

from kizuna.protocols.tls import MAX_CLIENT_HELLO, NEED_MORE, client_hello_sni
from kizuna.proxyconfig.model import Route, VirtualHost

SNI_TIMEOUT: Final = 5.0
"""Seconds to wait for a complete ClientHello before routing as if it had no SNI."""


def has_sni_routes(vh: VirtualHost) -> bool:
    """Does this virtual host route on SNI?"""
    return any(m.sni_hosts for r in vh.routes for m in r.matches)


def sni_matches(pattern: str, sni: str) -> bool:
    """``pattern`` (``api.example.com``, ``*.example.com``, ``*``) against a lower-case SNI."""
    pattern = pattern.lower()
    if pattern == "*":
        return bool(sni)
    if pattern.startswith("*."):
        return sni.endswith(pattern[1:])
    return sni == pattern


def route_for_sni(routes: Sequence[Route], sni: str) -> Route | None:
    """The first route naming ``sni``, else the first route without matches."""
    if sni:
        for route in routes:
            if any(sni_matches(p, sni) for m in route.matches for p in m.sni_hosts):
                return route
    return next((r for r in routes if not r.matches), None)


class SniWait(asyncio.Protocol):
    """Holds a new connection until its ClientHello's SNI is known (or it is clearly none), then hands the
    connection to ``make(sni, bytes read so far)``."""

    __slots__ = ("make", "wait", "transport", "buffer", "timer")

    def __init__(self, make: Callable[[str, bytes], asyncio.Protocol], initial: bytes = b"",
                 wait: float = SNI_TIMEOUT) -> None:
        self.make = make
        self.wait = wait
        self.transport: asyncio.Transport | None = None
        self.buffer = initial
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.timer = asyncio.get_running_loop().call_later(self.wait, self._hand_over, "")
        if self.buffer:
            self._check()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._check()

    def eof_received(self) -> bool:
        protocol = self._hand_over("")
        return bool(protocol is not None and protocol.eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _check(self) -> None:
        sni = client_hello_sni(self.buffer)
        if sni == NEED_MORE and len(self.buffer) < MAX_CLIENT_HELLO:
            return
        self._hand_over(sni if sni is not None and sni != NEED_MORE else "")

    def _hand_over(self, sni: str) -> asyncio.Protocol | None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return None
        self.transport = None
        protocol = self.make(sni, self.buffer)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        return protocol
