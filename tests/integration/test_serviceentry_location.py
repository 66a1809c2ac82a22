"""ServiceEntry ``location`` end to end (proxy mode, real ``kizuna up``): an entry selecting a workload with a
sidecar (httpbin, under no Service) is part of the mesh when MESH_INTERNAL, so the client sidecar talks mutual TLS
to it (the app sees the client's identity in ``x-forwarded-client-cert``); re-applied as MESH_EXTERNAL it gets no
automatic mTLS, and the same request arrives in plaintext (no connection made before is reused)."""

from __future__ import annotations

import http.client
import ipaddress
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

BLOCK = ipaddress.IPv4Network("127.102.128.0/17")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "httpbin"
ENTRY = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: legacy}}
spec:
  hosts: [legacy.internal]
  location: {location}
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}]
  resolution: STATIC
  workloadSelector: {{labels: {{app: legacy}}}}
"""
LEGACY = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: legacy}
spec:
  selector:
    matchLabels: {app: legacy}
  template:
    metadata:
      labels: {app: legacy}
    spec:
      containers:
      - name: httpbin
        command: ["python", "-m", "gunicorn", "-b", "$(POD_IP):8080", "-k", "gthread", "httpbin:app"]
        env:
        - name: POD_IP
          valueFrom: {fieldRef: {fieldPath: status.podIP}}
        ports:
        - {containerPort: 8080}
        readinessProbe:
          httpGet: {path: /status/200, port: 8080}
          periodSeconds: 1
"""


@pytest.fixture(scope="module")
def mesh(kit: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from kizuna.runtime.addresses import choose_pod_range

    root = tmp_path_factory.mktemp("location")
    entry = root / "entry.yaml"
    entry.write_text(ENTRY.format(location="MESH_INTERNAL"))
    legacy = root / "legacy.yaml"
    legacy.write_text(LEGACY)
    state = root / "state"
    mesh = kit.Mesh(state, str(choose_pod_range(str(state), block=BLOCK).network))
    try:
        result = kit.run_kizuna("up", "--detach", "--mode", "proxy", "--state-dir", state, "--pod-cidr",
                                mesh.pod_cidr, "--prometheus", "off", "--dashboard", "off",
                                legacy, EXAMPLE / "sleep.yaml", entry, timeout=120)
        if (state / "runtime.json").exists():
            mesh.processes = mesh.runtime()["processes"]
        assert result.returncode == 0, f"kizuna up failed:\n{result.stdout}\n{result.stderr}\n{mesh.logs()}"
        yield mesh
    finally:
        try:
            kit.run_kizuna("down", "--state-dir", state, timeout=60)
        finally:
            mesh.kill_all()


def client_certificate(mesh: Any) -> str | None:
    """The ``x-forwarded-client-cert`` httpbin received for a request to the entry's host from sleep."""
    conn = http.client.HTTPConnection(mesh.instance("sleep")["meshAddress"], 15001, timeout=10)
    try:
        conn.request("GET", "http://legacy.internal/headers")
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, body
    finally:
        conn.close()
    headers: dict[str, str] = json.loads(body)["headers"]
    return headers.get("X-Forwarded-Client-Cert")


def identity(address: str) -> Any:
    with urllib.request.urlopen(f"http://{address}:15000/config_dump", timeout=5) as response:
        return json.load(response).get("identity", {}).get("identity")


def test_internal_entries_get_auto_mtls_and_external_ones_do_not(mesh: Any, kit: Any, tmp_path: Path) -> None:
    kit.wait_until(lambda: identity(mesh.instance("sleep")["meshAddress"]), 15, "sleep's certificate")
    xfcc = kit.wait_until(lambda: client_certificate(mesh), 15, "a request over mTLS", interval=0.2)
    assert "URI=spiffe://cluster.local/ns/default/sa/sleep" in xfcc

    external = tmp_path / "external.yaml"
    external.write_text(ENTRY.format(location="MESH_EXTERNAL"))
    applied = mesh.kizuna("apply", "-f", external)
    assert applied.returncode == 0, applied.stderr
    kit.wait_until(lambda: client_certificate(mesh) is None, 15, "the request to arrive in plaintext",
                   interval=0.2)
    seq = [client_certificate(mesh) for _ in range(12)]
    assert all(c is None for c in seq), seq
