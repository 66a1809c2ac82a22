"""Connections captured by iptables REDIRECT: what serves each one, chosen by its original destination.

Outbound (port 15001): a connection to a service VIP:port takes that service's protocol (``http`` or ``tcp``);
anything else is sniffed for a bounded time. HTTP/1.x is routed per request by Host (``outbound``); opaque
TCP to a VIP:port goes to a balanced endpoint of the service's route, and to any other address it passes
through untouched (Istio's ALLOW_ANY) or, with REGISTRY_ONLY, is closed at once. A connection that was not
redirected (an app dialling 15001 itself, ``HTTP_PROXY`` style) is served as in proxy mode, and the sidecar
never dials its own capture ports.

Inbound (port 15006): the original destination is ``pod_ip:port``; the port's inbound setting serves it as
in proxy mode, undeclared ports pass through to the app (see ``inbound``). Connections to the app leave
from ``127.0.0.6`` so the pod's rules do not capture them again (``passthrough``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Collection
from typing import Final

from kizuna.protocols.http1 import RequestHead
from kizuna.proxy.downstream import HttpServerConnection
from kizuna.proxy.errors import SyntheticResponse
from kizuna.proxy.exchange import Exchange
from kizuna.proxy.h2 import H2Pools, H2ServerConnection
from kizuna.proxy.h2_dispatch import PrefaceSwitch, outbound_router
from kizuna.proxy.inbound import InboundHandler, SniffingConnection
from kizuna.proxy.listener import ConnectionInfo
from kizuna.proxy.outbound import NOT_IN_REGISTRY, OutboundDispatcher, StateSource
from kizuna.proxy.passthrough import PASSTHROUGH_CONNECT_TIMEOUT, Passthrough
from kizuna.proxy.sni import SniWait, has_sni_routes, route_for_sni
from kizuna.proxy.state import ClusterState, Pool, ProxyState
from kizuna.proxy.stats import Stats
from kizuna.proxy.tcp import TCP_IDLE_TIMEOUT, TcpForward
from kizuna.proxy.tunnel_http import OpenedTunnel
from kizuna.proxyconfig.model import VirtualHost

PASSTHROUGH: Final = "PASSTHROUGH"
SNIFF_TIMEOUT: Final = 0.1
"""How long an outbound connection of unknown protocol may stay silent before it is relayed as opaque TCP
(server-first protocols such as MySQL or SMTP send nothing first)."""


class OwnPorts:
    """This sidecar's own listening ports on its own addresses (the pod address and loopback): a connection
    going there was not redirected, and a destination there must never be dialled (it would loop)."""

    __slots__ = ("addresses", "ports")

    def __init__(self, addresses: Collection[str], ports: Collection[int]) -> None:
        self.addresses = frozenset(addresses) | {"0.0.0.0"}
        self.ports = frozenset(ports)

    def __contains__(self, dst: object) -> bool:
        if not isinstance(dst, tuple) or len(dst) != 2:
            return False
        address, port = dst
        return port in self.ports and (address in self.addresses or str(address).startswith("127."))


class Closing(asyncio.Protocol):
    """A connection nothing may serve: closed at once (opaque TCP has no way to say why)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _CapturedHttp:
    """The dispatcher of one captured HTTP connection: remembers where the connection was going."""

    __slots__ = ("outbound", "dst", "passthrough")

    def __init__(self, outbound: OutboundDispatcher, dst: tuple[str, int], passthrough: Passthrough | None):
        self.outbound = outbound
        self.dst = dst
        self.passthrough = passthrough

    def dispatch(self, down: HttpServerConnection,
                 head: RequestHead) -> Exchange | SyntheticResponse | OpenedTunnel:
        return self.outbound.dispatch_captured(down, head, self.dst, self.passthrough)


class OutboundCapture:
    """Accepted connections of the outbound capture listener → the protocol serving them."""

    __slots__ = ("source", "outbound", "passthrough", "stats", "registry", "own", "h2_pools")

    def __init__(self, source: StateSource, outbound: OutboundDispatcher, passthrough: Passthrough,
                 stats: Stats, registry: set[asyncio.BaseProtocol], own: OwnPorts,
                 h2_pools: H2Pools | None = None) -> None:
        self.h2_pools = h2_pools or H2Pools(stats)
        self.source = source
        self.outbound = outbound
        self.passthrough = passthrough
        self.stats = stats
        self.registry = registry
        self.own = own

    def __call__(self, info: ConnectionInfo) -> asyncio.BaseProtocol:
        dst = info.original_dst
        if dst is None or dst in self.own:
            # Not redirected: the app dialled the sidecar itself (HTTP_PROXY style). Serve HTTP by Host;
            # passing through would connect back to this listener.
            return HttpServerConnection(self.outbound, self.stats, self.registry)
        state = self.source.state
        vh = self.outbound.virtual_host_at(state, dst)
        if vh is not None and vh.protocol == "http":
            return PrefaceSwitch(lambda: self._http(dst), lambda: self._h2(dst))
        if vh is not None and vh.protocol == "tcp":
            return self._opaque(dst)
        # HTTP/2 is proxied per stream only to a known service; to anything else it passes through as bytes.
        return SniffingConnection(lambda: self._http(dst), lambda initial: self._opaque(dst, initial),
                                  SNIFF_TIMEOUT, make_h2=(lambda: self._h2(dst)) if vh is not None else None)

    def _h2(self, dst: tuple[str, int]) -> H2ServerConnection:
        return H2ServerConnection(outbound_router(self.source, self.outbound, dst), self.h2_pools, self.stats,
                                  self.registry)

    def _http(self, dst: tuple[str, int]) -> HttpServerConnection:
        return HttpServerConnection(_CapturedHttp(self.outbound, dst, self.passthrough), self.stats,
                                    self.registry)

    def _opaque(self, dst: tuple[str, int], initial: bytes = b"") -> asyncio.Protocol:
        state = self.source.state  # as of the handover: the connection keeps this choice to its end
        vh = self.outbound.virtual_host_at(state, dst)
        if vh is None and state.snapshot.outbound_policy == "REGISTRY_ONLY":
            self.stats.error(NOT_IN_REGISTRY.reason)
            return Closing()
        if vh is None:
            return TcpForward(dst[0], dst[1], PASSTHROUGH_CONNECT_TIMEOUT, self.stats, self.registry, initial)
        if has_sni_routes(vh):
            return SniWait(lambda sni, data: self._forward(state, vh, dst, data, sni), initial)
        return self._forward(state, vh, dst, initial)

    def _forward(self, state: ProxyState, vh: VirtualHost, dst: tuple[str, int], initial: bytes,
                 sni: str | None = None) -> asyncio.Protocol:
        endpoint = tcp_cluster(state, vh, sni)
        if endpoint is None:
            self.stats.error("no healthy upstream")
            return Closing()
        if isinstance(endpoint, str):  # a ServiceEntry with resolution NONE: where the app was connecting
            return TcpForward(dst[0], dst[1], PASSTHROUGH_CONNECT_TIMEOUT, self.stats, self.registry, initial)
        pool, cluster = endpoint
        return forward_to(pool, cluster, self.stats, self.registry, initial)


def forward_to(pool: Pool, cluster: ClusterState, stats: Stats, registry: set[asyncio.BaseProtocol],
               initial: bytes = b"") -> TcpForward:
    """Relay an accepted connection to ``pool`` (an endpoint of ``cluster``) under the cluster's
    ``connectionPool.tcp``: connect timeout, ``maxConnections``, idle timeout and maximum duration."""
    policy = cluster.cluster.connection_pool
    idle = TCP_IDLE_TIMEOUT if policy.tcp_idle_timeout is None else policy.tcp_idle_timeout
    return TcpForward(pool.address, pool.port, cluster.connect_timeout, stats, registry, initial, load=pool,
                      circuit=cluster.circuit, idle_timeout=idle, max_duration=policy.max_connection_duration)


def tcp_cluster(state: ProxyState, vh: VirtualHost, sni: str | None = None
                ) -> tuple[Pool, ClusterState] | str | None:
    """Opaque TCP to a service: with an ``sni``, the route for it (see ``sni``); else its first route that
    takes any request (TCP has no path or headers to match), else its first route; then the weighted cluster
    and a balanced endpoint (``PASSTHROUGH`` for a cluster that sends to the original destination)."""
    if sni is not None:
        route = route_for_sni(vh.routes, sni)
    else:
        route = next((r for r in vh.routes if not r.matches), vh.routes[0] if vh.routes else None)
    if route is None:
        return None
    dest = state.destination(route)
    if dest is None:
        return None
    if dest.cluster.cluster.lb_policy == PASSTHROUGH:
        return PASSTHROUGH
    pool = dest.cluster.balancer.pick()
    if pool is None:
        return None
    return pool, dest.cluster


class InboundCapture:
    """Accepted connections of the inbound capture listener → the inbound handler, by original port."""

    __slots__ = ("handler", "own")

    def __init__(self, handler: InboundHandler, own: OwnPorts) -> None:
        self.handler = handler
        self.own = own

    def __call__(self, info: ConnectionInfo) -> asyncio.BaseProtocol:
        dst = info.original_dst
        if dst is None or dst in self.own:
            return Closing()  # dialled directly, or a loop: there is no app port to forward to
        return self.handler(dataclasses.replace(info, port=dst[1]))
