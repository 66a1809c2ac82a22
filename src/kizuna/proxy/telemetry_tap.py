"""Where a connection meets telemetry: one ``HttpTap`` per HTTP/1.x client connection, ``tcp_opened`` per
relayed TCP connection. Everything that can be worked out once per connection is (reporter, peer principal,
security policy); per request there is a header scan on inbound, a header added on outbound, and a record.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from typing import TYPE_CHECKING, Any, Final

from kizuna.protocols.http1 import PEER_HEADER, RequestHead, split_authority
from kizuna.proxy.access_log import iso_time
from kizuna.proxy.telemetry import (
    DESTINATION,
    REPORTERS,
    SOURCE,
    UNKNOWN,
    UNKNOWN_SERVICE,
    UNKNOWN_WORKLOAD,
    Service,
    Telemetry,
    Workload,
    observe,
)
from kizuna.proxy.tracing import Headers, Span, strip_trace_headers

if TYPE_CHECKING:
    from kizuna.proxy.errors import SyntheticResponse
    from kizuna.proxy.exchange import Exchange

_PEER_LEN: Final = len(PEER_HEADER)
_REQUEST_ID: Final = b"x-request-id"


def _trusted_address(transport: asyncio.BaseTransport) -> bool:
    """A plaintext peer whose ``x-kizuna-peer`` is believed: a loopback source (proxy mode on one host)."""
    peer = transport.get_extra_info("peername")
    try:
        return peer is not None and ipaddress.ip_address(peer[0]).is_loopback
    except ValueError:
        return False


class ConnectionTap:
    """What telemetry works out once per client connection, whatever its protocol: reporter, peer principal,
    security policy, and (destination side) who calls, from the client sidecar's ``x-kizuna-peer``."""

    __slots__ = ("telemetry", "reporter", "principal", "security", "trusted", "peer", "service", "_last",
                 "_host", "_host_service", "remote")

    def __init__(self, telemetry: Telemetry, transport: asyncio.BaseTransport) -> None:
        self.telemetry = telemetry
        self.reporter = telemetry.reporter_of(transport)
        identity = transport.get_extra_info("peer_identity")
        self.principal: str | None = identity.principal if identity is not None else None
        if self.reporter == SOURCE:
            self.security = UNKNOWN  # Istio's source reporter does not know the server's policy
            self.trusted = False
        else:
            self.security = "mutual_tls" if self.principal is not None else "none"
            self.trusted = self.principal is not None or _trusted_address(transport)
        self.peer: Workload = telemetry.source_only(self.principal) if self.reporter == DESTINATION \
            else UNKNOWN_WORKLOAD
        self.service: Service = UNKNOWN_SERVICE
        self._last: bytes | None = None
        self._host: bytes | None = None
        self._host_service = UNKNOWN_SERVICE
        peer = transport.get_extra_info("peername")
        self.remote = f"{peer[0]}:{peer[1]}" if peer else ""

    def take_peer(self, headers: Headers, host: bytes) -> Headers:
        """Destination side: ``headers`` without the client sidecar's ``x-kizuna-peer`` (learnt from when the
        connection is trusted); without one, the service is the one ``host`` names."""
        for i, (name, value) in enumerate(headers):
            if len(name) == _PEER_LEN and name.lower() == PEER_HEADER:
                self.learn_peer(value, host)
                return (*headers[:i], *headers[i + 1:])
        self.learn_peer(None, host)
        return headers

    def learn_peer(self, value: bytes | None, host: bytes) -> None:
        """Destination side: who calls, from the client sidecar's ``x-kizuna-peer`` value (believed when the
        connection is trusted); without one, the service is the one ``host`` names."""
        if value is None:
            if self._last is None:
                self.service = self.service_of_host(host)
        elif value != self._last and self.trusted:
            self.peer, self.service = self.telemetry.peer_from_header(value, self.principal)
            self._last = value

    def service_of_host(self, host: bytes) -> Service:
        if host == self._host:
            return self._host_service
        try:
            name = split_authority(host, 80)[0] if host else ""
        except ValueError:
            name = ""
        if name and "." not in name:
            name = f"{name}.{self.telemetry.local[1]}.svc.cluster.local"  # a short name is a local service
        self._host, self._host_service = host, self.telemetry.service(name)
        return self._host_service


class HttpTap(ConnectionTap):
    """Telemetry of one HTTP/1.x client connection."""

    __slots__ = ("span", "_onward", "_out_cluster", "_out_extra", "_dest_key", "_dest", "_series_key", "_series")

    def __init__(self, telemetry: Telemetry, transport: asyncio.BaseTransport) -> None:
        super().__init__(telemetry, transport)
        self.span: Span | None = None
        """The traced request in progress on this connection (HTTP/1.x: one at a time)."""
        self._onward: tuple[tuple[bytes, bytes], ...] = ()
        """Destination side: the trace headers ``inbound`` chose for the request being routed."""
        # A connection's requests mostly go the same way and end the same way: what was worked out for the
        # last one is kept (compared by identity) so the next costs no lookups.
        self._out_cluster: object = None
        self._out_extra: tuple[tuple[bytes, bytes], ...] = ()
        self._dest_key: tuple[object, object] | None = None
        self._dest: tuple[Workload, Service] = (UNKNOWN_WORKLOAD, UNKNOWN_SERVICE)
        self._series_key: tuple[Any, ...] | None = None
        self._series: list[float] = []

    # -- per request ----------------------------------------------------------------------------------------

    def inbound(self, head: RequestHead) -> RequestHead:
        """Destination side, before routing: who calls (the client sidecar's ``x-kizuna-peer``, which the parser
        lifted out of the headers), and the server span (the request's own trace headers dropped: ``routed``
        adds the span's)."""
        self.learn_peer(head.peer, head.host)
        tracer = self.telemetry.tracer
        if tracer is not None:
            span, self._onward, carried = tracer.begin(head.headers, "server")
            self.span = span
            if span is not None:
                span.name = f"{head.host.decode('latin-1')}/*"
                span.attributes = {"http.method": head.method.decode("latin-1"),
                                   "http.url": head.target.decode("latin-1"),
                                   "peer.principal": self.principal or "", "component": "proxy"}
            if carried:
                head = head._replace(headers=strip_trace_headers(head.headers))
        return head

    def routed(self, exchange: Exchange) -> None:
        """A request on its way: on the destination side with the server span's trace headers; on the source
        side with the client span's, and telling the server sidecar who calls (Services of the mesh only: never a
        ServiceEntry's external host)."""
        if self.reporter == DESTINATION:
            if self._onward:
                exchange.extra += self._onward
            return
        cluster = exchange.dest.cluster.cluster
        if cluster is not self._out_cluster:
            self._out_cluster = cluster
            self._out_extra = (((PEER_HEADER, self.telemetry.peer_value(cluster.service)),)
                               if cluster.endpoints and self.telemetry.service(cluster.service)[2] != UNKNOWN
                               else ())
        if self._out_extra:
            exchange.extra += self._out_extra
        tracer = self.telemetry.tracer
        if tracer is not None:
            head = exchange.head
            span, onward, carried = tracer.begin(head.headers, "client")
            self.span = span
            if span is not None:
                span.name = f"{cluster.service}:{cluster.port}/*"
                span.attributes = {"http.method": head.method.decode("latin-1"),
                                   "http.url": exchange.target.decode("latin-1"), "upstream_cluster": cluster.name,
                                   "component": "proxy"}
            if carried:
                exchange.head = head._replace(headers=strip_trace_headers(head.headers))
            exchange.extra += onward

    def done(self, exchange: Exchange, status: int = 0, flags: str = "") -> None:
        """Record a finished exchange (``status`` given: a synthetic answer in its place)."""
        telemetry = self.telemetry
        cluster = exchange.dest.cluster
        if self.reporter == SOURCE:
            pool = exchange.last
            if self._dest_key is None or self._dest_key[0] is not pool or self._dest_key[1] is not cluster:
                self._dest_key = (pool, cluster)
                self._dest = (telemetry.endpoint_of(pool), telemetry.service(cluster.cluster.service))
            peer, service = self._dest
        else:
            peer, service = self.peer, self.service
        code = status or exchange.status
        flags = flags or exchange.flags
        if not flags and exchange.tried and code in exchange.dest.retry.retriable_statuses:
            flags = "URX"  # retries spent, the last try's answer passed on (the exchange's x-kizuna-flags)
        if self.span is not None:
            self._end_span(code, flags, exchange)
        head = exchange.head
        received = head.content_length if head.content_length is not None else exchange.body_size
        duration = (exchange.loop.time() - exchange.t0) * 1000.0
        key = self._series_key
        if key is None or key[0] is not peer or key[1] is not service or key[2] != code or key[3] != flags:
            self._series_key = (peer, service, code, flags)
            self._series = telemetry.http_series(self.reporter, peer, service, code, flags or "-", self.security)
        observe(self._series, duration, received, exchange.sent)
        log = telemetry.access_log
        if log is not None:
            pool = exchange.last
            log.http(start_time(duration), head.method.decode("latin-1"), head.target.decode("latin-1"),
                     "HTTP/" + head.version.decode("latin-1"), code, flags or "-", received, exchange.sent,
                     round(duration, 3), f"{pool.address}:{pool.port}" if pool is not None else None,
                     cluster.name, _request_id(head, exchange.extra), head.host.decode("latin-1"),
                     self.principal, None, REPORTERS[self.reporter], None)

    def refused(self, head: RequestHead, response: SyntheticResponse) -> None:
        """Record a request answered before any exchange (no route, fault abort, denied ...)."""
        telemetry = self.telemetry
        if self.reporter == SOURCE:
            peer, service = UNKNOWN_WORKLOAD, self.service_of_host(head.host or head.target)
        else:
            peer, service = self.peer, self.service
        flags = response.flag or "-"
        self._end_span(response.status, response.flag)
        telemetry.record_http(self.reporter, peer, service, response.status, flags, self.security, 0.0,
                              head.content_length or 0, 0)
        log = telemetry.access_log
        if log is not None:
            log.http(start_time(0.0), head.method.decode("latin-1"), head.target.decode("latin-1"),
                     "HTTP/" + head.version.decode("latin-1"), response.status, flags,
                     head.content_length or 0, 0, 0.0, None, None, _request_id(head, ()),
                     head.host.decode("latin-1"), self.principal, None, REPORTERS[self.reporter], None)

    # -- helpers ----------------------------------------------------------------------------------------------

    def _end_span(self, status: int, flags: str, exchange: Exchange | None = None) -> None:
        span, tracer = self.span, self.telemetry.tracer
        if span is None or tracer is None:
            return
        self.span = None
        pool = exchange.last if exchange is not None else None
        tracer.end(span, status, flags if flags != "-" else "",
                   **({"upstream_host": f"{pool.address}:{pool.port}"} if pool is not None else {}))


def start_time(duration_ms: float) -> str:
    """The access log's start time of a request that took ``duration_ms`` and ended now."""
    return iso_time(time.time() - duration_ms / 1000.0)


def _request_id(head: RequestHead, extra: Any) -> str | None:
    for name, value in (*extra, *head.headers) if head.has_request_id else extra:
        if name.lower() == _REQUEST_ID:
            return str(value.decode("latin-1"))
    return None


class TcpRecord:
    """One relayed TCP connection's telemetry: its series, and an access log entry once both sides closed."""

    __slots__ = ("telemetry", "series", "reporter", "principal", "upstream", "t0", "received", "sent", "open")

    def __init__(self, telemetry: Telemetry, transport: asyncio.BaseTransport, host: str, port: int) -> None:
        self.telemetry = telemetry
        self.reporter = telemetry.reporter_of(transport)
        identity = transport.get_extra_info("peer_identity")
        self.principal: str | None = identity.principal if identity is not None else None
        if self.reporter == SOURCE:
            peer, security = telemetry.endpoint_at(host, port), UNKNOWN
            service = telemetry.service_at(host, port)
        else:
            peer, security = telemetry.source_only(self.principal), "mutual_tls" if self.principal else "none"
            service = telemetry.local_service(port)
        self.series = telemetry.tcp_series(self.reporter, peer, service, security)
        self.series[0] += 1
        self.upstream = f"{host}:{port}"
        self.t0 = time.time()
        self.received = self.sent = 0
        self.open = 2

    def closed(self, downstream: bool, nbytes: int) -> None:
        """One side's connection is gone, having read ``nbytes`` (downstream: received; upstream: sent)."""
        series = self.series
        if downstream:
            self.received = nbytes
            series[1] += 1
            series[3] += nbytes
        else:
            self.sent = nbytes
            series[2] += nbytes
        self.open -= 1
        log = self.telemetry.access_log
        if self.open == 0 and log is not None:
            log.tcp(iso_time(self.t0), "TCP", "-", self.received, self.sent,
                    round((time.time() - self.t0) * 1000.0, 3), self.upstream, None, self.principal,
                    REPORTERS[self.reporter])
