"""TLS origination (Istio's egress TLS origination task): the app sends plain HTTP to port 80 of an external
host, a VirtualService sends it to port 443, and a DestinationRule ``tls.mode`` SIMPLE (or MUTUAL) makes the
app's sidecar speak HTTPS to the upstream, verifying it against the test CA.

The "external" service is an HTTPS server in this test process on a 127.88.0.0/16 address, with a
certificate from a CA made here; it answers with what it saw (TLS server name, client certificate).
"""

from __future__ import annotations

import ipaddress
import json
import ssl
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kizuna.testing.pki import issue, make_ca

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SLEEP = REPO / "examples/httpbin/sleep.yaml"
BLOCK = ipaddress.IPv4Network("127.88.0.0/16")










class _Echo(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        conn = self.connection
        assert isinstance(conn, ssl.SSLSocket)
        peer = conn.getpeercert()
        rdns: Any = peer["subject"] if peer else ()
        subject = {str(k): str(v) for rdn in rdns for k, v in rdn}
        body = json.dumps({"path": self.path, "host": self.headers.get("host"),
                           "sni": getattr(conn, "sni", None), "client": subject.get("commonName")}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Setup:
    state: Path
    kit: Any

    def curl(self, url: str) -> tuple[str, str]:
        """``curl`` run as the sleep workload (plain HTTP through its sidecar): (status, body)."""
        result = self.kit.run_kizuna("exec", "--state-dir", self.state, "sleep", "--", "curl", "-s",
                                     "--max-time", "10", "-w", "\n%{http_code}", url)
        body, _, status = str(result.stdout).rpartition("\n")
        return status, body


def manifests(root: Path, address: str, port: int, ca: Path, client: tuple[Path, Path]) -> Path:
    path = root / "egress.yaml"
    docs = []
    for host, tls in (("secure.example.test", f"{{mode: SIMPLE, caCertificates: {ca}}}"),
                      ("mutual.example.test", f"{{mode: MUTUAL, caCertificates: {ca}, clientCertificate: {client[0]},"
                                              f" privateKey: {client[1]}}}"),
                      ("untrusted.example.test", "{mode: SIMPLE, sni: secure.example.test}"),
                      ("wrongsan.example.test", f"{{mode: SIMPLE, caCertificates: {ca}, sni: secure.example.test, "
                                                "subjectAltNames: [nobody.example.test]}"),
                      ("named.example.test", f"{{mode: SIMPLE, caCertificates: {ca}, sni: secure.example.test, "
                                             "subjectAltNames: [secure.example.test]}")):
        name = host.split(".")[0]
        docs.append(textwrap.dedent(f"""\
            apiVersion: networking.istio.io/v1
            kind: ServiceEntry
            metadata: {{name: {name}}}
            spec:
              hosts: [{host}]
              ports:
              - {{number: 80, name: http, protocol: HTTP}}
              - {{number: 443, name: https, protocol: HTTPS, targetPort: {port}}}
              resolution: STATIC
              location: MESH_EXTERNAL
              endpoints: [{{address: {address}}}]
            ---
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {{name: {name}}}
            spec:
              hosts: [{host}]
              http:
              - match: [{{port: 80}}]
                route: [{{destination: {{host: {host}, port: {{number: 443}}}}}}]
            ---
            apiVersion: networking.istio.io/v1
            kind: DestinationRule
            metadata: {{name: {name}}}
            spec:
              host: {host}
              trafficPolicy:
                portLevelSettings:
                - port: {{number: 443}}
                  tls: {tls}
            """))
    path.write_text("---\n".join(docs))
    return path


@pytest.fixture(scope="module")
def setup(kit: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    from kizuna.runtime.addresses import choose_pod_range

    root = tmp_path_factory.mktemp("tls-origination")
    pki = root / "pki"
    pki.mkdir()
    ca = make_ca(pki, "egress-root")
    server_cert, server_key = issue(pki, ca, "secure.example.test", ["secure.example.test", "mutual.example.test"])
    client = issue(pki, ca, "sleep-client", ["sleep.example.test"], client=True)
    state = root / "state"
    # Outside the mesh's pod range (up refuses a range where something listens): a range of its own, bound
    # before the mesh's range is chosen so the allocator sees it.
    address = str(choose_pod_range(str(root / "external"), block=BLOCK).network[10])

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_cert, server_key)
    context.load_verify_locations(ca[2])
    context.verify_mode = ssl.CERT_OPTIONAL

    def remember_sni(sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: ssl.SSLContext) -> None:
        sock.sni = name  # type: ignore[union-attr]  # the handler reads it back

    context.sni_callback = remember_sni
    server = ThreadingHTTPServer((address, 0), _Echo)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    pods = choose_pod_range(str(state), block=BLOCK).network
    try:
        result = kit.run_kizuna("up", "--detach", "--state-dir", state, "--mode", "proxy", "--pod-cidr", str(pods),
                                "--gateway", "off", SLEEP,
                                manifests(root, address, server.server_address[1], ca[2], client), timeout=120)
        assert result.returncode == 0, f"kizuna up failed:\n{result.stdout}\n{result.stderr}"
        yield Setup(state, kit)
    finally:
        kit.run_kizuna("down", "--state-dir", state, timeout=60)
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_simple_origination_verifies_the_upstream(setup: Setup) -> None:
    status, body = setup.curl("http://secure.example.test/headers")
    assert status == "200", body
    seen = json.loads(body)
    assert (seen["path"], seen["sni"], seen["client"]) == ("/headers", "secure.example.test", None)


def test_mutual_origination_presents_the_client_certificate(setup: Setup) -> None:
    status, body = setup.curl("http://mutual.example.test/get")
    assert status == "200", body
    seen = json.loads(body)
    assert (seen["sni"], seen["client"]) == ("mutual.example.test", "sleep-client")


def test_upstream_not_trusted_or_not_named_is_refused(setup: Setup) -> None:
    # No caCertificates: the system store does not know the test CA.
    status, body = setup.curl("http://untrusted.example.test/headers")
    assert status == "503", body
    status, body = setup.curl("http://wrongsan.example.test/headers")
    assert status == "503", body
    # subjectAltNames the certificate carries: accepted (with the sni given).
    status, body = setup.curl("http://named.example.test/headers")
    assert status == "200", body
    assert json.loads(body)["sni"] == "secure.example.test"
