"""gRPC calls in Istio's metrics, traces and access logs: a grpcio client calls a grpcio server through a client
sidecar and a server sidecar (HTTP/2 on both hops). Both reporters count the calls with
``request_protocol="grpc"`` and the call's ``grpc_response_status`` (an app's NOT_FOUND is 5 with HTTP 200; a
proxy-made error is UNAVAILABLE 14 with its flag); each side exports a span of the call, the server's the child
of the client's; the access logs say ``HTTP/2`` and carry the gRPC status."""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kizuna.api import parse_all, parse_text
from kizuna.controlplane.compile import compile_snapshot
from kizuna.controlplane.instances import Instance
from kizuna.controlplane.traces import OtlpReceiver, TraceStore
from kizuna.proxy.sidecar import Sidecar
from kizuna.proxyconfig.bootstrap import Node
from kizuna.testing.mesh import LocalMesh, loopback_addresses, sidecar_bootstrap

pytestmark = pytest.mark.integration

YAML = """\
apiVersion: v1
kind: Service
metadata: {name: echo}
spec:
  selector: {app: echo}
  ports: [{name: grpc, port: 7070, targetPort: 7070}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo}
spec:
  hosts: [echo]
  http:
  - match: [{uri: {prefix: /echo.Echo/Broken}}]
    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
    route: [{destination: {host: echo}}]
  - route: [{destination: {host: echo}}]
"""


def _say(request: bytes, context: grpc.ServicerContext) -> bytes:
    if request == b"missing":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    return b"echo:" + request


@dataclass
class Hop:
    client: Sidecar
    server: Sidecar
    channel: grpc.Channel
    store: TraceStore
    logs: Path
    mesh: LocalMesh

    def call(self, method: str, request: bytes, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.StatusCode:
        stub = self.channel.unary_unary(method)
        try:
            stub(request, timeout=10, metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK


@pytest.fixture
def hop(mesh: LocalMesh, tmp_path: Path) -> Iterator[Hop]:
    pod_c, side_c, pod_s, side_s, collector = loopback_addresses(5, prefix="127.93")
    app = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    app.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "echo.Echo", {"Say": grpc.unary_unary_rpc_method_handler(_say),
                      "Broken": grpc.unary_unary_rpc_method_handler(_say)}),))
    app.add_insecure_port(f"{pod_s}:7070")
    app.start()
    store = TraceStore()
    receiver = OtlpReceiver(store)
    host, port = mesh.loop.run(receiver.start(collector, 0))
    client_node = Node("client-0.default", "client", labels=(("app", "client"), ("version", "v1")),
                       pod_address=pod_c, mesh_address=side_c)
    server_node = Node("echo-v1-0.default", "echo-v1", labels=(("app", "echo"), ("version", "v1")),
                       pod_address=pod_s, mesh_address=side_s, ports=(7070,))
    resources = parse_all(parse_text(textwrap.dedent(YAML), "test.yaml"))
    instances = [Instance(client_node, True), Instance(server_node, True)]
    sidecars = []
    for node in (client_node, server_node):
        boot = replace(sidecar_bootstrap(node.id, node.mesh_address, pod_address=node.pod_address), node=node,
                       access_log=str(tmp_path / f"{node.id}.access.log"),
                       trace_endpoint=f"http://{host}:{port}/v1/traces", trace_sampling=100.0)
        sidecar = Sidecar(boot)
        mesh.loop.run(sidecar.start())
        mesh.sidecars.append(sidecar)
        mesh.apply(sidecar, compile_snapshot(resources, instances, node, "1"))
        sidecars.append(sidecar)
    # The app dials the service by name through its sidecar's outbound port (proxy mode).
    channel = grpc.insecure_channel(f"{side_c}:15001", options=[("grpc.default_authority", "echo:7070")])
    try:
        yield Hop(sidecars[0], sidecars[1], channel, store, tmp_path, mesh)
    finally:
        channel.close()
        app.stop(None)
        mesh.loop.run(receiver.close())


def samples(sidecar: Sidecar) -> list[tuple[str, dict[str, str], float]]:
    assert sidecar.telemetry is not None
    return [(s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(sidecar.telemetry.exposition()) for s in family.samples]


def count(sidecar: Sidecar, **labels: str) -> float:
    return sum(v for name, found, v in samples(sidecar)
               if name == "istio_requests_total" and all(found.get(k) == x for k, x in labels.items()))


def test_grpc_calls_are_counted_with_their_grpc_status_on_both_sides(hop: Hop) -> None:
    for _ in range(2):
        assert hop.call("/echo.Echo/Say", b"hi") == grpc.StatusCode.OK
    # An app cannot pass itself off as another workload: only sidecars say who calls.
    spoof = (("x-kizuna-peer", "evil;default;evil;v1;echo.default.svc.cluster.local"),)
    assert hop.call("/echo.Echo/Say", b"hi", spoof) == grpc.StatusCode.OK
    assert hop.call("/echo.Echo/Say", b"missing") == grpc.StatusCode.NOT_FOUND
    assert hop.call("/echo.Echo/Broken", b"x") == grpc.StatusCode.UNAVAILABLE
    ok = {"request_protocol": "grpc", "response_code": "200", "grpc_response_status": "0"}
    # The server side records after the client got its answer: give it a moment.
    deadline = time.monotonic() + 5
    while count(hop.server, reporter="destination", grpc_response_status="5") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count(hop.client, reporter="source", destination_workload="echo-v1", source_workload="client",
                 destination_service="echo.default.svc.cluster.local", **ok) == 3
    assert count(hop.server, reporter="destination", source_workload="client", destination_workload="echo-v1",
                 destination_service="echo.default.svc.cluster.local", **ok) == 3
    for side, reporter in ((hop.client, "source"), (hop.server, "destination")):
        assert count(side, reporter=reporter, request_protocol="grpc", response_code="200",
                     grpc_response_status="5", response_flags="-") == 1
    # The fault is the client sidecar's own answer: UNAVAILABLE, flagged FI, and never reaches the server.
    assert count(hop.server, source_workload="evil") == 0
    assert count(hop.client, reporter="source", request_protocol="grpc", grpc_response_status="14",
                 response_flags="FI") == 1
    assert count(hop.server, grpc_response_status="14") == 0
    sizes = [v for name, found, v in samples(hop.client)
             if name == "istio_response_bytes_sum" and found.get("grpc_response_status") == "0"]
    assert sizes and sizes[0] > 0  # the gRPC messages' bytes were counted


def test_grpc_calls_make_parent_linked_spans_and_access_log_lines(hop: Hop) -> None:
    assert hop.call("/echo.Echo/Say", b"missing") == grpc.StatusCode.NOT_FOUND
    for sidecar in (hop.client, hop.server):
        assert sidecar.telemetry is not None and sidecar.telemetry.tracer is not None
        exporter = sidecar.telemetry.tracer.exporter
        assert exporter is not None
        hop.mesh.loop.run(exporter.flush())
    (summary,) = hop.store.summaries()
    spans = hop.store.trace(summary["traceId"])
    assert spans is not None
    by_kind = {s["kind"]: s for s in spans}
    assert set(by_kind) == {"client", "server"}
    assert by_kind["server"]["parentSpanId"] == by_kind["client"]["spanId"]
    assert by_kind["client"]["attributes"]["grpc.status_code"] == "5"
    assert by_kind["client"]["error"] is True  # a gRPC error is an error span though HTTP said 200
    for sidecar in (hop.client, hop.server):
        assert sidecar.telemetry is not None and sidecar.telemetry.access_log is not None
        sidecar.telemetry.access_log.flush()
    client = [json.loads(line) for line in (hop.logs / "client-0.default.access.log").read_text().splitlines()]
    server = [json.loads(line) for line in (hop.logs / "echo-v1-0.default.access.log").read_text().splitlines()]
    (out,), (into,) = client, server
    assert out["protocol"] == "HTTP/2" and out["grpc_status"] == "5" and out["response_code"] == 200
    assert out["path"] == "/echo.Echo/Say" and out["reporter"] == "source"
    assert out["upstream_cluster"] == "outbound|7070||echo.default.svc.cluster.local"
    assert into["reporter"] == "destination" and into["grpc_status"] == "5"
    assert out["x_request_id"] and out["x_request_id"] == into["x_request_id"]
