"""HTTP/2 (h2c, prior knowledge) and gRPC proxying: a downstream connection, upstream connections shared by
many streams, and one ``H2Call`` per request stream joining the two.

Each stream is routed on its own (``:authority``, ``:path``, ``:method``, headers) with the same ``Router``
and ``ProxyState.destination`` as HTTP/1.1. Flow control is end to end: DATA received on one side is credited
back (WINDOW_UPDATE) only once it went out on the other, so a slow reader slows its writer and the proxy holds
at most one window per stream. Trailers are forwarded (gRPC's status lives there). A request with
``content-type: application/grpc*`` gets proxy-made errors as gRPC errors (HTTP 200, trailers-only,
``grpc-status`` and ``grpc-message``), its ``grpc-timeout`` bounds the request (with the route timeout), and
retries follow ``grpc-status`` of trailers-only answers (``unavailable``, ``cancelled``, ...).

Not done on HTTP/2 streams yet: route policies (rewrite, header operations, faults, mirrors, redirects),
circuit breaking, outlier detection and consistent hashing (the cluster's balancer picks the endpoint).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from functools import lru_cache
from typing import Final, cast

from kizuna.protocols.http2 import (
    CANCEL,
    REFUSED_STREAM,
    ConnectionFailed,
    DataReceived,
    Event,
    GoAwayReceived,
    H2Endpoint,
    Headers,
    HeadersReceived,
    StreamReset,
    TrailersReceived,
    WindowOpened,
    grpc_timeout,
)
from kizuna.proxy.errors import (
    NO_HEALTHY_UPSTREAM,
    UPSTREAM_CONNECT_ERROR,
    UPSTREAM_RESET,
    UPSTREAM_TIMEOUT,
    SyntheticResponse,
)
from kizuna.proxy.retry import backoff
from kizuna.proxy.state import Destination, Pool
from kizuna.proxy.stats import Stats

RETRY_BUFFER: Final = 64 * 1024
"""A request whose body grows past this many bytes is not retried (its start is no longer kept)."""

GRPC_CODES: Final = {"cancelled": 1, "deadline-exceeded": 4, "resource-exhausted": 8, "internal": 13,
                     "unavailable": 14}
"""Istio retryOn names of gRPC statuses."""
GRPC_UNIMPLEMENTED: Final = 12
GRPC_DEADLINE_EXCEEDED: Final = 4
GRPC_UNAVAILABLE: Final = 14


@lru_cache(maxsize=256)
def grpc_retry_codes(retry_on: frozenset[str]) -> frozenset[int]:
    """The ``grpc-status`` values a route's retryOn retries."""
    return frozenset(code for name, code in GRPC_CODES.items() if name in retry_on)


class Routed:
    """Where a stream goes: a destination plus the retry conditions only HTTP/2 has."""

    __slots__ = ("dest", "grpc_codes", "refused_stream")

    def __init__(self, dest: Destination, retry_on: frozenset[str] = frozenset()) -> None:
        self.dest = dest
        self.grpc_codes = grpc_retry_codes(retry_on)
        self.refused_stream = "refused-stream" in retry_on


StreamRouter = Callable[[Headers], "Routed | SyntheticResponse"]
"""Request headers (pseudo-headers included) → where the stream goes, or the proxy's own answer."""


def header(headers: Headers, name: bytes) -> bytes | None:
    """The first value of ``name`` (lower-case), if any."""
    for key, value in headers:
        if key == name:
            return value
    return None


def synthetic_headers(response: SyntheticResponse, grpc: bool) -> tuple[Headers, bytes]:
    """``response`` as HTTP/2 headers and body; for a gRPC request a trailers-only gRPC error."""
    extra: Headers = []
    if response.reason:
        extra.append((b"x-kizuna-error", response.reason.encode()))
    if response.flag:
        extra.append((b"x-kizuna-flags", response.flag.encode()))
    own = list(response.headers)
    if grpc:
        if header(own, b"grpc-status") is not None:
            return [(b":status", b"200"), *own, *extra], b""
        flags = response.flag.split(",")
        code = (GRPC_UNIMPLEMENTED if "NR" in flags else GRPC_DEADLINE_EXCEEDED if "UT" in flags
                else GRPC_UNAVAILABLE)
        return [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"%d" % code),
                (b"grpc-message", response.reason.encode()), *extra], b""
    body = response.body if response.body is not None else response.reason.encode() + b"\n"
    if not any(n == b"content-type" for n, _ in own):
        own.append((b"content-type", b"text/plain"))
    return [(b":status", b"%d" % response.status), *own, *extra,
            (b"content-length", b"%d" % len(body))], body


class H2ServerConnection(asyncio.Protocol):
    """A downstream HTTP/2 connection: every stream is routed and proxied by its own ``H2Call``."""

    def __init__(self, route: StreamRouter, pools: H2Pools, stats: Stats,
                 registry: set[asyncio.BaseProtocol]) -> None:
        self.route = route
        self.pools = pools
        self.stats = stats
        self.registry = registry
        self.h2 = H2Endpoint(client_side=False)
        self.transport: asyncio.Transport | None = None
        self.calls: dict[int, H2Call] = {}
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.registry.add(self)
        self.stats.downstream_cx_total += 1
        self.stats.downstream_cx_active += 1
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.discard(self)
        self.stats.downstream_cx_active -= 1
        self.transport = None
        for call in list(self.calls.values()):
            call.downstream_gone()
        self.calls.clear()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive(data):
            self.handle(event)
        self.flush()

    def handle(self, event: Event) -> None:
        if isinstance(event, HeadersReceived):
            if self.closing:  # raced our GOAWAY: the client may retry it elsewhere
                self.h2.reset(event.stream_id, REFUSED_STREAM)
                return
            self.stats.downstream_rq_total += 1
            call = H2Call(self, event.stream_id, event.headers, event.end_stream)
            self.calls[event.stream_id] = call
            call.start()
        elif isinstance(event, DataReceived):
            found = self.calls.get(event.stream_id)
            if found is None:
                self.h2.acknowledge(event.stream_id, event.flow_length)
            else:
                found.request_data(event.data, event.flow_length, event.end_stream)
        elif isinstance(event, TrailersReceived):
            found = self.calls.get(event.stream_id)
            if found is not None:
                found.request_end(event.headers)
        elif isinstance(event, StreamReset):
            found = self.calls.pop(event.stream_id, None)
            if found is not None:
                found.downstream_gone()
        elif isinstance(event, WindowOpened):
            for call in list(self.calls.values()):
                call.flush_down()
        elif isinstance(event, ConnectionFailed) and self.transport is not None:
            self.flush()
            self.transport.close()

    def finished(self, stream_id: int) -> None:
        self.calls.pop(stream_id, None)
        if self.closing and not self.calls and self.transport is not None:
            self.flush()
            self.transport.close()

    def drain(self) -> None:
        """GOAWAY: streams in flight finish, no new ones; the connection closes when idle."""
        if self.closing or self.transport is None:
            return
        self.closing = True
        self.h2.goaway()
        self.flush()
        if not self.calls:
            self.transport.close()


class H2ClientConnection(asyncio.Protocol):
    """An upstream HTTP/2 connection to one endpoint, carrying many streams."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.h2 = H2Endpoint(client_side=True)
        self.transport: asyncio.Transport | None = None
        self.calls: dict[int, H2Call] = {}
        self.usable = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.stats.upstream_cx_total += 1
        self.stats.upstream_cx_active += 1
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.upstream_cx_active -= 1
        self.usable = False
        self.transport = None
        calls, self.calls = list(self.calls.values()), {}
        for call in calls:
            call.upstream_failed(0)

    def available(self) -> bool:
        return self.usable and self.transport is not None and self.h2.can_open_stream()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def open(self, call: H2Call, headers: Headers) -> int:
        stream_id = self.h2.next_stream_id()
        self.h2.send_headers(stream_id, headers)
        self.calls[stream_id] = call
        return stream_id

    def forget(self, stream_id: int) -> None:
        self.calls.pop(stream_id, None)

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive(data):
            if isinstance(event, HeadersReceived):
                found = self.calls.get(event.stream_id)
                if found is not None:
                    found.response_headers(event.headers, event.end_stream)
            elif isinstance(event, DataReceived):
                found = self.calls.get(event.stream_id)
                if found is None:
                    self.h2.acknowledge(event.stream_id, event.flow_length)
                else:
                    found.response_data(event.data, event.flow_length, event.end_stream)
            elif isinstance(event, TrailersReceived):
                found = self.calls.get(event.stream_id)
                if found is not None:
                    found.response_end(event.headers)
            elif isinstance(event, StreamReset):
                found = self.calls.pop(event.stream_id, None)
                if found is not None:
                    found.upstream_failed(event.error_code)
            elif isinstance(event, WindowOpened):
                for call in list(self.calls.values()):
                    call.flush_up()
            elif isinstance(event, GoAwayReceived):
                self.usable = False
                for stream_id in [s for s in self.calls if s > event.last_stream_id]:
                    self.calls.pop(stream_id).upstream_failed(REFUSED_STREAM)
            elif isinstance(event, ConnectionFailed):
                self.usable = False
                if self.transport is not None:
                    self.transport.close()
        self.flush()
        if not self.usable and not self.calls and self.transport is not None:
            self.transport.close()


class H2Pools:
    """Upstream HTTP/2 connections per endpoint: streams share a connection until it refuses more."""

    def __init__(self, stats: Stats, bind: str | None = None) -> None:
        self.stats = stats
        self.bind = bind
        self.conns: dict[tuple[str, int], list[H2ClientConnection]] = {}
        self.connecting: dict[tuple[str, int], asyncio.Future[H2ClientConnection]] = {}

    async def get(self, address: str, port: int, timeout: float) -> H2ClientConnection:
        """An open connection to ``address:port`` with room for a stream (connecting if none has)."""
        key = (address, port)
        conns = self.conns.setdefault(key, [])
        conns[:] = [c for c in conns if c.usable]
        for conn in conns:
            if conn.available():
                return conn
        pending = self.connecting.get(key)
        if pending is not None:
            conn = await asyncio.shield(pending)
            if conn.available():
                return conn
        loop = asyncio.get_running_loop()
        future: asyncio.Future[H2ClientConnection] = loop.create_future()
        self.connecting[key] = future
        try:
            local = (self.bind, 0) if self.bind else None
            _, conn = await asyncio.wait_for(loop.create_connection(
                lambda: H2ClientConnection(self.stats), address, port, local_addr=local), timeout)
        except BaseException as exc:
            future.set_exception(OSError(str(exc)))
            future.exception()  # retrieved: waiters re-raise it, an unawaited future must not warn
            raise
        finally:
            if self.connecting.get(key) is future:
                del self.connecting[key]
        if not future.done():
            future.set_result(conn)
        self.conns.setdefault(key, []).append(conn)
        return conn

    def close(self) -> None:
        for conns in self.conns.values():
            for conn in conns:
                if conn.transport is not None:
                    conn.transport.close()
        self.conns.clear()


class H2Call:
    """One request stream: routed, sent upstream (again on retry), its response relayed back."""

    def __init__(self, down: H2ServerConnection, stream_id: int, headers: Headers, end_stream: bool) -> None:
        self.down = down
        self.stream_id = stream_id
        self.headers = headers
        content_type = header(headers, b"content-type") or b""
        self.grpc = content_type.startswith(b"application/grpc")
        self.loop = asyncio.get_running_loop()
        self.routed: Routed | None = None
        # Request body: chunks not yet sent upstream as [data, flow length not yet credited downstream].
        self.pending_up: deque[list[bytes | int]] = deque()
        self.copy: list[bytes] | None = []  # the whole body so far, while a retry may resend it
        self.copy_size = 0
        self.request_ended: Headers | bool = end_stream  # True, or request trailers, once the body is done
        self.up: H2ClientConnection | None = None
        self.up_stream = 0
        self.up_ended = False
        self.pool: Pool | None = None
        self.tried: list[Pool] = []
        self.tries = 0
        self.started = False  # response headers went downstream: no retry, no synthetic answer
        self.pending_down: deque[list[bytes | int]] = deque()
        self.response_ended: Headers | bool = False
        self.done = False
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    # -- downstream side --------------------------------------------------------------------------------

    def start(self) -> None:
        routed = self.down.route(self.headers)
        if isinstance(routed, SyntheticResponse):
            self.down.stats.flag(routed.flag)
            self.respond(routed)
            return
        self.routed = routed
        timeout = routed.dest.timeout
        if self.grpc:
            value = header(self.headers, b"grpc-timeout")
            deadline = grpc_timeout(value) if value is not None else None
            if deadline is not None:
                timeout = deadline if timeout is None else min(timeout, deadline)
        if timeout is not None:
            self.timer = self.loop.call_later(timeout, self.timed_out)
        self.task = self.loop.create_task(self.attempt())

    def request_data(self, data: bytes, flow: int, end: bool) -> None:
        if self.done:
            self.down.h2.acknowledge(self.stream_id, flow)
            return
        if self.copy is not None:
            self.copy.append(data)
            self.copy_size += len(data)
            if self.copy_size > RETRY_BUFFER:
                self.copy = None
        self.pending_up.append([data, flow])
        if end:
            self.request_ended = True
        self.flush_up()

    def request_end(self, trailers: Headers) -> None:
        self.request_ended = trailers
        self.flush_up()

    def downstream_gone(self) -> None:
        """The client reset the stream or went away: cancel upstream."""
        self.down.calls.pop(self.stream_id, None)
        self.down.stats.flag("DC")
        self._cancel_up()
        self.finish()

    # -- upstream side ----------------------------------------------------------------------------------

    async def attempt(self) -> None:
        routed = self.routed
        assert routed is not None
        cluster = routed.dest.cluster
        pool = cluster.balancer.pick(self.tried)
        if pool is None:
            self.down.stats.flag(NO_HEALTHY_UPSTREAM.flag)
            self.respond(NO_HEALTHY_UPSTREAM)
            return
        self.tries += 1
        self.tried.append(pool)
        self.pool = pool
        pool.active += 1
        try:
            conn = await self.down.pools.get(pool.address, pool.port, cluster.connect_timeout)
        except (TimeoutError, OSError):
            self._release()  # (a no-op when a timeout or the client ended the call meanwhile)
            if self.done:
                return
            if routed.dest.retry.on_connect_failure and self.may_retry():
                self.retry()
                return
            flagged = UPSTREAM_CONNECT_ERROR.with_flag("URX") if self.tries > 1 else UPSTREAM_CONNECT_ERROR
            self.down.stats.flag(flagged.flag)
            self.respond(flagged)
            return
        if self.done:
            self._release()
            return
        self.up = conn
        self.up_ended = False
        end = self.request_ended is True and not self.pending_up
        self.up_stream = conn.open(self, self.headers)
        if end:
            conn.h2.end_stream(self.up_stream)
            self.up_ended = True
        self.flush_up()
        conn.flush()

    def flush_up(self) -> None:
        """Send pending body upstream as far as its window allows; credit the client for what went."""
        conn = self.up
        if conn is None or self.up_ended or self.done:
            return
        h2, down = conn.h2, self.down.h2
        while self.pending_up:
            chunk = self.pending_up[0]
            data, flow = cast(bytes, chunk[0]), cast(int, chunk[1])
            sent = h2.send_data(self.up_stream, data) if data else 0
            if sent < len(data):
                credit = min(sent, flow)
                down.acknowledge(self.stream_id, credit)
                chunk[0], chunk[1] = data[sent:], flow - credit
                break
            down.acknowledge(self.stream_id, flow)
            self.pending_up.popleft()
        if not self.pending_up and self.request_ended is not False:
            if self.request_ended is True:
                h2.end_stream(self.up_stream)
            else:
                h2.send_headers(self.up_stream, self.request_ended, end_stream=True)
            self.up_ended = True
        conn.flush()
        self.down.flush()

    def response_headers(self, headers: Headers, end_stream: bool) -> None:
        if self.done:
            return
        routed = self.routed
        assert routed is not None
        status = header(headers, b":status") or b"0"
        retriable = int(status) in routed.dest.retry.retriable_statuses if status.isdigit() else False
        if not retriable and end_stream and routed.grpc_codes:
            code = header(headers, b"grpc-status")
            retriable = code is not None and code.isdigit() and int(code) in routed.grpc_codes
        if retriable and self.may_retry():
            self._cancel_up()
            self.retry()
            return
        self.started = True
        self.down.h2.send_headers(self.stream_id, headers, end_stream=end_stream)
        self.down.flush()
        if end_stream:
            self.finish()

    def response_data(self, data: bytes, flow: int, end: bool) -> None:
        if self.done:
            if self.up is not None:
                self.up.h2.acknowledge(self.up_stream, flow)
            return
        self.pending_down.append([data, flow])
        if end:
            self.response_ended = True
        self.flush_down()

    def response_end(self, trailers: Headers) -> None:
        self.response_ended = trailers
        self.flush_down()

    def flush_down(self) -> None:
        """Send pending response body downstream as far as the client's window allows; credit upstream."""
        if self.done or not self.started:
            return
        h2, up = self.down.h2, self.up
        while self.pending_down:
            chunk = self.pending_down[0]
            data, flow = cast(bytes, chunk[0]), cast(int, chunk[1])
            sent = h2.send_data(self.stream_id, data) if data else 0
            if sent < len(data):
                credit = min(sent, flow)
                if up is not None:
                    up.h2.acknowledge(self.up_stream, credit)
                chunk[0], chunk[1] = data[sent:], flow - credit
                break
            if up is not None:
                up.h2.acknowledge(self.up_stream, flow)
            self.pending_down.popleft()
        ended = self.response_ended
        if not self.pending_down and ended is not False:
            if ended is True:
                h2.end_stream(self.stream_id)
            else:
                h2.send_headers(self.stream_id, ended, end_stream=True)
            self.down.flush()
            self.finish()
            return
        self.down.flush()
        if up is not None:
            up.flush()

    def upstream_failed(self, error_code: int) -> None:
        """The upstream stream was reset or its connection lost."""
        if self.done:
            return
        self._release()
        routed = self.routed
        assert routed is not None
        retriable = (routed.dest.retry.on_reset
                     or (error_code == REFUSED_STREAM and routed.refused_stream))
        if not self.started and retriable and self.may_retry():
            self.retry()
            return
        if self.started:
            self.down.h2.reset(self.stream_id)
            self.down.flush()
            self.finish()
            return
        self.down.stats.flag(UPSTREAM_RESET.flag)
        self.respond(UPSTREAM_RESET)

    # -- retries, deadline, the end ---------------------------------------------------------------------

    def may_retry(self) -> bool:
        routed = self.routed
        assert routed is not None
        return (not self.started and self.copy is not None and self.tries <= routed.dest.retry.attempts
                and not self.done)

    def retry(self) -> None:
        """Start over on another endpoint after a backoff, resending the kept body."""
        self.down.stats.retries += 1
        assert self.copy is not None
        for chunk in self.pending_up:
            self.down.h2.acknowledge(self.stream_id, cast(int, chunk[1]))
        self.pending_up = deque([b, 0] for b in self.copy)
        self.up = None
        delay = backoff(self.tries)

        def again() -> None:
            if not self.done:
                self.task = self.loop.create_task(self.attempt())

        self.loop.call_later(delay, again)

    def timed_out(self) -> None:
        self.timer = None
        if self.done:
            return
        self.down.stats.timeouts += 1
        self.down.stats.flag(UPSTREAM_TIMEOUT.flag)
        self._cancel_up()
        if not self.started:
            self.respond(UPSTREAM_TIMEOUT)
        elif self.grpc:
            self.pending_down.clear()
            trailers = [(b"grpc-status", b"%d" % GRPC_DEADLINE_EXCEEDED),
                        (b"grpc-message", b"upstream timeout")]
            self.down.h2.send_headers(self.stream_id, trailers, end_stream=True)
            self.down.flush()
            self.finish()
        else:
            self.down.h2.reset(self.stream_id)
            self.down.flush()
            self.finish()

    def respond(self, response: SyntheticResponse) -> None:
        """Answer the client with a proxy-made response (a gRPC error for a gRPC request)."""
        if self.done:
            return
        headers, body = synthetic_headers(response, self.grpc)
        h2 = self.down.h2
        h2.send_headers(self.stream_id, headers, end_stream=not body)
        if body:
            h2.send_data(self.stream_id, body, end_stream=True)
        # The request body will not be read: credit it so the connection's window stays open.
        for chunk in self.pending_up:
            h2.acknowledge(self.stream_id, cast(int, chunk[1]))
        self.pending_up.clear()
        self.down.flush()
        self.finish()

    def _cancel_up(self) -> None:
        conn = self.up
        if conn is not None:
            conn.forget(self.up_stream)
            conn.h2.reset(self.up_stream, CANCEL)
            for chunk in self.pending_down:
                conn.h2.acknowledge(self.up_stream, cast(int, chunk[1]))
            self.pending_down.clear()
            conn.flush()
        self._release()

    def _release(self) -> None:
        self.up = None
        if self.pool is not None:
            self.pool.active -= 1
            self.pool = None

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        for chunk in self.pending_up:  # never sent: credit the client so the connection window stays open
            self.down.h2.acknowledge(self.stream_id, cast(int, chunk[1]))
        self.pending_up.clear()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.up is not None:
            self.up.forget(self.up_stream)
        self._release()
        self.down.finished(self.stream_id)
