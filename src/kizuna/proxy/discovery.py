"""The sidecar's discovery client: keep one stream to the control plane and apply what it pushes.

The client says Hello (node, the version it runs, app readiness), then applies each Push and answers Ack, or
Nack with the reason when the snapshot cannot be decoded or the sidecar rejects it; the sidecar then keeps its
last good snapshot, as Envoy does. Readiness changes are forwarded as Health messages. When the stream breaks
the sidecar keeps serving what it has and the client reconnects with exponential backoff and jitter (so a
restarted control plane is not hit by every sidecar in the same millisecond); the Hello after a reconnect
names the running version, and the control plane resends only if that is stale.

The control plane's address comes from the bootstrap. When the bootstrap names a ``control_plane_file`` (the
state dir's ``controlplane.json``), the address in that file wins on every attempt,
so a control plane restarted on a new ephemeral port is still found.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from kizuna.proxyconfig.bootstrap import Bootstrap
from kizuna.proxyconfig.controlplane_tls import check_control_plane, client_context
from kizuna.proxyconfig.model import Snapshot
from kizuna.proxyconfig.xds import (
    DISCOVERY_PATH,
    UPGRADE_TOKEN,
    Ack,
    Framer,
    Health,
    Hello,
    Message,
    Nack,
    Push,
    encode,
)

log = logging.getLogger("kizuna.proxy.discovery")

BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 5.0
HANDSHAKE_TIMEOUT = 5.0


class Sidecar(Protocol):
    """What the discovery client needs of the data plane (``kizuna.proxy.sidecar.Sidecar``)."""

    @property
    def version(self) -> str: ...

    @property
    def app_ready(self) -> bool: ...

    def apply(self, snapshot: Snapshot) -> None | Awaitable[None]: ...

    def set_health_listener(self, callback: Callable[[bool], None]) -> None: ...


class HandshakeError(Exception):
    """The control plane refused or botched the upgrade."""


class DiscoveryClient:
    """One sidecar's stream to the control plane, reconnecting forever."""

    def __init__(self, bootstrap: Bootstrap, sidecar: Sidecar, backoff_initial: float = BACKOFF_INITIAL,
                 backoff_max: float = BACKOFF_MAX) -> None:
        self.bootstrap = bootstrap
        self.sidecar = sidecar
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.last_error: str | None = None
        """Why the last stream attempt failed or ended (None while connected)."""
        self.pushes = 0
        """Pushes received (applied or rejected)."""
        self._writer: asyncio.StreamWriter | None = None
        sidecar.set_health_listener(self._health_changed)

    @property
    def connected(self) -> bool:
        """True while a stream is open and Hello has been sent."""
        return self._writer is not None and not self._writer.is_closing()

    async def run(self) -> None:
        """Keep a stream open until cancelled. Returns at once when the bootstrap names no control plane."""
        if self._target() is None:
            log.info("no control plane configured; running on the static snapshot only")
            return
        backoff = self.backoff_initial
        while True:
            try:
                healthy = await self._session()
                self.last_error = "control plane closed the stream"
            except HandshakeError as exc:
                healthy, self.last_error = False, str(exc)
            except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    TimeoutError) as exc:
                healthy, self.last_error = False, f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # a bug must not leave the sidecar without config updates for good
                log.exception("discovery stream failed")
                healthy, self.last_error = False, f"{type(exc).__name__}: {exc}"
            if healthy:
                backoff = self.backoff_initial
            delay = backoff * (0.5 + random.random() / 2)
            log.info("discovery stream down (%s); retrying in %.2fs", self.last_error, delay)
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, self.backoff_max)

    def _target(self) -> tuple[str, int] | None:
        address = self.bootstrap.control_plane
        file = self.bootstrap.control_plane_file
        if file:
            try:
                address = str(json.loads(Path(file).read_text())["address"])
            except (OSError, ValueError, KeyError, TypeError):
                pass  # not (yet) running; fall back to the bootstrap's address
        if not address:
            return None
        host, _, port = address.rpartition(":")
        return host.strip("[]"), int(port)

    def _token(self) -> str:
        if not self.bootstrap.token_file:
            return ""
        return Path(self.bootstrap.token_file).read_text().strip()

    def control_plane_tls(self) -> ssl.SSLContext | None:
        """How to reach the control plane: TLS verified against the mesh's roots, presenting this workload's
        certificate once it has one (so the control plane knows who is on the stream); None: plain HTTP."""
        bundle = self.bootstrap.control_plane_ca
        if not bundle:
            return None
        identity = getattr(self.sidecar, "identity", None)
        own = identity.client_context if identity is not None else None
        return own if own is not None else client_context(bundle)

    def check_peer(self, transport: asyncio.BaseTransport) -> None:
        """Raise HandshakeError unless the TLS peer is the control plane."""
        problem = check_control_plane(transport.get_extra_info("peercert"), self.bootstrap.trust_domain)
        if problem:
            raise HandshakeError(problem)

    def address(self) -> str:
        """The control plane's current ``host:port`` (for the CA's API on the same listener)."""
        target = self._target()
        return f"{target[0]}:{target[1]}" if target is not None else ""

    def token(self) -> str:
        """The bearer token for the control plane's API."""
        return self._token()

    async def _session(self) -> bool:
        """One stream from connect to close; returns True when it got as far as receiving a message."""
        target = self._target()
        if target is None:
            raise HandshakeError("no control plane address")
        host, port = target
        tls = self.control_plane_tls()
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=tls), HANDSHAKE_TIMEOUT)
        try:
            if tls is not None:
                self.check_peer(writer.transport)
            request = (f"GET {DISCOVERY_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: Upgrade\r\n"
                       f"Upgrade: {UPGRADE_TOKEN}\r\nAuthorization: Bearer {self._token()}\r\n\r\n")
            writer.write(request.encode("latin-1"))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANDSHAKE_TIMEOUT)
            status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = status_line.split(" ", 2)
            if len(parts) < 2 or parts[1] != "101":
                raise HandshakeError(f"control plane refused the discovery stream: {status_line}")
            writer.write(encode(Hello(self.bootstrap.node, self.sidecar.version, self.sidecar.app_ready)))
            self._writer = writer
            self.last_error = None
            log.info("discovery stream open to %s:%d", host, port)
            framer = Framer()
            received = False
            while True:
                data = await reader.read(65536)
                if not data:
                    return received
                for message in framer.feed(data):
                    received = True
                    await self._handle(message, writer)
        finally:
            self._writer = None
            writer.close()

    async def _handle(self, message: Message, writer: asyncio.StreamWriter) -> None:
        if not isinstance(message, Push):
            log.warning("unexpected %s from the control plane", type(message).__name__)
            return
        self.pushes += 1
        try:
            snapshot = Snapshot.from_json(message.snapshot)
            result = self.sidecar.apply(snapshot)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:  # any failure is a NACK; the sidecar keeps its last good snapshot
            reason = str(exc) or type(exc).__name__
            log.warning("rejected config %s: %s", message.version, reason)
            writer.write(encode(Nack(message.nonce, self.sidecar.version, reason)))
        else:
            log.info("applied config %s", message.version)
            writer.write(encode(Ack(message.nonce, message.version)))
        await writer.drain()

    def _health_changed(self, ready: bool) -> None:
        # While disconnected there is nothing to do: the next Hello carries the readiness of that moment.
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(encode(Health(ready)))
