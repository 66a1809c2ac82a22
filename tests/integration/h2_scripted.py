"""Scripted upstreams and a small h2c client for the retry and response-flag tests.

``ScriptedHttp`` is the programmable HTTP/1.1 test app (``kizuna.testing.upstream``) that first plays a script
(one status per request; ``0`` closes the connection without answering, ``-1`` sends half a response and
closes) and records when each request arrived. ``ScriptedH2`` is an h2c app written on the ``h2`` library that
plays the same kind of script for HTTP/2: a status, a trailers-only gRPC status, a REFUSED_STREAM reset or a
response cut short by a reset.
``h2_call`` sends one request over h2c and returns what the client saw.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field
from typing import Any, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from kizuna.testing.upstream import UpstreamServer

CLOSE: int = 0
"""Script entry: close the connection without answering (an upstream reset before the response)."""
HALF: int = -1
"""Script entry: send the head and part of the body, then close (an upstream disconnect mid-response)."""


@dataclass
class ScriptedHttp(UpstreamServer):
    """The test app, answering its first requests from ``script``, then as usual."""

    script: list[int] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    """``time.monotonic()`` at each request's arrival (its whole body read)."""

    async def _answer(self, method: str, target: str, names: dict[str, str], body: bytes, keep_alive: bool,
                      reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        self.arrivals.append(time.monotonic())
        if not self.script:
            return await super()._answer(method, target, names, body, keep_alive, reader, writer)
        status = self.script.pop(0)
        if status == CLOSE:
            return False
        if status == HALF:
            writer.write(self._head(200, [("x-upstream", self.name), ("content-length", "100")], keep_alive)
                         + b"x" * 10)
            await writer.drain()
            return False
        payload = f"{self.name} says {status}\n".encode()
        writer.write(self._head(status, [("x-upstream", self.name), ("content-length", str(len(payload)))],
                                keep_alive) + payload)
        await writer.drain()
        return keep_alive


REFUSE = "refuse"
"""h2 script entry: reset the stream with REFUSED_STREAM (the server did not process it)."""
CUT = "cut"
"""h2 script entry: response headers and a little data, then an INTERNAL_ERROR reset (cut mid-response)."""


class _H2App(asyncio.Protocol):
    def __init__(self, app: ScriptedH2) -> None:
        self.app = app
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                         header_encoding="utf-8"))
        self.transport: asyncio.Transport | None = None
        self.heads: dict[int, dict[str, str]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.app.transports.add(self.transport)
        self.conn.initiate_connection()
        self.transport.write(self.conn.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.app.transports.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.heads[event.stream_id] = {str(k): str(v) for k, v in event.headers}
                if event.stream_ended is not None:
                    self._answer(event.stream_id)
            elif isinstance(event, h2.events.DataReceived):
                self.app.body_bytes += len(event.data)
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id in self.heads:
                self._answer(event.stream_id)
        if self.transport is not None:
            self.transport.write(self.conn.data_to_send())

    def _answer(self, stream_id: int) -> None:
        head = self.heads.pop(stream_id, None)
        if head is None:
            return
        app = self.app
        app.arrivals.append(time.monotonic())
        app.requests.append(head)
        grpc = head.get("content-type", "").startswith("application/grpc")
        step: Any = app.script.pop(0) if app.script else None
        if step == REFUSE:
            self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
        elif step == CUT:
            self.conn.send_headers(stream_id, [(":status", "200"), ("x-upstream", app.name)])
            self.conn.send_data(stream_id, b"partial")
            self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
        elif isinstance(step, tuple):  # ("grpc", code): a trailers-only gRPC error
            self.conn.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc"),
                                               ("grpc-status", str(step[1])), ("grpc-message", "scripted"),
                                               ("x-upstream", app.name)], end_stream=True)
        elif isinstance(step, int):
            self.conn.send_headers(stream_id, [(":status", str(step)), ("x-upstream", app.name)],
                                   end_stream=True)
        elif grpc:
            self.conn.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc"),
                                               ("x-upstream", app.name)])
            self.conn.send_data(stream_id, b"\x00\x00\x00\x00\x02ok")
            self.conn.send_headers(stream_id, [("grpc-status", "0")], end_stream=True)
        else:
            self.conn.send_headers(stream_id, [(":status", "200"), ("x-upstream", app.name)])
            self.conn.send_data(stream_id, b"ok", end_stream=True)


@dataclass
class ScriptedH2:
    """An h2c app on ``address`` (any free port): its first requests answered from ``script`` (``REFUSE``,
    ``CUT``, ``("grpc", code)`` or an HTTP status), then 200 ``ok`` (a gRPC OK for a gRPC request)."""

    address: str
    name: str = "h2app"
    script: list[Any] = field(default_factory=list)
    port: int = 0
    arrivals: list[float] = field(default_factory=list)
    requests: list[dict[str, str]] = field(default_factory=list)
    body_bytes: int = 0
    transports: set[asyncio.Transport] = field(default_factory=set)
    _server: asyncio.Server | None = None

    async def start(self) -> ScriptedH2:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _H2App(self), self.address, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for transport in list(self.transports):
            transport.close()
        if self._server is not None:
            await self._server.wait_closed()


@dataclass
class Answer:
    """One HTTP/2 response as the client saw it."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    trailers: dict[str, str] = field(default_factory=dict)
    reset: bool = False

    def grpc_status(self) -> str | None:
        return self.trailers.get("grpc-status", self.headers.get("grpc-status"))


def h2_call(address: str, authority: str, path: str = "/", headers: tuple[tuple[str, str], ...] = (),
            body: bytes = b"", method: str = "GET", port: int = 15001, timeout: float = 20.0) -> Answer:
    """One request over a fresh h2c connection to ``address:port``; what came back."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    answer = Answer()
    deadline = time.monotonic() + timeout
    with socket.create_connection((address, port), timeout=timeout) as sock:
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, [(":method", method), (":scheme", "http"), (":authority", authority),
                                      (":path", path), *headers], end_stream=not body)
        unsent = body
        done = False
        while not done and time.monotonic() < deadline:
            while unsent:
                size = min(len(unsent), conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
                if size <= 0:
                    break
                conn.send_data(stream_id, unsent[:size], end_stream=size == len(unsent))
                unsent = unsent[size:]
            sock.sendall(conn.data_to_send())
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    answer.headers = {str(k): str(v) for k, v in event.headers}
                    answer.status = int(answer.headers[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    answer.body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.TrailersReceived):
                    answer.trailers = {str(k): str(v) for k, v in event.headers}
                elif isinstance(event, h2.events.StreamEnded):
                    done = True
                elif isinstance(event, h2.events.StreamReset):
                    answer.reset = done = True
                    unsent = b""
        sock.sendall(conn.data_to_send())
    return answer
