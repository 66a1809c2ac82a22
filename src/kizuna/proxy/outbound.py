"""Outbound: what the app sends out through its sidecar (``HTTP_PROXY`` → ``mesh_address:15001``).

Requests arrive in absolute form (``GET http://httpbin:8000/headers``): the service and port come from the
URI (else from Host; no port means 80), the request goes upstream in origin form with Host kept. Each request
is routed by the snapshot current when it arrives: virtual host → route → weighted cluster → exchange, which
balances over the cluster's endpoints. ``CONNECT host:port`` tunnels raw TCP to an endpoint of that service.

With iptables capture, requests arrive in origin form on a connection whose original destination is known
(``dispatch_captured``): Host names the service (no port in Host means the original destination's port); a
Host that names no service falls back to the service whose VIP:port the connection was going to; with
neither, the request passes through to the original destination (Istio's ALLOW_ANY).

With ``outboundTrafficPolicy`` REGISTRY_ONLY (``Snapshot.outbound_policy``), a request for a destination the
snapshot does not know gets ``502 destination not in registry`` (flag NR, counted under Envoy's
``BlackHoleCluster``) instead: in capture mode in place of the passthrough, in proxy mode in place of the 404
"no route" an unknown host gets under ALLOW_ANY (proxy mode never passes through: an absolute URI names no
address the sidecar could safely dial).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

from kizuna.protocols.http1 import RequestHead, split_absolute_target, split_authority
from kizuna.proxy.downstream import HttpServerConnection
from kizuna.proxy.errors import CLUSTER_NOT_FOUND, MALFORMED_REQUEST, NO_ROUTE, SyntheticResponse
from kizuna.proxy.exchange import CONNECT, HTTP, UPGRADE, Exchange
from kizuna.proxy.h2_front import H2Front
from kizuna.proxy.h2_routing import Routed
from kizuna.proxy.passthrough import Passthrough
from kizuna.proxy.route_actions import act
from kizuna.proxy.sni import has_sni_routes, route_for_sni
from kizuna.proxy.state import ProxyState
from kizuna.proxy.stats import Stats
from kizuna.proxy.tunnel_http import OpenedTunnel, ServeTunnel
from kizuna.proxyconfig.model import VirtualHost

if TYPE_CHECKING:
    from kizuna.proxy.h2 import H2Pools

AUTHORITY_CACHE_SIZE: Final = 1024
BLACK_HOLE_CLUSTER: Final = "BlackHoleCluster"
"""Envoy/Istio's name for where REGISTRY_ONLY sends unknown destinations; /stats counts them under it."""
NOT_IN_REGISTRY: Final = SyntheticResponse(502, "destination not in registry", "NR")
"""REGISTRY_ONLY: the destination is no service, ServiceEntry or VIP of the snapshot."""


class StateSource(Protocol):
    """Where dispatchers read the current snapshot-derived state (the sidecar)."""

    state: ProxyState


class HeaderView(Mapping[str, str]):
    """A request's headers by lower-case name for route matching, built only if a match looks; ``claims``:
    the verified JWT's claims at a gateway (what ``@request.auth.claims`` matches read; see ``router``)."""

    __slots__ = ("_head", "_authority", "_map", "claims")

    def __init__(self, head: RequestHead, authority: bytes, claims: Mapping[str, Any] | None = None) -> None:
        self._head = head
        self._authority = authority
        self._map: dict[str, str] | None = None
        self.claims = claims

    def _build(self) -> dict[str, str]:
        if self._map is None:
            found = {"host": self._authority.decode("latin-1")}
            for name, value in self._head.headers:
                key, text = name.decode("latin-1").lower(), value.decode("latin-1")
                found[key] = f"{found[key]},{text}" if key in found else text
            self._map = found
        return self._map

    def __getitem__(self, key: str) -> str:
        return self._build()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._build())

    def __len__(self) -> int:
        return len(self._build())


class OutboundDispatcher:
    """Routes each request of the outbound listener."""

    __slots__ = ("source", "stats", "loop", "h2_pools", "serve_tunnel", "_authorities", "_vip_state", "_vips",
                 "_blocks")

    def __init__(self, source: StateSource, stats: Stats, loop: asyncio.AbstractEventLoop) -> None:
        self.source = source
        self.stats = stats
        self.loop = loop
        self.h2_pools: H2Pools | None = None
        """h2c connections to HTTP/2-only destinations without a sidecar (set by the sidecar)."""
        self.serve_tunnel: ServeTunnel | None = None
        """Serves what an app sends inside a CONNECT tunnel to an HTTP port (set by a proxy-mode sidecar; None:
        every tunnel is a raw relay). See ``tunnel_http``."""
        # Apps call the same few services over and over: remember how their authorities split.
        self._authorities: dict[tuple[bytes, bytes], tuple[str, int]] = {}
        self._vip_state: ProxyState | None = None
        self._vips: dict[tuple[str, int], VirtualHost] = {}
        self._blocks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int, VirtualHost]] = []

    def virtual_host_at(self, state: ProxyState, address: tuple[str, int]) -> VirtualHost | None:
        """The virtual host whose service VIP and port are ``address`` (index rebuilt once per snapshot)."""
        if state is not self._vip_state:
            vips: dict[tuple[str, int], VirtualHost] = {}
            blocks = []
            for vh in state.snapshot.virtual_hosts:
                for vip in vh.addresses:
                    if "/" in vip:
                        blocks.append((ipaddress.ip_network(vip, strict=False), vh.port, vh))
                    else:
                        vips.setdefault((vip, vh.port), vh)
            blocks.sort(key=lambda b: -b[0].prefixlen)  # the longest prefix first
            self._vips, self._blocks, self._vip_state = vips, blocks, state
        found = self._vips.get(address)
        if found is None and self._blocks:
            ip = ipaddress.ip_address(address[0])
            found = next((vh for net, port, vh in self._blocks if port == address[1] and ip in net), None)
        return found

    def black_hole(self) -> SyntheticResponse:
        """REGISTRY_ONLY's answer to an unknown destination, counted as a 5xx of ``BlackHoleCluster``."""
        self.stats.flag(NOT_IN_REGISTRY.flag)
        self.stats.cluster_counters(BLACK_HOLE_CLUSTER)[4] += 1
        return NOT_IN_REGISTRY

    def dispatch(self, down: HttpServerConnection,
                 head: RequestHead) -> Exchange | SyntheticResponse | OpenedTunnel:
        self.stats.outbound_rq_total += 1
        state = self.source.state
        if head.method == b"CONNECT":
            return self._tunnel(down, head, state)
        target = head.target
        if target[:1] == b"/":
            authority, path, scheme = head.host, target, b"http"
        else:
            try:
                scheme, authority, path = split_absolute_target(target)
            except ValueError:
                return MALFORMED_REQUEST
        key = (authority, scheme)
        host_port = self._authorities.get(key)
        if host_port is None:
            try:
                host_port = split_authority(authority, 443 if scheme == b"https" else 80)
            except ValueError:
                return MALFORMED_REQUEST
            if not host_port[0]:
                return MALFORMED_REQUEST
            if len(self._authorities) >= AUTHORITY_CACHE_SIZE:
                self._authorities.clear()
            self._authorities[key] = host_port
        host, port = host_port
        return self._route(state, down, head, host, port, path, authority, scheme)

    def dispatch_gateway(self, down: HttpServerConnection, head: RequestHead, port: int,
                         claims: Mapping[str, Any] | None = None) -> Exchange | SyntheticResponse:
        """A request on a gateway listener: the virtual host is the Host header's name (a port in it is
        ignored, as Envoy's gateway domains ``host:*`` do) on the listener ``port``; then as ``dispatch``.
        ``claims``: the request's verified JWT claims, for routes that match on them."""
        self.stats.outbound_rq_total += 1
        if head.method == b"CONNECT":
            self.stats.flag(NO_ROUTE.flag)
            return NO_ROUTE
        target = head.target
        if target[:1] == b"/":
            authority, path = head.host, target
        else:
            try:
                _, authority, path = split_absolute_target(target)
            except ValueError:
                return MALFORMED_REQUEST
        try:
            host = split_authority(authority, port)[0] if authority else ""
        except ValueError:
            return MALFORMED_REQUEST
        return self._route(self.source.state, down, head, host, port, path, authority, claims=claims)

    def _route(self, state: ProxyState, down: HttpServerConnection, head: RequestHead, host: str, port: int,
               path: bytes, authority: bytes, scheme: bytes = b"http",
               original: tuple[tuple[str, int], Passthrough] | None = None,
               claims: Mapping[str, Any] | None = None) -> Exchange | SyntheticResponse:
        """The (host, port) virtual host's matching route → its weighted cluster → an exchange (or the route's
        own answer: redirect, direct response, fault abort; see ``route_actions``). ``original``: where a
        captured connection was going, for a PASSTHROUGH cluster (a ServiceEntry with resolution NONE)."""
        router = state.router
        route = router.unconditional(host, port)
        view = None
        if route is None:
            view = HeaderView(head, authority, claims)
            route = router.select(host, port, head.method.decode("latin-1"), path.decode("latin-1"), view)
            if route is None:
                if state.snapshot.outbound_policy == "REGISTRY_ONLY" and router.virtual_host(host, port) is None:
                    return self.black_hole()
                self.stats.flag(NO_ROUTE.flag)
                return NO_ROUTE
        mode = HTTP if head.upgrade is None else UPGRADE
        policy = route.action.policy
        if policy is not None:
            result = act(state, down, head, route, policy, scheme, port, path, authority,
                         view or HeaderView(head, authority, claims), self.stats, self.loop, mode)
            if isinstance(result, SyntheticResponse):
                self.stats.flag(result.flag)
            return result
        dest = state.destination(route)
        if dest is None:
            self.stats.flag(CLUSTER_NOT_FOUND.flag)
            return CLUSTER_NOT_FOUND
        if original is not None and dest.cluster.cluster.lb_policy == "PASSTHROUGH":
            (address, dst_port), passthrough = original
            dest = passthrough.destination(state, address, dst_port)
        cluster = dest.cluster.cluster
        if (cluster.http_version == "2" and self.h2_pools is not None and mode == HTTP
                and not any(e.identity for e in cluster.endpoints)):
            # An HTTP/2-only destination with no sidecar to translate (an h2c ServiceEntry, say): speak h2 to it.
            return H2Front(down, head, Routed(dest, route.action.retry.retry_on), path, self.stats, self.loop,
                           self.h2_pools)
        return Exchange(down, head, dest, path, authority, self.stats, self.loop, mode)

    def dispatch_captured(self, down: HttpServerConnection, head: RequestHead, dst: tuple[str, int],
                          passthrough: Passthrough | None) -> Exchange | SyntheticResponse | OpenedTunnel:
        """Route a request of a connection captured on its way to ``dst``; ``passthrough`` None means the
        original destination must not be dialled (it is this sidecar)."""
        self.stats.outbound_rq_total += 1
        state = self.source.state
        if head.method == b"CONNECT":
            return self._tunnel(down, head, state)
        target = head.target
        if target[:1] == b"/":
            authority, path, default_port = head.host, target, dst[1]
        else:
            try:
                scheme, authority, path = split_absolute_target(target)
            except ValueError:
                return MALFORMED_REQUEST
            default_port = 443 if scheme == b"https" else 80
        try:
            host, port = split_authority(authority, default_port) if authority else ("", default_port)
        except ValueError:
            host, port = "", default_port  # an unusable Host names no service; the destination still counts
        router = state.router
        if not host or router.virtual_host(host, port) is None:
            vh = self.virtual_host_at(state, dst)
            if vh is not None:
                host, port = vh.hosts[0], vh.port
            elif state.snapshot.outbound_policy == "REGISTRY_ONLY":
                return self.black_hole()
            elif passthrough is None:
                self.stats.flag(NO_ROUTE.flag)
                return NO_ROUTE
            else:
                return Exchange(down, head, passthrough.destination(state, dst[0], dst[1]), path, authority,
                                self.stats, self.loop, HTTP if head.upgrade is None else UPGRADE)
        return self._route(state, down, head, host, port, path, authority,
                           original=(dst, passthrough) if passthrough is not None else None)

    def _tunnel(self, down: HttpServerConnection, head: RequestHead,
                state: ProxyState) -> Exchange | SyntheticResponse | OpenedTunnel:
        """CONNECT: to a port declared HTTP, answered here and each request inside routed on its own
        (``tunnel_http``); otherwise the (host, port) virtual host's route for CONNECT, or its first route (TLS
        and TCP traffic have no path or headers to match on), relayed as bytes."""
        try:
            host, port = split_authority(head.target, 443)
        except ValueError:
            return MALFORMED_REQUEST
        vh = state.router.virtual_host(host, port)
        if vh is None and state.snapshot.outbound_policy == "REGISTRY_ONLY":
            return self.black_hole()
        if vh is None or not vh.routes:
            return NO_ROUTE
        if vh.protocol == "http" and self.serve_tunnel is not None:
            return OpenedTunnel(down, self.serve_tunnel, self.loop)
        if has_sni_routes(vh):
            # TLS routes: the name the app tunnels to stands for the SNI it is about to send.
            route = route_for_sni(vh.routes, host.lower())
            if route is None:
                return NO_ROUTE
        else:
            route = state.router.select(host, port, "CONNECT", "/", HeaderView(head, head.target)) or vh.routes[0]
        dest = state.destination(route)
        if dest is None:
            return CLUSTER_NOT_FOUND
        return Exchange(down, head, dest, b"", b"", self.stats, self.loop, CONNECT)
