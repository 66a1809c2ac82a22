"""CPU per request of the two kizuna sidecars under wrk, for A/B comparisons of hot-path changes.

Starts the bench origin and the kizuna path (as ``bench.paths`` does), optionally from another source tree
(``--src /tmp/copy/src``), then runs wrk several times and prints each sidecar's CPU µs per completed request
(utime+stime from /proc), which is far steadier than requests per second on a shared machine::

    .venv/bin/python -m bench.micro --runs 5 --seconds 3
    .venv/bin/python -m bench.micro --src /tmp/baseline/src --net 127.50.9

``--rate R`` replaces wrk by ``bench.paced`` at R requests per second (open loop, ``--connections``
keep-alive connections) for ``--seconds`` per run: the per-request cost at a moderate rate, where every
request is its own read, write and wake-up, which saturation amortises (``make bench``'s fixed-rate column)::

    .venv/bin/python -m bench.micro --rate 1000 --runs 3 --seconds 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench import wrk
from bench.paths import (
    HOST_HEADER,
    TARGET,
    Layout,
    start_origin,
    wait_until_serving,
    write_kizuna_bootstraps,
)
from bench.procs import CLOCK_TICKS, Processes, wait_for_port

# argv: source tree, bootstrap file. KIZUNA_MICRO_RUN swaps in another runner (e.g. one under cProfile).
_RUN = os.environ.get("KIZUNA_MICRO_RUN") or (
    "import sys; sys.path.insert(0, sys.argv[1]); from kizuna.proxy.main import run; sys.exit(run(sys.argv[2]))")


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid`` so far."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def start_sidecars(procs: Processes, layout: Layout, workdir: Path, src: str, cpus: frozenset[int] | None,
                   server_cpus: frozenset[int] | None) -> tuple[tuple[str, int], int, int]:
    """The two sidecars of the kizuna path, importing kizuna from ``src``; returns entry, client, server pid."""
    from kizuna.proxyconfig.bootstrap import Bootstrap

    server_boot, client_boot, inbound = write_kizuna_bootstraps(layout, workdir)
    server = procs.start("kizuna-server", [sys.executable, "-c", _RUN, src, str(server_boot)], server_cpus or cpus)
    client = procs.start("kizuna-client", [sys.executable, "-c", _RUN, src, str(client_boot)], cpus)
    outbound = Bootstrap.load(client_boot).outbound_port
    wait_for_port(layout.kizuna_server_mesh, inbound, 30.0)
    wait_for_port(layout.kizuna_client_mesh, outbound, 30.0)
    entry = (layout.kizuna_client_mesh, outbound)
    wait_until_serving(entry, "the kizuna path", [])
    return entry, client.pid, server.pid


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and print one line per wrk run plus medians."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=str(Path(__file__).resolve().parent.parent / "src"))
    ap.add_argument("--net", default="127.50.7")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--rate", type=float, default=0.0,
                    help="drive the path with bench.paced at this many req/s instead of saturating it with wrk")
    ap.add_argument("--proxy-cpus", default="1")
    ap.add_argument("--load-cpus", default="0")
    ap.add_argument("--perf", default="", help="perf record the client sidecar during the first run to this file")
    ap.add_argument("--server-cpus", default="", help="pin the server sidecar apart (for profiles)")
    ap.add_argument("--py-spy", default="", help="record the client sidecar during the first run to this file")
    args = ap.parse_args(argv)
    proxy_cpus = frozenset(int(c) for c in args.proxy_cpus.split(",")) if args.proxy_cpus else None
    load_cpus = frozenset(int(c) for c in args.load_cpus.split(",")) if args.load_cpus else None
    layout = Layout(args.net)
    with tempfile.TemporaryDirectory(prefix="kizuna-micro-") as tmp, Processes(Path(tmp)) as procs:
        workdir = Path(tmp)
        start_origin(procs, layout, workdir, load_cpus)
        server_cpus = frozenset(int(c) for c in args.server_cpus.split(",")) if args.server_cpus else None
        entry, client, server = start_sidecars(procs, layout, workdir, args.src, proxy_cpus, server_cpus)
        url = f"http://{entry[0]}:{entry[1]}"
        argv_wrk = wrk.command(url, threads=1, connections=args.connections, seconds=args.seconds,
                               target=TARGET, host=HOST_HEADER)
        preexec = (lambda: os.sched_setaffinity(0, load_cpus)) if load_cpus else None
        paced = None
        if args.rate:
            paced = _Paced(entry, args.rate, args.connections, args.seconds, preexec)
        else:
            subprocess.run(argv_wrk, capture_output=True, timeout=args.seconds + 30, preexec_fn=preexec)  # warm-up
        rows = []
        for i in range(args.runs):
            spy = None
            if args.perf and i == 0:
                spy = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "2000", "-o", args.perf,
                                        "-p", str(client), "--", "sleep", str(args.seconds)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            elif args.py_spy and i == 0:
                spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--native",
                                        "-r", "200", "-f", "raw", "-d", str(args.seconds), "-o", args.py_spy,
                                        "-p", str(client)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                before = cpu_split(client), cpu_split(server)
                if paced is not None:
                    completed, rps, errors = paced.run()
                else:
                    out = subprocess.run(argv_wrk, capture_output=True, text=True, timeout=args.seconds + 30,
                                         preexec_fn=preexec)
                after = cpu_split(client), cpu_split(server)
                if spy is not None:
                    spy.wait(30)
            finally:
                if spy is not None and spy.poll() is None:
                    spy.kill()
                    spy.wait()
            if paced is None:
                result = wrk.parse_output(out.stdout)
                completed, rps, errors = result.requests, result.rps, result.error_count
            n = max(completed, 1)
            us = [[(a - b) / n * 1e6 for a, b in zip(after[k], before[k], strict=True)] for k in (0, 1)]
            row = (sum(us[0]), sum(us[1]), rps, errors, us[0][0], us[1][0])
            rows.append(row)
            print(f"client {row[0]:6.1f} us/req (user {row[4]:5.1f})  server {row[1]:6.1f} us/req "
                  f"(user {row[5]:5.1f})  {row[2]:8.0f} req/s  errors {row[3]}", flush=True)
        print(f"median client {statistics.median(r[0] for r in rows):.1f}  "
              f"server {statistics.median(r[1] for r in rows):.1f} us/req  "
              f"rps {statistics.median(r[2] for r in rows):.0f}  user client "
              f"{statistics.median(r[4] for r in rows):.1f} server {statistics.median(r[5] for r in rows):.1f}"
              f"  src {args.src}")
    return 0


class _Paced:
    """Runs of ``bench.paced`` against the path: one process per run, connected before the schedule starts."""

    def __init__(self, entry: tuple[str, int], rate: float, connections: int, seconds: float,
                 preexec: Callable[[], None] | None) -> None:
        self.rate, self.connections, self.seconds, self.entry, self.preexec = rate, connections, seconds, entry, preexec

    def run(self) -> tuple[int, float, int]:
        """Completed requests, their rate and the error count of one schedule of ``seconds``."""
        argv = [sys.executable, "-m", "bench.paced", self.entry[0], str(self.entry[1]), "--rate", str(self.rate),
                "--connections", str(self.connections), "--seconds", str(self.seconds), "--warmup", "0"]
        # paced connects, then prints READY: connection setup is not in the measured schedule.
        with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              preexec_fn=self.preexec, cwd=Path(__file__).resolve().parent.parent) as proc:
            assert proc.stdin is not None and proc.stdout is not None
            try:
                if proc.stdout.readline().strip() != "READY":
                    raise RuntimeError("bench.paced did not start")
                proc.stdin.write("go\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                proc.wait(self.seconds + 30)
            finally:
                if proc.poll() is None:
                    proc.kill()
        result = json.loads(line)
        errors = sum(result["errors"].values())
        return result["completed"], result["completed"] / self.seconds, errors


if __name__ == "__main__":
    sys.exit(main())
