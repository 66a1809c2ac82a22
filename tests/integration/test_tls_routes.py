"""TLS routes: opaque TLS connections routed by the SNI of their ClientHello (``tls[].match.sniHosts``),
the TLS itself passed through untouched; a connection no SNI route takes falls to the ``tcp[]`` route.

The capture port is served on a real listener whose connections carry a fixed original destination (what
``SO_ORIGINAL_DST`` reports behind iptables); the client sends a real ClientHello (Python's ssl); each
backend greets with its name, so the greeting read back says where the connection went.
"""

from __future__ import annotations

import socket
import ssl
import textwrap

import pytest

from kizuna.api import parse_all, parse_text
from kizuna.controlplane.compile import compile_snapshot
from kizuna.proxyconfig.bootstrap import Node
from kizuna.testing.mesh import LocalMesh, loopback_addresses

pytestmark = pytest.mark.integration


def client_hello(server_name: str | None) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def first_bytes(address: tuple[str, int], data: bytes) -> bytes:
    """The backend's greeting line, after sending ``data``."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.settimeout(5)
        sock.sendall(data)
        return sock.recv(65536).partition(b"\n")[0] + b"\n"


def test_tls_connections_are_routed_by_sni_with_tcp_fallback(mesh: LocalMesh) -> None:
    vip, a, b, c = loopback_addresses(4, prefix="127.90")
    backends = {name: mesh.echo(addr, 0, greeting=name.encode() + b"\n")
                for name, addr in (("api", a), ("wild", b), ("fallback", c))}
    entries = "".join(textwrap.dedent(f"""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {{name: {name}}}
    spec:
      hosts: [{name}.backend.test]
      ports: [{{number: 443, name: tls, protocol: TLS, targetPort: {server.port}}}]
      resolution: STATIC
      endpoints: [{{address: {server.address}}}]
    ---
    """) for name, server in backends.items())
    yaml = entries + textwrap.dedent(f"""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {{name: front}}
    spec:
      hosts: [front.example.test]
      addresses: [{vip}]
      ports: [{{number: 443, name: tls, protocol: TLS}}]
      resolution: DNS
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {{name: front}}
    spec:
      hosts: [front.example.test]
      tls:
      - match: [{{port: 443, sniHosts: [api.example.test]}}]
        route: [{{destination: {{host: api.backend.test, port: {{number: 443}}}}}}]
      - match: [{{port: 443, sniHosts: ["*.example.test"]}}]
        route: [{{destination: {{host: wild.backend.test, port: {{number: 443}}}}}}]
      tcp:
      - route: [{{destination: {{host: fallback.backend.test, port: {{number: 443}}}}}}]
    """)
    node = Node("sleep-0.default", "sleep", labels=(("app", "sleep"),))
    snapshot = compile_snapshot(parse_all(parse_text(yaml, "tls.yaml")), [], node, "1")
    front = next(v for v in snapshot.virtual_hosts if v.name == "front.example.test:443")
    assert [m.sni_hosts for r in front.routes for m in r.matches] == [("api.example.test",), ("*.example.test",)]

    listener = mesh.captured(snapshot, (vip, 443))
    assert first_bytes(listener, client_hello("api.example.test")) == b"api\n"
    assert first_bytes(listener, client_hello("Other.Example.Test")) == b"wild\n"
    assert first_bytes(listener, client_hello("elsewhere.test")) == b"fallback\n"
    assert first_bytes(listener, client_hello(None)) == b"fallback\n"
    # The ClientHello reached the backend unchanged (passthrough): the echo sends it back after the greeting.
    hello = client_hello("api.example.test")
    with socket.create_connection(listener, timeout=5) as sock:
        sock.settimeout(5)
        sock.sendall(hello)
        got = b""
        while len(got) < len(b"api\n") + len(hello):
            chunk = sock.recv(65536)
            assert chunk
            got += chunk
    assert got == b"api\n" + hello
