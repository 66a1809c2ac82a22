"""Inbound security on the data path: JWT then authorization for each request, authorization for each opaque
TCP connection, as the snapshot's ``SecurityPolicy`` says.

``InboundGuard`` belongs to the inbound handler and outlives snapshots (it owns the JWKS cache); each new
``SecurityPolicy`` is compiled once (:class:`InboundPolicy`) on first use. Callers check
``snapshot.security is None`` first, so a workload without policies pays nothing else.

Denied requests get Envoy's answer: 403 ``RBAC: access denied``; a token that does not verify gets 401 with
Envoy's jwt_authn message. Envoy sets no response flag for either (the reason is in ``x-kizuna-error`` and the
``/stats`` security counters). A denied TCP connection is closed before anything reaches the app.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Final, cast

from kizuna.protocols.http1 import RequestHead
from kizuna.protocols.http2 import Headers as H2Headers
from kizuna.proxy.authz import Attributes, Authorizer, Decision, PeerIdentity, normalize_path
from kizuna.proxy.errors import SyntheticResponse
from kizuna.proxy.jwt import Authenticated, JwksCache, JwtAuthenticator, JwtFailure
from kizuna.proxy.stats import Stats
from kizuna.proxyconfig.security import SecurityPolicy

log = logging.getLogger("kizuna.proxy.authz")

RBAC_DENIED: Final = SyntheticResponse(403, "rbac access denied", "", (), b"RBAC: access denied")
"""What a request refused by authorization gets (Envoy's RBAC filter body)."""
JWKS_WAIT: Final = 5.0
"""At most how long a new connection waits for a key set's first fetch (then its tokens fail with 401)."""


def jwt_denied(message: str) -> SyntheticResponse:
    """401 for a token that does not verify, with Envoy's message and ``www-authenticate``."""
    return SyntheticResponse(401, "jwt authentication failed", "",
                             ((b"www-authenticate", b'Bearer realm="kizuna", error="invalid_token"'),),
                             message.encode())


def peer_of(transport: asyncio.BaseTransport) -> PeerIdentity | None:
    """The mTLS peer of a connection, as the TLS layer reports it (``peer_identity``); None for plaintext."""
    peer: PeerIdentity | None = transport.get_extra_info("peer_identity")
    return peer


def _connection_attributes(transport: asyncio.BaseTransport, port: int, http: bool) -> Attributes:
    peername = transport.get_extra_info("peername")
    sockname = transport.get_extra_info("sockname")
    return Attributes(source_ip=peername[0] if peername else "", destination_ip=sockname[0] if sockname else "",
                      destination_port=port, peer=peer_of(transport), http=http)


class InboundPolicy:
    """One ``SecurityPolicy`` compiled: its authorizer and JWT authenticator."""

    __slots__ = ("policy", "authorizer", "jwt", "stats")

    def __init__(self, policy: SecurityPolicy, jwks: JwksCache, stats: Stats) -> None:
        self.policy = policy
        self.stats = stats
        self.authorizer = Authorizer(policy.authorization) if policy.authorization else None
        self.jwt = JwtAuthenticator(policy.jwt_rules, jwks) if policy.jwt_rules else None
        if self.jwt is not None:
            self.jwt.start()

    def pending(self) -> list[asyncio.Event]:
        """Key sets still on their first fetch."""
        return self.jwt.pending() if self.jwt is not None else []

    def check(self, method: bytes, target: bytes, host: bytes, headers: tuple[tuple[bytes, bytes], ...],
              transport: asyncio.BaseTransport | None, port: int) -> Authenticated | SyntheticResponse:
        """JWT, then authorization, for one request; the headers to forward or the response to give."""
        passed = Authenticated(None, headers)
        if self.jwt is not None:
            try:
                passed = self.jwt.authenticate(headers, target)
            except JwtFailure as exc:
                self.stats.count("jwt_failed")
                return jwt_denied(str(exc))
            if passed.identity is not None:
                self.stats.count("jwt_verified")
        if self.authorizer is None:
            return passed
        attrs = (_connection_attributes(transport, port, True) if transport is not None
                 else Attributes("", destination_port=port))
        attrs.method = method.decode("latin-1")
        attrs.path = normalize_path(target.decode("latin-1"))
        attrs.host = host.decode("latin-1")
        attrs.headers = _header_map(headers, host)
        attrs.auth = passed.identity
        decision = self.authorizer.decide(attrs)
        self._record(decision, "rq", attrs)
        return passed if decision.allowed else RBAC_DENIED

    def allows_connection(self, transport: asyncio.BaseTransport, port: int) -> bool:
        """Authorization for an opaque TCP connection (HTTP-only rule parts as Istio treats them on TCP)."""
        if self.authorizer is None:
            return True
        attrs = _connection_attributes(transport, port, False)
        decision = self.authorizer.decide(attrs)
        self._record(decision, "cx", attrs)
        return decision.allowed

    def _record(self, decision: Decision, kind: str, attrs: Attributes) -> None:
        self.stats.count(f"{kind}_allowed" if decision.allowed else f"{kind}_denied")
        for name in decision.audited:
            self.stats.count("audit")
            log.info("kizuna authz: audit %s: %s %s %s from %s", name, attrs.method or "tcp", attrs.host,
                     attrs.path, attrs.source_ip)
        for name in decision.dry_run:
            self.stats.count("dry_run")
            log.info("kizuna authz: dry-run %s would apply to %s %s from %s", name, attrs.method or "tcp",
                     attrs.path, attrs.source_ip)


def _header_map(headers: tuple[tuple[bytes, bytes], ...], host: bytes) -> dict[str, str]:
    out: dict[str, str] = {":authority": host.decode("latin-1"), "host": host.decode("latin-1")} if host else {}
    for name, value in headers:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        out[key] = f"{out[key]},{text}" if key in out else text
    return out


class InboundGuard:
    """The inbound handler's security: the current policy compiled, and the JWKS cache across snapshots."""

    __slots__ = ("stats", "jwks", "_current")

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.jwks = JwksCache()
        stats.jwks = self.jwks
        self._current: InboundPolicy | None = None

    def compiled(self, policy: SecurityPolicy) -> InboundPolicy:
        """``policy`` compiled (once per snapshot; needs the running loop for JWKS fetches)."""
        current = self._current
        if current is None or current.policy is not policy:
            current = self._current = InboundPolicy(policy, self.jwks, self.stats)
            self.jwks.retain({r.jwks_uri for r in policy.jwt_rules if r.jwks_uri and not r.jwks})
        return current

    def check_request(self, policy: SecurityPolicy, head: RequestHead, transport: asyncio.BaseTransport,
                      port: int) -> RequestHead | SyntheticResponse:
        """An HTTP/1.x request: the head to forward (headers rewritten by JWT rules) or the refusal."""
        if not policy.enforces_requests:
            return head
        result = self.compiled(policy).check(head.method, head.target, head.host, head.headers, transport, port)
        if isinstance(result, SyntheticResponse):
            return result
        return head._replace(headers=result.headers) if result.changed else head

    def check_stream(self, policy: SecurityPolicy, headers: H2Headers, transport: asyncio.BaseTransport | None,
                     port: int) -> SyntheticResponse | None:
        """An HTTP/2 stream's request headers (pseudo-headers included): None to let it through, else the
        refusal. JWT header changes are applied to ``headers`` in place."""
        if not policy.enforces_requests:
            return None
        pseudo = {k: v for k, v in headers if k[:1] == b":"}
        regular = tuple((k, v) for k, v in headers if k[:1] != b":")
        result = self.compiled(policy).check(pseudo.get(b":method", b"GET"), pseudo.get(b":path", b"/"),
                                             pseudo.get(b":authority", b""), regular, transport, port)
        if isinstance(result, SyntheticResponse):
            return result
        if result.changed:
            headers[:] = [(k, v) for k, v in headers if k[:1] == b":"] + list(result.headers)
        return None

    def allows_connection(self, policy: SecurityPolicy, transport: asyncio.BaseTransport, port: int) -> bool:
        """An opaque TCP connection on ``port``."""
        return not policy.authorization or self.compiled(policy).allows_connection(transport, port)

    def hold(self, policy: SecurityPolicy | None, make: Callable[[], asyncio.BaseProtocol]) -> asyncio.BaseProtocol:
        """``make()``, or while the policy's key sets are on their first fetch, a protocol that holds the
        connection unread until they arrive (so a fresh policy's first requests are not refused for want of
        keys)."""
        if policy is None or not policy.jwt_rules:
            return make()
        events = self.compiled(policy).pending()
        return _Held(events, make) if events else make()

    def close(self) -> None:
        self.jwks.close()


class _Held(asyncio.Protocol):
    """Keeps a new connection paused until key sets are fetched (or ``JWKS_WAIT``), then hands it over."""

    def __init__(self, events: list[asyncio.Event], make: Callable[[], asyncio.BaseProtocol]) -> None:
        self.events = events
        self.make = make
        self.transport: asyncio.Transport | None = None
        self.buffer: list[bytes] = []
        self.eof = False
        self.paused = False
        self.task: asyncio.Task[Any] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.task = asyncio.get_running_loop().create_task(self._wait())

    def data_received(self, data: bytes) -> None:
        self.buffer.append(data)
        if self.transport is not None and not self.paused and sum(map(len, self.buffer)) > 65536:
            self.paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.task is not None:
            self.task.cancel()

    async def _wait(self) -> None:
        waits = [asyncio.ensure_future(e.wait()) for e in self.events]
        try:
            await asyncio.wait(waits, timeout=JWKS_WAIT)
        finally:
            for w in waits:
                w.cancel()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        protocol = cast(asyncio.Protocol, self.make())
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.buffer:
            protocol.data_received(b"".join(self.buffer))
        if self.eof and not protocol.eof_received():
            transport.close()
        elif self.paused:
            transport.resume_reading()
