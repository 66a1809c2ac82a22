"""Shared test fixtures: running the real ``kizuna`` command and whole local meshes, always torn down.

Test modules reach the helpers through fixtures (``kit``, ``mesh_factory``), never by importing this file:
pytest may load several ``conftest`` modules under that one name.

``mesh_factory`` (module scope) starts ``kizuna up --detach`` in a fresh state directory with a pod range in
127.40.0.0/16 picked by the runtime's own allocator (a /24 where nothing listens), and stops every mesh it
started when the module ends: ``kizuna down`` first, then SIGKILL to any process group still recorded.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_BLOCK = ipaddress.IPv4Network("127.40.0.0/16")
"""Loopback addresses for meshes started by tests."""


def kizuna_env(**extra: str) -> dict[str, str]:
    """The environment for a ``kizuna`` subprocess: ours, without proxy settings or a state dir."""
    drop = {"HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY",
            "all_proxy", "grpc_proxy", "KIZUNA_STATE_DIR"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


def run_kizuna(*args: str | Path, timeout: float = 60.0, cwd: Path = REPO
               ) -> subprocess.CompletedProcess[str]:
    """Run ``python -m kizuna ARGS`` to completion and capture its output."""
    return subprocess.run([sys.executable, "-m", "kizuna", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=kizuna_env())


def free_pod_cidr(seed: str) -> str:
    """A /24 in 127.40.0.0/16 where nothing listens, chosen by the runtime's allocator."""
    from kizuna.runtime.addresses import choose_pod_range

    return str(choose_pod_range(seed, block=TEST_BLOCK).network)


def listeners_in(cidr: str) -> list[str]:
    """``address:port`` of every TCP socket listening inside ``cidr`` (from /proc/net/tcp)."""
    from kizuna.runtime.addresses import PodRange
    from kizuna.runtime.addresses import listeners_in as listeners

    return listeners(PodRange(ipaddress.IPv4Network(cidr)))


def alive(pid: int, start_time: int) -> bool:
    """True when the process ``pid`` started at ``start_time`` runs (zombies count as gone)."""
    from kizuna.runtime.processes import proc_stat

    stat = proc_stat(pid)
    return stat is not None and stat.alive and stat.start_time == start_time


def group_alive(pgid: int) -> list[int]:
    """Live members of process group ``pgid``."""
    from kizuna.runtime.processes import group_members

    return group_members([pgid]).get(pgid, [])


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Mesh:
    """A mesh started by a test: its state directory, pod range and the processes it runs."""

    state: Path
    pod_cidr: str
    processes: list[dict[str, Any]] = field(default_factory=list)
    """Every process recorded by ``kizuna up`` (pid, pgid, startTime, role, name)."""

    def kizuna(self, command: str, *args: str | Path, timeout: float = 60.0
               ) -> subprocess.CompletedProcess[str]:
        """``kizuna COMMAND --state-dir STATE ARGS``."""
        return run_kizuna(command, "--state-dir", self.state, *args, timeout=timeout)

    def runtime(self) -> dict[str, Any]:
        """The runtime record (``runtime.json``)."""
        data: dict[str, Any] = json.loads((self.state / "runtime.json").read_text())
        return data

    def instance(self, deployment: str, index: int = 0) -> dict[str, Any]:
        """The recorded instance ``<deployment>-<index>``."""
        return next(i for i in self.runtime()["instances"] if i["name"] == f"{deployment}-{index}")

    def log(self, name: str) -> Path:
        """The log file of the process called ``name`` (an instance id, ``<id>.proxy``, ``controlplane``)."""
        return self.state / "logs" / f"{name}.log"

    def logs(self) -> str:
        """Every log, for failure messages."""
        parts = []
        for path in sorted((self.state / "logs").glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def live_processes(self) -> list[dict[str, Any]]:
        """Recorded processes still alive, or whose process group still has members."""
        return [p for p in self.processes if alive(p["pid"], p["startTime"]) or group_alive(p["pgid"])]

    def kill_all(self) -> None:
        """Last resort: SIGKILL every recorded process group that still has members."""
        for p in self.processes:
            if group_alive(p["pgid"]) and (alive(p["pid"], p["startTime"]) or p["pgid"] == p["pid"]):
                try:
                    os.killpg(p["pgid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _start(state: Path, paths: Sequence[str | Path], started: list[Mesh], extra: Sequence[str] = (),
           transparent: bool = False) -> Mesh:
    mesh = Mesh(state, "" if transparent else free_pod_cidr(str(state)))
    started.append(mesh)  # before anything runs: whatever happens next, teardown sees it
    # Transparent mode picks its own free ranges (10.210.0.0/16 and 10.211.0.0/16, from the state dir).
    where = ["--mode", "transparent"] if transparent else ["--pod-cidr", mesh.pod_cidr]
    # Test meshes run no Prometheus and no dashboard unless a test asks (its own option comes later and wins).
    result = run_kizuna("up", "--detach", "--state-dir", state, *where, "--prometheus", "off", "--dashboard", "off",
                        *extra, *paths, timeout=120)
    if (state / "runtime.json").exists():
        mesh.processes = mesh.runtime()["processes"]
        mesh.pod_cidr = mesh.runtime()["podCidr"]
    assert result.returncode == 0, f"kizuna up failed:\n{result.stdout}\n{result.stderr}\n{mesh.logs()}"
    return mesh


def _stop(mesh: Mesh) -> None:
    try:
        if (mesh.state / "runtime.json").exists():
            mesh.processes = mesh.processes or mesh.runtime()["processes"]
        run_kizuna("down", "--state-dir", mesh.state, timeout=60)
    finally:
        mesh.kill_all()
        if not mesh.pod_cidr.startswith("127.") and transparent_missing() is None:
            # Last resort, as kill_all is for processes: the test's namespaces, links and chains go too.
            from kizuna.runtime.netns import Names, mesh_id, teardown

            teardown(Names(mesh_id(mesh.state.absolute())))


def transparent_missing() -> str | None:
    """Why transparent-mode tests cannot run here (they need root, ip and iptables), or None."""
    from kizuna.runtime.modes import missing_capability

    return missing_capability()


def network_leftovers(state: Path) -> dict[str, list[str]]:
    """The mesh's transparent-mode host objects still present, found by name (netns, links, chains, files)."""
    from kizuna.runtime.netns import Names, existing, mesh_id

    return existing(Names(mesh_id(state.absolute())))


def host_traces(state: Path) -> list[str]:
    """What a user would see left on the host, with the tools they would use: ``ip netns list``, ``ip link``,
    ``iptables-save`` and ``/etc/netns``."""
    from kizuna.runtime.netns import mesh_id

    prefix = f"kz{mesh_id(state.absolute())}"
    found = [line for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True
                                             ).stdout.splitlines() if line.startswith(prefix)]
    found += [line for line in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True
                                              ).stdout.splitlines() if f" {prefix}" in line]
    found += [line for line in subprocess.run(["iptables-save"], capture_output=True, text=True
                                              ).stdout.splitlines() if prefix[2:] in line]
    found += [str(p) for p in Path("/etc/netns").glob(f"{prefix}*")]
    return found


class Kit:
    """The helpers above, for test modules (``kit.run_kizuna(...)``, ``kit.wait_until(...)``...)."""

    REPO = REPO
    Mesh = Mesh
    run_kizuna = staticmethod(run_kizuna)
    kizuna_env = staticmethod(kizuna_env)
    free_pod_cidr = staticmethod(free_pod_cidr)
    listeners_in = staticmethod(listeners_in)
    alive = staticmethod(alive)
    group_alive = staticmethod(group_alive)
    wait_until = staticmethod(wait_until)
    transparent_missing = staticmethod(transparent_missing)
    network_leftovers = staticmethod(network_leftovers)
    host_traces = staticmethod(host_traces)


@pytest.fixture(scope="session")
def kit() -> type[Kit]:
    """Helpers for tests that run kizuna for real."""
    return Kit


@pytest.fixture(scope="module")
def mesh_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Mesh]]:
    """``start(*paths, extra=())`` → a running Mesh (``kizuna up --detach``); all stopped at module end."""
    started: list[Mesh] = []

    def start(*paths: str | Path, extra: Sequence[str] = ()) -> Mesh:
        return _start(tmp_path_factory.mktemp("mesh") / "state", paths, started, extra)

    try:
        yield start
    finally:
        for mesh in started:
            _stop(mesh)


@pytest.fixture(scope="module")
def transparent_mesh_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Mesh]]:
    """As ``mesh_factory``, in transparent mode (skips without root, ip and iptables); at module end every
    mesh is stopped and its network removed."""
    reason = transparent_missing()
    if reason:
        pytest.skip(reason)
    started: list[Mesh] = []

    def start(*paths: str | Path, extra: Sequence[str] = ()) -> Mesh:
        return _start(tmp_path_factory.mktemp("mesh") / "state", paths, started, extra, transparent=True)

    try:
        yield start
    finally:
        for mesh in started:
            _stop(mesh)
