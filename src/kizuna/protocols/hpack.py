"""HPACK (RFC 7541) for our HTTP/2 codec: ``encode_headers`` sends with the static table and plain literals
only (never the dynamic table, never Huffman: larger blocks, cheap on both sides, for loopback and pod
networks where CPU counts more than bytes); ``HeaderDecoder`` reads all of HPACK. ``hpack`` lends its static
table and Huffman decoder."""

from __future__ import annotations

from collections import deque
from typing import Final

from hpack import NeverIndexedHeaderTuple
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

Headers = list[tuple[bytes, bytes]]

MAX_HEADER_LIST_SIZE: Final = 2 ** 16
"""The largest decoded header list we take (bytes, as RFC 9113 counts them)."""


_STATIC: Final[tuple[tuple[bytes, bytes], ...]] = HeaderTable.STATIC_TABLE  # HPACK indexes it from 1
_STATIC_EXACT: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAME: dict[bytes, int] = {}
for _i, (_name, _value) in enumerate(_STATIC, 1):
    _STATIC_EXACT.setdefault((_name, _value), _i)
    _STATIC_NAME.setdefault(_name, _i)
_INDEXED: Final = [bytes((0x80 | i,)) for i in range(len(_STATIC) + 1)]
DEFAULT_TABLE_SIZE: Final = 4096
"""The dynamic table size we let a peer's encoder use (the protocol default; we never announce another)."""


class CompressionFailure(ValueError):
    """A header block that cannot be decoded."""


def _int(value: int, bits: int, flags: int) -> bytes:
    limit = (1 << bits) - 1
    if value < limit:
        return bytes((flags | value,))
    out = bytearray((flags | limit,))
    value -= limit
    while value >= 128:
        out.append(value & 127 | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(text: bytes) -> bytes:
    size = len(text)
    return (bytes((size,)) if size < 127 else _int(size, 7, 0)) + text


def encode_headers(headers: Headers, size_update: bool = False) -> bytes:
    """A header block using the static table and literals only (``size_update``: first, a dynamic table size
    update to 0, which tells the peer's decoder we keep no dynamic table). A never-indexed header (as a peer
    marked it, ``NeverIndexedHeaderTuple``) stays never-indexed."""
    out = [b"\x20"] if size_update else []
    exact, names = _STATIC_EXACT, _STATIC_NAME
    for header in headers:
        name, value = header
        index = exact.get(header) if type(header) is tuple else exact.get((name, value))
        if index is not None:
            out.append(_INDEXED[index])
            continue
        flags = 0x10 if type(header) is NeverIndexedHeaderTuple else 0
        index = names.get(name)
        if index is None:
            out.append(b"\x10" if flags else b"\x00")
            out.append(_string(name))
        else:
            out.append(_int(index, 4, flags))
        out.append(_string(value))
    return b"".join(out)


def _read_int(data: bytes, pos: int, bits: int) -> tuple[int, int]:
    limit = (1 << bits) - 1
    value = data[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value += (byte & 127) << shift
        if not byte & 128:
            return value, pos
        shift += 7
        if shift > 28:
            raise CompressionFailure("integer too large")


def _read_string(data: bytes, pos: int) -> tuple[bytes, int]:
    huffman = data[pos] & 0x80
    size, pos = _read_int(data, pos, 7)
    end = pos + size
    if end > len(data):
        raise CompressionFailure("string past the end of the block")
    raw = data[pos:end]
    return (decode_huffman(raw) if huffman else raw), end


class HeaderDecoder:
    """HPACK decoding with the dynamic table a peer's encoder builds (up to ``DEFAULT_TABLE_SIZE`` bytes)."""

    __slots__ = ("table", "size", "max_size", "max_list")

    def __init__(self, max_list: int = MAX_HEADER_LIST_SIZE) -> None:
        self.table: deque[tuple[bytes, bytes]] = deque()  # newest first: dynamic index 62 is table[0]
        self.size = 0
        self.max_size = DEFAULT_TABLE_SIZE
        self.max_list = max_list

    def decode(self, data: bytes) -> Headers:
        """The header list of one complete block; ``CompressionFailure`` when it is malformed or too large."""
        try:
            return self._decode(data)
        except IndexError as exc:
            raise CompressionFailure("truncated header block") from exc

    def _decode(self, data: bytes) -> Headers:
        headers: Headers = []
        pos, end, total = 0, len(data), 0
        static_size = len(_STATIC)
        while pos < end:
            byte = data[pos]
            if byte & 0x80:  # indexed
                if byte != 0xFF:
                    index, pos = byte & 0x7F, pos + 1
                else:
                    index, pos = _read_int(data, pos, 7)
                header = self._entry(index) if index > static_size or index == 0 else _STATIC[index - 1]
            elif byte & 0x40:  # literal, added to the dynamic table
                index, pos = _read_int(data, pos, 6)
                if index:
                    name = self._entry(index)[0]
                else:
                    name, pos = _read_string(data, pos)
                value, pos = _read_string(data, pos)
                header = (name, value)
                self._add(header)
            elif byte & 0x20:  # dynamic table size update
                size, pos = _read_int(data, pos, 5)
                if size > DEFAULT_TABLE_SIZE:
                    raise CompressionFailure(f"table size {size} above the {DEFAULT_TABLE_SIZE} allowed")
                self.max_size = size
                self._evict()
                continue
            else:  # literal, not indexed (0x00) or never indexed (0x10)
                never = byte & 0x10
                index, pos = _read_int(data, pos, 4)
                if index:
                    name = self._entry(index)[0]
                else:
                    name, pos = _read_string(data, pos)
                value, pos = _read_string(data, pos)
                header = NeverIndexedHeaderTuple(name, value) if never else (name, value)
            total += len(header[0]) + len(header[1]) + 32
            if total > self.max_list:
                raise CompressionFailure("header list too large")
            headers.append(header)
        return headers

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        if index == 0:
            raise CompressionFailure("index 0")
        if index <= len(_STATIC):
            return _STATIC[index - 1]
        dynamic = index - len(_STATIC) - 1
        if dynamic >= len(self.table):
            raise CompressionFailure(f"index {index} past the table")
        return self.table[dynamic]

    def _add(self, header: tuple[bytes, bytes]) -> None:
        self.table.appendleft(header)
        self.size += len(header[0]) + len(header[1]) + 32
        self._evict()

    def _evict(self) -> None:
        table = self.table
        while self.size > self.max_size and table:
            name, value = table.pop()
            self.size -= len(name) + len(value) + 32
