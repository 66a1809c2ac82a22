"""A real Prometheus started by ``kizuna up examples/httpbin``: after a few seconds of load through the sleep
instance's sidecar, Prometheus (scraping every sidecar's :15020 found through file-based discovery) answers
Istio's dashboard query ``sum(rate(istio_requests_total{reporter="destination"}[1m])) by
(destination_service)`` with httpbin; ``kizuna status`` shows where it listens, ``kizuna logs --access``
prints the sidecar's access log, and ``kizuna down`` stops Prometheus with the rest."""

from __future__ import annotations

import http.client
import ipaddress
import json
import random
import shutil
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="the prometheus binary is not installed (apt-get install prometheus)")]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "httpbin"
BLOCK = ipaddress.IPv4Network("127.87.0.0/16")
QUERY = 'sum(rate(istio_requests_total{reporter="destination"}[1m])) by (destination_service)'


@pytest.fixture
def running(kit: Any, tmp_path: Path) -> Iterator[tuple[Any, str]]:
    from kizuna.runtime.addresses import choose_pod_range

    state = tmp_path / "state"
    cidr = str(choose_pod_range(str(state), block=BLOCK).network)
    listen = f"127.87.{random.randint(0, 255)}.{random.randint(1, 254)}:9090"
    mesh = kit.Mesh(state, cidr)
    try:
        result = kit.run_kizuna("up", "--detach", "--state-dir", state, "--pod-cidr", cidr, "--prometheus",
                                listen, EXAMPLE / "httpbin.yaml", EXAMPLE / "sleep.yaml", timeout=120)
        if (state / "runtime.json").exists():
            mesh.processes = mesh.runtime()["processes"]
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{mesh.logs()}"
        assert f"prometheus       http://{listen}" in result.stdout
        yield mesh, listen
    finally:
        kit.run_kizuna("down", "--state-dir", state, timeout=60)
        mesh.kill_all()


def query(listen: str) -> list[dict[str, Any]]:
    url = f"http://{listen}/api/v1/query?" + urllib.parse.urlencode({"query": QUERY})
    with urllib.request.urlopen(url, timeout=5) as response:
        data = json.load(response)
    assert data["status"] == "success"
    return list(data["data"]["result"])


def test_prometheus_answers_istio_queries_after_load(running: tuple[Any, str], kit: Any) -> None:
    mesh, listen = running
    prometheus = next(p for p in mesh.processes if p["role"] == "prometheus")
    assert (mesh.state / "prometheus" / "targets.json").exists()
    sleep = mesh.instance("sleep")["meshAddress"]
    sent = 0

    def load(count: int) -> None:
        nonlocal sent
        conn = http.client.HTTPConnection(sleep, 15001, timeout=5)
        try:
            for _ in range(count):
                conn.request("GET", "http://httpbin:8000/get")
                response = conn.getresponse()
                response.read()
                assert response.status == 200
                sent += 1
        finally:
            conn.close()

    # A few seconds of load, bounded in count and time, through the client's sidecar.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and sent < 2000:
        load(20)

    def answered() -> list[dict[str, Any]] | None:
        # rate() needs two scrapes that saw the counter grow: keep a trickle going while asking.
        load(10)
        try:
            result = query(listen)
        except OSError:
            return None
        return [r for r in result if float(r["value"][1]) > 0] or None

    result = kit.wait_until(answered, 30, "Prometheus to report httpbin's request rate", interval=1.0)
    services = {r["metric"].get("destination_service") for r in result}
    assert "httpbin.default.svc.cluster.local" in services
    status = mesh.kizuna("status")
    assert f"prometheus       http://{listen}" in status.stdout
    access = mesh.kizuna("logs", "httpbin", "--access")
    assert access.returncode == 0, access.stderr
    entries = [json.loads(line) for line in access.stdout.splitlines()]
    assert any(e["path"] == "/get" and e["response_code"] == 200 and e["reporter"] == "destination"
               for e in entries)
    down = mesh.kizuna("down")
    assert down.returncode == 0
    assert not kit.alive(prometheus["pid"], prometheus["startTime"])
