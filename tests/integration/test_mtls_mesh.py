"""Automatic mTLS end to end (proxy mode, real ``kizuna up``): every sidecar obtains its certificate from the
control plane's CA, sidecar-to-sidecar traffic is mutual TLS with the client's identity visible to the app
(``x-forwarded-client-cert``), and PeerAuthentication STRICT refuses plaintext with a readable answer while
mesh traffic carries on."""

from __future__ import annotations

import http.client
import json
import textwrap
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "httpbin"
Mesh = Any


@pytest.fixture(scope="module")
def mesh(mesh_factory: Callable[..., Mesh]) -> Mesh:
    return mesh_factory(EXAMPLE / "httpbin.yaml", EXAMPLE / "sleep.yaml")


def admin(address: str, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{address}:15000{path}", timeout=5) as response:
        data: dict[str, Any] = json.load(response)
    return data


def via_sleep(mesh: Mesh, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(mesh.instance("sleep")["meshAddress"], 15001, timeout=10)
    try:
        conn.request("GET", f"http://httpbin:8000{path}")
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_sidecars_hold_certificates_for_their_service_accounts(mesh: Mesh, kit: Any) -> None:
    for name, account in (("sleep", "sleep"), ("httpbin-v1", "httpbin")):
        address = mesh.instance(name)["meshAddress"]
        identity = kit.wait_until(lambda a=address: admin(a, "/config_dump").get("identity", {}).get("identity"),
                                  10, f"{name}'s certificate")
        assert identity == f"spiffe://cluster.local/ns/default/sa/{account}"


def mtls_accepted(mesh: Mesh) -> int:
    """mTLS connections accepted by the sidecars of httpbin v1 and v2 (the Service balances over both)."""
    return sum(admin(mesh.instance(name)["meshAddress"], "/stats").get("security", {}).get("cx_mtls", 0)
               for name in ("httpbin-v1", "httpbin-v2"))


def test_mesh_traffic_is_mutual_tls_and_the_app_sees_the_client(mesh: Mesh, kit: Any) -> None:
    kit.wait_until(lambda: admin(mesh.instance("sleep")["meshAddress"], "/config_dump").get("identity"), 10,
                   "sleep's certificate")
    before = mtls_accepted(mesh)
    status, body = via_sleep(mesh, "/headers")
    assert status == 200
    xfcc = json.loads(body)["headers"]["X-Forwarded-Client-Cert"]
    assert xfcc == ("By=spiffe://cluster.local/ns/default/sa/httpbin;"
                    "URI=spiffe://cluster.local/ns/default/sa/sleep")
    assert mtls_accepted(mesh) > before


def test_strict_refuses_plaintext_readably_and_mesh_traffic_carries_on(mesh: Mesh, kit: Any,
                                                                       tmp_path: Path) -> None:
    server = mesh.instance("httpbin-v1")["meshAddress"]

    def plaintext() -> tuple[int, str]:
        conn = http.client.HTTPConnection(server, 8080, timeout=10)
        try:
            conn.request("GET", "/get", headers={"x-forwarded-client-cert": "URI=spiffe://forged"})
            response = conn.getresponse()
            return response.status, response.getheader("x-kizuna-error", "") + response.read().decode()
        finally:
            conn.close()

    status, body = plaintext()  # PERMISSIVE (the default): served, and the forged header does not arrive
    assert status == 200 and "forged" not in body
    strict = tmp_path / "strict.yaml"
    strict.write_text(textwrap.dedent("""\
    apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: {name: default, namespace: istio-system}
    spec: {mtls: {mode: STRICT}}
    """))
    assert mesh.kizuna("apply", "-f", strict).returncode == 0
    try:
        kit.wait_until(lambda: plaintext()[0] == 403, 10, "STRICT to reach httpbin's sidecar")
        status, body = plaintext()
        assert "mTLS required" in body and "istio-system/default STRICT" in body
        for _ in range(20):
            assert via_sleep(mesh, "/get")[0] == 200
    finally:
        assert mesh.kizuna("delete", "-f", strict).returncode == 0


def test_the_control_plane_api_is_tls_with_its_own_identity(mesh: Mesh, tmp_path: Path) -> None:
    import ssl

    from kizuna.controlplane.ca import CertificateAuthority
    from kizuna.controlplane.client import ApiError, ControlPlaneClient

    record = json.loads((mesh.state / "controlplane.json").read_text())
    assert record["tls"] is True
    host, _, port = record["address"].rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)  # plain HTTP is not spoken there
    try:
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            conn.request("GET", "/v1/status")
            conn.getresponse()
    finally:
        conn.close()
    client = ControlPlaneClient.from_state_dir(mesh.state)
    assert {p["id"] for p in client.status()["proxies"]} >= {"sleep-0.default", "httpbin-v1-0.default"}
    # A client trusting another CA refuses the control plane's certificate.
    other = CertificateAuthority.load_or_create(tmp_path / "other")
    (tmp_path / "bundle.pem").write_text(other.roots_pem())
    strange = ssl.create_default_context(cafile=str(tmp_path / "bundle.pem"))
    strange.check_hostname = False
    with pytest.raises(ApiError):
        ControlPlaneClient(record["address"], client.token, mesh.state, tls=strange).status()


def test_a_sidecar_certificate_speaks_only_for_its_own_workload(mesh: Mesh, tmp_path: Path) -> None:
    """A discovery stream presenting sleep's certificate may not register as httpbin: it gets no config."""
    import socket
    import ssl

    from kizuna.controlplane.ca import CertificateAuthority
    from kizuna.controlplane.token import read_token
    from kizuna.proxy.identity import Certificate, WorkloadIdentity
    from kizuna.proxyconfig.bootstrap import Node
    from kizuna.proxyconfig.xds import DISCOVERY_PATH, UPGRADE_TOKEN, Hello, encode

    ca = CertificateAuthority.load_or_create(mesh.state)
    sleep = WorkloadIdentity(lambda: "", lambda: "", "default", "sleep", "")
    issued = ca.sign(sleep.csr(), "default", "sleep", ca.credential("default", "sleep"))
    sleep.install(Certificate(issued.identity, issued.cert_chain, issued.roots, issued.not_after))
    context = sleep.context()
    assert context is not None
    host, _, port = json.loads((mesh.state / "controlplane.json").read_text())["address"].rpartition(":")
    token = read_token(mesh.state / "token")

    def first_message(node: Node) -> bytes:
        with socket.create_connection((host, int(port)), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname="controlplane") as tls:
            tls.sendall(f"GET {DISCOVERY_PATH} HTTP/1.1\r\nHost: cp\r\nConnection: Upgrade\r\n"
                        f"Upgrade: {UPGRADE_TOKEN}\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += tls.recv(4096)
            assert head.startswith(b"HTTP/1.1 101"), head
            tls.sendall(encode(Hello(node)))
            tls.settimeout(3)
            try:
                return head.partition(b"\r\n\r\n")[2] or tls.recv(65536)
            except (TimeoutError, ssl.SSLError, ConnectionError):
                return b""

    own = Node("sleep-9.default", "sleep", "default", "sleep", (("app", "sleep"),), "127.0.0.1", "127.0.0.1")
    stolen = Node("httpbin-9.default", "httpbin-v1", "default", "httpbin", (("app", "httpbin"),),
                  "127.0.0.1", "127.0.0.1")
    assert b"push" in first_message(own).lower()  # its own workload: a config comes
    assert first_message(stolen) == b""  # another workload's: the stream is closed
    sleep.close()
