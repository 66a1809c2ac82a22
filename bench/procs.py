"""The processes a benchmark starts, and what /proc says about them (CPU time, peak memory).

Every process is started in its own session, so stopping it means signalling the process group whose id is the
pid we started — never a search by name. :class:`Processes` is a context manager that stops all of them on any
exit, including Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Started:
    """A process we started: its name in reports, the CPUs it is pinned to and where its output goes."""

    name: str
    popen: subprocess.Popen[bytes]
    cpus: frozenset[int] | None
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None


class Processes:
    """Starts processes pinned to CPUs and guarantees they are all gone when the ``with`` block ends."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Started] = []

    def start(self, name: str, argv: Sequence[str], cpus: Iterable[int] | None = None,
              env: dict[str, str] | None = None) -> Started:
        """Start ``argv`` in a new session, output to ``<log_dir>/<name>.log``, pinned to ``cpus``."""
        pin = frozenset(cpus) if cpus is not None else None
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as out:
            # Pin in the child before exec, so every thread the program creates inherits the mask.
            preexec: Callable[[], None] | None = (lambda: os.sched_setaffinity(0, pin)) if pin else None
            popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec,
                                     env=env)
        proc = Started(name, popen, pin, log)
        self.started.append(proc)
        return proc

    def stop(self, proc: Started, grace: float = 3.0) -> None:
        """SIGTERM the process group we created, then SIGKILL it if it outlives ``grace`` seconds."""
        if proc.popen.returncode is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # The leader may be gone while children it forked live on in the group: always sweep it.
        _signal_group(proc.pid, signal.SIGKILL)
        if proc.popen.returncode is None:
            proc.popen.wait(grace)

    def stop_all(self) -> None:
        """Stop every process started here, newest first (proxies before the origin they forward to)."""
        while self.started:
            self.stop(self.started.pop())

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop_all()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def log_tail(proc: Started, lines: int = 20) -> str:
    """The last lines a process printed, for error messages."""
    try:
        return "\n".join(proc.log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_for_port(address: str, port: int, timeout: float, proc: Started | None = None) -> None:
    """Wait until ``address:port`` accepts TCP connections (bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}) before listening on "
                               f"{address}:{port}:\n{log_tail(proc)}")
        try:
            with socket.create_connection((address, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {address}:{port} after {timeout:.0f}s") from None
            time.sleep(0.05)


# --- /proc readings ----------------------------------------------------------------------------------------

def _parent_map() -> dict[int, list[int]]:
    # /proc/<pid>/task/<tid>/children needs CONFIG_PROC_CHILDREN, which not every kernel has: scan ppids.
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (a proxy that forks workers is measured as a whole)."""
    kids = _parent_map()
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(kids.get(p, ()))
    return tree


def parse_stat_cpu_ticks(stat_line: str) -> int:
    """utime + stime (clock ticks, all threads) from one ``/proc/<pid>/stat`` line."""
    # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    fields = stat_line[stat_line.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]) + int(fields[12])


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by ``pid`` and its descendants, in seconds."""
    ticks = 0
    for p in process_tree(pid):
        try:
            ticks += parse_stat_cpu_ticks(Path(f"/proc/{p}/stat").read_text())
        except (OSError, ValueError, IndexError):
            pass  # a child that just exited
    return ticks / CLOCK_TICKS


def parse_status_kb(status_text: str, key: str) -> int | None:
    """The value of a ``kB`` line such as ``VmHWM:    12345 kB`` in ``/proc/<pid>/status``."""
    for line in status_text.splitlines():
        if line.startswith(key + ":"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1])
    return None


def memory_kb(pid: int, key: str) -> int:
    """Sum of ``key`` (``VmHWM`` peak RSS, ``VmRSS`` current RSS) over ``pid`` and its descendants, in kB."""
    total = 0
    for p in process_tree(pid):
        try:
            total += parse_status_kb(Path(f"/proc/{p}/status").read_text(), key) or 0
        except OSError:
            pass
    return total


def parse_proc_stat(text: str) -> dict[str, dict[str, float]]:
    """Per-CPU busy and steal seconds (``cpu`` is the total) from ``/proc/stat``.

    Busy is user + nice + system + irq + softirq; steal is time the hypervisor ran someone else.
    """
    out = {}
    for line in text.splitlines():
        if not line.startswith("cpu"):
            continue
        name, *values = line.split()
        ticks = [int(v) for v in values] + [0] * 8
        user, nice, system, _idle, _iowait, irq, softirq, steal = ticks[:8]
        busy = user + nice + system + irq + softirq
        out[name] = {"busy_s": busy / CLOCK_TICKS, "steal_s": steal / CLOCK_TICKS}
    return out


def system_cpu() -> dict[str, dict[str, float]]:
    """The machine's CPU accounting now (see :func:`parse_proc_stat`)."""
    return parse_proc_stat(Path("/proc/stat").read_text())


def repin(pid: int, cpus: frozenset[int]) -> None:
    """Move every thread of ``pid`` and its descendants to ``cpus`` (each thread has its own mask)."""
    for p in process_tree(pid):
        try:
            threads = [int(t) for t in os.listdir(f"/proc/{p}/task")]
        except OSError:
            continue
        for tid in threads:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:
                pass  # a thread that just exited
