"""Trace context on requests, without I/O: W3C ``traceparent`` / ``tracestate``, Zipkin B3 (multi-header and
single ``b3``) and ``x-request-id``.

``extract(headers)`` finds the caller's context (W3C first, then B3); ``child_headers(parent, span_id)`` gives
the headers that carry a new span (the proxy's) to the next hop in both formats, as Envoy does, so apps that
forward either keep the trace whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from random import getrandbits
from typing import Final, NamedTuple

B3_HEADERS: Final = (b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid", b"x-b3-sampled", b"x-b3-flags", b"b3")
TRACE_HEADERS: Final = frozenset((b"traceparent", b"tracestate", *B3_HEADERS))
"""Headers this module reads and rewrites."""
TRACE_HEADER_LENGTHS: Final = frozenset(map(len, TRACE_HEADERS))
"""Their name lengths: a header of another length is none of them, with no need to lower-case its name."""
_TRACEPARENT: Final = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:-.*)?")
"""version-trace id-span id-flags, and what a later version may add after them."""
_HEX16: Final = re.compile(r"[0-9a-f]{16}")
_HEX32: Final = re.compile(r"[0-9a-f]{32}")


class SpanContext(NamedTuple):
    """Who the current span is: 32 hex digits of trace id, 16 of span id, whether it is sampled."""

    trace_id: str
    span_id: str
    sampled: bool | None
    """None: the caller did not decide (the proxy's sampler does)."""
    tracestate: str = ""


def new_id(hex_digits: int) -> str:
    """A random, non-zero id of ``hex_digits`` hex digits (ids name spans, they are not secrets: Python's
    PRNG, as Envoy uses a PRNG, without a system call per id)."""
    while True:
        value = getrandbits(hex_digits * 4)
        if value:
            return value.to_bytes(hex_digits // 2, "big").hex()


def _valid(value: str, length: int) -> bool:
    pattern = _HEX32 if length == 32 else _HEX16
    return pattern.fullmatch(value) is not None and bool(value.strip("0"))


def extract(headers: Iterable[tuple[bytes, bytes]]) -> SpanContext | None:
    """The caller's span context from request headers (names in any case), or None."""
    return scan(headers)[0]


def scan(headers: Iterable[tuple[bytes, bytes]]) -> tuple[SpanContext | None, bool]:
    """The caller's span context (or None), and whether the headers carry any trace header at all (usable or
    not: a proxy that writes its own must drop them)."""
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        if len(name) in TRACE_HEADER_LENGTHS:
            name = name.lower()  # as sent: urllib writes "Traceparent"
            if name in TRACE_HEADERS and name not in found:
                found[name] = value
    if not found:
        return None, False
    return _context(found), True


def _context(found: dict[bytes, bytes]) -> SpanContext | None:
    parent = found.get(b"traceparent")
    if parent is not None:
        match = _TRACEPARENT.fullmatch(parent.decode("latin-1").strip().lower())
        if match is not None:
            version, trace_id, span_id, flags = match.groups()
            if version != "ff" and trace_id.strip("0") and span_id.strip("0"):
                state = found.get(b"tracestate", b"").decode("latin-1")
                return SpanContext(trace_id, span_id, bool(int(flags, 16) & 1), state)
    single = found.get(b"b3")
    if single is not None:
        parts = single.decode("latin-1").strip().lower().split("-")
        if len(parts) >= 2 and _valid(parts[0].rjust(32, "0"), 32) and _valid(parts[1], 16):
            sampled = parts[2] in ("1", "d") if len(parts) >= 3 else None
            return SpanContext(parts[0].rjust(32, "0"), parts[1], sampled)
    trace_id = found.get(b"x-b3-traceid", b"").decode("latin-1").strip().lower()
    span_id = found.get(b"x-b3-spanid", b"").decode("latin-1").strip().lower()
    if _valid(trace_id.rjust(32, "0"), 32) and _valid(span_id, 16):
        flag = found.get(b"x-b3-sampled", b"").strip().lower()
        debug = found.get(b"x-b3-flags", b"").strip() == b"1"
        sampled = True if debug or flag in (b"1", b"true") else False if flag in (b"0", b"false") else None
        return SpanContext(trace_id.rjust(32, "0"), span_id, sampled)
    return None


def child_headers(context: SpanContext, parent_span: str | None = None) -> tuple[tuple[bytes, bytes], ...]:
    """Headers that make ``context`` (a span the proxy opened) the caller of the next hop, W3C and B3; the
    caller's own trace headers are to be dropped first (see ``TRACE_HEADERS``)."""
    trace_id, span_id = context.trace_id.encode(), context.span_id.encode()
    out = [(b"traceparent", b"00-%b-%b-%b" % (trace_id, span_id, b"01" if context.sampled else b"00"))]
    if context.tracestate:
        out.append((b"tracestate", context.tracestate.encode("latin-1")))
    out += [(b"x-b3-traceid", trace_id), (b"x-b3-spanid", span_id),
            (b"x-b3-sampled", b"1" if context.sampled else b"0")]
    if parent_span:
        out.append((b"x-b3-parentspanid", parent_span.encode()))
    return tuple(out)
