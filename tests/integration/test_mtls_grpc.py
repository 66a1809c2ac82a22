"""gRPC (HTTP/2 streams on a pooled upstream connection) between two sidecars under PeerAuthentication STRICT:
the h2 upstream is mutual TLS like the HTTP/1.1 one, so a grpcio call succeeds and the server sidecar counts an
mTLS connection; a plaintext h2c client dialling the server sidecar directly is refused."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from kizuna.controlplane.ca import CertificateAuthority
from kizuna.proxy.identity import Certificate, WorkloadIdentity
from kizuna.proxyconfig.model import InboundPort
from kizuna.proxyconfig.security import PeerAuthentication, SecurityPolicy
from kizuna.testing.mesh import BackgroundLoop, LocalMesh, loopback_addresses, two_hop_snapshots

pytestmark = pytest.mark.integration


def _say(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"grpc:" + request


def _client_cert(request: bytes, context: grpc.ServicerContext) -> bytes:
    """The ``x-forwarded-client-cert`` values the app received, one per line."""
    return "\n".join(v for k, v in context.invocation_metadata() if k == "x-forwarded-client-cert").encode()


def grpc_app(address: str) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("echo.Echo", {
        "Say": grpc.unary_unary_rpc_method_handler(_say),
        "ClientCert": grpc.unary_unary_rpc_method_handler(_client_cert)}),))
    port = server.add_insecure_port(f"{address}:0")
    server.start()
    return server, port


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


def call(target: str, authority: str, method: str = "Say", metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
    with grpc.insecure_channel(target, options=[("grpc.default_authority", authority),
                                                ("grpc.enable_http_proxy", 0)]) as channel:
        say = channel.unary_unary(f"/echo.Echo/{method}", request_serializer=None, response_deserializer=None)
        return bytes(say(b"hello", timeout=5, metadata=metadata))


def test_grpc_between_sidecars_is_mtls_under_strict(setup: tuple[str, str, int, LocalMesh]) -> None:
    client_addr, server_addr, port, local = setup
    assert call(f"{client_addr}:15001", "echo:80") == b"grpc:hello"
    server_side = next(s for s in local.sidecars if s.bootstrap.node.mesh_address == server_addr)
    assert server_side.stats.security.get("cx_mtls", 0) >= 1
    with pytest.raises(grpc.RpcError):
        call(f"{server_addr}:{port}", "echo:80")  # plaintext h2c straight to the STRICT sidecar
    assert server_side.stats.security.get("cx_plaintext_refused", 0) >= 1


def test_the_app_learns_the_grpc_callers_identity_and_not_a_forged_one(
        setup: tuple[str, str, int, LocalMesh]) -> None:
    client_addr, _, _, _ = setup
    forged = (("x-forwarded-client-cert", "URI=spiffe://cluster.local/ns/default/sa/admin"),)
    seen = call(f"{client_addr}:15001", "echo:80", "ClientCert", forged).decode()
    # Envoy's SANITIZE_SET, as on HTTP/1.1: the caller's own header is dropped, the mTLS peer's is set.
    assert seen == "By=spiffe://cluster.local/ns/default/sa/echo;URI=spiffe://cluster.local/ns/default/sa/sleep"


def test_a_plaintext_connection_from_before_strict_gets_no_more_streams(
        setup: tuple[str, str, int, LocalMesh]) -> None:
    _, server_addr, port, local = setup
    server_side = next(s for s in local.sidecars if s.bootstrap.node.mesh_address == server_addr)
    strict = server_side.state.snapshot
    permissive = dataclasses.replace(strict, version="permissive", security=SecurityPolicy(
        PeerAuthentication("PERMISSIVE", source="istio-system/default")))
    local.apply(server_side, permissive)
    try:
        with grpc.insecure_channel(f"{server_addr}:{port}", options=[("grpc.enable_http_proxy", 0)]) as channel:
            say = channel.unary_unary("/echo.Echo/Say", request_serializer=None, response_deserializer=None)
            assert bytes(say(b"early", timeout=5)) == b"grpc:early"  # plaintext h2c accepted under PERMISSIVE
            local.apply(server_side, strict)
            # The same connection's next stream is refused, as a new plaintext connection would be.
            with pytest.raises(grpc.RpcError) as refused:
                say(b"late", timeout=5)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, refused.value
    finally:
        local.apply(server_side, strict)
