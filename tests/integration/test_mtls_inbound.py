"""Inbound mTLS detection on a real socket (uvloop, as the sidecar runs): TLS terminated with the peer's SPIFFE
identity handed to the serving protocol; plaintext served under PERMISSIVE and refused, with a readable
answer for HTTP, under STRICT; a client without a mesh certificate fails the handshake."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kizuna.controlplane.ca import CertificateAuthority
from kizuna.proxy.identity import Certificate, WorkloadIdentity
from kizuna.proxy.mtls import InboundMtls, MtlsMode
from kizuna.testing.mesh import BackgroundLoop, loopback_addresses

pytestmark = pytest.mark.integration


def workload(ca: CertificateAuthority, namespace: str, account: str) -> WorkloadIdentity:
    """An identity signed directly by ``ca`` (the CSR path through the control plane is tested elsewhere)."""
    identity = WorkloadIdentity(lambda: "", lambda: "", namespace, account, "")
    issued = ca.sign(identity.csr(), namespace, account, ca.credential(namespace, account))
    identity.install(Certificate(issued.identity, issued.cert_chain, issued.roots, issued.not_after))
    return identity


class Greeter(asyncio.Protocol):
    """Answers each chunk with who sent it (the peer identity the TLS layer reports, or plaintext)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peer_identity")
        self.who = peer.principal if peer is not None else "plaintext"

    def data_received(self, data: bytes) -> None:
        self.transport.write(f"{self.who}: ".encode() + data)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def bg() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    try:
        yield loop
    finally:
        for server in SERVERS:
            server.close()
            loop.run(server.wait_closed())
        loop.close()


SERVERS: list[asyncio.Server] = []


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("mesh"))


def listen(bg: BackgroundLoop, server: WorkloadIdentity, mode: MtlsMode, refused: list[str]) -> tuple[str, int]:
    (address,) = loopback_addresses(1, prefix="127.85")

    async def start() -> Any:
        return await asyncio.get_running_loop().create_server(
            lambda: InboundMtls(Greeter, server.server_context, mode, count=refused.append), address, 0)

    srv = bg.run(start())
    SERVERS.append(srv)
    return address, srv.sockets[0].getsockname()[1]


def talk(address: tuple[str, int], data: bytes, context: ssl.SSLContext | None = None) -> bytes:
    with socket.create_connection(address, timeout=5) as raw:
        if context is None:
            raw.sendall(data)
            return raw.recv(4096)
        with context.wrap_socket(raw, server_hostname="mesh") as sock:
            sock.sendall(data)
            return sock.recv(4096)


@pytest.mark.parametrize("mode", ["PERMISSIVE", "STRICT"])
def test_mesh_client_gets_through_with_its_identity(bg: BackgroundLoop, ca: CertificateAuthority,
                                                     mode: MtlsMode) -> None:
    server, client = workload(ca, "default", "httpbin"), workload(ca, "default", "sleep")
    address = listen(bg, server, mode, [])
    assert client.client_context is not None
    assert talk(address, b"hello", client.client_context) == b"cluster.local/ns/default/sa/sleep: hello"


def test_plaintext_is_served_under_permissive_and_refused_readably_under_strict(
        bg: BackgroundLoop, ca: CertificateAuthority) -> None:
    server = workload(ca, "default", "httpbin")
    refused: list[str] = []
    assert talk(listen(bg, server, "PERMISSIVE", refused), b"hello") == b"plaintext: hello"
    strict = listen(bg, server, "STRICT", refused)
    answer = talk(strict, b"GET / HTTP/1.1\r\nHost: httpbin\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 403 ") and b"x-kizuna-error: mTLS required" in answer
    assert b"PeerAuthentication STRICT" in answer
    assert talk(strict, b"\x00\x01binary") == b""  # not HTTP: closed
    assert refused == ["cx_plaintext", "cx_plaintext_refused", "cx_plaintext_refused"]


def test_client_from_another_mesh_fails_the_handshake(bg: BackgroundLoop, ca: CertificateAuthority,
                                                      tmp_path: Path) -> None:
    server = workload(ca, "default", "httpbin")
    stranger = workload(CertificateAuthority.load_or_create(tmp_path), "default", "sleep")
    address = listen(bg, server, "STRICT", [])
    assert stranger.client_context is not None
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        talk(address, b"hello", stranger.client_context)
    no_cert = ssl.create_default_context()
    no_cert.check_hostname = False
    no_cert.verify_mode = ssl.CERT_NONE
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        talk(address, b"hello", no_cert)


class AlpnReporter(asyncio.Protocol):
    """Answers with the inner protocol the client named in ALPN."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(str(self.transport.get_extra_info("alpn")).encode())  # type: ignore[attr-defined]


@pytest.mark.parametrize("inner", ["http/1.1", "h2", "kizuna-tcp"])
def test_alpn_carries_the_inner_protocol(bg: BackgroundLoop, ca: CertificateAuthority, inner: str) -> None:
    server, client = workload(ca, "default", "httpbin"), workload(ca, "default", "sleep")
    (address,) = loopback_addresses(1, prefix="127.85")

    async def start() -> Any:
        return await asyncio.get_running_loop().create_server(
            lambda: InboundMtls(AlpnReporter, server.server_context, "STRICT"), address, 0)

    srv = bg.run(start())
    SERVERS.append(srv)
    context = client.context(inner)
    assert context is not None
    assert talk((address, srv.sockets[0].getsockname()[1]), b"?", context) == inner.encode()
