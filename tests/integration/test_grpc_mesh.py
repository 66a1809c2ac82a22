"""gRPC (h2c prior knowledge) through two in-process sidecars with real grpcio clients and servers.

client → client sidecar outbound (h2 preface, routed by ``:authority``) → server sidecar inbound
(sniffed as HTTP/2) → grpcio server. Echo methods are generic handlers over raw bytes: no protoc needed; the
standard ``grpc.health.v1.Health`` service (grpcio-health-checking) runs beside them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kizuna.proxy.h2 import H2ServerConnection
from kizuna.proxy.sidecar import Sidecar
from kizuna.proxyconfig.model import (
    HeaderMatch,
    InboundPort,
    RetryPolicy,
    Route,
    RouteAction,
    RouteMatch,
    Snapshot,
    StringMatch,
    VirtualHost,
    WeightedCluster,
)
from kizuna.testing.mesh import BackgroundLoop, LocalMesh, loopback_addresses, service_cluster, service_hosts

pytestmark = pytest.mark.integration
METHOD = "/echo.Echo/Say"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class EchoApp:
    """A grpcio server answering ``name:request``; a request starting ``slow`` waits 1 s; ``flaky`` fails every
    other call. ``Deadline`` answers the seconds the server sees left before the caller's deadline. Its health
    service says SERVING for ``""`` and ``echo.Echo``, NOT_SERVING for ``echo.Maintenance``."""

    def __init__(self, address: str, name: str, flaky: bool = False) -> None:
        self.name = name.encode()
        self.flaky = flaky
        self.calls = 0
        self.slow_active: dict[bytes, bool] = {}
        self.lock = threading.Lock()
        handler = grpc.method_handlers_generic_handler("echo.Echo", {
            "Say": grpc.unary_unary_rpc_method_handler(self.say),
            "Deadline": grpc.unary_unary_rpc_method_handler(self.deadline),
            "Upload": grpc.stream_unary_rpc_method_handler(self.upload),
            "Download": grpc.unary_stream_rpc_method_handler(self.download)})
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self.server.add_generic_rpc_handlers((handler,))
        self.health = health.HealthServicer()
        for service, status in (("", SERVING), ("echo.Echo", SERVING), ("echo.Maintenance", NOT_SERVING)):
            self.health.set(service, status)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(f"{address}:0")
        self.server.start()

    def say(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self.lock:
            self.calls += 1
            fail = self.flaky and self.calls % 2 == 1
        if fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "flaky")
        if request.startswith(b"slow"):
            time.sleep(1.0)
            with self.lock:  # whether the call was still on once the work was done (not cancelled)
                self.slow_active[request] = context.is_active()
        return self.name + b":" + request

    def deadline(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        left = context.time_remaining()  # grpcio: about 2**63 (seconds) when the call has no deadline
        return b"none" if left is None or left > 1e9 else b"%.3f" % left

    def upload(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        total = sum(len(r) for r in requests)
        return b"%d" % total

    def download(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        count, size = (int(x) for x in request.split(b"x"))
        for i in range(count):
            yield bytes([i % 256]) * size


@dataclass
class Mesh:
    client: Sidecar
    client_address: str
    v1: EchoApp
    v2: EchoApp
    flaky: EchoApp
    loop: BackgroundLoop
    snapshot: Snapshot

    def channel(self, authority: str) -> grpc.Channel:
        return grpc.insecure_channel(f"{self.client_address}:15001", options=[
            ("grpc.default_authority", authority), ("grpc.enable_http_proxy", 0)])


def _vh(service: str, port: int, routes: tuple[Route, ...]) -> VirtualHost:
    name = f"{service}.default.svc.cluster.local:{port}"
    return VirtualHost(name, service_hosts(service), port, "http", routes)


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    client_addr, server_addr, app_addr = loopback_addresses(3, prefix="127.80")
    loop = BackgroundLoop()
    local = LocalMesh(loop)
    apps: list[EchoApp] = []
    try:
        v1, v2 = EchoApp(app_addr, "v1"), EchoApp(app_addr, "v2")
        flaky = EchoApp(app_addr, "flaky", flaky=True)
        apps += [v1, v2, flaky]
        c1 = service_cluster("echo", 50051, [(server_addr, v1.port)], subset="v1", protocol="auto")
        c2 = service_cluster("echo", 50051, [(server_addr, v2.port)], subset="v2", protocol="auto")
        cf = service_cluster("flaky", 50052, [(server_addr, flaky.port)], protocol="auto")
        ce = service_cluster("empty", 50053, [], protocol="auto")
        v2_match = RouteMatch(headers=(HeaderMatch("x-version", StringMatch("exact", "v2")),))
        hosts = (
            _vh("echo", 50051, (
                Route("v2", (v2_match,), RouteAction((WeightedCluster(c2.name, 100),))),
                Route("v1", (), RouteAction((WeightedCluster(c1.name, 100),), timeout=5.0)))),
            _vh("flaky", 50052, (Route("flaky", (), RouteAction(
                (WeightedCluster(cf.name, 100),),
                retry=RetryPolicy(attempts=2, retry_on=frozenset({"unavailable"})))),)),
            _vh("timed", 50054, (Route("timed", (), RouteAction((WeightedCluster(c1.name, 100),),
                                                                timeout=0.2)),)),
            _vh("empty", 50053, (Route("empty", (), RouteAction((WeightedCluster(ce.name, 100),))),)),
        )
        client_snapshot = Snapshot("grpc-client", virtual_hosts=hosts, clusters=(c1, c2, cf, ce))
        server_snapshot = Snapshot("grpc-server", inbound=tuple(
            InboundPort(app.port, app_addr, app.port, "auto") for app in apps))
        local.sidecar(server_addr, server_snapshot)
        client = local.sidecar(client_addr, client_snapshot)
        yield Mesh(client, client_addr, v1, v2, flaky, loop, client_snapshot)
    finally:
        try:
            local.close()
        finally:
            for app in apps:
                app.server.stop(0)
            loop.close()


def _call(channel: grpc.Channel, request: bytes, timeout: float = 5.0, metadata: Any = None) -> bytes:
    say = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
    return bytes(say(request, timeout=timeout, metadata=metadata))


def test_unary_call_through_two_sidecars(mesh: Mesh) -> None:
    with mesh.channel("echo:50051") as channel:
        assert _call(channel, b"hello") == b"v1:hello"


def test_hundred_concurrent_streams_share_few_upstream_connections(mesh: Mesh) -> None:
    before = mesh.client.stats.upstream_cx_total
    with mesh.channel("echo:50051") as channel:
        say = channel.unary_unary(METHOD)
        calls = [say.future(b"n%d" % i, timeout=10) for i in range(100)]
        replies = [c.result() for c in calls]
    assert replies == [b"v1:n%d" % i for i in range(100)]
    assert mesh.client.stats.upstream_cx_total - before <= 3


def test_header_routes_to_v2(mesh: Mesh) -> None:
    with mesh.channel("echo:50051") as channel:
        assert _call(channel, b"a", metadata=(("x-version", "v2"),)) == b"v2:a"
        assert _call(channel, b"b", metadata=(("x-version", "v1"),)) == b"v1:b"


def test_a_client_behind_grpc_proxy_gets_each_call_routed(mesh: Mesh) -> None:
    # grpcio honours grpc_proxy/http_proxy with a CONNECT tunnel; the sidecar answers it and routes each call
    # inside, so one channel reaches both versions by header (a raw relay would pin the channel to one).
    proxy = f"http://{mesh.client_address}:15001"
    with grpc.insecure_channel("echo:50051", options=[("grpc.http_proxy", proxy)]) as channel:
        replies = [_call(channel, b"%d" % i, metadata=(("x-version", "v2" if i % 2 else "v1"),)) for i in range(6)]
    assert replies == [b"v1:0", b"v2:1", b"v1:2", b"v2:3", b"v1:4", b"v2:5"]


def _health(channel: grpc.Channel, service: str, metadata: Any = None) -> int:
    """``grpc.health.v1.Health/Check`` for ``service``: its serving status."""
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5,
                                                      metadata=metadata)
    return int(reply.status)


def test_health_check_through_both_sidecars(mesh: Mesh) -> None:
    with mesh.channel("echo:50051") as channel:
        assert _health(channel, "") == SERVING
        assert _health(channel, "echo.Echo") == SERVING
        assert _health(channel, "echo.Maintenance") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as raised:
            _health(channel, "nope.Nope")
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND  # the health service's own answer, passed on


def test_health_check_is_routed_like_any_call(mesh: Mesh) -> None:
    """v2 alone stops serving ``echo.Echo``: a check routed to v2 (by the header) says so, one routed to v1
    does not."""
    v2 = (("x-version", "v2"),)
    mesh.v2.health.set("echo.Echo", NOT_SERVING)
    try:
        with mesh.channel("echo:50051") as channel:
            assert _health(channel, "echo.Echo", metadata=v2) == NOT_SERVING
            assert _health(channel, "echo.Echo") == SERVING
    finally:
        mesh.v2.health.set("echo.Echo", SERVING)


def test_health_watch_streams_each_change_through_the_sidecars(mesh: Mesh) -> None:
    """``Health/Watch`` is a server stream left open: each status change arrives as it happens."""
    with mesh.channel("echo:50051") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="echo.Echo"),
                                                          timeout=30, metadata=(("x-version", "v2"),))
        try:
            assert next(watch).status == SERVING
            mesh.v2.health.set("echo.Echo", NOT_SERVING)
            assert next(watch).status == NOT_SERVING
            mesh.v2.health.set("echo.Echo", SERVING)
            assert next(watch).status == SERVING
        finally:
            watch.cancel()
            mesh.v2.health.set("echo.Echo", SERVING)


def test_retry_on_unavailable_recovers_a_flaky_server(mesh: Mesh) -> None:
    with mesh.channel("flaky:50052") as channel:
        for i in range(6):
            assert _call(channel, b"x%d" % i) == b"flaky:x%d" % i
    assert mesh.flaky.calls >= 12


def test_the_callers_deadline_reaches_the_server_through_both_sidecars(mesh: Mesh) -> None:
    """``grpc-timeout`` survives both hops: the server sees a deadline a little under the client's 3 s (it sees
    none at all if a sidecar drops the header)."""
    with mesh.channel("echo:50051") as channel:
        left = channel.unary_unary("/echo.Echo/Deadline")(b"", timeout=3.0)
    assert left != b"none", "the server saw no deadline"
    assert 1.5 < float(left) <= 3.0, left


def _server_saw(app: EchoApp, request: bytes) -> bool:
    """Whether ``app``'s slow call ``request`` was still on after its 1 s of work (waits for it to finish)."""
    deadline = time.monotonic() + 10
    while request not in app.slow_active:
        assert time.monotonic() < deadline, f"{request!r} never finished on the server"
        time.sleep(0.05)
    return app.slow_active[request]


def test_deadline_exceeded_with_a_slow_server(mesh: Mesh) -> None:
    """The client's 0.2 s deadline ends a 1 s call, and the server learns it: its call is over before it answers
    (the deadline, or the cancellation, went through both sidecars)."""
    with mesh.channel("echo:50051") as channel:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            _call(channel, b"slow-deadline", timeout=0.2)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 0.9
    assert _server_saw(mesh.v1, b"slow-deadline") is False


def test_route_timeout_is_a_grpc_deadline_exceeded(mesh: Mesh) -> None:
    """A route timeout (0.2 s) shorter than the client's deadline (5 s): the sidecar ends the call itself, with its
    own status and flag, and cancels the call upstream."""
    ut_before = mesh.client.stats.flags.get("UT", 0)
    with mesh.channel("timed:50054") as channel, pytest.raises(grpc.RpcError) as raised:
        started = time.monotonic()
        _call(channel, b"slow-route-timeout", timeout=5.0)
    took = time.monotonic() - started
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert raised.value.details() == "upstream timeout"
    assert dict(raised.value.trailing_metadata() or ()).get("x-kizuna-flags") == "UT"
    assert took < 0.9, f"{took:.2f}s: the 1 s call was not cut at the route's 0.2 s"
    assert mesh.client.stats.flags.get("UT", 0) == ut_before + 1
    assert _server_saw(mesh.v1, b"slow-route-timeout") is False


def test_no_endpoint_is_unavailable_with_a_message(mesh: Mesh) -> None:
    with mesh.channel("empty:50053") as channel, pytest.raises(grpc.RpcError) as raised:
        _call(channel, b"x")
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert raised.value.details() == "no healthy upstream"
    trailers = dict(raised.value.trailing_metadata() or ())
    assert trailers.get("x-kizuna-flags") == "UH"


def test_no_route_is_unimplemented(mesh: Mesh) -> None:
    with mesh.channel("nowhere:9999") as channel, pytest.raises(grpc.RpcError) as raised:
        _call(channel, b"x")
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert raised.value.details() == "no route"


def test_large_streams_both_ways_pass_flow_control(mesh: Mesh) -> None:
    """Megabytes each way through 64 KiB windows: data is credited as it is passed on, so nothing stalls."""
    with mesh.channel("echo:50051") as channel:
        upload = channel.stream_unary("/echo.Echo/Upload")
        assert upload(iter([b"u" * 100_000] * 40), timeout=20) == b"4000000"
        download = channel.unary_stream("/echo.Echo/Download")
        chunks = list(download(b"40x100000", timeout=20))
    assert [len(c) for c in chunks] == [100_000] * 40
    assert all(c == bytes([i % 256]) * 100_000 for i, c in enumerate(chunks))


def test_slow_reader_slows_the_server_instead_of_filling_the_proxy(mesh: Mesh) -> None:
    """A client that reads slowly: the stream still completes, in order (windows pace the server)."""
    with mesh.channel("echo:50051") as channel:
        download = channel.unary_stream("/echo.Echo/Download")
        seen, held = 0, 0
        for i, chunk in enumerate(download(b"20x200000", timeout=20)):
            assert chunk == bytes([i % 256]) * 200_000
            seen += 1
            held = max(held, _held_by_proxy(mesh.client))
            time.sleep(0.02)
    assert seen == 20
    assert held <= 65_535  # at most the one stream window the sidecar grants upstream


def _held_by_proxy(sidecar: Sidecar) -> int:
    """Response bytes a sidecar holds for its HTTP/2 clients (read from the test thread: an estimate)."""
    total = 0
    for conn in list(sidecar.connections):
        if isinstance(conn, H2ServerConnection):
            for call in list(conn.calls.values()):
                total += sum(len(cast(bytes, chunk[0])) for chunk in list(call.pending_down))
    return total


def test_stopping_sidecar_sends_goaway_and_finishes_streams_in_flight(mesh: Mesh) -> None:
    address = loopback_addresses(1, prefix="127.80")[0]
    local = LocalMesh(mesh.loop)
    try:
        sidecar = local.sidecar(address, mesh.snapshot)
        with grpc.insecure_channel(f"{address}:15001", options=[
                ("grpc.default_authority", "echo:50051"), ("grpc.enable_http_proxy", 0)]) as channel:
            say = channel.unary_unary(METHOD)
            assert say(b"warm", timeout=5) == b"v1:warm"
            in_flight = say.future(b"slow", timeout=5)
            time.sleep(0.3)
            stopping = threading.Thread(target=mesh.loop.run, args=(sidecar.stop(drain=3.0),))
            stopping.start()
            try:
                assert in_flight.result() == b"v1:slow"  # the stream in flight finished
                with pytest.raises(grpc.RpcError) as raised:
                    say(b"after", timeout=2)
                assert raised.value.code() == grpc.StatusCode.UNAVAILABLE  # nothing listens any more
            finally:
                stopping.join(10)
        local.sidecars.clear()
    finally:
        local.close()
