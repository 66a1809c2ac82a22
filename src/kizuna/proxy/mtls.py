"""Mesh mTLS on the inbound side: each accepted connection is held until its first byte tells a TLS ClientHello
from plaintext, then served by the port's usual protocol, behind TLS termination or directly.

PeerAuthentication decides per port: PERMISSIVE (Istio's default) serves both; STRICT refuses plaintext; and
DISABLE never looks (plain TCP as before). A plaintext HTTP request refused under STRICT is answered, not reset:
``403`` with ``x-kizuna-error: mTLS required`` names the policy, since a silent reset is the single most
confusing failure Istio users report; other plaintext is closed. Either way the refusal is counted (flag
``NR``, Envoy's for a connection no filter chain takes) and written to the access log with its reason.
Without a certificate yet (the sidecar is still obtaining one) every connection is served as plaintext would be.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from typing import Final, Literal, cast

from kizuna.protocols.sniff import Detected, sniff
from kizuna.proxy.access_log import AccessLog, iso_time
from kizuna.proxy.errors import SyntheticResponse
from kizuna.proxy.stats import Stats
from kizuna.proxy.tls_server import TlsServer

MtlsMode = Literal["DISABLE", "PERMISSIVE", "STRICT"]
DETECT_TIMEOUT: Final = 0.1
"""Server-first plaintext protocols send nothing: after this long, a silent connection is plaintext."""

REFUSAL_ERROR: Final = "mTLS required"
REFUSAL_FLAG: Final = "NR"
"""Envoy's flag for a connection no filter chain accepts, which is what a STRICT port is to plaintext."""
STRICT_REFUSAL: Final = (b"HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\n"
                         b"x-kizuna-error: mTLS required\r\nx-kizuna-flags: NR\r\nconnection: close\r\n"
                         b"content-length: %d\r\n\r\n%b")


def strict_reason(port: int, policy: str) -> str:
    """Why plaintext is refused on ``port`` (``policy``: the PeerAuthentication's ``namespace/name``)."""
    return f"mutual TLS required on port {port} (PeerAuthentication {policy} STRICT); plaintext refused"


def late_refusal(port: int, policy: str) -> SyntheticResponse:
    """The answer to a request on a plaintext connection accepted before its port became STRICT: Envoy drains
    such connections when the listener changes; here their next request is refused as a new one would be."""
    reason = strict_reason(port, policy)
    return SyntheticResponse(403, REFUSAL_ERROR, REFUSAL_FLAG, body=reason.encode() + b"\n")


def refusal(reason: str) -> bytes:
    """The whole ``403`` answer to a plaintext HTTP request on a STRICT port."""
    body = reason.encode() + b"\n"
    return STRICT_REFUSAL % (len(body), body)


Refused = Callable[[bytes, bool, str], None]
"""Told of each refused connection: the bytes it sent first, whether they are HTTP/1.x, and the reason."""


class InboundMtls(asyncio.Protocol):
    """Decides TLS or plaintext for one accepted connection, then hands it over."""

    __slots__ = ("make_app", "context", "mode", "reason", "count", "transport", "buffer", "timer", "trust_domain",
                 "refused")

    def __init__(self, make_app: Callable[[], asyncio.Protocol], context: ssl.SSLContext | None, mode: MtlsMode,
                 reason: str = "", count: Callable[[str], None] | None = None, trust_domain: str = "",
                 refused: Refused | None = None) -> None:
        self.refused = refused
        """Told of each refusal (for the access log)."""
        self.trust_domain = trust_domain
        """Peers must have an identity in this trust domain ("": any the roots vouch for)."""
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
            protocol: asyncio.Protocol = TlsServer(self.context, self.make_app, self.buffer,
                                                   trust_domain=self.trust_domain)
            transport.set_protocol(protocol)
            protocol.connection_made(transport)
            return
        if self.mode == "STRICT" and self.context is not None:
            count("cx_plaintext_refused")
            http = sniff(self.buffer) is Detected.HTTP1
            if http:
                transport.write(refusal(self.reason))
            transport.close()
            if self.refused is not None:
                self.refused(self.buffer, http, self.reason)
            return
        count("cx_plaintext")
        protocol = self.make_app()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.buffer:
            protocol.data_received(self.buffer)


def log_refusal(stats: Stats, first: bytes, http: bool, reason: str) -> None:
    """Count a refusal by its flag and, when the sidecar keeps an access log, write its entry: the request line
    and ``Host`` read so far (HTTP) or the connection (anything else), flag ``NR`` and the reason, as Envoy logs
    a connection no filter chain took."""
    stats.flag(REFUSAL_FLAG)
    telemetry = getattr(stats, "telemetry", None)
    log: AccessLog | None = telemetry.access_log if telemetry is not None else None
    if log is None:
        return
    now = iso_time(time.time())
    if not http:
        log.refused(False, now, "TCP", REFUSAL_FLAG, len(first), 0, 0.0, None, None, None, "destination", reason)
        return
    head = first.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    request_line, *lines = head.split("\r\n")
    method, path, protocol = (request_line.split(" ") + ["", "", ""])[:3]
    host = next((v.strip() for k, _, v in (line.partition(":") for line in lines) if k.lower() == "host"), "")
    request_id = next((v.strip() for k, _, v in (line.partition(":") for line in lines)
                       if k.lower() == "x-request-id"), None)
    log.refused(True, now, method, path, protocol or "HTTP/1.1", 403, REFUSAL_FLAG, len(first),
                len(refusal(reason)), 0.0, None, None, request_id, host, None, None, "destination", None,
                f"{REFUSAL_ERROR}: {reason}")


def _ignore(_: str) -> None:
    pass
