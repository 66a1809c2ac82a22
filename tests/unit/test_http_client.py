"""The sidecar's own HTTP/1.1 client against real servers on loopback: each way a body can be framed, the size
bound, the time limit, a broken answer, HTTPS with a test CA, and the address it leaves from."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from kizuna.proxy.http_client import (
    CLOSED_EARLY,
    Response,
    ResponseError,
    ResponseTooLarge,
    authority,
    request,
)
from kizuna.testing.mesh import loopback_addresses
from kizuna.testing.pki import issue, make_ca

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A server on 127.0.0.1 (port 0) that records each request (head and body) and answers with ``answer``:
    the raw pieces it writes, one write each, then it closes."""

    def __init__(self, *answer: bytes, hang: bool = False) -> None:
        self.answer = answer
        self.hang = hang
        self.requests: list[bytes] = []
        self.peers: list[str] = []
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.peers.append(writer.get_extra_info("peername")[0])
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            self.requests.append(head + await reader.readexactly(length))
            if self.hang:
                await reader.read()  # until the client gives up
                return
            for piece in self.answer:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.01)  # separate reads on the client's side
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


def serve(server: Server, scenario: Callable[[int], Awaitable[None]], tls: ssl.SSLContext | None = None) -> None:
    """Run ``scenario(port)`` with ``server`` listening on 127.0.0.1."""
    async def main() -> None:
        listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=tls)
        try:
            server.port = listener.sockets[0].getsockname()[1]
            await scenario(server.port)
        finally:
            listener.close()
            await listener.wait_closed()

    asyncio.run(main())


def call(server: Server, server_tls: ssl.SSLContext | None = None, **kw: object) -> Response:
    """One request to ``server`` (GET / unless ``kw`` says otherwise; HTTPS when ``server_tls``); the answer."""
    got: list[Response] = []

    async def scenario(port: int) -> None:
        method = str(kw.pop("method", "GET"))
        target = str(kw.pop("target", "/"))
        got.append(await request("127.0.0.1", port, method, target, **kw))  # type: ignore[arg-type]

    serve(server, scenario, server_tls)
    return got[0]


def test_a_length_framed_answer_and_the_request_that_asked_for_it() -> None:
    server = Server(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n",
                    b'{"keys": [1]}')
    response = call(server, target="/jwks.json?x=1", headers=((b"Accept", b"application/json"),))
    assert (response.status, response.reason, response.body) == (200, "OK", b'{"keys": [1]}')
    assert response.header(b"content-type") == b"application/json"
    assert response.header(b"x-missing") is None
    (sent,) = server.requests
    assert sent.startswith(b"GET /jwks.json?x=1 HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}\r\n".encode() in sent
    assert b"Accept: application/json\r\n" in sent and b"Connection: close\r\n" in sent
    assert b"Content-Length" not in sent  # a GET carries no body


def test_a_posted_body_and_a_chunked_answer_split_across_reads() -> None:
    payload = b'{"csr": "' + b"x" * 3000 + b'"}'
    chunks = [b"%x\r\n%b\r\n" % (len(payload[i:i + 1000]), payload[i:i + 1000]) for i in range(0, len(payload), 1000)]
    server = Server(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n", *chunks,
                    b"0\r\nx-trailer: dropped\r\n\r\n")
    response = call(server, method="POST", target="/v1/certificates", host_header="cp.example:15012",
                    body=payload)
    assert response.status == 201 and response.body == payload
    (sent,) = server.requests
    assert sent.startswith(b"POST /v1/certificates HTTP/1.1\r\nHost: cp.example:15012\r\n")
    assert b"Content-Length: %d\r\n" % len(payload) in sent and sent.endswith(b"\r\n\r\n" + payload)


def test_an_answer_delimited_by_close_after_an_interim_100() -> None:
    server = Server(b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 503 Service Unavailable\r\n\r\nbusy, ",
                    b"try later\n")
    response = call(server)
    assert (response.status, response.status_line, response.body) == (503, "503 Service Unavailable",
                                                                      b"busy, try later\n")


def test_head_answer_has_no_body_whatever_its_length_says() -> None:
    response = call(Server(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"), method="HEAD")
    assert response.status == 200 and response.body == b""


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_a_body_over_the_bound_is_refused(framing: str) -> None:
    body = b"m" * 5000
    head = {"length": b"Content-Length: 5000\r\n", "chunked": b"Transfer-Encoding: chunked\r\n", "close": b""}
    data = b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body) if framing == "chunked" else body
    answer = (b"HTTP/1.1 200 OK\r\n" + head[framing] + b"\r\n", data)
    with pytest.raises(ResponseTooLarge, match="larger than 4999 bytes"):
        call(Server(*answer), limit=4999)
    assert call(Server(*answer), limit=5000).body == body  # at the bound: accepted


def test_a_silent_server_times_out_with_a_message() -> None:
    server = Server(hang=True)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"no answer within 0\.3s"):
        call(server, timeout=0.3)
    assert time.monotonic() - started < 20  # generous: the bound is what matters, not the machine's load
    assert len(server.requests) == 1  # it did reach the server


@pytest.mark.parametrize(("answer", "reason"), [
    ((b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"only part"), CLOSED_EARLY),
    ((b"",), CLOSED_EARLY),  # closed without a byte
    ((b"SSH-2.0-OpenSSH_9.2\r\n",), "not an HTTP response"),
])
def test_a_broken_answer_says_why(answer: tuple[bytes, ...], reason: str) -> None:
    with pytest.raises(ResponseError, match=reason):
        call(Server(*answer))


def test_a_refused_connection_stays_an_os_error() -> None:
    async def scenario(port: int) -> None:
        pass

    server = Server()
    serve(server, scenario)  # the port is free again afterwards
    with pytest.raises(ConnectionRefusedError):
        asyncio.run(request("127.0.0.1", server.port, "GET", "/"))


def test_it_leaves_from_the_source_address() -> None:
    (source,) = loopback_addresses(1, prefix="127.93")
    server = Server(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert call(server, source=source).status == 204
    assert server.peers == [source]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, Path]:
    """A server context for ``issuer.test`` under a test CA, and the CA's certificate file."""
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory, "test-ca")
    cert, key = issue(directory, ca, "issuer", ["issuer.test"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context, ca[2]


def test_https_with_the_servers_name_checked_against_a_test_ca(pki: tuple[ssl.SSLContext, Path]) -> None:
    server_tls, ca_file = pki
    client = ssl.create_default_context(cafile=str(ca_file))
    server = Server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    response = call(server, server_tls, tls=client, server_hostname="issuer.test", host_header="issuer.test")
    assert response.body == b"{}"
    assert server.requests[0].startswith(b"GET / HTTP/1.1\r\nHost: issuer.test\r\n")
    with pytest.raises(ssl.SSLCertVerificationError):  # the certificate does not name 127.0.0.1
        call(Server(b"HTTP/1.1 200 OK\r\n\r\n"), server_tls, tls=client)
    with pytest.raises(ssl.SSLCertVerificationError):  # nor is it trusted by the system's roots
        call(Server(b"HTTP/1.1 200 OK\r\n\r\n"), server_tls, tls=ssl.create_default_context(),
             server_hostname="issuer.test")


def test_a_peer_refused_by_check_peer_gets_no_request(pki: tuple[ssl.SSLContext, Path]) -> None:
    server_tls, ca_file = pki
    client = ssl.create_default_context(cafile=str(ca_file))
    seen: list[object] = []

    def refuse(cert: object) -> str:
        seen.append(cert)
        return "not the control plane"

    server = Server(b"HTTP/1.1 200 OK\r\n\r\n")
    with pytest.raises(PermissionError, match="not the control plane"):
        call(server, server_tls, tls=client, server_hostname="issuer.test", check_peer=refuse)
    assert server.requests == [] and len(seen) == 1 and "subjectAltName" in seen[0]  # type: ignore[operator]


def test_authority_brackets_ipv6() -> None:
    assert authority("::1", 8080) == "[::1]:8080" and authority("10.0.0.1", 80) == "10.0.0.1:80"
