"""The sidecar's own HTTP/1.1 calls: one request on one connection, the whole answer read into memory.

The sidecar calls out for itself now and then: a CSR to the control plane, spans to an OTLP collector, a
JWKS from an issuer, the app's metrics for a scrape. None of these is on the request path, so this is plain
asyncio streams, one connection per request (``Connection: close``), with the response framed by
``protocols.http1.ResponseParser``: Content-Length, chunked and close-delimited bodies are all handled there.
Every call is bounded in time (``timeout`` covers connect, TLS handshake, request and the whole answer) and in
memory (a body larger than ``limit`` is refused while it arrives).

Errors: the network's stay what they are (``OSError`` and its kinds, e.g. ``ConnectionRefusedError``, which
callers show to users by name); the time limit raises ``TimeoutError``; an answer that is not a usable HTTP
response raises ``ResponseError`` (a ``ValueError``), ``ResponseTooLarge`` when only its size is wrong; a TLS
peer that ``check_peer`` refuses raises ``PermissionError`` before anything is sent. Any status is returned:
what counts as success is the caller's to say.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from kizuna.protocols.http1 import (
    BODY_LENGTH,
    BODY_NONE,
    BodyReceived,
    Headers,
    MessageEnded,
    ParseFailed,
    ResponseParser,
    ResponseReceived,
    Upgraded,
    encode_request_head,
)

MAX_BODY: Final = 1 << 20
"""The default bound on a response body (bytes)."""
READ_SIZE: Final = 65536
CLOSED_EARLY: Final = "the connection closed before the answer ended"


class ResponseError(ValueError):
    """The answer is not a usable HTTP/1.1 response; the message says why."""


class ResponseTooLarge(ResponseError):
    """The response body is larger than the caller's bound."""


@dataclass(frozen=True, slots=True)
class Response:
    """A complete answer: the final status (never 1xx), its end-to-end headers, and the body, de-chunked."""

    status: int
    reason: str
    headers: Headers
    """As received, without the framing and hop-by-hop headers (``protocols.http1`` takes those out)."""
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (any case), or None."""
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    @property
    def status_line(self) -> str:
        """``404 Not Found``: the status as error messages show it."""
        return f"{self.status} {self.reason}".rstrip()


def authority(host: str, port: int) -> str:
    """``host:port`` as a Host header writes it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def request(host: str, port: int, method: str, target: str, *, host_header: str | None = None,
                  headers: Sequence[tuple[bytes, bytes]] = (), body: bytes | None = None, timeout: float = 10.0,
                  tls: ssl.SSLContext | None = None, server_hostname: str | None = None, source: str | None = None,
                  limit: int = MAX_BODY,
                  check_peer: Callable[[dict[str, Any] | None], str] | None = None) -> Response:
    """Send one request to ``host:port`` and return the answer.

    ``host_header`` defaults to ``host:port``; ``body`` (even empty) is sent with a Content-Length. ``tls``
    makes it HTTPS, the server's name checked as ``server_hostname`` (default ``host``) when the context checks
    names. ``source`` is the local address to leave from. ``check_peer`` sees the server's certificate first
    and returns why it is refused ("" accepts). Raises as the module says.
    """
    head = encode_request_head(
        method.encode("ascii"), target.encode("latin-1"), (host_header or authority(host, port)).encode("latin-1"),
        (*headers, (b"Connection", b"close")), BODY_NONE if body is None else BODY_LENGTH,
        None if body is None else len(body))
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=tls, server_hostname=server_hostname if tls is not None else None,
                local_addr=(source, 0) if source else None)
            if check_peer is not None:
                problem = check_peer(writer.get_extra_info("peercert"))
                if problem:
                    raise PermissionError(problem)
            writer.write(head + body if body else head)
            await writer.drain()
            return await _read_response(reader, method.upper() == "HEAD", limit)
    except TimeoutError:
        raise TimeoutError(f"no answer within {timeout:g}s") from None
    finally:
        if writer is not None:
            writer.close()


async def _read_response(reader: asyncio.StreamReader, head_only: bool, limit: int) -> Response:
    parser = ResponseParser()
    parser.expect(b"HEAD" if head_only else b"GET")
    final: tuple[int, str, Headers] | None = None
    body = bytearray()
    while True:
        data = await reader.read(READ_SIZE)
        for event in parser.feed(data) if data else parser.feed_eof():
            if isinstance(event, ResponseReceived):
                if event.head.status >= 200:  # 1xx heads are interim: the answer follows them
                    final = (event.head.status, event.head.reason.decode("latin-1"), event.head.headers)
            elif isinstance(event, BodyReceived):
                body += event.data
                if len(body) > limit:
                    raise ResponseTooLarge(f"the answer is larger than {limit} bytes")
            elif isinstance(event, MessageEnded):
                if final is not None:
                    return Response(*final, bytes(body))
            elif isinstance(event, ParseFailed):
                raise ResponseError(CLOSED_EARLY if not data else f"not an HTTP response: {event.reason}")
            elif isinstance(event, Upgraded):
                raise ResponseError("not an HTTP response: the server switched protocols")
        if not data:
            raise ResponseError(CLOSED_EARLY)
