"""HTTP/2 streams get the route policies and cluster resilience HTTP/1.1 requests get.

h2c client (the ``h2`` library, curl, grpcio) → client sidecar outbound (HTTP/2, where the policies apply) →
server sidecar inbound, whose ports declare HTTP/1.1 apps (``http_version="1.1"``) → the programmable
HTTP/1.1 test app. So every test here also crosses the HTTP/2 → HTTP/1.1 bridge of the inbound hop.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest

from kizuna.proxy.sidecar import Sidecar
from kizuna.proxyconfig.actions import (
    Cors,
    Fault,
    HeaderOps,
    HeaderRules,
    Mirror,
    Redirect,
    Rewrite,
    RoutePolicy,
)
from kizuna.proxyconfig.model import (
    Cluster,
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
from kizuna.proxyconfig.policy import ConnectionPool, HashPolicy, OutlierDetection
from kizuna.testing.mesh import BackgroundLoop, LocalMesh, loopback_addresses, service_cluster, service_hosts
from kizuna.testing.upstream import UpstreamServer

pytestmark = pytest.mark.integration
NO_RETRY = RetryPolicy(attempts=0)


@dataclass
class Answer:
    """One HTTP/2 response as the client saw it."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    trailers: dict[str, str] = field(default_factory=dict)
    reset: bool = False
    elapsed: float = 0.0

    def json(self) -> Any:
        return json.loads(self.body)


def h2_requests(address: str, port: int, requests: list[tuple[list[tuple[str, str]], bytes]],
                timeout: float = 10.0) -> list[Answer]:
    """Send ``requests`` (headers, body) as concurrent streams of one h2c connection; their answers."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    started = time.monotonic()
    with socket.create_connection((address, port), timeout=timeout) as sock:
        ids = []
        unsent: dict[int, bytes] = {}
        for headers, body in requests:
            stream_id = conn.get_next_available_stream_id()
            conn.send_headers(stream_id, headers, end_stream=not body)
            if body:
                unsent[stream_id] = body
            ids.append(stream_id)
        answers = {i: Answer() for i in ids}
        pending = set(ids)
        while pending and time.monotonic() - started < timeout:
            for stream_id, body in list(unsent.items()):  # bodies go as fast as the proxy's windows allow
                while body:
                    size = min(len(body), conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
                    if size <= 0:
                        break
                    conn.send_data(stream_id, body[:size], end_stream=size == len(body))
                    body = body[size:]
                if body:
                    unsent[stream_id] = body
                else:
                    del unsent[stream_id]
            sock.sendall(conn.data_to_send())
            data = sock.recv(65536)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    answer = answers[ev.stream_id]
                    answer.headers = {str(k): str(v) for k, v in ev.headers}
                    answer.status = int(answer.headers[":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    answers[ev.stream_id].body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.TrailersReceived):
                    answers[ev.stream_id].trailers = {str(k): str(v) for k, v in ev.headers}
                elif isinstance(ev, h2.events.StreamEnded):
                    pending.discard(ev.stream_id)
                    answers[ev.stream_id].elapsed = time.monotonic() - started
                elif isinstance(ev, h2.events.StreamReset):
                    pending.discard(ev.stream_id)
                    unsent.pop(ev.stream_id, None)
                    answers[ev.stream_id].reset = True
    return [answers[i] for i in ids]


@dataclass
class Mesh:
    client: Sidecar
    server: Sidecar
    address: str
    apps: dict[str, UpstreamServer]
    snapshot: Snapshot

    def get(self, authority: str, path: str = "/", headers: list[tuple[str, str]] | None = None,
            method: str = "GET", body: bytes = b"") -> Answer:
        return self.many(authority, [(path, headers or [])], method, body)[0]

    def many(self, authority: str, calls: list[tuple[str, list[tuple[str, str]]]], method: str = "GET",
             body: bytes = b"") -> list[Answer]:
        requests = [([(":method", method), (":scheme", "http"), (":authority", authority), (":path", path),
                      *headers], body) for path, headers in calls]
        return h2_requests(self.address, 15001, requests)


def _vh(service: str, port: int, routes: tuple[Route, ...]) -> VirtualHost:
    return VirtualHost(f"{service}.default.svc.cluster.local:{port}", service_hosts(service), port, "http", routes)


def _route(name: str, cluster: str, prefix: str | None = None, policy: RoutePolicy | None = None,
           timeout: float | None = None, retry: RetryPolicy = NO_RETRY) -> Route:
    matches = (RouteMatch(uri=StringMatch("prefix", prefix)),) if prefix else ()
    return Route(name, matches, RouteAction((WeightedCluster(cluster, 100),), timeout, retry, policy))


def _cluster(service: str, port: int, endpoints: list[tuple[str, int]], **policy: Any) -> Cluster:
    base = service_cluster(service, port, endpoints, protocol="http")
    return Cluster(base.name, base.service, base.port, base.subset, base.protocol, "ROUND_ROBIN",
                   base.endpoints, base.connect_timeout, **policy)


def _say(request: bytes, context: grpc.ServicerContext) -> bytes:
    """``echo.Echo/Say``: ``fail`` aborts with UNAVAILABLE, ``sleep:<s>`` answers late, else an echo."""
    if request == b"fail":
        context.abort(grpc.StatusCode.UNAVAILABLE, "asked to fail")
    if request.startswith(b"sleep:"):
        time.sleep(float(request[6:]))
    return b"grpc:" + request


def grpc_app(address: str) -> tuple[grpc.Server, int]:
    """A started grpcio server (h2c only) with ``echo.Echo/Say``, and its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "echo.Echo", {"Say": grpc.unary_unary_rpc_method_handler(_say)}),))
    port = server.add_insecure_port(f"{address}:0")
    server.start()
    return server, port


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    client_addr, server_addr, app_addr = loopback_addresses(3, prefix="127.81")
    loop = BackgroundLoop()
    local = LocalMesh(loop)
    grpc_server, grpc_port = grpc_app(app_addr)
    try:
        apps = {name: local.upstream(app_addr, name=name) for name in ("v1", "v2", "ok")}
        apps["bad"] = local.upstream(app_addr, name="bad", status=503)
        apps["slow"] = local.upstream(app_addr, name="slow", delay=1.0)
        server_snapshot = Snapshot("h2-server", inbound=(*(
            InboundPort(app.port, app_addr, app.port, "http", http_version="1.1") for app in apps.values()),
            InboundPort(grpc_port, app_addr, grpc_port, "http", http_version="2")))
        at = {name: (server_addr, app.port) for name, app in apps.items()}
        web = _cluster("web", 80, [at["v1"]])
        shadow = _cluster("shadow", 80, [at["v2"]])
        pooled = _cluster("pooled", 80, [at["slow"]],
                          connection_pool=ConnectionPool(max_requests=2, max_pending_requests=1))
        ejecting = _cluster("ejecting", 80, [at["ok"], at["bad"]],
                            outlier_detection=OutlierDetection(consecutive_5xx=2, interval=10.0,
                                                               base_ejection_time=30.0, max_ejection_percent=50))
        hashed = _cluster("hashed", 80, [at["v1"], at["v2"], at["ok"]], hash_policy=HashPolicy(header="x-user"))
        slow = _cluster("slow", 80, [at["slow"]])
        grpc_dead = _cluster("grpcdead", 50051, [(server_addr, 1)])
        grpc_one = _cluster("grpcone", 50051, [(server_addr, grpc_port)],
                            connection_pool=ConnectionPool(max_requests=1, max_pending_requests=0))
        cors = Cors(allow_origins=(StringMatch("exact", "https://app.example"),), allow_methods=("GET", "POST"),
                    max_age=60)
        web_routes = (
            _route("redirect", web.name, "/old-page", RoutePolicy(redirect=Redirect(uri="/new-page", code=301))),
            _route("headers", web.name, "/headers", RoutePolicy(headers=HeaderRules(
                request=HeaderOps(set=(("x-added", "yes"),), remove=("x-drop",)),
                response=HeaderOps(set=(("x-route", "headers"),))))),
            _route("rewrite", web.name, "/legacy/", RoutePolicy(rewrite=Rewrite(
                uri="/modern/", authority="rewritten.example"))),
            _route("abort", web.name, "/abort", RoutePolicy(fault=Fault(abort_status=418))),
            _route("delay", web.name, "/slowed", RoutePolicy(fault=Fault(delay=0.3))),
            _route("mirror", web.name, "/mirror", RoutePolicy(mirrors=(Mirror(shadow.name),))),
            _route("cors", web.name, "/cors", RoutePolicy(cors=cors)),
            _route("default", web.name),
        )
        hosts = (
            _vh("web", 80, web_routes),
            _vh("pooled", 80, (_route("pooled", pooled.name),)),
            _vh("ejecting", 80, (_route("ejecting", ejecting.name),)),
            _vh("hashed", 80, (_route("hashed", hashed.name),)),
            _vh("pertry", 80, (_route("pertry", slow.name, timeout=3.0, retry=RetryPolicy(
                attempts=1, per_try_timeout=0.2, retry_on=frozenset({"reset"}))),)),
            _vh("grpcdead", 50051, (_route("abort", grpc_dead.name, policy=RoutePolicy(
                fault=Fault(grpc_status=14))),)),
            _vh("grpcone", 50051, (_route("one", grpc_one.name),)),
        )
        client_snapshot = Snapshot("h2-client", virtual_hosts=hosts,
                                   clusters=(web, shadow, pooled, ejecting, hashed, slow, grpc_dead, grpc_one))
        server = local.sidecar(server_addr, server_snapshot)
        client = local.sidecar(client_addr, client_snapshot)
        yield Mesh(client, server, client_addr, apps, client_snapshot)
    finally:
        try:
            local.close()
        finally:
            grpc_server.stop(0)
            loop.close()


def test_h2c_client_reaches_an_http11_app_through_both_sidecars(mesh: Mesh) -> None:
    answer = mesh.get("web", "/anything?q=1", [("x-custom", "c")], method="POST", body=b"hello")
    assert answer.status == 200
    echo = answer.json()
    assert (echo["method"], echo["path"], echo["body"], echo["upstream"]) == ("POST", "/anything?q=1", "hello", "v1")
    assert echo["headers"]["host"] == "web"
    assert echo["headers"]["x-custom"] == "c"
    # The sidecar added the id Envoy adds when a request has none.
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                        echo["headers"]["x-request-id"])
    assert answer.headers["x-upstream"] == "v1"
    assert "connection" not in answer.headers


def test_redirect_seen_by_curl_over_h2c(mesh: Mesh) -> None:
    out = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-D", "-", "-H", "Host: web",
                          f"http://{mesh.address}:15001/old-page?x=1"],
                         capture_output=True, text=True, timeout=20, check=True).stdout
    assert out.startswith("HTTP/2 301")
    assert "location: http://web/new-page?x=1" in out.lower()


def test_header_operations_on_request_and_response(mesh: Mesh) -> None:
    answer = mesh.get("web", "/headers", [("x-drop", "secret"), ("x-keep", "k")])
    echo = answer.json()
    assert echo["headers"]["x-added"] == "yes"
    assert "x-drop" not in echo["headers"]
    assert echo["headers"]["x-keep"] == "k"
    assert answer.headers["x-route"] == "headers"


def test_rewrite_changes_path_and_authority(mesh: Mesh) -> None:
    echo = mesh.get("web", "/legacy/item?id=3").json()
    assert echo["path"] == "/modern/item?id=3"
    assert echo["headers"]["host"] == "rewritten.example"


def test_fault_abort_and_delay_are_flagged(mesh: Mesh) -> None:
    before = dict(mesh.client.stats.flags)
    aborted = mesh.get("web", "/abort")
    assert aborted.status == 418
    assert aborted.headers["x-kizuna-flags"] == "FI"
    delayed = mesh.get("web", "/slowed")
    assert delayed.status == 200 and delayed.json()["upstream"] == "v1"
    assert delayed.elapsed >= 0.3
    assert delayed.headers["x-kizuna-flags"] == "DI"
    flags = mesh.client.stats.flags
    assert flags.get("FI", 0) == before.get("FI", 0) + 1
    assert flags.get("DI", 0) == before.get("DI", 0) + 1


def test_grpc_fault_abort_is_the_grpc_status(mesh: Mesh) -> None:
    with grpc.insecure_channel(f"{mesh.address}:15001", options=[
            ("grpc.default_authority", "grpcdead:50051"), ("grpc.enable_http_proxy", 0)]) as channel:
        say = channel.unary_unary("/echo.Echo/Say")
        with pytest.raises(grpc.RpcError) as raised:
            say(b"hi", timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert raised.value.details() == "fault filter abort"


def test_grpc_call_over_the_circuit_breaker_limit_is_unavailable(mesh: Mesh) -> None:
    with grpc.insecure_channel(f"{mesh.address}:15001", options=[
            ("grpc.default_authority", "grpcone:50051"), ("grpc.enable_http_proxy", 0)]) as channel:
        say = channel.unary_unary("/echo.Echo/Say")
        assert say(b"a", timeout=5) == b"grpc:a"
        slow = say.future(b"sleep:0.5", timeout=5)
        time.sleep(0.2)  # the slow call holds the cluster's only slot
        with pytest.raises(grpc.RpcError) as raised:
            say(b"b", timeout=5)
        assert slow.result() == b"grpc:sleep:0.5"
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert raised.value.details() == "upstream overflow"


def test_mirror_copy_reaches_shadow_while_client_sees_primary(mesh: Mesh) -> None:
    shadow = mesh.apps["v2"]
    before = len(shadow.requests)
    answer = mesh.get("web", "/mirror/a", method="POST", body=b"copy me")
    assert answer.json()["upstream"] == "v1"
    deadline = time.monotonic() + 5
    while len(shadow.requests) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    copy = shadow.requests[-1]
    assert (copy.method, copy.target, copy.body) == ("POST", "/mirror/a", b"copy me")
    assert copy.header("host") == "web-shadow"


def test_cors_preflight_answered_and_response_headers_added(mesh: Mesh) -> None:
    origin = ("origin", "https://app.example")
    preflight = mesh.get("web", "/cors", [origin, ("access-control-request-method", "POST")], method="OPTIONS")
    assert preflight.status == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert preflight.headers["access-control-max-age"] == "60"
    answer = mesh.get("web", "/cors", [origin])
    assert answer.json()["upstream"] == "v1"
    assert answer.headers["access-control-allow-origin"] == "https://app.example"


def test_circuit_breaker_overflow_under_concurrent_streams(mesh: Mesh) -> None:
    before = mesh.client.stats.flags.get("UO", 0)
    answers = mesh.many("pooled", [("/", [])] * 8)
    statuses = sorted(a.status for a in answers)
    # Two in flight and one waiting are admitted; the other five are refused at once.
    assert statuses.count(200) == 3, statuses
    refused = [a for a in answers if a.status == 503]
    assert len(refused) == 5
    assert all(a.headers["x-kizuna-flags"] == "UO" for a in refused)
    assert mesh.client.stats.flags["UO"] == before + 5


def test_outlier_detection_ejects_the_failing_endpoint(mesh: Mesh) -> None:
    bad = mesh.apps["bad"]
    first = mesh.many("ejecting", [("/", [])] * 6)
    seen_bad = len(bad.requests)
    assert any(a.status == 503 for a in first)
    later = [mesh.get("ejecting", "/") for _ in range(10)]
    assert [a.status for a in later] == [200] * 10
    assert len(bad.requests) == seen_bad  # ejected: no more requests reach it
    assert all(a.json()["upstream"] == "ok" for a in later)


def test_consistent_hash_keeps_a_user_on_one_endpoint(mesh: Mesh) -> None:
    for user in ("alice", "bob", "carol"):
        answers = mesh.many("hashed", [("/", [("x-user", user)])] * 10)
        assert len({a.json()["upstream"] for a in answers}) == 1, user
    spread = {mesh.get("hashed", "/", [("x-user", f"u{i}")]).json()["upstream"] for i in range(20)}
    assert len(spread) > 1


def test_per_try_timeout_bounds_each_try(mesh: Mesh) -> None:
    before = mesh.client.stats.retries
    answer = mesh.get("pertry", "/")
    assert answer.status == 504
    assert "UT" in answer.headers["x-kizuna-flags"].split(",")
    assert answer.elapsed < 0.9  # two tries of 0.2 s and a backoff, far below the app's 1 s or the 3 s route
    assert mesh.client.stats.retries == before + 1


def test_downstream_reset_counts_dc_and_frees_the_slot(mesh: Mesh) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    before = mesh.client.stats.flags.get("DC", 0)
    with socket.create_connection((mesh.address, 15001), timeout=5) as sock:
        conn.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "pooled"), (":path", "/")],
                          end_stream=True)
        sock.sendall(conn.data_to_send())
        time.sleep(0.2)
        conn.reset_stream(1)
        sock.sendall(conn.data_to_send())
        time.sleep(0.2)
    assert mesh.client.stats.flags.get("DC", 0) == before + 1
    # The circuit breaker's slot went back: three concurrent requests are all admitted again.
    with ThreadPoolExecutor(3) as pool:
        statuses = list(pool.map(lambda _: mesh.get("pooled", "/").status, range(3)))
    assert statuses == [200, 200, 200]
