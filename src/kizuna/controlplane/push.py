"""The push queue: turn config and registry changes into per-proxy snapshots, debounced and merged.

Istio's pilot shape (``PILOT_DEBOUNCE_AFTER`` 100 ms, ``PILOT_DEBOUNCE_MAX`` 10 s there, 1 s here): every
change marks the mesh dirty; once no change has arrived for ``debounce_after`` (or ``debounce_max`` after the
first one, so a steady trickle cannot starve pushes) one cycle compiles a snapshot for every connected proxy
from one consistent view of the store and the registry. A proxy is only sent a snapshot whose content differs
from the last one it was sent, so an apply that touches one service does not wake up every sidecar.

Versions are ``<store generation>-<content digest>``: the generation tells a user which apply a proxy runs,
the digest lets a restarted control plane recognise that a reconnecting sidecar already runs the current
config (its Hello names its version) and skip the push.

A newly connected proxy is pushed at once, outside the debounce, so sidecars start serving without a delay.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from kizuna.controlplane.compile import MeshIndex, compile_for, snapshot_digest
from kizuna.controlplane.registry import Registry
from kizuna.controlplane.store import Change, MemoryStore
from kizuna.proxyconfig.bootstrap import Node
from kizuna.proxyconfig.model import Snapshot
from kizuna.proxyconfig.xds import Ack, Message, Nack, Push

log = logging.getLogger("kizuna.controlplane.push")

DEBOUNCE_AFTER = 0.1
DEBOUNCE_MAX = 1.0
DIGEST_CHARS = 16

Generate = Callable[[Node, str], Snapshot]
"""Compiles one proxy's snapshot from inputs fixed beforehand."""
Prepare = Callable[[Sequence[Any], Sequence[Any]], Generate]
"""Fixes the inputs (resources, instances) once per push cycle and returns the per-proxy generator."""
Digest = Callable[[Snapshot], str]


def mesh_generator(resources: Sequence[Any], instances: Sequence[Any], trust_domain: str = "cluster.local"
                   ) -> Generate:
    """The real compiler: index the mesh once, then compile each proxy from the index."""
    return functools.partial(compile_for, MeshIndex.build(resources, instances, trust_domain))


class Sink(Protocol):
    """One proxy's open discovery stream, as the push queue sees it."""

    def send(self, message: Message) -> None: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class ProxyState:
    """What ``GET /v1/status`` shows about one proxy; kept after it disconnects."""

    node: Node
    connected: bool = False
    ready: bool = False
    acked_version: str | None = None
    nack: str | None = None
    error: str | None = None
    """The control plane could not compile this proxy's snapshot (a bug or an unsupported combination)."""
    sent_version: str | None = None
    sent_nonce: str | None = None
    acked_nonce: str | None = None
    last_change: float = 0.0

    @property
    def synced(self) -> bool:
        return self.sent_version is not None and self.sent_version == self.acked_version \
            and self.sent_nonce == self.acked_nonce

    def to_json(self) -> dict[str, Any]:
        return {"id": self.node.id, "workload": self.node.workload, "namespace": self.node.namespace,
                "connected": self.connected, "ready": self.ready, "ackedVersion": self.acked_version,
                "nack": self.nack, "lastChange": _iso(self.last_change), "sentVersion": self.sent_version,
                "synced": self.synced, "error": self.error}


@dataclass(eq=False, slots=True)
class Connection:
    """One live discovery stream (a proxy may briefly have two while it reconnects; the newest wins)."""

    node: Node
    sink: Sink
    session: int
    sent_digest: str | None = None
    """Digest of the last snapshot sent, or of the one the proxy said it runs; None forces a push."""


def _iso(when: float) -> str | None:
    if not when:
        return None
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class PushQueue:
    """Debounced, merged pushes to every connected proxy, with per-proxy ACK/NACK tracking."""

    def __init__(self, store: MemoryStore[Any], registry: Registry, prepare: Prepare = mesh_generator,
                 digest: Digest = snapshot_digest, debounce_after: float = DEBOUNCE_AFTER,
                 debounce_max: float = DEBOUNCE_MAX) -> None:
        self.store = store
        self.registry = registry
        self._prepare = prepare
        self._digest = digest
        self._prepared: tuple[tuple[int, int], Generate] | None = None
        self.debounce_after = debounce_after
        self.debounce_max = debounce_max
        self._connections: dict[str, Connection] = {}
        self._states: dict[str, ProxyState] = {}
        self._dirty = asyncio.Event()
        self._first_change = 0.0
        self._last_change = 0.0
        self._nonces = 0
        self.cycles = 0
        """Debounced push cycles run so far (each may push any number of proxies)."""
        self.pushes = 0
        """Push messages sent so far."""
        store.subscribe(self._store_changed)
        registry.subscribe(self.mark_dirty)

    # -- changes -------------------------------------------------------------------------------------------

    def mark_dirty(self, reason: str = "") -> None:
        """Something the snapshots depend on changed; push after the debounce."""
        now = time.monotonic()
        if not self._dirty.is_set():
            self._first_change = now
            self._dirty.set()
        self._last_change = now
        log.debug("dirty: %s", reason)

    def _store_changed(self, change: Change) -> None:
        self.mark_dirty(f"config generation {change.generation}")

    async def run(self) -> None:
        """The debounce loop; runs until cancelled."""
        while True:
            await self._dirty.wait()
            while True:
                quiet = self._last_change + self.debounce_after
                deadline = min(quiet, self._first_change + self.debounce_max)
                delay = deadline - time.monotonic()
                if delay <= 0:
                    break
                await asyncio.sleep(delay)
            self._dirty.clear()
            self.cycles += 1
            try:
                await self._push_all()
            except Exception:  # the loop must outlive any one bad cycle; the next change retries
                log.exception("push cycle failed")

    async def _push_all(self) -> None:
        generate, generation = self._generator()
        for connection in list(self._connections.values()):
            if self._connections.get(connection.node.id) is connection:
                self._push(connection, generate, generation)
            # Compiling many proxies is CPU work on the loop; let API requests and ACKs in between proxies.
            await asyncio.sleep(0)

    # -- streams -------------------------------------------------------------------------------------------

    def connect(self, node: Node, version: str, ready: bool, sink: Sink) -> Connection:
        """A stream said Hello: register the instance and push its snapshot now unless it already runs it."""
        old = self._connections.get(node.id)
        session = self.registry.register(node, ready)
        connection = Connection(node, sink, session, sent_digest=_digest_of(version))
        self._connections[node.id] = connection
        if old is not None:
            old.sink.close()  # the proxy has moved to its new stream
        state = self._states.get(node.id)
        if state is None:
            state = self._states[node.id] = ProxyState(node)
        state.node, state.connected, state.ready = node, True, ready
        state.acked_version, state.acked_nonce = version or None, None
        state.sent_version = state.sent_nonce = state.nack = None
        state.last_change = time.time()
        log.info("proxy %s connected (running %s)", node.id, version or "nothing")
        self._push(connection, *self._generator())
        if state.sent_version is None and version:
            # Already runs what we would send: count it as acknowledged.
            state.sent_version = state.acked_version = version
        return connection

    def disconnect(self, connection: Connection) -> None:
        """The stream closed (or failed)."""
        if self._connections.get(connection.node.id) is not connection:
            return
        del self._connections[connection.node.id]
        self.registry.disconnect(connection.node.id, connection.session)
        state = self._states[connection.node.id]
        state.connected = False
        state.last_change = time.time()
        log.info("proxy %s disconnected", connection.node.id)

    def ack(self, connection: Connection, message: Ack) -> None:
        state = self._current_state(connection)
        if state is None or message.nonce != state.sent_nonce:
            return  # a stale ACK for a push that has since been superseded
        state.acked_version, state.acked_nonce, state.nack = message.version, message.nonce, None
        state.last_change = time.time()

    def nack(self, connection: Connection, message: Nack) -> None:
        state = self._current_state(connection)
        if state is None or message.nonce != state.sent_nonce:
            return
        state.nack = message.error
        state.acked_version = message.version or state.acked_version
        state.acked_nonce = None
        state.last_change = time.time()
        log.warning("proxy %s rejected %s: %s", connection.node.id, state.sent_version, message.error)

    def health(self, connection: Connection, ready: bool) -> None:
        state = self._current_state(connection)
        if state is None:
            return
        if state.ready != ready:
            state.ready = ready
            state.last_change = time.time()
        self.registry.set_ready(connection.node.id, connection.session, ready)

    def close(self) -> None:
        """Close every stream (shutdown)."""
        for connection in list(self._connections.values()):
            connection.sink.close()

    def status(self) -> dict[str, Any]:
        """``GET /v1/status``: the config generation and every proxy seen since start."""
        return {"version": str(self.store.generation),
                "proxies": [self._states[k].to_json() for k in sorted(self._states)]}

    # -- internals -----------------------------------------------------------------------------------------

    def _current_state(self, connection: Connection) -> ProxyState | None:
        if self._connections.get(connection.node.id) is not connection:
            return None
        return self._states[connection.node.id]

    def _generator(self) -> tuple[Generate, int]:
        """The generator for the current store and registry, built once per change (not once per proxy)."""
        key = (self.store.generation, self.registry.generation)
        if self._prepared is None or self._prepared[0] != key:
            try:
                generate = self._prepare(self.store.list(), self.registry.instances())
            except Exception as exc:
                log.exception("cannot index the mesh for compilation")
                generate = functools.partial(_fail, exc)
            self._prepared = (key, generate)
        return self._prepared[1], key[0]

    def _push(self, connection: Connection, generate: Generate, generation: int) -> None:
        state = self._states[connection.node.id]
        try:
            snapshot = generate(connection.node, "")
            digest = self._digest(dataclasses.replace(snapshot, version=""))[:DIGEST_CHARS]
        except Exception as exc:
            log.exception("cannot compile the snapshot of %s", connection.node.id)
            if state.error is None:
                state.last_change = time.time()
            state.error = f"{type(exc).__name__}: {exc}"
            return
        state.error = None
        if digest == connection.sent_digest:
            return
        version = f"{generation}-{digest}"
        self._nonces += 1
        nonce = f"{self._nonces:x}"
        snapshot = dataclasses.replace(snapshot, version=version)
        connection.sink.send(Push(version, nonce, snapshot.to_json()))
        connection.sent_digest = digest
        state.sent_version, state.sent_nonce = version, nonce
        self.pushes += 1
        log.debug("pushed %s to %s", version, connection.node.id)


def _fail(exc: Exception, node: Node, version: str) -> Snapshot:
    raise exc


def _digest_of(version: str) -> str | None:
    """The content digest named by a version string (``<generation>-<digest>``), if it has one."""
    generation, sep, digest = version.rpartition("-")
    return digest if sep and generation.isdigit() and len(digest) == DIGEST_CHARS else None
