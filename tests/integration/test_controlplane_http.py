"""The control plane's HTTP edge on real sockets, in process: keep-alive and pipelining, the upgrade to the
discovery stream (including bytes sent right behind the request), and the error answers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from kizuna.controlplane import httpserver
from kizuna.controlplane.push import PushQueue
from kizuna.controlplane.registry import Registry
from kizuna.controlplane.server import ControlPlaneServer
from kizuna.controlplane.store import MemoryStore
from kizuna.proxyconfig.bootstrap import Node
from kizuna.proxyconfig.xds import Ack, Framer, Hello, Push, encode

pytestmark = pytest.mark.integration

TOKEN = "t0ken-for-tests"
AUTH = f"Authorization: Bearer {TOKEN}\r\n"
UPGRADE = (f"GET /v1/discovery HTTP/1.1\r\nHost: cp\r\nConnection: Upgrade\r\nUpgrade: kizuna-xds\r\n"
           f"{AUTH}\r\n")


@asynccontextmanager
async def serving() -> AsyncIterator[tuple[ControlPlaneServer, int]]:
    store: MemoryStore[Any] = MemoryStore()
    registry = Registry(grace=0)
    pusher = PushQueue(store, registry)
    server = ControlPlaneServer(TOKEN, store, registry, pusher)
    _, port = await server.start("127.0.0.1", 0)
    task = asyncio.create_task(pusher.run())
    try:
        yield server, port
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers, body


def run(test: Callable[[ControlPlaneServer, int], Awaitable[None]]) -> None:
    async def main() -> None:
        async with serving() as (server, port):
            await test(server, port)

    asyncio.run(main())


def test_keep_alive_and_pipelined_requests_are_answered_in_order() -> None:
    async def body(server: ControlPlaneServer, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        apply = json.dumps({"documents": [{"source": "a.yaml", "index": 0, "resource": {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"},
            "spec": {"ports": [{"port": 80}]}}}]}).encode()
        head = f"POST /v1/apply HTTP/1.1\r\nHost: cp\r\n{AUTH}Content-Length: {len(apply)}\r\n\r\n"
        then = f"GET /v1/resources?kind=service HTTP/1.1\r\nHost: cp\r\n{AUTH}\r\n"
        writer.write(head.encode() + apply + then.encode())  # two requests in one segment
        status, headers, first = await read_response(reader)
        assert status == 200 and headers["connection"] == "keep-alive"
        assert json.loads(first)["results"][0]["action"] == "created"
        status, _, second = await read_response(reader)
        assert status == 200 and [i["metadata"]["name"] for i in json.loads(second)["items"]] == ["a"]

        writer.write(f"GET /v1/status HTTP/1.1\r\nHost: cp\r\n{AUTH}Connection: close\r\n\r\n".encode())
        status, headers, _ = await read_response(reader)
        assert status == 200 and headers["connection"] == "close"
        assert await reader.read() == b""
        writer.close()

    run(body)


def test_hello_sent_right_behind_the_upgrade_request_is_not_lost() -> None:
    async def body(server: ControlPlaneServer, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        node = Node(id="eager.default", workload="eager")
        writer.write(UPGRADE.encode() + encode(Hello(node)))
        status, headers, _ = await read_response(reader)
        assert status == 101 and headers["upgrade"] == "kizuna-xds"
        framer = Framer()
        messages = []
        while not messages:
            messages = framer.feed(await asyncio.wait_for(reader.read(65536), 5))
        push = messages[0]
        assert isinstance(push, Push)
        writer.write(encode(Ack(push.nonce, push.version)))
        await writer.drain()
        for _ in range(200):
            if server.pusher.status()["proxies"][0]["ackedVersion"] == push.version:
                break
            await asyncio.sleep(0.01)
        assert server.pusher.status()["proxies"][0]["ackedVersion"] == push.version
        writer.close()
        for _ in range(200):
            if not server.pusher.status()["proxies"][0]["connected"]:
                break
            await asyncio.sleep(0.01)
        assert server.pusher.status()["proxies"][0]["connected"] is False
        assert server.registry.registrations() == []  # grace 0 here

    run(body)


def test_a_stream_that_does_not_start_with_hello_is_closed() -> None:
    async def body(server: ControlPlaneServer, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(UPGRADE.encode() + b'{"type":"health","ready":true}\n')
        assert (await read_response(reader))[0] == 101
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(UPGRADE.encode() + b"this is not json\n")
        assert (await read_response(reader))[0] == 101
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert server.pusher.status()["proxies"] == []

    run(body)


@pytest.mark.parametrize(("request_bytes", "status"), [
    (f"GET /v1/discovery HTTP/1.1\r\nHost: cp\r\n{AUTH}\r\n".encode(), 426),
    (f"GET /v1/discovery HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n{AUTH}\r\n".encode(), 400),
    (f"DELETE /v1/status HTTP/1.1\r\n{AUTH}\r\n".encode(), 405),
    (f"POST /v1/apply HTTP/1.1\r\n{AUTH}Content-Length: 2\r\n\r\n[]".encode(), 400),
    (b"NOT HTTP AT ALL\r\n\r\n", 400),
])
def test_error_answers(request_bytes: bytes, status: int) -> None:
    async def body(server: ControlPlaneServer, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request_bytes)
        got, _, payload = await read_response(reader)
        assert got == status
        assert json.loads(payload)["errors"]
        writer.close()

    run(body)


def test_oversized_body_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpserver, "MAX_BODY", 1000)

    async def body(server: ControlPlaneServer, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST /v1/apply HTTP/1.1\r\n{AUTH}Content-Length: 5000\r\n\r\n".encode() + b"x" * 5000)
        status, _, payload = await read_response(reader)
        assert status == 413 and "larger than 1000 bytes" in json.loads(payload)["errors"][0]
        writer.close()

    run(body)
