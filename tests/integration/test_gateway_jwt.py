"""Istio's "End-user authentication" task at the ingress gateway: RequestAuthentication and a DENY policy
selecting ``istio: ingressgateway`` (Istio's task files, the jwksUri pointed at a local copy of GitHub),
httpbin behind Istio's ``httpbin-gateway.yaml``. Documented: no token 200, a bad token 401, demo.jwt 200;
with the DENY policy, no token 403."""

from __future__ import annotations

import http.client
import http.server
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kizuna.testing.mesh import loopback_addresses
from kizuna.testing.samples import GITHUB_RAW, ISTIO_SAMPLES, serve_directory

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not (ISTIO_SAMPLES / "tasks").is_dir(), reason="Istio sample corpus not present")]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "httpbin"
TASK = ISTIO_SAMPLES / "tasks" / "authn-policy"
DEMO_FILE = ISTIO_SAMPLES / "security/tools/jwt/samples/demo.jwt"
DEMO = DEMO_FILE.read_text().strip() if DEMO_FILE.is_file() else ""


@pytest.fixture(scope="module")
def github() -> Iterator[str]:
    (address,) = loopback_addresses(1, prefix="127.86")
    with serve_directory(ISTIO_SAMPLES, address) as base:
        yield base


@pytest.fixture(scope="module")
def gateway(mesh_factory: Callable[..., Any]) -> tuple[Any, tuple[str, int]]:
    (address,) = loopback_addresses(1, prefix="127.86")
    port = 18480
    mesh = mesh_factory(EXAMPLE / "httpbin.yaml", ISTIO_SAMPLES / "samples" / "httpbin" / "httpbin-gateway.yaml",
                        extra=["--gateway-address", address, "--gateway-port", str(port)])
    return mesh, (address, port)


def get(gateway: tuple[str, int], path: str, token: str | None = None) -> int:
    conn = http.client.HTTPConnection(*gateway, timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def apply_task(mesh: Any, name: str, github: str, tmp: Path) -> Path:
    path = tmp / name
    path.write_text((TASK / name).read_text().replace(GITHUB_RAW, github))
    result = mesh.kizuna("apply", "-f", path)
    assert result.returncode == 0, result.stderr
    return path


def test_end_user_authentication_at_the_ingress(gateway: tuple[Any, tuple[str, int]], github: str, kit: Any,
                                                tmp_path: Path) -> None:
    mesh, address = gateway
    kit.wait_until(lambda: get(address, "/headers") == 200, 20, "httpbin through the gateway")
    apply_task(mesh, "06-requestauthentication-jwt-example.yaml", github, tmp_path)
    kit.wait_until(lambda: get(address, "/headers", "deadbeef") == 401, 10, "the JWT rule at the gateway")
    assert get(address, "/headers") == 200  # a token is optional until a policy asks for one
    assert get(address, "/headers", DEMO) == 200
    deny = apply_task(mesh, "07-authorizationpolicy-frontend-ingress-deny-no-jwt.yaml", github, tmp_path)
    kit.wait_until(lambda: get(address, "/headers") == 403, 10, "the DENY policy at the gateway")
    assert get(address, "/headers", DEMO) == 200
    assert mesh.kizuna("delete", "-f", deny).returncode == 0

    def logged(code: int) -> int:
        out = mesh.kizuna("logs", "istio-ingressgateway", "--access").stdout
        return sum(1 for line in out.splitlines() if line.startswith("{") and json.loads(line)["response_code"] == code)

    # The gateway keeps an access log as the sidecars do: the refused tokens are in it.
    kit.wait_until(lambda: logged(401) >= 1 and logged(403) >= 1, 10, "the gateway's access log")


def test_deny_without_a_token_only_on_headers_at_the_ingress(gateway: tuple[Any, tuple[str, int]], github: str,
                                                             kit: Any, tmp_path: Path) -> None:
    # Istio's file 08 applied unchanged at the gateway it selects (istio: ingressgateway), after 06.
    mesh, address = gateway
    apply_task(mesh, "06-requestauthentication-jwt-example.yaml", github, tmp_path)
    path = TASK / "08-authorizationpolicy-frontend-ingress-deny-no-jwt-headers-path.yaml"
    result = mesh.kizuna("apply", "-f", path)
    assert result.returncode == 0, result.stderr
    try:
        kit.wait_until(lambda: get(address, "/headers") == 403 and get(address, "/ip") == 200, 20,
                       "the path-scoped DENY policy at the gateway")
        assert get(address, "/headers", DEMO) == 200  # a verified token is a request principal
        assert get(address, "/ip", DEMO) == 200
        assert get(address, "/headers", "deadbeef") == 401
    finally:
        assert mesh.kizuna("delete", "-f", path).returncode == 0
