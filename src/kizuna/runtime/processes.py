"""Starting and stopping the mesh's processes.

Every process starts in its own session (so its own process group): a Ctrl-C in the user's terminal reaches
only ``kizuna up``, which then stops the mesh in order, and stopping a process means signalling its whole
group, workers it forked included (gunicorn's). Each process is recorded in ``runtime.json`` the moment it is
spawned, with the start time the kernel gives it (``/proc/<pid>/stat``), so a later ``kizuna down`` from
another process can tell our process from an unrelated one that reused its pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kizuna.runtime.state import StateDir

POLL_INTERVAL = 0.05


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """One process the runtime started: enough to find it, and its group, again from another process."""

    name: str
    role: str
    """``controlplane``, ``sidecar`` or ``app``."""
    pid: int
    pgid: int
    start_time: int
    """Kernel start time in clock ticks since boot; a recycled pid has a different one."""
    argv: tuple[str, ...]
    log: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "pid": self.pid, "pgid": self.pgid,
                "startTime": self.start_time, "argv": list(self.argv), "log": self.log}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProcessRecord:
        return cls(str(data["name"]), str(data["role"]), int(data["pid"]), int(data["pgid"]),
                   int(data["startTime"]), tuple(data.get("argv", ())), str(data.get("log", "")))


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` the runtime needs."""

    state: str
    pgid: int
    start_time: int

    @property
    def alive(self) -> bool:
        """False for a zombie (dead, waiting to be reaped): it holds no sockets and runs no code."""
        return self.state not in ("Z", "X", "x")


def proc_stat(pid: int) -> ProcStat | None:
    """``pid``'s state, process group and start time, or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces or parentheses.
    fields = text[text.rindex(")") + 2:].split()
    return ProcStat(state=fields[0], pgid=int(fields[2]), start_time=int(fields[19]))


def is_running(record: ProcessRecord) -> bool:
    """True when the recorded process (same pid *and* start time) is alive."""
    stat = proc_stat(record.pid)
    return stat is not None and stat.alive and stat.start_time == record.start_time


def group_members(pgids: Iterable[int]) -> dict[int, list[int]]:
    """Live (non-zombie) processes in each of ``pgids``, found by scanning ``/proc``."""
    wanted = set(pgids)
    found: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = proc_stat(int(entry.name))
        if stat is not None and stat.alive and stat.pgid in wanted:
            found.setdefault(stat.pgid, []).append(int(entry.name))
    return found


def ours(record: ProcessRecord, members: Sequence[int]) -> bool:
    """Whether the live processes in ``record``'s group are really what we started.

    While the leader lives, its start time decides. Once it is gone, orphans left in the group are ours: the
    kernel does not hand out a pid that is still some group's id, so nobody else can have formed that group.
    """
    leader = proc_stat(record.pid)
    if leader is not None and leader.alive:
        return leader.start_time == record.start_time
    return bool(members)


def spawn(name: str, role: str, argv: Sequence[str], *, env: Mapping[str, str], cwd: str | Path,
          log_path: Path) -> tuple[subprocess.Popen[bytes], ProcessRecord]:
    """Start ``argv`` in a new session with stdout and stderr appended to ``log_path``."""
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 cwd=str(cwd), env=dict(env), start_new_session=True, close_fds=True)
    stat = proc_stat(popen.pid)  # our child: readable until we reap it, even if it died already
    record = ProcessRecord(name, role, popen.pid, popen.pid, stat.start_time if stat else 0, tuple(argv),
                           str(log_path))
    return popen, record


def stop(records: Sequence[ProcessRecord], *, grace: float, reap: Callable[[], None] = lambda: None
         ) -> list[int]:
    """SIGTERM every recorded process (its whole group when it leads one), SIGKILL what is left after
    ``grace`` seconds.

    ``reap`` is called while waiting so the caller can collect its own exited children. Returns the pids still
    alive at the end (empty when everything stopped).
    """
    targets = list(live(records))
    _signal(targets, signal.SIGTERM)
    if _wait_gone(targets, grace, reap):
        return []
    _signal(live(targets), signal.SIGKILL)
    _wait_gone(targets, 2.0, reap)
    return sorted(pid for pids in live(targets).values() for pid in pids)


def live(records: Iterable[ProcessRecord]) -> dict[ProcessRecord, list[int]]:
    """Records with live processes, and those processes: a record's whole group if it leads one (what stopping
    it must end), else just itself. One scan of ``/proc``."""
    records = list(records)
    groups = group_members(r.pgid for r in records if r.pgid == r.pid)
    found: dict[ProcessRecord, list[int]] = {}
    for record in records:
        if record.pgid != record.pid:
            members = [record.pid] if is_running(record) else []
        else:
            members = groups.get(record.pgid, [])
            members = members if ours(record, members) else []
        if members:
            found[record] = members
    return found


def _signal(records: Iterable[ProcessRecord], signum: signal.Signals) -> None:
    for record in records:
        try:
            if record.pgid == record.pid:
                os.killpg(record.pgid, signum)
            else:
                os.kill(record.pid, signum)
        except ProcessLookupError:
            pass


def _wait_gone(records: Sequence[ProcessRecord], timeout: float, reap: Callable[[], None]) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        reap()
        if not live(records):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL)


class Supervisor:
    """The processes of one mesh, started by this process: spawns, records in ``runtime.json``, stops."""

    def __init__(self, state: StateDir, record: dict[str, Any]) -> None:
        self._state = state
        self._record = record
        self._record.setdefault("processes", [])
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._state.write_runtime(self._record)

    @property
    def record(self) -> dict[str, Any]:
        """The runtime record as last written."""
        return self._record

    def update(self, **fields: Any) -> None:
        """Set top-level fields of the runtime record and write it."""
        self._record.update(fields)
        self._state.write_runtime(self._record)

    def spawn(self, name: str, role: str, argv: Sequence[str], *, env: Mapping[str, str], cwd: str | Path
              ) -> ProcessRecord:
        """Start a process logging to ``<state>/logs/<name>.log``; record it before doing anything else."""
        popen, record = spawn(name, role, argv, env=env, cwd=cwd, log_path=self._state.log(name))
        self._children[popen.pid] = popen
        self._record["processes"].append(record.to_json())
        self._state.write_runtime(self._record)
        return record

    def reload(self) -> None:
        """Take the record from ``runtime.json`` again: another process (``kizuna scale``) may have added or
        removed instances and processes since this one last wrote it."""
        data = self._state.read_runtime()
        if data is not None:
            self._record = data
            self._record.setdefault("processes", [])

    def started_here(self, record: ProcessRecord) -> bool:
        """Whether this process spawned ``record`` (and so can see its exit status)."""
        return record.pid in self._children

    def processes(self) -> list[ProcessRecord]:
        """Every process started so far."""
        return [ProcessRecord.from_json(p) for p in self._record["processes"]]

    def exited(self) -> list[tuple[ProcessRecord, int]]:
        """Started processes that have exited, with their exit status (negative: killed by that signal)."""
        done = []
        for record in self.processes():
            child = self._children.get(record.pid)
            if child is not None and child.poll() is not None:
                done.append((record, child.returncode))
        return done

    def reap(self) -> None:
        """Collect exited children so they do not linger as zombies."""
        for child in self._children.values():
            child.poll()

    def stop(self, grace: float) -> list[int]:
        """Stop every started process (see ``stop``); returns pids left alive."""
        left = stop(self.processes(), grace=grace, reap=self.reap)
        self.reap()
        return left

    def release(self) -> None:
        """Forget the children without stopping them (``--detach``): they outlive this process by design."""
        for child in self._children.values():
            # Popen warns when collected while its process runs; here that is the point, so mark it handled.
            child.returncode = child.returncode if child.returncode is not None else 0
        self._children.clear()
