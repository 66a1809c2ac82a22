"""The SNI read from real ClientHellos (made by Python's ssl module), whole, split and broken."""

from __future__ import annotations

import ssl

import pytest

from kizuna.protocols.tls import NEED_MORE, client_hello_sni


def client_hello(server_name: str | None) -> bytes:
    """The first flight of a real TLS client (Python's ssl over memory BIOs)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_sni_of_a_real_client_hello() -> None:
    assert client_hello_sni(client_hello("API.Example.com")) == "api.example.com"


def test_a_client_hello_without_sni_has_an_empty_name() -> None:
    assert client_hello_sni(client_hello(None)) == ""


def test_partial_client_hello_needs_more_at_every_cut() -> None:
    hello = client_hello("db.example.com")
    for cut in (0, 1, 4, 5, 40, len(hello) - 1):
        assert client_hello_sni(hello[:cut]) == NEED_MORE
    assert client_hello_sni(hello + b"trailing bytes") == "db.example.com"


def test_client_hello_split_over_two_records() -> None:
    hello = client_hello("split.example.com")
    body = hello[5:]
    first, second = body[:30], body[30:]
    records = (b"\x16\x03\x01" + len(first).to_bytes(2, "big") + first
               + b"\x16\x03\x01" + len(second).to_bytes(2, "big") + second)
    assert client_hello_sni(records) == "split.example.com"


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",
                                  b"\x16\x03\x01\x00\x06\x01\x00\x00\x02\xff\xff"])
def test_anything_else_is_no_client_hello(data: bytes) -> None:
    assert client_hello_sni(data) is None
