"""The config store: kubectl-like results, all-or-nothing batches, generations, persistence across
restarts."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kizuna.controlplane.store import Change, FileStore, MemoryStore, StoreError


@dataclass(frozen=True)
class Res:
    """The store is generic over anything with key, raw and source; this is the smallest such thing."""

    raw: dict[str, Any]
    source: str = "test.yaml"

    @property
    def key(self) -> tuple[str, str, str]:
        meta = self.raw["metadata"]
        return (self.raw["kind"], meta.get("namespace", "default"), meta["name"])


def parse(source: str, index: int, raw: dict[str, Any]) -> Res:
    return Res(raw, source)


def svc(name: str, port: int = 80, namespace: str = "default") -> Res:
    return Res({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
                "spec": {"selector": {"app": name}, "ports": [{"port": port}]}})


def actions(results: list[Any]) -> list[tuple[str, str]]:
    return [(r.name, r.action) for r in results]


def test_apply_reports_created_configured_unchanged_and_bumps_generation_only_on_change() -> None:
    store: MemoryStore[Res] = MemoryStore()
    changes: list[Change] = []
    store.subscribe(changes.append)

    assert actions(store.apply([svc("a"), svc("b")])) == [("a", "created"), ("b", "created")]
    assert store.generation == 1
    assert actions(store.apply([svc("a"), svc("b", port=81)])) == [("a", "unchanged"), ("b", "configured")]
    assert store.generation == 2
    assert actions(store.apply([svc("a")])) == [("a", "unchanged")]
    assert store.generation == 2, "a no-op apply must not wake the push queue"

    assert [c.generation for c in changes] == [1, 2]
    assert changes[1].keys == {("Service", "default", "b")}
    assert store.get(("Service", "default", "b")) == svc("b", port=81)


def test_same_key_twice_in_one_batch_is_created_then_configured() -> None:
    store: MemoryStore[Res] = MemoryStore()
    assert actions(store.apply([svc("a", 80), svc("a", 81)])) == [("a", "created"), ("a", "configured")]
    assert store.list()[0].raw["spec"]["ports"] == [{"port": 81}]
    assert store.generation == 1


def test_plan_is_a_dry_run() -> None:
    store: MemoryStore[Res] = MemoryStore([svc("a")])
    assert actions(store.plan([svc("a", 81), svc("b")])) == [("a", "configured"), ("b", "created")]
    assert store.list() == [svc("a")]
    assert store.generation == 0


def test_list_filters_by_kind_case_insensitively_namespace_and_name() -> None:
    vs = Res({"kind": "VirtualService", "metadata": {"name": "a"}, "spec": {}})
    store: MemoryStore[Res] = MemoryStore()
    store.apply([svc("b"), svc("a"), svc("a", namespace="other"), vs])
    assert [r.key for r in store.list()] == [("Service", "default", "a"), ("Service", "default", "b"),
                                             ("Service", "other", "a"), ("VirtualService", "default", "a")]
    assert [r.key for r in store.list(kind="service", namespace="default")] == [
        ("Service", "default", "a"), ("Service", "default", "b")]
    assert [r.key for r in store.list(name="a")] == [("Service", "default", "a"), ("Service", "other", "a"),
                                                     ("VirtualService", "default", "a")]
    assert store.list(kind="virtualservice", name="a") == [vs]


def test_delete_reports_deleted_and_not_found() -> None:
    store: MemoryStore[Res] = MemoryStore([svc("a")])
    results = store.delete([("Service", "default", "a"), ("Service", "default", "zzz")])
    assert actions(results) == [("a", "deleted"), ("zzz", "not found")]
    assert store.list() == []
    assert store.generation == 1
    assert actions(store.delete([("Service", "default", "a")])) == [("a", "not found")]
    assert store.generation == 1


def test_file_store_survives_restart(tmp_path: Path) -> None:
    store: FileStore[Res] = FileStore(tmp_path, parse)
    store.apply([svc("a"), svc("b")])
    store.apply([svc("b", port=8080)])
    store.delete([("Service", "default", "a")])

    reopened: FileStore[Res] = FileStore(tmp_path, parse)
    assert reopened.list() == [svc("b", port=8080)]
    assert reopened.generation == store.generation == 3
    # Only the committed file is left behind: no temp files.
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["resources.json"]


def test_failed_persist_changes_nothing(tmp_path: Path) -> None:
    store: FileStore[Res] = FileStore(tmp_path, parse)
    store.apply([svc("a")])
    seen: list[Change] = []
    store.subscribe(seen.append)
    # Make the store directory unusable (a plain file where the directory was): every write now fails.
    shutil.rmtree(tmp_path / "store")
    (tmp_path / "store").write_text("not a directory")

    with pytest.raises(StoreError, match="cannot write the config store"):
        store.apply([svc("a", port=81), svc("b")])
    with pytest.raises(StoreError):
        store.delete([("Service", "default", "a")])
    assert store.list() == [svc("a")]
    assert store.generation == 1
    assert seen == []


def test_unreadable_store_file_is_an_error_not_an_empty_mesh(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "resources.json").write_text("{truncated")
    with pytest.raises(StoreError, match="cannot read the config store"):
        FileStore(tmp_path, parse)


def test_a_stored_resource_that_no_longer_parses_is_dropped_not_fatal(tmp_path: Path) -> None:
    store: FileStore[Res] = FileStore(tmp_path, parse)
    store.apply([svc("good"), svc("bad")])

    def picky(source: str, index: int, raw: dict[str, Any]) -> Res:
        if raw["metadata"]["name"] == "bad":
            raise ValueError("spec.ports[0].port: field required")
        return Res(raw, source)

    assert FileStore(tmp_path, picky).list() == [svc("good")]


def test_store_file_is_json_with_sources(tmp_path: Path) -> None:
    store: FileStore[Res] = FileStore(tmp_path, parse)
    store.apply([Res(svc("a").raw, source="manifests/a.yaml")])
    data = json.loads((tmp_path / "store" / "resources.json").read_text())
    assert data["generation"] == 1
    assert data["resources"] == [{"key": ["Service", "default", "a"], "source": "manifests/a.yaml",
                                  "raw": svc("a").raw}]
    assert os.stat(tmp_path / "store" / "resources.json").st_size > 0
