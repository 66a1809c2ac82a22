"""Secure naming and the inbound TLS floor, between real sidecars on loopback.

Both workloads hold valid certificates from the same CA, but the endpoint the client's snapshot names is meant
to run as another service account: the client sidecar refuses the connection after the handshake (503, flag UF)
and says which SPIFFE identity it expected and which one the server presented. And a client that can only
speak TLS 1.1 cannot complete a handshake with a sidecar's inbound (TLS 1.2 is the minimum).
"""

from __future__ import annotations

import dataclasses
import http.client
import socket
import ssl
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kizuna.controlplane.ca import CertificateAuthority
from kizuna.proxy.identity import Certificate, WorkloadIdentity
from kizuna.proxyconfig.security import PeerAuthentication, SecurityPolicy
from kizuna.testing.mesh import BackgroundLoop, LocalMesh, loopback_addresses, two_hop_snapshots

pytestmark = pytest.mark.integration

EXPECTED = "cluster.local/ns/default/sa/httpbin"
PRESENTED = "cluster.local/ns/default/sa/impostor"


def workload(ca: CertificateAuthority, account: str) -> WorkloadIdentity:
    """A certificate for ``default/<account>`` signed by ``ca`` (the CSR path is tested elsewhere)."""
    identity = WorkloadIdentity(lambda: "", lambda: "", "default", account, "")
    issued = ca.sign(identity.csr(), "default", account, ca.credential("default", account))
    identity.install(Certificate(issued.identity, issued.cert_chain, issued.roots, issued.not_after))
    return identity


async def _use(sidecar: Any, identity: WorkloadIdentity) -> None:
    sidecar._use_identity(identity)


class Pair:
    """A client sidecar whose only endpoint (``httpbin:80``) is the server sidecar, in front of an app."""

    def __init__(self, client: str, server: str, app_port: int, local: LocalMesh) -> None:
        self.client, self.server, self.app_port, self.local = client, server, app_port, local

    def get(self, path: str) -> tuple[int, dict[str, str], str]:
        conn = http.client.HTTPConnection(self.client, 15001, timeout=20)
        try:
            conn.request("GET", f"http://httpbin{path}")
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read().decode()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    ca = CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca"))
    client_addr, server_addr, app_addr = loopback_addresses(3, prefix="127.103")
    loop = BackgroundLoop()
    local = LocalMesh(loop)
    try:
        app = local.upstream(app_addr, 0, name="httpbin")
        client_snap, server_snap = two_hop_snapshots(client_addr, server_addr, app_addr, app.port, service="httpbin")
        # What the control plane compiles for an endpoint of httpbin: its sidecar must be httpbin's identity.
        client_snap = dataclasses.replace(client_snap, clusters=tuple(
            dataclasses.replace(c, endpoints=tuple(dataclasses.replace(e, identity=EXPECTED) for e in c.endpoints))
            for c in client_snap.clusters))
        server_snap = dataclasses.replace(
            server_snap, security=SecurityPolicy(PeerAuthentication("STRICT", source="istio-system/default")))
        server_side = local.sidecar(server_addr, server_snap, pod_address=app_addr)
        client_side = local.sidecar(client_addr, client_snap)
        # The server holds a perfectly valid certificate from the same CA, for another service account.
        loop.run(_use(server_side, workload(ca, "impostor")))
        loop.run(_use(client_side, workload(ca, "sleep")))
        yield Pair(client_addr, server_addr, app.port, local)
    finally:
        try:
            local.close()
        finally:
            loop.close()


def test_client_refuses_an_endpoint_presenting_another_identity(pair: Pair) -> None:
    status, headers, body = pair.get("/get")
    assert status == 503
    assert "UF" in headers["x-kizuna-flags"].split(",")
    reason = headers["x-kizuna-error"] + " " + body
    assert f"spiffe://{EXPECTED}" in reason and f"spiffe://{PRESENTED}" in reason, reason
    client = next(s for s in pair.local.sidecars if s.bootstrap.node.mesh_address == pair.client)
    assert any(f"spiffe://{PRESENTED}" in e for e in client.stats.errors), client.stats.errors
    server = next(s for s in pair.local.sidecars if s.bootstrap.node.mesh_address == pair.server)
    assert server.stats.inbound_rq_total == 0  # nothing reached the impostor's app


def tls11_only(context: ssl.SSLContext) -> ssl.SSLContext:
    """``context`` limited to TLS 1.1, at the security level that still allows it (OpenSSL 3 refuses it by
    default); raises ValueError or ssl.SSLError where this ssl cannot."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is deprecated, which is the point
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def offers_tls_1_1(client: ssl.SSLContext, identity: WorkloadIdentity, tmp: Path) -> bool:
    """Whether ``client`` completes a TLS 1.1 handshake with a plain Python server that allows TLS 1.1."""
    assert identity.certificate is not None
    (tmp / "chain.pem").write_text(identity.certificate.cert_chain)
    (tmp / "key.pem").write_text(identity.key)
    server = tls11_only(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    server.load_cert_chain(tmp / "chain.pem", tmp / "key.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    version: list[str | None] = []

    def accept() -> None:
        conn, _ = listener.accept()
        try:
            with server.wrap_socket(conn, server_side=True) as tls:
                version.append(tls.version())
        except (ssl.SSLError, OSError):
            version.append(None)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as raw, client.wrap_socket(raw) as tls:
            ok = tls.version() == "TLSv1.1"
    except (ssl.SSLError, OSError):
        ok = False
    finally:
        thread.join(10)
        listener.close()
    return ok


def test_a_tls_1_1_client_cannot_handshake_with_the_inbound(pair: Pair, tmp_path: Path) -> None:
    sidecar = next(s for s in pair.local.sidecars if s.bootstrap.node.mesh_address == pair.server)
    assert sidecar.identity is not None
    try:
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE
        client = tls11_only(client)
        able = offers_tls_1_1(client, sidecar.identity, tmp_path)
    except (ValueError, ssl.SSLError) as exc:
        pytest.skip(f"this Python's ssl cannot offer TLS 1.1 ({exc})")
    if not able:
        pytest.skip("this Python's ssl cannot complete a TLS 1.1 handshake even with a server allowing it")
    with socket.create_connection((pair.server, pair.app_port), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)) as failure:
            with client.wrap_socket(raw) as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                tls.recv(100)
    assert not isinstance(failure.value, ssl.SSLError) or "version" in str(failure.value).lower(), failure.value
    assert sidecar.stats.inbound_rq_total == 0
