"""Consistent hashing for ``loadBalancer.consistentHash``: a request key to an endpoint, stable under churn.

Two tables, as in Envoy: a *ring* (Ketama: points on a 64-bit circle, a key goes to the first point at or
after its hash) and *Maglev* (a lookup table of prime size filled from each
endpoint's permutation). Both depend only on the endpoints' names, so every sidecar builds the same table,
and removing an endpoint moves only the keys it held (ring) or close to only those (Maglev).
Pure code: no sockets, no asyncio.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from hashlib import blake2b

from kizuna.proxyconfig.policy import HashPolicy

_MAX_RING = 8 * 1024 * 1024
"""Envoy's maximum_ring_size default: a ring is never bigger than this."""


def hash_key(data: bytes) -> int:
    """A stable 64-bit hash (the same in every process, unlike ``hash()``)."""
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "little")


class Ring:
    """Ketama ring over ``names``; ``lookup(hash)`` is the index of the owning name."""

    __slots__ = ("points", "owners")

    def __init__(self, names: Sequence[str], ring_size: int = 1024) -> None:
        entries: list[tuple[int, int]] = []
        if names:
            # Envoy gives each endpoint ring_size / n points, so every point moves when n changes. Here each
            # endpoint gets ring_size points (the ring is never smaller than the minimum), which depend on
            # its name alone: a removed endpoint's keys move, no other key does.
            per_name = max(1, min(ring_size, _MAX_RING // len(names)))
            for index, name in enumerate(names):
                base = name.encode()
                entries.extend((hash_key(b"%b_%d" % (base, i)), index) for i in range(per_name))
        entries.sort()
        self.points = [p for p, _ in entries]
        self.owners = [o for _, o in entries]

    def lookup(self, key: int) -> int | None:
        """The owner of ``key``: the first point at or after it, wrapping around."""
        if not self.points:
            return None
        i = bisect_left(self.points, key)
        return self.owners[i if i < len(self.points) else 0]


class Maglev:
    """Maglev lookup table (Eisenbud et al. 2016) of prime size ``table_size`` over ``names``."""

    __slots__ = ("table",)

    def __init__(self, names: Sequence[str], table_size: int = 65537) -> None:
        n, m = len(names), table_size
        table = [-1] * m if n else []
        if n:
            offsets, skips = [], []
            for name in names:
                offsets.append(hash_key(b"o" + name.encode()) % m)
                skips.append(hash_key(b"s" + name.encode()) % (m - 1) + 1)
            nexts = [0] * n
            filled = 0
            while True:
                for i in range(n):
                    offset, skip, j = offsets[i], skips[i], nexts[i]
                    slot = (offset + j * skip) % m
                    while table[slot] >= 0:
                        j += 1
                        slot = (offset + j * skip) % m
                    table[slot] = i
                    nexts[i] = j + 1
                    filled += 1
                    if filled == m:
                        break
                if filled == m:
                    break
        self.table = table

    def lookup(self, key: int) -> int | None:
        """The owner of ``key``."""
        return self.table[key % len(self.table)] if self.table else None


def build_table(policy: HashPolicy, names: Sequence[str]) -> Ring | Maglev:
    """The table ``policy`` asks for over ``names``."""
    if policy.algorithm == "maglev":
        return Maglev(names, policy.table_size)
    return Ring(names, policy.ring_size)


def request_key(policy: HashPolicy, headers: Sequence[tuple[bytes, bytes]], target: bytes,
                peer: str | None) -> bytes | None:
    """The bytes a request hashes on, or None when the request lacks them (then any endpoint will do)."""
    if policy.header:
        name = policy.header.encode()
        for key, value in headers:
            if key.lower() == name:
                return value
        return None
    if policy.cookie:
        return cookie_value(headers, policy.cookie)
    if policy.source_ip:
        return peer.encode() if peer else None
    if policy.query_param:
        _, _, query = target.partition(b"?")
        wanted = policy.query_param.encode()
        for pair in query.split(b"&"):
            key, sep, value = pair.partition(b"=")
            if key == wanted and sep:
                return value
        return None
    return None


def cookie_value(headers: Sequence[tuple[bytes, bytes]], name: str) -> bytes | None:
    """The value of cookie ``name`` in the request's Cookie headers."""
    wanted = name.encode()
    for key, value in headers:
        if key.lower() != b"cookie":
            continue
        for part in value.split(b";"):
            k, sep, v = part.strip().partition(b"=")
            if sep and k == wanted:
                return v
    return None


def set_cookie_header(policy: HashPolicy, value: bytes) -> tuple[bytes, bytes]:
    """The ``set-cookie`` header Envoy adds when the hash cookie was absent and a ttl is configured."""
    parts = [b"%b=%b" % (policy.cookie.encode(), value)]
    if policy.cookie_ttl:
        parts.append(b"Max-Age=%d" % int(policy.cookie_ttl))
    if policy.cookie_path:
        parts.append(b"Path=%b" % policy.cookie_path.encode())
    parts.append(b"HttpOnly")
    return b"set-cookie", b"; ".join(parts)
