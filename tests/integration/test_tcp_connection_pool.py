"""A DestinationRule's ``connectionPool.tcp`` on plain TCP, through the sidecar's outbound capture to a real TCP
echo: ``maxConnections`` refuses a connection over the limit at once (flag UO) and frees the slot when one
closes, ``idleTimeout`` closes a quiet connection (not a busy one), ``maxConnectionDuration`` closes one at that
age however busy. Compiled from the DestinationRule as the control plane does."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kizuna.proxyconfig.model import Snapshot, VirtualHost
from kizuna.proxyconfig.policy import ConnectionPool
from kizuna.testing.mesh import BackgroundLoop, loopback_addresses, service_cluster, simple_virtual_host
from kizuna.testing.upstream import TcpEchoServer

pytestmark = pytest.mark.integration

VIP = "10.96.7.7"
PORT = 9000


def compiled(tcp: str) -> ConnectionPool:
    """``trafficPolicy.connectionPool`` of a DestinationRule whose ``tcp:`` is ``tcp``, as the control plane
    compiles it."""
    from kizuna.api.codec import parse_text
    from kizuna.api.validate import parse
    from kizuna.controlplane.compile_clusters import connection_pool

    text = ("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: echo}\n"
            f"spec:\n  host: echo\n  trafficPolicy:\n    connectionPool:\n      tcp: {tcp}\n")
    resource = parse(parse_text(text, "dr.yaml")[0])
    return connection_pool(resource.spec.traffic_policy.connection_pool)


class Relay:
    """The outbound capture serving connections redirected to the echo Service's VIP, and its counters."""

    def __init__(self, bg: BackgroundLoop, pool: ConnectionPool) -> None:
        from kizuna.proxy.capture import OutboundCapture, OwnPorts
        from kizuna.proxy.listener import ConnectionInfo
        from kizuna.proxy.outbound import OutboundDispatcher
        from kizuna.proxy.passthrough import Passthrough
        from kizuna.proxy.pool import PoolRegistry
        from kizuna.proxy.state import ProxyState
        from kizuna.proxy.stats import Stats

        self.bg = bg
        app, proxy = loopback_addresses(2, prefix="127.102")
        self.echo = bg.run(TcpEchoServer(app, 0).start())
        cluster = dataclasses.replace(service_cluster("echo", PORT, [(app, self.echo.port)], protocol="tcp"),
                                      connection_pool=pool)
        vh = simple_virtual_host("echo", PORT, cluster.name, protocol="tcp")
        vh = VirtualHost(vh.name, vh.hosts, vh.port, vh.protocol, vh.routes, (VIP,))
        snapshot = Snapshot("tcp-pool", virtual_hosts=(vh,), clusters=(cluster,))
        self.stats = stats = Stats()
        self.pools: Any = PoolRegistry()
        pools = self.pools

        class Source:
            state = ProxyState(snapshot, pools, stats)

        capture = OutboundCapture(Source(), OutboundDispatcher(Source(), stats, bg.loop), Passthrough(pools, stats),
                                  stats, set(), OwnPorts(set(), {15001}))

        async def serve() -> Any:
            return await bg.loop.create_server(lambda: capture(ConnectionInfo("outbound", 15001, (VIP, PORT))),
                                               proxy, 0)

        self.server = bg.run(serve())
        self.address = (proxy, self.server.sockets[0].getsockname()[1])
        self.circuit = stats.policies[cluster.name].circuit if cluster.name in stats.policies else None

    def connect(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=10)

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            self.pools.close()
            await self.server.wait_closed()
            await self.echo.stop()

        self.bg.run(stop())


@pytest.fixture
def relay(bg: BackgroundLoop) -> Iterator[Callable[[ConnectionPool], Relay]]:
    started: list[Relay] = []

    def start(pool: ConnectionPool) -> Relay:
        started.append(Relay(bg, pool))
        return started[-1]

    try:
        yield start
    finally:
        for r in started:
            r.close()


def echoes(sock: socket.socket, data: bytes = b"ping") -> bool:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(len(data) - len(got))
        if not chunk:
            return False
        got += chunk
    return got == data


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the peer closes ``sock`` (reading only), or None if it stays open that long."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def test_the_destination_rule_compiles_to_the_tcp_settings() -> None:
    pool = compiled("{maxConnections: 2, idleTimeout: 300ms, maxConnectionDuration: 2s}")
    assert (pool.max_connections, pool.tcp_idle_timeout, pool.max_connection_duration) == (2, 0.3, 2.0)
    assert compiled("{idleTimeout: 0s}").tcp_idle_timeout == 0.0  # Istio: 0s switches the timeout off
    assert compiled("{connectTimeout: 1s}").tcp_idle_timeout is None  # the 1 h default


def test_max_connections_refuses_the_one_over_the_limit(relay: Callable[[ConnectionPool], Relay],
                                                        kit: Any) -> None:
    r = relay(compiled("{maxConnections: 2}"))
    first, second = r.connect(), r.connect()
    try:
        assert echoes(first) and echoes(second)
        third = r.connect()
        with third:
            assert closed_within(third, 5.0) is not None, "the third connection was not closed"
        assert r.stats.flags.get("UO") == 1
        assert r.circuit is not None and r.circuit.to_json()["cx_overflows"] == 1
        assert echoes(first) and echoes(second)  # the admitted ones are untouched
        first.close()
        kit.wait_until(lambda: r.circuit is not None and len(r.circuit.holders) == 1, 5.0, "the slot to free")
        with r.connect() as fourth:
            assert echoes(fourth)
        assert r.stats.flags.get("UO") == 1
    finally:
        first.close()
        second.close()


def test_idle_timeout_closes_a_quiet_connection_not_a_busy_one(relay: Callable[[ConnectionPool], Relay]) -> None:
    r = relay(compiled("{idleTimeout: 500ms}"))
    with r.connect() as quiet, r.connect() as busy:
        assert echoes(quiet)
        start = time.monotonic()
        while time.monotonic() - start < 1.5:  # three idle timeouts' worth of traffic, a byte every 0.1 s
            assert echoes(busy, b"x"), "the busy connection was closed"
            time.sleep(0.1)
        assert closed_within(quiet, 0.1) is not None, "the quiet connection is still open after 1.5 s"
        assert echoes(busy)


def test_max_connection_duration_closes_even_a_busy_connection(relay: Callable[[ConnectionPool], Relay]
                                                               ) -> None:
    r = relay(compiled("{maxConnectionDuration: 1s}"))
    with r.connect() as sock:
        start = time.monotonic()
        while echoes(sock, b"x"):
            assert time.monotonic() - start < 10.0, "still open after 10 s"
            time.sleep(0.05)
        assert time.monotonic() - start >= 0.9


def test_without_settings_a_connection_stays_open(relay: Callable[[ConnectionPool], Relay]) -> None:
    r = relay(ConnectionPool())
    with r.connect() as sock:
        assert echoes(sock)
        assert closed_within(sock, 1.0) is None
        assert echoes(sock)
