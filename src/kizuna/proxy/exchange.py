"""Forwarding one HTTP request upstream: tries, retries and timeouts, then the response streamed back.

An ``Exchange`` lives from a request head to the end of its response. It is driven by calls, not a coroutine:
the downstream connection feeds it the request, the upstream connection feeds it the response, and timers
(``loop.call_later``) bound each try and the whole. Retries follow Istio: ``attempts`` retries after the
first try, only while nothing of the response went downstream, only for bodies kept for replay (up to
``MAX_REPLAY`` bytes; larger bodies stream and are not retried), preferring another endpoint. A try that fails
on a reused keep-alive connection before any response byte (the app closed it while idle, Istio's "503 UC")
is repeated once on a fresh connection, outside the retry budget.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from random import getrandbits
from typing import TYPE_CHECKING, Final, Protocol

from kizuna.protocols.http1 import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    BODY_UNTIL_CLOSE,
    LAST_CHUNK,
    NO_BODY_STATUSES,
    RequestHead,
    ResponseHead,
    encode_chunk,
    encode_request_head,
    encode_response_head,
)
from kizuna.proxy.circuit import ADMITTED, OVERFLOW
from kizuna.proxy.errors import (
    NO_HEALTHY_UPSTREAM,
    UPSTREAM_CONNECT_ERROR,
    UPSTREAM_OVERFLOW,
    UPSTREAM_PROTOCOL_ERROR,
    UPSTREAM_TIMEOUT,
    SyntheticResponse,
    add_flag,
    subset_not_found,
)
from kizuna.proxy.hashing import set_cookie_header
from kizuna.proxy.retry import backoff
from kizuna.proxy.stats import Stats
from kizuna.proxy.tcp import Relay, adopt
from kizuna.proxy.upstream import UpstreamConnection

if TYPE_CHECKING:
    from kizuna.proxy.state import Destination, Pool
    from kizuna.proxyconfig.policy import HashPolicy

MAX_REPLAY: Final = 64 * 1024
"""Request bodies up to this size are kept so a retry can send them again."""

# What the exchange carries.
HTTP: Final = 0
UPGRADE: Final = 1  # Connection: upgrade (WebSocket); a raw relay after 101
CONNECT: Final = 2  # CONNECT host:port; a raw relay once the upstream connection is up

CONNECT_ESTABLISHED: Final = b"HTTP/1.1 200 Connection established\r\n\r\n"

PAUSE_UPSTREAM_FULL: Final = 2
"""The exchange's reason for the downstream connection to stop reading (a bit; see downstream)."""


class Downstream(Protocol):
    """What an exchange needs from the client connection it answers."""

    transport: asyncio.Transport
    write_paused: bool
    paused: int
    """Why reading from the client is paused: a set of bits, ``PAUSE_UPSTREAM_FULL`` among them."""
    registry: set[asyncio.BaseProtocol]

    def respond(self, response: SyntheticResponse, keep_alive: bool) -> None:
        """Send a synthetic response instead of an upstream one; the exchange is over."""

    def exchange_done(self, keep_alive: bool) -> None:
        """The response was sent in full."""

    def abort(self) -> None:
        """The response cannot be completed: drop the client connection."""

    def pause_reading(self, reason: int) -> None: ...

    def resume_reading(self, reason: int) -> None: ...

    def start_tunnel(self, upstream: Relay) -> None:
        """Relay raw bytes between the client and ``upstream`` from now on."""


_UUID4_CLEAR: Final = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET: Final = (0x4000 << 64) | (0x8000 << 48)


def new_request_id() -> bytes:
    """A fresh ``x-request-id``: a random (version 4) UUID as Envoy generates, built without the uuid module's
    object overhead; it identifies a request, it is not a secret."""
    # bytes.hex and one f-string: ~0.55 µs where %-formatting the int and the bytes took ~0.75.
    h = (getrandbits(128) & _UUID4_CLEAR | _UUID4_SET).to_bytes(16, "big").hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}".encode()


class Exchange:
    """One request and its response, across as many upstream tries as the retry policy allows."""


    __slots__ = ("down", "head", "dest", "target", "host", "extra", "mode", "loop", "stats", "body",
                 "body_size", "streaming", "request_done", "request_sent", "head_bytes", "conn", "pool",
                 "connecting", "tried", "retries_left", "reused", "fresh_only", "stale_retried", "started",
                 "framing", "keep_alive", "timer", "try_timer", "done", "upgrade_head", "out", "hash_cookie",
                 "t0", "status", "sent", "last", "flags")

    def __init__(self, down: Downstream, head: RequestHead, dest: Destination, target: bytes, host: bytes,
                 stats: Stats, loop: asyncio.AbstractEventLoop, mode: int = HTTP) -> None:
        self.down = down
        self.head = head
        self.dest = dest
        self.target = target
        """The request target sent upstream, origin form."""
        self.host = host
        self.extra: tuple[tuple[bytes, bytes], ...] = (
            () if head.has_request_id else ((b"x-request-id", new_request_id()),))
        self.mode = mode
        self.loop = loop
        self.stats = stats
        self.body: list[bytes] = []
        self.body_size = 0
        self.streaming = False
        self.request_done = False
        self.request_sent = False
        self.head_bytes: bytes | None = None
        self.conn: UpstreamConnection | None = None
        self.pool: Pool | None = None
        self.connecting: asyncio.Task[asyncio.BaseProtocol] | None = None
        self.tried: list[Pool] = []
        self.retries_left = dest.retry.attempts if mode != UPGRADE else 0
        self.reused = False
        self.fresh_only = mode != HTTP
        self.stale_retried = False
        self.started = False
        self.framing = BODY_NONE
        self.keep_alive = head.keep_alive and mode == HTTP
        self.timer: asyncio.TimerHandle | None = None
        self.try_timer: asyncio.TimerHandle | None = None
        self.done = False
        self.upgrade_head: ResponseHead | None = None
        self.out: list[bytes] = []
        self.hash_cookie: tuple[bytes, bytes] | None = None
        """A ``set-cookie`` header for the response when consistent hashing made up its cookie."""
        """Response bytes not yet written downstream (see ``flush``)."""
        # For telemetry (``telemetry_tap``): start, status and body bytes passed on, the last endpoint tried.
        self.t0 = loop.time()
        self.status = 0
        self.sent = 0
        self.last: Pool | None = None
        self.flags = ""
        """Response flags telemetry reports besides those of a synthetic answer (an ``H2Front``'s call's)."""

    # -- the request, from the downstream connection -------------------------------------------------------

    def request_body(self, data: bytes) -> None:
        """A piece of the request body."""
        if self.done or self.mode != HTTP:
            return
        if self.streaming:
            conn = self.conn
            if conn is not None:
                conn.write(encode_chunk(data) if self.head.chunked else data)
            else:
                self.body.append(data)
                self.down.pause_reading(PAUSE_UPSTREAM_FULL)
            return
        self.body.append(data)
        self.body_size += len(data)
        if self.body_size > MAX_REPLAY:
            # Too big to keep for a replay: stream it through the only try (``_may_retry`` sees ``streaming``).
            self.streaming = True
            self._start()

    def request_end(self) -> None:
        """The request is complete: the route timeout starts, and the first try unless it already streams."""
        self.request_done = True
        if self.done:
            return
        if self.dest.timeout is not None and self.mode == HTTP:
            self.timer = self.loop.call_later(self.dest.timeout, self._on_timeout)
        if not self.streaming:
            if self.dest.cluster.circuit is None:
                self._begin_attempt()  # no connection-pool limits: skip the circuit breaker's call
            else:
                self._start()
        elif self.conn is not None:
            if self.head.chunked:
                self.conn.write(LAST_CHUNK)
            self.request_sent = True

    def abort(self) -> None:
        """The client went away."""
        if not self.done:
            self.stats.flag("DC")
            self._abandon()
            self._finish()

    # -- tries ---------------------------------------------------------------------------------------------

    def _start(self) -> None:
        """The first try, once the cluster's circuit breaker (if any) lets the request in."""
        circuit = self.dest.cluster.circuit
        if circuit is not None:
            verdict = circuit.enter(self, self._resume)
            if verdict != ADMITTED:
                if verdict == OVERFLOW:
                    self._fail(UPSTREAM_OVERFLOW)
                return  # queued: _resume runs when a slot frees
        self._begin_attempt()

    def _resume(self) -> None:
        if not self.done:
            self._begin_attempt()

    def _may_retry(self) -> bool:
        if self.retries_left <= 0 or self.streaming:
            return False
        circuit = self.dest.cluster.circuit
        if circuit is None or circuit.may_retry(self):
            return True
        # Envoy's retry overflow (``maxRetries`` outstanding across the cluster): the failure passes on as UO.
        self.flags = add_flag(self.flags, UPSTREAM_OVERFLOW.flag)
        return False

    def _observe(self, status: int) -> None:
        """Tell outlier detection how the current try's endpoint answered."""
        outlier = self.dest.cluster.outlier
        if outlier is not None and self.pool is not None:
            outlier.observe(self.pool, status, self.loop.time())

    def request_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """The request's headers as they go upstream (for ``consistentHash``)."""
        return self.head.headers

    def peer(self) -> str | None:
        """The client's IP address (for ``consistentHash.useSourceIp``)."""
        info = self.down.transport.get_extra_info("peername")
        return str(info[0]) if info else None

    def new_hash_cookie(self, policy: HashPolicy) -> bytes:
        """A value for the absent hash cookie, set on the response (as Envoy does when a ttl is given)."""
        value = b"%016x" % getrandbits(64)
        self.hash_cookie = set_cookie_header(policy, value)
        return value

    def _begin_attempt(self, pool: Pool | None = None) -> None:
        if pool is None:
            cluster = self.dest.cluster
            pool = cluster.balancer.pick(self.tried) if cluster.plain else cluster.pick(self)
            if pool is None:
                c = cluster.cluster
                self._fail(subset_not_found(c.subset, c.service) if c.undefined_subset else NO_HEALTHY_UPSTREAM)
                return
        self.pool = self.last = pool
        pool.active += 1
        per_try = self.dest.retry.per_try_timeout
        if per_try is not None and self.mode == HTTP:
            self.try_timer = self.loop.call_later(per_try, self._on_try_timeout)
        conn = None if self.fresh_only else pool.acquire(self.loop.time())
        self.fresh_only = self.mode != HTTP
        if conn is not None:
            self._attach(conn, reused=True)
            return
        factory: Callable[[], asyncio.BaseProtocol]
        if self.mode == CONNECT:
            factory = partial(Relay, self.stats, self.down.registry)
        else:
            factory = partial(UpstreamConnection, pool, self.stats)
        task = self.loop.create_task(pool.connect(factory, self.dest.cluster.connect_timeout))
        self.connecting = task
        task.add_done_callback(self._on_connected)

    def _on_connected(self, task: asyncio.Task[asyncio.BaseProtocol]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        current = task is self.connecting and not self.done
        if task is self.connecting:
            self.connecting = None
        if exc is not None:
            if current:
                self._try_failed(_connect_error(exc), connect_failure=True)
            return
        conn = task.result()
        if not current:
            # The try was given up while connecting; the connection can still serve someone else.
            if isinstance(conn, UpstreamConnection):
                conn.finish(True, self.loop.time())
            elif isinstance(conn, Relay) and conn.transport is not None:
                conn.transport.close()
            return
        if isinstance(conn, Relay):
            self._tunnel(conn)
        else:
            assert isinstance(conn, UpstreamConnection)
            self._attach(conn, reused=False)

    def _attach(self, conn: UpstreamConnection, reused: bool) -> None:
        self.conn = conn
        self.reused = reused
        if self.down.write_paused and conn.transport is not None:
            conn.transport.pause_reading()
        conn.send(self, self.head.method, self._request_bytes())
        if self.streaming:
            self.down.resume_reading(PAUSE_UPSTREAM_FULL)

    def _request_bytes(self) -> bytes:
        head = self.head
        if self.streaming:
            framing = BODY_CHUNKED if head.chunked else BODY_LENGTH
            parts = [encode_request_head(head.method, self.target, self.host, head.headers, framing,
                                         head.content_length, None, self.extra)]
            parts.extend(map(encode_chunk, self.body) if head.chunked else self.body)
            self.body = []
            if self.request_done:
                if head.chunked:
                    parts.append(LAST_CHUNK)
                self.request_sent = True
            return b"".join(parts)
        data = self.head_bytes
        if data is None:
            upgrade = head.upgrade if self.mode == UPGRADE else None
            if not self.body and not head.chunked and head.content_length is None:
                data = encode_request_head(head.method, self.target, self.host, head.headers, BODY_NONE, None,
                                           upgrade, self.extra)
            else:
                # The whole body is here: send it with a length even if it came chunked (apps handle that
                # best), in the same write as the head.
                body = b"".join(self.body)
                self.body = []
                data = encode_request_head(head.method, self.target, self.host, head.headers, BODY_LENGTH,
                                           len(body), upgrade, self.extra) + body
            self.head_bytes = data  # kept for retries
        self.request_sent = True
        return data

    def _tunnel(self, relay: Relay) -> None:
        self._finish()
        self.down.transport.write(CONNECT_ESTABLISHED)
        self.down.start_tunnel(relay)

    def _retry(self) -> None:
        self.retries_left -= 1
        self.stats.retries += 1
        rules = self.dest.retry
        self.try_timer = self.loop.call_later(backoff(rules.attempts - self.retries_left, rules.backoff_base),
                                              self._begin_attempt)

    def _try_failed(self, error: SyntheticResponse, connect_failure: bool) -> None:
        self._observe(503)  # Envoy counts connect failures and resets as 5xx / gateway errors
        self._abandon()
        rules = self.dest.retry
        allowed = rules.on_connect_failure if connect_failure else rules.on_reset
        if allowed and self._may_retry():
            self._retry()
        else:
            self._fail(error)

    def _on_try_timeout(self) -> None:
        self.try_timer = None
        if self.started or self.done:
            return
        self.stats.timeouts += 1
        self._observe(504)  # Envoy counts an upstream timeout as a gateway error of that endpoint
        self._abandon()
        if self.dest.retry.on_timeout and self._may_retry():
            self._retry()
        else:
            self._fail(UPSTREAM_TIMEOUT)

    def _on_timeout(self) -> None:
        self.timer = None
        if self.done:
            return
        self.stats.timeouts += 1
        if not self.started:
            self._observe(504)
        self._abandon()
        if self.started:
            self._cut_short(UPSTREAM_TIMEOUT.flag)
        else:
            self._fail(UPSTREAM_TIMEOUT)

    def _abandon(self) -> None:
        """Give up the current try: close its connection, forget its connect, remember its endpoint."""
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
        pool = self.pool
        if pool is not None:
            pool.active -= 1
            self.tried.append(pool)
            self.pool = None
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.exchange = None
            conn.close()
        self.connecting = None

    def _finish(self) -> None:
        self.done = True
        # A full upstream buffer may have paused the client; this exchange no longer waits on it.
        if self.down.paused & PAUSE_UPSTREAM_FULL:
            self.down.resume_reading(PAUSE_UPSTREAM_FULL)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
        if self.pool is not None:
            self.pool.active -= 1
            self.pool = None
        circuit = self.dest.cluster.circuit
        if circuit is not None:
            start = circuit.leave(self)
            if start is not None:
                self.loop.call_soon(start)

    def _cut_short(self, flag: str) -> None:
        """The response already began and cannot be finished: count ``flag`` (UC, UT), send what came, and
        drop the client connection, the only way left to tell an HTTP/1.1 client (as Envoy resets)."""
        self.stats.flag(flag)
        self.flags = add_flag(self.flags, flag)
        self._finish()
        self.flush()
        self.down.abort()

    def _fail(self, error: SyntheticResponse) -> None:
        if self.retries_left == 0 and self.tried and self.dest.retry.attempts:
            error = error.with_flag("URX")  # retries were spent on this request
        elif "UO" in self.flags and "UO" not in error.flag:
            error = error.with_flag("UO")  # a retry was due but the cluster's maxRetries were outstanding
        self.stats.flag(error.flag)
        self._abandon()
        self._finish()
        self.down.respond(error, self.keep_alive and self.request_done)

    # -- the response, from the upstream connection --------------------------------------------------------

    def response_head(self, head: ResponseHead) -> None:
        """A response head from the current try."""
        accepted = self._accept(head)
        if accepted is not None:
            self._write_head(accepted)

    def _accept(self, head: ResponseHead) -> ResponseHead | None:
        """Count the response and decide on it: None when it is informational, retried, or a 101 (whose
        bytes follow in ``response_upgraded``); else the head to pass on."""
        status = head.status
        if status < 200 and status != 101:
            return None  # informational: the client already had our own 100 Continue
        dest = self.dest
        dest.cluster.counters[status // 100 - 1] += 1
        if dest.cluster.outlier is not None:
            self._observe(status)
        if status in dest.retry.retriable_statuses:
            if self._may_retry():
                self._abandon()
                self._retry()
                return None
            # Retries were spent (URX) or not allowed (UO) and this try failed the same way: the flag goes
            # on the passed-on answer.
            flag = "UO" if "UO" in self.flags else "URX" if self.tried else ""
            if flag:
                self.stats.flag(flag)
                head = head._replace(headers=(*head.headers, (b"x-kizuna-flags", flag.encode())))
        self.started = True
        self.status = status
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
        if status == 101:
            self.upgrade_head = head  # the new protocol's first bytes follow in response_upgraded
            return None
        if self.hash_cookie is not None:
            head = head._replace(headers=(*head.headers, self.hash_cookie))
        return head

    def _write_head(self, head: ResponseHead) -> None:
        """The accepted response head, framed for the HTTP/1.x client."""
        status = head.status
        request = self.head
        keep_alive = self.keep_alive
        http11 = request.version == b"1.1"
        length = head.content_length
        if status in NO_BODY_STATUSES or request.method == b"HEAD" or (
                request.method == b"CONNECT" and status < 300):
            self.framing = BODY_NONE
            # A HEAD or 304 response still tells the length the body would have had.
            announce = BODY_LENGTH if length is not None and status != 204 else BODY_NONE
        elif length is not None:
            self.framing = announce = BODY_LENGTH
        elif http11:
            self.framing = announce = BODY_CHUNKED
        else:
            self.framing = announce = BODY_UNTIL_CLOSE
            keep_alive = False
        self.keep_alive = keep_alive
        if http11:
            connection = None if keep_alive else b"close"
        else:
            connection = b"keep-alive" if keep_alive else b"close"
        self.out.append(encode_response_head(status, head.reason, head.headers, announce, length, connection))

    def response_body(self, data: bytes) -> None:
        """A piece of the response body."""
        self.sent += len(data)
        self.out.append(encode_chunk(data) if self.framing == BODY_CHUNKED else data)

    def flush(self) -> None:
        """Write what the response calls gathered: one write (one syscall) per batch of upstream bytes."""
        out = self.out
        if out:
            self.down.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def response_end(self) -> None:
        """The response is complete."""
        out = self.out
        if self.framing == BODY_CHUNKED:
            out.append(LAST_CHUNK)
        if out:  # flush() inlined: head, body and end usually go out here, in one write
            self.down.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        conn = self.conn
        self.conn = None
        self._finish()
        if conn is not None:
            conn.finish(self.request_sent, self.loop.time())
        self.down.exchange_done(self.keep_alive and self.request_done)

    def response_upgraded(self, tail: bytes) -> None:
        """The upstream switched protocols (101): answer the client and relay raw bytes both ways."""
        head, conn = self.upgrade_head, self.conn
        if self.mode != UPGRADE or head is None or conn is None:
            self.upstream_failed(UPSTREAM_PROTOCOL_ERROR)
            return
        self.conn = None
        self._finish()
        self.down.transport.write(encode_response_head(101, head.reason, head.headers, BODY_NONE,
                                                       upgrade=head.upgrade or self.head.upgrade))
        relay = adopt(conn.detach(), self.stats, self.down.registry)
        if tail:
            self.down.transport.write(tail)
        self.down.start_tunnel(relay)

    def upstream_failed(self, error: SyntheticResponse) -> None:
        """The current try's connection closed, reset, or sent something that is not HTTP."""
        if self.done:
            return
        if self.started:
            self._abandon()
            self._cut_short(error.flag)
            return
        conn, pool = self.conn, self.pool
        stale = self.reused and conn is not None and not conn.received
        if stale and not self.stale_retried and not self.streaming and pool is not None:
            # The app closed this idle keep-alive connection as we sent on it: try once more, fresh.
            self.stale_retried = True
            self._abandon()
            self.tried.pop()
            self.fresh_only = True
            self._begin_attempt(pool)
            return
        self._try_failed(error, connect_failure=False)

    def upstream_write_paused(self, paused: bool) -> None:
        """Flow control for the request body: the upstream cannot take more for now."""
        if paused:
            self.down.pause_reading(PAUSE_UPSTREAM_FULL)
        else:
            self.down.resume_reading(PAUSE_UPSTREAM_FULL)

    def downstream_write_paused(self, paused: bool) -> None:
        """Flow control for the response body: the client cannot take more for now."""
        conn = self.conn
        if conn is not None and conn.transport is not None:
            if paused:
                conn.transport.pause_reading()
            else:
                conn.transport.resume_reading()


def _connect_error(exc: BaseException) -> SyntheticResponse:
    """UF, with the reason when the pool refused the peer itself (secure naming, TLS origination: an error
    without an errno), so the client reads which identity was expected and which one was presented."""
    if isinstance(exc, ConnectionRefusedError) and exc.errno is None and exc.args:
        return SyntheticResponse(503, f"{UPSTREAM_CONNECT_ERROR.reason}: {exc.args[0]}", UPSTREAM_CONNECT_ERROR.flag)
    return UPSTREAM_CONNECT_ERROR
