"""What an HTTP/2 stream router answers (``Routed`` or the proxy's own ``SyntheticResponse``) and how each
becomes HTTP/2: the retry conditions only HTTP/2 has (``grpc-status`` codes, refused streams) and a synthetic
response as HTTP/2 headers, a trailers-only gRPC error for a gRPC request."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Final, Protocol

from kizuna.protocols.http2 import CANCEL, Headers
from kizuna.proxy.errors import SyntheticResponse
from kizuna.proxy.state import Destination

if TYPE_CHECKING:  # route_actions pulls in the HTTP/1.1 exchange; routing only carries its plan
    from kizuna.proxy.route_actions import Plan

GRPC_CODES: Final = {"cancelled": 1, "deadline-exceeded": 4, "resource-exhausted": 8, "internal": 13,
                     "unavailable": 14}
"""Istio retryOn names of gRPC statuses."""
GRPC_UNIMPLEMENTED: Final = 12
GRPC_DEADLINE_EXCEEDED: Final = 4
GRPC_UNAVAILABLE: Final = 14
GRPC_PERMISSION_DENIED: Final = 7
GRPC_UNAUTHENTICATED: Final = 16


@lru_cache(maxsize=256)
def grpc_retry_codes(retry_on: frozenset[str]) -> frozenset[int]:
    """The ``grpc-status`` values a route's retryOn retries."""
    return frozenset(code for name, code in GRPC_CODES.items() if name in retry_on)


class Routed:
    """Where a stream goes: a destination plus the retry conditions only HTTP/2 has, the route policy's
    ``plan`` (None: the request goes as it came), and whether the upstream speaks HTTP/1.1 only."""

    __slots__ = ("dest", "grpc_codes", "refused_stream", "plan", "http1")

    def __init__(self, dest: Destination, retry_on: frozenset[str] = frozenset(), plan: Plan | None = None,
                 http1: bool = False) -> None:
        self.dest = dest
        self.grpc_codes = grpc_retry_codes(retry_on)
        self.refused_stream = "refused-stream" in retry_on
        self.plan = plan
        self.http1 = http1


class StreamSink(Protocol):
    """Where a call's response goes, stream by stream: ``protocols.http2.H2Endpoint`` of the client's
    connection, or an HTTP/1.1 client's writer (``h2_front``)."""

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> None: ...

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> int: ...

    def end_stream(self, stream_id: int) -> None: ...

    def acknowledge(self, stream_id: int, length: int) -> None: ...

    def reset(self, stream_id: int, code: int = CANCEL) -> None: ...


StreamRouter = Callable[[Headers], "Routed | SyntheticResponse"]
"""Request headers (pseudo-headers included) → where the stream goes, or the proxy's own answer."""


def header(headers: Headers, name: bytes) -> bytes | None:
    """The first value of ``name`` (lower-case), if any."""
    for key, value in headers:
        if key == name:
            return value
    return None


def synthetic_headers(response: SyntheticResponse, grpc: bool) -> tuple[Headers, bytes]:
    """``response`` as HTTP/2 headers and body; for a gRPC request a trailers-only gRPC error."""
    extra: Headers = []
    if response.reason:
        extra.append((b"x-kizuna-error", response.reason.encode()))
    if response.flag:
        extra.append((b"x-kizuna-flags", response.flag.encode()))
    own = list(response.headers)
    if grpc:
        if header(own, b"grpc-status") is not None:
            return [(b":status", b"200"), *own, *extra], b""
        # gRPC's mapping of HTTP statuses (as Envoy's local replies): a refusal is PERMISSION_DENIED, a bad
        # token UNAUTHENTICATED; else by the flag.
        flags = response.flag.split(",")
        status = response.status
        code = (GRPC_PERMISSION_DENIED if status == 403 else GRPC_UNAUTHENTICATED if status == 401
                else GRPC_UNIMPLEMENTED if "NR" in flags else GRPC_DEADLINE_EXCEEDED if "UT" in flags
                else GRPC_UNAVAILABLE)
        return [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"%d" % code),
                (b"grpc-message", response.reason.encode()), *extra], b""
    body = response.body if response.body is not None else response.reason.encode() + b"\n"
    if not any(n == b"content-type" for n, _ in own):
        own.append((b"content-type", b"text/plain"))
    return [(b":status", b"%d" % response.status), *own, *extra,
            (b"content-length", b"%d" % len(body))], body


def send_synthetic(h2: StreamSink, stream_id: int, response: SyntheticResponse, grpc: bool) -> None:
    """Answer stream ``stream_id`` with ``response`` (see ``synthetic_headers``), ending it."""
    headers, body = synthetic_headers(response, grpc)
    h2.send_headers(stream_id, headers, end_stream=not body)
    if body:
        h2.send_data(stream_id, body, end_stream=True)
