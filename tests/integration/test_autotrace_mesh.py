"""Whole traces through Python apps that forward no header, in a mesh (``kizuna up``), with the runtime's
OpenTelemetry-based propagation: a gRPC server that, while serving, calls another gRPC service or calls httpbin
with ``requests``; an HTTP server that calls httpbin with ``urllib3``. Each trace is checked in the control
plane's trace store, every span the child of the one before. An app opted out by annotation breaks the trace."""

from __future__ import annotations

import http.client
import json
import os
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "httpbin"
# Apps reach other services through their sidecar (HTTP_PROXY), and copy no header of what they serve.
FRONT = textwrap.dedent("""\
    import os, sys
    from concurrent import futures
    import grpc, requests
    sidecar = os.environ["HTTP_PROXY"].removeprefix("http://")
    back = grpc.insecure_channel(sidecar, options=[("grpc.default_authority", "back:50051"),
                                                   ("grpc.enable_http_proxy", 0)])

    def say(request, context):
        if request == b"grpc":
            return back.unary_unary("/echo.Echo/Say")(b"hello", timeout=5)
        return requests.get("http://httpbin:8000/headers?show_env=1", timeout=5).content

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "echo.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)}),))
    server.add_insecure_port(os.environ["POD_IP"] + ":50051")
    server.start()
    server.wait_for_termination()
    """)
BACK = textwrap.dedent("""\
    import json, os
    from concurrent import futures
    import grpc

    def say(request, context):
        return json.dumps({m.key: m.value for m in context.invocation_metadata()}).encode()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "echo.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)}),))
    server.add_insecure_port(os.environ["POD_IP"] + ":50051")
    server.start()
    server.wait_for_termination()
    """)
RELAY = textwrap.dedent("""\
    import http.server, os, urllib3
    pool = urllib3.ProxyManager(os.environ["HTTP_PROXY"])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = pool.request("GET", "http://httpbin:8000/headers?show_env=1", timeout=5).data
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    http.server.ThreadingHTTPServer((os.environ["POD_IP"], 8080), Handler).serve_forever()
    """)


def deployment(name: str, script: Path, port: int, port_name: str, annotations: str = "{}") -> str:
    return textwrap.dedent(f"""\
    apiVersion: v1
    kind: Service
    metadata: {{name: {name}}}
    spec: {{ports: [{{name: {port_name}, port: {port}, targetPort: {port}}}], selector: {{app: {name}}}}}
    ---
    apiVersion: apps/v1
    kind: Deployment
    metadata: {{name: {name}}}
    spec:
      selector: {{matchLabels: {{app: {name}}}}}
      template:
        metadata: {{labels: {{app: {name}}}, annotations: {annotations}}}
        spec:
          containers:
          - name: {name}
            image: python
            command: ["python", "{script}"]
            env: [{{name: POD_IP, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}]
            ports: [{{containerPort: {port}}}]
    """)


@pytest.fixture(scope="module")
def mesh(mesh_factory: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("autotrace")
    docs = []
    for name, script, port, port_name, pod_annotations in (
            ("front", FRONT, 50051, "grpc", "{}"),
            ("back", BACK, 50051, "grpc", "{}"),
            ("relay", RELAY, 8080, "http", "{}"),
            ("optout", RELAY, 8080, "http", '{"kizuna.dev/trace-propagation": "false"}')):
        (folder / f"{name}.py").write_text(script)
        docs.append(deployment(name, folder / f"{name}.py", port, port_name, pod_annotations))
    manifest = folder / "apps.yaml"
    manifest.write_text("---\n".join(docs))
    return mesh_factory(EXAMPLE / "httpbin.yaml", EXAMPLE / "sleep.yaml", manifest)


def new_traceparent() -> tuple[str, str]:
    trace_id = os.urandom(16).hex()
    return trace_id, f"00-{trace_id}-{os.urandom(8).hex()}-01"


def call_grpc(mesh: Any, request: bytes, traceparent: str) -> bytes:
    sidecar = f"{mesh.instance('sleep')['meshAddress']}:15001"
    with grpc.insecure_channel(sidecar, options=[("grpc.default_authority", "front:50051"),
                                                 ("grpc.enable_http_proxy", 0)]) as channel:
        say = channel.unary_unary("/echo.Echo/Say")
        return bytes(say(request, timeout=10, metadata=(("traceparent", traceparent),
                                                          ("x-request-id", "autotrace-1"))))


def call_http(mesh: Any, service: str, traceparent: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection(mesh.instance("sleep")["meshAddress"], 15001, timeout=10)
    try:
        conn.request("GET", f"http://{service}/", headers={"traceparent": traceparent, "x-request-id": "autotrace-1"})
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, body
        data: dict[str, Any] = json.loads(body)
        return data
    finally:
        conn.close()


def trace(mesh: Any, kit: Any, trace_id: str, length: int) -> list[dict[str, Any]]:
    """The spans of a trace in the control plane's store, once there are at least ``length``."""
    from kizuna.controlplane.client import ControlPlaneClient

    client = ControlPlaneClient.from_state_dir(mesh.state)

    def spans() -> list[dict[str, Any]] | None:
        try:
            found: list[dict[str, Any]] = client.traces(trace_id)["spans"]
        except Exception:
            return None
        return found if len(found) >= length else None

    found: list[dict[str, Any]] = kit.wait_until(spans, 10, f"{length} spans in trace {trace_id}")
    return found


def chain(mesh: Any, kit: Any, trace_id: str, last: str, length: int) -> list[tuple[str, str]]:
    """The trace's spans from the server span of ``last`` up through the parent links, as (service, kind)."""
    found = trace(mesh, kit, trace_id, length)
    by_id = {s["spanId"]: s for s in found}
    span = next(s for s in found if s["service"].startswith(last) and s["kind"] == "server")
    path = []
    while span is not None:
        path.append((span["service"].split(".")[0].removesuffix("-v1").removesuffix("-v2"), span["kind"]))
        span = by_id.get(span["parentSpanId"])
    return path


def test_a_grpc_server_calling_another_grpc_service_keeps_the_trace(mesh: Any, kit: Any) -> None:
    trace_id, traceparent = new_traceparent()
    seen = json.loads(call_grpc(mesh, b"grpc", traceparent))
    assert seen["x-request-id"] == "autotrace-1"
    assert seen["traceparent"].split("-")[1] == trace_id
    assert chain(mesh, kit, trace_id, "back", 4) == [
        ("back", "server"), ("front", "client"), ("front", "server"), ("sleep", "client")]


def test_a_grpc_server_calling_http_with_requests_keeps_the_trace(mesh: Any, kit: Any) -> None:
    trace_id, traceparent = new_traceparent()
    seen = {k.lower(): v for k, v in json.loads(call_grpc(mesh, b"http", traceparent))["headers"].items()}
    assert seen["x-request-id"] == "autotrace-1"
    assert seen["traceparent"].split("-")[1] == trace_id
    assert chain(mesh, kit, trace_id, "httpbin", 4) == [
        ("httpbin", "server"), ("front", "client"), ("front", "server"), ("sleep", "client")]


def test_an_http_server_calling_with_urllib3_keeps_the_trace(mesh: Any, kit: Any) -> None:
    trace_id, traceparent = new_traceparent()
    seen = {k.lower(): v for k, v in call_http(mesh, "relay:8080", traceparent)["headers"].items()}
    assert seen["x-request-id"] == "autotrace-1"
    assert seen["traceparent"].split("-")[1] == trace_id
    assert chain(mesh, kit, trace_id, "httpbin", 4) == [
        ("httpbin", "server"), ("relay", "client"), ("relay", "server"), ("sleep", "client")]


def test_an_opted_out_app_starts_a_new_trace(mesh: Any, kit: Any) -> None:
    trace_id, traceparent = new_traceparent()
    seen = {k.lower(): v for k, v in call_http(mesh, "optout:8080", traceparent)["headers"].items()}
    # The app forwarded nothing, so its sidecar started a new trace for the call it made: the caller's trace
    # ends at the app.
    assert seen["traceparent"].split("-")[1] != trace_id
    assert seen["x-request-id"] != "autotrace-1"
    assert chain(mesh, kit, trace_id, "optout", 2) == [("optout", "server"), ("sleep", "client")]
