"""One HTTP/2 request stream proxied end to end (``H2Call``): routed, sent upstream (again on retry), its
response relayed back, with flow control credited across the two connections and the deadline enforced.

It gets what an HTTP/1.1 exchange gets: the route's policy (``route_actions.plan``: rewrite, header
operations, fault delay and abort, mirrors), the cluster's circuit breaker, outlier detection, consistent
hashing, per-try timeouts, and an ``x-request-id`` when the client sent none.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from random import getrandbits
from typing import TYPE_CHECKING, Final, Protocol, cast

from kizuna.protocols.http2 import CANCEL, REFUSED_STREAM, Headers, grpc_timeout
from kizuna.proxy.circuit import OVERFLOW, QUEUED
from kizuna.proxy.errors import (
    NO_HEALTHY_UPSTREAM,
    UPSTREAM_CONNECT_ERROR,
    UPSTREAM_OVERFLOW,
    UPSTREAM_RESET,
    UPSTREAM_TIMEOUT,
    SyntheticResponse,
    add_flag,
    subset_not_found,
)
from kizuna.proxy.h2_policy import downstream_headers, mirror, outlier_status, regular, upstream_headers
from kizuna.proxy.h2_routing import (
    GRPC_DEADLINE_EXCEEDED,
    Routed,
    StreamSink,
    header,
    send_synthetic,
    synthetic_headers,
)
from kizuna.proxy.hashing import set_cookie_header
from kizuna.proxy.retry import backoff
from kizuna.proxy.state import Pool

if TYPE_CHECKING:  # h2 builds calls at run time; the calls only hold its connections
    from kizuna.proxy.h2 import H2ClientConnection, H2Pools
    from kizuna.proxy.stats import Stats
    from kizuna.proxy.telemetry_stream import StreamRecord
    from kizuna.proxyconfig.policy import HashPolicy

RETRY_BUFFER: Final = 64 * 1024
"""A request whose body grows past this many bytes is not retried (its start is no longer kept)."""


class CallOwner(Protocol):
    """The client side of a call: an HTTP/2 server connection (``h2.H2ServerConnection``) or one HTTP/1.1
    request (``h2_front.H2Front``)."""

    @property
    def h2(self) -> StreamSink: ...

    @property
    def stats(self) -> Stats: ...

    @property
    def pools(self) -> H2Pools: ...

    @property
    def transport(self) -> asyncio.Transport | None: ...

    def flush(self) -> None:
        """Write what ``h2`` queued."""

    def finished(self, stream_id: int) -> None:
        """The call is over."""


class H2Call:
    """One request stream: routed, sent upstream (again on retry), its response relayed back."""

    retry_overflow = False
    """Set on the call when a retry was due but the cluster's ``maxRetries`` were outstanding (flag UO)."""

    def __init__(self, down: CallOwner, stream_id: int, headers: Headers, end_stream: bool) -> None:
        self.down = down
        self.stream_id = stream_id
        self.headers = headers
        content_type = header(headers, b"content-type") or b""
        self.grpc = content_type.startswith(b"application/grpc")
        self.loop = asyncio.get_running_loop()
        self.routed: Routed | None = None
        self.up_headers = headers
        """The request head as it goes upstream (after the route policy)."""
        self.target = header(headers, b":path") or b"/"
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
        self.generation = 0  # bumped whenever a try is given up: a connect that completes late is ignored
        self.started = False  # response headers went downstream: no retry, no synthetic answer
        self.pending_down: deque[list[bytes | int]] = deque()
        self.response_ended: Headers | bool = False
        self.done = False
        self.timer: asyncio.TimerHandle | None = None
        self.try_timer: asyncio.TimerHandle | None = None
        self.delay_handle: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.mirror_due = False
        self.hash_cookie: tuple[bytes, bytes] | None = None
        self.record: StreamRecord | None = None
        self.flags = ""
        """The proxy-made outcomes of this call (Envoy's response flags, comma separated)."""
        """The stream's telemetry (``telemetry_stream``), when its connection records."""

    # -- downstream side --------------------------------------------------------------------------------

    def start(self, routed: Routed | SyntheticResponse) -> None:
        """Go where the stream router sent the stream (after a fault delay), or answer for the proxy."""
        if isinstance(routed, SyntheticResponse):
            self._flag(routed.flag)
            self.respond(routed)
            return
        self.routed = routed
        plan = routed.plan
        self.up_headers = upstream_headers(self.headers, plan)
        if self.record is not None:
            self.up_headers = self.record.upstream(self.up_headers, routed)
        if plan is not None:
            self.target = plan.target
            if plan.delay is not None:
                if plan.delayed_abort is None:
                    self._flag("DI")  # an abort after the delay counts DI with its FI
                self.delay_handle = self.loop.call_later(plan.delay, self._delay_over)
                return
            self.mirror_due = bool(plan.mirror_to)
        self._proceed()

    def _delay_over(self) -> None:
        self.delay_handle = None
        routed = self.routed
        if self.done or routed is None or routed.plan is None:
            return
        abort = routed.plan.delayed_abort
        if abort is not None:
            abort = replace(abort, flag="DI,FI")
            self._flag(abort.flag)
            self.respond(abort)
            return
        self.mirror_due = bool(routed.plan.mirror_to)
        self._proceed()

    def _proceed(self) -> None:
        """Past the fault stage (as Envoy's router): the deadline starts, mirrors go, the circuit breaker
        admits (or queues, or refuses) the first try."""
        routed = self.routed
        assert routed is not None
        timeout = routed.dest.timeout
        if self.grpc:
            value = header(self.headers, b"grpc-timeout")
            deadline = grpc_timeout(value) if value is not None else None
            if deadline is not None:
                timeout = deadline if timeout is None else min(timeout, deadline)
        if timeout is not None:
            self.timer = self.loop.call_later(timeout, self.timed_out)
        self._mirror()
        circuit = routed.dest.cluster.circuit
        if circuit is not None:
            verdict = circuit.enter(self, self._resume)
            if verdict == OVERFLOW:
                self._flag(UPSTREAM_OVERFLOW.flag)
                self.respond(UPSTREAM_OVERFLOW)
                return
            if verdict == QUEUED:
                return
        self.attempt()

    def _resume(self) -> None:
        if not self.done:
            self.attempt()

    def _mirror(self) -> None:
        """Once the request is complete and kept: its copy to the mirror clusters (fire and forget)."""
        routed = self.routed
        if not self.mirror_due or self.request_ended is False or routed is None or routed.plan is None:
            return
        self.mirror_due = False
        if self.copy is not None:
            mirror(self.loop, self.down.stats, routed.plan, self.up_headers, b"".join(self.copy))

    # -- what consistent hashing asks (state.Picking) ----------------------------------------------------

    def request_headers(self) -> Sequence[tuple[bytes, bytes]]:
        return regular(self.up_headers)

    def peer(self) -> str | None:
        transport = self.down.transport
        info = transport.get_extra_info("peername") if transport is not None else None
        return str(info[0]) if info else None

    def new_hash_cookie(self, policy: HashPolicy) -> bytes:
        value = b"%016x" % getrandbits(64)
        self.hash_cookie = set_cookie_header(policy, value)
        return value

    def request_data(self, data: bytes, flow: int, end: bool) -> None:
        if self.done:
            self.down.h2.acknowledge(self.stream_id, flow)
            return
        if self.record is not None:
            self.record.received += len(data)
        if self.copy is not None:
            self.copy.append(data)
            self.copy_size += len(data)
            if self.copy_size > RETRY_BUFFER:
                self.copy = None
        self.pending_up.append([data, flow])
        if end:
            self.request_ended = True
            self._mirror()
        self.flush_up()

    def request_end(self, trailers: Headers) -> None:
        self.request_ended = trailers
        self._mirror()
        self.flush_up()

    def downstream_gone(self) -> None:
        """The client reset the stream or went away: cancel upstream."""
        self._flag("DC")
        self._cancel_up()
        self.finish()

    # -- upstream side ----------------------------------------------------------------------------------

    def attempt(self) -> None:
        """One try: an endpoint picked, the stream opened on a pooled connection at once (no task, the common
        case), else on a new one once ``_connect`` has it."""
        routed = self.routed
        assert routed is not None
        cluster = routed.dest.cluster
        pool = cluster.balancer.pick(self.tried) if cluster.plain else cluster.pick(self)
        if pool is None:
            c = cluster.cluster
            error = subset_not_found(c.subset, c.service) if c.undefined_subset else NO_HEALTHY_UPSTREAM
            self._flag(error.flag)
            self.respond(error)
            return
        self.tries += 1
        self.tried.append(pool)
        self.pool = pool
        pool.active += 1
        generation = self.generation
        per_try = routed.dest.retry.per_try_timeout
        if per_try is not None:
            self.try_timer = self.loop.call_later(per_try, self.try_timed_out)
        conn = self.down.pools.ready(pool.address, pool.port)
        if conn is not None:
            self._opened(conn)
        else:
            self.task = self.loop.create_task(self._connect(pool, generation))

    async def _connect(self, pool: Pool, generation: int) -> None:
        routed = self.routed
        assert routed is not None
        try:
            conn = await self.down.pools.get(pool.address, pool.port, routed.dest.cluster.connect_timeout,
                                             pool.identity, pool.tls)
        except (TimeoutError, OSError):
            if self.done or generation != self.generation:
                return  # this try was given up meanwhile (timeout, client gone): nothing more to do
            self._observe(503)  # Envoy counts a connect failure as a 5xx / gateway error of the endpoint
            self._release()
            if routed.dest.retry.on_connect_failure and self.may_retry():
                self.retry()
                return
            self.fail(UPSTREAM_CONNECT_ERROR)
            return
        if self.done or generation != self.generation:
            return
        if not conn.available():
            # It failed before the stream could open (an app that answered the preface as HTTP/1.1 and
            # closed): as a reset before any response.
            self.upstream_failed(0)
            return
        self._opened(conn)

    def _opened(self, conn: H2ClientConnection) -> None:
        self.up = conn
        self.up_ended = False
        end = self.request_ended is True and not self.pending_up
        self.up_stream = conn.open(self, self.up_headers, end)  # a bodiless request: one HEADERS frame
        self.up_ended = end
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
        raw = header(headers, b":status") or b"0"
        status = int(raw) if raw.isdigit() else 0
        dest = routed.dest
        if 100 <= status < 600:
            dest.cluster.counters[status // 100 - 1] += 1
        self._observe(outlier_status(headers, self.grpc))
        retriable = status in dest.retry.retriable_statuses
        if not retriable and end_stream and routed.grpc_codes:
            code = header(headers, b"grpc-status")
            retriable = code is not None and code.isdigit() and int(code) in routed.grpc_codes
        extra: Headers = []
        if retriable:
            if self.may_retry():
                self._cancel_up()
                self.retry()
                return
            # Retries were spent (URX) or not allowed (UO) and this try failed the same way: the flag goes
            # on the passed-on answer.
            flag = "UO" if self.retry_overflow else "URX" if self.tries > 1 else ""
            if flag:
                self._flag(flag)
                extra.append((b"x-kizuna-flags", flag.encode()))
        if self.hash_cookie is not None:
            extra.append(self.hash_cookie)
        self.started = True
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
        out = downstream_headers(headers, routed.plan, extra)
        if self.record is not None:
            self.record.response(out)
        self.down.h2.send_headers(self.stream_id, out, end_stream=end_stream)
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
            if self.record is not None:
                self.record.sent += sent
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
                if self.record is not None:
                    self.record.response(ended)
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
        if not self.started:
            self._observe(503)  # Envoy counts a reset before the response as a 5xx / gateway error
        self._release()
        routed = self.routed
        assert routed is not None
        retriable = (routed.dest.retry.on_reset
                     or (error_code == REFUSED_STREAM and routed.refused_stream))
        if not self.started and retriable and self.may_retry():
            self.retry()
            return
        if self.started:
            self._flag(UPSTREAM_RESET.flag)  # cut short mid-response: the client sees a reset, stats see UC
            self.down.h2.reset(self.stream_id)
            self.down.flush()
            self.finish()
            return
        self.fail(UPSTREAM_RESET)

    # -- retries, deadline, the end ---------------------------------------------------------------------

    def may_retry(self) -> bool:
        routed = self.routed
        assert routed is not None
        if self.started or self.copy is None or self.tries > routed.dest.retry.attempts or self.done:
            return False
        circuit = routed.dest.cluster.circuit
        if circuit is None or circuit.may_retry(self):
            return True
        self.retry_overflow = True  # Envoy: maxRetries outstanding across the cluster, the failure passes as UO
        return False

    def retry(self) -> None:
        """Start over on another endpoint after a backoff, resending the kept body."""
        self.down.stats.retries += 1
        assert self.copy is not None
        for chunk in self.pending_up:
            self.down.h2.acknowledge(self.stream_id, cast(int, chunk[1]))
        self.pending_up = deque([b, 0] for b in self.copy)
        self.up = None
        delay = backoff(self.tries, self.routed.dest.retry.backoff_base) if self.routed else backoff(self.tries)

        def again() -> None:
            if not self.done:
                self.attempt()

        self.loop.call_later(delay, again)

    def try_timed_out(self) -> None:
        """The per-try timeout: this try is given up; retried when the route says so, else UT."""
        self.try_timer = None
        if self.done or self.started:
            return
        self.down.stats.timeouts += 1
        self._observe(504)  # Envoy counts an upstream timeout as a gateway error of that endpoint
        self._cancel_up()
        routed = self.routed
        assert routed is not None
        if routed.dest.retry.on_timeout and self.may_retry():
            self.retry()
            return
        self.fail(UPSTREAM_TIMEOUT)

    def timed_out(self) -> None:
        self.timer = None
        if self.done:
            return
        self.down.stats.timeouts += 1
        if not self.started:
            self._observe(504)
        self._flag(UPSTREAM_TIMEOUT.flag)
        self._cancel_up()
        if not self.started:
            self.respond(UPSTREAM_TIMEOUT)
        elif self.grpc:
            self.pending_down.clear()
            trailers = [(b"grpc-status", b"%d" % GRPC_DEADLINE_EXCEEDED),
                        (b"grpc-message", b"upstream timeout")]
            if self.record is not None:
                self.record.response(trailers)
            self.down.h2.send_headers(self.stream_id, trailers, end_stream=True)
            self.down.flush()
            self.finish()
        else:
            self.down.h2.reset(self.stream_id)
            self.down.flush()
            self.finish()

    def fail(self, error: SyntheticResponse) -> None:
        """Answer ``error`` after the last try failed (with URX when retries were spent), counted."""
        routed = self.routed
        if routed is not None and self.tries > 1 and routed.dest.retry.attempts:
            error = error.with_flag("URX")
        elif self.retry_overflow:
            error = error.with_flag("UO")
        self._flag(error.flag)
        self.respond(error)

    def _flag(self, flag: str) -> None:
        """Count a proxy-made outcome (and put it on the stream's record)."""
        self.down.stats.flag(flag)
        self.flags = add_flag(self.flags, flag)
        if self.record is not None:
            self.record.flag(flag)

    def _observe(self, status: int) -> None:
        """Tell outlier detection how the current try's endpoint answered."""
        routed = self.routed
        outlier = routed.dest.cluster.outlier if routed is not None else None
        if outlier is not None and self.pool is not None:
            outlier.observe(self.pool, status, self.loop.time())

    def respond(self, response: SyntheticResponse) -> None:
        """Answer the client with a proxy-made response (a gRPC error for a gRPC request)."""
        if self.done:
            return
        self.down.stats.error(response.reason)
        h2 = self.down.h2
        if self.record is not None:
            self.record.synthetic(response, synthetic_headers(response, self.grpc)[0])
        send_synthetic(h2, self.stream_id, response, self.grpc)
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
        self.generation += 1
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
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
        if self.delay_handle is not None:
            self.delay_handle.cancel()
            self.delay_handle = None
        if self.up is not None:
            if not self.up_ended:  # the answer is over before the request body: the upstream stream is too
                self.up.h2.reset(self.up_stream, CANCEL)
                self.up.flush()
            self.up.forget(self.up_stream)
        self._release()
        routed = self.routed
        circuit = routed.dest.cluster.circuit if routed is not None else None
        if circuit is not None:
            start = circuit.leave(self)
            if start is not None:
                self.loop.call_soon(start)
        record = self.record
        if record is not None:
            record.pool = self.tried[-1] if self.tried else None
            record.close()
        self.down.finished(self.stream_id)
