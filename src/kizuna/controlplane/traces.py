"""The embedded trace backend: an OTLP/HTTP (JSON) receiver and a bounded store of recent traces.

Sidecars export spans to ``http://<control plane>:4318/v1/traces`` (OTLP's HTTP port) unless pointed at
another collector; the store keeps the last ``MAX_TRACES`` traces (oldest dropped first) and answers the API's
``GET /v1/traces`` (recent traces, summarised) and ``GET /v1/traces?id=<trace id>`` (one trace's spans, parents
first). The receiver takes no token: it listens on the control plane's own loopback or bridge address and only
accepts spans.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any, Final

from kizuna.controlplane.httpserver import HttpServer, Request, Response, error_response, json_response

OTLP_PORT: Final = 4318
MAX_TRACES: Final = 1000
MAX_SPANS_PER_TRACE: Final = 500


def _attributes(items: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or ():
        value = item.get("value") or {}
        for key in ("stringValue", "intValue", "boolValue", "doubleValue"):
            if key in value:
                out[str(item.get("key"))] = int(value[key]) if key == "intValue" else value[key]
                break
    return out


class TraceStore:
    """Recent traces by id, bounded."""

    def __init__(self, max_traces: int = MAX_TRACES) -> None:
        self.max_traces = max_traces
        self.traces: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self.received = 0

    def add_otlp(self, body: dict[str, Any]) -> int:
        """Store the spans of one OTLP/JSON export request; returns how many."""
        count = 0
        for resource in body.get("resourceSpans") or ():
            service = _attributes((resource.get("resource") or {}).get("attributes")).get("service.name", "")
            for scope in resource.get("scopeSpans") or ():
                for span in scope.get("spans") or ():
                    self._add(str(service), span)
                    count += 1
        self.received += count
        return count

    def _add(self, service: str, span: dict[str, Any]) -> None:
        trace_id = str(span.get("traceId", "")).lower()
        if not trace_id:
            return
        spans = self.traces.get(trace_id)
        if spans is None:
            spans = self.traces[trace_id] = []
            while len(self.traces) > self.max_traces:
                self.traces.popitem(last=False)
        if len(spans) >= MAX_SPANS_PER_TRACE:
            return
        kind = {2: "server", 3: "client"}.get(int(span.get("kind") or 0), "internal")
        spans.append({"traceId": trace_id, "spanId": str(span.get("spanId", "")).lower(),
                      "parentSpanId": str(span.get("parentSpanId", "")).lower(), "name": span.get("name", ""),
                      "service": service, "kind": kind,
                      "start": int(span.get("startTimeUnixNano", 0)), "end": int(span.get("endTimeUnixNano", 0)),
                      "attributes": _attributes(span.get("attributes")),
                      "error": (span.get("status") or {}).get("code") == 2})

    def summaries(self, limit: int = 50) -> list[dict[str, Any]]:
        """The most recent traces first: id, root name, services, span count, duration (ms), error."""
        out = []
        for trace_id, spans in reversed(self.traces.items()):
            ids = {s["spanId"] for s in spans}
            roots = [s for s in spans if s["parentSpanId"] not in ids] or spans
            root = min(roots, key=lambda s: s["start"])
            start, end = min(s["start"] for s in spans), max(s["end"] for s in spans)
            out.append({"traceId": trace_id, "root": f"{root['service']}: {root['name']}",
                        "services": sorted({s["service"] for s in spans}), "spans": len(spans),
                        "durationMs": round((end - start) / 1e6, 3), "error": any(s["error"] for s in spans)})
            if len(out) >= limit:
                break
        return out

    def trace(self, trace_id: str) -> list[dict[str, Any]] | None:
        """One trace's spans by start time, or None."""
        spans = self.traces.get(trace_id.lower())
        return sorted(spans, key=lambda s: s["start"]) if spans is not None else None


class OtlpReceiver:
    """``POST /v1/traces`` (OTLP/HTTP JSON) into a store, on a listener of its own."""

    def __init__(self, store: TraceStore) -> None:
        self.store = store
        self._http = HttpServer(self.handle)

    async def start(self, host: str, port: int = OTLP_PORT) -> tuple[str, int]:
        return await self._http.start(host, port)

    async def close(self) -> None:
        await self._http.close()

    async def handle(self, request: Request) -> Response:
        if request.path != "/v1/traces":
            return error_response(404, "only /v1/traces (OTLP/HTTP JSON) is served here")
        if request.method != "POST":
            return error_response(405, "POST /v1/traces")
        if "protobuf" in request.headers.get("content-type", ""):
            return error_response(415, "send OTLP as JSON (application/json)")
        try:
            body = json.loads(request.body or b"{}")
            accepted = self.store.add_otlp(body if isinstance(body, dict) else {})
        except (ValueError, TypeError, AttributeError) as exc:
            return error_response(400, f"not OTLP/JSON: {exc}")
        return json_response(200, {"accepted": accepted})
