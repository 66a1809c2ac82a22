"""The client sidecar's per-request Python work, without sockets: CPU µs per request, steady enough for A/B.

The request bytes go into a real ``HttpServerConnection`` with the real outbound dispatcher and snapshot;
the exchange sends them on a pooled ``UpstreamConnection`` whose transport only counts writes, and the
response bytes are fed back into it. What is left out is exactly what no Python change can save: syscalls
and the event loop. Run it against another tree to compare (``--src``); the best of several rounds counts::

    .venv/bin/python -m bench.inproc
    .venv/bin/python -m bench.inproc --src /tmp/baseline/src
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from typing import Any

REQUEST = b"GET http://bench:80/ HTTP/1.1\r\nHost: bench\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-length: 1024\r\ncontent-type: text/plain\r\n"
            b"cache-control: no-cache\r\n\r\n" + b"x" * 1024)


class CountingTransport:
    """Just enough of a transport for the connections: writes are counted and dropped."""

    def __init__(self, sockname: tuple[str, int] | None = None) -> None:
        self.writes = 0
        self.last = b""
        self.sockname = sockname

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.last = data

    def is_closing(self) -> bool:
        return False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        raise AssertionError("the benchmark connection closed")

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sockname if name == "sockname" and self.sockname is not None else default


def run(requests: int, rounds: int, telemetry: bool = False, tracing: bool = False) -> float:
    """Best-of-``rounds`` CPU µs per request over ``requests`` requests (``telemetry``: Istio metrics
    recorded, as the source reporter of a connection accepted on the outbound port; ``tracing``: also trace
    context propagated, 1% of new traces sampled as ``kizuna up``'s default, no exporter)."""
    import uvloop

    from kizuna.proxy.downstream import HttpServerConnection
    from kizuna.proxy.outbound import OutboundDispatcher
    from kizuna.proxy.pool import PoolRegistry
    from kizuna.proxy.state import ProxyState
    from kizuna.proxy.stats import Stats
    from kizuna.proxy.upstream import UpstreamConnection
    from kizuna.testing.mesh import two_hop_snapshots

    loop = uvloop.new_event_loop()
    stats = Stats()
    if telemetry:
        from kizuna.proxy.telemetry import Telemetry, TelemetryStats

        recorder = Telemetry(("sleep", "default", "unknown", "sleep", "v1"), 15001)
        if tracing:
            from kizuna.proxy.tracing import Tracer

            recorder.tracer = Tracer("sleep.default", "sleep", 1.0, None)
        stats = TelemetryStats(recorder)
    pools: PoolRegistry[UpstreamConnection] = PoolRegistry()
    snapshot, _ = two_hop_snapshots("127.0.0.1", "127.0.0.2", "127.0.0.3", 8080)

    class Source:
        state = ProxyState(snapshot, pools, stats)

    dispatcher = OutboundDispatcher(Source(), stats, loop)
    down = HttpServerConnection(dispatcher, stats, set())
    down_transport = CountingTransport(("127.0.0.1", 15001))
    down.connection_made(down_transport)  # type: ignore[arg-type]
    (pool,) = pools.pools.values()
    up = UpstreamConnection(pool, stats)
    up_transport = CountingTransport()
    up.connection_made(up_transport)  # type: ignore[arg-type]
    up.idle_since = loop.time()
    pool.idle.append(up)
    try:
        best = float("inf")
        for _ in range(rounds):
            gc.collect()
            start = time.process_time()
            for _ in range(requests):
                down.data_received(REQUEST)
                up.data_received(RESPONSE)
            best = min(best, (time.process_time() - start) / requests * 1e6)
        if down_transport.writes != up_transport.writes or not down_transport.last.startswith(b"HTTP/1.1 200"):
            raise AssertionError(f"{down_transport.writes} responses for {up_transport.writes} requests")
        return best
    finally:
        loop.close()


def main(argv: list[str] | None = None) -> int:
    """Print the best CPU µs per request."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default="", help="import kizuna from this source tree")
    ap.add_argument("--requests", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--telemetry", action="store_true", help="record Istio metrics (the source reporter's work)")
    ap.add_argument("--tracing", action="store_true", help="with --telemetry: propagate trace context, sample 1%%")
    args = ap.parse_args(argv)
    if args.src:
        sys.path.insert(0, args.src)
    extras = (", telemetry on" if args.telemetry else "") + (", tracing on" if args.telemetry and args.tracing else "")
    print(f"{run(args.requests, args.rounds, args.telemetry, args.tracing):.2f} us/request (Python work of the client "
          f"sidecar{extras})  src {args.src or 'installed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
