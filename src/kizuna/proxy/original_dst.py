"""Where a captured connection was going: ``SO_ORIGINAL_DST`` after an iptables ``REDIRECT``.

``REDIRECT`` rewrites the destination to the sidecar's own port; the kernel's connection tracking remembers the
original one, and ``getsockopt(SOL_IP, SO_ORIGINAL_DST)`` returns it as a ``struct sockaddr_in`` (Envoy's
``original_dst`` listener filter does the same). IPv4 only, as the capture rules are.
"""

from __future__ import annotations

import socket
import struct
from typing import Final, Protocol

SO_ORIGINAL_DST: Final = 80
"""From ``<linux/netfilter_ipv4.h>``; Python's socket module does not define it."""
SOCKADDR_IN_SIZE: Final = 16


class SocketLike(Protocol):
    """A socket or uvloop's PseudoSocket: anything with ``getsockopt``."""

    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes: ...


def parse_sockaddr_in(data: bytes) -> tuple[str, int]:
    """``struct sockaddr_in`` bytes → ``(address, port)``; raises ValueError for anything else.

    The family is in host byte order, the port and address in network order; the last 8 bytes are padding.
    """
    if len(data) < 8:
        raise ValueError(f"sockaddr_in needs 8 bytes at least, got {len(data)}")
    (family,) = struct.unpack_from("=H", data, 0)
    if family != socket.AF_INET:
        raise ValueError(f"not an AF_INET address (family {family})")
    (port,) = struct.unpack_from("!H", data, 2)
    return socket.inet_ntoa(data[4:8]), port


def original_dst(sock: SocketLike) -> tuple[str, int] | None:
    """The original destination of an accepted connection, or None when it was not redirected by NAT
    (no conntrack entry) or the socket is not IPv4."""
    try:
        data = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_SIZE)
    except OSError:
        return None
    try:
        return parse_sockaddr_in(data)
    except ValueError:
        return None
