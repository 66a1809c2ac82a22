"""``kizuna scale``: a running mesh's Deployment runs more or fewer instances, and a client running across the
change sees no failed request (retries off, so a refused or reset request would show). Scaling down drains:
each removed sidecar withdraws its endpoint, keeps serving while that push travels, then drains; scaling up
starts a sidecar and app as ``kizuna up`` does, and the new instance serves. ``kizuna down`` stops it all."""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

BLOCK = ipaddress.IPv4Network("127.102.0.0/17")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "httpbin"
HTTPBIN_X3 = """\
apiVersion: v1
kind: Service
metadata:
  name: httpbin
spec:
  ports:
  - {name: http, port: 8000, targetPort: 8080}
  selector: {app: httpbin}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: httpbin
spec:
  replicas: 3
  selector:
    matchLabels: {app: httpbin}
  template:
    metadata:
      labels: {app: httpbin}
    spec:
      containers:
      - name: httpbin
        command: ["python", "-m", "gunicorn", "-b", "$(POD_IP):8080", "-k", "gthread", "--threads", "4",
                  "--access-logfile", "-", "httpbin:app"]
        env:
        - name: POD_IP
          valueFrom: {fieldRef: {fieldPath: status.podIP}}
        ports:
        - {containerPort: 8080, name: http}
        readinessProbe:
          httpGet: {path: /status/200, port: 8080}
          periodSeconds: 1
---
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


class Clients:
    """Threads sending keep-alive requests through a client sidecar until stopped (bounded in time)."""

    def __init__(self, proxy: str, threads: int = 3, limit: float = 90.0) -> None:
        self.proxy = proxy
        self.statuses: list[int | str] = []
        self.stop = threading.Event()
        self.limit = limit
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        connection = http.client.HTTPConnection(self.proxy, 15001, timeout=10)
        deadline = time.monotonic() + self.limit
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                # Slow enough that requests are in flight when an instance goes.
                connection.request("GET", "http://httpbin:8000/delay/0.1")
                response = connection.getresponse()
                response.read()
                self.statuses.append(response.status)
            except (OSError, http.client.HTTPException) as exc:
                self.statuses.append(repr(exc))
                connection.close()
                connection = http.client.HTTPConnection(self.proxy, 15001, timeout=10)
        connection.close()

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(20)


@pytest.fixture(scope="module")
def mesh(kit: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from kizuna.runtime.addresses import choose_pod_range

    root = tmp_path_factory.mktemp("scale")
    manifest = root / "httpbin-x3.yaml"
    manifest.write_text(HTTPBIN_X3)
    state = root / "state"
    mesh = kit.Mesh(state, str(choose_pod_range(str(state), block=BLOCK).network))
    try:
        result = kit.run_kizuna("up", "--detach", "--mode", "proxy", "--state-dir", state, "--pod-cidr",
                                mesh.pod_cidr, "--prometheus", "off", "--dashboard", "off", manifest,
                                EXAMPLE / "sleep.yaml", timeout=120)
        if (state / "runtime.json").exists():
            mesh.processes = mesh.runtime()["processes"]
        assert result.returncode == 0, f"kizuna up failed:\n{result.stdout}\n{result.stderr}\n{mesh.logs()}"
        yield mesh
    finally:
        try:
            if (state / "runtime.json").exists():
                seen = {p["pid"] for p in mesh.processes}
                mesh.processes += [p for p in mesh.runtime()["processes"] if p["pid"] not in seen]
            kit.run_kizuna("down", "--state-dir", state, timeout=60)
        finally:
            mesh.kill_all()


def httpbin_instances(mesh: Any) -> list[str]:
    return sorted(i["name"] for i in mesh.runtime()["instances"] if i["deployment"] == "httpbin")


def deployments_row(mesh: Any, name: str) -> list[str]:
    status = mesh.kizuna("status")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    start = lines.index("deployments:")
    return next(line.split() for line in lines[start + 2:] if line.split()[:2] == [name, "default"])


def test_scaling_down_then_up_fails_no_request(mesh: Any, kit: Any) -> None:
    assert httpbin_instances(mesh) == ["httpbin-0", "httpbin-1", "httpbin-2"]
    assert deployments_row(mesh, "httpbin")[2] == "3/3"
    removed = [p for p in mesh.runtime()["processes"] if p["name"].split(".")[0] in ("httpbin-1", "httpbin-2")]
    assert len(removed) == 4  # two sidecars, two apps
    clients = Clients(mesh.instance("sleep")["meshAddress"])
    try:
        kit.wait_until(lambda: len(clients.statuses) > 20, 20.0, "requests before scaling")
        down = mesh.kizuna("scale", "httpbin", "--replicas", "1", timeout=60)
        assert down.returncode == 0, down.stderr
        assert "scaled from 3 to 1" in down.stdout, down.stdout
        after = len(clients.statuses)
        kit.wait_until(lambda: len(clients.statuses) > after + 40, 30.0, "requests after scaling down")
    finally:
        clients.close()
    failures = [s for s in clients.statuses if s != 200]
    assert clients.statuses and failures == [], f"{len(failures)} of {len(clients.statuses)} failed: {failures[:5]}"
    assert all(not kit.alive(p["pid"], p["startTime"]) for p in removed)
    assert httpbin_instances(mesh) == ["httpbin-0"]
    assert deployments_row(mesh, "httpbin")[2] == "1/1"
    got = mesh.kizuna("get", "deployments", "httpbin", "-o", "json")
    assert got.returncode == 0 and '"replicas": 1' in got.stdout, got.stdout + got.stderr

    # Back to two: the new instance takes the free ordinal and address, starts, and serves.
    log = mesh.log("httpbin-1.default")
    seen = log.stat().st_size if log.exists() else 0
    up = mesh.kizuna("scale", "httpbin", "--replicas", "2", timeout=90)
    mesh.processes += [p for p in mesh.runtime()["processes"] if p not in mesh.processes]
    assert up.returncode == 0, up.stderr + mesh.logs()
    assert "started httpbin-1.default" in up.stdout, up.stdout
    assert httpbin_instances(mesh) == ["httpbin-0", "httpbin-1"]
    assert deployments_row(mesh, "httpbin")[2] == "2/2"
    proxy = mesh.instance("sleep")["meshAddress"]

    def served_by_new() -> bool:
        connection = http.client.HTTPConnection(proxy, 15001, timeout=10)
        try:
            for _ in range(10):
                connection.request("GET", "http://httpbin:8000/get")
                response = connection.getresponse()
                response.read()
                assert response.status == 200
        finally:
            connection.close()
        return b"GET /get" in log.read_bytes()[seen:]

    kit.wait_until(served_by_new, 20.0, "the new instance to serve", interval=0.2)


def test_down_stops_scaled_instances(mesh: Any, kit: Any) -> None:
    scaled = [p for p in mesh.runtime()["processes"] if p["name"].startswith("httpbin-")]
    assert scaled, "runtime.json lists the instances kizuna scale started"
    result = mesh.kizuna("down", timeout=60)
    assert result.returncode == 0, result.stderr
    assert [p["name"] for p in scaled if kit.alive(p["pid"], p["startTime"]) or kit.group_alive(p["pgid"])] == []


CLIENT_LOOP = """\
import http.client, json, os, sys, time
stop, statuses, deadline = sys.argv[1], [], time.monotonic() + 60
connection = http.client.HTTPConnection("httpbin", 8000, timeout=10)
while not os.path.exists(stop) and time.monotonic() < deadline:
    try:
        connection.request("GET", "/delay/0.1")
        response = connection.getresponse()
        response.read()
        statuses.append(response.status)
    except (OSError, http.client.HTTPException) as exc:
        statuses.append(repr(exc))
        connection.close()
        connection = http.client.HTTPConnection("httpbin", 8000, timeout=10)
    if len(statuses) % 10 == 0:
        print(len(statuses), flush=True)
print(json.dumps(statuses), flush=True)
"""


def test_transparent_mode_scales_with_namespaces(transparent_mesh_factory: Any, kit: Any, tmp_path: Path
                                                 ) -> None:
    manifest = tmp_path / "httpbin-x3.yaml"
    manifest.write_text(HTTPBIN_X3)
    mesh = transparent_mesh_factory(manifest, EXAMPLE / "sleep.yaml")
    spaces = mesh.runtime()["network"]["netns"]
    gone = [spaces["httpbin-1.default"], spaces["httpbin-2.default"]]
    stop = tmp_path / "stop"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "KIZUNA_STATE_DIR"}
    client = subprocess.Popen([sys.executable, "-m", "kizuna", "exec", "--state-dir", str(mesh.state), "sleep",
                               "--", "python", "-c", CLIENT_LOOP, str(stop)], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "10"  # requests flow before the change
        down = mesh.kizuna("scale", "httpbin", "--replicas", "1", timeout=60)
        assert down.returncode == 0, down.stderr
        for _ in range(5):  # 50 more requests after it
            client.stdout.readline()
        stop.touch()
        out, _ = client.communicate(timeout=30)
    finally:
        stop.touch()
        if client.poll() is None:
            client.kill()
        client.wait(10)
    statuses = json.loads(out.strip().splitlines()[-1])
    failures = [s for s in statuses if s != 200]
    assert len(statuses) > 50 and failures == [], f"{len(failures)} of {len(statuses)} failed: {failures[:5]}"
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [ns for ns in gone if ns in listed.split()], listed
    assert set(mesh.runtime()["network"]["netns"]) == {"httpbin-0.default", "sleep-0.default"}

    up = mesh.kizuna("scale", "httpbin", "--replicas", "2", timeout=90)
    mesh.processes += [p for p in mesh.runtime()["processes"] if p not in mesh.processes]
    assert up.returncode == 0, up.stderr + mesh.logs()
    assert "httpbin-1.default" in mesh.runtime()["network"]["netns"]
    log = mesh.log("httpbin-1.default")
    seen = log.read_bytes().count(b"GET /get")

    def served_by_new() -> bool:
        result = subprocess.run([sys.executable, "-m", "kizuna", "exec", "--state-dir", str(mesh.state), "sleep",
                                 "--", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                 "http://httpbin:8000/get"], capture_output=True, text=True, env=env, timeout=20)
        assert result.stdout == "200", result
        return log.read_bytes().count(b"GET /get") > seen

    kit.wait_until(served_by_new, 30.0, "the new instance to serve", interval=0.1)


def test_ctrl_c_on_a_foreground_up_stops_scaled_instances_too(kit: Any, tmp_path: Path) -> None:
    import signal

    from kizuna.runtime.addresses import choose_pod_range

    state = tmp_path / "state"
    mesh = kit.Mesh(state, str(choose_pod_range(str(state), block=BLOCK).network))
    log = tmp_path / "up.log"
    prometheus = f"{ipaddress.IPv4Network(mesh.pod_cidr)[250]}:19090"  # scrape targets follow the scale
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "kizuna", "up", "--mode", "proxy", "--state-dir",
                                    str(state), "--pod-cidr", mesh.pod_cidr, "--prometheus", prometheus,
                                    "--dashboard", "off", str(EXAMPLE / "sleep.yaml")], stdout=out,
                                   stderr=subprocess.STDOUT,
                                   env=kit.kizuna_env(), start_new_session=True)
    try:
        kit.wait_until(lambda: b"running; press Ctrl-C" in log.read_bytes() or process.poll() is not None, 60,
                       "kizuna up to be ready")
        assert process.poll() is None, log.read_text()
        scaled = mesh.kizuna("scale", "sleep", "--replicas", "3", timeout=60)
        mesh.processes = mesh.runtime()["processes"]
        assert scaled.returncode == 0, scaled.stderr
        added = [p for p in mesh.processes if p["name"].startswith(("sleep-1.", "sleep-2."))]
        assert len(added) == 4 and all(kit.alive(p["pid"], p["startTime"]) for p in added)
        targets = json.loads((state / "prometheus" / "targets.json").read_text())
        assert sorted(t["labels"]["instance_id"] for t in targets) == [f"sleep-{i}.default" for i in range(3)]
        shrunk = mesh.kizuna("scale", "sleep", "--replicas", "2", timeout=60)
        assert shrunk.returncode == 0, shrunk.stderr
        time.sleep(1.0)  # a foreground up notices exits every 0.5 s: a scaled-down instance is no crash
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(60) == 0, log.read_text()
        text = log.read_text()
        assert "exited" not in text.split("running; press Ctrl-C")[1].split("stopping the mesh")[0], text
        assert [p["name"] for p in added if kit.alive(p["pid"], p["startTime"])] == []
        assert not (state / "runtime.json").exists()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        kit.run_kizuna("down", "--state-dir", state, timeout=60)
        mesh.kill_all()
