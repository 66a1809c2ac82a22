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
from collections.abc import Callable, Iterator
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
    assert again.stderr == (f"kizuna: a mesh is already running in {mesh.state}; stop it with "
                            "`kizuna down` or use another --state-dir\n")

    down = mesh.kizuna("down")
    assert down.returncode == 0, down.stderr
    assert down.stdout == f"stopped the mesh in {mesh.state}: 2 apps, the control plane, 2 sidecars\n"
    assert_all_gone(kit, processes, mesh.pod_cidr)
    assert not (mesh.state / "runtime.json").exists()
    assert not (mesh.state / "controlplane.json").exists()
    assert (mesh.state / "logs" / "web-0.default.log").exists()  # logs stay for a post-mortem

    again = mesh.kizuna("down")
    assert (again.returncode, again.stdout) == (0, f"no mesh is running in {mesh.state} (nothing to stop)\n")


class Foreground:
    """A ``kizuna up`` in the foreground, as in a terminal, with its output collected line by line."""

    def __init__(self, kit: Any, state: Path, cidr: str, manifest: Path) -> None:
        self.kit, self.state = kit, state
        argv = [sys.executable, "-m", "kizuna", "up", "--state-dir", str(state), "--pod-cidr", cidr,
                "--prometheus", "off", "--dashboard", "off", str(manifest)]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=kit.kizuna_env(), start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self) -> None:
        self.kit.wait_until(lambda: "Ctrl-C" in self.output() or self.process.poll() is not None, 60,
                            "kizuna up to report the mesh ready")
        assert self.process.poll() is None, self.output()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self._reader.join(10)
        assert self.process.stdout is not None
        self.process.stdout.close()
        self.kit.run_kizuna("down", "--state-dir", self.state, "--stop-grace", "1")


@pytest.fixture
def foreground(kit: Any, manifest: Path, tmp_path: Path) -> Iterator[Callable[[], tuple[Foreground, str]]]:
    """Starts a foreground ``kizuna up`` of the web manifest: ``(up, pod cidr)``; cleaned up afterwards."""
    started: list[Foreground] = []

    def start() -> tuple[Foreground, str]:
        state = tmp_path / "state"
        cidr = kit.free_pod_cidr(str(state))
        started.append(Foreground(kit, state, cidr, manifest))
        return started[-1], cidr

    try:
        yield start
    finally:
        for up in started:
            up.close()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupting_foreground_up_stops_everything(kit: Any, foreground: Any, signum: int) -> None:
    up, cidr = foreground()
    up.wait_ready()
    processes = recorded(up.state)
    assert any(line.startswith("web ") and "web-0.default" in line for line in up.lines), up.output()
    os.kill(up.process.pid, signum)
    assert up.process.wait(30) == 0, up.output()
    assert_all_gone(kit, processes, cidr)
    assert not (up.state / "runtime.json").exists()
    assert up.output().endswith("stopping the mesh\nstopped\n")


def test_down_cleans_up_after_a_killed_up(kit: Any, foreground: Any) -> None:
    up, cidr = foreground()
    up.wait_ready()
    processes = recorded(up.state)
    up.process.kill()  # no chance to clean up
    up.process.wait(10)
    assert all(kit.alive(p["pid"], p["startTime"]) for p in processes)
    down = kit.run_kizuna("down", "--state-dir", up.state)
    assert down.returncode == 0, down.stderr
    assert_all_gone(kit, processes, cidr)
