"""VirtualService corsPolicy end to end with Envoy's CORS filter semantics: a real client sidecar answers
preflights from allowed origins itself, forwards (or, with ``unmatchedPreflights: IGNORE``, answers) the
others, and adds the CORS headers to actual responses for allowed origins. The app is outside the mesh,
reached through a STATIC ServiceEntry on loopback.
"""

from __future__ import annotations

import http.client
import textwrap

import pytest

from kizuna.api import parse_all, parse_text
from kizuna.controlplane.compile import compile_snapshot
from kizuna.proxyconfig.bootstrap import Node
from kizuna.testing.mesh import LocalMesh, loopback_addresses
from kizuna.testing.upstream import UpstreamServer

pytestmark = pytest.mark.integration


def setup(mesh: LocalMesh) -> tuple[str, UpstreamServer]:
    (app_addr,) = loopback_addresses(1, prefix="127.90")
    app = mesh.upstream(app_addr, 0, name="web")
    pod, side = loopback_addresses(2, prefix="127.90")
    node = Node("sleep-0.default", "sleep", labels=(("app", "sleep"),), pod_address=pod, mesh_address=side)
    yaml = textwrap.dedent(f"""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {{name: web}}
    spec:
      hosts: [web.cors.test]
      ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {app.port}}}]
      resolution: STATIC
      endpoints: [{{address: {app_addr}}}]
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {{name: web}}
    spec:
      hosts: [web.cors.test]
      http:
      - match: [{{uri: {{prefix: /strict}}}}]
        corsPolicy:
          allowOrigins: [{{exact: "https://a.example"}}]
          unmatchedPreflights: IGNORE
        route: [{{destination: {{host: web.cors.test}}}}]
      - corsPolicy:
          allowOrigins: [{{exact: "https://a.example"}}, {{regex: "https://.*[.]b[.]example"}}]
          allowMethods: [GET, POST]
          allowHeaders: [x-custom, content-type]
          exposeHeaders: [x-exposed]
          maxAge: 24h
          allowCredentials: true
        route: [{{destination: {{host: web.cors.test}}}}]
    """)
    snapshot = compile_snapshot(parse_all(parse_text(yaml, "test.yaml")), [], node, "1")
    mesh.sidecar(side, snapshot, pod_address=pod)
    return side, app


def call(sidecar: str, method: str, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(sidecar, 15001, timeout=10)
    try:
        conn.request(method, f"http://web.cors.test{path}", headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-custom"}


def test_preflight_from_an_allowed_origin_is_answered_by_the_sidecar(mesh: LocalMesh) -> None:
    side, app = setup(mesh)
    for origin in ("https://a.example", "https://shop.b.example"):
        status, headers, body = call(side, "OPTIONS", "/api", Origin=origin, **PREFLIGHT)
        assert (status, body) == (200, b"")
        assert headers["access-control-allow-origin"] == origin
        assert headers["access-control-allow-methods"] == "GET,POST"
        assert headers["access-control-allow-headers"] == "x-custom,content-type"
        assert headers["access-control-max-age"] == "86400"
        assert headers["access-control-allow-credentials"] == "true"
        assert "x-kizuna-error" not in headers
    assert app.requests == []


def test_preflight_from_another_origin_is_forwarded_or_ignored(mesh: LocalMesh) -> None:
    side, app = setup(mesh)
    status, headers, _ = call(side, "OPTIONS", "/api", Origin="https://evil.example", **PREFLIGHT)
    assert status == 200 and "access-control-allow-origin" not in headers
    assert [r.method for r in app.requests] == ["OPTIONS"]  # FORWARD (the default): the app decides
    status, headers, _ = call(side, "OPTIONS", "/strict", Origin="https://evil.example", **PREFLIGHT)
    assert status == 200 and "access-control-allow-origin" not in headers
    assert len(app.requests) == 1  # IGNORE: answered by the sidecar, without CORS headers


def test_actual_requests_get_cors_headers_only_for_allowed_origins(mesh: LocalMesh) -> None:
    side, app = setup(mesh)
    status, headers, _ = call(side, "GET", "/get", Origin="https://a.example")
    assert status == 200
    assert headers["access-control-allow-origin"] == "https://a.example"
    assert headers["access-control-expose-headers"] == "x-exposed"
    assert headers["access-control-allow-credentials"] == "true"
    status, headers, _ = call(side, "GET", "/get", Origin="https://evil.example")
    assert status == 200 and "access-control-allow-origin" not in headers
    status, headers, _ = call(side, "GET", "/get")
    assert status == 200 and "access-control-allow-origin" not in headers
    # An OPTIONS without Access-Control-Request-Method is no preflight: it goes to the app.
    call(side, "OPTIONS", "/x", Origin="https://a.example")
    assert [r.method for r in app.requests] == ["GET", "GET", "GET", "OPTIONS"]
