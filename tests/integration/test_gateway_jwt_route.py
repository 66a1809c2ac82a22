"""Istio's "JWT claim based routing" task at the ingress gateway: a VirtualService bound to
``httpbin-gateway`` routes ``/headers`` only for tokens whose ``groups`` claim holds ``group1``, with Istio's
RequestAuthentication (authn-policy 06) at the gateway and the jwksUri served locally. Documented: no token
404, an invalid token 401, demo.jwt (no groups claim) 404, groups-scope.jwt 200."""

from __future__ import annotations

import http.client
import ipaddress
import json
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kizuna.testing.samples import GITHUB_RAW, ISTIO_SAMPLES, serve_directory

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not (ISTIO_SAMPLES / "tasks").is_dir(), reason="Istio sample corpus not present")]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "httpbin"
JWT_SAMPLES = ISTIO_SAMPLES / "security/tools/jwt/samples"
BLOCK = ipaddress.IPv4Network("127.104.0.0/17")
"""Pod ranges of this module's mesh (this task's loopback block is 127.104.0.0/16; gateway and jwks above)."""

# The task's VirtualService (istio.io docs/tasks/security/authentication/jwt-route), in the mesh's namespace.
JWT_ROUTE = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: httpbin
spec:
  hosts:
  - "*"
  gateways:
  - httpbin-gateway
  http:
  - match:
    - uri:
        prefix: /headers
      headers:
        "@request.auth.claims.groups":
          exact: group1
    route:
    - destination:
        port:
          number: 8000
        host: httpbin
"""


def address_above_pods() -> str:
    """A loopback address in 127.104.128.0/17, clear of the pod ranges (random: concurrent runs rarely meet)."""
    return f"127.104.{random.randint(128, 254)}.{random.randint(1, 254)}"


def token(name: str) -> str:
    return (JWT_SAMPLES / name).read_text().strip()


@pytest.fixture(scope="module")
def github() -> Iterator[str]:
    with serve_directory(ISTIO_SAMPLES, address_above_pods()) as base:
        yield base


@pytest.fixture(scope="module")
def gateway(mesh_factory: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory,
            github: str) -> tuple[Any, tuple[str, int]]:
    from kizuna.runtime.addresses import choose_pod_range

    address, port = address_above_pods(), 18481
    pods = choose_pod_range(str(tmp_path_factory.mktemp("jwt-route")), block=BLOCK).network
    task = tmp_path_factory.mktemp("task")
    authn = task / "06-requestauthentication-jwt-example.yaml"
    authn.write_text((ISTIO_SAMPLES / "tasks/authn-policy" / authn.name).read_text().replace(GITHUB_RAW, github))
    route = task / "jwt-route.yaml"
    route.write_text(JWT_ROUTE)
    mesh = mesh_factory(EXAMPLE / "httpbin.yaml", ISTIO_SAMPLES / "samples" / "httpbin" / "httpbin-gateway.yaml",
                        extra=["--pod-cidr", str(pods), "--gateway-address", address, "--gateway-port", str(port)])
    for path in (authn, route):
        result = mesh.kizuna("apply", "-f", path)
        assert result.returncode == 0, result.stderr
    return mesh, (address, port)


def get(gateway: tuple[str, int], path: str, bearer: str | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*gateway, timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {bearer}"} if bearer else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_routes_on_the_verified_groups_claim(gateway: tuple[Any, tuple[str, int]], kit: Any) -> None:
    _, address = gateway
    groups_scope, demo = token("groups-scope.jwt"), token("demo.jwt")
    # Once the task's route and the JWT rule are in place: the group1 token reaches httpbin, no token does not.
    kit.wait_until(lambda: get(address, "/headers", groups_scope)[0] == 200 and get(address, "/headers")[0] == 404,
                   30, "the claim route at the gateway")
    status, body = get(address, "/headers", groups_scope)
    assert status == 200 and json.loads(body)["headers"]  # httpbin answered
    assert get(address, "/headers", demo)[0] == 404  # verified, but no groups claim: no route
    assert get(address, "/headers")[0] == 404  # no token: no claims
    assert get(address, "/headers", "deadbeef")[0] == 401  # an invalid token never reaches routing
    # A client cannot stand in for the verified claim with a header of that name ('@' is not a header-name
    # character: the request is refused before routing).
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request("GET", "/headers", headers={"@request.auth.claims.groups": "group1"})
        assert conn.getresponse().status == 400
    finally:
        conn.close()
    assert get(address, "/ip", groups_scope)[0] == 404  # the route is for /headers only



@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_claim_routing_holds_for_http2_streams(gateway: tuple[Any, tuple[str, int]], kit: Any) -> None:
    _, (host, port) = gateway

    def status(*extra: str) -> str:
        result = subprocess.run(["curl", "-sS", "--max-time", "10", "--http2-prior-knowledge", "-o", "/dev/null",
                                 "-w", "%{http_version} %{http_code}", *extra, f"http://{host}:{port}/headers"],
                                capture_output=True, text=True, timeout=20)
        return result.stdout

    groups = ("-H", f"Authorization: Bearer {token('groups-scope.jwt')}")
    kit.wait_until(lambda: status(*groups) == "2 200", 30, "the claim route for h2c streams")
    assert status("-H", f"Authorization: Bearer {token('demo.jwt')}") == "2 404"  # no groups claim
    assert status() == "2 404"  # no token: no claims
    assert status("-H", "Authorization: Bearer deadbeef") == "2 401"
