"""Starting and stopping whole meshes: ``kizuna down``, Ctrl-C of a foreground ``kizuna up``, and a killed
``kizuna up`` — after each, no process is left (by pid, start time and process group) and nothing listens on
the mesh's addresses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

WEB = """\
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  ports:
  - {name: http, port: 80, targetPort: 8080}
  selector: {app: web}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: python:3.11
        command: ["python", "-m", "http.server", "--bind", "$(POD_IP)", "8080"]
        env:
        - name: POD_IP
          valueFrom: {fieldRef: {fieldPath: status.podIP}}
        ports:
        - containerPort: 8080
        readinessProbe:
          httpGet: {path: /, port: 8080}
"""


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "web.yaml"
    path.write_text(WEB)
    return path


def recorded(state: Path) -> list[dict[str, Any]]:
    processes: list[dict[str, Any]] = json.loads((state / "runtime.json").read_text())["processes"]
    return processes


def assert_all_gone(kit: Any, processes: list[dict[str, Any]], cidr: str) -> None:
    assert len(processes) == 5  # control plane + 2 sidecars + 2 apps
    assert [p["name"] for p in processes if kit.alive(p["pid"], p["startTime"])] == []
    assert [p["name"] for p in processes if kit.group_alive(p["pgid"])] == []
    assert kit.listeners_in(cidr) == []


def test_down_stops_everything_and_a_second_up_is_refused_meanwhile(kit: Any, mesh_factory: Any,
                                                                   manifest: Path) -> None:
    mesh = mesh_factory(manifest)
    processes = recorded(mesh.state)
    assert {p["role"] for p in processes} == {"controlplane", "sidecar", "app"}
    assert all(p["pgid"] == p["pid"] for p in processes)  # each in its own process group
    listening = kit.listeners_in(mesh.pod_cidr)
    for i in (0, 1):
        instance = mesh.instance("web", i)
        assert f"{instance['podAddress']}:8080" in listening  # the app
        assert f"{instance['meshAddress']}:8080" in listening  # its sidecar's inbound
        assert f"{instance['meshAddress']}:15000" in listening  # its sidecar's admin

    again = mesh.kizuna("up", "--detach", manifest)
    assert again.returncode == 1
    assert again.stderr == (f"kizuna: a mesh is already running in {mesh.state}; stop it with `kizuna down` or "
                            "use another --state-dir\n")

    down = mesh.kizuna("down")
    assert down.returncode == 0, down.stderr
    assert down.stdout == f"stopped the mesh in {mesh.state}: 2 apps, the control plane, 2 sidecars\n"
    assert_all_gone(kit, processes, mesh.pod_cidr)
    assert not (mesh.state / "runtime.json").exists()
    assert not (mesh.state / "controlplane.json").exists()
    assert (mesh.state / "logs" / "web-0.default.log").exists()  # logs stay for a post-mortem

    again = mesh.kizuna("down")
    assert (again.returncode, again.stdout) == (0, f"no mesh is running in {mesh.state} (nothing to stop)\n")


def start_foreground(kit: Any, state: Path, cidr: str, manifest: Path) -> tuple[subprocess.Popen[str], list[str]]:
    process = subprocess.Popen([sys.executable, "-m", "kizuna", "up", "--state-dir", str(state), "--pod-cidr",
                                cidr, str(manifest)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=kit.kizuna_env(), start_new_session=True)
    lines: list[str] = []
    assert process.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    return process, lines


def stop_leftovers(kit: Any, process: subprocess.Popen[str], state: Path) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(10)
    kit.run_kizuna("down", "--state-dir", state, "--stop-grace", "1")


def test_ctrl_c_of_foreground_up_stops_everything(kit: Any, manifest: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    cidr = kit.free_pod_cidr(str(state))
    process, lines = start_foreground(kit, state, cidr, manifest)
    try:
        kit.wait_until(lambda: any("Ctrl-C" in line for line in lines) or process.poll() is not None, 60,
                       "kizuna up to report the mesh ready")
        assert process.poll() is None, "".join(lines)
        processes = recorded(state)
        assert any(line.startswith("web ") and "web-0.default" in line for line in lines), "".join(lines)
        os.kill(process.pid, signal.SIGINT)
        assert process.wait(30) == 0, "".join(lines)
        assert_all_gone(kit, processes, cidr)
        assert not (state / "runtime.json").exists()
    finally:
        stop_leftovers(kit, process, state)


def test_down_cleans_up_after_a_killed_up(kit: Any, manifest: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    cidr = kit.free_pod_cidr(str(state))
    process, lines = start_foreground(kit, state, cidr, manifest)
    try:
        kit.wait_until(lambda: any("Ctrl-C" in line for line in lines) or process.poll() is not None, 60,
                       "kizuna up to report the mesh ready")
        processes = recorded(state)
        process.kill()  # no chance to clean up
        process.wait(10)
        assert all(kit.alive(p["pid"], p["startTime"]) for p in processes)
        down = kit.run_kizuna("down", "--state-dir", state)
        assert down.returncode == 0, down.stderr
        assert_all_gone(kit, processes, cidr)
    finally:
        stop_leftovers(kit, process, state)
