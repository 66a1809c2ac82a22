"""Upstream connections per endpoint: idle keep-alive connections are reused, closed ones are discarded.

The pool decides from what each connection answers (``is_available``, ``is_idle``, ``has_expired``), as in
httpcore. Pools are keyed by endpoint address and outlive snapshots, so a config push does not cost the
warm connections of endpoints that stay; pools of endpoints that disappear are drained.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any, Final, Generic, Protocol, TypeVar

from kizuna.proxy.origination import origination_context, san_problem, server_name
from kizuna.proxyconfig.model import UpstreamTls

IDLE_TIMEOUT: Final = 3600.0
"""Seconds an idle connection stays reusable: Istio's default ``connectionPool.http.idleTimeout`` (1 h).
Apps often close sooner; that race is retried once on a fresh connection (see exchange)."""
MAX_IDLE: Final = 64
"""Idle connections kept per endpoint; more are closed when released."""


class Poolable(Protocol):
    """What the pool asks a connection."""

    def is_available(self) -> bool:
        """Open, idle, and able to carry another request."""
        ...

    def is_idle(self) -> bool:
        """No request in flight."""
        ...

    def has_expired(self, now: float) -> bool:
        """Idle for too long, or closed by the peer."""
        ...

    def close(self) -> None:
        ...


C = TypeVar("C", bound=Poolable)
P = TypeVar("P", bound=asyncio.BaseProtocol)


class EndpointPool(Generic[C]):
    """Connections to one endpoint, and the count of requests in flight to it (for LEAST_REQUEST)."""

    __slots__ = ("address", "port", "active", "idle", "draining", "idle_timeout", "max_requests",
                 "max_duration", "identity", "tls", "origination", "service")

    def __init__(self, address: str, port: int, tls: ClientTls | None = None) -> None:
        self.address = address
        self.port = port
        self.identity = ""
        """The peer identity to insist on with mTLS (the endpoint's sidecar); empty: plaintext."""
        self.tls = tls
        self.origination: UpstreamTls | None = None
        """TLS this proxy originates to the endpoint (DestinationRule SIMPLE / MUTUAL); wins over ``identity``."""
        self.service = ""
        """The cluster's service host: the default SNI and verified name when originating TLS."""
        self.active = 0
        self.idle: list[C] = []
        self.draining = False
        self.idle_timeout = IDLE_TIMEOUT
        self.max_requests = 0
        """Requests a connection carries before it closes (0: no limit)."""
        self.max_duration: float | None = None
        """Seconds after which a connection is not reused (None: no limit)."""

    def __repr__(self) -> str:
        return f"EndpointPool({self.address}:{self.port}, active={self.active}, idle={len(self.idle)})"

    def configure(self, idle_timeout: float | None, max_requests: int, max_duration: float | None) -> None:
        """Apply a DestinationRule ``connectionPool`` to this endpoint's connections (None: keep default)."""
        self.idle_timeout = IDLE_TIMEOUT if idle_timeout is None else idle_timeout
        self.max_requests = max_requests
        self.max_duration = max_duration

    def acquire(self, now: float) -> C | None:
        """The most recently used idle connection that can still be used, or None (then connect)."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.is_available() and not conn.has_expired(now):
                return conn
            conn.close()
        return None

    def release(self, conn: C) -> None:
        """Take back a connection whose request finished; keep it for reuse when it can carry another."""
        if self.draining or not conn.is_available() or len(self.idle) >= MAX_IDLE:
            conn.close()
        else:
            self.idle.append(conn)

    def discard(self, conn: C) -> None:
        """Forget a connection that closed."""
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    async def connect(self, factory: Callable[[], P], timeout: float) -> P:
        """Open a new connection to this endpoint (mTLS when it has an identity and this sidecar a
        certificate); raises OSError or TimeoutError."""
        loop = asyncio.get_running_loop()
        if self.origination is not None:
            return await self._originate(factory, timeout, self.origination)
        context = self.tls.context() if self.identity and self.tls is not None else None
        async with asyncio.timeout(timeout):
            if context is None:
                _, protocol = await loop.create_connection(factory, self.address, self.port)
                return protocol
            transport, protocol = await loop.create_connection(factory, self.address, self.port, ssl=context)
        assert self.tls is not None
        problem = self.tls.check_peer(transport.get_extra_info("peercert"), self.identity)
        if problem:
            transport.abort()
            raise ConnectionRefusedError(problem)
        return protocol

    async def _originate(self, factory: Callable[[], P], timeout: float, tls: UpstreamTls) -> P:
        try:
            context = origination_context(tls)
        except ValueError as exc:
            raise ConnectionRefusedError(f"TLS origination: {exc}") from exc
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            transport, protocol = await loop.create_connection(
                factory, self.address, self.port, ssl=context, server_hostname=server_name(tls, self.service))
        problem = san_problem(tls, transport.get_extra_info("peercert"))
        if problem:
            transport.abort()
            raise ConnectionRefusedError(problem)
        return protocol

    def drain(self) -> None:
        """The endpoint left the config: close idle connections now, busy ones when released."""
        self.draining = True
        while self.idle:
            self.idle.pop().close()


class ClientTls(Protocol):
    """Where pools get mTLS from: the sidecar's current client context and the secure-naming check."""

    def context(self, alpn: str = "http/1.1") -> ssl.SSLContext | None:
        """The client TLS context of the current certificate for a connection carrying ``alpn``; None while
        the sidecar has none."""
        ...

    def check_peer(self, cert: Any, identity: str) -> str:
        """Why the peer certificate is not ``identity``'s ("" when it is)."""
        ...


class PoolRegistry(Generic[C]):
    """Every endpoint pool of a sidecar, by (address, port), shared by successive snapshots."""

    __slots__ = ("pools", "tls", "tls_pools")

    def __init__(self, tls: ClientTls | None = None) -> None:
        self.pools: dict[tuple[str, int], EndpointPool[C]] = {}
        self.tls = tls
        """mTLS for endpoints with an identity (None: plaintext everywhere)."""
        self.tls_pools: dict[tuple[str, int, UpstreamTls, str], EndpointPool[C]] = {}
        """Pools that originate TLS, by endpoint and setting: hosts sharing an address (a CDN's) each get
        their own SNI and verification, so their connections are never mixed."""

    def get(self, address: str, port: int, identity: str = "") -> EndpointPool[C]:
        """The pool for an endpoint, created on first use; ``identity`` (from the snapshot) turns on mTLS."""
        key = (address, port)
        pool = self.pools.get(key)
        if pool is None or pool.draining:
            pool = self.pools[key] = EndpointPool(address, port, self.tls)
        if pool.identity != identity:
            # Idle connections were made for the old identity (mTLS, or plaintext): none may carry a request
            # under the new one (a ServiceEntry's location changed, a PeerAuthentication now DISABLEs mTLS).
            for conn in pool.idle[:]:
                conn.close()
            pool.idle.clear()
        pool.identity = identity
        return pool

    def originating(self, address: str, port: int, tls: UpstreamTls, service: str) -> EndpointPool[C]:
        """The pool that originates ``tls`` to an endpoint of ``service`` (DestinationRule SIMPLE / MUTUAL)."""
        key = (address, port, tls, service)
        pool = self.tls_pools.get(key)
        if pool is None or pool.draining:
            pool = self.tls_pools[key] = EndpointPool(address, port)
            pool.origination = tls
            pool.service = service
        return pool

    def retain(self, keep: set[tuple[str, int]]) -> None:
        """Drain and forget the pools of endpoints not in ``keep`` (originating pools included)."""
        for key in [k for k in self.pools if k not in keep]:
            self.pools.pop(key).drain()
        for tls_key in [k for k in self.tls_pools if k[:2] not in keep]:
            self.tls_pools.pop(tls_key).drain()

    def close(self) -> None:
        """Drain every pool (sidecar stop)."""
        self.retain(set())
