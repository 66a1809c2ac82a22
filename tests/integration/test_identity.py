"""Workload identity end to end: a real control plane's CA signs sidecar CSRs for the identity the bootstrap
credential grants (and no other), certificates renew on their own, and mTLS handshakes between two workloads
carry their SPIFFE identities; a certificate from another CA is refused."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from kizuna.controlplane.ca import CertificateAuthority
from kizuna.controlplane.files import read_address_file
from kizuna.controlplane.main import serve
from kizuna.controlplane.token import load_or_create_token
from kizuna.proxy.identity import Certificate, WorkloadIdentity, peer_identity

pytestmark = pytest.mark.integration


async def with_control_plane(state: Path, body: Callable[[str, str], Awaitable[Any]], **options: Any) -> Any:
    """Run a control plane on loopback for ``body(address, token)``."""
    stop = asyncio.Event()
    task = asyncio.create_task(serve(state, "127.0.0.1:0", stop=stop, **options))
    try:
        for _ in range(200):
            data = read_address_file(state)
            if data is not None:
                break
            await asyncio.sleep(0.02)
        assert data is not None, "the control plane did not start"
        return await body(str(data["address"]), load_or_create_token(state))
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 10) == 0


def identity(state: Path, address: str, token: str, namespace: str, account: str,
             credential_for: tuple[str, str] | None = None) -> WorkloadIdentity:
    ca = CertificateAuthority.load_or_create(state)
    ns, sa = credential_for or (namespace, account)
    return WorkloadIdentity(lambda: address, lambda: token, namespace, account, ca.credential(ns, sa))


def test_a_workload_gets_its_own_identity_and_no_other(tmp_path: Path) -> None:
    async def body(address: str, token: str) -> None:
        mine = identity(tmp_path, address, token, "default", "sleep")
        try:
            cert = await mine.obtain()
            leaf = x509.load_pem_x509_certificates(cert.cert_chain.encode())[0]
            sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
                "spiffe://cluster.local/ns/default/sa/sleep"]
            lifetime = cert.not_after - time.time()
            assert 23.9 * 3600 < lifetime <= 24 * 3600  # Istio's default workload certificate TTL
        finally:
            mine.close()
        # The credential of "sleep" cannot buy the identity of "httpbin".
        thief = identity(tmp_path, address, token, "default", "httpbin", credential_for=("default", "sleep"))
        try:
            with pytest.raises(PermissionError, match="does not grant"):
                await thief.obtain()
        finally:
            thief.close()

    asyncio.run(with_control_plane(tmp_path, body))
    key = tmp_path / "ca" / "root-key.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "ca" / "bootstrap-secret").stat().st_mode & 0o777 == 0o600


async def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[Any, Any]:
    """One TLS handshake on loopback: (what the server saw of the client, what the client saw of the server)."""
    seen: dict[str, Any] = {}
    done = asyncio.Event()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen["client"] = peer_identity(writer.get_extra_info("peercert"))
        writer.write(b"ok")
        await writer.drain()
        writer.close()
        done.set()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx,
                                                       server_hostname="outbound")
        server_peer = peer_identity(writer.get_extra_info("peercert"))
        assert await reader.read() == b"ok"
        writer.close()
        await asyncio.wait_for(done.wait(), 5)
        return seen["client"], server_peer
    finally:
        server.close()
        await server.wait_closed()


def test_mtls_between_two_workloads_names_both_and_rejects_another_ca(tmp_path: Path) -> None:
    async def body(address: str, token: str) -> None:
        server = identity(tmp_path / "mesh", address, token, "default", "httpbin")
        client = identity(tmp_path / "mesh", address, token, "default", "sleep")
        try:
            await server.obtain()
            await client.obtain()
            assert server.server_context is not None and client.client_context is not None
            seen_client, seen_server = await handshake(server.server_context, client.client_context)
            assert seen_client.principal == "cluster.local/ns/default/sa/sleep"
            assert (seen_server.namespace, seen_server.service_account) == ("default", "httpbin")
            # A workload certified by another mesh's CA is refused by both sides.
            other_ca = CertificateAuthority.load_or_create(tmp_path / "other")
            stranger = WorkloadIdentity(lambda: address, lambda: token, "default", "sleep", "")
            issued = other_ca.sign(stranger.csr(), "default", "sleep", other_ca.credential("default", "sleep"))
            stranger.install(Certificate(issued.identity, issued.cert_chain, issued.roots, issued.not_after))
            assert stranger.client_context is not None and stranger.server_context is not None
            with pytest.raises((ssl.SSLError, ConnectionResetError)):
                await handshake(server.server_context, stranger.client_context)
            with pytest.raises((ssl.SSLError, ConnectionResetError)):
                await handshake(stranger.server_context, client.client_context)
            stranger.close()
        finally:
            server.close()
            client.close()

    (tmp_path / "mesh").mkdir()
    asyncio.run(with_control_plane(tmp_path / "mesh", body))


def test_certificates_renew_at_half_life(tmp_path: Path) -> None:
    async def body(address: str, token: str) -> None:
        workload = identity(tmp_path, address, token, "default", "sleep")
        try:
            await workload.start()
            first = workload.certificate
            assert first is not None and first.not_after - time.time() <= 2.0
            deadline = time.monotonic() + 6
            while workload.renewals < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert workload.renewals >= 2, workload.to_json()
            assert workload.certificate is not None and workload.certificate.not_after > first.not_after
        finally:
            workload.close()

    asyncio.run(with_control_plane(tmp_path, body, workload_cert_ttl=2.0))
