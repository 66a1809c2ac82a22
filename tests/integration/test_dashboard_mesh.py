"""The dashboard on a real mesh: ``kizuna up examples/httpbin`` (proxy mode, pod range in 127.91.0.0/16), load
from sleep through its sidecar, then what a user sees. ``kizuna dashboard`` prints the URL; ``/api/graph``
has the edge sleep → httpbin with a rate; ``/api/services/default/httpbin`` has the series and the
VirtualService and DestinationRule that apply. The browser test drives Debian's Chromium with Playwright
(``dashboard/tests/browse.mjs``): the graph shows the edges, a click on httpbin shows its charts, and a
screenshot is kept under the test's tmp dir."""

from __future__ import annotations

import http.client
import ipaddress
import json
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "httpbin"
BLOCK = ipaddress.IPv4Network("127.91.0.0/16")
BROWSE = REPO / "dashboard" / "tests" / "browse.mjs"
CHROMIUM = "/usr/bin/chromium"


class Load:
    """Requests from sleep to httpbin through sleep's sidecar, in a background thread, bounded in count and
    time; stops when the test is done."""

    def __init__(self, sidecar: str, seconds: float = 60.0, limit: int = 20000) -> None:
        self.sidecar = sidecar
        self.sent = 0
        self.statuses: dict[int, int] = {}
        self._stop = threading.Event()
        self._deadline = time.monotonic() + seconds
        self._limit = limit
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline and self.sent < self._limit:
            conn = http.client.HTTPConnection(self.sidecar, 15001, timeout=5)
            try:
                for path in ("/get", "/get", "/get", "/status/404"):
                    conn.request("GET", f"http://httpbin:8000{path}")
                    response = conn.getresponse()
                    response.read()
                    self.statuses[response.status] = self.statuses.get(response.status, 0) + 1
                    self.sent += 1
            except OSError:
                pass
            finally:
                conn.close()
            self._stop.wait(0.02)  # a steady trickle, not a flood: the 2 cores also run the mesh


@pytest.fixture(scope="module")
def mesh(kit: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    from kizuna.runtime.addresses import choose_pod_range

    state = tmp_path_factory.mktemp("dashboard") / "state"
    cidr = str(choose_pod_range(str(state), block=BLOCK).network)
    mesh = kit.Mesh(state, cidr)
    try:
        result = kit.run_kizuna("up", "--detach", "--state-dir", state, "--pod-cidr", cidr, "--prometheus", "off",
                                "--dashboard", "127.0.0.1:0", EXAMPLE / "httpbin.yaml", EXAMPLE / "sleep.yaml",
                                EXAMPLE / "networking" / "destination-rule.yaml",
                                EXAMPLE / "networking" / "virtual-service-50-50.yaml", timeout=120)
        if (state / "runtime.json").exists():
            mesh.processes = mesh.runtime()["processes"]
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{mesh.logs()}"
        printed = mesh.kizuna("dashboard")
        assert printed.returncode == 0, printed.stderr
        url = printed.stdout.strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/")
        assert f"dashboard        {url}" in result.stdout
        yield mesh, url
    finally:
        kit.run_kizuna("down", "--state-dir", state, timeout=60)
        mesh.kill_all()


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def test_graph_has_sleep_to_httpbin_with_rate_after_load(mesh: tuple[Any, str], kit: Any) -> None:
    running, url = mesh
    with Load(running.instance("sleep")["meshAddress"]) as load:
        def edges() -> list[dict[str, Any]] | None:
            view = get_json(url + "api/graph")
            found = [e for e in view["edges"] if e["source"] == "default/sleep"
                     and e["target"] in ("default/httpbin-v1", "default/httpbin-v2") and e["rps"] > 0]
            return found if len(found) == 2 else None

        # The dashboard scrapes every 5 s and needs two scrapes that saw the counters grow.
        found = kit.wait_until(edges, 40, "the dashboard to show sleep → httpbin v1 and v2", interval=1.0)
    assert load.statuses.get(200), load.statuses
    for edge in found:
        assert edge["service"] == "httpbin.default.svc.cluster.local"
        # One request in four asks for a 404 (not retried, unlike a 503: each try would count).
        assert 0.15 < edge["errorRate"] < 0.35, edge
        assert edge["p99"] is not None and edge["p99"] > 0
    view = get_json(url + "api/graph")
    assert view["source"] == "proxies"  # no Prometheus in this mesh: the control plane scraped the sidecars
    nodes = {n["id"]: n for n in view["nodes"]}
    assert nodes["default/httpbin-v2"]["parent"] == "svc:default/httpbin"
    assert nodes["default/sleep"]["kind"] == "workload"
    service = get_json(url + "api/services/default/httpbin")
    assert any(v and v > 0 for v in service["series"]["rps"])
    assert sorted((c["kind"], c["name"]) for c in service["config"]) == [
        ("DestinationRule", "httpbin"), ("VirtualService", "httpbin")]
    assert {p["workload"] for p in service["proxies"]} == {"httpbin-v1", "httpbin-v2"}
    assert all(p["connected"] and p["ackedVersion"] for p in service["proxies"])
    status = running.kizuna("status")
    assert f"dashboard        {url}" in status.stdout


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="the prometheus binary is not installed (apt-get install prometheus)")
def test_graph_comes_from_the_mesh_prometheus_when_it_runs(kit: Any, tmp_path: Path) -> None:
    from kizuna.runtime.addresses import choose_pod_range

    state = tmp_path / "state"
    cidr = choose_pod_range(str(state) + "-prometheus", block=BLOCK).network
    prometheus = f"{cidr.network_address + 250}:9090"  # instances take the first addresses of the range
    mesh = kit.Mesh(state, str(cidr))
    try:
        result = kit.run_kizuna("up", "--detach", "--state-dir", state, "--pod-cidr", cidr, "--prometheus",
                                prometheus, "--dashboard", "127.0.0.1:0", EXAMPLE / "httpbin.yaml",
                                EXAMPLE / "sleep.yaml", timeout=120)
        if (state / "runtime.json").exists():
            mesh.processes = mesh.runtime()["processes"]
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{mesh.logs()}"
        url = mesh.kizuna("dashboard").stdout.strip()
        with Load(mesh.instance("sleep")["meshAddress"]):
            def edge() -> dict[str, Any] | None:
                view = get_json(url + "api/graph")
                if view["source"] != "prometheus":
                    return None
                return next((e for e in view["edges"] if e["source"] == "default/sleep" and e["rps"] > 0), None)

            # Prometheus scrapes every 5 s, the dashboard asks it every 5 s: a few rounds.
            found = kit.wait_until(edge, 60, "the dashboard to show sleep → httpbin from Prometheus", interval=1.0)
        assert found["service"] == "httpbin.default.svc.cluster.local"
        assert found["target"] in ("default/httpbin-v1", "default/httpbin-v2")
    finally:
        kit.run_kizuna("down", "--state-dir", state, timeout=60)
        mesh.kill_all()


def _browser_missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed (apt-get install nodejs; .ci/run installs it)"
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (apt-get install chromium; .ci/run installs it)"
    if not (REPO / "dashboard" / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed (cd dashboard && npm ci; .ci/run does it)"
    return None


def browse(options: dict[str, Any], timeout: float = 90) -> dict[str, Any]:
    """Run the Playwright script; its JSON answer."""
    done = subprocess.run(["node", str(BROWSE), json.dumps(options)], capture_output=True, text=True,
                          timeout=timeout, cwd=BROWSE.parent)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))
def test_browser_shows_edges_and_service_charts(mesh: tuple[Any, str], tmp_path: Path) -> None:
    running, url = mesh
    screenshot = tmp_path / "dashboard-httpbin.png"
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    with Load(running.instance("sleep")["meshAddress"]):
        result = browse({"url": url, "screenshot": str(screenshot), "profile": str(profile),
                         "chromium": CHROMIUM, "timeoutMs": 45000, "click": "svc:default/httpbin",
                         "expect": [["default/sleep", "default/httpbin-v1"], ["default/sleep", "default/httpbin-v2"]]})
    print(f"dashboard screenshot: {screenshot}")
    assert result["ok"], result.get("failure")
    assert result["errors"] == []
    labels = [e["label"] for e in result["edges"] if e["source"] == "default/sleep"]
    assert labels and all("rps" in label for label in labels)
    assert result["title"].startswith("httpbin")
    assert result["charts"] >= 3
    assert "kind: VirtualService" in result["config"] and "kind: DestinationRule" in result["config"]
    assert "httpbin-v1-0.default" in result["proxies"]
    assert result["hash"] == "#/services/default/httpbin"
    assert screenshot.stat().st_size > 10000


@pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))
def test_browser_stays_responsive_with_100_services(tmp_path: Path) -> None:
    import sys

    server = subprocess.Popen([sys.executable, "-m", "kizuna.controlplane.dashboard_synthetic", "--services",
                               "100", "--listen", "127.0.0.1:0", "--interval", "1"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        profile = tmp_path / "chromium-profile"
        profile.mkdir()
        screenshot = tmp_path / "dashboard-100-services.png"
        waterfall = tmp_path / "dashboard-trace-waterfall.png"
        result = browse({"url": url, "screenshot": str(screenshot), "profile": str(profile), "chromium": CHROMIUM,
                         "tracesScreenshot": str(waterfall),
                         "timeoutMs": 30000, "click": "svc:default/svc-042", "minNodes": 301,
                         "expect": [["istio-system/istio-ingressgateway", "default/svc-000-v1"],
                                    ["default/svc-049-v2", "default/svc-099-v1"]]})
        print(f"dashboard screenshots (100 services): {screenshot} {waterfall}")
    finally:
        server.terminate()
        server.wait(10)
        if server.stdout is not None:
            server.stdout.close()
    assert result["ok"], result.get("failure")
    assert result["errors"] == []
    assert len(result["nodes"]) == 301 and len(result["edges"]) == 2 + 4 * 99
    # Responsive: the graph is drawn, a click answers, and a frame is painted, each within a bound a person
    # would accept on this 2-core machine.
    assert result["graphMs"] < 15000, result["graphMs"]
    assert result["clickMs"] < 5000, result["clickMs"]
    assert result["frameMs"] < 1000, result["frameMs"]
    assert result["title"].startswith("svc-042")
    # The trace list and, after a click on the newest trace, its waterfall: one row per span.
    assert result["traceCount"] == 3
    assert result["waterfallRows"] == result["traceSpans"] == 8
    assert result["traceHash"] == f"#/traces/{3:032x}"
