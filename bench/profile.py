"""A py-spy profile of one proxy under load, reduced to its hottest functions.

py-spy samples the running process from outside (no change to the proxy). Two recordings run at once:

- collapsed stacks (``frame;frame;frame count`` per line) with ``--native``, for the hot-function table.
  Native frames show where C time goes (the ``write``/``read``/``epoll_pwait`` syscalls under uvloop,
  ``getrandom`` ...), which a Python-only profile charges to whichever Python frame called into C. Native
  unwinding pauses the target for each sample, so the numbers of this run are never reported.
- a Python-only flame graph SVG (``--nonblocking``: it never pauses the target), for people.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_LINE_NO = re.compile(r":\d+\)$")
# Leaves that mean "blocked waiting for I/O": with --native, py-spy reports a thread asleep in the event
# loop's poll as a sample like any other. They are counted apart so the table shows where CPU time goes.
WAITING_LEAVES = frozenset({"epoll_pwait (libc.so.6)", "epoll_wait (libc.so.6)", "poll (libc.so.6)",
                            "select (libc.so.6)", "pselect6 (libc.so.6)"})


def py_spy() -> str | None:
    """The py-spy executable (next to this Python first, then on PATH), or None if it is not installed."""
    local = Path(sys.executable).with_name("py-spy")
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


def record_command(py_spy_exe: str, pid: int, seconds: float, out: Path, fmt: str = "raw",
                   native: bool = False, rate: int = 200) -> list[str]:
    """py-spy argv sampling ``pid`` for ``seconds`` into ``out``, as ``raw`` stacks or a ``flamegraph``."""
    duration = str(max(1, round(seconds)))
    mode = ["--native"] if native else ["--nonblocking"]
    return [py_spy_exe, "record", *mode, "--pid", str(pid), "--duration", duration,
            "--rate", str(rate), "--format", fmt, "--output", str(out)]


def function_name(frame: str) -> str:
    """A frame without its line number, ``_run_once (asyncio/base_events.py)``: a function's lines add up."""
    return _LINE_NO.sub(")", frame.strip())


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    """Collapsed stacks (``root;...;leaf count`` per line) as (frames root first, sample count) pairs."""
    stacks = []
    for line in text.splitlines():
        line = line.rstrip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            raise ValueError(f"not a collapsed stack line: {line!r}")
        stacks.append(([function_name(f) for f in stack.split(";")], int(count)))
    return stacks


def hot_functions(stacks: list[tuple[list[str], int]], top: int = 10,
                  waiting: frozenset[str] = WAITING_LEAVES) -> dict[str, Any]:
    """The ``top`` functions by self samples (on-CPU in that function) and by total samples (with callees).

    Each row gives both shares in percent of the on-CPU samples: ``self`` and ``total``. Samples whose leaf is
    in ``waiting`` (blocked in the event loop's poll) are left out and reported as ``waiting_percent``.
    """
    all_samples = sum(count for _, count in stacks)
    waiting_samples = sum(count for frames, count in stacks if frames and frames[-1] in waiting)
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    for frames, count in stacks:
        if not frames or frames[-1] in waiting:
            continue
        self_counts[frames[-1]] += count
        for name in set(frames):  # recursion must not count a sample twice
            total_counts[name] += count

    def row(name: str) -> dict[str, Any]:
        share = 100.0 / ((all_samples - waiting_samples) or 1)
        return {"function": name, "self": round(self_counts[name] * share, 1),
                "total": round(total_counts[name] * share, 1)}

    return {"total_samples": all_samples,
            "waiting_percent": round(100.0 * waiting_samples / (all_samples or 1), 1),
            "by_self": [row(name) for name, _ in self_counts.most_common(top)],
            "by_total": [row(name) for name, _ in total_counts.most_common(top)]}


def start_recording(pid: int, seconds: float, out_dir: Path, log_dir: Path,
                    stamp: str) -> list[tuple[subprocess.Popen[bytes], Path]]:
    """Start py-spy twice on ``pid``: native collapsed stacks for the report, a Python flame graph SVG.

    Returns [] when py-spy is not installed.
    """
    exe = py_spy()
    if exe is None:
        return []
    runs = []
    for fmt, suffix, native in (("raw", "txt", True), ("flamegraph", "svg", False)):
        out = out_dir / f"profile-{stamp}.{suffix}"
        log = (log_dir / f"py-spy-{suffix}.log").open("wb")
        with log:
            proc = subprocess.Popen(record_command(exe, pid, seconds, out, fmt, native), stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        runs.append((proc, out))
    return runs
