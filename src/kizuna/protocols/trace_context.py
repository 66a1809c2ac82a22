"""Trace context on requests, without I/O: W3C ``traceparent`` / ``tracestate``, Zipkin B3 (multi-header and
single ``b3``) and ``x-request-id``.

``extract(headers)`` finds the caller's context (W3C first, then B3); ``child_headers(parent, span_id)`` gives
the headers that carry a new span (the proxy's) to the next hop in both formats, as Envoy does, so apps that
forward either keep the trace whole.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

B3_HEADERS: Final = (b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid", b"x-b3-sampled", b"x-b3-flags", b"b3")
TRACE_HEADERS: Final = (b"traceparent", b"tracestate", *B3_HEADERS)
"""Headers this module reads and rewrites."""
_HEX: Final = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class SpanContext:
    """Who the current span is: 32 hex digits of trace id, 16 of span id, whether it is sampled."""

    trace_id: str
    span_id: str
    sampled: bool | None
    """None: the caller did not decide (the proxy's sampler does)."""
    tracestate: str = ""


def new_id(hex_digits: int) -> str:
    """A random, non-zero id of ``hex_digits`` hex digits."""
    while True:
        value = os.urandom(hex_digits // 2).hex()
        if value.strip("0"):
            return value


def _valid(value: str, length: int) -> bool:
    return len(value) == length and set(value) <= _HEX and bool(value.strip("0"))


def extract(headers: Iterable[tuple[bytes, bytes]]) -> SpanContext | None:
    """The caller's span context from request headers (names in any case), or None."""
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        name = name.lower()  # as sent: urllib writes "Traceparent"
        if name in TRACE_HEADERS and name not in found:
            found[name] = value
    if not found:
        return None
    parent = found.get(b"traceparent")
    if parent is not None:
        parts = parent.decode("latin-1").strip().lower().split("-")
        if len(parts) >= 4 and len(parts[0]) == 2 and parts[0] != "ff" and _valid(parts[1], 32) \
                and _valid(parts[2], 16) and len(parts[3]) == 2 and set(parts[3]) <= _HEX:
            state = found.get(b"tracestate", b"").decode("latin-1")
            return SpanContext(parts[1], parts[2], bool(int(parts[3], 16) & 1), state)
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
    flag = "01" if context.sampled else "00"
    out = [(b"traceparent", f"00-{context.trace_id}-{context.span_id}-{flag}".encode())]
    if context.tracestate:
        out.append((b"tracestate", context.tracestate.encode("latin-1")))
    out += [(b"x-b3-traceid", context.trace_id.encode()), (b"x-b3-spanid", context.span_id.encode()),
            (b"x-b3-sampled", b"1" if context.sampled else b"0")]
    if parent_span:
        out.append((b"x-b3-parentspanid", parent_span.encode()))
    return tuple(out)
