"""``kizuna down``: stop everything a mesh runs, from any process, using only the state directory.

What to stop comes from ``runtime.json`` (every process ``kizuna up`` spawned) plus ``controlplane.json`` (a
control plane restarted by hand is not in the runtime's record). A foreground ``kizuna up`` still running is
asked to exit too. Logs, the store and the token stay for inspection; the records of running processes go.

Stopping a state directory where nothing runs is not an error (exit 0, with a note), so ``down`` can always be
run to make sure.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

from kizuna.runtime.errors import UserError
from kizuna.runtime.processes import ProcessRecord, is_running, live, proc_stat, stop
from kizuna.runtime.state import StateDir


def recorded_processes(state: StateDir) -> list[ProcessRecord]:
    """Every process this mesh is known to run: the runtime's record and the control plane's own file."""
    record = state.read_runtime() or {}
    processes = [ProcessRecord.from_json(p) for p in record.get("processes", [])]
    controlplane = _controlplane_process(state)
    if controlplane is not None and all(p.pid != controlplane.pid for p in processes):
        processes.append(controlplane)
    return processes


def running_processes(state: StateDir) -> list[ProcessRecord]:
    """The recorded processes that are alive."""
    return list(live(recorded_processes(state)))


def _controlplane_process(state: StateDir) -> ProcessRecord | None:
    data = state.read_controlplane()
    pid = int(data.get("pid", 0)) if data else 0
    stat = proc_stat(pid) if pid > 0 else None
    if stat is None or not stat.alive or not _is_controlplane(pid):
        return None
    return ProcessRecord("controlplane", "controlplane", pid, stat.pgid, stat.start_time, (), "")


def _is_controlplane(pid: int) -> bool:
    # controlplane.json may be stale and its pid reused by something else: only stop a kizuna control plane.
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(b"kizuna" in a for a in argv) and any(a.endswith(b"controlplane") for a in argv)


def _up_process(state: StateDir) -> ProcessRecord | None:
    up = (state.read_runtime() or {}).get("up") or {}
    if not up or int(up.get("pid", 0)) == os.getpid():
        return None
    record = ProcessRecord("up", "up", int(up["pid"]), 0, int(up.get("startTime", 0)), (), "")
    return record if is_running(record) else None


def down(state: StateDir, grace: float) -> str:
    """Stop the mesh in ``state``; returns what was done, one line. UserError if something would not stop."""
    foreground = _up_process(state)
    if foreground is not None:
        # Let a foreground `kizuna up` know, so it exits instead of reporting its processes as crashed.
        try:
            os.kill(foreground.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    targets = running_processes(state)
    if not targets:
        removed = _remove_network(state)
        _forget(state)
        if removed:
            return f"no process of the mesh in {state.root} was running; removed its network ({removed})"
        return f"no mesh is running in {state.root} (nothing to stop)"
    if (state.read_runtime() or {}).get("network"):
        from kizuna.runtime.transparent import stop_in_order

        left = stop_in_order(targets, grace)
    else:
        left = stop(targets, grace=grace)
    if left:
        raise UserError(f"could not stop processes {', '.join(map(str, left))} of the mesh in {state.root}")
    _remove_network(state)
    _forget(state)
    counts = Counter(p.role for p in targets)
    parts = [_ROLES.get(role, role) if n == 1 else f"{n} {role}s" for role, n in sorted(counts.items())]
    return f"stopped the mesh in {state.root}: {', '.join(parts)}"


def _remove_network(state: StateDir) -> str:
    """Transparent mode's host objects of this mesh (found by name: also those a killed `up` never
    recorded); what was removed, or "" when there was nothing."""
    from kizuna.runtime import netns

    if netns.missing_tools():
        return ""
    names = netns.Names(netns.mesh_id(state.root))
    found = netns.existing(names)
    if not found:
        return ""
    left = netns.teardown(names)
    if left:
        raise UserError(f"could not remove {', '.join(left)} of the mesh in {state.root}")
    return netns.describe_leftovers(found)


_ROLES = {"controlplane": "the control plane", "sidecar": "1 sidecar", "app": "1 app",
          "gateway": "the ingress gateway"}


def _forget(state: StateDir) -> None:
    state.runtime_json.unlink(missing_ok=True)
    data = state.read_controlplane()
    if data is not None and _controlplane_process(state) is None:
        # A control plane killed before it could clean up leaves its address behind; clients would try it.
        state.controlplane_json.unlink(missing_ok=True)
