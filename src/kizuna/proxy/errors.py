"""The one place where the proxy's own outcomes become responses (linkerd's errors/respond).

Every response the mesh itself produces is a ``SyntheticResponse``: an HTTP status, a reason the client reads
in the ``x-kizuna-error`` header and the body, and an Envoy response flag (``NR``, ``UH``, ``UF``, ``UT``,
``URX``, ``FI`` ...) in ``x-kizuna-flags`` that ``/stats`` counts too. A user who gets a 503 from the mesh
can always see why. Route actions that answer without an upstream (redirect, directResponse, a fault abort)
are synthetic responses as well; a redirect or direct response is no error, so it has no reason.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import Final

Headers = tuple[tuple[bytes, bytes], ...]

FLAGS: Final = {
    "NR": "no route", "NC": "cluster not found", "UH": "no healthy upstream",
    "UF": "upstream connect failure", "UC": "upstream connection termination", "UT": "upstream timeout",
    "UPE": "upstream protocol error", "URX": "upstream retry limit exceeded", "DI": "delay injected",
    "FI": "fault injected", "DC": "downstream connection termination", "UO": "upstream overflow",
}
"""Envoy response flags kizuna sets, and what each means."""


@dataclass(frozen=True, slots=True)
class SyntheticResponse:
    """A response the proxy makes up instead of forwarding one."""

    status: int
    reason: str
    flag: str = ""
    """Envoy response flags, comma-separated (``UF,URX``); empty for a route's own answer."""
    headers: Headers = ()
    body: bytes | None = None
    """None: the reason and a newline, as text/plain."""

    def encode(self, close: bool = False) -> bytes:
        """The whole HTTP/1.1 response; ``close`` adds ``Connection: close``."""
        body = self.body if self.body is not None else self.reason.encode() + b"\n"
        try:
            phrase = HTTPStatus(self.status).phrase.encode()
        except ValueError:
            phrase = b"Unknown"
        parts = [b"HTTP/1.1 %d %b\r\n" % (self.status, phrase)]
        if not any(name == b"content-type" for name, _ in self.headers) and (body or self.body is None):
            parts.append(b"content-type: text/plain\r\n")
        for name, value in self.headers:
            parts.append(b"%b: %b\r\n" % (name, value))
        if self.reason:
            parts.append(b"x-kizuna-error: %b\r\n" % self.reason.encode())
        if self.flag:
            parts.append(b"x-kizuna-flags: %b\r\n" % self.flag.encode())
        parts.append(b"content-length: %d\r\n" % len(body))
        if close:
            parts.append(b"connection: close\r\n")
        parts += (b"\r\n", body)
        return b"".join(parts)

    def with_flag(self, flag: str) -> SyntheticResponse:
        """This response with ``flag`` added to its flags."""
        return replace(self, flag=f"{self.flag},{flag}" if self.flag else flag)


def add_flag(flags: str, flag: str) -> str:
    """Envoy-style response flags (``UF,URX``) with ``flag`` added, once."""
    if not flag or flag in flags.split(","):
        return flags
    return f"{flags},{flag}" if flags else flag


NO_ROUTE = SyntheticResponse(404, "no route", "NR")
"""No virtual host or no route matches the request (Envoy NR)."""
NO_HEALTHY_UPSTREAM = SyntheticResponse(503, "no healthy upstream", "UH")
"""The chosen cluster has no endpoints (Envoy UH)."""
CLUSTER_NOT_FOUND = SyntheticResponse(503, "cluster not found", "NC")
"""A route names a cluster the snapshot does not have (Envoy NC)."""


def subset_not_found(subset: str, service: str) -> SyntheticResponse:
    """A route names a subset no DestinationRule defines (Envoy NC: Istio generates no cluster for it)."""
    return SyntheticResponse(503, f"cluster not found: no DestinationRule defines subset {subset} of {service}",
                             "NC")


UPSTREAM_CONNECT_ERROR = SyntheticResponse(503, "upstream connect error", "UF")
"""Every try failed to connect (Envoy UF; with ``URX`` once retries were spent)."""
UPSTREAM_RESET = SyntheticResponse(503, "upstream reset", "UC")
"""The upstream closed or reset before a response began (Envoy UC)."""
UPSTREAM_PROTOCOL_ERROR = SyntheticResponse(502, "upstream protocol error", "UPE")
"""The upstream answered with something that is not HTTP/1.x (Envoy UPE)."""
UPSTREAM_TIMEOUT = SyntheticResponse(504, "upstream timeout", "UT")
"""The route timeout, or the last try's per-try timeout, expired (Envoy UT)."""
UPSTREAM_OVERFLOW = SyntheticResponse(503, "upstream overflow", "UO")
"""The cluster's circuit breaker is open: too many requests in flight and waiting (Envoy UO)."""
MALFORMED_REQUEST = SyntheticResponse(400, "malformed request")
"""The client sent something that is not valid HTTP/1.x; nothing was forwarded."""

FAULT_ABORT_REASON: Final = "fault filter abort"


def fault_abort(status: int | None, grpc_status: int | None) -> SyntheticResponse:
    """An injected abort (Envoy FI): the HTTP status, or for ``grpc_status`` a trailers-only gRPC answer
    (HTTP 200 with ``grpc-status``), as Envoy's fault filter sends."""
    if grpc_status is not None:
        headers: Headers = ((b"content-type", b"application/grpc"), (b"grpc-status", b"%d" % grpc_status),
                            (b"grpc-message", FAULT_ABORT_REASON.encode()))
        return SyntheticResponse(200, FAULT_ABORT_REASON, "FI", headers, b"")
    return SyntheticResponse(status or 503, FAULT_ABORT_REASON, "FI")


def redirect(location: bytes, code: int, headers: Headers = ()) -> SyntheticResponse:
    """A route's redirect: ``code`` with ``Location`` and no body."""
    return SyntheticResponse(code, "", "", ((b"location", location), *headers), b"")


def direct(status: int, body: bytes, headers: Headers = ()) -> SyntheticResponse:
    """A route's directResponse."""
    return SyntheticResponse(status, "", "", headers, body)
