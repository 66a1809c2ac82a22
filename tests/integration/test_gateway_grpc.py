"""gRPC and HTTP/2 through the ingress gateway: ``kizuna up examples/grpc-echo`` plus a Gateway with a plain
HTTP server and a SIMPLE TLS server for ``echo.example.com``, and a VirtualService bound to it that routes calls
carrying ``x-version: v2`` (or a verified token whose ``groups`` claim holds ``group1``) to echo v2, all others
to v1. grpcio is the client, from the host: over h2c with
prior knowledge on the HTTP port, over TLS (ALPN h2) with the test CA on the HTTPS port; curl
``--http2-prior-knowledge`` shows plain HTTP/2 routing. A RequestAuthentication and a DENY AuthorizationPolicy
selecting the gateway make ``/echo.Echo/Deadline`` need a token: refusals arrive as gRPC statuses.
``kizuna explain --from istio-ingressgateway`` names the route the gateway takes.

The mesh takes a /24 of 127.108.0.0/16; the gateway listens on its ``.250`` address.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kizuna.testing.pki import issue, make_ca
from kizuna.testing.samples import ISTIO_SAMPLES

grpc = pytest.importorskip("grpc")

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "grpc-echo"
BLOCK = ipaddress.IPv4Network("127.108.0.0/16")
HTTP_PORT = 18780
HTTPS_PORT = 18743
HOST = "echo.example.com"
JWT_SAMPLES = ISTIO_SAMPLES / "security/tools/jwt/samples"


@dataclass
class GrpcMesh:
    state: Path
    address: str
    ca: Path
    kit: Any

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted((self.state / "logs").glob("*.log")))

    def kizuna(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        result: subprocess.CompletedProcess[str] = self.kit.run_kizuna(*args, "--state-dir", self.state, timeout=60)
        return result

    def plain(self) -> Any:
        """A grpcio channel to the gateway's HTTP port (h2c, prior knowledge), with ``:authority`` the host."""
        return grpc.insecure_channel(f"{self.address}:{HTTP_PORT}", options=[("grpc.default_authority", HOST),
                                                                              ("grpc.enable_http_proxy", 0)])

    def secure(self) -> Any:
        """A grpcio TLS channel to the gateway's HTTPS port, trusting the test CA, SNI and authority the host."""
        credentials = grpc.ssl_channel_credentials(root_certificates=self.ca.read_bytes())
        return grpc.secure_channel(f"{self.address}:{HTTPS_PORT}", credentials,
                                   options=[("grpc.ssl_target_name_override", HOST), ("grpc.enable_http_proxy", 0)])


def manifests(root: Path, server: tuple[Path, Path]) -> Path:
    cert, key = server
    path = root / "echo-gateway.yaml"
    path.write_text(textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {{name: echo-gateway}}
        spec:
          selector: {{istio: ingressgateway}}
          servers:
          - port: {{number: 80, name: http, protocol: HTTP}}
            hosts: [{HOST}]
          - port: {{number: 443, name: https, protocol: HTTPS}}
            hosts: [{HOST}]
            tls: {{mode: SIMPLE, serverCertificate: {cert}, privateKey: {key}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: echo-ingress}}
        spec:
          hosts: [{HOST}]
          gateways: [echo-gateway]
          http:
          - name: group1
            match: [{{headers: {{"@request.auth.claims.groups": {{exact: group1}}}}}}]
            route: [{{destination: {{host: echo, subset: v2, port: {{number: 50051}}}}}}]
          - name: v2
            match: [{{headers: {{x-version: {{exact: v2}}}}}}]
            route: [{{destination: {{host: echo, subset: v2, port: {{number: 50051}}}}}}]
          - name: v1
            route: [{{destination: {{host: echo, subset: v1, port: {{number: 50051}}}}}}]
        """))
    return path


@pytest.fixture(scope="module")
def mesh(kit: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcMesh]:
    from kizuna.runtime.addresses import choose_pod_range

    root = tmp_path_factory.mktemp("gateway-grpc")
    pki = root / "pki"
    pki.mkdir()
    ca = make_ca(pki, "test-root")
    server = issue(pki, ca, HOST, [HOST])
    state = root / "state"
    pods = choose_pod_range(str(state), block=BLOCK).network
    mesh = GrpcMesh(state, str(pods[250]), ca[2], kit)
    try:
        result = kit.run_kizuna("up", "--detach", "--state-dir", state, "--mode", "proxy", "--pod-cidr", str(pods),
                                "--prometheus", "off", "--dashboard", "off",
                                "--gateway-address", mesh.address, "--gateway-port", str(HTTP_PORT),
                                "--gateway-https-port", str(HTTPS_PORT), EXAMPLE / "grpc-echo.yaml",
                                EXAMPLE / "networking" / "destination-rule.yaml", manifests(root, server),
                                timeout=120)
        assert result.returncode == 0, f"kizuna up failed:\n{result.stdout}\n{result.stderr}\n{mesh.logs()}"
        yield mesh
    finally:
        kit.run_kizuna("down", "--state-dir", state, timeout=60)


def versions(channel: Any, count: int, metadata: tuple[tuple[str, str], ...] = ()) -> set[str]:
    """The versions that answered ``count`` Say calls on ``channel``."""
    say = channel.unary_unary("/echo.Echo/Say")
    return {say(b"hi", timeout=10, metadata=metadata).decode().split(":")[0] for _ in range(count)}


def wait_serving(mesh: GrpcMesh) -> None:
    """Until a call through the gateway reaches v1 (the gateway has its routes and endpoints)."""
    def ready() -> bool:
        with mesh.plain() as channel:
            try:
                return versions(channel, 1) == {"v1"}
            except grpc.RpcError:
                return False

    mesh.kit.wait_until(ready, 60, "gRPC through the gateway")


def test_grpc_over_h2c_is_routed_by_header_to_two_versions(mesh: GrpcMesh) -> None:
    wait_serving(mesh)
    with mesh.plain() as channel:
        assert versions(channel, 5) == {"v1"}
        assert versions(channel, 5, (("x-version", "v2"),)) == {"v2"}
        # One connection carries both routes: each stream is routed on its own.
        say = channel.unary_unary("/echo.Echo/Say")
        futures = [say.future(b"x", timeout=10, metadata=(("x-version", f"v{1 + i % 2}"),)) for i in range(10)]
        assert sorted(f.result().decode() for f in futures) == ["v1:x"] * 5 + ["v2:x"] * 5
    # The gateway logs each stream as the sidecars do: HTTP/2, its gRPC status, the cluster it went to.
    log = mesh.state / "logs" / "istio-ingressgateway-0.istio-system.access.log"

    def v2_entries() -> list[dict[str, Any]]:
        entries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return [e for e in entries if e["upstream_cluster"] == "outbound|50051|v2|echo.default.svc.cluster.local"]

    entry = mesh.kit.wait_until(v2_entries, 30, "the gateway's access log")[0]
    assert (entry["protocol"], entry["path"], entry["authority"], entry["grpc_status"]) == \
        ("HTTP/2", "/echo.Echo/Say", HOST, "0")


def test_grpc_over_tls_negotiates_h2_by_alpn(mesh: GrpcMesh) -> None:
    wait_serving(mesh)
    with mesh.secure() as channel:  # grpcio insists on ALPN h2: this call fails unless the gateway offers it
        assert versions(channel, 3) == {"v1"}
        assert versions(channel, 3, (("x-version", "v2"),)) == {"v2"}


def test_unknown_authority_is_unimplemented(mesh: GrpcMesh) -> None:
    wait_serving(mesh)
    with grpc.insecure_channel(f"{mesh.address}:{HTTP_PORT}",
                               options=[("grpc.default_authority", "other.example.com"),
                                        ("grpc.enable_http_proxy", 0)]) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/echo.Echo/Say")(b"hi", timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED  # no route (NR), as Envoy answers gRPC


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_http2_prior_knowledge_and_tls_alpn(mesh: GrpcMesh) -> None:
    wait_serving(mesh)
    # Plain HTTP/2 (no gRPC): a route's own answer is HTTP/2 too; a host the gateway does not serve is 404.
    result = subprocess.run(["curl", "-sS", "--max-time", "10", "--http2-prior-knowledge", "-o", "/dev/null",
                             "-w", "%{http_version} %{http_code}", "-H", "host: nowhere.example.com",
                             f"http://{mesh.address}:{HTTP_PORT}/"], capture_output=True, text=True, timeout=20)
    assert result.stdout == "2 404", result.stderr
    # Over TLS curl offers h2 and http/1.1; the gateway picks h2 and still serves HTTP/1.1 to who asks for it.
    for flag, version in (("--http2", "2"), ("--http1.1", "1.1")):
        result = subprocess.run(["curl", "-sS", "--max-time", "10", flag, "--cacert", str(mesh.ca), "--resolve",
                                 f"{HOST}:{HTTPS_PORT}:{mesh.address}", "-o", "/dev/null", "-w",
                                 "%{http_version} %{http_code}", "-H", "host: nowhere.example.com",
                                 f"https://{HOST}:{HTTPS_PORT}/"], capture_output=True, text=True, timeout=20)
        assert result.stdout.startswith(f"{version} "), (flag, result.stdout, result.stderr)


def test_explain_from_the_gateway_names_the_route(mesh: GrpcMesh) -> None:
    wait_serving(mesh)
    result = mesh.kizuna("explain", "--from", "istio-ingressgateway", f"http://{HOST}/echo.Echo/Say",
                         "-X", "POST", "-H", "x-version: v2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"request      POST {HOST}:8080/echo.Echo/Say"  # port 80 reaches listener 8080
    assert lines[1].startswith("from         istio-ingressgateway-0.istio-system (proxy config ")
    assert any(line.startswith("  matched    ") and "VirtualService default/echo-ingress" in line
               for line in lines), result.stdout
    assert any("outbound|50051|v2|echo.default.svc.cluster.local" in line for line in lines), result.stdout
    data = json.loads(mesh.kizuna("explain", "--from", "istio-ingressgateway", f"http://{HOST}:80/echo.Echo/Say",
                                  "-o", "json").stdout)
    assert data["from"] == "istio-ingressgateway-0.istio-system"
    assert [r["matched"] for r in data["routes"]] == [False, False, True]
    assert "the request has no verified JWT" in data["routes"][0]["reasons"][0]
    assert "header x-version is absent" in data["routes"][1]["reasons"][0]
    assert [d["subset"] for d in data["destinations"]] == ["v1"]
    # A host no Gateway-bound VirtualService serves: what the gateway answers (404) and exit status 1.
    missing = mesh.kizuna("explain", "--from", "istio-ingressgateway", "http://nowhere.example.com/")
    assert missing.returncode == 1 and "404 no route" in missing.stdout


@pytest.mark.skipif(not JWT_SAMPLES.is_dir(), reason="Istio sample corpus not present")
def test_jwt_policy_at_the_gateway_refuses_calls_with_grpc_statuses(mesh: GrpcMesh, tmp_path: Path) -> None:
    wait_serving(mesh)
    jwks = (JWT_SAMPLES / "jwks.json").read_text().strip()
    policy = tmp_path / "gateway-jwt.yaml"
    policy.write_text(textwrap.dedent(f"""\
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata: {{name: gateway-jwt, namespace: istio-system}}
        spec:
          selector: {{matchLabels: {{istio: ingressgateway}}}}
          jwtRules:
          - issuer: testing@secure.istio.io
            jwks: '{jwks}'
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: deadline-needs-a-token, namespace: istio-system}}
        spec:
          selector: {{matchLabels: {{istio: ingressgateway}}}}
          action: DENY
          rules:
          - from: [{{source: {{notRequestPrincipals: ["*"]}}}}]
            to: [{{operation: {{paths: [/echo.Echo/Deadline]}}}}]
        """))
    applied = mesh.kizuna("apply", "-f", policy)
    assert applied.returncode == 0, applied.stderr
    token = (JWT_SAMPLES / "demo.jwt").read_text().strip()
    try:
        with mesh.plain() as channel:
            deadline = channel.unary_unary("/echo.Echo/Deadline")

            def code(metadata: tuple[tuple[str, str], ...] = ()) -> Any:
                try:
                    deadline(b"", timeout=10, metadata=metadata)
                except grpc.RpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

            mesh.kit.wait_until(lambda: code() == grpc.StatusCode.PERMISSION_DENIED, 30, "the policy at the gateway")
            assert code((("authorization", f"Bearer {token}"),)) == grpc.StatusCode.OK
            assert code((("authorization", "Bearer deadbeef"),)) == grpc.StatusCode.UNAUTHENTICATED
            assert versions(channel, 2) == {"v1"}  # other methods need no token
            # The verified token's claims route each stream (Istio's JWT claim based routing at the gateway):
            # groups-scope.jwt holds group1 in its groups claim, demo.jwt has no groups claim.
            groups = (JWT_SAMPLES / "groups-scope.jwt").read_text().strip()
            assert versions(channel, 3, (("authorization", f"Bearer {groups}"),)) == {"v2"}
            assert versions(channel, 3, (("authorization", f"Bearer {token}"),)) == {"v1"}
    finally:
        mesh.kizuna("delete", "-f", policy)
