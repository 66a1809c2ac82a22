"""Transparent mode's start and stop: every way a mesh ends leaves no namespace, link, iptables chain, /etc/netns
entry or process behind; a job's sidecar ends with the job; ``up`` refuses to start over leftovers.

What is left is checked with the tools a user would use (``ip netns list``, ``ip -o link``, ``iptables-save``,
``ls /etc/netns``): ``kit.host_traces``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

WEB = """
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  ports: [{name: http, port: 80, targetPort: 8080}]
  selector: {app: web}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: python
        command: ["python", "-m", "http.server", "--bind", "$(POD_IP)", "8080"]
        env: [{name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}]
        ports: [{containerPort: 8080}]
"""

JOB = """
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: job}
spec:
  selector: {matchLabels: {app: job}}
  template:
    metadata: {labels: {app: job}}
    spec:
      containers:
      - name: job
        image: busybox
        # Calls the web Service once told to, then finishes.
        command: ["sh", "-c", "while [ ! -e GO ]; do sleep 0.1; done; curl -s -o /dev/null http://web/; exit 0"]
        workingDir: "."
"""


@pytest.fixture
def kit_ok(kit: Any) -> Any:
    reason = kit.transparent_missing()
    if reason:
        pytest.skip(reason)
    return kit


class Foreground:
    """``kizuna up --mode transparent`` in the foreground, as in a terminal."""

    def __init__(self, kit: Any, state: Path, manifest: Path) -> None:
        self.kit, self.state = kit, state
        self.output = state.parent / "up.out"
        with open(self.output, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kizuna", "up", "--mode", "transparent", "--state-dir", str(state),
                 str(manifest)], stdout=out, stderr=subprocess.STDOUT, env=kit.kizuna_env(),
                start_new_session=True)

    def text(self) -> str:
        return self.output.read_text()

    def wait_running(self) -> None:
        self.kit.wait_until(lambda: "press Ctrl-C" in self.text() or self.process.poll() is not None, 60,
                            "kizuna up to be ready")
        assert self.process.poll() is None, self.text()

    def processes(self) -> list[dict[str, Any]]:
        import json

        data: list[dict[str, Any]] = json.loads((self.state / "runtime.json").read_text())["processes"]
        return data

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


@pytest.fixture
def foreground(kit_ok: Any, tmp_path: Path) -> Iterator[Any]:
    started: list[Foreground] = []

    def start(manifest_text: str) -> Foreground:
        manifest = tmp_path / "mesh.yaml"
        manifest.write_text(manifest_text)
        fg = Foreground(kit_ok, tmp_path / "state", manifest)
        started.append(fg)
        return fg

    try:
        yield start
    finally:
        for fg in started:
            fg.close()
            kit_ok.run_kizuna("down", "--state-dir", fg.state)


def process_gone(record: dict[str, Any], kit: Any) -> bool:
    return not kit.alive(record["pid"], record["startTime"]) and not kit.group_alive(record["pgid"])


def test_down_leaves_nothing(transparent_mesh_factory: Any, kit_ok: Any, tmp_path: Path) -> None:
    manifest = tmp_path / "web.yaml"
    manifest.write_text(WEB)
    mesh = transparent_mesh_factory(manifest)
    # While it runs: the namespace, veth and bridge, and the bridge's FORWARD rules (nothing routed off it).
    from kizuna.runtime.netns import Names, mesh_id

    names = Names(mesh_id(mesh.state))
    assert {"netns", "links", "chains", "etc"} <= set(kit_ok.network_leftovers(mesh.state))
    rules = subprocess.run(["iptables", "-S", names.forward_chain], capture_output=True, text=True).stdout
    assert rules.splitlines()[1:] == [f"-A {names.forward_chain} -i {names.bridge} -o {names.bridge} -j ACCEPT",
                                      f"-A {names.forward_chain} -i {names.bridge} -j DROP",
                                      f"-A {names.forward_chain} -o {names.bridge} -j DROP"]
    result = mesh.kizuna("down")
    assert result.returncode == 0, result.stderr
    assert kit_ok.host_traces(mesh.state) == []
    assert mesh.live_processes() == []


def test_ctrl_c_stops_in_order_and_a_finished_job_takes_its_sidecar(foreground: Any, kit_ok: Any) -> None:
    fg = foreground(WEB + JOB)
    fg.wait_running()
    records = {p["name"]: p for p in fg.processes()}
    job_dir = Path(fg.state).parent  # the job's workingDir is the manifest's directory
    (job_dir / "GO").touch()
    kit_ok.wait_until(lambda: process_gone(records["job-0.default.proxy"], kit_ok), 20,
                      "the job's sidecar to stop after the job finished")
    assert fg.process.poll() is None  # the rest of the mesh keeps running
    assert not process_gone(records["web-0.default.proxy"], kit_ok)

    os.killpg(fg.process.pid, signal.SIGINT)
    assert fg.process.wait(60) == 0, fg.text()
    assert all(process_gone(p, kit_ok) for p in records.values())
    assert kit_ok.host_traces(fg.state) == []
    assert not (fg.state / "runtime.json").exists()


def test_down_after_up_was_killed(foreground: Any, kit_ok: Any) -> None:
    fg = foreground(WEB)
    fg.wait_running()
    records = fg.processes()
    os.kill(fg.process.pid, signal.SIGKILL)  # only `kizuna up` itself: its children run on, as after a crash
    fg.process.wait(10)
    assert not any(process_gone(p, kit_ok) for p in records)

    refused = kit_ok.run_kizuna("up", "--detach", "--mode", "transparent", "--state-dir", fg.state,
                                fg.state.parent / "mesh.yaml")
    assert refused.returncode == 1 and "already running" in refused.stderr

    result = kit_ok.run_kizuna("down", "--state-dir", fg.state)
    assert result.returncode == 0, result.stderr
    assert all(process_gone(p, kit_ok) for p in records)
    assert kit_ok.host_traces(fg.state) == []


def test_up_refuses_to_start_over_leftovers_and_down_cleans_them(kit_ok: Any, tmp_path: Path) -> None:
    from kizuna.runtime.netns import Names, mesh_id

    state = tmp_path / "state"
    names = Names(mesh_id(state))
    manifest = tmp_path / "web.yaml"
    manifest.write_text(WEB)
    # As if a machine crash interrupted an earlier run: a namespace and the bridge, with no record of them.
    subprocess.run(["ip", "netns", "add", names.netns(0)], check=True)
    try:
        subprocess.run(["ip", "link", "add", names.bridge, "type", "bridge"], check=True)
        result = kit_ok.run_kizuna("up", "--detach", "--mode", "transparent", "--state-dir", state, manifest)
        assert result.returncode == 1
        assert result.stderr == (f"kizuna: leftovers of an earlier run of this mesh exist (links: {names.bridge}; "
                                 f"netns: {names.netns(0)}); remove them with `kizuna down --state-dir "
                                 f"{state}`\n")
        down = kit_ok.run_kizuna("down", "--state-dir", state)
        assert down.returncode == 0 and "removed its network" in down.stdout, down.stdout + down.stderr
        assert kit_ok.host_traces(state) == []
    finally:
        subprocess.run(["ip", "netns", "delete", names.netns(0)], capture_output=True)
        subprocess.run(["ip", "link", "delete", names.bridge], capture_output=True)
