"""The config store: every applied resource, keyed by ``(kind, namespace, name)``, with a generation counter.

Istio's pilot reads config from a pluggable store (Kubernetes CRDs, files, memory). Ours holds already
validated resources. Writes are all-or-nothing: a batch builds a new mapping and swaps it in whole, so readers
(the push loop compiling snapshots) never see half of an apply and never take a lock. ``FileStore`` writes the
whole set to ``<state>/store/resources.json`` (temp file + fsync + rename) *before* the swap: if the write
fails, nothing changed, and a control plane killed at any instant restarts with either the old or the new set,
never a mix."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, Literal, Protocol, TypeVar

from kizuna.controlplane.files import atomic_write_json

log = logging.getLogger("kizuna.controlplane.store")

Key = tuple[str, str, str]
"""``(kind, namespace, name)``."""

Action = Literal["created", "configured", "unchanged", "deleted", "not found"]

STORE_DIR = "store"
STORE_FILE = "resources.json"
FORMAT_VERSION = 1


class StoredResource(Protocol):
    """What the store needs of a resource (``kizuna.api.Resource`` fits)."""

    @property
    def key(self) -> Key: ...

    @property
    def raw(self) -> dict[str, Any]: ...

    @property
    def source(self) -> str: ...


R = TypeVar("R", bound=StoredResource)


class StoreError(Exception):
    """The store could not persist a change; nothing was applied."""


@dataclass(frozen=True, slots=True)
class Result:
    """What happened to one resource of a batch (kubectl's wording)."""

    kind: str
    namespace: str
    name: str
    action: Action

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "namespace": self.namespace, "name": self.name, "action": self.action}


@dataclass(frozen=True, slots=True)
class Change:
    """Told to subscribers after a batch changed something."""

    generation: int
    keys: frozenset[Key]


def _result(key: Key, action: Action) -> Result:
    return Result(key[0], key[1], key[2], action)


Results = list[Result]  # spelled here because MemoryStore.list shadows the builtin in the class body


class MemoryStore(Generic[R]):
    """In-memory config store. Reads are lock-free on an immutable mapping; writers are serialised."""

    def __init__(self, resources: Iterable[R] = (), generation: int = 0) -> None:
        self._items: Mapping[Key, R] = MappingProxyType({r.key: r for r in resources})
        self._generation = generation
        self._write_lock = threading.Lock()
        self._subscribers: list[Callable[[Change], None]] = []

    @property
    def generation(self) -> int:
        """Bumped by every apply or delete that changed something."""
        return self._generation

    def subscribe(self, callback: Callable[[Change], None]) -> None:
        """Call ``callback`` after every batch that changed the store."""
        self._subscribers.append(callback)

    def get(self, key: Key) -> R | None:
        """The resource stored under ``key``, if any."""
        return self._items.get(key)

    def list(self, kind: str | None = None, namespace: str | None = None, name: str | None = None) -> list[R]:
        """Stored resources in key order, filtered; ``kind`` matches case-insensitively."""
        wanted_kind = kind.lower() if kind else None
        items = self._items  # one consistent view even if a writer swaps meanwhile
        return [items[k] for k in sorted(items)
                if (wanted_kind is None or k[0].lower() == wanted_kind)
                and (namespace is None or k[1] == namespace) and (name is None or k[2] == name)]

    def plan(self, resources: Sequence[R]) -> Results:
        """What ``apply`` would do, changing nothing (dry run)."""
        return self._plan_apply(resources)[1]

    def apply(self, resources: Sequence[R]) -> Results:
        """Create or replace every resource, all or none; one result per input, in order."""
        with self._write_lock:
            items, results = self._plan_apply(resources)
            changed = {r.key for r, res in zip(resources, results, strict=True) if res.action != "unchanged"}
            self._commit(items, changed)
            return results

    def delete(self, keys: Sequence[Key]) -> Results:
        """Remove every key present, all or none; absent keys report ``not found``."""
        with self._write_lock:
            items = dict(self._items)
            results: Results = []
            for key in keys:
                found = items.pop(key, None) is not None
                results.append(_result(key, "deleted" if found else "not found"))
            self._commit(items, {k for k, res in zip(keys, results, strict=True) if res.action == "deleted"})
            return results

    def _plan_apply(self, resources: Sequence[R]) -> tuple[dict[Key, R], Results]:
        items = dict(self._items)
        results: Results = []
        for resource in resources:
            old = items.get(resource.key)
            if old is None:
                action: Action = "created"
            elif old.raw == resource.raw:
                action = "unchanged"
            else:
                action = "configured"
            items[resource.key] = resource
            results.append(_result(resource.key, action))
        return items, results

    def _commit(self, items: dict[Key, R], changed: set[Key]) -> None:
        if not changed:
            return
        generation = self._generation + 1
        self._persist(items, generation)
        self._items = MappingProxyType(items)
        self._generation = generation
        change = Change(generation, frozenset(changed))
        for callback in list(self._subscribers):
            try:
                callback(change)
            except Exception:  # a broken subscriber must not undo or hide a committed change
                log.exception("store subscriber failed")

    def _persist(self, items: Mapping[Key, R], generation: int) -> None:
        """Hook for durable stores; raise StoreError to abort the batch."""


Parse = Callable[[str, int, dict[str, Any]], Any]
"""Turns one persisted document (source, index, raw) back into a resource; raises on invalid input."""


def parse_with_api(source: str, index: int, raw: dict[str, Any]) -> Any:
    """Re-validate a persisted document with ``kizuna.api`` (imported late: the store itself is generic)."""
    from kizuna.api.codec import Document
    from kizuna.api.validate import parse

    return parse(Document(source, index, raw))


class FileStore(MemoryStore[R]):
    """A MemoryStore that survives restarts: the whole set is rewritten atomically on every change."""

    def __init__(self, state_dir: str | Path, parse: Parse = parse_with_api) -> None:
        self.path = Path(state_dir) / STORE_DIR / STORE_FILE
        resources, generation = self._load(parse)
        super().__init__(resources, generation)

    def _load(self, parse: Parse) -> tuple[list[R], int]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return [], 0
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read the config store {self.path}: {exc}") from exc
        resources: list[R] = []
        for index, record in enumerate(data.get("resources", ())):
            try:
                resources.append(parse(str(record.get("source", "")), index, dict(record["raw"])))
            except Exception as exc:
                # A resource this version no longer accepts must not keep the whole mesh from starting.
                log.warning("dropping stored resource %s: %s", record.get("key"), exc)
        return resources, int(data.get("generation", 0))

    def _persist(self, items: Mapping[Key, R], generation: int) -> None:
        body = {"format": FORMAT_VERSION, "generation": generation,
                "resources": [{"key": list(k), "source": items[k].source, "raw": items[k].raw}
                              for k in sorted(items)]}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, body)
        except (OSError, TypeError, ValueError) as exc:
            raise StoreError(f"cannot write the config store {self.path}: {exc}") from exc
