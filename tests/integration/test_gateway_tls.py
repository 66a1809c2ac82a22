"""Istio's "Secure Gateways" task with kizuna: the ingress gateway terminates TLS (SIMPLE and MUTUAL), picks
the certificate by SNI, and passes TLS through by SNI; ``curl`` from the host is the client.

Certificates come from a CA made here with ``cryptography``. The mesh uses 127.88.0.0/16 (the runtime's
allocator picks its pod range there); the gateway listens on the mesh's ``.250`` address.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import ssl
import subprocess
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kizuna.testing.pki import issue, make_ca

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")]

REPO = Path(__file__).resolve().parents[2]
HTTPBIN = REPO / "examples/httpbin/httpbin.yaml"
BLOCK = ipaddress.IPv4Network("127.88.0.0/16")
HTTP_PORT = 18180
HTTPS_PORT = 18443
PASSTHROUGH_PORT = 18444
TCP_TLS_PORT = 18446










@dataclass
class Pki:
    ca: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


@dataclass
class TlsMesh:
    state: Path
    address: str
    pki: Pki
    kit: Any
    issue_server: Any = None
    """``issue_server(cn)`` → (certificate, key) files for httpbin.example.com from the test CA."""
    server_files: tuple[Path, Path] | None = None

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                         for p in sorted((self.state / "logs").glob("*.log")))

    def curl(self, host: str, path: str = "/headers", *extra: str | Path, port: int = HTTPS_PORT,
             ca: Path | None = None) -> subprocess.CompletedProcess[str]:
        """``curl https://host:port/path`` resolved to the gateway, trusting the test CA."""
        return subprocess.run(
            ["curl", "-sS", "--max-time", "10", "--cacert", str(ca or self.pki.ca), "--resolve",
             f"{host}:{port}:{self.address}", "-o", "-", "-w", "\n%{http_code}",
             *(str(e) for e in extra), f"https://{host}:{port}{path}"],
            capture_output=True, text=True, timeout=20)


class _Backend(BaseHTTPRequestHandler):
    """The TLS backend behind the passthrough server: says it terminated the TLS itself."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = b"TLS ended at the backend\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def manifests(root: Path, pki_dir: Path, server: tuple[Path, Path], backend: tuple[str, int],
              tcp_server: tuple[Path, Path]) -> Path:
    cert, key = server
    path = root / "secure-gateway.yaml"
    path.write_text(textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {{name: secure}}
        spec:
          selector: {{istio: ingressgateway}}
          servers:
          - port: {{number: 443, name: https-simple, protocol: HTTPS}}
            hosts: [httpbin.example.com]
            tls: {{mode: SIMPLE, serverCertificate: {cert}, privateKey: {key}}}
          - port: {{number: 443, name: https-mutual, protocol: HTTPS}}
            hosts: [mtls.example.com]
            tls: {{mode: MUTUAL, credentialName: mtls-credential, minProtocolVersion: TLSV1_2}}
          - port: {{number: 80, name: http, protocol: HTTP}}
            hosts: [httpbin.example.com]
            tls: {{httpsRedirect: true}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: httpbin}}
        spec:
          hosts: [httpbin.example.com, mtls.example.com]
          gateways: [secure]
          http: [{{route: [{{destination: {{host: httpbin, port: {{number: 8000}}}}}}]}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {{name: passthrough}}
        spec:
          selector: {{istio: ingressgateway}}
          servers:
          - port: {{number: {PASSTHROUGH_PORT}, name: tls, protocol: TLS}}
            hosts: [passthrough.example.com]
            tls: {{mode: PASSTHROUGH}}
        ---
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: backend}}
        spec:
          hosts: [passthrough.example.com]
          ports: [{{number: 443, name: tls, protocol: TLS, targetPort: {backend[1]}}}]
          resolution: STATIC
          endpoints: [{{address: {backend[0]}}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: passthrough}}
        spec:
          hosts: [passthrough.example.com]
          gateways: [passthrough]
          tls:
          - match: [{{port: {PASSTHROUGH_PORT}, sniHosts: [passthrough.example.com]}}]
            route: [{{destination: {{host: passthrough.example.com, port: {{number: 443}}}}}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {{name: tcp-tls}}
        spec:
          selector: {{istio: ingressgateway}}
          servers:
          - port: {{number: {TCP_TLS_PORT}, name: tls-tcp, protocol: TLS}}
            hosts: [tcp.example.com]
            tls: {{mode: SIMPLE, serverCertificate: {tcp_server[0]}, privateKey: {tcp_server[1]}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: tcp-tls}}
        spec:
          hosts: [tcp.example.com]
          gateways: [tcp-tls]
          tcp: [{{route: [{{destination: {{host: httpbin, port: {{number: 8000}}}}}}]}}]
        """))
    return path


@pytest.fixture(scope="module")
def mesh(kit: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsMesh]:
    from kizuna.runtime.addresses import choose_pod_range

    root = tmp_path_factory.mktemp("gateway-tls")
    pki_dir = root / "pki"
    pki_dir.mkdir()
    ca = make_ca(pki_dir, "test-root")
    stranger_ca = make_ca(pki_dir, "stranger-root")
    server = issue(pki_dir, ca, "httpbin.example.com", ["httpbin.example.com"])
    tcp_server = issue(pki_dir, ca, "tcp.example.com", ["tcp.example.com"])
    client = issue(pki_dir, ca, "client", ["client.example.com"], client=True)
    stranger = issue(pki_dir, stranger_ca, "stranger", ["client.example.com"], client=True)
    # credentialName: Istio's secret keys as files under <state>/credentials/<name>/.
    state = root / "state"
    credential = state / "credentials" / "mtls-credential"
    credential.mkdir(parents=True)
    mtls_cert, mtls_key = issue(pki_dir, ca, "mtls.example.com", ["mtls.example.com"])
    shutil.copy(mtls_cert, credential / "tls.crt")
    shutil.copy(mtls_key, credential / "tls.key")
    shutil.copy(ca[2], credential / "ca.crt")
    # The passthrough backend: an HTTPS server outside the mesh's pod range, with its own certificate. It
    # listens before the mesh's range is chosen, so the allocator sees it and picks another range.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*issue(pki_dir, ca, "passthrough.example.com", ["passthrough.example.com"]))
    backend = ThreadingHTTPServer((str(choose_pod_range(str(root / "backend"), block=BLOCK).network[10]), 0),
                                  _Backend)
    backend.socket = context.wrap_socket(backend.socket, server_side=True)
    thread = threading.Thread(target=backend.serve_forever, daemon=True)
    thread.start()
    pods = choose_pod_range(str(state), block=BLOCK).network
    address = str(pods[250])
    mesh = TlsMesh(state, address, Pki(ca[2], *client, *stranger), kit,
                   lambda cn: issue(pki_dir, ca, cn, ["httpbin.example.com"]), server)
    where = (str(backend.server_address[0]), int(backend.server_address[1]))
    try:
        result = kit.run_kizuna("up", "--detach", "--state-dir", state, "--mode", "proxy", "--pod-cidr", str(pods),
                                "--gateway-address", address, "--gateway-port", str(HTTP_PORT),
                                "--gateway-https-port", str(HTTPS_PORT), HTTPBIN,
                                manifests(root, pki_dir, server, where, tcp_server), timeout=120)
        assert result.returncode == 0, f"kizuna up failed:\n{result.stdout}\n{result.stderr}\n{mesh.logs()}"
        yield mesh
    finally:
        kit.run_kizuna("down", "--state-dir", state, timeout=60)
        backend.shutdown()
        backend.server_close()
        thread.join(timeout=5)


def _status(result: subprocess.CompletedProcess[str]) -> int:
    return int(result.stdout.rsplit("\n", 1)[-1] or 0)


def test_simple_tls_terminates_at_the_gateway(mesh: TlsMesh) -> None:
    result = mesh.curl("httpbin.example.com")
    assert result.returncode == 0 and _status(result) == 200, (result.stderr, mesh.logs())
    body = json.loads(result.stdout.rsplit("\n", 1)[0])
    assert body["headers"]["Host"] == f"httpbin.example.com:{HTTPS_PORT}"


def test_the_app_learns_the_client_used_https(mesh: TlsMesh) -> None:
    # Envoy's x-forwarded-proto at the edge: the scheme the client reached the gateway with, over HTTP/1.1 and
    # HTTP/2 alike, whatever the client claimed.
    for flag in ("--http1.1", "--http2"):
        # show_env: httpbin hides proxy headers otherwise.
        result = mesh.curl("httpbin.example.com", "/headers?show_env=1", flag, "-H", "X-Forwarded-Proto: http")
        assert result.returncode == 0 and _status(result) == 200, (flag, result.stdout, result.stderr)
        body = json.loads(result.stdout.rsplit("\n", 1)[0])
        assert body["headers"].get("X-Forwarded-Proto") == "https", (flag, body["headers"])


def test_sni_picks_the_servers_certificate(mesh: TlsMesh) -> None:
    # curl checks the certificate is for the name it asked: each host gets its own server's certificate.
    ok = mesh.curl("mtls.example.com", "/status/418", "--cert", mesh.pki.client_cert, "--key", mesh.pki.client_key)
    assert ok.returncode == 0 and _status(ok) == 418, (ok.stderr, mesh.logs())
    wrong_ca = mesh.curl("httpbin.example.com", ca=mesh.pki.stranger_cert)
    assert wrong_ca.returncode != 0  # the server is not trusted by an unrelated CA


def test_mutual_requires_a_client_certificate_from_its_ca(mesh: TlsMesh) -> None:
    anonymous = mesh.curl("mtls.example.com")
    assert anonymous.returncode != 0 and _status(anonymous) == 0, anonymous.stdout
    stranger = mesh.curl("mtls.example.com", "/headers", "--cert", mesh.pki.stranger_cert,
                         "--key", mesh.pki.stranger_key)
    assert stranger.returncode != 0 and _status(stranger) == 0, stranger.stdout
    signed = mesh.curl("mtls.example.com", "/headers", "--cert", mesh.pki.client_cert, "--key", mesh.pki.client_key)
    assert signed.returncode == 0 and _status(signed) == 200, (signed.stderr, mesh.logs())


def test_https_servers_offer_h2_and_http11_by_alpn(mesh: TlsMesh) -> None:
    # As Istio's gateway: a client offering h2 gets HTTP/2 (SIMPLE and MUTUAL alike), one asking only for
    # http/1.1 gets HTTP/1.1; the route is the same either way.
    client = ("--cert", mesh.pki.client_cert, "--key", mesh.pki.client_key)
    for host, extra in (("httpbin.example.com", ()), ("mtls.example.com", client)):
        for flag, version in (("--http2", "2"), ("--http1.1", "1.1")):
            result = mesh.curl(host, "/status/418", flag, *extra, "-w", "\n%{http_version} %{http_code}")
            assert result.stdout.rsplit("\n", 1)[-1] == f"{version} 418", (host, flag, result.stderr)


def test_passthrough_routes_by_sni_to_the_backends_tls(mesh: TlsMesh) -> None:
    result = mesh.curl("passthrough.example.com", "/", port=PASSTHROUGH_PORT)
    assert result.returncode == 0 and _status(result) == 200, (result.stderr, mesh.logs())
    assert result.stdout.startswith("TLS ended at the backend")  # the backend's certificate, checked by curl
    other = mesh.curl("nobody.example.com", "/", port=PASSTHROUGH_PORT)
    assert other.returncode != 0  # no tls route for that SNI: the connection is closed


def test_tls_server_terminates_then_relays_tcp(mesh: TlsMesh) -> None:
    # protocol TLS, mode SIMPLE: the gateway ends TLS and relays the bytes (here HTTP) along the tcp route.
    result = mesh.curl("tcp.example.com", "/status/203", port=TCP_TLS_PORT)
    assert result.returncode == 0 and _status(result) == 203, (result.stderr, mesh.logs())


def test_plain_http_is_redirected_to_https(mesh: TlsMesh) -> None:
    result = subprocess.run(["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                             "-H", "Host: httpbin.example.com", f"http://{mesh.address}:{HTTP_PORT}/headers"],
                            capture_output=True, text=True, timeout=20)
    assert result.stdout == "301 https://httpbin.example.com/headers", result.stderr


def test_status_shows_the_https_port(mesh: TlsMesh) -> None:
    result = mesh.kit.run_kizuna("status", "--state-dir", mesh.state)
    assert result.returncode == 0, result.stderr
    assert f"https://{mesh.address}:{HTTPS_PORT}" in result.stdout


def test_unreadable_certificate_is_refused_and_the_old_config_keeps_serving(mesh: TlsMesh, tmp_path: Path) -> None:
    bad = tmp_path / "bad-gateway.yaml"
    bad.write_text(textwrap.dedent("""\
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {name: broken}
        spec:
          selector: {istio: ingressgateway}
          servers:
          - port: {number: 18445, name: https, protocol: HTTPS}
            hosts: [broken.example.com]
            tls: {mode: SIMPLE, serverCertificate: /nonexistent/broken.crt, privateKey: /nonexistent/broken.key}
        """))
    kizuna = mesh.kit.run_kizuna
    assert kizuna("apply", "--state-dir", mesh.state, "-f", bad).returncode == 0

    def gateway_row() -> str:
        out = kizuna("status", "--state-dir", mesh.state).stdout
        return next((line for line in out.splitlines() if line.startswith("istio-ingressgateway")), "")

    try:
        row = mesh.kit.wait_until(lambda: "rejected" in (r := gateway_row()) and r, 10, "the gateway's NACK")
        assert "cannot load certificate /nonexistent/broken.crt" in row
        ok = mesh.curl("httpbin.example.com", "/status/200")
        assert ok.returncode == 0 and _status(ok) == 200  # the previous listeners and certificates stay
    finally:
        assert kizuna("delete", "--state-dir", mesh.state, "-f", bad).returncode == 0
    mesh.kit.wait_until(lambda: "rejected" not in gateway_row(), 10, "the gateway to take the config again")


def test_rotated_certificate_files_are_served_without_a_push(mesh: TlsMesh) -> None:
    def subject() -> str:
        result = mesh.curl("httpbin.example.com", "/status/200", "-v")
        assert result.returncode == 0, result.stderr
        return next(line for line in result.stderr.splitlines() if "subject:" in line)

    assert "CN=httpbin.example.com" in subject()
    assert mesh.server_files is not None
    new_cert, new_key = mesh.issue_server("httpbin-rotated")
    cert, key = mesh.server_files
    # Written in place, as a certificate manager renewing files does (the key first: a moment of mismatch).
    key.write_bytes(new_key.read_bytes())
    cert.write_bytes(new_cert.read_bytes())
    mesh.kit.wait_until(lambda: "CN=httpbin-rotated" in subject(), 10, "the rotated certificate", interval=0.2)
