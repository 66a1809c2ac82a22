"""Istio's standard metrics and access logs from real sidecars: a ``sleep`` client sidecar calls httpbin (v1)
through its server sidecar; both reporters count the calls with the right labels, as Prometheus scrapes them
from ``/stats/prometheus`` on the admin port and on the Prometheus port. Faults show in ``response_code`` and
``response_flags``; a TCP service shows in the TCP metrics; each sidecar writes JSON access log lines."""

from __future__ import annotations

import http.client
import json
import socket
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kizuna.api import parse_all, parse_text
from kizuna.controlplane.compile import compile_snapshot
from kizuna.controlplane.instances import Instance
from kizuna.proxy.sidecar import Sidecar
from kizuna.proxyconfig.bootstrap import Node
from kizuna.testing.mesh import LocalMesh, loopback_addresses, sidecar_bootstrap

pytestmark = pytest.mark.integration

YAML = """\
apiVersion: v1
kind: Service
metadata: {name: httpbin}
spec:
  selector: {app: httpbin}
  ports: [{name: http, port: 8000, targetPort: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: echo}
spec:
  selector: {app: httpbin}
  ports: [{name: tcp, port: 9000, targetPort: 9000}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin}
spec:
  hosts: [httpbin]
  http:
  - match: [{uri: {prefix: /fault}}]
    fault: {abort: {httpStatus: 500, percentage: {value: 100}}}
    route: [{destination: {host: httpbin}}]
  - match: [{uri: {prefix: /delay}}]
    timeout: 0.2s
    route: [{destination: {host: httpbin}}]
  - route: [{destination: {host: httpbin}}]
"""


@dataclass
class Pair:
    client: Sidecar
    server: Sidecar
    client_node: Node
    server_node: Node

    def get(self, url: str, **headers: str) -> tuple[int, dict[str, str]]:
        conn = http.client.HTTPConnection(self.client_node.mesh_address, 15001, timeout=10)
        try:
            conn.request("GET", url, headers=headers)
            response = conn.getresponse()
            response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}
        finally:
            conn.close()


def scrape(address: str, port: int) -> tuple[str, dict[str, str]]:
    conn = http.client.HTTPConnection(address, port, timeout=5)
    try:
        conn.request("GET", "/stats/prometheus")
        response = conn.getresponse()
        assert response.status == 200
        return response.read().decode(), {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


@pytest.fixture
def pair(mesh: LocalMesh, tmp_path: Path) -> Iterator[Pair]:
    pod_c, side_c, pod_s, side_s = loopback_addresses(4, prefix="127.87")
    client_node = Node("sleep-0.default", "sleep", labels=(("app", "sleep"), ("version", "v1")),
                       pod_address=pod_c, mesh_address=side_c)
    server_node = Node("httpbin-v1-0.default", "httpbin-v1", labels=(("app", "httpbin"), ("version", "v1")),
                       pod_address=pod_s, mesh_address=side_s, ports=(80, 9000))
    mesh.upstream(pod_s, 80, name="httpbin")
    mesh.echo(pod_s, 9000)
    resources = parse_all(parse_text(textwrap.dedent(YAML), "test.yaml"))
    instances = [Instance(client_node, True), Instance(server_node, True)]
    sidecars = []
    for node in (client_node, server_node):
        boot = replace(sidecar_bootstrap(node.id, node.mesh_address, pod_address=node.pod_address), node=node,
                       access_log=str(tmp_path / f"{node.id}.access.log"))
        sidecar = Sidecar(boot)
        mesh.loop.run(sidecar.start())
        mesh.sidecars.append(sidecar)
        mesh.apply(sidecar, compile_snapshot(resources, instances, node, "1"))
        sidecars.append(sidecar)
    yield Pair(sidecars[0], sidecars[1], client_node, server_node)


def parse_exposition(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, dict(s.labels), s.value) for family in text_string_to_metric_families(text)
            for s in family.samples]


def series(text: str, name: str, **labels: str) -> float:
    """The sum of ``name`` over the series whose labels include ``labels``."""
    return sum(value for metric, found, value in parse_exposition(text)
               if metric == name and all(found.get(k) == v for k, v in labels.items()))


def test_both_reporters_count_requests_with_istio_labels(pair: Pair) -> None:
    for _ in range(2):
        assert pair.get("http://httpbin:8000/get")[0] == 200
    # An app cannot pass itself off as another workload: only sidecars say who calls.
    spoof = {"x-kizuna-peer": "evil;default;evil;v1;httpbin.default.svc.cluster.local"}
    assert pair.get("http://httpbin:8000/get", **spoof)[0] == 200
    assert pair.get("http://httpbin:8000/status/418")[0] == 418
    assert pair.get("http://httpbin:8000/fault")[0] == 500  # aborted by the client sidecar (FI)
    client_text, headers = scrape(pair.client_node.mesh_address, 15000)
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    server_text, _ = scrape(pair.server_node.mesh_address, 15090)  # Istio's Prometheus port
    fqdn = "httpbin.default.svc.cluster.local"
    common = dict(source_workload="sleep", source_app="sleep", source_version="v1",
                  source_workload_namespace="default", destination_workload="httpbin-v1",
                  destination_app="httpbin", destination_version="v1", destination_service=fqdn,
                  destination_service_name="httpbin", destination_service_namespace="default",
                  request_protocol="http")
    assert series(client_text, "istio_requests_total", reporter="source", response_code="200",
                  response_flags="-", connection_security_policy="unknown", **common) == 3
    assert series(server_text, "istio_requests_total", reporter="destination", response_code="200",
                  response_flags="-", connection_security_policy="none", **common) == 3
    for text, reporter in ((client_text, "source"), (server_text, "destination")):
        assert series(text, "istio_requests_total", reporter=reporter, response_code="418", **common) == 1
        assert series(text, "istio_requests_total", source_workload="evil") == 0
    # The fault never left the client sidecar: only the source reporter has it, with Envoy's flag.
    assert series(client_text, "istio_requests_total", reporter="source", response_code="500",
                  response_flags="FI", destination_service=fqdn) == 1
    assert series(server_text, "istio_requests_total", response_code="500") == 0
    # The duration histogram counts every request of the series; request/response sizes are recorded.
    assert series(server_text, "istio_request_duration_milliseconds_count", reporter="destination",
                  response_code="200") == 3
    assert series(server_text, "istio_request_duration_milliseconds_bucket", reporter="destination",
                  response_code="200", le="+Inf") == 3
    assert series(client_text, "istio_response_bytes_sum", reporter="source", response_code="200") > 0
    # The peer header stays between the sidecars: the app never sees it.
    assert "x-kizuna-peer" not in pair.get("http://httpbin:8000/headers")[1]


def test_external_hosts_never_see_the_peer_header(mesh: LocalMesh, pair: Pair) -> None:
    (ext_addr,) = loopback_addresses(1, prefix="127.87")
    ext = mesh.upstream(ext_addr, 0, name="ext")
    entry = textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: ext}}
        spec:
          hosts: [ext.telemetry.test]
          ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {ext.port}}}]
          resolution: STATIC
          endpoints: [{{address: {ext_addr}}}]
        """)
    resources = parse_all(parse_text(textwrap.dedent(YAML) + "---\n" + entry, "test.yaml"))
    mesh.apply(pair.client, compile_snapshot(resources, [Instance(pair.client_node, True)], pair.client_node, "2"))
    assert pair.get("http://ext.telemetry.test/get")[0] == 200
    assert [r.header("x-kizuna-peer") for r in ext.requests] == [None]
    text, _ = scrape(pair.client_node.mesh_address, 15000)
    assert series(text, "istio_requests_total", reporter="source", destination_service="ext.telemetry.test",
                  destination_workload="unknown", response_code="200") == 1


def test_no_route_and_spent_retries_are_counted_with_their_flags(pair: Pair, tmp_path: Path) -> None:
    assert pair.get("http://nowhere.example:8000/")[0] == 404
    # The mesh's default retry policy retries a 503 twice, then passes the last answer on (URX).
    assert pair.get("http://httpbin:8000/status/503")[0] == 503
    assert pair.get("http://httpbin:8000/delay/1")[0] == 504  # the route's 0.2 s timeout: UT
    text, _ = scrape(pair.client_node.mesh_address, 15000)
    assert series(text, "istio_requests_total", reporter="source", response_code="404",
                  response_flags="NR") == 1
    assert series(text, "istio_requests_total", reporter="source", response_code="503",
                  response_flags="URX", destination_workload="httpbin-v1") == 1
    assert series(text, "istio_requests_total", reporter="source", response_code="504",
                  response_flags="UT", destination_workload="httpbin-v1") == 1
    server, _ = scrape(pair.server_node.mesh_address, 15000)
    assert series(server, "istio_requests_total", reporter="destination", response_code="503") == 3
    assert pair.client.telemetry is not None and pair.client.telemetry.access_log is not None
    pair.client.telemetry.access_log.flush()
    logged = [json.loads(line) for line in (tmp_path / "sleep-0.default.access.log").read_text().splitlines()]
    assert [(e["response_code"], e["response_flags"]) for e in logged] == [(404, "NR"), (503, "URX"), (504, "UT")]


def test_tcp_metrics_on_both_sides(pair: Pair) -> None:
    with socket.create_connection((pair.client_node.mesh_address, 15001), timeout=5) as sock:
        sock.sendall(b"CONNECT echo:9000 HTTP/1.1\r\nHost: echo:9000\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        sock.sendall(b"hello")
        got = b""
        while len(got) < 5:
            got += sock.recv(1024)
    # Server side: an inbound TCP port relayed to the app.
    with socket.create_connection((pair.server_node.mesh_address, 9000), timeout=5) as sock:
        sock.sendall(b"ping!")
        got = b""
        while len(got) < 5:
            got += sock.recv(1024)
    deadline = time.monotonic() + 5
    while True:
        text, _ = scrape(pair.server_node.mesh_address, 15000)
        closed = series(text, "istio_tcp_connections_closed_total", reporter="destination")
        if closed >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert series(text, "istio_tcp_connections_opened_total", reporter="destination") >= 2
    assert closed >= 2
    assert series(text, "istio_tcp_received_bytes_total", reporter="destination") >= 10
    assert series(text, "istio_tcp_sent_bytes_total", reporter="destination") >= 10
    # The inbound port is the echo Service's target port: Istio's destination_service labels say so.
    assert series(text, "istio_tcp_connections_opened_total", reporter="destination",
                  destination_service="echo.default.svc.cluster.local", destination_service_name="echo",
                  destination_workload="httpbin-v1") >= 2


def test_access_log_lines_carry_envoy_fields(pair: Pair, tmp_path: Path) -> None:
    assert pair.get("http://httpbin:8000/get", **{"x-request-id": "req-1"})[0] == 200
    assert pair.get("http://httpbin:8000/fault")[0] == 500
    for sidecar in (pair.client, pair.server):
        assert sidecar.telemetry is not None and sidecar.telemetry.access_log is not None
        sidecar.telemetry.access_log.flush()
    client_lines = [json.loads(line) for line in
                    (tmp_path / "sleep-0.default.access.log").read_text().splitlines()]
    server_lines = [json.loads(line) for line in
                    (tmp_path / "httpbin-v1-0.default.access.log").read_text().splitlines()]
    ok = next(e for e in client_lines if e["x_request_id"] == "req-1")
    assert ok["method"] == "GET" and ok["response_code"] == 200 and ok["response_flags"] == "-"
    assert ok["upstream_cluster"] == "outbound|8000||httpbin.default.svc.cluster.local"
    assert ok["upstream_host"] == f"{pair.server_node.mesh_address}:80"
    assert ok["authority"] == "httpbin:8000" and ok["protocol"] == "HTTP/1.1" and ok["reporter"] == "source"
    assert ok["start_time"].endswith("Z") and ok["duration"] >= 0
    fault = next(e for e in client_lines if e["response_code"] == 500)
    assert fault["response_flags"] == "FI"
    inbound = next(e for e in server_lines if e["x_request_id"] == "req-1")
    assert inbound["reporter"] == "destination" and inbound["path"] == "/get"
    assert inbound["bytes_sent"] > 0
