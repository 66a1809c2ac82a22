"""gRPC (HTTP/2 streams on a pooled upstream connection) between two sidecars under PeerAuthentication STRICT:
the h2 upstream is mutual TLS like the HTTP/1.1 one, so a grpcio call succeeds and the server sidecar counts an
mTLS connection; a plaintext h2c client dialling the server sidecar directly is refused."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import grpc
import pytest
from tests.integration.test_h2_policy import grpc_app

from kizuna.controlplane.ca import CertificateAuthority
from kizuna.proxy.identity import Certificate, WorkloadIdentity
from kizuna.proxyconfig.model import InboundPort
from kizuna.proxyconfig.security import PeerAuthentication, SecurityPolicy
from kizuna.testing.mesh import BackgroundLoop, LocalMesh, loopback_addresses, two_hop_snapshots

pytestmark = pytest.mark.integration


def workload(ca: CertificateAuthority, account: str) -> WorkloadIdentity:
    identity = WorkloadIdentity(lambda: "", lambda: "", "default", account, "")
    issued = ca.sign(identity.csr(), "default", account, ca.credential("default", account))
    identity.install(Certificate(issued.identity, issued.cert_chain, issued.roots, issued.not_after))
    return identity


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, int, LocalMesh]]:
    ca = CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca"))
    client_addr, server_addr, app_addr = loopback_addresses(3, prefix="127.89")
    loop = BackgroundLoop()
    local = LocalMesh(loop)
    server, port = grpc_app(app_addr)
    try:
        client_snap, server_snap = two_hop_snapshots(client_addr, server_addr, app_addr, port, service="echo")
        identity = "cluster.local/ns/default/sa/echo"
        client_snap = dataclasses.replace(client_snap, clusters=tuple(
            dataclasses.replace(c, endpoints=tuple(dataclasses.replace(e, identity=identity) for e in c.endpoints))
            for c in client_snap.clusters))
        server_snap = dataclasses.replace(
            server_snap, inbound=(InboundPort(port, app_addr, port, "http", http_version="2"),),
            security=SecurityPolicy(PeerAuthentication("STRICT", source="istio-system/default")))
        server_side = local.sidecar(server_addr, server_snap, pod_address=app_addr)
        client_side = local.sidecar(client_addr, client_snap)
        for sidecar, account in ((server_side, "echo"), (client_side, "sleep")):
            loop.run(_use(sidecar, workload(ca, account)))
        yield client_addr, server_addr, port, local
    finally:
        try:
            local.close()
        finally:
            server.stop(0)
            loop.close()


async def _use(sidecar: object, identity: WorkloadIdentity) -> None:
    sidecar._use_identity(identity)  # type: ignore[attr-defined]


def call(target: str, authority: str) -> bytes:
    with grpc.insecure_channel(target, options=[("grpc.default_authority", authority),
                                                ("grpc.enable_http_proxy", 0)]) as channel:
        say = channel.unary_unary("/echo.Echo/Say", request_serializer=None, response_deserializer=None)
        return bytes(say(b"hello", timeout=5))


def test_grpc_between_sidecars_is_mtls_under_strict(setup: tuple[str, str, int, LocalMesh]) -> None:
    client_addr, server_addr, port, local = setup
    assert call(f"{client_addr}:15001", "echo:80") == b"grpc:hello"
    server_side = next(s for s in local.sidecars if s.bootstrap.node.mesh_address == server_addr)
    assert server_side.stats.security.get("cx_mtls", 0) >= 1
    with pytest.raises(grpc.RpcError):
        call(f"{server_addr}:{port}", "echo:80")  # plaintext h2c straight to the STRICT sidecar
    assert server_side.stats.security.get("cx_plaintext_refused", 0) >= 1
