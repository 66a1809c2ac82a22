"""A mesh in its own trust domain on a plugged-in CA (``kizuna up --trust-domain example.org --cacerts DIR``):
workloads get ``spiffe://example.org/...`` certificates from Istio's ``cacerts`` intermediate, chaining to its
root; mesh traffic is mTLS; a peer with a certificate from that same root but in another trust domain is
refused; and ``cluster.local`` in a policy's principals means the mesh's own domain, as in Istio.

The test plays a peer itself: it signs certificates under the plugged intermediate (it holds the cacerts
files, as an operator would) and talks mTLS straight to httpbin's sidecar.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import ssl
import textwrap
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kizuna.testing import pki

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "httpbin"
BLOCK = ipaddress.IPv4Network("127.106.0.0/18")
DOMAIN = "example.org"
Mesh = Any


class Pki:
    """The plugged CA's files, and the intermediate's key for signing test peers."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.signer = pki.make_cacerts(folder / "cacerts")
        self.root = self.folder / "root-cert.pem"
        self.dir = folder

    def peer(self, identity: str, name: str) -> ssl.SSLContext:
        """A client context presenting ``identity`` (signed by the plugged intermediate), verifying the server
        against the plugged root."""
        cert, key = pki.issue_spiffe(self.dir, self.signer, identity, name)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False  # mesh certificates name a SPIFFE identity, not a host
        context.load_verify_locations(cafile=str(self.root))
        context.load_cert_chain(str(cert), str(key))
        context.set_alpn_protocols(["http/1.1"])
        return context


@pytest.fixture(scope="module")
def plugged(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mesh(mesh_factory: Callable[..., Mesh], plugged: Pki, tmp_path_factory: pytest.TempPathFactory) -> Mesh:
    from kizuna.runtime.addresses import choose_pod_range

    pods = choose_pod_range(str(tmp_path_factory.mktemp("seed")), block=BLOCK).network
    return mesh_factory(EXAMPLE / "httpbin.yaml", EXAMPLE / "sleep.yaml",
                        extra=["--pod-cidr", str(pods), "--trust-domain", DOMAIN, "--cacerts", str(plugged.folder)])


def admin(address: str, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{address}:15000{path}", timeout=10) as response:
        data: dict[str, Any] = json.load(response)
    return data


def identity_of(mesh: Mesh, kit: Any, name: str) -> str:
    address = mesh.instance(name)["meshAddress"]
    return str(kit.wait_until(lambda: admin(address, "/config_dump").get("identity", {}).get("identity"), 30,
                              f"{name}'s certificate"))


def direct(mesh: Mesh, context: ssl.SSLContext, path: str = "/headers") -> tuple[int, str, str]:
    """GET ``path`` from httpbin-v1's sidecar over mTLS as the test's own peer: (status, body, server SAN)."""
    address = mesh.instance("httpbin-v1")["meshAddress"]
    with socket.create_connection((address, 8080), timeout=10) as raw, \
            context.wrap_socket(raw) as tls:
        sans = [str(v) for k, v in (tls.getpeercert() or {}).get("subjectAltName", ()) if k == "URI"]
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: httpbin\r\nConnection: close\r\n\r\n".encode())
        response = http.client.HTTPResponse(tls)  # type: ignore[arg-type]
        response.begin()
        return response.status, response.read().decode(), ",".join(sans)


def via_sleep(mesh: Mesh, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(mesh.instance("sleep")["meshAddress"], 15001, timeout=10)
    try:
        conn.request("GET", f"http://httpbin:8000{path}")
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_workload_certificates_are_in_the_trust_domain_and_chain_to_the_plugged_root(
        mesh: Mesh, kit: Any, plugged: Pki) -> None:
    assert identity_of(mesh, kit, "sleep") == f"spiffe://{DOMAIN}/ns/default/sa/sleep"
    assert identity_of(mesh, kit, "httpbin-v1") == f"spiffe://{DOMAIN}/ns/default/sa/httpbin"
    # The handshake verifies httpbin's chain against the plugged root only (the test's context trusts
    # nothing else), and the sidecar accepts the test's peer from that root in the mesh's trust domain.
    status, body, server = direct(mesh, plugged.peer(f"spiffe://{DOMAIN}/ns/default/sa/tester", "tester"))
    assert (status, server) == (200, f"spiffe://{DOMAIN}/ns/default/sa/httpbin")
    assert json.loads(body)["headers"]["X-Forwarded-Client-Cert"] == (
        f"By=spiffe://{DOMAIN}/ns/default/sa/httpbin;URI=spiffe://{DOMAIN}/ns/default/sa/tester")


def test_mesh_traffic_is_mutual_tls_between_identities_of_the_domain(mesh: Mesh, kit: Any) -> None:
    identity_of(mesh, kit, "sleep")
    identity_of(mesh, kit, "httpbin-v1")
    identity_of(mesh, kit, "httpbin-v2")
    status, body = via_sleep(mesh, "/headers")
    assert status == 200
    assert json.loads(body)["headers"]["X-Forwarded-Client-Cert"].endswith(
        f";URI=spiffe://{DOMAIN}/ns/default/sa/sleep")


def test_a_peer_from_the_same_root_in_another_trust_domain_is_refused(mesh: Mesh, kit: Any, plugged: Pki) -> None:
    identity_of(mesh, kit, "httpbin-v1")
    stranger = plugged.peer("spiffe://cluster.local/ns/default/sa/sleep", "stranger")
    with pytest.raises((ConnectionError, ssl.SSLError, http.client.HTTPException)):
        direct(mesh, stranger)
    stats = admin(mesh.instance("httpbin-v1")["meshAddress"], "/stats")
    assert stats.get("security", {}).get("cx_mtls", 0) >= 1  # it was mTLS, refused after the handshake


def test_cluster_local_in_a_policy_means_the_mesh_trust_domain(mesh: Mesh, kit: Any, plugged: Pki,
                                                               tmp_path: Path) -> None:
    identity_of(mesh, kit, "sleep")
    policy = tmp_path / "allow-sleep.yaml"
    policy.write_text(textwrap.dedent("""\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: allow-sleep, namespace: default}
        spec:
          selector: {matchLabels: {app: httpbin}}
          action: ALLOW
          rules:
          - from:
            - source: {principals: ["cluster.local/ns/default/sa/sleep"]}
        """))
    intruder = plugged.peer(f"spiffe://{DOMAIN}/ns/default/sa/intruder", "intruder")
    assert mesh.kizuna("apply", "-f", policy).returncode == 0
    try:
        kit.wait_until(lambda: direct(mesh, intruder)[0] == 403, 30, "the policy to deny other identities")
        assert via_sleep(mesh, "/get")[0] == 200
    finally:
        assert mesh.kizuna("delete", "-f", policy).returncode == 0
