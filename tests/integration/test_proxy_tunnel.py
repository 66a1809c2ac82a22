"""Raw byte traffic through sidecars: WebSocket-style upgrades, CONNECT tunnels, opaque TCP and sniffing."""

from __future__ import annotations

import socket
import time

import pytest

from kizuna.proxy.sidecar import Sidecar
from kizuna.proxyconfig.model import InboundPort, Protocol, Snapshot
from kizuna.testing.mesh import (
    LocalMesh,
    loopback_addresses,
    read_replies,
    service_cluster,
    simple_virtual_host,
)

pytestmark = pytest.mark.integration

PORT = 7000


def server_sidecar(mesh: LocalMesh, app_addr: str, app_port: int, protocol: Protocol) -> tuple[Sidecar, str]:
    (addr,) = loopback_addresses(1)
    sidecar = mesh.sidecar(addr, Snapshot("s", inbound=(InboundPort(PORT, app_addr, app_port, protocol),)))
    return sidecar, addr


def client_sidecar(mesh: LocalMesh, service: str, server_addr: str, protocol: Protocol = "http") -> str:
    (addr,) = loopback_addresses(1)
    cluster = service_cluster(service, 80, [(server_addr, PORT)], protocol=protocol)
    vh = simple_virtual_host(service, 80, cluster.name, protocol=protocol)
    mesh.sidecar(addr, Snapshot("c", virtual_hosts=(vh,), clusters=(cluster,)))
    return addr


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def test_websocket_upgrade_becomes_a_raw_relay_across_two_sidecars(mesh: LocalMesh) -> None:
    (app_addr,) = loopback_addresses(1)
    app = mesh.upstream(app_addr, name="ws")
    _, server_addr = server_sidecar(mesh, app_addr, app.port, "auto")
    client_addr = client_sidecar(mesh, "chat", server_addr)
    with socket.create_connection((client_addr, 15001), timeout=10) as sock:
        sock.sendall(b"GET http://chat/ws HTTP/1.1\r\nHost: chat\r\nConnection: Upgrade\r\n"
                     b"Upgrade: websocket\r\n"
                     b"Sec-WebSocket-Key: abc\r\n\r\nfirst-frame")
        head = read_head(sock)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"upgrade: websocket" in head.lower()
        assert recv_exactly(sock, 11) == b"first-frame"  # sent along with the head, echoed after the switch
        for message in (b"ping", b"\x00\xffbinary\r\n\r\n", b"x" * 200_000):
            sock.sendall(message)
            assert recv_exactly(sock, len(message)) == message
    seen = app.requests[-1]
    assert seen.header("upgrade") == "websocket" and seen.header("sec-websocket-key") == "abc"


def test_refused_upgrade_is_an_ordinary_response(mesh: LocalMesh) -> None:
    (app_addr,) = loopback_addresses(1)
    app = mesh.upstream(app_addr, name="plain")
    _, server_addr = server_sidecar(mesh, app_addr, app.port, "http")
    client_addr = client_sidecar(mesh, "plain", server_addr)
    with socket.create_connection((client_addr, 15001), timeout=10) as sock:
        sock.sendall(b"GET http://plain/bytes/3 HTTP/1.1\r\nHost: plain\r\nConnection: Upgrade\r\n"
                     b"Upgrade: h2c\r\n\r\n")
        (reply,) = read_replies(sock, 1)
        assert reply.status == 200 and reply.body == b"xxx"


def test_connect_tunnels_to_an_http_service(mesh: LocalMesh) -> None:
    (app_addr,) = loopback_addresses(1)
    app = mesh.upstream(app_addr, name="app")
    _, server_addr = server_sidecar(mesh, app_addr, app.port, "auto")
    client_addr = client_sidecar(mesh, "web", server_addr)
    with socket.create_connection((client_addr, 15001), timeout=10) as sock:
        sock.sendall(b"CONNECT web:80 HTTP/1.1\r\nHost: web:80\r\n\r\n")
        assert read_head(sock) == b"HTTP/1.1 200 Connection established\r\n\r\n"
        # web:80 is an HTTP port: the client sidecar answers the CONNECT itself and routes each request sent
        # inside the tunnel, as if it had come to its outbound listener.
        sock.sendall(b"GET /bytes/5 HTTP/1.1\r\nHost: web\r\n\r\nGET /bytes/3 HTTP/1.1\r\nHost: web\r\n\r\n")
        replies = read_replies(sock, 2)
        assert [(r.status, r.body) for r in replies] == [(200, b"xxxxx"), (200, b"xxx")]


def test_connect_carries_opaque_bytes_such_as_tls(mesh: LocalMesh) -> None:
    (app_addr,) = loopback_addresses(1)
    echo = mesh.echo(app_addr)
    _, server_addr = server_sidecar(mesh, app_addr, echo.port, "auto")
    client_addr = client_sidecar(mesh, "secure", server_addr, protocol="tcp")
    hello = bytes.fromhex("160301020001000200fc0303") + bytes(range(64))
    with socket.create_connection((client_addr, 15001), timeout=10) as sock:
        sock.sendall(b"CONNECT secure.default.svc.cluster.local:80 HTTP/1.1\r\nHost: secure:80\r\n\r\n"
                     + hello)
        assert read_head(sock) == b"HTTP/1.1 200 Connection established\r\n\r\n"
        assert recv_exactly(sock, len(hello)) == hello


def test_connect_to_an_unknown_service_is_404(mesh: LocalMesh) -> None:
    (addr,) = loopback_addresses(1)
    mesh.sidecar(addr, Snapshot("empty"))
    with socket.create_connection((addr, 15001), timeout=10) as sock:
        sock.sendall(b"CONNECT nowhere:443 HTTP/1.1\r\nHost: nowhere:443\r\n\r\n")
        (reply,) = read_replies(sock, 1)
        assert reply.status == 404 and reply.headers["x-kizuna-error"] == "no route"
        assert sock.recv(1) == b""


def test_auto_detection_relays_a_client_first_non_http_protocol(mesh: LocalMesh) -> None:
    (app_addr,) = loopback_addresses(1)
    echo = mesh.echo(app_addr)
    sidecar, addr = server_sidecar(mesh, app_addr, echo.port, "auto")
    redis_ping = b"*1\r\n$4\r\nPING\r\n"
    with socket.create_connection((addr, PORT), timeout=10) as sock:
        sock.sendall(redis_ping)
        assert recv_exactly(sock, len(redis_ping)) == redis_ping
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")  # once opaque, always opaque
        assert recv_exactly(sock, 18) == b"GET / HTTP/1.1\r\n\r\n"
    assert sidecar.stats.inbound_rq_total == 0


def test_auto_detection_gives_a_server_first_protocol_its_greeting(mesh: LocalMesh) -> None:
    (app_addr,) = loopback_addresses(1)
    echo = mesh.echo(app_addr, greeting=b"220 smtp.example ready\r\n")
    _, addr = server_sidecar(mesh, app_addr, echo.port, "auto")
    with socket.create_connection((addr, PORT), timeout=10) as sock:
        start = time.monotonic()
        assert recv_exactly(sock, 24) == b"220 smtp.example ready\r\n"
        assert time.monotonic() - start < 1.0  # after the bounded sniffing wait, not never
        sock.sendall(b"QUIT\r\n")
        assert recv_exactly(sock, 6) == b"QUIT\r\n"


def test_auto_detection_proxies_http(mesh: LocalMesh) -> None:
    (app_addr,) = loopback_addresses(1)
    app = mesh.upstream(app_addr, name="app")
    sidecar, addr = server_sidecar(mesh, app_addr, app.port, "auto")
    with socket.create_connection((addr, PORT), timeout=10) as sock:
        sock.sendall(b"GET /by")  # the first bytes alone do not decide it
        time.sleep(0.02)
        sock.sendall(b"tes/2 HTTP/1.1\r\nHost: app\r\n\r\n")
        (reply,) = read_replies(sock, 1)
    assert reply.body == b"xx" and reply.headers["x-upstream"] == "app"
    assert sidecar.stats.inbound_rq[PORT][0] == 1


def test_tcp_port_relays_both_ways_with_half_close(mesh: LocalMesh) -> None:
    (app_addr,) = loopback_addresses(1)
    echo = mesh.echo(app_addr)
    sidecar, addr = server_sidecar(mesh, app_addr, echo.port, "tcp")
    payload = bytes(range(256)) * 4096  # 1 MiB, more than any buffer on the way
    with socket.create_connection((addr, PORT), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received == payload  # everything echoed, then the app's FIN came through
    assert sidecar.stats.tcp_cx_total == 2


def test_inbound_to_a_dead_app_closes_the_tcp_connection(mesh: LocalMesh) -> None:
    (dead,) = loopback_addresses(1)
    _, addr = server_sidecar(mesh, dead, 9, "tcp")
    with socket.create_connection((addr, PORT), timeout=10) as sock:
        assert sock.recv(1) == b""
