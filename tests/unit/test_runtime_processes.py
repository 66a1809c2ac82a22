"""Spawning and stopping real processes: whole process groups, records that survive the spawner, no pid reuse
accidents."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kizuna.runtime.processes import (
    ProcessRecord,
    Supervisor,
    group_members,
    is_running,
    live,
    proc_stat,
    spawn,
    stop,
)
from kizuna.runtime.state import StateDir

pytestmark = pytest.mark.integration

# A parent that forks a child into its own group and ignores SIGTERM, as a stubborn server with workers would.
FORKING = ("import os, signal, time\n"
           "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
           "if os.fork() == 0:\n"
           "    time.sleep(60)\n"
           "    os._exit(0)\n"
           "print('ready', flush=True)\n"
           "time.sleep(60)\n")


@pytest.fixture
def state(tmp_path: Path) -> Iterator[StateDir]:
    state = StateDir(tmp_path / "state")
    state.create()
    yield state
    # Whatever a test left behind is killed here, by the recorded groups only.
    record = state.read_runtime() or {}
    stop([ProcessRecord.from_json(p) for p in record.get("processes", [])], grace=0.1)


def wait_for(path: Path, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in (path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline, f"{text!r} never appeared in {path}"
        time.sleep(0.02)


def test_spawned_process_is_recorded_at_once_and_logs_to_its_file(state: StateDir) -> None:
    supervisor = Supervisor(state, {"processes": []})
    argv = [sys.executable, "-c", "print('hi'); import time; time.sleep(30)"]
    record = supervisor.spawn("hello", "app", argv, env=dict(os.environ), cwd=state.root)
    on_disk = (state.read_runtime() or {})["processes"]
    assert [ProcessRecord.from_json(p) for p in on_disk] == [record]
    assert record.pgid == record.pid  # its own session, so its own group
    assert os.getsid(record.pid) == record.pid
    wait_for(state.log("hello"), "hi")
    assert is_running(record)
    assert supervisor.stop(grace=5.0) == []
    assert not is_running(record)
    assert supervisor.exited()[0][1] == -15  # SIGTERM


def test_stop_kills_the_whole_group_after_the_grace_period(state: StateDir) -> None:
    supervisor = Supervisor(state, {"processes": []})
    record = supervisor.spawn("stubborn", "app", [sys.executable, "-c", FORKING], env=dict(os.environ),
                              cwd=state.root)
    wait_for(state.log("stubborn"), "ready")
    members = group_members([record.pgid])[record.pgid]
    assert len(members) == 2
    started = time.monotonic()
    assert supervisor.stop(grace=0.3) == []
    assert time.monotonic() - started >= 0.3  # SIGTERM was ignored; SIGKILL ended it
    assert group_members([record.pgid]) == {}
    assert supervisor.exited()[0][1] == -9


def test_a_record_from_another_process_can_stop_orphaned_workers(state: StateDir, tmp_path: Path) -> None:
    # Spawned here but stopped only through its record, as `kizuna down` does after `kizuna up --detach`.
    popen, record = spawn("orphans", "app", [sys.executable, "-c", FORKING], env=dict(os.environ),
                          cwd=tmp_path, log_path=tmp_path / "orphans.log")
    state.write_runtime({"processes": [record.to_json()]})
    wait_for(tmp_path / "orphans.log", "ready")
    leader = popen.pid
    child = next(pid for pid in group_members([record.pgid])[record.pgid] if pid != leader)
    os.kill(leader, 9)  # the leader dies first; its worker stays in the group
    popen.wait()
    assert not is_running(record)
    assert live([record]) == {record: [child]}
    assert stop([record], grace=0.2) == []
    assert proc_stat(child) is None or not proc_stat(child).alive  # type: ignore[union-attr]


def test_a_recycled_pid_is_never_signalled() -> None:
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                          start_new_session=True) as bystander:
        try:
            stat = proc_stat(bystander.pid)
            assert stat is not None
            # The same pid with another start time: a record of some earlier process that used this pid.
            stale = ProcessRecord("old", "app", bystander.pid, bystander.pid, stat.start_time - 1, (), "")
            assert not is_running(stale)
            assert live([stale]) == {}
            assert stop([stale], grace=0.1) == []
            assert bystander.poll() is None
            current = dataclasses.replace(stale, start_time=stat.start_time)
            assert stop([current], grace=5.0) == []
            assert bystander.wait(5) == -15
        finally:
            bystander.kill()
