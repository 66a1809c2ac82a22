"""Istio's circuit-breaking task with real processes: ``kizuna up`` runs httpbin (gunicorn, v1 and v2) and a sleep
client, the control plane compiles Istio's own DestinationRule file and pushes it to the sleep sidecar, and
concurrent requests through that sidecar trip the breaker (503, ``x-kizuna-flags: UO``) as Istio documents.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "httpbin"
RULE = Path("/work/shared/istio-samples/tasks/circuit-breaking/01-destinationrule-httpbin.yaml")
CLUSTER = "outbound|8000||httpbin.default.svc.cluster.local"


def request(proxy: str, path: str) -> tuple[int, str | None, str | None]:
    conn = http.client.HTTPConnection(proxy, 15001, timeout=10)
    try:
        conn.request("GET", f"http://httpbin:8000{path}")
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("x-kizuna-error"), response.getheader("x-kizuna-flags")
    finally:
        conn.close()


def test_istio_circuit_breaking_task_with_processes(mesh_factory: Callable[..., Any], kit: Any) -> None:
    mesh = mesh_factory(EXAMPLE / "httpbin.yaml", EXAMPLE / "sleep.yaml", RULE)
    proxy = mesh.instance("sleep")["meshAddress"]
    kit.wait_until(lambda: request(proxy, "/status/200")[0] == 200, 20, "httpbin reachable through the mesh")

    results: list[tuple[int, str | None, str | None]] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(8):
            outcome = request(proxy, "/delay/0.2")
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    counts = Counter(results)
    ok, overflow = counts[(200, None, None)], counts[(503, "upstream overflow", "UO")]
    assert ok + overflow == 24, counts
    assert ok >= 3 and overflow >= 3, counts

    conn = http.client.HTTPConnection(proxy, 15000, timeout=5)
    try:
        conn.request("GET", "/stats")
        stats = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    breaker = stats["resilience"][CLUSTER]["circuit_breaker"]
    assert breaker["overflows"] == overflow and stats["flags"]["UO"] == overflow

    def logged_overflows() -> int:
        out = mesh.kizuna("logs", "sleep", "--access")
        entries = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        return sum(1 for e in entries if e["response_flags"] == "UO" and e["response_code"] == 503)

    # The access log is written once a second: every overflow shows there with Envoy's flag.
    kit.wait_until(lambda: logged_overflows() == overflow, 10, "the UO answers in the sleep sidecar's access log")
