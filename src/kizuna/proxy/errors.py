"""The one place where the proxy's failures become responses (linkerd's errors/respond).

Every failure the mesh itself produces is a ``SyntheticResponse``: an HTTP status, and a reason that the
client reads in the ``x-kizuna-error`` header and the body. A user who gets a 503 from the mesh can always
see why.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SyntheticResponse:
    """A response the proxy makes up instead of forwarding one."""

    status: int
    reason: str

    def encode(self, close: bool = False) -> bytes:
        """The whole HTTP/1.1 response; ``close`` adds ``Connection: close``."""
        body = self.reason.encode() + b"\n"
        phrase = _PHRASES.get(self.status, b"Error")
        connection = b"connection: close\r\n" if close else b""
        return (b"HTTP/1.1 %d %b\r\ncontent-type: text/plain\r\nx-kizuna-error: %b\r\ncontent-length: %d\r\n"
                b"%b\r\n%b" % (self.status, phrase, self.reason.encode(), len(body), connection, body))


_PHRASES = {400: b"Bad Request", 404: b"Not Found", 502: b"Bad Gateway", 503: b"Service Unavailable",
            504: b"Gateway Timeout"}

NO_ROUTE = SyntheticResponse(404, "no route")
"""No virtual host or no route matches the request (Envoy NR)."""
NO_HEALTHY_UPSTREAM = SyntheticResponse(503, "no healthy upstream")
"""The chosen cluster has no endpoints (Envoy UH)."""
CLUSTER_NOT_FOUND = SyntheticResponse(503, "cluster not found")
"""A route names a cluster the snapshot does not have (Envoy NC)."""
UPSTREAM_CONNECT_ERROR = SyntheticResponse(503, "upstream connect error")
"""Every try failed to connect (Envoy UF)."""
UPSTREAM_RESET = SyntheticResponse(503, "upstream reset")
"""The upstream closed or reset before a response began (Envoy UC)."""
UPSTREAM_PROTOCOL_ERROR = SyntheticResponse(502, "upstream protocol error")
"""The upstream answered with something that is not HTTP/1.x (Envoy UPE)."""
UPSTREAM_TIMEOUT = SyntheticResponse(504, "upstream timeout")
"""The route timeout, or the last try's per-try timeout, expired (Envoy UT)."""
MALFORMED_REQUEST = SyntheticResponse(400, "malformed request")
"""The client sent something that is not valid HTTP/1.x; nothing was forwarded."""
