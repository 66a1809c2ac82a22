"""One HTTP/2 request stream proxied end to end (``H2Call``): routed, sent upstream (again on retry), its
response relayed back, with flow control credited across the two connections and the deadline enforced."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Final, cast

from kizuna.protocols.http2 import CANCEL, REFUSED_STREAM, Headers, grpc_timeout
from kizuna.proxy.errors import (
    NO_HEALTHY_UPSTREAM,
    UPSTREAM_CONNECT_ERROR,
    UPSTREAM_RESET,
    UPSTREAM_TIMEOUT,
    SyntheticResponse,
)
from kizuna.proxy.h2_routing import GRPC_DEADLINE_EXCEEDED, Routed, header, synthetic_headers
from kizuna.proxy.retry import backoff
from kizuna.proxy.state import Pool

if TYPE_CHECKING:  # h2 builds calls at run time; the calls only hold its connections
    from kizuna.proxy.h2 import H2ClientConnection, H2ServerConnection

RETRY_BUFFER: Final = 64 * 1024
"""A request whose body grows past this many bytes is not retried (its start is no longer kept)."""


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
