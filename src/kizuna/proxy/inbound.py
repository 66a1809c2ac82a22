"""Inbound: traffic from other sidecars to this workload, forwarded to the app.

In proxy mode each inbound port has its own listener; with iptables capture every inbound connection arrives
on the capture port and ``info.port`` is the port of its original destination (see ``capture``).

Protocol "http" proxies HTTP/1.1 over a keep-alive pool to the app (HTTP/2 when the connection opens with the
h2 preface, see ``h2``); "tcp" relays bytes; "auto" sniffs the first bytes for a bounded time
(``SNIFF_TIMEOUT``), then proxies HTTP/1.x or HTTP/2 or relays anything else. A
connection that sends nothing first (server-first protocols such as MySQL or SMTP) is relayed once the wait
is over.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import lru_cache
from typing import Final, cast

from kizuna.protocols.http1 import XFCC, RequestHead
from kizuna.protocols.http2 import Headers as H2Headers
from kizuna.protocols.sniff import Detected, sniff
from kizuna.proxy.downstream import HttpServerConnection
from kizuna.proxy.errors import NO_ROUTE, SyntheticResponse
from kizuna.proxy.exchange import HTTP, UPGRADE, Exchange
from kizuna.proxy.h2 import H2Pools, H2ServerConnection
from kizuna.proxy.h2_dispatch import PrefaceSwitch, inbound_router
from kizuna.proxy.h2_front import H2Front
from kizuna.proxy.h2_routing import Routed
from kizuna.proxy.identity import WorkloadIdentity
from kizuna.proxy.inbound_policy import InboundGuard
from kizuna.proxy.listener import ConnectionInfo
from kizuna.proxy.mtls import InboundMtls, late_refusal, log_refusal, strict_reason
from kizuna.proxy.outbound import StateSource
from kizuna.proxy.state import INBOUND_CONNECT_TIMEOUT
from kizuna.proxy.stats import Stats
from kizuna.proxy.tcp import TcpForward

SNIFF_TIMEOUT: Final = 0.1


class InboundDispatcher:
    """Sends every request of one inbound port to the app, as the current snapshot says."""

    __slots__ = ("source", "port", "stats", "counter", "loop", "h2_pools", "guard")

    def __init__(self, source: StateSource, port: int, stats: Stats, loop: asyncio.AbstractEventLoop,
                 h2_pools: H2Pools | None = None, guard: InboundGuard | None = None) -> None:
        self.guard = guard or InboundGuard(stats)
        """JWT and authorization (``inbound_policy``), consulted only when the snapshot has a policy."""
        self.source = source
        self.port = port
        self.stats = stats
        self.counter = stats.inbound_counter(port)
        self.loop = loop
        self.h2_pools = h2_pools
        """For an app that speaks HTTP/2 only: its requests go to it as streams (``h2_front``)."""

    def dispatch(self, down: HttpServerConnection, head: RequestHead) -> Exchange | SyntheticResponse:
        self.stats.inbound_rq_total += 1
        self.counter[0] += 1
        state = self.source.state
        target = state.inbound.get(self.port)
        if target is None or head.method == b"CONNECT":
            return NO_ROUTE
        security = state.snapshot.security
        if security is not None:
            peer_auth = security.peer_authentication
            if peer_auth is not None and peer_auth.mode_for(self.port) == "STRICT" \
                    and plaintext(self.source, down.transport):
                return late_refusal(self.port, peer_auth.source)
            checked = self.guard.check_request(security, head, down.transport, self.port)
            if type(checked) is SyntheticResponse:
                return checked
            head = cast(RequestHead, checked)
        head = self._client_cert(head, down.transport)
        if target.port.http_version == "2" and self.h2_pools is not None and head.upgrade is None:
            return H2Front(down, head, Routed(target.destination), head.target, self.stats, self.loop,
                           self.h2_pools)
        return Exchange(down, head, target.destination, head.target, head.host, self.stats, self.loop,
                        HTTP if head.upgrade is None else UPGRADE)


    def _client_cert(self, head: RequestHead, transport: asyncio.BaseTransport) -> RequestHead:
        """Envoy's ``x-forwarded-client-cert`` (SANITIZE_SET) for the app; a header the client sent itself never
        gets here: the parser drops it."""
        value = client_cert(self.source, transport)
        return head if value is None else head._replace(headers=(*head.headers, (XFCC, value)))


def plaintext(source: StateSource, transport: asyncio.BaseTransport | None) -> bool:
    """A connection without a peer identity on a sidecar that has a certificate (one that has none yet serves
    everything as plaintext)."""
    own = getattr(source, "identity", None)
    return own is not None and own.server_context is not None and transport is not None \
        and transport.get_extra_info("peer_identity") is None


def client_cert(source: StateSource, transport: asyncio.BaseTransport | None) -> bytes | None:
    """Envoy's ``x-forwarded-client-cert`` value on an mTLS connection: the app learns the client's identity
    (``By=<this workload>;URI=<client>``); None without a peer identity."""
    peer = transport.get_extra_info("peer_identity") if transport is not None else None
    if peer is None:
        return None
    own = getattr(source, "identity", None)
    return _client_cert_value(own.spiffe_id if own is not None else "", peer.principal)


@lru_cache(maxsize=256)
def _client_cert_value(own: str, principal: str) -> bytes:
    by = f"By={own};" if own else ""
    return f"{by}URI=spiffe://{principal}".encode()


class SniffingConnection(asyncio.Protocol):
    """Holds a new connection until its first bytes tell HTTP/1.x from anything else, then hands it over."""

    __slots__ = ("make_http", "make_opaque", "make_h2", "wait", "transport", "buffer", "timer")

    def __init__(self, make_http: Callable[[], asyncio.Protocol],
                 make_opaque: Callable[[bytes], asyncio.Protocol], wait: float = SNIFF_TIMEOUT,
                 make_h2: Callable[[], asyncio.Protocol] | None = None) -> None:
        self.make_http = make_http
        self.make_opaque = make_opaque
        self.make_h2 = make_h2
        """Serves a connection opening with the HTTP/2 preface; None: relayed as opaque bytes."""
        self.wait = wait
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.timer = asyncio.get_running_loop().call_later(self.wait, self._hand_over, False)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        detected = sniff(self.buffer)
        if detected is Detected.HTTP2 and self.make_h2 is not None:
            self._hand_over(True, self.make_h2)
        elif detected is not Detected.NEED_MORE:
            self._hand_over(detected is Detected.HTTP1)

    def eof_received(self) -> bool:
        protocol = self._hand_over(sniff(self.buffer) is Detected.HTTP1)
        return bool(protocol is not None and protocol.eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _hand_over(self, http: bool,
                   make: Callable[[], asyncio.Protocol] | None = None) -> asyncio.Protocol | None:
        transport = self.transport
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if transport is None or transport.is_closing():
            return None
        self.transport = None
        protocol = (make or self.make_http)() if http else self.make_opaque(self.buffer)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if http and self.buffer:
            protocol.data_received(self.buffer)
        return protocol


class InboundHandler:
    """Accepted inbound connections → the protocol their port's current setting asks for."""

    __slots__ = ("source", "stats", "registry", "loop", "bind", "h2_pools", "guard", "identity", "_dispatchers")

    def __init__(self, source: StateSource, stats: Stats, registry: set[asyncio.BaseProtocol],
                 loop: asyncio.AbstractEventLoop, bind: str | None = None) -> None:
        self.bind = bind
        """Source address of relayed connections to the app (``127.0.0.6`` with iptables capture)."""
        self.source = source
        self.stats = stats
        self.registry = registry
        self.loop = loop
        self.h2_pools = H2Pools(stats, bind)
        """HTTP/2 connections to the app (h2c and gRPC streams multiplexed)."""
        self.guard = InboundGuard(stats)
        """Inbound JWT and authorization (one JWKS cache across snapshots)."""
        self.identity: WorkloadIdentity | None = None
        """This workload's certificate (set once the sidecar has one): inbound mTLS by PeerAuthentication."""
        self._dispatchers: dict[int, InboundDispatcher] = {}

    def __call__(self, info: ConnectionInfo) -> asyncio.BaseProtocol:
        security = self.source.state.snapshot.security
        identity = self.identity
        context = identity.server_context if identity is not None else None
        if context is not None:
            peer_auth = security.peer_authentication if security is not None else None
            mode = peer_auth.mode_for(info.port) if peer_auth is not None else "PERMISSIVE"
            if mode != "DISABLE":
                reason = strict_reason(info.port, peer_auth.source if peer_auth is not None else "")
                return InboundMtls(lambda: cast(asyncio.Protocol, self._guarded(info)), context,
                                   "STRICT" if mode == "STRICT" else "PERMISSIVE", reason, self.stats.count,
                                   identity.trust_domain if identity is not None else "",
                                   refused=self._refused)
        return self._guarded(info)

    def _refused(self, first: bytes, http: bool, reason: str) -> None:
        """A plaintext connection refused under STRICT: counted (flag NR) and in the access log, with why."""
        log_refusal(self.stats, first, http, reason)

    def _guarded(self, info: ConnectionInfo) -> asyncio.BaseProtocol:
        security = self.source.state.snapshot.security
        if security is None:
            return self._serve(info)
        return self.guard.hold(security, lambda: self._serve(info))

    def _serve(self, info: ConnectionInfo) -> asyncio.BaseProtocol:
        target = self.source.state.inbound.get(info.port)
        if target is None:
            if info.original_dst is not None:
                # Captured traffic for a port the workload does not declare goes to it untouched (Istio's
                # InboundPassthroughCluster), so undeclared ports keep working.
                host, port = info.original_dst
                return TcpForward(host, port, INBOUND_CONNECT_TIMEOUT, self.stats, self.registry,
                                  source=self.bind)
            return Closing()
        if target.protocol == "http":
            return PrefaceSwitch(lambda: self._http(info.port), lambda: self._h2(info.port))
        address, port = target.port.target_address, target.port.target_port
        bind = self.bind

        def opaque(initial: bytes = b"") -> asyncio.Protocol:
            forward = TcpForward(address, port, INBOUND_CONNECT_TIMEOUT, self.stats, self.registry, initial,
                                 source=bind)
            security = self.source.state.snapshot.security
            if security is None or not security.authorization:
                return forward
            return _Authorized(forward, lambda t: self.guard.allows_connection(security, t, info.port),
                               self.stats)

        if target.protocol == "tcp":
            return opaque()
        return SniffingConnection(lambda: self._http(info.port), opaque, make_h2=lambda: self._h2(info.port))

    def _h2(self, port: int) -> H2ServerConnection:
        route = inbound_router(self.source, port, self.stats)
        source, guard = self.source, self.guard

        def guarded(headers: H2Headers) -> Routed | SyntheticResponse:
            # Checked per stream (a policy applied later reaches long-lived gRPC connections too); JWT header
            # changes are made in place, before the stream's call takes ``headers``.
            transport = conn.transport
            security = source.state.snapshot.security
            if security is not None:
                peer_auth = security.peer_authentication
                if peer_auth is not None and peer_auth.mode_for(port) == "STRICT" and plaintext(source, transport):
                    return late_refusal(port, peer_auth.source)
                refused = guard.check_stream(security, headers, transport, port)
                if refused is not None:
                    return refused
            # x-forwarded-client-cert as on HTTP/1.1: the client's own is dropped, the mTLS peer's added.
            if any(name == XFCC for name, _ in headers):
                headers[:] = [(name, value) for name, value in headers if name != XFCC]
            value = client_cert(source, transport)
            if value is not None:
                headers.append((XFCC, value))
            return route(headers)

        conn = H2ServerConnection(guarded, self.h2_pools, self.stats, self.registry)
        return conn

    def _http(self, port: int) -> HttpServerConnection:
        dispatcher = self._dispatchers.get(port)
        if dispatcher is None:
            dispatcher = self._dispatchers[port] = InboundDispatcher(self.source, port, self.stats, self.loop,
                                                                     self.h2_pools, self.guard)
        return HttpServerConnection(dispatcher, self.stats, self.registry)


class _Authorized(asyncio.Protocol):
    """An opaque connection that authorization checks before relaying it: allowed, it becomes ``forward``;
    denied, it is closed (Envoy's RBAC network filter) and counted."""

    __slots__ = ("forward", "allows", "stats")

    def __init__(self, forward: asyncio.Protocol, allows: Callable[[asyncio.BaseTransport], bool],
                 stats: Stats) -> None:
        self.forward = forward
        self.allows = allows
        self.stats = stats

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.allows(transport):
            self.stats.error("rbac access denied")
            transport.close()
            return
        transport.set_protocol(self.forward)
        self.forward.connection_made(transport)


class Closing(asyncio.Protocol):
    """For a connection that raced the removal of its port: closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()
