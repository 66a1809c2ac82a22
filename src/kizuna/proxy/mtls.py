"""Mesh mTLS on the inbound side: each accepted connection is held until its first byte tells a TLS ClientHello
from plaintext, then served by the port's usual protocol, behind TLS termination or directly.

PeerAuthentication decides per port: PERMISSIVE (Istio's default) serves both; STRICT refuses plaintext; and
DISABLE never looks (plain TCP as before). A plaintext HTTP request refused under STRICT is answered, not reset:
``403`` with ``x-kizuna-error: mTLS required`` names the policy, since a silent reset is the single most
confusing failure Istio users report; other plaintext is closed. Without a certificate yet (the sidecar is
still obtaining one) every connection is served as plaintext would be.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Final, Literal, cast

from kizuna.protocols.sniff import Detected, sniff
from kizuna.proxy.tls_server import TlsServer

MtlsMode = Literal["DISABLE", "PERMISSIVE", "STRICT"]
DETECT_TIMEOUT: Final = 0.1
"""Server-first plaintext protocols send nothing: after this long, a silent connection is plaintext."""

STRICT_REFUSAL: Final = (b"HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\n"
                         b"x-kizuna-error: mTLS required\r\nconnection: close\r\n"
                         b"content-length: %d\r\n\r\n%b")


def refusal(reason: str) -> bytes:
    body = reason.encode() + b"\n"
    return STRICT_REFUSAL % (len(body), body)


class InboundMtls(asyncio.Protocol):
    """Decides TLS or plaintext for one accepted connection, then hands it over."""

    __slots__ = ("make_app", "context", "mode", "reason", "count", "transport", "buffer", "timer")

    def __init__(self, make_app: Callable[[], asyncio.Protocol], context: ssl.SSLContext | None, mode: MtlsMode,
                 reason: str = "", count: Callable[[str], None] | None = None) -> None:
        self.make_app = make_app
        self.context = context
        self.mode = mode
        self.reason = reason or "the workload requires mutual TLS (PeerAuthentication STRICT)"
        self.count = count
        """Told each decision: ``cx_mtls``, ``cx_plaintext`` or ``cx_plaintext_refused``."""
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.timer = asyncio.get_running_loop().call_later(DETECT_TIMEOUT, self._decide)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if sniff(self.buffer) is not Detected.NEED_MORE or len(self.buffer) >= 8:
            self._decide()

    def eof_received(self) -> bool:
        self._decide()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _decide(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.transport = None
        tls = self.buffer[:1] == b"\x16"
        count = self.count or _ignore
        if tls and self.context is not None:
            count("cx_mtls")
            protocol: asyncio.Protocol = TlsServer(self.context, self.make_app, self.buffer)
            transport.set_protocol(protocol)
            protocol.connection_made(transport)
            return
        if self.mode == "STRICT" and self.context is not None:
            count("cx_plaintext_refused")
            if sniff(self.buffer) is Detected.HTTP1:
                transport.write(refusal(self.reason))
            transport.close()
            return
        count("cx_plaintext")
        protocol = self.make_app()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.buffer:
            protocol.data_received(self.buffer)


def _ignore(_: str) -> None:
    pass
