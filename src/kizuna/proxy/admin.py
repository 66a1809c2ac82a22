"""The sidecar's admin port: ``GET /ready``, ``GET /stats``, ``GET /stats/prometheus``, ``GET /config_dump``
(Envoy's admin, tiny); the Prometheus port (15090) serves ``/stats/prometheus`` alone. The status port (15020,
``merged_metrics``) is served by the same small server with its own responder.

Not on the request path, so it is plain asyncio streams, one request per connection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

MAX_REQUEST_HEAD = 8192


class AdminView(Protocol):
    """What the admin port shows of a sidecar."""

    @property
    def ready(self) -> bool: ...

    def not_ready_reason(self) -> str: ...

    def stats_json(self) -> dict[str, Any]: ...

    def config_json(self) -> dict[str, Any]: ...

    def prometheus_text(self) -> str: ...


PROMETHEUS_PATH = "/stats/prometheus"
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


Responder = Callable[[str, str], Awaitable[tuple[int, str, bytes]]]
"""``(method, path without query) -> (status, content type, body)``."""
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def admin_protocol(view: AdminView, metrics_only: bool = False) -> asyncio.BaseProtocol:
    """A protocol serving one admin connection (``metrics_only``: the Prometheus port)."""

    async def answer(method: str, path: str) -> tuple[int, str, bytes]:
        if metrics_only and path != PROMETHEUS_PATH:
            return 404, "text/plain", b"not found\n"
        return respond(view, method, path)

    return http_protocol(answer)


def http_protocol(answer: Responder) -> asyncio.BaseProtocol:
    """A protocol serving one request on one connection with ``answer``, then closing it."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_REQUEST_HEAD, loop=loop)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
                method, path, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
                status, ctype, body = 400, "text/plain", b"bad request\n"
            else:
                status, ctype, body = await answer(method, path.split("?", 1)[0])
            writer.write(f"HTTP/1.1 {status} {REASONS[status]}\r\ncontent-type: {ctype}\r\n"
                         f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
            try:
                await writer.drain()
            except OSError:
                pass
        finally:
            writer.close()  # also when the answer failed: never leave a scraper waiting on an open socket

    return asyncio.StreamReaderProtocol(reader, serve, loop=loop)


def respond(view: AdminView, method: str, path: str) -> tuple[int, str, bytes]:
    """Status, content type and body for one admin request."""
    if path not in ("/ready", "/stats", "/config_dump", PROMETHEUS_PATH):
        return 404, "text/plain", b"not found\n"
    if method != "GET":
        return 405, "text/plain", b"method not allowed\n"
    if path == "/ready":
        if view.ready:
            return 200, "text/plain", b"ready\n"
        return 503, "text/plain", f"not ready: {view.not_ready_reason()}\n".encode()
    if path == PROMETHEUS_PATH:
        return 200, PROMETHEUS_TYPE, view.prometheus_text().encode()
    data = view.stats_json() if path == "/stats" else view.config_json()
    return 200, "application/json", json.dumps(data, indent=1).encode() + b"\n"
