"""An open-loop, fixed-rate HTTP/1.1 load generator: N keep-alive connections, one global schedule.

wrk cannot pace, wrk2 is not packaged for Debian 12, and h2load (``--rps``) sends only origin-form requests
with a second Host header, so it cannot send the HTTP_PROXY-style request the other tools send. This generator
sends the exact bytes wrk sends (``GET http://bench:80/ HTTP/1.1`` + ``Host: bench``) and is used for every
path, so its own overhead cancels out of the "added latency" numbers.

Request ``i`` is due at ``t0 + i / rate`` on connection ``i % connections``. Latency runs from the moment the
request is written to the moment its response is fully parsed. When a request falls due while its connection
still waits for the previous response, it queues and its latency is counted from the time it was due (no
coordinated omission); such requests are reported as ``queued``. Timer lateness delays a send but is not
counted as latency, since the system under test did not cause it; it is reported separately. The loop waits in
``select()`` (microsecond timeouts; epoll's are whole milliseconds) with the kernel's timer slack cut to 1 µs.

Run as ``python -m bench.paced HOST PORT --rate R --connections C --seconds S``: it connects, warms up, prints
``READY``, waits for one line on stdin, runs the schedule and prints one JSON line. The loop is bounded by
``seconds + grace`` whatever happens.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import gc
import json
import selectors
import socket
import sys
import time
from typing import Any

import httptools

from bench.stats import summarize_ns

GRACE_SECONDS = 5.0
EXPECTED_BODY = 1024
PR_SET_TIMERSLACK = 29


def request_bytes(target: str, host: str) -> bytes:
    """The one request every tool sends: what an app with HTTP_PROXY writes (wrk's bytes, see wrk.lua)."""
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode("ascii")


class _Conn:
    """One keep-alive connection, its response parser and the requests waiting for it."""

    __slots__ = ("sock", "parser", "busy", "start_ns", "from_due", "body", "pending", "done")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.parser = httptools.HttpResponseParser(self)
        self.busy = False
        self.start_ns = 0
        self.from_due = False
        self.body = 0
        self.pending: collections.deque[int] = collections.deque()  # due times of queued requests
        self.done: list[tuple[int, int]] = []  # (status, body bytes) of responses completed by the last feed

    # httptools callbacks
    def on_body(self, chunk: bytes) -> None:
        self.body += len(chunk)

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_status_code(), self.body))
        self.body = 0


def _tighten_timer_slack() -> None:
    # Linux rounds sleeps up by the thread's timer slack (50 µs by default); 1 µs keeps the schedule honest.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_TIMERSLACK, 1000, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _connect(host: str, port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


def _send_all(sock: socket.socket, data: bytes) -> None:
    # A ~40-byte request always fits an empty send buffer; the loop only guards against the impossible.
    view = memoryview(data)
    deadline = time.monotonic() + 5.0
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError("send stalled") from None
            time.sleep(0.0001)


def run_schedule(host: str, port: int, request: bytes, rate: float, connections: int,
                 seconds: float, conns: list[_Conn] | None = None) -> dict[str, Any]:
    """Send ``rate * seconds`` requests on the open-loop schedule; return latency summaries and errors."""
    own = conns is None
    if conns is None:
        conns = [_Conn(_connect(host, port)) for _ in range(connections)]
    # select(), not epoll: its timeout has microsecond resolution, and a handful of sockets costs nothing.
    sel = selectors.SelectSelector()
    for c in conns:
        sel.register(c.sock, selectors.EVENT_READ, c)
    total = int(rate * seconds)
    interval_ns = int(1e9 / rate)
    latencies: list[int] = []
    timer_lateness: list[int] = []
    errors = {"status": 0, "body": 0, "closed": 0, "timeout": 0}
    queued = 0
    sent = completed = 0
    perf = time.perf_counter_ns

    def send(c: _Conn, due_ns: int, from_due: bool) -> None:
        c.busy = True
        c.from_due = from_due
        c.start_ns = due_ns if from_due else perf()
        _send_all(c.sock, request)

    t0 = perf() + 1_000_000
    cpu_start = time.process_time()
    hard_stop = t0 + int((seconds + GRACE_SECONDS) * 1e9)
    try:
        while completed + sum(errors.values()) < total:
            now = perf()
            if now > hard_stop:
                errors["timeout"] += total - completed - sum(errors.values())
                break
            while sent < total and t0 + sent * interval_ns <= now:
                due = t0 + sent * interval_ns
                c = conns[sent % connections]
                sent += 1
                timer_lateness.append(now - due)
                if c.busy:
                    c.pending.append(due)
                    queued += 1
                else:
                    send(c, due, False)
            wait = (t0 + sent * interval_ns - now) / 1e9 if sent < total else 0.05
            for key, _ in sel.select(max(wait, 0.0)):
                c = key.data
                try:
                    data = c.sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                end = perf()
                if not data:
                    # The peer closed: what was in flight or queued on this connection is lost.
                    errors["closed"] += int(c.busy) + len(c.pending)
                    sel.unregister(c.sock)
                    c.sock.close()
                    c.pending.clear()
                    c.busy = False
                    c.sock = _connect(host, port)
                    c.parser = httptools.HttpResponseParser(c)
                    sel.register(c.sock, selectors.EVENT_READ, c)
                    continue
                c.parser.feed_data(data)
                for status, body in c.done:
                    latencies.append(end - c.start_ns)
                    if status != 200:
                        errors["status"] += 1
                    elif body != EXPECTED_BODY:
                        errors["body"] += 1
                    else:
                        completed += 1
                    c.busy = False
                    if c.pending:
                        send(c, c.pending.popleft(), True)
                c.done.clear()
    finally:
        sel.close()
        if own:
            for c in conns:
                c.sock.close()
    return {
        "requests": total, "completed": completed, "errors": errors, "queued": queued,
        "rate": rate, "connections": connections, "seconds": seconds,
        "cpu_s": time.process_time() - cpu_start,
        "latency": summarize_ns(latencies),
        "timer_lateness": summarize_ns(timer_lateness),
    }


def probe(host: str, port: int, request: bytes, timeout: float = 2.0) -> tuple[int, int]:
    """Send one request on a fresh connection; return (status, body length). Raises OSError on failure."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        conn = _Conn(sock)
        sock.sendall(request)
        deadline = time.monotonic() + timeout
        while not conn.done:
            if time.monotonic() > deadline:
                raise TimeoutError("no response")
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed before a full response")
            conn.parser.feed_data(data)
        return conn.done[0]


def main(argv: list[str] | None = None) -> int:
    """CLI: connect, warm up, print READY, wait for a line on stdin, run, print the JSON result."""
    ap = argparse.ArgumentParser(prog="python -m bench.paced", description=__doc__.splitlines()[0])
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds at the same rate, not reported")
    ap.add_argument("--target", default="http://bench:80/")
    ap.add_argument("--host-header", default="bench")
    args = ap.parse_args(argv)
    request = request_bytes(args.target, args.host_header)
    conns = [_Conn(_connect(args.host, args.port)) for _ in range(args.connections)]
    try:
        # A collection pause would land in some path's tail and not another's.
        gc.collect()
        gc.freeze()
        gc.disable()
        _tighten_timer_slack()
        if args.warmup > 0:
            run_schedule(args.host, args.port, request, args.rate, args.connections, args.warmup, conns)
        print("READY", flush=True)
        if not sys.stdin.readline():
            return 1
        result = run_schedule(args.host, args.port, request, args.rate, args.connections, args.seconds, conns)
        print(json.dumps(result), flush=True)
    finally:
        for c in conns:
            c.sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
