"""DestinationRule resilience end to end: Istio's circuit-breaking rule, outlier detection, consistent hashing
and LEAST_REQUEST, on a mesh of in-process sidecars with real sockets on 127.70.0.0/16.

Snapshots are compiled by the control plane's own ``compile_snapshot`` from Istio's sample YAML, so the path
DestinationRule → cluster policy → proxy behaviour is the one a user runs.
"""

from __future__ import annotations

import http.client
import textwrap
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from kizuna.api import Resource, parse_all, parse_text
from kizuna.controlplane.compile import compile_snapshot
from kizuna.controlplane.instances import Instance
from kizuna.proxy.explain import explain
from kizuna.proxy.sidecar import Sidecar
from kizuna.proxyconfig.bootstrap import Node
from kizuna.testing.mesh import LocalMesh, loopback_addresses
from kizuna.testing.upstream import UpstreamServer

pytestmark = pytest.mark.integration

SAMPLES = Path("/work/shared/istio-samples")
HTTPBIN = (SAMPLES / "samples/httpbin/httpbin.yaml").read_text()
CLUSTER = "outbound|8000||httpbin.default.svc.cluster.local"


@dataclass
class Mesh:
    client: Sidecar
    address: str
    apps: list[UpstreamServer]
    client_node: Node
    instances: list[Instance]

    def push(self, local: LocalMesh, resources: list[Resource], version: str) -> None:
        """Compile the client's snapshot anew from ``resources`` and apply it, as a config push does."""
        local.apply(self.client, compile_snapshot(resources, self.instances, self.client_node, version))


def load(*texts: str) -> list[Resource]:
    return parse_all(parse_text("---\n".join(textwrap.dedent(t) for t in texts), "test.yaml"))


def start(mesh: LocalMesh, resources: list[Resource], apps: int, **app_options: object) -> Mesh:
    """``apps`` httpbin instances (a programmable app on pod:8080 behind its own sidecar) and a client
    sidecar, each with the snapshot the control plane compiles for it."""
    addresses = loopback_addresses(1 + 2 * apps, prefix="127.70")
    client_node = Node("sleep-0.default", "sleep", labels=(("app", "sleep"),), pod_address=addresses[0],
                       mesh_address=addresses[0])
    nodes = [Node(f"httpbin-{i}.default", "httpbin", labels=(("app", "httpbin"), ("version", "v1")),
                  pod_address=addresses[1 + 2 * i], mesh_address=addresses[2 + 2 * i], ports=(8080,))
             for i in range(apps)]
    instances = [Instance(client_node, True)] + [Instance(n, True) for n in nodes]
    servers = [mesh.upstream(n.pod_address, 8080, name=f"httpbin-{i}", **app_options)
               for i, n in enumerate(nodes)]
    for n in nodes:
        mesh.sidecar(n.mesh_address, compile_snapshot(resources, instances, n, "1"), pod_address=n.pod_address)
    client = mesh.sidecar(client_node.mesh_address, compile_snapshot(resources, instances, client_node, "1"))
    return Mesh(client, client_node.mesh_address, servers, client_node, instances)


def get(conn: http.client.HTTPConnection, path: str = "/get",
        headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    conn.request("GET", f"http://httpbin:8000{path}", headers=headers or {})
    response = conn.getresponse()
    response.read()
    return response


def dr(policy: str) -> str:
    return f"""\
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {{name: httpbin}}
    spec:
      host: httpbin
      trafficPolicy: {policy}
    """


NO_RETRIES = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin}
spec:
  hosts: [httpbin]
  http: [{route: [{destination: {host: httpbin}}], retries: {attempts: 0}}]
"""


def test_istio_circuit_breaking_task(mesh: LocalMesh) -> None:
    """Istio's task: maxConnections 1, http1MaxPendingRequests 1; three concurrent clients, some get 503 UO."""
    rule = (SAMPLES / "tasks/circuit-breaking/01-destinationrule-httpbin.yaml").read_text()
    m = start(mesh, load(HTTPBIN, rule), apps=1, delay=0.05)
    results: list[tuple[int, str | None, str | None]] = []
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection(m.address, 15001, timeout=10)
        try:
            for _ in range(10):
                r = get(conn)
                with lock:
                    results.append((r.status, r.getheader("x-kizuna-error"), r.getheader("x-kizuna-flags")))
                if r.getheader("connection") == "close":
                    conn.close()
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    counts = Counter(results)
    ok, overflow = counts[(200, None, None)], counts[(503, "upstream overflow", "UO")]
    assert ok + overflow == 30, counts
    assert ok >= 5 and overflow >= 3, counts  # Istio documents e.g. 11 × 200 and 19 × 503 for -c 3
    stats = m.client.stats.to_json()
    assert stats["flags"]["UO"] == overflow
    assert stats["resilience"][CLUSTER]["circuit_breaker"]["overflows"] == overflow
    # maxRequestsPerConnection 1: every forwarded request opened its own upstream connection.
    assert m.client.stats.upstream_cx_total == ok


def test_outlier_detection_ejects_a_failing_endpoint(mesh: LocalMesh) -> None:
    rule = dr("{outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 1s,"
              " maxEjectionPercent: 100}}")
    m = start(mesh, load(HTTPBIN, rule, NO_RETRIES), apps=3)
    bad = m.apps[0]
    bad.status = 503
    bad_endpoint = f"{m.instances[1].node.mesh_address}:8080"
    conn = http.client.HTTPConnection(m.address, 15001, timeout=10)
    try:
        # The first ejection lasts baseEjectionTime (1 s): right after it, /stats and explain name the endpoint.
        for _ in range(100):
            get(conn)
            if m.client.stats.to_json()["resilience"][CLUSTER]["outlier_detection"]["ejections_total"]:
                break
        ejected = m.client.stats.to_json()["resilience"][CLUSTER]["outlier_detection"]["ejected"]
        assert ejected == [bad_endpoint]
        why = explain(m.client.state.snapshot, "httpbin", 8000, "GET", "/get", {"host": "httpbin:8000"},
                      {CLUSTER: frozenset(ejected)}).to_json()
        health = {f"{e['address']}:{e['port']}": e["health"] for e in why["destinations"][0]["endpoints"]}
        assert sorted(health.values()) == ["ejected", "healthy", "healthy"] and health[bad_endpoint] == "ejected"
        statuses = Counter(get(conn).status for _ in range(2000))
        assert statuses[200] >= 0.99 * 2000, statuses
        stats = m.client.stats.to_json()["resilience"][CLUSTER]["outlier_detection"]
        assert stats["ejections_total"] >= 1
        # Healthy again: it comes back once its ejection time (at most a few × 1 s here) is over.
        bad.status = None
        before = len(bad.requests)
        deadline = time.monotonic() + 8
        while len(bad.requests) == before and time.monotonic() < deadline:
            assert get(conn).status == 200
            time.sleep(0.01)
        assert len(bad.requests) > before
    finally:
        conn.close()


def test_without_outlier_detection_failures_show(mesh: LocalMesh) -> None:
    m = start(mesh, load(HTTPBIN, NO_RETRIES), apps=3)
    m.apps[0].status = 503
    conn = http.client.HTTPConnection(m.address, 15001, timeout=10)
    try:
        statuses = Counter(get(conn).status for _ in range(150))
    finally:
        conn.close()
    assert statuses[503] >= 20  # the baseline the test above improves on


def test_consistent_hash_on_a_header_keeps_a_user_on_one_endpoint(mesh: LocalMesh) -> None:
    m = start(mesh, load(HTTPBIN, dr("{loadBalancer: {consistentHash: {httpHeaderName: x-user}}}")), apps=3)
    conn = http.client.HTTPConnection(m.address, 15001, timeout=10)
    try:
        sticky = {get(conn, headers={"x-user": "jason"}).getheader("x-upstream") for _ in range(200)}
        spread = {get(conn, headers={"x-user": f"user-{i}"}).getheader("x-upstream") for i in range(30)}
    finally:
        conn.close()
    assert len(sticky) == 1
    assert len(spread) >= 2  # other users land elsewhere


@pytest.mark.parametrize("table", ["", ", maglev: {tableSize: 1021}"])
def test_consistent_hash_cookie_is_set_when_absent(mesh: LocalMesh, table: str) -> None:
    policy = f"{{loadBalancer: {{consistentHash: {{httpCookie: {{name: user, path: /, ttl: 60s}}{table}}}}}}}"
    m = start(mesh, load(HTTPBIN, dr(policy)), apps=3)
    conn = http.client.HTTPConnection(m.address, 15001, timeout=10)
    try:
        first = get(conn)
        cookie = first.getheader("set-cookie")
        assert cookie is not None and cookie.startswith("user=") and "Max-Age=60" in cookie and "Path=/" in cookie
        value = cookie.split(";", 1)[0]
        upstreams = {get(conn, headers={"cookie": value}).getheader("x-upstream") for _ in range(50)}
        again = get(conn, headers={"cookie": value})
    finally:
        conn.close()
    assert upstreams == {first.getheader("x-upstream")}
    assert again.getheader("set-cookie") is None  # present: not set again


def test_least_request_prefers_the_fast_endpoint(mesh: LocalMesh) -> None:
    m = start(mesh, load(HTTPBIN), apps=2)  # Istio's default balancer: LEAST_REQUEST
    m.apps[0].delay = 0.15
    counts: Counter[str | None] = Counter()
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection(m.address, 15001, timeout=10)
        try:
            for _ in range(25):
                upstream = get(conn).getheader("x-upstream")
                with lock:
                    counts[upstream] += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(counts.values()) == 100
    assert counts["httpbin-1"] >= 75, counts  # the fast one


def test_pool_idle_timeout_and_max_requests_per_connection(mesh: LocalMesh) -> None:
    rule = dr("{connectionPool: {http: {idleTimeout: 0.2s}}}")
    m = start(mesh, load(HTTPBIN, rule), apps=1)
    conn = http.client.HTTPConnection(m.address, 15001, timeout=10)
    try:
        for _ in range(3):
            assert get(conn).status == 200
        assert m.client.stats.upstream_cx_total == 1  # kept alive and reused
        time.sleep(0.35)
        assert get(conn).status == 200
        assert m.client.stats.upstream_cx_total == 2  # the idle one expired
        m.push(mesh, load(HTTPBIN, dr("{connectionPool: {http: {maxRequestsPerConnection: 2}}}")), "2")
        for _ in range(4):
            assert get(conn).status == 200
        # The warm connection had carried one request: one more and it closes; then two per connection.
        assert m.client.stats.upstream_cx_total == 4
    finally:
        conn.close()

