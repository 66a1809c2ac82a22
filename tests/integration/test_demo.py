"""``make demo`` as a user runs it: ``examples/bookinfo/loadgen/demo.py`` with the demo's own virtualenv
(``.venv/demo``, where locust lives), then Ctrl-C.

The demo runs in proxy mode here (the transparent mode it picks as root is covered by
``test_bookinfo_transparent.py``), with a pod range, gateway and dashboard in 127.105.0.0/16 so that nothing
clashes with other tests or with a user's demo on 127.0.0.1:8080, one locust user and a 5 s load.
"""

from __future__ import annotations

import ipaddress
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "bookinfo" / "loadgen" / "demo.py"
DEMO_PYTHON = REPO / ".venv" / "demo" / "bin" / "python"
PODS = ipaddress.IPv4Network("127.105.0.0/17")
HOSTS = ipaddress.IPv4Network("127.105.128.0/17")
"""Where the gateway and the dashboard listen: the first address of a /24 where nothing listens."""
READY = re.compile(r"Bookinfo is ready in ([\d.]+)s:\s+(\S+)")
SUMMARY = re.compile(r"Aggregated\s+(\d+)\s+(\d+)\(")
AS_IN_A_TERMINAL = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                    "os.execv(sys.argv[1], sys.argv[1:])")
"""Runs the rest of its arguments with SIGINT's default action, as a shell's foreground job has it: a test
run started in the background by a shell without job control inherits SIGINT ignored, and Python then never
turns Ctrl-C into KeyboardInterrupt."""


def demo_missing() -> str | None:
    """Why the demo cannot run here, or None."""
    if not DEMO_PYTHON.exists():
        return f"the demo's virtualenv is missing ({DEMO_PYTHON}); `make demo` creates it (locust)"
    check = subprocess.run([str(DEMO_PYTHON), "-c", "import kizuna, locust"], capture_output=True, timeout=60)
    if check.returncode != 0:
        return f"the demo's virtualenv cannot import kizuna and locust: {check.stderr.decode()[-300:]}"
    return None


class Output:
    """The demo's stdout and stderr, read line by line in the background (the demo waits on nothing we send)."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._stream = stream
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str] | None:
        """The first line matching ``pattern`` (looking at lines already read too), or None once ``timeout``
        seconds pass or the output ends."""
        for line in self.lines:
            if found := pattern.search(line):
                return found
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                return None
            if line is None:
                return None
            self.lines.append(line)
            if found := pattern.search(line):
                return found
        return None

    def close(self) -> None:
        """Stop reading (once the demo and whatever inherited its stdout are gone)."""
        self._thread.join(timeout=10)
        self._stream.close()

    def rest(self, timeout: float) -> str:
        """Everything, once the output ends (or ``timeout`` passes)."""
        self.wait_for(re.compile(r"(?!x)x"), timeout)
        return "".join(self.lines)


def answers(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=1).close()
    except OSError:
        return False
    return True


def fetch(url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=20) as response:
        return response.status, response.read().decode()


def test_make_demo_is_ready_serves_bookinfo_and_ctrl_c_stops_everything(
        kit: Any, tmp_path: Path) -> None:
    from kizuna.runtime.addresses import choose_pod_range

    if reason := demo_missing():
        pytest.skip(reason)
    state = tmp_path / "state"
    pods = str(choose_pod_range(str(state), block=PODS).network)
    host = str(choose_pod_range(str(state), block=HOSTS).network[1])
    command = [sys.executable, "-c", AS_IN_A_TERMINAL, str(DEMO_PYTHON), str(DEMO),
               "--state-dir", str(state), "--users", "1", "--run-time", "5s",
               # the rest goes to `kizuna up`
               "--mode", "proxy", "--pod-cidr", pods, "--gateway-address", host, "--gateway-port", "8080",
               "--dashboard", f"{host}:20001", "--prometheus", "off"]
    began = time.monotonic()
    # A session of its own, as a terminal's foreground job: Ctrl-C is SIGINT to the whole process group.
    demo = subprocess.Popen(command, cwd=REPO, env=kit.kizuna_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = Output(demo.stdout)  # type: ignore[arg-type]
    processes: list[dict[str, Any]] = []
    try:
        ready = output.wait_for(READY, 20)
        took = time.monotonic() - began
        assert ready is not None, f"no 'Bookinfo is ready' within 20 s:\n{''.join(output.lines)}"
        assert float(ready[1]) <= 20 and took <= 20, f"ready after {took:.1f}s (the demo says {ready[1]}s)"
        processes = kit.Mesh(state, pods).runtime()["processes"]
        url = ready[2]
        assert url == f"http://{host}:8080/productpage"
        status, html = fetch(url)
        assert status == 200 and "The Comedy of Errors" in html and "Book Reviews" in html
        dashboard = output.wait_for(re.compile(r"dashboard: (\S+)"), 5)
        assert dashboard is not None and dashboard[1] == f"http://{host}:20001/"
        assert fetch(dashboard[1])[0] == 200

        # The 5 s load ends by itself; its summary counts what one user sent, none of which failed.
        assert output.wait_for(re.compile("the load has finished"), 60), "".join(output.lines)
        summary = output.wait_for(SUMMARY, 0)
        assert summary is not None and int(summary[1]) > 0 and int(summary[2]) == 0, summary and summary[0]

        os.killpg(demo.pid, signal.SIGINT)
        try:
            assert demo.wait(timeout=90) == 0, "".join(output.lines)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the demo still runs 90 s after Ctrl-C:\n{''.join(output.lines)}")
        text = output.rest(10)
        assert "stopping the mesh" in text and f"stopped the mesh in {state}" in text, text
        assert kit.group_alive(demo.pid) == []  # locust and everything else the demo ran in its group
        left = [p["name"] for p in processes if kit.alive(p["pid"], p["startTime"]) or kit.group_alive(p["pgid"])]
        assert left == []
        assert kit.listeners_in(pods) == []
        assert not answers(host, 8080) and not answers(host, 20001)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
        mesh = kit.Mesh(state, pods, processes)
        if (state / "runtime.json").exists():
            mesh.processes = processes or mesh.runtime()["processes"]
            kit.run_kizuna("down", "--state-dir", state, timeout=60)
        mesh.kill_all()
        output.close()
