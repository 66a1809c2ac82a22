"""Which HTTP/2 streams go where: outbound by ``:authority`` through the router, inbound to the local app, at an
ingress gateway by ``:authority`` on the listener's port after its end-user policies; and the switch that serves
a client-first connection as HTTP/2 when it opens with the h2 preface."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, cast

from kizuna.protocols.http1 import split_authority
from kizuna.protocols.http2 import Headers
from kizuna.protocols.sniff import H2_PREFACE
from kizuna.proxy.errors import CLUSTER_NOT_FOUND, MALFORMED_REQUEST, NO_ROUTE, SyntheticResponse
from kizuna.proxy.h2_policy import regular
from kizuna.proxy.h2_routing import Routed, StreamRouter, header
from kizuna.proxy.headers import forwarded_proto
from kizuna.proxy.inbound_policy import InboundGuard
from kizuna.proxy.outbound import OutboundDispatcher, StateSource
from kizuna.proxy.route_actions import plan
from kizuna.proxy.router import HeadersWithClaims
from kizuna.proxy.state import ProxyState
from kizuna.proxy.stats import Stats


def outbound_router(source: StateSource, outbound: OutboundDispatcher,
                    dst: tuple[str, int] | None = None) -> StreamRouter:
    """Streams of an outbound connection: virtual host by ``:authority`` (else, when captured, by the VIP the
    connection was going to ``dst``), then the first matching route and its weighted cluster."""

    def route(headers: Headers) -> Routed | SyntheticResponse:
        state = source.state
        outbound.stats.outbound_rq_total += 1
        authority = header(headers, b":authority") or header(headers, b"host") or b""
        default_port = dst[1] if dst is not None else 80
        try:
            host, port = split_authority(authority, default_port) if authority else ("", default_port)
        except ValueError:
            return MALFORMED_REQUEST
        router = state.router
        if dst is not None and (not host or router.virtual_host(host, port) is None):
            vh = outbound.virtual_host_at(state, dst)
            if vh is not None:
                host, port = vh.hosts[0], vh.port
        return _select(state, headers, host, port, authority)

    return route


def gateway_router(source: StateSource, outbound: OutboundDispatcher, port: int, guard: InboundGuard,
                   transport: Callable[[], asyncio.BaseTransport | None]) -> StreamRouter:
    """Streams of an ingress gateway listener on ``port``, each as the gateway's HTTP/1.1 requests: JWT and
    authorization of the policies selecting the gateway (``transport()``: the connection, for source and
    peer), then the virtual host by ``:authority`` (a port in it ignored) on ``port``, with the verified
    token's claims for ``@request.auth.claims`` matches."""

    def route(headers: Headers) -> Routed | SyntheticResponse:
        state = source.state
        claims = None
        security = state.snapshot.security
        if security is not None and security.enforces_requests:
            pseudo = [(k, v) for k, v in headers if k[:1] == b":"]
            found = dict(pseudo)
            checked = guard.compiled(security).check(
                found.get(b":method", b"GET"), found.get(b":path", b"/"), found.get(b":authority", b""),
                tuple((k, v) for k, v in headers if k[:1] != b":"), transport(), port)
            if isinstance(checked, SyntheticResponse):
                return checked
            if checked.changed:  # in place: the stream's call takes ``headers`` after routing
                headers[:] = pseudo + list(checked.headers)
            if checked.identity is not None:
                claims = checked.identity.claims
        outbound.stats.outbound_rq_total += 1
        if header(headers, b":method") == b"CONNECT":
            return NO_ROUTE
        headers[:] = forwarded_proto(headers, transport())
        authority = header(headers, b":authority") or header(headers, b"host") or b""
        try:
            host = split_authority(authority, port)[0] if authority else ""
        except ValueError:
            return MALFORMED_REQUEST
        return _select(state, headers, host, port, authority, claims)

    return route


def _select(state: ProxyState, headers: Headers, host: str, port: int, authority: bytes,
            claims: Mapping[str, Any] | None = None) -> Routed | SyntheticResponse:
    """The (host, port) virtual host's first matching route for a stream, with its policy's plan. As for an
    HTTP/1.1 request, the headers are decoded for matching only when the virtual host's routes look at them."""
    router = state.router
    selected = router.unconditional(host, port)
    view = None
    method = (header(headers, b":method") or b"GET").decode("latin-1")
    path = (header(headers, b":path") or b"/").decode("latin-1")
    if selected is None:
        view = _view(headers, authority, claims)
        selected = router.select(host, port, method, path, view)
        if selected is None:
            return NO_ROUTE
    retry_on = selected.action.retry.retry_on
    policy = selected.action.policy
    if policy is not None:
        scheme = header(headers, b":scheme") or b"http"
        planned = plan(state, selected, policy, method.encode("latin-1"), regular(headers), scheme, port,
                       path.encode("latin-1"), authority, view or _view(headers, authority, claims))
        if isinstance(planned, SyntheticResponse):
            return planned
        return Routed(planned.dest, retry_on, planned, planned.dest.cluster.cluster.http_version == "1.1")
    dest = state.destination(selected)
    if dest is None:
        return CLUSTER_NOT_FOUND
    return Routed(dest, retry_on, None, dest.cluster.cluster.http_version == "1.1")


def _view(headers: Headers, authority: bytes, claims: Mapping[str, Any] | None) -> HeadersWithClaims:
    """A stream's regular headers by lower-case name (repeated ones joined with ``,``), for route matching."""
    view = HeadersWithClaims({"host": authority.decode("latin-1")}, claims)
    for name, value in headers:
        if name[:1] != b":":
            key, text = name.decode("latin-1"), value.decode("latin-1")
            view[key] = f"{view[key]},{text}" if key in view else text
    return view


def inbound_router(source: StateSource, port: int, stats: Stats) -> StreamRouter:
    """Streams of an inbound port: all to the local app, no retries."""

    def route(headers: Headers) -> Routed | SyntheticResponse:
        stats.inbound_rq_total += 1
        stats.inbound_counter(port)[0] += 1
        target = source.state.inbound.get(port)
        if target is None:
            return NO_ROUTE
        return Routed(target.destination, http1=target.port.http_version == "1.1")

    return route


class PrefaceSwitch(asyncio.Protocol):
    """A client-first connection served as HTTP/2 when its first bytes are the h2 preface, else HTTP/1.x."""

    __slots__ = ("make_http1", "make_h2", "transport", "buffer")

    def __init__(self, make_http1: Callable[[], asyncio.Protocol], make_h2: Callable[[], asyncio.Protocol]):
        self.make_http1 = make_http1
        self.make_h2 = make_h2
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        size = min(len(self.buffer), len(H2_PREFACE))
        if self.buffer[:size] == H2_PREFACE[:size] and size < len(H2_PREFACE):
            return  # could still be the preface
        self._hand_over(self.buffer[:len(H2_PREFACE)] == H2_PREFACE)

    def eof_received(self) -> bool:
        protocol = self._hand_over(False)
        return bool(protocol is not None and protocol.eof_received())

    def _hand_over(self, h2: bool) -> asyncio.Protocol | None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return None
        self.transport = None
        protocol = self.make_h2() if h2 else self.make_http1()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.buffer:
            protocol.data_received(self.buffer)
        return protocol
