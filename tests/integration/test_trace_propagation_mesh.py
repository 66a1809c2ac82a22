"""A trace across an app that forwards no header at all (Python, ``urllib``): in the mesh, the runtime's trace
propagation keeps sleep → relay → httpbin one trace, each span the child of the one before."""

from __future__ import annotations

import http.client
import os
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "httpbin"
RELAY = textwrap.dedent("""\
    import http.server, os, urllib.request
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            # No header of the request served is copied onto the call it makes.
            with urllib.request.urlopen("http://httpbin:8000/headers", timeout=5) as r:
                body = r.read()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    http.server.ThreadingHTTPServer((os.environ["POD_IP"], 8080), Handler).serve_forever()
    """)


@pytest.fixture(scope="module")
def mesh(mesh_factory: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("relay")
    (folder / "relay.py").write_text(RELAY)
    manifest = folder / "relay.yaml"
    manifest.write_text(textwrap.dedent(f"""\
    apiVersion: v1
    kind: Service
    metadata: {{name: relay}}
    spec: {{ports: [{{name: http, port: 80, targetPort: 8080}}], selector: {{app: relay}}}}
    ---
    apiVersion: apps/v1
    kind: Deployment
    metadata: {{name: relay}}
    spec:
      selector: {{matchLabels: {{app: relay}}}}
      template:
        metadata: {{labels: {{app: relay}}}}
        spec:
          containers:
          - name: relay
            image: python
            command: ["python", "{folder / 'relay.py'}"]
            env: [{{name: POD_IP, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}]
            ports: [{{containerPort: 8080}}]
    """))
    return mesh_factory(EXAMPLE / "httpbin.yaml", EXAMPLE / "sleep.yaml", manifest)


def test_the_trace_goes_through_an_app_that_forwards_nothing(mesh: Any, kit: Any) -> None:
    from kizuna.controlplane.client import ControlPlaneClient

    trace_id = os.urandom(16).hex()
    conn = http.client.HTTPConnection(mesh.instance("sleep")["meshAddress"], 15001, timeout=10)
    try:
        conn.request("GET", "http://relay/", headers={"traceparent": f"00-{trace_id}-{os.urandom(8).hex()}-01"})
        response = conn.getresponse()
        response.read()
        assert response.status == 200
    finally:
        conn.close()
    client = ControlPlaneClient.from_state_dir(mesh.state)

    def spans() -> list[dict[str, Any]] | None:
        try:
            found: list[dict[str, Any]] = client.traces(trace_id)["spans"]
        except Exception:
            return None
        return found if len(found) >= 4 else None

    found = kit.wait_until(spans, 10, "four spans in the trace")
    by_id = {s["spanId"]: s for s in found}
    span = next(s for s in found if s["service"].startswith("httpbin") and s["kind"] == "server")
    path = []
    while span is not None:
        path.append((span["service"].split(".")[0], span["kind"]))
        span = by_id.get(span["parentSpanId"])
    assert path == [("httpbin-v1", "server"), ("relay", "client"), ("relay", "server"), ("sleep", "client")] \
        or path == [("httpbin-v2", "server"), ("relay", "client"), ("relay", "server"), ("sleep", "client")]
