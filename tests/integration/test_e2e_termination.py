"""A sidecar that is stopped leaves the mesh without failing a request (Istio users' rollout complaint):
SIGTERM first withdraws its endpoint from every other proxy, keeps serving while that push travels, then
drains. Retries are switched off so that a refused or reset request would show as a failure."""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "httpbin"
NO_RETRIES = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: httpbin
spec:
  hosts: [httpbin]
  http:
  - route:
    - destination: {host: httpbin}
    retries: {attempts: 0}
"""


def test_terminated_sidecar_drains_without_a_failed_request(mesh_factory: Callable[..., Any], kit: Any,
                                                            tmp_path: Path) -> None:
    vs = tmp_path / "no-retries.yaml"
    vs.write_text(NO_RETRIES)
    mesh = mesh_factory(EXAMPLE / "httpbin.yaml", EXAMPLE / "sleep.yaml", vs)
    proxy = mesh.instance("sleep")["meshAddress"]
    statuses: list[int | str] = []
    stop = threading.Event()

    def client() -> None:
        # Keep-alive to the client sidecar, slow requests so some are in flight at the moment of SIGTERM.
        connection = http.client.HTTPConnection(proxy, 15001, timeout=10)
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                connection.request("GET", "http://httpbin:8000/delay/0.1")
                response = connection.getresponse()
                response.read()
                statuses.append(response.status)
            except (OSError, http.client.HTTPException) as exc:
                statuses.append(repr(exc))
                connection.close()
                connection = http.client.HTTPConnection(proxy, 15001, timeout=10)
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        v2 = next(p for p in mesh.runtime()["processes"] if p["name"] == "httpbin-v2-0.default.proxy")
        before = len(statuses)
        os.kill(v2["pid"], signal.SIGTERM)
        kit.wait_until(lambda: len(statuses) > before + 40, 15.0, "requests after the SIGTERM")
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
    failures = [s for s in statuses if s != 200]
    assert statuses and failures == [], f"{len(failures)} of {len(statuses)} failed: {failures[:5]}"
