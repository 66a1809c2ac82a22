"""Protocol detection from a connection's first bytes, without I/O (Envoy's http_inspector and tls_inspector).

``sniff(data)`` answers HTTP1, HTTP2, TLS, OPAQUE or NEED_MORE. A caller waits a bounded time for more bytes
and treats a connection that stays silent as opaque: server-first protocols (MySQL, SMTP) send nothing first.
"""

from __future__ import annotations

from enum import Enum
from typing import Final


class Detected(Enum):
    """What the first bytes of a connection look like."""

    HTTP1 = "http1"
    HTTP2 = "http2"
    TLS = "tls"
    OPAQUE = "opaque"
    NEED_MORE = "need_more"


H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_REQUEST_LINE: Final = 8192
"""Past this many bytes without a line end, decide on the method token alone."""

# RFC 9110 token characters (tchar), as byte values.
_TCHAR: Final = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_MAX_METHOD: Final = 24
_KNOWN_METHODS: Final = frozenset({
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
})


def sniff(data: bytes) -> Detected:
    """Classify ``data``, the bytes a client sent first; NEED_MORE when they do not decide it yet."""
    if not data:
        return Detected.NEED_MORE
    if data[0] == 0x16:
        # TLS record header: content type handshake (22), then major version 3.
        if len(data) < 2:
            return Detected.NEED_MORE
        return Detected.TLS if data[1] == 0x03 else Detected.OPAQUE
    if H2_PREFACE.startswith(data[:len(H2_PREFACE)]):
        return Detected.HTTP2 if len(data) >= len(H2_PREFACE) else Detected.NEED_MORE
    return _sniff_http1(data)


def _sniff_http1(data: bytes) -> Detected:
    """``METHOD SP target SP HTTP/1.x CRLF``: a token, a space, and a request line that ends in a version."""
    space = data.find(b" ", 0, _MAX_METHOD + 1)
    if space < 0:
        if len(data) > _MAX_METHOD or not all(c in _TCHAR for c in data):
            return Detected.OPAQUE
        return Detected.NEED_MORE
    method = data[:space]
    if not method or not all(c in _TCHAR for c in method):
        return Detected.OPAQUE
    line_end = data.find(b"\n", space)
    if line_end < 0:
        if len(data) >= MAX_REQUEST_LINE:
            return Detected.HTTP1 if method in _KNOWN_METHODS else Detected.OPAQUE
        return Detected.NEED_MORE
    line = data[:line_end].rstrip(b"\r")
    version = line.rpartition(b" ")[2]
    return Detected.HTTP1 if version in (b"HTTP/1.1", b"HTTP/1.0") else Detected.OPAQUE
