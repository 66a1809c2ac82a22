"""The server name a TLS client asks for, read from its ClientHello without I/O (Envoy's tls_inspector).

``client_hello_sni(data)`` looks at the bytes a client sent first and answers the SNI host name (lower-case),
``""`` for a ClientHello without one, ``None`` for bytes that are no (well-formed) ClientHello, or
``NEED_MORE`` while the ClientHello is incomplete. The handshake message may span several TLS records; the
caller bounds how many bytes it is willing to wait for (``MAX_CLIENT_HELLO``).
"""

from __future__ import annotations

from typing import Final

NEED_MORE: Final = "\x00need-more"
"""Not a name: the ClientHello is not complete yet."""
MAX_CLIENT_HELLO: Final = 64 * 1024
"""More bytes than this without a complete ClientHello: give up (treat as no SNI)."""

_HANDSHAKE: Final = 0x16
_CLIENT_HELLO: Final = 0x01
_SERVER_NAME: Final = 0x0000
_HOST_NAME: Final = 0x00


def client_hello_sni(data: bytes) -> str | None:
    """The SNI of the ClientHello at the start of ``data``: a name, ``""``, ``None`` or ``NEED_MORE``."""
    message = _handshake_message(data)
    if message is None or message == NEED_MORE:
        return message if message is None else NEED_MORE
    assert isinstance(message, bytes)
    return _server_name(message)


def _handshake_message(data: bytes) -> bytes | str | None:
    """The first handshake message, reassembled from its records, if it is a ClientHello."""
    body = b""
    offset = 0
    needed: int | None = None
    while needed is None or len(body) < needed:
        if len(data) < offset + 5:
            return NEED_MORE
        if data[offset] != _HANDSHAKE or data[offset + 1] != 3:
            return None
        length = int.from_bytes(data[offset + 3:offset + 5], "big")
        if len(data) < offset + 5 + length:
            return NEED_MORE
        body += data[offset + 5:offset + 5 + length]
        offset += 5 + length
        if needed is None and len(body) >= 4:
            if body[0] != _CLIENT_HELLO:
                return None
            needed = 4 + int.from_bytes(body[1:4], "big")
    return body[4:needed]


def _server_name(hello: bytes) -> str | None:
    """The host name in a ClientHello body's server_name extension (RFC 6066)."""
    try:
        pos = 2 + 32  # legacy_version, random
        pos += 1 + hello[pos]  # legacy_session_id
        pos += 2 + int.from_bytes(hello[pos:pos + 2], "big")  # cipher_suites
        pos += 1 + hello[pos]  # legacy_compression_methods
        if pos == len(hello):
            return ""  # no extensions at all
        end = pos + 2 + int.from_bytes(hello[pos:pos + 2], "big")
        pos += 2
        while pos + 4 <= end:
            kind = int.from_bytes(hello[pos:pos + 2], "big")
            size = int.from_bytes(hello[pos + 2:pos + 4], "big")
            pos += 4
            if kind == _SERVER_NAME:
                names_end = pos + 2 + int.from_bytes(hello[pos:pos + 2], "big")
                pos += 2
                while pos + 3 <= names_end:
                    name_type = hello[pos]
                    name_len = int.from_bytes(hello[pos + 1:pos + 3], "big")
                    name = hello[pos + 3:pos + 3 + name_len]
                    if name_type == _HOST_NAME:
                        return name.decode("ascii").lower()
                    pos += 3 + name_len
                return ""
            pos += size
        return ""
    except (IndexError, UnicodeDecodeError):
        return None
