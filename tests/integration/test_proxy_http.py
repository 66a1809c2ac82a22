"""HTTP/1.1 through two real sidecars: client → outbound sidecar → inbound sidecar → app, on loopback."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kizuna.proxy.sidecar import Sidecar
from kizuna.proxyconfig.model import Snapshot
from kizuna.testing.mesh import (
    LocalMesh,
    loopback_addresses,
    read_replies,
    service_cluster,
    simple_virtual_host,
    two_hop_snapshots,
)
from kizuna.testing.upstream import UpstreamServer

pytestmark = pytest.mark.integration

APP_PORT = 8080
SERVICE_PORT = 8000
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@pytest.fixture
def clients() -> Iterator[list[http.client.HTTPConnection]]:
    opened: list[http.client.HTTPConnection] = []
    try:
        yield opened
    finally:
        for conn in opened:
            conn.close()


@dataclass
class TwoHop:
    client: Sidecar
    server: Sidecar
    app: UpstreamServer
    client_addr: str
    server_addr: str
    clients: list[http.client.HTTPConnection]

    @property
    def proxy(self) -> tuple[str, int]:
        return self.client_addr, 15001

    def connect(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(*self.proxy, timeout=10)
        self.clients.append(conn)
        return conn

    def raw(self) -> socket.socket:
        return socket.create_connection(self.proxy, timeout=10)


@pytest.fixture
def hop(mesh: LocalMesh, clients: list[http.client.HTTPConnection]) -> TwoHop:
    client_addr, server_addr, app_addr = loopback_addresses(3)
    app = mesh.upstream(app_addr, APP_PORT, name="app")
    client_snap, server_snap = two_hop_snapshots(client_addr, server_addr, app_addr, APP_PORT,
                                                 service="httpbin", port=SERVICE_PORT,
                                                 inbound_protocol="auto")
    server = mesh.sidecar(server_addr, server_snap)
    client = mesh.sidecar(client_addr, client_snap)
    return TwoHop(client, server, app, client_addr, server_addr, clients)


def curl(hop: TwoHop, *args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("curl") is None:
        pytest.skip("needs curl (Debian package curl)")
    return subprocess.run(["curl", "-sS", "--max-time", "10", "--proxy", f"http://{hop.client_addr}:15001",
                           *args], capture_output=True, text=True, timeout=20)


def test_request_crosses_both_sidecars_with_host_kept_and_a_request_id(hop: TwoHop) -> None:
    result = curl(hop, "-i", "http://httpbin:8000/anything?x=1")
    head, _, body = result.stdout.partition("\n\n")  # text mode turned CRLF into LF
    assert head.startswith("HTTP/1.1 200")
    assert "x-upstream: app" in head
    echo = json.loads(body)
    assert echo["path"] == "/anything?x=1"  # origin form upstream
    assert echo["headers"]["host"] == "httpbin:8000"
    assert UUID.match(echo["headers"]["x-request-id"])
    assert "proxy-connection" not in echo["headers"]
    # The server sidecar counted it on its inbound port, the client sidecar on its cluster.
    assert hop.server.stats.inbound_rq[APP_PORT][0] == 1
    assert hop.client.stats.upstream_rq["outbound|8000||httpbin.default.svc.cluster.local"][1] == 1


def test_a_request_id_already_there_is_kept(hop: TwoHop) -> None:
    conn = hop.connect()
    conn.request("GET", "http://httpbin.default.svc.cluster.local:8000/", headers={"X-Request-Id": "given"})
    echo = json.loads(conn.getresponse().read())
    assert echo["headers"]["x-request-id"] == "given"


def test_keep_alive_connections_are_reused_on_both_hops(hop: TwoHop) -> None:
    conn = hop.connect()
    for i in range(20):
        conn.request("GET", f"http://httpbin:8000/bytes/{i}")
        response = conn.getresponse()
        assert response.status == 200 and response.read() == b"x" * i
    assert hop.app.connections == 1
    assert hop.client.stats.upstream_cx_total == 1
    assert hop.server.stats.upstream_cx_total == 1
    assert hop.client.stats.downstream_cx_total == 1


def test_origin_form_request_routes_by_host_header(hop: TwoHop) -> None:
    conn = hop.connect()
    conn.request("GET", "/bytes/3", headers={"Host": "httpbin.default:8000"})
    response = conn.getresponse()
    assert response.status == 200 and response.read() == b"xxx"


def test_chunked_response_is_streamed_back_chunked(hop: TwoHop) -> None:
    conn = hop.connect()
    conn.request("GET", "http://httpbin:8000/chunked/5/1000")
    response = conn.getresponse()
    assert response.getheader("transfer-encoding") == "chunked"
    body = response.read()
    assert body == b"".join(bytes([97 + i]) * 1000 for i in range(5))


def test_chunked_request_body_arrives_whole(hop: TwoHop) -> None:
    conn = hop.connect()
    conn.request("POST", "http://httpbin:8000/post", body=iter([b"hello ", b"chunked ", b"world"]),
                 encode_chunked=True)
    assert conn.getresponse().status == 200
    seen = hop.app.requests[-1]
    assert seen.body == b"hello chunked world"
    assert seen.header("content-length") == "19"  # buffered for replay, so sent with a length


def test_large_chunked_request_body_streams_chunked(hop: TwoHop) -> None:
    piece = b"z" * 16384
    conn = hop.connect()
    conn.request("PUT", "http://httpbin:8000/put", body=iter([piece] * 10), encode_chunked=True)
    assert conn.getresponse().status == 200
    seen = hop.app.requests[-1]
    assert len(seen.body) == 163840 and set(seen.body) == {ord("z")}
    assert seen.header("transfer-encoding") == "chunked"


def test_expect_100_continue_is_answered_by_the_sidecar(hop: TwoHop, tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(bytes(range(256)) * 800)  # 200 KiB
    start = time.monotonic()
    result = curl(hop, "-H", "Expect: 100-continue", "--data-binary", f"@{big}", "-o", "/dev/null",
                  "-w", "%{http_code}", "http://httpbin:8000/post")
    elapsed = time.monotonic() - start
    assert result.stdout == "200"
    # curl waits a whole second for "100 Continue" before sending anyway; the sidecar answers at once.
    assert elapsed < 0.9
    seen = hop.app.requests[-1]
    assert seen.body == big.read_bytes()
    assert seen.header("expect") is None


def test_head_and_no_content_keep_the_connection_usable(hop: TwoHop) -> None:
    conn = hop.connect()
    conn.request("HEAD", "http://httpbin:8000/bytes/100")
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-length") == "100"
    assert response.read() == b""
    conn.request("GET", "http://httpbin:8000/status/204")
    response = conn.getresponse()
    assert response.status == 204 and response.read() == b""
    conn.request("GET", "http://httpbin:8000/bytes/2")
    assert conn.getresponse().read() == b"xx"


def test_http10_client_gets_a_body_delimited_by_close(hop: TwoHop) -> None:
    with hop.raw() as sock:
        sock.sendall(b"GET http://httpbin:8000/chunked/2/3 HTTP/1.0\r\n\r\n")
        (reply,) = read_replies(sock, 1)
        assert reply.status == 200 and reply.body == b"aaabbb"
        assert "transfer-encoding" not in reply.headers
        assert sock.recv(1) == b""  # the sidecar closed: HTTP/1.0 without keep-alive


def test_body_until_close_from_the_app_is_rechunked_for_http11(hop: TwoHop) -> None:
    conn = hop.connect()
    conn.request("GET", "http://httpbin:8000/stream/5000")
    response = conn.getresponse()
    assert response.getheader("transfer-encoding") == "chunked"
    assert response.read() == b"s" * 5000
    conn.request("GET", "http://httpbin:8000/bytes/1")  # the client connection stayed open
    assert conn.getresponse().read() == b"x"


def test_pipelined_requests_are_answered_in_order(hop: TwoHop) -> None:
    with hop.raw() as sock:
        sock.sendall(b"GET http://httpbin:8000/delay/0.2 HTTP/1.1\r\nHost: httpbin:8000\r\n\r\n"
                     b"GET http://httpbin:8000/bytes/1 HTTP/1.1\r\nHost: httpbin:8000\r\n\r\n"
                     b"POST http://httpbin:8000/post HTTP/1.1\r\nHost: httpbin:8000\r\n"
                     b"Content-Length: 2\r\n\r\nhi"
                     b"GET http://httpbin:8000/bytes/2 HTTP/1.1\r\nHost: httpbin:8000\r\n\r\n")
        replies = read_replies(sock, 4)
    assert [r.body[:4] for r in replies] == [b"late", b"x", b"{\"me", b"xx"]
    assert json.loads(replies[2].body)["body"] == "hi"


def test_a_client_that_half_closes_after_pipelining_gets_every_answer(hop: TwoHop) -> None:
    with hop.raw() as sock:
        sock.sendall(b"GET http://httpbin:8000/delay/0.1 HTTP/1.1\r\nHost: httpbin:8000\r\n\r\n"
                     b"GET http://httpbin:8000/bytes/4 HTTP/1.1\r\nHost: httpbin:8000\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        replies = read_replies(sock, 2)
        assert [r.body for r in replies] == [b"late\n", b"xxxx"]
        assert sock.recv(1) == b""


def test_connection_close_is_honoured(hop: TwoHop) -> None:
    with hop.raw() as sock:
        sock.sendall(b"GET http://httpbin:8000/bytes/3 HTTP/1.1\r\nHost: httpbin:8000\r\n"
                     b"Connection: close\r\n\r\n")
        (reply,) = read_replies(sock, 1)
        assert reply.body == b"xxx" and reply.headers["connection"] == "close"
        assert sock.recv(1) == b""


@pytest.mark.parametrize("request_bytes", [
    b"GET http://httpbin:8000/ HTTP/1.1\r\nHost: httpbin:8000\r\nBad Header\r\n\r\n",
    b"POST http://httpbin:8000/ HTTP/1.1\r\nHost: httpbin:8000\r\nContent-Length: 2\r\nContent-Length: 3\r\n"
    b"\r\nabc",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
    b"GET http://httpbin:8000/ HTTP/1.1\r\nHost: httpbin:8000\r\nContent-Length: 2\r\n\r\nabGARBAGE\r\n\r\n",
])
def test_malformed_request_gets_400_and_nothing_reaches_the_app(hop: TwoHop, request_bytes: bytes) -> None:
    with hop.raw() as sock:
        sock.sendall(request_bytes)
        replies = read_replies(sock, 1 if b"GARBAGE" not in request_bytes else 2)
        assert replies[-1].status == 400
        assert replies[-1].headers["x-kizuna-error"] == "malformed request"
        assert sock.recv(1) == b""
    # Only the well-formed request before the garbage (last case) went through.
    assert len(hop.app.requests) == (1 if b"GARBAGE" in request_bytes else 0)


def test_malformed_request_on_the_inbound_side_is_refused_too(hop: TwoHop) -> None:
    with socket.create_connection((hop.server_addr, APP_PORT), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX: \x01\r\n\r\n")
        (reply,) = read_replies(sock, 1)
    assert reply.status == 400 and reply.headers["x-kizuna-error"] == "malformed request"
    assert hop.app.requests == []


def test_unknown_host_gets_404_no_route_and_the_connection_stays_usable(hop: TwoHop) -> None:
    conn = hop.connect()
    conn.request("GET", "http://nowhere:8000/")
    response = conn.getresponse()
    assert response.status == 404
    assert response.getheader("x-kizuna-error") == "no route"
    assert response.read() == b"no route\n"
    conn.request("GET", "http://httpbin:9999/")  # right name, wrong port
    response = conn.getresponse()
    assert response.getheader("x-kizuna-error") == "no route"
    response.read()
    conn.request("GET", "http://httpbin:8000/bytes/1")
    assert conn.getresponse().status == 200


def test_cluster_without_endpoints_gets_503_no_healthy_upstream(
        mesh: LocalMesh, clients: list[http.client.HTTPConnection]) -> None:
    (addr,) = loopback_addresses(1)
    cluster = service_cluster("empty", 80, [])
    vh = simple_virtual_host("empty", 80, cluster.name)
    sidecar = mesh.sidecar(addr, Snapshot("1", virtual_hosts=(vh,), clusters=(cluster,)))
    conn = http.client.HTTPConnection(addr, 15001, timeout=10)
    clients.append(conn)
    conn.request("GET", "http://empty/")
    response = conn.getresponse()
    assert response.status == 503
    assert response.getheader("x-kizuna-error") == "no healthy upstream"
    response.read()
    assert sidecar.stats.errors == {"no healthy upstream": 1}


def test_unreachable_endpoint_gets_503_after_the_default_retries(
        mesh: LocalMesh, clients: list[http.client.HTTPConnection]) -> None:
    addr, dead = loopback_addresses(2)
    cluster = service_cluster("dead", 80, [(dead, 9)])
    sidecar = mesh.sidecar(addr, Snapshot("1", virtual_hosts=(simple_virtual_host("dead", 80, cluster.name),),
                                          clusters=(cluster,)))
    conn = http.client.HTTPConnection(addr, 15001, timeout=10)
    clients.append(conn)
    conn.request("GET", "http://dead/")
    response = conn.getresponse()
    assert response.status == 503
    assert response.getheader("x-kizuna-error") == "upstream connect error"
    assert sidecar.stats.retries == 2  # Istio's default: 2 retries, connect-failure among the conditions


def test_a_client_that_stops_reading_stops_the_app_instead_of_filling_memory(hop: TwoHop) -> None:
    chunks, size = 2048, 65536  # 128 MiB on offer
    with hop.raw() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(b"GET http://httpbin:8000/chunked/%d/%d HTTP/1.1\r\nHost: httpbin:8000\r\n\r\n"
                     % (chunks, size))
        received = sock.recv(65536)
        time.sleep(0.5)
        # Socket buffers on the way hold a few MiB; without flow control both sidecars would read it all.
        stalled_at = hop.app.body_bytes_sent
        assert stalled_at < 48 * 2**20
        time.sleep(0.2)
        assert hop.app.body_bytes_sent - stalled_at < 2**20
        # Reading again resumes the stream end to end.
        while len(received) < 16 * 2**20:
            data = sock.recv(2**20)
            assert data
            received += data
    assert hop.app.body_bytes_sent > stalled_at
    body = received.partition(b"\r\n\r\n")[2]
    assert body.startswith(b"10000\r\n" + b"a" * size)


@pytest.fixture
def chatty_app() -> Iterator[tuple[str, list[int]]]:
    """A raw app that answers every request with its response plus an unsolicited second one in the same
    write: bytes nobody asked for. Yields its address and a one-item list counting its connections."""
    address = loopback_addresses(1)[0]
    listener = socket.create_server((address, APP_PORT))
    listener.settimeout(0.2)
    accepted = [0]
    stop = threading.Event()
    extra = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nbogus"

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            data = b""
            try:
                while not stop.is_set():
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                    while b"\r\n\r\n" in data:
                        _, data = data.split(b"\r\n\r\n", 1)
                        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nreal" + extra)
            except OSError:
                return

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted[0] += 1
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield address, accepted
    finally:
        stop.set()
        listener.close()
        thread.join(5)


def test_bytes_beyond_the_response_retire_the_upstream_connection(
        mesh: LocalMesh, clients: list[http.client.HTTPConnection], chatty_app: tuple[str, list[int]]) -> None:
    app_addr, accepted = chatty_app
    client_addr, server_addr = loopback_addresses(2)
    client_snap, server_snap = two_hop_snapshots(client_addr, server_addr, app_addr, APP_PORT,
                                                 service="httpbin", port=SERVICE_PORT)
    server = mesh.sidecar(server_addr, server_snap)
    mesh.sidecar(client_addr, client_snap)
    conn = http.client.HTTPConnection(client_addr, 15001, timeout=10)
    clients.append(conn)
    for _ in range(3):
        conn.request("GET", "http://httpbin:8000/")
        response = conn.getresponse()
        # The client sees only the response it asked for; the unsolicited one never reaches it.
        assert (response.status, response.read()) == (200, b"real")
    # Framing cannot be trusted after stray bytes: each request needed a fresh connection to the app.
    assert server.stats.upstream_cx_total == 3
    assert accepted[0] == 3
