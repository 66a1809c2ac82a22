"""The push queue and the registry: debounce and merge, skip unchanged proxies, ACK/NACK tracking, readiness
and the reconnect grace period. Runs the real store, registry and compiler with in-memory streams."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from kizuna.api.codec import Document
from kizuna.api.validate import parse_all
from kizuna.controlplane.push import Generate, PushQueue, mesh_generator
from kizuna.controlplane.registry import Registry
from kizuna.controlplane.store import MemoryStore
from kizuna.proxyconfig.bootstrap import Node
from kizuna.proxyconfig.model import Snapshot
from kizuna.proxyconfig.xds import Ack, Message, Nack, Push


class MemorySink:
    """A proxy's stream, kept in memory: what the control plane sent, and whether it closed it."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.closed = False

    def send(self, message: Message) -> None:
        self.messages.append(message)

    def close(self) -> None:
        self.closed = True

    @property
    def pushes(self) -> list[Push]:
        return [m for m in self.messages if isinstance(m, Push)]

    def last_snapshot(self) -> Snapshot:
        return Snapshot.from_json(self.pushes[-1].snapshot)


def service(name: str, port: int = 8000, target_port: int = 80) -> Any:
    raw = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
           "spec": {"selector": {"app": name},
                    "ports": [{"name": "http", "port": port, "targetPort": target_port}]}}
    (resource,) = parse_all([Document("test.yaml", 0, raw)])
    return resource


def node(name: str, app: str, address: str) -> Node:
    return Node(id=f"{name}.default", workload=name, labels=(("app", app),), pod_address=address,
                mesh_address=address, ports=(80,))


def endpoints(snapshot: Snapshot, service_name: str) -> set[tuple[str, int]]:
    return {(e.address, e.port) for c in snapshot.clusters if c.service.startswith(service_name + ".")
            for e in c.endpoints}


def vhost_ports(snapshot: Snapshot, service_name: str) -> set[int]:
    return {v.port for v in snapshot.virtual_hosts if service_name in v.hosts}


async def eventually(check: Callable[[], bool], timeout: float = 2.0) -> float:
    """Wait until ``check()`` holds; returns how long it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


def run(test: Callable[[PushQueue, MemoryStore[Any], Registry], Awaitable[None]], grace: float = 2.0,
        after: float = 0.1, max_wait: float = 1.0, prepare: Any = mesh_generator) -> None:
    async def main() -> None:
        store: MemoryStore[Any] = MemoryStore()
        registry = Registry(grace=grace)
        queue = PushQueue(store, registry, prepare, debounce_after=after, debounce_max=max_wait)
        task = asyncio.create_task(queue.run())
        try:
            await test(queue, store, registry)
        finally:
            task.cancel()
            registry.close()
            await asyncio.gather(task, return_exceptions=True)

    coro: Coroutine[Any, Any, None] = main()
    asyncio.run(coro)


def test_new_proxy_is_pushed_at_once_and_a_burst_of_applies_is_merged() -> None:
    async def body(queue: PushQueue, store: MemoryStore[Any], registry: Registry) -> None:
        sink = MemorySink()
        queue.connect(node("client", "client", "127.30.0.2"), "", True, sink)
        assert len(sink.pushes) == 1, "the first snapshot must not wait for the debounce"

        for i in range(20):  # 20 applies, 10 ms apart: never 100 ms quiet
            store.apply([service("reviews", port=9000 + i)])
            await asyncio.sleep(0.01)
        last_apply = time.monotonic()
        await eventually(lambda: bool(sink.pushes) and vhost_ports(sink.last_snapshot(), "reviews") == {9019})
        latency = time.monotonic() - last_apply
        await asyncio.sleep(0.3)  # nothing else may trickle in afterwards

        assert latency < 1.0
        assert 2 <= len(sink.pushes) <= 3, f"{len(sink.pushes) - 1} pushes for one burst of 20 applies"
        assert queue.cycles <= 2

    run(body)


def test_a_steady_trickle_of_changes_still_pushes_after_debounce_max() -> None:
    async def body(queue: PushQueue, store: MemoryStore[Any], registry: Registry) -> None:
        sink = MemorySink()
        queue.connect(node("client", "client", "127.30.0.2"), "", True, sink)
        start = time.monotonic()
        first_push_at = None
        for i in range(30):  # 50 ms apart for 1.5 s: the 100 ms quiet period never comes
            store.apply([service("reviews", port=9000 + i)])
            await asyncio.sleep(0.05)
            if first_push_at is None and len(sink.pushes) > 1:
                first_push_at = time.monotonic() - start
        assert first_push_at is not None and first_push_at < 1.3

    run(body, max_wait=0.5)


def test_only_proxies_whose_snapshot_changed_are_pushed() -> None:
    async def body(queue: PushQueue, store: MemoryStore[Any], registry: Registry) -> None:
        store.apply([service("reviews")])
        client = MemorySink()
        queue.connect(node("client", "client", "127.30.0.2"), "", True, client)
        await asyncio.sleep(0.25)
        before = len(client.pushes)

        # An instance that no Service selects changes nothing the client sees.
        queue.connect(node("batch", "batch-job", "127.30.0.4"), "", True, MemorySink())
        await asyncio.sleep(0.3)
        assert len(client.pushes) == before

        # A ready reviews instance does: it becomes an endpoint of the client's reviews cluster.
        queue.connect(node("reviews-v1", "reviews", "127.30.0.3"), "", True, MemorySink())
        await eventually(lambda: endpoints(client.last_snapshot(), "reviews") == {("127.30.0.3", 80)})
        assert len(client.pushes) == before + 1

    run(body)


def test_readiness_changes_add_and_remove_endpoints() -> None:
    async def body(queue: PushQueue, store: MemoryStore[Any], registry: Registry) -> None:
        store.apply([service("reviews")])
        client = MemorySink()
        queue.connect(node("client", "client", "127.30.0.2"), "", True, client)
        reviews = queue.connect(node("reviews-v1", "reviews", "127.30.0.3"), "", False, MemorySink())
        await asyncio.sleep(0.25)
        assert endpoints(client.last_snapshot(), "reviews") == set()

        queue.health(reviews, True)
        await eventually(lambda: endpoints(client.last_snapshot(), "reviews") == {("127.30.0.3", 80)})
        queue.health(reviews, False)
        await eventually(lambda: endpoints(client.last_snapshot(), "reviews") == set())
        status = {p["id"]: p for p in queue.status()["proxies"]}
        assert status["reviews-v1.default"]["ready"] is False

    run(body)


def test_ack_and_nack_are_tracked_per_proxy() -> None:
    async def body(queue: PushQueue, store: MemoryStore[Any], registry: Registry) -> None:
        sink = MemorySink()
        conn = queue.connect(node("client", "client", "127.30.0.2"), "", True, sink)
        first = sink.pushes[-1]
        queue.ack(conn, Ack(first.nonce, first.version))
        (proxy,) = queue.status()["proxies"]
        assert (proxy["ackedVersion"], proxy["nack"], proxy["synced"]) == (first.version, None, True)

        store.apply([service("reviews")])
        await eventually(lambda: len(sink.pushes) == 2)
        second = sink.pushes[-1]
        assert second.version != first.version
        assert second.version.startswith(f"{store.generation}-")
        queue.nack(conn, Nack(second.nonce, first.version, "cannot listen on 127.30.0.2:80: in use"))
        (proxy,) = queue.status()["proxies"]
        assert proxy["ackedVersion"] == first.version, "a NACKed proxy still runs its last good version"
        assert proxy["nack"] == "cannot listen on 127.30.0.2:80: in use"
        assert proxy["synced"] is False

        # A late ACK for an older nonce must not mark the proxy as running the newest version.
        queue.ack(conn, Ack(first.nonce, first.version))
        assert queue.status()["proxies"][0]["nack"] is not None

        store.apply([service("reviews", port=9999)])
        await eventually(lambda: len(sink.pushes) == 3)
        third = sink.pushes[-1]
        queue.ack(conn, Ack(third.nonce, third.version))
        (proxy,) = queue.status()["proxies"]
        assert (proxy["ackedVersion"], proxy["nack"], proxy["synced"]) == (third.version, None, True)

    run(body)


def test_a_nacked_snapshot_is_not_pushed_again_until_it_changes() -> None:
    async def body(queue: PushQueue, store: MemoryStore[Any], registry: Registry) -> None:
        store.apply([service("reviews")])
        sink = MemorySink()
        conn = queue.connect(node("client", "client", "127.30.0.2"), "", True, sink)
        queue.nack(conn, Nack(sink.pushes[-1].nonce, "", "no"))
        queue.connect(node("batch", "batch-job", "127.30.0.4"), "", True, MemorySink())  # an unrelated change
        await asyncio.sleep(0.3)
        assert len(sink.pushes) == 1

    run(body)


def test_reconnect_with_the_current_version_is_not_pushed_again() -> None:
    async def body(queue: PushQueue, store: MemoryStore[Any], registry: Registry) -> None:
        store.apply([service("reviews")])
        first = MemorySink()
        conn = queue.connect(node("client", "client", "127.30.0.2"), "", True, first)
        version = first.pushes[-1].version
        queue.ack(conn, Ack(first.pushes[-1].nonce, version))
        queue.disconnect(conn)

        again = MemorySink()
        queue.connect(node("client", "client", "127.30.0.2"), version, True, again)
        assert again.pushes == []
        (proxy,) = queue.status()["proxies"]
        assert (proxy["connected"], proxy["ackedVersion"], proxy["synced"]) == (True, version, True)

        stale = MemorySink()
        queue.connect(node("client", "client", "127.30.0.2"), "0-0123456789abcdef", True, stale)
        assert len(stale.pushes) == 1
        assert again.closed, "a newer stream of the same proxy replaces the old one"

    run(body)


def test_a_disconnected_instance_stays_for_the_grace_period() -> None:
    async def body(queue: PushQueue, store: MemoryStore[Any], registry: Registry) -> None:
        store.apply([service("reviews")])
        client = MemorySink()
        queue.connect(node("client", "client", "127.30.0.2"), "", True, client)
        reviews_node = node("reviews-v1", "reviews", "127.30.0.3")
        conn = queue.connect(reviews_node, "", True, MemorySink())
        await eventually(lambda: endpoints(client.last_snapshot(), "reviews") == {("127.30.0.3", 80)})
        pushes = len(client.pushes)

        # A quick reconnect: the endpoint never leaves the client's snapshot.
        queue.disconnect(conn)
        await asyncio.sleep(0.15)
        conn = queue.connect(reviews_node, "", True, MemorySink())
        await asyncio.sleep(0.5)
        assert len(client.pushes) == pushes
        assert [r.node.id for r in registry.registrations()] == ["client.default", "reviews-v1.default"]

        # Gone for good: removed after the grace period, and the client is told.
        queue.disconnect(conn)
        status = {p["id"]: p for p in queue.status()["proxies"]}
        assert status["reviews-v1.default"]["connected"] is False
        waited = await eventually(lambda: endpoints(client.last_snapshot(), "reviews") == set())
        assert 0.3 <= waited < 1.5
        assert [r.node.id for r in registry.registrations()] == ["client.default"]
        seen = {p["id"] for p in queue.status()["proxies"]}
        assert "reviews-v1.default" in seen, "status lists every proxy seen since start"

    run(body, grace=0.4)


def test_a_compile_failure_is_reported_and_other_proxies_still_get_pushed() -> None:
    def prepare(resources: Any, instances: Any) -> Generate:
        generate = mesh_generator(resources, instances)

        def picky(node: Node, version: str) -> Snapshot:
            if node.workload == "broken":  # stands for a compiler bug that hits one proxy only
                raise RuntimeError("cannot compile")
            return generate(node, version)

        return picky

    async def body(queue: PushQueue, store: MemoryStore[Any], registry: Registry) -> None:
        good, bad = MemorySink(), MemorySink()
        queue.connect(node("good", "good", "127.30.0.2"), "", True, good)
        queue.connect(node("broken", "broken", "127.30.0.3"), "", True, bad)
        store.apply([service("reviews")])
        await eventually(lambda: bool(good.pushes) and vhost_ports(good.last_snapshot(), "reviews") == {8000})
        status = {p["id"]: p for p in queue.status()["proxies"]}
        assert bad.pushes == []
        assert status["broken.default"]["error"] == "RuntimeError: cannot compile"
        assert status["good.default"]["error"] is None

    run(body, prepare=prepare)


@pytest.mark.parametrize("ready", [True, False])
def test_registry_describes_services_with_their_instances(ready: bool) -> None:
    async def body(queue: PushQueue, store: MemoryStore[Any], registry: Registry) -> None:
        store.apply([service("reviews")])
        queue.connect(node("reviews-v1", "reviews", "127.30.0.3"), "", ready, MemorySink())
        queue.connect(node("client", "client", "127.30.0.2"), "", True, MemorySink())
        described = registry.describe([r.raw for r in store.list(kind="Service")])
        (svc,) = described["services"]
        assert svc["host"] == "reviews.default.svc.cluster.local"
        assert svc["instances"] == [{"id": "reviews-v1.default", "address": "127.30.0.3", "ready": ready}]
        assert [i["id"] for i in described["instances"]] == ["client.default", "reviews-v1.default"]

    run(body)


def test_the_registry_is_restored_after_a_restart_and_forgets_instances_that_do_not_return(
        tmp_path: Path) -> None:
    path = tmp_path / "store" / "registry.json"
    reviews = node("reviews-v1", "reviews", "127.30.0.3")
    ratings = node("ratings-v1", "ratings", "127.30.0.5")

    async def first_run() -> None:
        registry = Registry(path=path)
        registry.register(reviews, True)
        registry.register(ratings, False)

    async def second_run() -> None:
        registry = Registry(path=path, restore_grace=0.3)
        reasons: list[str] = []
        registry.subscribe(reasons.append)
        assert registry.restore() == 2
        restored = {r.node.id: r for r in registry.registrations()}
        assert {k: (r.node, r.ready, r.connected) for k, r in restored.items()} == {
            "reviews-v1.default": (reviews, True, False), "ratings-v1.default": (ratings, False, False)}

        # reviews' sidecar comes back in time, unchanged: nothing to tell the push queue.
        reasons.clear()
        registry.register(reviews, True)
        assert reasons == []
        await asyncio.sleep(0.5)
        assert [r.node.id for r in registry.registrations()] == ["reviews-v1.default"]
        assert reasons == ["instance ratings-v1.default removed"]
        registry.close()

    asyncio.run(first_run())
    asyncio.run(second_run())
    assert [i["node"]["id"] for i in json.loads(path.read_text())["instances"]] == ["reviews-v1.default"]
