"""Trace context read from W3C and B3 headers and written onward in both formats."""

from __future__ import annotations

import pytest

from kizuna.protocols.trace_context import SpanContext, child_headers, extract

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


@pytest.mark.parametrize(("headers", "expected"), [
    ([(b"traceparent", f"00-{TRACE}-{SPAN}-01".encode()), (b"tracestate", b"congo=t61rcWkgMzE")],
     SpanContext(TRACE, SPAN, True, "congo=t61rcWkgMzE")),
    ([(b"traceparent", f"00-{TRACE}-{SPAN}-00".encode())], SpanContext(TRACE, SPAN, False)),
    ([(b"x-b3-traceid", TRACE.encode()), (b"x-b3-spanid", SPAN.encode()), (b"x-b3-sampled", b"1")],
     SpanContext(TRACE, SPAN, True)),
    ([(b"x-b3-traceid", TRACE[16:].encode()), (b"x-b3-spanid", SPAN.encode())],  # 64-bit B3 trace id
     SpanContext("0" * 16 + TRACE[16:], SPAN, None)),
    ([(b"b3", f"{TRACE}-{SPAN}-d".encode())], SpanContext(TRACE, SPAN, True)),
    ([(b"traceparent", f" 01-{TRACE.upper()}-{SPAN}-03-later ".encode())],  # a later version's extra field
     SpanContext(TRACE, SPAN, True)),
])
def test_extract(headers: list[tuple[bytes, bytes]], expected: SpanContext) -> None:
    assert extract(headers) == expected


@pytest.mark.parametrize("headers", [
    [], [(b"traceparent", b"garbage")], [(b"traceparent", f"00-{'0' * 32}-{SPAN}-01".encode())],
    [(b"traceparent", f"ff-{TRACE}-{SPAN}-01".encode())], [(b"x-b3-traceid", TRACE.encode())],
    [(b"traceparent", f"00-{TRACE}-{'0' * 16}-01".encode())], [(b"traceparent", f"00-{TRACE}-{SPAN}-0g".encode())],
    [(b"traceparent", f"00-{TRACE}-{SPAN}".encode())], [(b"traceparent", f"00-{TRACE}x-{SPAN}-01".encode())]])
def test_no_usable_context(headers: list[tuple[bytes, bytes]]) -> None:
    assert extract(headers) is None


def test_w3c_wins_over_b3_and_onward_headers_carry_both() -> None:
    headers = [(b"x-b3-traceid", b"1" * 32), (b"x-b3-spanid", b"2" * 16),
               (b"traceparent", f"00-{TRACE}-{SPAN}-01".encode())]
    assert extract(headers) == SpanContext(TRACE, SPAN, True)
    onward = dict(child_headers(SpanContext(TRACE, "a" * 16, True), parent_span=SPAN))
    assert onward[b"traceparent"] == f"00-{TRACE}-{'a' * 16}-01".encode()
    assert (onward[b"x-b3-traceid"], onward[b"x-b3-spanid"], onward[b"x-b3-parentspanid"],
            onward[b"x-b3-sampled"]) == (TRACE.encode(), b"a" * 16, SPAN.encode(), b"1")


def test_header_names_in_any_case() -> None:
    assert extract([(b"Traceparent", f"00-{TRACE}-{SPAN}-01".encode())]) == SpanContext(TRACE, SPAN, True)
