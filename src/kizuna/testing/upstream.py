"""A small programmable HTTP/1.1 server for tests: the "app" behind a sidecar.

Written on asyncio streams with its own minimal parsing, independent of the proxy's parser, so the two check
each other. Every request is recorded. Paths choose the behaviour:

- ``/status/<code>`` — that status; ``/delay/<seconds>`` — answer after a pause;
- ``/bytes/<n>`` — n bytes with Content-Length; ``/chunked/<count>/<size>`` — a chunked body;
- ``/stream/<n>`` — n bytes delimited by closing the connection (no length);
- ``/close`` — close the connection without answering; ``/ws`` — ``101`` then echo raw bytes;
- anything else — 200 with a JSON echo of method, path, headers and body.

Every response carries ``x-upstream: <name>``; ``HEAD`` gets the head only. ``TcpEchoServer`` is the opaque
counterpart: it echoes bytes, optionally greeting first like a server-first protocol (SMTP, MySQL).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Self


@dataclass
class Recorded:
    """One request as the upstream saw it."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


@dataclass
class _Server:
    """What both test servers share: listen on ``address:port`` (0 = any free port) once ``start()`` is
    awaited; ``stop()`` closes the listener and every open connection."""

    address: str
    port: int = 0
    connections: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._serve, self.address, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


@dataclass
class UpstreamServer(_Server):
    """Serve on ``address:port`` (0 = any free port) once ``start()`` is awaited."""

    name: str = "upstream"
    status: int | None = None
    """When set, every request is answered with this status (e.g. 503 for a failing endpoint)."""
    delay: float = 0.0
    """Seconds to wait before answering every request (a slow endpoint)."""
    idle_close: float | None = None
    """Close keep-alive connections idle this long (an app with a short keep-alive timeout)."""
    drop: bool = False
    """Close every connection as soon as a request arrives, without answering (a crashing endpoint)."""
    close_reused: bool = False
    """Close, without answering, any request after a connection's first: the keep-alive race where the app
    closes an idle connection just as the proxy sends on it."""
    requests: list[Recorded] = field(default_factory=list)
    body_bytes_sent: int = 0
    """Chunked body bytes written so far (the socket took them), to watch backpressure reach the app."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            served = 0
            while await self._one(reader, writer, served):
                served += 1
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, served: int) -> bool:
        """Serve one request; False when the connection is to close."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.idle_close)
        except TimeoutError:
            return False
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        headers = [(k.strip(), v.strip()) for k, v in (line.split(":", 1) for line in lines[1:] if line)]
        names = {k.lower(): v for k, v in headers}
        body = b""
        if names.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    break
                body += (await reader.readexactly(size + 2))[:-2]
        elif "content-length" in names:
            body = await reader.readexactly(int(names["content-length"]))
        if self.drop or (self.close_reused and served > 0):
            return False
        self.requests.append(Recorded(method, target, version, headers, body))
        if self.delay:
            await asyncio.sleep(self.delay)
        keep_alive = names.get("connection", "").lower() != "close" and version == "HTTP/1.1"
        return await self._answer(method, target, names, body, keep_alive, reader, writer)

    async def _answer(self, method: str, target: str, names: dict[str, str], body: bytes, keep_alive: bool,
                      reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        path = target.split("?", 1)[0]
        parts = path.strip("/").split("/")
        extra: list[tuple[str, str]] = [("x-upstream", self.name)]
        status, payload = 200, b""
        if self.status is not None:
            status, payload = self.status, f"{self.name} says {self.status}\n".encode()
        elif parts[0] == "status":
            status = int(parts[1])
        elif parts[0] == "delay":
            await asyncio.sleep(float(parts[1]))
            payload = b"late\n"
        elif parts[0] == "bytes":
            payload = b"x" * int(parts[1])
        elif parts[0] == "close":
            return False
        elif parts[0] == "ws" and names.get("upgrade"):
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: " + names["upgrade"].encode()
                         + b"\r\nConnection: Upgrade\r\nx-upstream: " + self.name.encode() + b"\r\n\r\n")
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            return False
        elif parts[0] == "chunked":
            count, size = int(parts[1]), int(parts[2])
            writer.write(self._head(200, extra + [("transfer-encoding", "chunked")], keep_alive))
            if method != "HEAD":
                for i in range(count):
                    chunk = bytes([97 + i % 26]) * size
                    writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                    await writer.drain()
                    self.body_bytes_sent += size
                writer.write(b"0\r\n\r\n")
            await writer.drain()
            return keep_alive
        elif parts[0] == "stream":
            writer.write(self._head(200, extra, False) + (b"s" * int(parts[1])))
            await writer.drain()
            return False
        else:
            payload = json.dumps({"method": method, "path": target, "headers": dict(names),
                                  "body": body.decode("latin-1"), "upstream": self.name}).encode()
            extra.append(("content-type", "application/json"))
        writer.write(self._head(status, extra + [("content-length", str(len(payload)))], keep_alive))
        if method != "HEAD" and status not in (204, 304):
            writer.write(payload)
        await writer.drain()
        return keep_alive

    @staticmethod
    def _head(status: int, headers: list[tuple[str, str]], keep_alive: bool) -> bytes:
        lines = [f"HTTP/1.1 {status} Whatever"] + [f"{k}: {v}" for k, v in headers]
        if not keep_alive:
            lines.append("connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class TcpEchoServer(_Server):
    """Echoes every byte back; sends ``greeting`` first on each connection when set (server-first)."""

    greeting: bytes = b""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            if self.greeting:
                writer.write(self.greeting)
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()  # answer a half-close with one
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
