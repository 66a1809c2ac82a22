"""CPU per HTTP/2 request of the two kizuna sidecars under h2load, for A/B comparisons of hot-path changes.

The h2 counterpart of ``bench.micro``: starts the h2c origin and the kizuna h2 path (as ``bench.h2`` does),
optionally from another source tree (``--src /tmp/copy/src``), then sends a fixed number of requests with
h2load several times and prints each sidecar's CPU µs per completed request (utime+stime from /proc). CPU per
request over a fixed count is far steadier than requests per second on a shared machine::

    .venv/bin/python -m bench.h2micro --runs 5 --requests 20000
    .venv/bin/python -m bench.h2micro --src /tmp/baseline/src --net 127.107.9
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import h2
from bench.micro import cpu_split
from bench.paths import Layout, write_kizuna_bootstraps
from bench.procs import Processes, wait_for_port

_RUN = ("import sys; sys.path.insert(0, sys.argv[1]); from kizuna.proxy.main import run; "
        "sys.exit(run(sys.argv[2]))")


def start_sidecars(procs: Processes, layout: Layout, workdir: Path, src: str,
                   cpus: frozenset[int] | None) -> tuple[tuple[str, int], int, int]:
    """The two sidecars of the h2 path, importing kizuna from ``src``; returns entry, client pid, server pid."""
    from kizuna.proxyconfig.bootstrap import Bootstrap

    client_mesh, client_pod, server_mesh = layout.kizuna_h2_addresses
    server_boot, client_boot, inbound = write_kizuna_bootstraps(
        layout, workdir, origin=layout.origin_h2, addresses=(client_mesh, client_pod, server_mesh),
        prefix="kizuna-h2")
    server = procs.start("kizuna-h2-server", [sys.executable, "-c", _RUN, src, str(server_boot)], cpus)
    client = procs.start("kizuna-h2-client", [sys.executable, "-c", _RUN, src, str(client_boot)], cpus)
    outbound = Bootstrap.load(client_boot).outbound_port
    wait_for_port(server_mesh, inbound, 30.0, server)
    wait_for_port(client_mesh, outbound, 30.0, client)
    entry = (client_mesh, outbound)
    h2.wait_until_serving(entry, "the kizuna h2 path", [client, server])
    return entry, client.pid, server.pid


def h2load_count(url: str, requests: int, clients: int, streams: int) -> list[str]:
    """h2load argv sending exactly ``requests`` requests over ``clients`` connections × ``streams`` streams."""
    return [h2.H2LOAD, "-n", str(requests), "-c", str(clients), "-m", str(streams),
            "-H", f":authority: {h2.AUTHORITY}", url]


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and print one line per h2load run plus medians."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=str(Path(__file__).resolve().parent.parent / "src"))
    ap.add_argument("--net", default="127.50.8")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--streams", type=int, default=10)
    ap.add_argument("--proxy-cpus", default="1")
    ap.add_argument("--load-cpus", default="0")
    ap.add_argument("--py-spy", default="", help="record the client sidecar during the first run to this file "
                    "(collapsed stacks, --nonblocking)")
    args = ap.parse_args(argv)
    unavailable = h2.h2load_unavailable()
    if unavailable:
        print(unavailable, file=sys.stderr)
        return 2
    proxy_cpus = frozenset(int(c) for c in args.proxy_cpus.split(",")) if args.proxy_cpus else None
    load_cpus = frozenset(int(c) for c in args.load_cpus.split(",")) if args.load_cpus else None
    layout = Layout(args.net)
    with tempfile.TemporaryDirectory(prefix="kizuna-h2micro-") as tmp, Processes(Path(tmp)) as procs:
        workdir = Path(tmp)
        (workdir / "body-1k.txt").write_text("x" * 1024)
        h2.start_origin(procs, layout, workdir, load_cpus)
        entry, client, server = start_sidecars(procs, layout, workdir, args.src, proxy_cpus)
        url = f"http://{entry[0]}:{entry[1]}/"
        argv_h2load = h2load_count(url, args.requests, args.connections, args.streams)
        preexec = (lambda: os.sched_setaffinity(0, load_cpus)) if load_cpus else None
        warm = h2load_count(url, min(args.requests, 5000), args.connections, args.streams)
        subprocess.run(warm, capture_output=True, timeout=300, preexec_fn=preexec)
        rows = []
        for i in range(args.runs):
            spy = None
            if args.py_spy and i == 0:
                spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--nonblocking",
                                        "-r", "250", "-f", "raw", "-o", args.py_spy, "-p", str(client)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                before = cpu_split(client), cpu_split(server)
                out = subprocess.run(argv_h2load, capture_output=True, text=True, timeout=600, preexec_fn=preexec)
                after = cpu_split(client), cpu_split(server)
            finally:
                if spy is not None:
                    spy.send_signal(2)  # py-spy writes its output on SIGINT
                    try:
                        spy.wait(30)
                    except subprocess.TimeoutExpired:
                        spy.kill()
                        spy.wait()
            summary = h2.parse_summary(out.stdout)
            n = max(summary["succeeded"], 1)
            us = [[(a - b) / n * 1e6 for a, b in zip(after[k], before[k], strict=True)] for k in (0, 1)]
            bad = summary["total"] - summary["succeeded"]
            row = (sum(us[0]), sum(us[1]), summary["rps"], bad, us[0][0], us[1][0])
            rows.append(row)
            print(f"client {row[0]:6.1f} us/req (user {row[4]:5.1f})  server {row[1]:6.1f} us/req "
                  f"(user {row[5]:5.1f})  {row[2]:8.0f} req/s  not ok {row[3]}", flush=True)
        print(f"median client {statistics.median(r[0] for r in rows):.1f}  "
              f"server {statistics.median(r[1] for r in rows):.1f} us/req  "
              f"rps {statistics.median(r[2] for r in rows):.0f}  user client "
              f"{statistics.median(r[4] for r in rows):.1f} server {statistics.median(r[5] for r in rows):.1f}"
              f"  src {args.src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
