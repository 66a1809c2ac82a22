"""Istio's status port (15020) for real: ``/stats/prometheus`` merges the sidecar's metrics with the app's own
(the pod annotated ``prometheus.io/scrape|port|path``), still answers with the proxy's metrics when the app's
endpoint fails (counting ``istio_agent_scrape_failures_total``), and ``/healthz/ready`` follows the proxy's
config. First against a sidecar run in-process with a small threaded app, then through ``kizuna up`` with a
Python app exposing ``myapp_hits_total``, and, when installed, the mesh's real Prometheus, which scrapes
15020 only and so stores the app's metric once."""

from __future__ import annotations

import http.client
import json
import random
import shutil
import textwrap
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kizuna.proxy.merged_metrics import APP_TIMEOUT
from kizuna.proxy.sidecar import Sidecar
from kizuna.proxyconfig.bootstrap import AppMetrics
from kizuna.proxyconfig.model import Snapshot
from kizuna.testing.mesh import LocalMesh, loopback_addresses, sidecar_bootstrap

pytestmark = pytest.mark.integration

APP_METRICS = "# HELP myapp_hits_total Hits served.\n# TYPE myapp_hits_total counter\nmyapp_hits_total 3\n"


def get(address: str, port: int, path: str, timeout: float = 10) -> tuple[int, str]:
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def samples(text: str) -> dict[str, float]:
    """``name{labels}`` → value, parsed by Prometheus' Python client (it refuses malformed expositions)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


# -- a sidecar in-process, a threaded app ---------------------------------------------------------------


class App:
    """An app serving ``/metrics`` on a loopback address: ``mode`` ok, status500, slow or chunked."""

    def __init__(self, address: str) -> None:
        self.mode = "ok"
        self.scrapes = 0
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                app.scrapes += 1
                body = APP_METRICS.encode()
                if app.mode == "slow":
                    time.sleep(APP_TIMEOUT + 1)
                if app.mode == "status500":
                    self.send_response(500)
                    body = b"boom\n"
                else:
                    self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                if app.mode == "chunked":
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for piece in (body[:10], body[10:]):
                        self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                    self.wfile.write(b"0\r\n\r\n")
                    return
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((address, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics-app", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def app() -> Iterator[App]:
    (address,) = loopback_addresses(1, prefix="127.77")
    server = App(address)
    try:
        yield server
    finally:
        server.close()


def start_sidecar(mesh: LocalMesh, app_address: str, metrics: AppMetrics | None) -> tuple[Sidecar, str, int]:
    (mesh_address,) = loopback_addresses(1, prefix="127.77")
    # Admin port 0: the Prometheus and status ports are ephemeral too.
    boot = replace(sidecar_bootstrap("metrics-0.default", mesh_address, pod_address=app_address, admin_port=0),
                   app_metrics=metrics)
    sidecar = Sidecar(boot)
    mesh.loop.run(sidecar.start())
    mesh.sidecars.append(sidecar)
    assert sidecar.status_address is not None
    return sidecar, *sidecar.status_address


def test_status_port_merges_the_apps_metrics_and_reports_readiness(mesh: LocalMesh, app: App) -> None:
    sidecar, address, port = start_sidecar(mesh, app.server.server_address[0], AppMetrics(app.port, "/metrics"))
    assert port not in (15020, sidecar.bootstrap.admin_port)
    assert get(address, port, "/healthz/ready") == (503, "not ready: no config applied\n")
    mesh.apply(sidecar, Snapshot("v1"))
    assert get(address, port, "/healthz/ready") == (200, "ready\n")
    status, text = get(address, port, "/stats/prometheus")
    assert status == 200
    assert "# HELP myapp_hits_total Hits served.\n# TYPE myapp_hits_total counter\n" in text
    found = samples(text)
    assert found["myapp_hits_total"] == 3
    assert "kizuna_downstream_cx_total" in found  # the proxy's own metrics, as on 15090
    assert found['istio_agent_scrape_failures_total{type="application"}'] == 0
    assert found["istio_agent_scrapes_total"] == 1
    # The Prometheus port stays the proxy's alone; the status port serves nothing else.
    assert sidecar.prometheus_address is not None
    status, own = get(*sidecar.prometheus_address, "/stats/prometheus")
    assert status == 200 and "myapp_hits_total" not in own and "kizuna_downstream_cx_total" in own
    assert get(address, port, "/config_dump")[0] == 404
    # A chunked answer from the app is merged the same.
    app.mode = "chunked"
    assert samples(get(address, port, "/stats/prometheus")[1])["myapp_hits_total"] == 3


@pytest.mark.parametrize("failure", ["status500", "slow", "refused"])
def test_a_failing_app_endpoint_never_fails_the_merged_answer(mesh: LocalMesh, app: App, failure: str) -> None:
    target = AppMetrics(app.port)
    if failure == "refused":
        target = AppMetrics(app.port + 1 if app.port < 65535 else app.port - 1)  # nothing listens there
    else:
        app.mode = failure
    sidecar, address, port = start_sidecar(mesh, app.server.server_address[0], target)
    mesh.apply(sidecar, Snapshot("v1"))
    started = time.monotonic()
    status, text = get(address, port, "/stats/prometheus")
    assert time.monotonic() - started < APP_TIMEOUT + 1.5  # the slow app is given up on, not waited for
    assert status == 200
    found = samples(text)
    assert "myapp_hits_total" not in found
    assert "kizuna_downstream_cx_total" in found
    assert found['istio_agent_scrape_failures_total{type="application"}'] == 1
    # The next scrape works again once the app does.
    if failure != "refused":
        app.mode = "ok"
        found = samples(get(address, port, "/stats/prometheus")[1])
        assert found["myapp_hits_total"] == 3
        assert found['istio_agent_scrape_failures_total{type="application"}'] == 1


def test_without_app_metrics_the_status_port_serves_the_proxys_and_the_agents(mesh: LocalMesh, app: App) -> None:
    sidecar, address, port = start_sidecar(mesh, app.server.server_address[0], None)
    found = samples(get(address, port, "/stats/prometheus")[1])
    assert "kizuna_downstream_cx_total" in found and found["istio_agent_scrapes_total"] == 1
    assert not any(name.startswith("istio_agent_scrape_failures") for name in found)
    assert app.scrapes == 0


# -- kizuna up, a Python app with its own /metrics, the mesh's Prometheus ---------------------------------

APP_SCRIPT = '''\
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

broken = False


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        global broken
        status, body = 200, "hello\\n"
        if self.path == "/custom/metrics":
            if broken:
                status, body = 500, "metrics are off\\n"
            else:
                body = "# HELP myapp_hits_total Hits served.\\n# TYPE myapp_hits_total counter\\nmyapp_hits_total 3\\n"
        elif self.path == "/break":
            broken = True
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


ThreadingHTTPServer((os.environ["POD_IP"], 8080), Handler).serve_forever()
'''

DEPLOYMENT = """\
apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  selector: {{app: {name}}}
  ports: [{{name: http, port: 8080}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata:
      labels: {{app: {name}}}
      annotations:
        prometheus.io/scrape: "true"
        prometheus.io/port: "8080"
        prometheus.io/path: /custom/metrics
    spec:
      containers:
      - name: app
        command: [python, app.py]
        ports: [{{containerPort: 8080}}]
        readinessProbe: {{httpGet: {{path: /, port: 8080}}, periodSeconds: 1}}
        env:
        - name: POD_IP
          valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}
"""


@pytest.fixture(scope="module")
def up(mesh_factory: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, str | None]:
    """One mesh: ``metricsapp`` and ``flakyapp`` (whose metrics the test turns off), with the mesh's Prometheus
    on a 127.77 address when the binary is installed."""
    base = tmp_path_factory.mktemp("apps")
    (base / "app.py").write_text(APP_SCRIPT)
    manifest = base / "apps.yaml"
    manifest.write_text("---\n".join(textwrap.dedent(DEPLOYMENT).format(name=n) for n in ("metricsapp", "flakyapp")))
    listen = f"127.77.{random.randint(0, 255)}.{random.randint(1, 254)}:9090" if shutil.which("prometheus") else None
    mesh = mesh_factory(manifest, extra=["--prometheus", listen] if listen else [])
    return mesh, listen


def merged(mesh: Any, deployment: str) -> dict[str, float]:
    status, text = get(mesh.instance(deployment)["meshAddress"], 15020, "/stats/prometheus")
    assert status == 200, text
    return samples(text)


def test_kizuna_up_serves_the_apps_and_the_meshs_metrics_on_15020(up: tuple[Any, str | None], kit: Any) -> None:
    mesh, _ = up
    address = mesh.instance("metricsapp")["meshAddress"]
    assert get(address, 8080, "/") == (200, "hello\n")  # one request through the app's sidecar
    assert get(address, 15020, "/healthz/ready") == (200, "ready\n")
    found = kit.wait_until(lambda: (f := merged(mesh, "metricsapp")) and any(
        k.startswith("istio_requests_total{") for k in f) and f, 10, "istio_requests_total on 15020")
    assert found["myapp_hits_total"] == 3
    assert any(k.startswith("istio_requests_total{") and 'reporter="destination"' in k
               and 'destination_workload="metricsapp"' in k and v >= 1 for k, v in found.items())
    assert found['istio_agent_scrape_failures_total{type="application"}'] == 0
    from kizuna.runtime.state import StateDir

    bootstrap = json.loads(StateDir(mesh.state).bootstrap("metricsapp-0.default").read_text())
    assert bootstrap["appMetrics"] == {"port": 8080, "path": "/custom/metrics"}


def test_when_the_apps_metrics_stop_15020_still_serves_the_proxys(up: tuple[Any, str | None]) -> None:
    mesh, _ = up
    address = mesh.instance("flakyapp")["meshAddress"]
    assert merged(mesh, "flakyapp")["myapp_hits_total"] == 3
    assert get(address, 8080, "/break")[0] == 200  # from now on the app answers /custom/metrics with 500
    found = merged(mesh, "flakyapp")
    assert "myapp_hits_total" not in found
    assert found['istio_agent_scrape_failures_total{type="application"}'] >= 1
    assert any(k.startswith("istio_requests_total{") for k in found)  # the /break request itself


def query(listen: str, promql: str) -> list[dict[str, Any]]:
    url = f"http://{listen}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        data = json.load(response)
    assert data["status"] == "success"
    return list(data["data"]["result"])


def test_prometheus_stores_the_apps_metric_once_from_15020(up: tuple[Any, str | None], kit: Any) -> None:
    mesh, listen = up
    if listen is None:
        pytest.skip("the prometheus binary is not installed (apt-get install prometheus)")
    address = mesh.instance("metricsapp")["meshAddress"]

    def scraped() -> list[dict[str, Any]] | None:
        try:
            return query(listen, 'myapp_hits_total{instance_id="metricsapp-0.default"}') or None
        except OSError:
            return None

    (series,) = kit.wait_until(scraped, 30, "Prometheus to store myapp_hits_total", interval=0.5)
    assert float(series["value"][1]) == 3
    assert series["metric"]["instance"] == f"{address}:15020"
    # Every target is a status port: nothing is scraped twice (15090 holds a subset of 15020).
    targets = {r["metric"]["instance"] for r in query(listen, "up")}
    assert f"{address}:15020" in targets
    assert all(t.endswith(":15020") for t in targets)
    assert len(query(listen, 'istio_agent_scrapes_total{instance_id="metricsapp-0.default"}')) == 1


def test_in_transparent_mode_the_sidecar_fetches_the_apps_metrics_uncaptured(
        transparent_mesh_factory: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> None:
    """Behind iptables the sidecar leaves from 127.0.0.6 to reach its app, as its prober does: the capture rules
    let that through, so a scrape is not an inbound request of the app's."""
    base = tmp_path_factory.mktemp("transparent-apps")
    (base / "app.py").write_text(APP_SCRIPT)
    (base / "apps.yaml").write_text(textwrap.dedent(DEPLOYMENT).format(name="metricsapp"))
    mesh = transparent_mesh_factory(base / "apps.yaml")
    address = mesh.instance("metricsapp")["podAddress"]
    assert get(address, 8080, "/") == (200, "hello\n")  # captured: the inbound sidecar counts it
    for _ in range(3):
        found = merged(mesh, "metricsapp")
        assert found["myapp_hits_total"] == 3
    assert found['istio_agent_scrape_failures_total{type="application"}'] == 0
    served = sum(v for k, v in found.items() if k.startswith("istio_requests_total{") and 'reporter="destination"' in k)
    assert served == 1
