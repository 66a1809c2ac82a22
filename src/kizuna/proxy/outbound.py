"""Outbound: what the app sends out through its sidecar (``HTTP_PROXY`` → ``mesh_address:15001``).

Requests arrive in absolute form (``GET http://httpbin:8000/headers``): the service and port come from the
URI (else from Host; no port means 80), the request goes upstream in origin form with Host kept. Each request
is routed by the snapshot current when it arrives: virtual host → route → weighted cluster → exchange, which
balances over the cluster's endpoints. ``CONNECT host:port`` tunnels raw TCP to an endpoint of that service.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from typing import Final, Protocol

from kizuna.protocols.http1 import RequestHead, split_absolute_target, split_authority
from kizuna.proxy.downstream import HttpServerConnection
from kizuna.proxy.errors import CLUSTER_NOT_FOUND, MALFORMED_REQUEST, NO_ROUTE, SyntheticResponse
from kizuna.proxy.exchange import CONNECT, HTTP, UPGRADE, Exchange
from kizuna.proxy.state import ProxyState
from kizuna.proxy.stats import Stats

AUTHORITY_CACHE_SIZE: Final = 1024


class StateSource(Protocol):
    """Where dispatchers read the current snapshot-derived state (the sidecar)."""

    state: ProxyState


class HeaderView(Mapping[str, str]):
    """A request's headers by lower-case name for route matching, built only if a match looks."""

    __slots__ = ("_head", "_authority", "_map")

    def __init__(self, head: RequestHead, authority: bytes) -> None:
        self._head = head
        self._authority = authority
        self._map: dict[str, str] | None = None

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

    __slots__ = ("source", "stats", "loop", "_authorities")

    def __init__(self, source: StateSource, stats: Stats, loop: asyncio.AbstractEventLoop) -> None:
        self.source = source
        self.stats = stats
        self.loop = loop
        # Apps call the same few services over and over: remember how their authorities split.
        self._authorities: dict[tuple[bytes, bytes], tuple[str, int]] = {}

    def dispatch(self, down: HttpServerConnection, head: RequestHead) -> Exchange | SyntheticResponse:
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
        router = state.router
        route = router.unconditional(host, port)
        if route is None:
            route = router.select(host, port, head.method.decode("latin-1"), path.decode("latin-1"),
                                  HeaderView(head, authority))
            if route is None:
                return NO_ROUTE
        dest = state.destination(route)
        if dest is None:
            return CLUSTER_NOT_FOUND
        return Exchange(down, head, dest, path, authority, self.stats, self.loop,
                        HTTP if head.upgrade is None else UPGRADE)

    def _tunnel(self, down: HttpServerConnection, head: RequestHead,
                state: ProxyState) -> Exchange | SyntheticResponse:
        """CONNECT: the (host, port) virtual host's route for CONNECT, or its first route (TLS and TCP traffic
        have no path or headers to match on)."""
        try:
            host, port = split_authority(head.target, 443)
        except ValueError:
            return MALFORMED_REQUEST
        vh = state.router.virtual_host(host, port)
        if vh is None or not vh.routes:
            return NO_ROUTE
        route = state.router.select(host, port, "CONNECT", "/", HeaderView(head, head.target)) or vh.routes[0]
        dest = state.destination(route)
        if dest is None:
            return CLUSTER_NOT_FOUND
        return Exchange(down, head, dest, b"", b"", self.stats, self.loop, CONNECT)
