"""VirtualService route actions end to end: real sidecars on loopback running snapshots compiled from YAML
(Istio's own task files where they exist), real apps behind them, requests from a client through its sidecar.

Topology per test: every workload is a pod with a pod address (its app) and a mesh address (its sidecar),
in 127.60.0.0/16; the client ("sleep") sends absolute-form requests to its sidecar's outbound port.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import struct
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kizuna.api import Resource, load_documents, parse_all, parse_text
from kizuna.controlplane.compile import compile_snapshot
from kizuna.controlplane.instances import Instance
from kizuna.proxy.sidecar import Sidecar
from kizuna.proxyconfig.bootstrap import Node
from kizuna.testing.mesh import LocalMesh, loopback_addresses
from kizuna.testing.samples import ISTIO_SAMPLES

pytestmark = pytest.mark.integration

BOOKINFO = ISTIO_SAMPLES / "samples/bookinfo"
corpus = pytest.mark.skipif(not ISTIO_SAMPLES.is_dir(), reason="Istio sample corpus not present")


@dataclass
class Pod:
    node: Node
    sidecar: Sidecar
    app: Any


@dataclass
class Mesh:
    """Compiled snapshots for every pod, served by in-process sidecars; ``client`` sends through ``sleep``."""

    local: LocalMesh
    pods: dict[str, Pod] = field(default_factory=dict)
    clients: list[http.client.HTTPConnection] = field(default_factory=list)

    def client(self, name: str = "sleep") -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(self.pods[name].node.mesh_address, 15001, timeout=10)
        self.clients.append(conn)
        return conn

    def get(self, url: str, method: str = "GET", body: bytes | None = None, source: str = "sleep",
            **headers: str) -> tuple[int, dict[str, str], bytes]:
        conn = self.client(source)
        conn.request(method, url, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data

    def stats(self, name: str = "sleep") -> dict[str, Any]:
        conn = http.client.HTTPConnection(self.pods[name].node.mesh_address, 15000, timeout=5)
        try:
            conn.request("GET", "/stats")
            return dict(json.loads(conn.getresponse().read()))
        finally:
            conn.close()


AppFactory = Callable[[Node], Any]


@pytest.fixture
def build(mesh: LocalMesh) -> Iterator[Callable[..., Mesh]]:
    made: list[Mesh] = []

    def make(yaml: str = "", files: tuple[Path, ...] = (),
             pods: dict[str, tuple[dict[str, str], int, AppFactory | None]] | None = None) -> Mesh:
        """``pods``: name → (labels, container port or 0, app factory; None = an UpstreamServer named after
        the pod). A ``sleep`` client pod without an app is always added."""
        resources: list[Resource] = parse_all(load_documents(list(files))) if files else []
        if yaml:
            resources += parse_all(parse_text(textwrap.dedent(yaml), "test.yaml"))
        nodes: dict[str, Node] = {}
        for name, (labels, port, _) in {**(pods or {}), "sleep": ({"app": "sleep"}, 0, None)}.items():
            pod, side = loopback_addresses(2, prefix="127.60")
            nodes[name] = Node(f"{name}-0.default", name.rsplit("-", 1)[0] if "-v" in name else name,
                               labels=tuple(sorted(labels.items())), pod_address=pod, mesh_address=side,
                               ports=(port,) if port else ())
        instances = [Instance(n, True) for n in nodes.values()]
        result = Mesh(mesh)
        for name, node in nodes.items():
            labels, port, factory = (pods or {}).get(name, ({}, 0, None))
            app: Any = None
            if port:
                app = factory(node) if factory else mesh.upstream(node.pod_address, port, name=name)
            snapshot = compile_snapshot(resources, instances, node, "1")
            sidecar = mesh.sidecar(node.mesh_address, snapshot, pod_address=node.pod_address)
            result.pods[name] = Pod(node, sidecar, app)
        made.append(result)
        return result

    try:
        yield make
    finally:
        for m in made:
            for conn in m.clients:
                conn.close()


HTTPBIN = """\
apiVersion: v1
kind: Service
metadata: {name: httpbin}
spec:
  selector: {app: httpbin}
  ports: [{name: http, port: 8000, targetPort: 80}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin}
spec:
  host: httpbin
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
"""

HTTPBIN_PODS: dict[str, tuple[dict[str, str], int, AppFactory | None]] = {
    "httpbin-v1": ({"app": "httpbin", "version": "v1"}, 80, None),
    "httpbin-v2": ({"app": "httpbin", "version": "v2"}, 80, None),
}


def httpbin_routes(http: str) -> str:
    return HTTPBIN + textwrap.dedent("""\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: httpbin}
    spec:
      hosts: [httpbin]
      http:
    """) + textwrap.indent(textwrap.dedent(http), "  ")


def echo(body: bytes) -> dict[str, Any]:
    return dict(json.loads(body))


# -- redirect, direct response, rewrite, headers ------------------------------------------------------------

def test_redirect_and_direct_response_are_answered_by_the_client_sidecar(build: Callable[..., Mesh]) -> None:
    m = build(httpbin_routes("""\
    - match: [{uri: {prefix: /old}}]
      redirect: {uri: /new}
    - match: [{uri: {prefix: /away}}]
      redirect: {authority: example.org, scheme: https, redirectCode: 308}
    - match: [{uri: {exact: /teapot}}]
      directResponse: {status: 418, body: {string: "short and stout"}}
      headers: {response: {set: {x-route: teapot}}}
    - route: [{destination: {host: httpbin, subset: v1}}]
    """), pods=HTTPBIN_PODS)
    status, headers, body = m.get("http://httpbin:8000/old/page?x=1")
    assert (status, headers["location"], body) == (301, "http://httpbin:8000/new?x=1", b"")
    status, headers, _ = m.get("http://httpbin:8000/away/p")
    assert (status, headers["location"]) == (308, "https://example.org/away/p")
    status, headers, body = m.get("http://httpbin:8000/teapot")
    assert (status, body, headers["x-route"]) == (418, b"short and stout", "teapot")
    assert "x-kizuna-error" not in headers  # a route's own answer is not a mesh failure
    # None of these reached an app; the catch-all route does.
    assert m.pods["httpbin-v1"].app.requests == [] and m.get("http://httpbin:8000/get")[0] == 200


def test_rewrite_prefix_regex_and_authority_as_the_app_sees_them(build: Callable[..., Mesh]) -> None:
    m = build(httpbin_routes("""\
    - match: [{uri: {prefix: /api/}}]
      rewrite: {uri: /anything/, authority: backend.local}
      route: [{destination: {host: httpbin, subset: v1}}]
    - match: [{uri: {regex: "/r/.*"}}]
      rewrite: {uriRegexRewrite: {match: "^/r/([^/]+)/(.*)$", rewrite: "/anything/\\\\2/\\\\1"}}
      route: [{destination: {host: httpbin, subset: v1}}]
    - match: [{uri: {exact: /exact}}]
      rewrite: {uri: /anything/exact}
      route: [{destination: {host: httpbin, subset: v1}}]
    """), pods=HTTPBIN_PODS)
    seen = echo(m.get("http://httpbin:8000/api/users?id=7")[2])
    assert seen["path"] == "/anything/users?id=7" and seen["headers"]["host"] == "backend.local"
    seen = echo(m.get("http://httpbin:8000/r/first/second/third")[2])
    assert seen["path"] == "/anything/second/third/first" and seen["headers"]["host"] == "httpbin:8000"
    assert echo(m.get("http://httpbin:8000/exact?q")[2])["path"] == "/anything/exact?q"


def test_header_operations_on_request_and_response(build: Callable[..., Mesh]) -> None:
    m = build(httpbin_routes("""\
    - headers:
        request: {set: {x-set: forced, host: httpbin.internal}, add: {x-added: extra}, remove: [x-secret]}
        response: {set: {x-served-by: mesh}, add: {x-also: "yes"}, remove: [x-upstream]}
      route:
      - destination: {host: httpbin, subset: v1}
        weight: 50
        headers: {request: {set: {x-version: v1}}, response: {set: {x-dest: v1}}}
      - destination: {host: httpbin, subset: v2}
        weight: 50
        headers: {request: {set: {x-version: v2}}}
    """), pods=HTTPBIN_PODS)
    versions = set()
    for _ in range(16):
        status, headers, body = m.get("http://httpbin:8000/anything", **{"X-Set": "mine", "X-Secret": "s",
                                                                         "X-Added": "own"})
        seen = echo(body)
        app_headers = seen["headers"]
        assert status == 200 and app_headers["x-set"] == "forced" and "x-secret" not in app_headers
        # The echo app keeps the last of repeated headers; add appended after the client's own.
        assert app_headers["x-added"] == "extra"
        assert app_headers["host"] == "httpbin.internal"  # one Host, the one set
        assert app_headers["x-version"] == seen["upstream"].split("-")[1]
        versions.add(app_headers["x-version"])
        assert headers["x-served-by"] == "mesh" and headers["x-also"] == "yes" and "x-upstream" not in headers
        assert headers.get("x-dest") == ("v1" if seen["upstream"] == "httpbin-v1" else None)
    assert versions == {"v1", "v2"}
    recorded = m.pods["httpbin-v1"].app.requests + m.pods["httpbin-v2"].app.requests
    assert [[v for k, v in r.headers if k.lower() == "host"] for r in recorded] == [["httpbin.internal"]] * 16


# -- fault injection ----------------------------------------------------------------------------------------

def test_fault_abort_percentage_and_flags_in_stats(build: Callable[..., Mesh]) -> None:
    m = build(httpbin_routes("""\
    - fault: {abort: {httpStatus: 503, percentage: {value: 50}}}
      route: [{destination: {host: httpbin, subset: v1}}]
    """), pods=HTTPBIN_PODS)
    conn = m.client()
    aborted = 0
    for _ in range(200):
        conn.request("GET", "http://httpbin:8000/get")
        response = conn.getresponse()
        response.read()
        if response.status == 503:
            assert response.getheader("x-kizuna-flags") == "FI"
            assert response.getheader("x-kizuna-error") == "fault filter abort"
            aborted += 1
        else:
            assert response.status == 200 and response.getheader("x-kizuna-flags") is None
    assert 70 <= aborted <= 130
    assert len(m.pods["httpbin-v1"].app.requests) == 200 - aborted  # aborted requests never left the client
    stats = m.stats()
    assert stats["flags"]["FI"] == aborted and stats["errors"]["fault filter abort"] == aborted


@corpus
def test_bookinfo_ratings_test_abort_for_jason_only(build: Callable[..., Mesh]) -> None:
    net = BOOKINFO / "networking"
    m = build(files=(BOOKINFO / "platform/kube/bookinfo.yaml", net / "destination-rule-all.yaml",
                     net / "virtual-service-ratings-test-abort.yaml"),
              pods={"ratings-v1": ({"app": "ratings", "version": "v1"}, 9080, None)})
    for _ in range(5):
        status, headers, _ = m.get("http://ratings:9080/ratings/0", **{"end-user": "jason"})
        assert (status, headers["x-kizuna-flags"]) == (500, "FI")
        status, headers, _ = m.get("http://ratings:9080/ratings/0", **{"end-user": "alice"})
        assert status == 200 and headers["x-upstream"] == "ratings-v1"
        assert m.get("http://ratings:9080/ratings/0")[0] == 200
    assert len(m.pods["ratings-v1"].app.requests) == 10


def test_fault_delay_percentage_marks_delayed_responses(build: Callable[..., Mesh]) -> None:
    m = build(httpbin_routes("""\
    - fault: {delay: {fixedDelay: 0.05s, percentage: {value: 50}}}
      route: [{destination: {host: httpbin, subset: v1}}]
    """), pods=HTTPBIN_PODS)
    conn = m.client()
    delayed = 0
    for _ in range(100):
        start = time.monotonic()
        conn.request("GET", "http://httpbin:8000/get")
        response = conn.getresponse()
        response.read()
        elapsed = time.monotonic() - start
        assert response.status == 200
        if response.getheader("x-kizuna-flags") == "DI":
            assert elapsed >= 0.045  # the loop's timers have millisecond granularity
            delayed += 1
    assert 30 <= delayed <= 70
    assert m.stats()["flags"]["DI"] == delayed


class Reviews:
    """reviews v2 in miniature: every request calls ratings through its own sidecar and reports the result."""

    def __init__(self, node: Node, port: int, local: LocalMesh) -> None:
        self.node = node
        self.local = local
        self.server: asyncio.Server | None = None
        local.loop.run(self._start(port))

    async def _start(self, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, self.node.pod_address, port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            up_reader, up_writer = await asyncio.open_connection(self.node.mesh_address, 15001)
            up_writer.write(b"GET http://ratings:9080/ratings/0 HTTP/1.1\r\nHost: ratings:9080\r\n"
                            b"Connection: close\r\n\r\n")
            answer = await up_reader.read()
            up_writer.close()
            status = answer.split(b" ", 2)[1]
            body = b"ratings said " + status
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%b"
                         % (len(body), body))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def stop(self) -> None:
        async def stop() -> None:
            if self.server is not None:
                self.server.close()

        self.local.loop.run(stop())


@corpus
def test_request_timeouts_task(build: Callable[..., Mesh], mesh: LocalMesh) -> None:
    """Istio's request-timeouts task, files unchanged: a 2 s delay on ratings, seen from reviews v2, and a
    0.5 s timeout on reviews, seen from productpage: productpage gets 504 from its own sidecar after 0.5 s."""
    task = ISTIO_SAMPLES / "tasks/request-timeouts"
    apps: list[Reviews] = []

    def reviews(node: Node) -> Reviews:
        apps.append(Reviews(node, 9080, mesh))
        return apps[-1]

    pods: dict[str, tuple[dict[str, str], int, AppFactory | None]] = {
        "reviews-v2": ({"app": "reviews", "version": "v2"}, 9080, reviews),
        "ratings-v1": ({"app": "ratings", "version": "v1"}, 9080, None)}
    base = (BOOKINFO / "platform/kube/bookinfo.yaml", BOOKINFO / "networking/destination-rule-all.yaml")
    try:
        # Steps 1 and 2: the page still works, about 2 s late.
        m = build(files=(*base, task / "01-virtualservice-reviews-v2.yaml",
                         task / "02-virtualservice-ratings-delay-2s.yaml"), pods=pods)
        start = time.monotonic()
        status, _, body = m.get("http://reviews:9080/reviews/0")
        assert (status, body) == (200, b"ratings said 200") and 1.9 <= time.monotonic() - start < 4
        # Step 3: reviews' 0.5 s timeout (the same delay in place).
        m = build(files=(*base, task / "03-virtualservice-reviews-v2-timeout.yaml",
                         task / "02-virtualservice-ratings-delay-2s.yaml"), pods=pods)
        start = time.monotonic()
        status, headers, _ = m.get("http://reviews:9080/reviews/0")
        elapsed = time.monotonic() - start
        assert (status, headers["x-kizuna-flags"]) == (504, "UT") and 0.45 <= elapsed < 1.5
        assert m.stats()["flags"]["UT"] == 1
        assert m.stats("reviews-v2")["flags"]["DI"] == 1  # the delay was injected by reviews' sidecar
    finally:
        for app in apps:
            app.stop()


# -- mirroring ----------------------------------------------------------------------------------------------

MIRROR_TASK = ISTIO_SAMPLES / "tasks/mirroring"


def mirror_mesh(build: Callable[..., Mesh], v2: AppFactory | None = None) -> Mesh:
    pods = dict(HTTPBIN_PODS)
    if v2 is not None:
        pods["httpbin-v2"] = ({"app": "httpbin", "version": "v2"}, 80, v2)
    # Step 05's DestinationRule with step 07's VirtualService (07 replaces 05's VirtualService), unchanged.
    step5 = (MIRROR_TASK / "05-virtualservice-destinationrule-httpbin-all-v1.yaml").read_text()
    (rule,) = [part for part in step5.split("---") if "kind: DestinationRule" in part]
    return build(rule, files=(MIRROR_TASK / "03-service-httpbin.yaml",
                              MIRROR_TASK / "07-virtualservice-httpbin-mirror-v2.yaml"), pods=pods)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@corpus
def test_mirroring_task_v2_gets_shadow_copies_client_sees_v1(build: Callable[..., Mesh]) -> None:
    m = mirror_mesh(build)
    v1, v2 = m.pods["httpbin-v1"].app, m.pods["httpbin-v2"].app
    for i in range(20):
        status, headers, body = m.get(f"http://httpbin:8000/anything/{i}")
        assert status == 200 and headers["x-upstream"] == "httpbin-v1" and echo(body)["upstream"] == "httpbin-v1"
    status, _, body = m.get("http://httpbin:8000/anything/post", method="POST", body=b"payload")
    assert status == 200 and echo(body)["body"] == "payload"
    assert wait_for(lambda: len(v2.requests) == 21)
    assert len(v1.requests) == 21
    assert {r.header("host") for r in v2.requests} == {"httpbin-shadow:8000"}
    assert {r.header("host") for r in v1.requests} == {"httpbin:8000"}
    assert sorted(r.target for r in v2.requests) == sorted(r.target for r in v1.requests)
    post = next(r for r in v2.requests if r.method == "POST")
    assert post.body == b"payload"
    # Copies carry the same request id as the primary (one trace).
    assert {r.header("x-request-id") for r in v2.requests} == {r.header("x-request-id") for r in v1.requests}
    assert wait_for(lambda: m.stats()["mirror"]["rq_total"] == 21)


@corpus
def test_slow_or_failing_mirror_never_slows_or_fails_the_primary(build: Callable[..., Mesh],
                                                                 mesh: LocalMesh) -> None:
    slow = mirror_mesh(build, v2=lambda node: mesh.upstream(node.pod_address, 80, name="slow", delay=1.0))
    for _ in range(10):
        start = time.monotonic()
        status, headers, _ = slow.get("http://httpbin:8000/get")
        assert status == 200 and headers["x-upstream"] == "httpbin-v1" and time.monotonic() - start < 0.5
    # A mirror that refuses connections (its sidecar gone) is not noticed by the client either.
    failing = mirror_mesh(build)
    mesh.loop.run(failing.pods["httpbin-v2"].sidecar.stop(drain=0))
    for _ in range(10):
        status, headers, _ = failing.get("http://httpbin:8000/get")
        assert status == 200 and headers["x-upstream"] == "httpbin-v1"
    assert wait_for(lambda: failing.stats()["mirror"]["rq_failed"] == 10)


# -- response flags -----------------------------------------------------------------------------------------

def test_response_flags_of_proxy_made_failures(build: Callable[..., Mesh], mesh: LocalMesh) -> None:
    m = build(httpbin_routes("""\
    - match: [{uri: {prefix: /delay}}]
      timeout: 0.2s
      route: [{destination: {host: httpbin, subset: v1}}]
    - match: [{uri: {prefix: /gone}}]
      route: [{destination: {host: httpbin, subset: v2}}]
    - match: [{uri: {prefix: /ok}}, {uri: {prefix: /status}}]
      route: [{destination: {host: httpbin, subset: v1}}]
    """), pods=HTTPBIN_PODS)
    status, headers, _ = m.get("http://nowhere:8000/")
    assert (status, headers["x-kizuna-error"], headers["x-kizuna-flags"]) == (404, "no route", "NR")
    status, headers, _ = m.get("http://httpbin:8000/elsewhere")
    assert (status, headers["x-kizuna-flags"]) == (404, "NR")
    status, headers, _ = m.get("http://httpbin:8000/delay/1")
    assert (status, headers["x-kizuna-error"], headers["x-kizuna-flags"]) == (504, "upstream timeout", "UT")
    # v2's sidecar goes away: connect failures, retried twice (Istio's default), then UF with URX.
    mesh.loop.run(m.pods["httpbin-v2"].sidecar.stop(drain=0))
    status, headers, _ = m.get("http://httpbin:8000/gone")
    assert (status, headers["x-kizuna-error"], headers["x-kizuna-flags"]) == (
        503, "upstream connect error", "UF,URX")
    assert m.get("http://httpbin:8000/ok")[0] == 200
    # The app answers 503 to every try (Istio retries 503 twice by default): its answer, flagged URX.
    v1 = m.pods["httpbin-v1"].app
    before = len(v1.requests)
    status, headers, _ = m.get("http://httpbin:8000/status/503")
    assert (status, headers["x-kizuna-flags"], len(v1.requests) - before) == (503, "URX", 3)
    assert "x-kizuna-error" not in headers  # the app's response, not one the mesh made up
    flags = m.stats()["flags"]
    assert flags == {"NR": 2, "UT": 1, "UF": 1, "URX": 2}


def test_delay_then_abort_grpc_abort_and_client_leaving_during_a_delay(build: Callable[..., Mesh]) -> None:
    m = build(httpbin_routes("""\
    - match: [{uri: {prefix: /both}}]
      fault:
        delay: {fixedDelay: 0.1s, percentage: {value: 100}}
        abort: {httpStatus: 429, percentage: {value: 100}}
      route: [{destination: {host: httpbin, subset: v1}}]
    - match: [{uri: {prefix: /grpc}}]
      fault: {abort: {grpcStatus: UNAVAILABLE}}
      route: [{destination: {host: httpbin, subset: v1}}]
    - fault: {delay: {fixedDelay: 0.5s}}
      route: [{destination: {host: httpbin, subset: v1}}]
    """), pods=HTTPBIN_PODS)
    start = time.monotonic()
    status, headers, _ = m.get("http://httpbin:8000/both")
    assert (status, headers["x-kizuna-flags"]) == (429, "DI,FI") and time.monotonic() - start >= 0.09
    status, headers, body = m.get("http://httpbin:8000/grpc")
    assert (status, headers["grpc-status"], headers["content-type"], body) == (200, "14", "application/grpc", b"")
    # A client that gives up (resets) during a delay: nothing reaches the app, the sidecar counts DC.
    with socket.create_connection((m.pods["sleep"].node.mesh_address, 15001), timeout=5) as sock:
        sock.sendall(b"GET http://httpbin:8000/get HTTP/1.1\r\nHost: httpbin:8000\r\n\r\n")
        time.sleep(0.1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert wait_for(lambda: m.stats()["flags"].get("DC") == 1)
    time.sleep(0.5)
    assert m.pods["httpbin-v1"].app.requests == []
    assert m.stats()["flags"] == {"DI": 2, "FI": 2, "DC": 1}


def test_mirror_percentage(build: Callable[..., Mesh]) -> None:
    m = build(httpbin_routes("""\
    - route: [{destination: {host: httpbin, subset: v1}}]
      mirrors:
      - destination: {host: httpbin, subset: v2}
        percentage: {value: 50}
    """), pods=HTTPBIN_PODS)
    conn = m.client()
    for _ in range(100):
        conn.request("GET", "http://httpbin:8000/get")
        assert conn.getresponse().read()
    v2 = m.pods["httpbin-v2"].app
    assert wait_for(lambda: m.stats()["mirror"]["rq_active"] == 0)
    assert 30 <= len(v2.requests) <= 70 and m.stats()["mirror"]["rq_total"] == len(v2.requests)
