"""A RequestAuthentication whose ``jwksUri`` cannot be fetched: requests with a token get 401 ``Jwks remote
fetch is failed`` and ``kizuna status`` names the failing key set, per workload, with the reason."""

from __future__ import annotations

import http.client
import ipaddress
import socket
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "httpbin"
BLOCK = ipaddress.IPv4Network("127.106.64.0/18")
ISSUER = "issuer@kizuna.test"
Mesh = Any


def closed_port(address: str) -> int:
    """A port on ``address`` where nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def token() -> str:
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode({"iss": ISSUER, "sub": "alice", "exp": int(time.time()) + 600}, key, algorithm="RS256",
                      headers={"kid": "k1"})


def test_status_shows_each_workload_whose_jwks_uri_fails(mesh_factory: Callable[..., Mesh], kit: Any,
                                                         tmp_path: Path) -> None:
    from kizuna.runtime.addresses import choose_pod_range

    pods = choose_pod_range(str(tmp_path), block=BLOCK).network
    mesh = mesh_factory(EXAMPLE / "httpbin.yaml", EXAMPLE / "sleep.yaml", extra=["--pod-cidr", str(pods)])
    uri = f"http://127.0.0.1:{closed_port('127.0.0.1')}/jwks.json"
    policy = tmp_path / "ra.yaml"
    policy.write_text(textwrap.dedent(f"""\
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata: {{name: jwt, namespace: default}}
        spec:
          selector: {{matchLabels: {{app: httpbin}}}}
          jwtRules:
          - issuer: {ISSUER}
            jwksUri: {uri}
        """))
    assert mesh.kizuna("apply", "-f", policy).returncode == 0
    bearer = token()

    def call() -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(mesh.instance("sleep")["meshAddress"], 15001, timeout=15)
        try:
            conn.request("GET", "http://httpbin:8000/get", headers={"Authorization": f"Bearer {bearer}"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    # Both httpbin sidecars start fetching when the policy arrives, before any request, and fail.
    kit.wait_until(lambda: len(failing_lines(mesh, uri)) == 2, 30, "both httpbin sidecars to report the failed fetch")
    # A token then gets Envoy's answer; the Service balances over both.
    kit.wait_until(lambda: call() == (401, b"Jwks remote fetch is failed") and
                   call() == (401, b"Jwks remote fetch is failed") and
                   len(failing_lines(mesh, uri)) == 2, 30, "both httpbin sidecars to report the failed fetch")
    lines = failing_lines(mesh, uri)
    assert {line.split(" for ")[1].split(":")[0] for line in lines} == {"httpbin-v1-0.default",
                                                                         "httpbin-v2-0.default"}
    assert all("ConnectionRefusedError" in line for line in lines), lines


def failing_lines(mesh: Mesh, uri: str) -> list[str]:
    result = mesh.kizuna("status")
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line.startswith(f"jwks failing  {uri} ")]
