"""The service registry: which workload instances exist, where they listen and whether they are ready.

Instances register themselves: a sidecar's Hello carries its node (like Istio's WorkloadEntry auto-
registration), its Health messages update readiness, and the instance goes away when its stream closes.
Removal waits a short grace period, so a sidecar that reconnects at once (a control plane hiccup, a network
blip) does not make its endpoints flap in every other proxy. Services are not kept here: they are ``Service``
resources in the config store; ``describe`` joins the two for ``GET /v1/registry``.

Sessions make reconnects race-free: a sidecar may open its new stream before the old one is seen closed, so
only the latest session of a node may change it.

The registry is written to a file on every change and read back when the control plane restarts (as Istio
keeps auto-registered WorkloadEntries in its config store). Without that, the first sidecar to reconnect to a
restarted control plane would be pushed a mesh with no endpoints and fail its requests until the others were
back. Restored instances count as disconnected and are dropped unless their sidecar reconnects within
``restore_grace`` (longer than a sidecar's maximum reconnect backoff).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kizuna.controlplane.files import atomic_write_json
from kizuna.controlplane.instances import Instance
from kizuna.proxyconfig.bootstrap import Node

log = logging.getLogger("kizuna.controlplane.registry")

DEFAULT_GRACE = 2.0
"""Seconds an instance outlives its closed stream."""
RESTORE_GRACE = 15.0
"""Seconds a restored instance has to reconnect after a control plane restart (sidecars back off up to
5 s)."""


@dataclass(frozen=True, slots=True)
class Registration:
    """One registered instance as the registry sees it."""

    node: Node
    ready: bool
    session: int
    connected: bool
    since: float
    """Wall-clock time of the last change."""

    @property
    def instance(self) -> Instance:
        return Instance(node=self.node, ready=self.ready)

    def to_json(self) -> dict[str, Any]:
        return {**self.node.to_json(), "ready": self.ready, "connected": self.connected}


class Registry:
    """Instances keyed by node id; tells subscribers (the push queue) about every change."""

    def __init__(self, grace: float = DEFAULT_GRACE, path: Path | None = None,
                 restore_grace: float = RESTORE_GRACE) -> None:
        self.grace = grace
        self.path = path
        """Where the registry is kept across restarts (None: memory only)."""
        self.restore_grace = restore_grace
        self._entries: dict[str, Registration] = {}
        self._removals: dict[str, asyncio.TimerHandle] = {}
        self._sessions = 0
        self.generation = 0
        """Bumped by every change subscribers are told about."""
        self._subscribers: list[Callable[[str], None]] = []

    def subscribe(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` whenever the set of instances or their readiness changes."""
        self._subscribers.append(callback)

    def register(self, node: Node, ready: bool) -> int:
        """Add or refresh an instance from its sidecar's Hello; returns the session id for later calls."""
        self._cancel_removal(node.id)
        self._sessions += 1
        old = self._entries.get(node.id)
        self._entries[node.id] = Registration(node, ready, self._sessions, True, time.time())
        if old is None or old.node != node or old.ready != ready:
            self._notify(f"instance {node.id} registered")
        return self._sessions

    def set_ready(self, node_id: str, session: int, ready: bool) -> None:
        """Record a Health message; ignored from a superseded session."""
        entry = self._current(node_id, session)
        if entry is None or entry.ready == ready:
            return
        self._entries[node_id] = replace(entry, ready=ready, since=time.time())
        self._notify(f"instance {node_id} {'ready' if ready else 'not ready'}")

    def disconnect(self, node_id: str, session: int) -> None:
        """The session's stream closed: remove the instance after the grace period unless it reconnects."""
        entry = self._current(node_id, session)
        if entry is None:
            return
        self._entries[node_id] = replace(entry, connected=False, since=time.time())
        if self.grace <= 0:
            self._remove(node_id, session)
            return
        loop = asyncio.get_running_loop()
        self._removals[node_id] = loop.call_later(self.grace, self._remove, node_id, session)

    def restore(self) -> int:
        """Load the instances saved by a previous run as disconnected; returns how many. Needs a running loop
        (their removal is scheduled)."""
        if self.path is None:
            return 0
        try:
            data = json.loads(self.path.read_text())
            saved = [(Node.from_json(item["node"]), bool(item["ready"])) for item in data["instances"]]
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the saved registry %s: %s", self.path, exc)
            return 0
        loop = asyncio.get_running_loop()
        for node, ready in saved:
            if node.id in self._entries:
                continue
            self._sessions += 1
            self._entries[node.id] = Registration(node, ready, self._sessions, False, time.time())
            self._removals[node.id] = loop.call_later(self.restore_grace, self._remove, node.id,
                                                      self._sessions)
        if saved:
            self._notify(f"{len(saved)} instances restored")
        return len(saved)

    def get(self, node_id: str) -> Registration | None:
        return self._entries.get(node_id)

    def registrations(self) -> list[Registration]:
        """Every registered instance (connected or within its grace period), by node id."""
        return [self._entries[k] for k in sorted(self._entries)]

    def instances(self) -> tuple[Instance, ...]:
        """The instances to compile endpoints from, by node id."""
        return tuple(entry.instance for entry in self.registrations())

    def close(self) -> None:
        """Cancel pending removals (control plane shutdown)."""
        for handle in self._removals.values():
            handle.cancel()
        self._removals.clear()

    def describe(self, services: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """``GET /v1/registry``: each Service (raw resource) with the instances its selector picks, and all
        instances."""
        entries = self.registrations()
        out = []
        for raw in services:
            meta = raw.get("metadata") or {}
            spec = raw.get("spec") or {}
            name = str(meta.get("name", ""))
            namespace = str(meta.get("namespace") or "default")
            selector = {str(k): str(v) for k, v in (spec.get("selector") or {}).items()}
            members = [e for e in entries if e.node.namespace == namespace and _selects(selector, e.node)]
            out.append({"name": name, "namespace": namespace,
                        "host": f"{name}.{namespace}.svc.cluster.local",
                        "ports": list(spec.get("ports") or []), "selector": selector,
                        "instances": [{"id": e.node.id, "address": e.node.mesh_address, "ready": e.ready}
                                      for e in members]})
        return {"services": out, "instances": [e.to_json() for e in entries]}

    def _current(self, node_id: str, session: int) -> Registration | None:
        entry = self._entries.get(node_id)
        return entry if entry is not None and entry.session == session else None

    def _remove(self, node_id: str, session: int) -> None:
        self._removals.pop(node_id, None)
        entry = self._current(node_id, session)
        if entry is None or entry.connected:
            return
        del self._entries[node_id]
        self._notify(f"instance {node_id} removed")

    def _cancel_removal(self, node_id: str) -> None:
        handle = self._removals.pop(node_id, None)
        if handle is not None:
            handle.cancel()

    def _notify(self, reason: str) -> None:
        self.generation += 1
        log.debug("registry: %s", reason)
        self._save()
        for callback in list(self._subscribers):
            try:
                callback(reason)
            except Exception:
                log.exception("registry subscriber failed")


    def _save(self) -> None:
        if self.path is None:
            return
        body = {"instances": [{"node": e.node.to_json(), "ready": e.ready} for e in self.registrations()]}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Not fsynced: this is a cache of what sidecars will tell us again; a lost write costs little.
            atomic_write_json(self.path, body, durable=False)
        except OSError as exc:
            log.warning("cannot save the registry to %s: %s", self.path, exc)


def _selects(selector: Mapping[str, str], node: Node) -> bool:
    """Kubernetes semantics: an empty selector selects nothing (the Service has manual endpoints)."""
    if not selector:
        return False
    labels = dict(node.labels)
    return all(labels.get(k) == v for k, v in selector.items())
