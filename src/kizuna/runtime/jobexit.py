"""Run an instance's app; when it exits by itself (a job), stop its sidecar too.

On Kubernetes a finished Job's pod never completes while its istio-proxy container runs (MESH-FACTS §5 item 2).
kizuna starts each transparent-mode app through this small parent, in the app's process group, so the rule
holds whether or not ``kizuna up`` is still watching (``--detach``). When the mesh is being stopped (SIGTERM or
SIGINT reached the group) the sidecar is left to the stopper, which stops sidecars first anyway.

    python -m kizuna.runtime.jobexit SIDECAR_PID SIDECAR_START_TIME -- CMD...
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType

from kizuna.runtime.processes import proc_stat


def run(argv: Sequence[str]) -> int:
    """Run the command after ``--``; returns its exit status (128 + signal when a signal ended it)."""
    sidecar_pid, sidecar_start, separator, *command = argv
    if separator != "--" or not command:
        sys.stderr.write("usage: python -m kizuna.runtime.jobexit PID START_TIME -- CMD...\n")
        return 2
    stopping = False

    def note_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True  # the app got the same signal (one process group) and ends on its own terms

    signal.signal(signal.SIGTERM, note_stop)
    signal.signal(signal.SIGINT, note_stop)
    signal.signal(signal.SIGHUP, note_stop)
    child = subprocess.Popen(command)
    code = child.wait()
    if not stopping:
        stat = proc_stat(int(sidecar_pid))
        # Same pid *and* start time: never signal a process that merely reused the sidecar's pid.
        if stat is not None and stat.alive and stat.start_time == int(sidecar_start):
            try:
                os.killpg(stat.pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
