"""TLS on an accepted connection whose first bytes were already read (PERMISSIVE mTLS detects TLS by them).

``loop.start_tls`` cannot take bytes already read, so the server side of mesh mTLS runs ``ssl``'s sans-I/O
core (``SSLObject`` over two ``MemoryBIO``\\ s): ``TlsServer`` is the protocol on the socket's transport; the
protocol that serves the decrypted stream (HTTP, opaque TCP, ...) sees a ``TlsTransport`` with the transport
methods the proxy's protocols use. The handshake must finish within ``HANDSHAKE_TIMEOUT``; the peer's
certificate is then available as ``get_extra_info("peercert")`` and its SPIFFE identity as
``get_extra_info("peer_identity")``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any, Final, cast

from kizuna.proxy.identity import Peer, peer_identity

log = logging.getLogger("kizuna.proxy.tls")

HANDSHAKE_TIMEOUT: Final = 10.0
READ_SIZE: Final = 256 * 1024


class TlsTransport(asyncio.Transport):
    """The decrypted side of a ``TlsServer``, as the serving protocol sees it."""

    def __init__(self, tls: TlsServer) -> None:
        super().__init__()
        self._tls = tls

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._tls.send(bytes(data))

    def writelines(self, chunks: Any) -> None:
        self._tls.send(b"".join(chunks))

    def can_write_eof(self) -> bool:
        return False  # TLS has close_notify, which ends both directions here

    def write_eof(self) -> None:
        self.close()

    def close(self) -> None:
        self._tls.close()

    def abort(self) -> None:
        self._tls.transport.abort()

    def is_closing(self) -> bool:
        return self._tls.closing or self._tls.transport.is_closing()

    def pause_reading(self) -> None:
        self._tls.transport.pause_reading()

    def resume_reading(self) -> None:
        self._tls.transport.resume_reading()

    def is_reading(self) -> bool:
        return self._tls.transport.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._tls.transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._tls.transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._tls.transport.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._tls.app = cast(asyncio.Protocol, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._tls.app

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peercert":
            return self._tls.peercert
        if name == "peer_identity":
            return self._tls.peer
        if name == "ssl_object":
            return self._tls.sslobj
        if name == "alpn":
            return self._tls.sslobj.selected_alpn_protocol()
        return self._tls.transport.get_extra_info(name, default)


class TlsServer(asyncio.Protocol):
    """Terminates TLS on a transport, then serves the plaintext with ``make_app()``'s protocol.

    ``initial``: bytes of the ClientHello already read from the connection. ``trust_domain``: a peer
    certificate must carry a SPIFFE identity in it (mesh mTLS, as Istio's inbound SAN prefix match), else the
    connection is closed after the handshake."""

    def __init__(self, context: ssl.SSLContext, make_app: Callable[[], asyncio.Protocol], initial: bytes = b"",
                 on_failure: Callable[[str], None] | None = None, trust_domain: str = "") -> None:
        self.trust_domain = trust_domain
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.make_app = make_app
        self.initial = initial
        self.on_failure = on_failure
        self.transport: asyncio.Transport = cast(asyncio.Transport, None)
        self.app: asyncio.Protocol = cast(asyncio.Protocol, None)
        self.shim = TlsTransport(self)
        self.handshaken = False
        self.closing = False
        self.peercert: dict[str, Any] | None = None
        self.peer: Peer | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.timer = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT, self._fail, "handshake timeout")
        if self.initial:
            data, self.initial = self.initial, b""
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        if not self.handshaken:
            try:
                self.sslobj.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return
            except (ssl.SSLError, ValueError) as exc:
                self._flush()
                self._fail(f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}")
                return
            self._handshake_done()
        self._read()

    def _handshake_done(self) -> None:
        self.handshaken = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.peercert = self.sslobj.getpeercert()
        self.peer = peer_identity(self.peercert)
        self._flush()
        if self.trust_domain and (self.peer is None or self.peer.trust_domain != self.trust_domain):
            who = f"spiffe://{self.peer.principal}" if self.peer is not None else "no SPIFFE identity"
            self._fail(f"peer {who} is not in the trust domain {self.trust_domain}")
            return
        self.app = self.make_app()
        self.app.connection_made(self.shim)

    def _read(self) -> None:
        while not self.closing:
            try:
                chunk = self.sslobj.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify: the client is done sending
                self._flush()
                if not self.app.eof_received():
                    self.close()
                return
            except ssl.SSLError as exc:
                self._fail(f"TLS error: {getattr(exc, 'reason', None) or exc}")
                return
            if not chunk:
                break
            self.app.data_received(chunk)
        self._flush()

    def send(self, data: bytes) -> None:
        if self.closing or not data:
            return
        try:
            self.sslobj.write(data)
        except ssl.SSLError as exc:
            self._fail(f"TLS error: {exc}")
            return
        self._flush()

    def _flush(self) -> None:
        pending = self.outgoing.read()
        if pending and not self.transport.is_closing():
            self.transport.write(pending)

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self.handshaken:
            try:
                self.sslobj.unwrap()
            except ssl.SSLError:
                pass
            self._flush()
        self.transport.close()

    def _fail(self, reason: str) -> None:
        if self.on_failure is not None:
            self.on_failure(reason)
        log.debug("%s from %s", reason, self.transport.get_extra_info("peername"))
        self.closing = True
        self.transport.close()

    def eof_received(self) -> bool | None:
        if self.handshaken and not self.closing:
            return self.app.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.handshaken:
            self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.handshaken:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.handshaken:
            self.app.resume_writing()
