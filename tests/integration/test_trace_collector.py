"""``kizuna up --trace-collector URL``: the sidecars send their spans to another OTLP/HTTP collector (here a
second OTLP receiver of our own standing in for Jaeger or an OpenTelemetry Collector, on an address of its own)
instead of the control plane's trace store; a URL that is not plain-http OTLP is refused before anything
starts."""

from __future__ import annotations

import http.client
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kizuna.controlplane.client import ControlPlaneClient
from kizuna.controlplane.traces import OtlpReceiver, TraceStore
from kizuna.runtime.errors import UserError
from kizuna.runtime.up import trace_collector
from kizuna.testing.mesh import BackgroundLoop, loopback_addresses

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[TraceStore, str]]:
    loop = BackgroundLoop()
    store = TraceStore()
    receiver = OtlpReceiver(store)
    (address,) = loopback_addresses(1, prefix="127.79")
    host, port = loop.run(receiver.start(address, 0))
    try:
        yield store, f"http://{host}:{port}/v1/traces"
    finally:
        loop.run(receiver.close())
        loop.close()


def test_spans_go_to_the_collector_given(mesh_factory: Callable[..., Any], collector: tuple[TraceStore, str],
                                         kit: Any) -> None:

    store, url = collector
    example = Path(__file__).resolve().parents[2] / "examples" / "httpbin"
    mesh = mesh_factory(example / "httpbin.yaml", example / "sleep.yaml", extra=["--trace-collector", url])
    trace_id = os.urandom(16).hex()

    def call() -> int:
        conn = http.client.HTTPConnection(mesh.instance("sleep")["meshAddress"], 15001, timeout=10)
        try:
            conn.request("GET", "http://httpbin:8000/get",
                         headers={"traceparent": f"00-{trace_id}-{os.urandom(8).hex()}-01"})
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    kit.wait_until(lambda: call() == 200, 20, "httpbin through the sleep sidecar")
    kit.wait_until(lambda: len(store.trace(trace_id) or []) >= 2, 10, "the spans at the collector")
    services = {s["service"] for s in store.trace(trace_id) or []}
    assert "sleep.default" in services and any(s.startswith("httpbin-v") for s in services), services
    # Nothing went to the control plane's own store, and `kizuna status` says where the spans go.
    assert ControlPlaneClient.from_state_dir(mesh.state).traces()["traces"] == []
    status = mesh.kizuna("status").stdout
    assert f"traces           {url} (1% of new traces sampled)" in status.splitlines()


@pytest.mark.parametrize("url", ["https://127.0.0.1:4318/v1/traces", "127.0.0.1:4318", "http://:4318/",
                                 "http://127.0.0.1:99999/v1/traces"])
def test_a_collector_that_is_not_plain_http_otlp_is_refused(url: str) -> None:
    with pytest.raises(UserError, match="--trace-collector"):
        trace_collector(url)


def test_a_collector_without_a_path_gets_otlps_traces_path() -> None:
    assert trace_collector("http://127.0.0.1:4318") == "http://127.0.0.1:4318/v1/traces"
    assert trace_collector("http://jaeger:4318/v1/traces") == "http://jaeger:4318/v1/traces"
    assert trace_collector("") is None
