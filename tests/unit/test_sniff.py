"""Protocol sniffing on a connection's first bytes."""

from __future__ import annotations

import pytest

from kizuna.protocols.sniff import H2_PREFACE, MAX_REQUEST_LINE, Detected, sniff

TLS_CLIENT_HELLO = bytes.fromhex("160301020001000200fc0303") + b"\x00" * 32


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /api/v1/items?x=1 HTTP/1.0\r\n",
    b"PROPFIND /dav HTTP/1.1\n",
    b"M-SEARCH * HTTP/1.1\r\n",
])
def test_http1_request_lines(data: bytes) -> None:
    assert sniff(data) is Detected.HTTP1


@pytest.mark.parametrize("data", [b"G", b"GET", b"GET ", b"GET /very/long/path", b"OPTIONS * HTTP/1."])
def test_partial_request_line_needs_more(data: bytes) -> None:
    assert sniff(data) is Detected.NEED_MORE


def test_http2_preface() -> None:
    assert sniff(H2_PREFACE + b"\x00\x00\x12\x04") is Detected.HTTP2
    assert sniff(H2_PREFACE[:10]) is Detected.NEED_MORE
    assert sniff(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n") is not Detected.HTTP2


def test_tls_client_hello() -> None:
    assert sniff(TLS_CLIENT_HELLO) is Detected.TLS
    assert sniff(TLS_CLIENT_HELLO[:1]) is Detected.NEED_MORE


@pytest.mark.parametrize("data", [
    b"\x16\x01\x00",                        # not a TLS version
    b"SET key value\r\n",                   # Redis inline command: looks like a method, has no HTTP version
    b"*1\r\n$4\r\nPING\r\n",                # Redis RESP
    b"\x00\x00\x00\x2c\x00\x03\x00\x00",    # PostgreSQL startup
    b"EHLO mail.example.com\r\n",           # SMTP client line
    b"hello world, no version\n",
    b"X" * 40,                              # too long to be a method
    b"GET\x00/ HTTP/1.1\r\n",
])
def test_everything_else_is_opaque(data: bytes) -> None:
    assert sniff(data) is Detected.OPAQUE


def test_empty_needs_more() -> None:
    assert sniff(b"") is Detected.NEED_MORE


def test_endless_request_line_is_decided_on_the_method() -> None:
    assert sniff(b"GET /" + b"a" * MAX_REQUEST_LINE) is Detected.HTTP1
    assert sniff(b"FOO /" + b"a" * MAX_REQUEST_LINE) is Detected.OPAQUE
