"""Distributed tracing in the sidecar: a span per request on each side of a hop, trace context propagated in
W3C and B3 headers, finished spans exported as OTLP/HTTP JSON in the background.

``Tracer.begin`` runs when a request is routed: it reads the caller's context (``protocols/trace_context``),
decides sampling (the caller's decision when it made one, else ``sampling`` percent), opens a span (client
side on outbound, server side on inbound) and returns the headers that carry the new span to the next hop.
``Tracer.end`` closes the span with the response's status and flags. Unsampled requests cost the header
rewrite only. The exporter batches spans, sends them at most every ``FLUSH_SECONDS`` to an OTLP endpoint
(the control plane's receiver by default; Jaeger and the OpenTelemetry Collector accept the same) and drops
spans rather than grow without bound when the collector is slow or away.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple
from urllib.parse import urlsplit

from kizuna.protocols.trace_context import (
    TRACE_HEADER_LENGTHS,
    TRACE_HEADERS,
    SpanContext,
    child_headers,
    new_id,
    scan,
)
from kizuna.proxy.http_client import request

log = logging.getLogger("kizuna.proxy.tracing")

FLUSH_SECONDS: Final = 1.0
MAX_QUEUE: Final = 4096
MAX_BATCH: Final = 512
EXPORT_TIMEOUT: Final = 5.0
"""Seconds one batch's POST may take before it is dropped."""
SPAN_KIND: Final = {"server": 2, "client": 3}
"""OTLP's SpanKind numbers."""

Headers = Sequence[tuple[bytes, bytes]]


@dataclass(slots=True)
class Span:
    """One side of one hop of one request."""

    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: str
    start_ns: int
    end_ns: int = 0
    attributes: dict[str, Any] = field(default_factory=dict)
    error: bool = False

    def to_otlp(self) -> dict[str, Any]:
        """The span in OTLP/JSON."""
        out: dict[str, Any] = {
            "traceId": self.trace_id, "spanId": self.span_id, "name": self.name,
            "kind": SPAN_KIND[self.kind], "startTimeUnixNano": str(self.start_ns),
            "endTimeUnixNano": str(self.end_ns),
            "attributes": [{"key": k, "value": _any_value(v)} for k, v in self.attributes.items()],
            "status": {"code": 2 if self.error else 1}}
        if self.parent_id:
            out["parentSpanId"] = self.parent_id
        return out


def _any_value(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    return {"stringValue": str(value)}


class Begun(NamedTuple):
    """What ``Tracer.begin`` gives: the span (None when not sampled), the trace headers to send onward, and
    whether the request carried trace headers of its own (which must then be dropped: ``strip_trace_headers``);
    without any, ``onward`` is simply added."""

    span: Span | None
    onward: tuple[tuple[bytes, bytes], ...]
    carried: bool


class Tracer:
    """Opens and closes the spans of one proxy and hands finished ones to its exporter."""

    __slots__ = ("service", "workload", "sampling", "exporter")

    def __init__(self, service: str, workload: str, sampling: float, exporter: OtlpExporter | None) -> None:
        self.service = service
        """Reported as ``service.name`` (``<workload>.<namespace>``, as Istio names proxies' traces)."""
        self.workload = workload
        self.sampling = sampling
        """Percent of new traces recorded (callers that decided already are followed)."""
        self.exporter = exporter

    def begin(self, headers: Headers, kind: str) -> Begun:
        """A span for a request whose headers are ``headers`` (None when not sampled: the caller names a span
        and sets its attributes only when there is one), and the trace headers the request must carry onward
        instead of its own."""
        caller, carried = scan(headers)
        if caller is not None and caller.sampled is not None:
            sampled = caller.sampled
        else:
            sampled = self.sampling >= 100.0 or random.random() * 100.0 < self.sampling
        trace_id = caller.trace_id if caller is not None else new_id(32)
        parent = caller.span_id if caller is not None else ""
        span_id = new_id(16)
        onward = child_headers(SpanContext(trace_id, span_id, sampled, caller.tracestate if caller else ""),
                               parent or None)
        if not sampled:
            return Begun(None, onward, carried)
        return Begun(Span(trace_id, span_id, parent, "", kind, time.time_ns()), onward, carried)

    def end(self, span: Span, status: int, flags: str = "", **attributes: Any) -> None:
        """Close ``span`` with the response status (and the proxy's response flags) and export it."""
        span.end_ns = time.time_ns()
        span.attributes["http.status_code"] = status
        if flags:
            span.attributes["response_flags"] = flags
        span.attributes.update(attributes)
        span.error = status >= 500 or status == 0 or attributes.get("grpc.status_code", "0") != "0"
        if self.exporter is not None:
            self.exporter.add(self, span)


def replace_trace_headers(headers: Headers, onward: Headers) -> tuple[tuple[bytes, bytes], ...]:
    """``headers`` with the trace headers swapped for ``onward``."""
    return (*strip_trace_headers(headers), *onward)


def strip_trace_headers(headers: Headers) -> tuple[tuple[bytes, bytes], ...]:
    """``headers`` without trace headers."""
    return tuple((n, v) for n, v in headers if len(n) not in TRACE_HEADER_LENGTHS or n.lower() not in TRACE_HEADERS)


class OtlpExporter:
    """Batches finished spans and POSTs them as OTLP/HTTP JSON to ``endpoint`` (``http://host:port/v1/traces``)."""

    def __init__(self, endpoint: str) -> None:
        parts = urlsplit(endpoint)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 4318
        self.path = parts.path or "/v1/traces"
        self.queue: list[tuple[Tracer, Span]] = []
        self.exported = 0
        self.dropped = 0
        self.failures = 0
        self._timer: asyncio.TimerHandle | None = None
        self._sending = False

    def add(self, tracer: Tracer, span: Span) -> None:
        if len(self.queue) >= MAX_QUEUE:
            self.dropped += 1
            return
        self.queue.append((tracer, span))
        if self._timer is None and not self._sending:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(FLUSH_SECONDS, lambda: loop.create_task(self.flush()))

    async def flush(self) -> None:
        """Send what is queued (in batches), now."""
        self._timer = None
        if self._sending:
            return
        self._sending = True
        try:
            while self.queue:
                batch, self.queue = self.queue[:MAX_BATCH], self.queue[MAX_BATCH:]
                try:
                    await self._post(batch)
                    self.exported += len(batch)
                except (OSError, TimeoutError, ValueError) as exc:
                    self.failures += 1
                    self.dropped += len(batch)
                    log.debug("trace export to %s:%d failed: %s", self.host, self.port, exc)
        finally:
            self._sending = False

    async def _post(self, batch: list[tuple[Tracer, Span]]) -> None:
        by_service: dict[str, list[dict[str, Any]]] = {}
        for tracer, span in batch:
            by_service.setdefault(tracer.service, []).append(span.to_otlp())
        body = json.dumps({"resourceSpans": [
            {"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
             "scopeSpans": [{"scope": {"name": "kizuna"}, "spans": spans}]}
            for service, spans in by_service.items()]}).encode()
        response = await request(self.host, self.port, "POST", self.path, timeout=EXPORT_TIMEOUT, body=body,
                                 headers=((b"Content-Type", b"application/json"),))
        if not 200 <= response.status < 300:
            raise ValueError(f"collector answered {response.status_line}")

    def to_json(self) -> dict[str, Any]:
        return {"exported": self.exported, "dropped": self.dropped, "failures": self.failures,
                "queued": len(self.queue)}
