"""Spans from two tracers (a client sidecar and a server sidecar of one hop) exported over OTLP/HTTP JSON to the
control plane's embedded receiver: one trace, the server span a child of the client span, the caller's trace
continued; unsampled requests still propagate context but export nothing."""

from __future__ import annotations

import asyncio

from kizuna.controlplane.traces import OtlpReceiver, TraceStore
from kizuna.proxy.tracing import OtlpExporter, Tracer
from kizuna.testing.mesh import loopback_addresses

CALLER = [(b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]


def test_one_hop_makes_one_trace_with_parent_links() -> None:
    async def run() -> TraceStore:
        store = TraceStore()
        receiver = OtlpReceiver(store)
        (address,) = loopback_addresses(1, prefix="127.92")
        host, port = await receiver.start(address, 0)
        try:
            exporter = OtlpExporter(f"http://{host}:{port}/v1/traces")
            client = Tracer("sleep.default", "sleep", 100.0, exporter)
            server = Tracer("httpbin.default", "httpbin", 1.0, exporter)  # follows the caller's decision
            out_span, onward, _ = client.begin(CALLER, "client")
            in_span, _, _ = server.begin(onward, "server")
            assert out_span is not None and in_span is not None
            server.end(in_span, 200)
            client.end(out_span, 200)
            unsampled, headers, _ = client.begin([(b"traceparent", CALLER[0][1][:-2] + b"00")], "client")
            assert unsampled is None and dict(headers)[b"traceparent"].endswith(b"-00")
            await exporter.flush()
            assert exporter.to_json()["exported"] == 2
        finally:
            await receiver.close()
        return store

    store = asyncio.run(run())
    (summary,) = store.summaries()
    assert summary["traceId"] == "4bf92f3577b34da6a3ce929d0e0e4736" and summary["spans"] == 2
    assert summary["services"] == ["httpbin.default", "sleep.default"]
    spans = store.trace(summary["traceId"])
    assert spans is not None
    by_kind = {s["kind"]: s for s in spans}
    assert by_kind["client"]["parentSpanId"] == "00f067aa0ba902b7"  # the app's span
    assert by_kind["server"]["parentSpanId"] == by_kind["client"]["spanId"]
    assert by_kind["server"]["attributes"]["http.status_code"] == 200
