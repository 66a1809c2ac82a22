"""Gateway mode: the same proxy as an ingress gateway (``bootstrap.node.kind == "gateway"``).

No app, no capture, no outbound or inbound ports: the proxy listens on the ports of its snapshot's
``gateway_listeners``, at the bootstrap's ``gateway_address`` (default 127.0.0.1), each listener port mapped to
a host port by ``gateway_ports`` (``kizuna up`` maps 8080, where Istio's ingress Service sends port 80, to its
``--gateway-port``). An HTTP listener routes each request by its Host header over the virtual hosts of that
port (``*`` and ``*.suffix`` included) exactly as a sidecar routes outbound requests (``OutboundDispatcher``:
route, weighted cluster, exchange; no virtual host or route → 404), after RequestAuthentication and
AuthorizationPolicy: the verified JWT's claims go with the request to route matching (Istio's JWT claim based
routing, ``@request.auth.claims.*`` keys). A TCP listener relays each connection to
a balanced endpoint of its route. Endpoints are the instances' addresses that sidecars dial too.

A listener with TLS servers (``GatewayListener.tls``) first waits for each connection's ClientHello: a
terminating listener picks the server by SNI and ends TLS there (``gateway_tls``), then serves HTTP or TCP as
above; a ``PASSTHROUGH`` listener forwards the TLS bytes untouched along the ``tls[]`` route for the SNI.

HTTP listeners take HTTP/2 too, as Istio's gateway does: a plaintext connection that opens with the h2 preface
(h2c with prior knowledge, gRPC) and a TLS connection (whose servers offer ALPN ``h2`` and ``http/1.1``) are
served per stream (``h2_dispatch.gateway_router``): each stream gets the same policy checks and routing as an
HTTP/1.1 request, a refusal of a gRPC call becomes a gRPC status (PERMISSION_DENIED, UNAUTHENTICATED).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Final, TextIO, cast

from kizuna.protocols.http1 import RequestHead
from kizuna.proxy.capture import Closing, forward_to, tcp_cluster
from kizuna.proxy.downstream import HttpServerConnection
from kizuna.proxy.errors import SyntheticResponse
from kizuna.proxy.exchange import Exchange
from kizuna.proxy.gateway_tls import TlsContexts, client_san_problem
from kizuna.proxy.h2 import H2ServerConnection
from kizuna.proxy.h2_dispatch import PrefaceSwitch, gateway_router
from kizuna.proxy.headers import forwarded_proto
from kizuna.proxy.inbound_policy import InboundGuard
from kizuna.proxy.listener import ConnectionInfo, Listener
from kizuna.proxy.outbound import OutboundDispatcher, StateSource
from kizuna.proxy.sni import SniWait
from kizuna.proxy.stats import Stats
from kizuna.proxy.tls_server import TlsServer
from kizuna.proxyconfig.bootstrap import Bootstrap
from kizuna.proxyconfig.model import GatewayListener, Snapshot

ALPN: Final = ("h2", "http/1.1")
"""What the TLS servers of an HTTP listener offer (Istio's gateway offers both)."""


class GatewayDispatcher:
    """The dispatcher of one HTTP gateway listener: end-user authentication and authorization policies that
    select the gateway (Istio applies them at the ingress too), then routing by Host on the listener's port."""

    __slots__ = ("outbound", "port", "guard")

    def __init__(self, outbound: OutboundDispatcher, port: int, guard: InboundGuard) -> None:
        self.outbound = outbound
        self.port = port
        self.guard = guard

    def dispatch(self, down: HttpServerConnection, head: RequestHead) -> Exchange | SyntheticResponse:
        security = self.outbound.source.state.snapshot.security
        claims = None
        if security is not None and security.enforces_requests:
            checked = self.guard.compiled(security).check(head.method, head.target, head.host, head.headers,
                                                          down.transport, self.port)
            if isinstance(checked, SyntheticResponse):
                return checked
            if checked.changed:
                head = head._replace(headers=checked.headers)
            # The verified token's claims feed route matching (``@request.auth.claims.*`` keys), as Istio's
            # gateway matches routes on jwt_authn's metadata; no or no verified token: no claims.
            if checked.identity is not None:
                claims = checked.identity.claims
        head = head._replace(headers=forwarded_proto(head.headers, down.transport))
        return self.outbound.dispatch_gateway(down, head, self.port, claims)



class GatewayListeners:
    """The listeners of a gateway proxy, following its snapshots: ``apply`` binds new ports (or refuses the
    snapshot with ValueError, keeping the previous ones), closes ports that went away."""

    def __init__(self, bootstrap: Bootstrap, source: StateSource, stats: Stats,
                 connections: set[asyncio.BaseProtocol], log: TextIO = sys.stderr) -> None:
        self.address = bootstrap.gateway_address
        self.host_ports = dict(bootstrap.gateway_ports)
        self.source = source
        self.stats = stats
        self.guard = InboundGuard(stats)
        """JWT and authorization for requests arriving at the gateway (one JWKS cache for all its ports)."""
        self.connections = connections
        self.log = log
        self.outbound: OutboundDispatcher | None = None
        self.listeners: dict[tuple[int, str], Listener] = {}
        """By (listener port, protocol): a port whose protocol changes is closed and bound again."""
        self.tls: dict[int, TlsContexts] = {}
        """By listener port, the terminating servers' contexts, read at accept (a snapshot swaps them)."""
        self.passthrough: frozenset[int] = frozenset()
        """Listener ports whose servers pass TLS through (routed by SNI)."""
        self._problems: tuple[str, ...] = ()
        self._pending_tls: dict[int, TlsContexts] = {}
        self._last_tls_failure = ""

    def host_port(self, port: int) -> int:
        """Where listener ``port`` binds on the host."""
        return self.host_ports.get(port, port)

    def prepare(self, snapshot: Snapshot) -> dict[tuple[int, str], Listener]:
        """Bind the listeners ``snapshot`` adds (not yet accepting); ValueError, with nothing bound, when a
        port cannot be had. Hand the result to ``commit`` once the snapshot is taken."""
        wanted = self._wanted(snapshot)
        # Certificates first: a file that cannot be read refuses the snapshot before any port is bound.
        self._pending_tls = {g.port: TlsContexts(g.tls, alpn=ALPN if g.protocol == "http" else ())
                             for g in wanted.values() if any(t.mode != "PASSTHROUGH" for t in g.tls)}
        opened: dict[tuple[int, str], Listener] = {}
        for key, listener in sorted(wanted.items()):
            if key in self.listeners:
                continue
            port = self.host_port(listener.port)
            try:
                opened[key] = Listener("outbound", self.address, port, self._handler(listener))
            except OSError as exc:
                for done in opened.values():
                    done.close()
                raise ValueError(f"cannot listen on gateway port {self.address}:{port}: "
                                 f"{exc.strerror or exc}") from exc
        return opened

    def commit(self, snapshot: Snapshot, opened: dict[tuple[int, str], Listener],
               started: bool) -> list[Listener]:
        """Take ``snapshot``'s listeners: close the ones it dropped, keep ``opened``; returns those to start
        (when the proxy runs already)."""
        wanted = self._wanted(snapshot)
        for key in self.listeners.keys() - wanted.keys():
            self.listeners.pop(key).close()
        self.listeners.update(opened)
        self.tls = self._pending_tls
        self.passthrough = frozenset(g.port for g in snapshot.gateway_listeners
                                     if g.tls and all(t.mode == "PASSTHROUGH" for t in g.tls))
        problems = tuple(g.problem for g in snapshot.gateway_listeners if g.problem)
        if problems != self._problems:
            self._problems = problems
            for problem in problems:
                print(f"kizuna gateway: not served: {problem}", file=self.log, flush=True)
        return list(opened.values()) if started else []

    def close(self) -> None:
        """Stop accepting on every gateway port."""
        self.guard.close()
        for listener in self.listeners.values():
            listener.close()
        self.listeners.clear()

    def describe(self) -> str:
        """``127.0.0.1:8080 (http), ...`` for the start-up line."""
        return ", ".join(f"{self.address}:{listener.port} ({protocol})"
                         for (_, protocol), listener in sorted(self.listeners.items())) or "no ports yet"

    @staticmethod
    def _wanted(snapshot: Snapshot) -> dict[tuple[int, str], GatewayListener]:
        return {(g.port, g.protocol): g for g in snapshot.gateway_listeners if g.server_ports}

    def _handler(self, listener: GatewayListener) -> Callable[[ConnectionInfo], asyncio.BaseProtocol]:
        port = listener.port
        make: Callable[[], asyncio.Protocol]
        if listener.protocol == "tcp":
            make = lambda: self._tcp(port)  # noqa: E731
        else:
            assert self.outbound is not None, "set outbound before the first snapshot"
            outbound = self.outbound
            dispatcher = GatewayDispatcher(outbound, port, self.guard)

            def h2() -> H2ServerConnection:
                assert outbound.h2_pools is not None, "the proxy sets h2_pools with outbound"
                conn = H2ServerConnection(gateway_router(self.source, outbound, port, self.guard,
                                                         lambda: conn.transport),
                                          outbound.h2_pools, self.stats, self.connections)
                return conn

            # HTTP/1.x, or (prior knowledge in plaintext, ALPN h2 under TLS: both open with the preface) HTTP/2.
            make = lambda: self._held(lambda: PrefaceSwitch(  # noqa: E731
                lambda: HttpServerConnection(dispatcher, self.stats, self.connections), h2))

        def accept(info: ConnectionInfo) -> asyncio.BaseProtocol:
            # TLS is decided per connection from the current snapshot: a port can gain or lose TLS without
            # being bound again.
            if port in self.passthrough:
                return SniWait(lambda sni, data: self._tcp(port, data, sni))
            if port in self.tls:
                return SniWait(lambda sni, data: self._terminate(port, sni, data, make))
            return make()

        return accept

    def _held(self, make: Callable[[], asyncio.Protocol]) -> asyncio.Protocol:
        """``make()``, held while a fresh RequestAuthentication's key sets are on their first fetch (as the
        sidecar's inbound does), so the first tokens after a policy lands are not refused for want of keys."""
        security = self.source.state.snapshot.security
        if security is None:
            return make()
        return cast(asyncio.Protocol, self.guard.hold(security, make))

    def _terminate(self, port: int, sni: str, initial: bytes,
                   make: Callable[[], asyncio.Protocol]) -> asyncio.Protocol:
        contexts = self.tls.get(port)
        picked = contexts.pick(sni) if contexts is not None else None
        if picked is None:
            self.stats.error("no TLS server")
            return Closing()
        tls, context = picked
        if not tls.subject_alt_names:
            return TlsServer(context, make, initial, on_failure=self._tls_failed)

        def checked() -> asyncio.Protocol:
            # MUTUAL with subjectAltNames: the CA vouched for the client; now it must be one of the names.
            problem = client_san_problem(tls, server.peercert)
            if problem:
                self._tls_failed(problem)
                return Closing()
            return make()

        server = TlsServer(context, checked, initial, on_failure=self._tls_failed)
        return server

    def _tls_failed(self, reason: str) -> None:
        self.stats.error("TLS handshake failed")
        if reason != self._last_tls_failure:  # a client retrying (or a scanner) logs its reason once
            self._last_tls_failure = reason
            print(f"kizuna gateway: {reason}", file=self.log, flush=True)

    def _tcp(self, port: int, initial: bytes = b"", sni: str | None = None) -> asyncio.Protocol:
        state = self.source.state  # as of accept: the connection keeps this choice to its end
        vh = state.router.virtual_host("*", port)
        if vh is None:
            self.stats.error("no route")
            return Closing()
        picked = tcp_cluster(state, vh, sni)
        if picked is None or isinstance(picked, str):  # a PASSTHROUGH cluster: a gateway has no original dst
            self.stats.error("no healthy upstream")
            return Closing()
        pool, cluster = picked
        return forward_to(pool, cluster, self.stats, self.connections, initial)
