"""ServiceEntry end to end: a real sidecar runs a snapshot compiled from a ServiceEntry and reaches an app
outside the mesh (no sidecar) on loopback — STATIC by address, DNS by name (``localhost``) — with the
VirtualService and DestinationRule of the entry's host applied. Nothing leaves the machine.
"""

from __future__ import annotations

import http.client
import json
import textwrap
from typing import Any

import pytest

from kizuna.api import parse_all, parse_text
from kizuna.controlplane.compile import compile_snapshot
from kizuna.proxyconfig.bootstrap import Node
from kizuna.testing.mesh import LocalMesh, loopback_addresses

pytestmark = pytest.mark.integration


def client_sidecar(mesh: LocalMesh, yaml: str) -> str:
    """A client sidecar running ``yaml`` compiled for it; returns its mesh address (outbound on 15001)."""
    pod, side = loopback_addresses(2, prefix="127.90")
    node = Node("sleep-0.default", "sleep", labels=(("app", "sleep"),), pod_address=pod, mesh_address=side)
    snapshot = compile_snapshot(parse_all(parse_text(textwrap.dedent(yaml), "test.yaml")), [], node, "1")
    mesh.sidecar(side, snapshot, pod_address=pod)
    return side


def get(sidecar: str, url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(sidecar, 15001, timeout=10)
    try:
        conn.request("GET", url, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_static_entry_with_subsets_routes_to_external_endpoints(mesh: LocalMesh) -> None:
    a_addr, b_addr = loopback_addresses(2, prefix="127.90")
    a = mesh.upstream(a_addr, 0, name="ext-v1")
    b = mesh.upstream(b_addr, a.port, name="ext-v2")
    side = client_sidecar(mesh, f"""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {{name: ext}}
    spec:
      hosts: [api.external.test]
      ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {a.port}}}]
      location: MESH_EXTERNAL
      resolution: STATIC
      endpoints:
      - {{address: {a_addr}, labels: {{version: v1}}}}
      - {{address: {b_addr}, labels: {{version: v2}}}}
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {{name: ext}}
    spec:
      hosts: [api.external.test]
      http:
      - match: [{{headers: {{end-user: {{exact: jason}}}}}}]
        route: [{{destination: {{host: api.external.test, subset: v2}}}}]
      - route: [{{destination: {{host: api.external.test, subset: v1}}}}]
    ---
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {{name: ext}}
    spec:
      host: api.external.test
      subsets:
      - {{name: v1, labels: {{version: v1}}}}
      - {{name: v2, labels: {{version: v2}}}}
    """)
    for _ in range(5):
        assert get(side, "http://api.external.test/get")[0] == 200
    assert get(side, "http://api.external.test/get", **{"end-user": "jason"})[0] == 200
    assert (len(a.requests), len(b.requests)) == (5, 1)
    # The app sees the entry's host name, as it would from a client outside the mesh.
    assert a.requests[0].header("host") == "api.external.test"
    # A host no entry declares is still unknown in proxy mode.
    status, headers, _ = get(side, "http://other.external.test/get")
    assert status == 404 and headers["x-kizuna-error"] == "no route"


def test_dns_entry_connects_to_the_name_resolved_by_the_sidecar(mesh: LocalMesh) -> None:
    app = mesh.upstream("127.0.0.1", 0, name="local")
    side = client_sidecar(mesh, f"""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {{name: local}}
    spec:
      hosts: [localhost]
      ports: [{{number: {app.port}, name: http, protocol: HTTP}}]
      resolution: DNS
    """)
    status, _, body = get(side, f"http://localhost:{app.port}/anything/x")
    seen: dict[str, Any] = json.loads(body)
    assert status == 200 and seen["path"] == "/anything/x"
    assert len(app.requests) == 1


def test_wildcard_entry_takes_every_name_under_its_domain(mesh: LocalMesh) -> None:
    (address,) = loopback_addresses(1, prefix="127.90")
    app = mesh.upstream(address, 0, name="wiki")
    side = client_sidecar(mesh, f"""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {{name: wiki}}
    spec:
      hosts: ["*.wikipedia.test"]
      ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {app.port}}}]
      resolution: DNS
      endpoints: [{{address: {address}}}]
    """)
    for lang in ("en", "de"):
        status, _, body = get(side, f"http://{lang}.wikipedia.test/wiki/Bond")
        assert status == 200 and json.loads(body)["headers"]["host"] == f"{lang}.wikipedia.test"
    assert get(side, "http://wikipedia.test/")[0] == 404
    assert len(app.requests) == 2
