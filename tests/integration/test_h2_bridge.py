"""HTTP/1.1 ↔ HTTP/2 translation at the inbound hop, chosen by the HTTP version the app's port declares.

(a) h2c client → client sidecar → server sidecar → HTTP/1.1-only app (``http_version="1.1"``).
(b) HTTP/1.1 client → client sidecar → server sidecar → h2c-only app (a grpcio server, ``http_version="2"``).
Each direction is also shown failing when the port does not declare its version, which is what a user of
an undeclared port would see.
"""

from __future__ import annotations

import http.client
import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest
from tests.integration.test_h2_policy import grpc_app, h2_requests

from kizuna.proxy.sidecar import Sidecar
from kizuna.proxyconfig.model import HttpVersion, InboundPort, RetryPolicy, Snapshot
from kizuna.testing.mesh import (
    BackgroundLoop,
    LocalMesh,
    loopback_addresses,
    service_cluster,
    simple_virtual_host,
)
from kizuna.testing.upstream import UpstreamServer

pytestmark = pytest.mark.integration


@dataclass
class Mesh:
    client: Sidecar
    server: Sidecar
    address: str
    web: UpstreamServer


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    client_addr, server_addr, app_addr = loopback_addresses(3, prefix="127.81")
    loop = BackgroundLoop()
    local = LocalMesh(loop)
    server, grpc_port = grpc_app(app_addr)
    try:
        web = local.upstream(app_addr, name="web")
        # Each app behind two inbound listeners of the server sidecar: one declaring the app's HTTP version,
        # one (a "-plain" twin on a port of its own) not declaring it.
        versions: list[tuple[str, int, int, HttpVersion]] = [("web", web.port, web.port, "1.1"),
                                                             ("echo", grpc_port, grpc_port, "2")]
        versions += [(f"{name}-plain", 20000 + app_port % 10000, app_port, "")
                     for name, _, app_port, _ in list(versions)]
        inbound = tuple(InboundPort(listen, app_addr, app_port, "http", http_version=version)
                        for _, listen, app_port, version in versions)
        clusters = tuple(service_cluster(name, 80, [(server_addr, listen)], protocol="http")
                         for name, listen, _, _ in versions)
        hosts = tuple(simple_virtual_host(name, 80, c.name, timeout=2.0, retry=RetryPolicy(attempts=0))
                      for (name, _, _, _), c in zip(versions, clusters, strict=True))
        # A destination without a sidecar (as a ServiceEntry's): the client sidecar itself speaks HTTP/1.1.
        base = service_cluster("external", 80, [(app_addr, web.port)], protocol="http")
        direct = replace(base, http_version="1.1")
        clusters += (direct,)
        hosts += (simple_virtual_host("external", 80, direct.name, retry=RetryPolicy(attempts=0)),)
        # ... and an h2c-only one (a gRPC ServiceEntry): the client sidecar itself speaks h2c to it.
        grpc_direct = replace(service_cluster("external-grpc", 80, [(app_addr, grpc_port)], protocol="http"),
                              http_version="2")
        clusters += (grpc_direct,)
        hosts += (simple_virtual_host("external-grpc", 80, grpc_direct.name, retry=RetryPolicy(attempts=0)),)
        server_sidecar = local.sidecar(server_addr, Snapshot("bridge-server", inbound=inbound))
        client = local.sidecar(client_addr, Snapshot("bridge-client", virtual_hosts=hosts, clusters=clusters))
        yield Mesh(client, server_sidecar, client_addr, web)
    finally:
        try:
            local.close()
        finally:
            server.stop(0)
            loop.close()


def _h2_get(mesh: Mesh, authority: str, path: str, body: bytes = b"") -> tuple[int, bytes, dict[str, str]]:
    answer = h2_requests(mesh.address, 15001, [([(":method", "POST" if body else "GET"), (":scheme", "http"),
                                                 (":authority", authority), (":path", path)], body)])[0]
    return answer.status, answer.body, answer.headers


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def _grpc_over_http11(mesh: Mesh, service: str, message: bytes) -> Reply:
    """A unary gRPC call written as a plain HTTP/1.1 POST (length-prefixed message, no trailers)."""
    conn = http.client.HTTPConnection(mesh.address, 15001, timeout=10)
    try:
        framed = b"\x00" + struct.pack(">I", len(message)) + message
        conn.request("POST", f"http://{service}/echo.Echo/Say", body=framed,
                     headers={"content-type": "application/grpc"})
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


def test_h2c_client_to_http11_app(mesh: Mesh) -> None:
    status, body, headers = _h2_get(mesh, "web", "/anything")
    assert status == 200
    assert b'"upstream": "web"' in body
    assert headers["x-upstream"] == "web"


def test_h2c_client_to_http11_destination_without_sidecar(mesh: Mesh) -> None:
    status, body, headers = _h2_get(mesh, "external", "/direct")
    assert status == 200
    assert b'"path": "/direct"' in body
    assert mesh.web.requests[-1].version == "HTTP/1.1"


def test_h2c_client_to_undeclared_http11_port_fails(mesh: Mesh) -> None:
    # Without a declared version the stream goes to the app as HTTP/2, which an HTTP/1.1 app cannot read.
    status, _, headers = _h2_get(mesh, "web-plain", "/anything")
    assert status in (502, 503)
    assert "x-kizuna-error" in headers


def test_large_bodies_cross_the_bridge_both_ways(mesh: Mesh) -> None:
    payload = bytes(range(256)) * 1200  # 300 KiB: several flow-control windows each way
    status, body, _ = _h2_get(mesh, "web", "/echo", payload)
    assert status == 200
    assert len(body) > len(payload)
    assert mesh.web.requests[-1].body == payload


def test_http11_client_to_h2c_only_grpc_app(mesh: Mesh) -> None:
    reply = _grpc_over_http11(mesh, "echo", b"hello")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/grpc"
    assert reply.body == b"\x00" + struct.pack(">I", 10) + b"grpc:hello"


def test_http11_client_to_h2c_only_destination_without_sidecar(mesh: Mesh) -> None:
    reply = _grpc_over_http11(mesh, "external-grpc", b"hello")
    assert reply.status == 200
    assert reply.body == b"\x00" + struct.pack(">I", 10) + b"grpc:hello"


def test_http11_client_to_h2c_app_gets_a_trailers_only_error_as_headers(mesh: Mesh) -> None:
    reply = _grpc_over_http11(mesh, "echo", b"fail")
    assert reply.status == 200
    assert reply.headers["grpc-status"] == "14"
    assert reply.headers["grpc-message"] == "asked to fail"


def test_http11_client_to_undeclared_h2c_port_fails(mesh: Mesh) -> None:
    # An h2c-only server cannot read HTTP/1.1: it closes, or never answers (then the route timeout does).
    reply = _grpc_over_http11(mesh, "echo-plain", b"hello")
    assert reply.status in (502, 503, 504)
