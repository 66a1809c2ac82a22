"""Telemetry of HTTP/2 streams (gRPC included): what ``HttpTap`` does per HTTP/1.x request, per stream.

A ``StreamTap`` belongs to one HTTP/2 client connection (reporter, peer and security are per connection, as
for HTTP/1.x). Each stream gets a ``StreamRecord`` when it arrives; the call that proxies it (``H2Call`` to an
HTTP/2 upstream, ``H1Call`` to an HTTP/1.1 one) feeds it what the client sees — the response head and trailers,
body bytes both ways, the proxy's response flags — and closes it when the stream ends. Closing records the
request in Istio's metrics (with ``request_protocol="grpc"`` and ``grpc_response_status`` for gRPC calls),
ends its span and writes its access log entry.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

from kizuna.protocols.http1 import PEER_HEADER
from kizuna.protocols.http2 import Headers
from kizuna.proxy.errors import add_flag
from kizuna.proxy.h2_routing import header
from kizuna.proxy.telemetry import DESTINATION, REPORTERS, SOURCE, UNKNOWN, UNKNOWN_WORKLOAD
from kizuna.proxy.telemetry_tap import ConnectionTap, start_time
from kizuna.proxy.tracing import Span, replace_trace_headers

if TYPE_CHECKING:
    from kizuna.proxy.errors import SyntheticResponse
    from kizuna.proxy.h2_routing import Routed
    from kizuna.proxy.state import Pool

_REQUEST_ID: Final = b"x-request-id"


class StreamTap(ConnectionTap):
    """Telemetry of one HTTP/2 client connection: a ``StreamRecord`` per stream."""

    __slots__ = ()

    def open(self, headers: Headers) -> tuple[StreamRecord, Headers]:
        """A new stream: its record and its headers, without ``x-kizuna-peer`` (on the destination side
        learnt from; from an app, dropped), and on the destination side its server span opened."""
        authority = header(headers, b":authority") or header(headers, b"host") or b""
        if self.reporter == DESTINATION:
            kept = self.take_peer(headers, authority)
            if kept is not headers:
                headers = list(kept)
        elif any(name == PEER_HEADER for name, _ in headers):
            headers = [(n, v) for n, v in headers if n != PEER_HEADER]  # only sidecars say who calls
        grpc = (header(headers, b"content-type") or b"").startswith(b"application/grpc")
        record = StreamRecord(self, headers, authority, grpc)
        tracer = self.telemetry.tracer
        if tracer is not None and self.reporter == DESTINATION:
            span, record.onward, _ = tracer.begin(headers, "server")
            record.span = span
            if span is not None:
                span.name = f"{record.authority}/*"
                span.attributes = {"http.method": record.method, "http.url": record.path,
                                   "peer.principal": self.principal or "", "component": "proxy"}
        return record, headers


class StreamRecord:
    """One stream's telemetry, from its request head to its end."""

    __slots__ = ("tap", "t0", "method", "path", "authority", "grpc", "request_id", "received", "sent", "status",
                 "grpc_status", "flags", "span", "onward", "cluster", "service", "pool", "closed")

    def __init__(self, tap: StreamTap, headers: Headers, authority: bytes, grpc: bool) -> None:
        self.tap = tap
        self.t0 = time.monotonic()
        self.method = (header(headers, b":method") or b"GET").decode("latin-1")
        self.path = (header(headers, b":path") or b"/").decode("latin-1")
        self.authority = authority.decode("latin-1")
        self.grpc = grpc
        request_id = header(headers, _REQUEST_ID)
        self.request_id = request_id.decode("latin-1") if request_id is not None else None
        self.received = 0
        self.sent = 0
        self.status = 0
        self.grpc_status = ""
        self.flags = ""
        self.span: Span | None = None
        self.onward: tuple[tuple[bytes, bytes], ...] = ()
        """The trace headers the request carries onward (set with its span)."""
        self.cluster = ""
        self.service = ""
        self.pool: Pool | None = None
        self.closed = False

    def upstream(self, headers: Headers, routed: Routed) -> Headers:
        """The request headers as they go upstream: on the source side the caller's ``x-kizuna-peer`` (Services
        of the mesh only) and the client span's trace headers; on the destination side the server span's."""
        tap = self.tap
        telemetry = tap.telemetry
        cluster = routed.dest.cluster.cluster
        self.cluster, self.service = cluster.name, cluster.service
        if self.request_id is None:
            found = header(headers, _REQUEST_ID)
            self.request_id = found.decode("latin-1") if found is not None else None
        extra: Headers = []
        if tap.reporter == SOURCE:
            if cluster.endpoints and telemetry.service(cluster.service)[2] != UNKNOWN:
                extra = [(PEER_HEADER, telemetry.peer_value(cluster.service))]
            tracer = telemetry.tracer
            if tracer is not None:
                span, self.onward, _ = tracer.begin(headers, "client")
                self.span = span
                if span is not None:
                    span.name = f"{cluster.service}:{cluster.port}/*"
                    span.attributes = {"http.method": self.method, "http.url": self.path,
                                       "upstream_cluster": cluster.name, "component": "proxy"}
        if self.onward:
            return [*replace_trace_headers(headers, self.onward), *extra]
        return [*headers, *extra] if extra else headers

    def response(self, headers: Headers) -> None:
        """A header block sent to the client: the response head, or trailers."""
        status = header(headers, b":status")
        if status is not None and status.isdigit():
            self.status = int(status)
        if self.grpc:
            code = header(headers, b"grpc-status")
            if code is not None:
                self.grpc_status = code.decode("latin-1")

    def synthetic(self, response: SyntheticResponse, headers: Headers) -> None:
        """The proxy answered (``headers``: what the client got)."""
        self.flag(response.flag)
        self.response(headers)

    def flag(self, flag: str) -> None:
        self.flags = add_flag(self.flags, flag)

    def close(self) -> None:
        """The stream is over: count it, end its span, log it."""
        if self.closed:
            return
        self.closed = True
        tap = self.tap
        telemetry = tap.telemetry
        if tap.reporter == SOURCE:
            peer = telemetry.endpoint_of(self.pool) if self.pool is not None else UNKNOWN_WORKLOAD
            service = (telemetry.service(self.service) if self.service
                       else tap.service_of_host(self.authority.encode("latin-1")))
        else:
            peer, service = tap.peer, tap.service
        flags = self.flags or "-"
        duration = (time.monotonic() - self.t0) * 1000.0
        grpc = self.grpc_status if self.grpc else None
        span, tracer = self.span, telemetry.tracer
        if span is not None and tracer is not None:
            self.span = None
            extra = {"upstream_host": f"{self.pool.address}:{self.pool.port}"} if self.pool is not None else {}
            if grpc:
                extra["grpc.status_code"] = grpc
            tracer.end(span, self.status, self.flags, **extra)
        telemetry.record_http(tap.reporter, peer, service, self.status, flags, tap.security, duration,
                              self.received, self.sent, grpc)
        log = telemetry.access_log
        if log is not None:
            pool = self.pool
            log.http(start_time(duration), self.method, self.path, "HTTP/2", self.status, flags, self.received,
                     self.sent, round(duration, 3), f"{pool.address}:{pool.port}" if pool is not None else None,
                     self.cluster or None, self.request_id, self.authority, tap.principal, None,
                     REPORTERS[tap.reporter], grpc)
