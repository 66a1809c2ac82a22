"""A small asyncio HTTP/1.1 server for the control plane API: httptools parses, a handler answers.

No framework: the API is six routes on loopback. Requests are read whole (bodies are YAML documents, capped at
``MAX_BODY``) and handed to one ``Handler`` coroutine, which returns a ``Response`` or an ``Upgrade``. An
Upgrade answers ``101 Switching Protocols`` and gives the connection's streams to the upgrade's coroutine (the
discovery stream). Keep-alive is supported so the CLI and tests can reuse connections.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

import httptools

log = logging.getLogger("kizuna.controlplane.http")

MAX_HEAD = 64 * 1024
MAX_BODY = 32 * 1024 * 1024
IDLE_TIMEOUT = 300.0
"""A keep-alive connection with no request for this long is closed."""


@dataclass(frozen=True, slots=True)
class Request:
    """One complete request. Header names are lower-case; repeated headers are joined with ``, ``."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes = b""

    def param(self, name: str) -> str | None:
        """The first value of query parameter ``name``."""
        values = self.query.get(name)
        return values[0] if values else None


@dataclass(frozen=True, slots=True)
class Response:
    """A whole response."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def json_response(status: int, body: Any) -> Response:
    """A JSON response (the API's only kind)."""
    return Response(status, json.dumps(body, separators=(",", ":")).encode() + b"\n")


def error_response(status: int, *errors: str) -> Response:
    """The API's error shape: ``{"errors": [...]}``."""
    return json_response(status, {"errors": list(errors)})


StreamRunner = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[None]]
"""Runs an upgraded connection; the bytes are what the peer sent after its request, already read."""


@dataclass(frozen=True, slots=True)
class Upgrade:
    """Switch the connection to ``protocol`` and run ``run`` on its streams until it returns."""

    protocol: str
    run: StreamRunner


Handler = Callable[[Request], Awaitable[Response | Upgrade]]


class RequestTooLarge(Exception):
    """A request over a size limit; answered with ``status`` (413 or 431) and the connection closed."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class _Collector:
    """httptools callbacks: collects complete requests (pipelined ones included) in arrival order."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.ready: deque[tuple[Request, bool, bool]] = deque()
        """(request, keep-alive, asks to upgrade)."""
        self._begin()

    def _begin(self) -> None:
        self._url = bytearray()
        self._headers: dict[str, str] = {}
        self._body = bytearray()
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self._headers[key] = f"{self._headers[key]}, {text}" if key in self._headers else text

    def on_body(self, body: bytes) -> None:
        if len(self._body) + len(body) > MAX_BODY:
            raise RequestTooLarge(413, f"request body larger than {MAX_BODY} bytes")
        self._body += body

    def on_message_complete(self) -> None:
        url = httptools.parse_url(bytes(self._url))
        request = Request(self.parser.get_method().decode(), url.path.decode("latin-1"),
                          parse_qs((url.query or b"").decode("latin-1")), self._headers, bytes(self._body))
        self.ready.append((request, self.parser.should_keep_alive(), self.parser.should_upgrade()))
        self._begin()

    def _count(self, n: int) -> None:
        self._head_size += n
        if self._head_size > MAX_HEAD:
            raise RequestTooLarge(431, f"request head larger than {MAX_HEAD} bytes")


class HttpServer:
    """Serves ``handler`` on one TCP listener."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> tuple[str, int]:
        """Listen (over TLS with ``tls``); returns the bound address (port 0 picks a free one)."""
        self._server = await asyncio.start_server(self._serve, host, port, ssl=tls)
        bound = self._server.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    async def close(self) -> None:
        """Stop listening and end every connection, upgraded ones included."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._connection(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:
            pass  # server shutdown
        except Exception:
            log.exception("control plane connection failed")
        finally:
            self._connections.discard(task)
            writer.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        collector = _Collector()
        upgraded_rest = b""
        while True:
            while not collector.ready:
                data = await asyncio.wait_for(reader.read(65536), IDLE_TIMEOUT)
                if not data:
                    return  # the peer closed between requests
                try:
                    collector.parser.feed_data(data)
                except httptools.HttpParserUpgrade as upgrade:
                    # Bytes after the upgrade request already belong to the new protocol.
                    upgraded_rest = data[int(upgrade.args[0]):]
                except httptools.HttpParserError as exc:
                    # httptools wraps what a callback raised; the limit checks raise RequestTooLarge there.
                    cause = exc.__context__
                    refusal = error_response(cause.status, str(cause)) if isinstance(cause, RequestTooLarge) \
                        else error_response(400, f"malformed request: {exc}")
                    await _write(writer, refusal, keep_alive=False)
                    return
            request, keep_alive, wants_upgrade = collector.ready.popleft()
            answer: Response | Upgrade
            try:
                answer = await self._handler(request)
            except Exception:
                log.exception("handler failed for %s %s", request.method, request.path)
                answer = error_response(500, "internal error in the control plane (see its log)")
            if isinstance(answer, Upgrade):
                if not wants_upgrade:
                    needs = error_response(426, f"this endpoint needs Upgrade: {answer.protocol}")
                    await _write(writer, needs, keep_alive=False)
                    return
                writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: "
                             + answer.protocol.encode("latin-1") + b"\r\n\r\n")
                await writer.drain()
                await answer.run(reader, writer, upgraded_rest)
                return
            # After an upgrade request the parser is done with this connection, whatever the answer.
            keep_alive = keep_alive and not wants_upgrade
            await _write(writer, answer, keep_alive=keep_alive)
            if not keep_alive:
                return


async def _write(writer: asyncio.StreamWriter, response: Response, keep_alive: bool) -> None:
    reason = HTTPStatus(response.status).phrase
    head = [f"HTTP/1.1 {response.status} {reason}", f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}", f"Connection: {'keep-alive' if keep_alive else 'close'}"]
    head += [f"{name}: {value}" for name, value in response.headers]
    writer.write("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + response.body)
    await writer.drain()
