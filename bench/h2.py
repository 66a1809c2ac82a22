"""The HTTP/2 (h2c, prior knowledge) paths, measured with h2load.

::

    h2-direct  client (h2load) ─────────────────────────────────────────────────────────────► h2c origin
    h2         client (h2load) ─► kizuna client sidecar (outbound :15001) ─► kizuna server sidecar
               (inbound, h2 preface) ─► h2c origin

Both hops are HTTP/2 cleartext: h2load speaks h2c with prior knowledge to ``http://`` URLs, ``:authority:
bench`` names the service for the client sidecar's router. The origin is a second HAProxy process
(``haproxy-origin.cfg.tmpl`` with ``bind ... proto h2``) returning the same 1 KB body. Each path starts its
own origin, so the HTTP/1.1 paths' origin is untouched.

h2load has no percentiles in its summary; ``--log-file`` writes one line per request of the measured phase
(start µs, status, µs to the end of the response), from which the percentiles here are computed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events

from bench.paced import EXPECTED_BODY
from bench.paths import (
    HAPROXY,
    HOST_HEADER,
    START_TIMEOUT,
    Layout,
    PathUnderTest,
    kizuna_proxy_argv,
    render_haproxy,
    write_kizuna_bootstraps,
)
from bench.procs import Processes, Started, log_tail, wait_for_port

H2LOAD = "h2load"
AUTHORITY = HOST_HEADER
_FINISHED = re.compile(r"^finished in ([0-9.]+)s, ([0-9.]+) req/s", re.MULTILINE)
_REQUESTS = re.compile(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                       r"(\d+) errored, (\d+) timeout", re.MULTILINE)
_STATUS = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.MULTILINE)


class H2loadOutputError(ValueError):
    """h2load's output lacks its summary lines."""


def h2load_unavailable() -> str | None:
    """Why the h2 paths cannot run here, or None."""
    if shutil.which(H2LOAD) is None:
        return "h2load not installed (apt-get install -y nghttp2-client)"
    return None


def command(url: str, *, clients: int, streams: int, seconds: float, warmup: float, log_file: Path,
            rps_per_client: float | None = None) -> list[str]:
    """The h2load argv: ``clients`` h2c connections, ``streams`` concurrent streams each, for ``seconds``
    after ``warmup``; with ``rps_per_client`` each connection is held to that request rate."""
    argv = [H2LOAD, "-c", str(clients), "-m", str(streams), "-D", str(max(1, round(seconds))),
            "-H", f":authority: {AUTHORITY}", "--log-file", str(log_file)]
    if warmup > 0:
        argv += ["--warm-up-time", f"{warmup:g}"]
    if rps_per_client is not None:
        argv += ["--rps", f"{rps_per_client:g}"]
    return [*argv, url]


def parse_summary(text: str) -> dict[str, Any]:
    """The counts and rate of h2load's summary (stdout)."""
    finished, requests, status = _FINISHED.search(text), _REQUESTS.search(text), _STATUS.search(text)
    if not (finished and requests and status):
        raise H2loadOutputError(f"no h2load summary in its output: {text[-500:]!r}")
    total, started, done, succeeded, failed, errored, timeout = (int(v) for v in requests.groups())
    s2, s3, s4, s5 = (int(v) for v in status.groups())
    return {"finished_s": float(finished.group(1)), "rps": float(finished.group(2)), "total": total,
            "started": started, "done": done, "succeeded": succeeded, "failed": failed, "errored": errored,
            "timeout": timeout, "status": {"2xx": s2, "3xx": s3, "4xx": s4, "5xx": s5}}


def parse_log(text: str) -> tuple[list[int], int]:
    """Per-request latencies (ns) of status-200 responses and the count of other statuses, from --log-file."""
    latencies, bad = [], 0
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        if parts[1] == "200":
            latencies.append(int(parts[2]) * 1000)
        else:
            bad += 1
    return latencies, bad


def probe(host: str, port: int, timeout: float = 2.0) -> tuple[int, int]:
    """One h2c GET with ``:authority: bench`` on a fresh connection: (status, body bytes)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", AUTHORITY), (":path", "/")],
                      end_stream=True)
    status, body = 0, 0
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(conn.data_to_send())
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed before the response ended")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += len(event.data)
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    return status, body
                elif isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    raise ConnectionError(f"h2 {event.__class__.__name__}")
            sock.sendall(conn.data_to_send())
    raise TimeoutError("no complete h2 response")


def wait_until_serving(entry: tuple[str, int], what: str, procs: list[Started]) -> None:
    """Send the h2 benchmark request through ``entry`` until it comes back 200 with the 1 KB body."""
    deadline = time.monotonic() + START_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited ({p.popen.returncode}) while starting {what}:\n"
                                   f"{log_tail(p)}")
        try:
            status, body = probe(*entry)
            if status == 200 and body == EXPECTED_BODY:
                return
            last = f"status {status}, {body} body bytes"
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.1)
    logs = "\n".join(f"--- {p.name}\n{log_tail(p)}" for p in procs)
    raise TimeoutError(f"{what} did not serve the h2 benchmark request in {START_TIMEOUT:.0f}s ({last})\n{logs}")


def start_origin(procs: Processes, layout: Layout, workdir: Path, cpus: frozenset[int] | None) -> Started:
    """HAProxy serving h2c (prior knowledge) with the 1 KB body; the body file is the shared origin's."""
    addr, port = layout.origin_h2
    cfg = render_haproxy("haproxy-origin.cfg.tmpl", workdir / "haproxy-origin-h2.cfg",
                         bind=f"{addr}:{port} proto h2", body_file=str(workdir / "body-1k.txt"))
    origin = procs.start("origin-haproxy-h2", [HAPROXY, "-db", "-f", str(cfg)], cpus)
    wait_for_port(addr, port, START_TIMEOUT, origin)
    wait_until_serving(layout.origin_h2, "the h2 origin", [origin])
    return origin


def _load_cpus(cpus: frozenset[int] | None) -> frozenset[int] | None:
    # The starters get the proxy CPUs; the origin belongs with the load generators (as the shared one does).
    if cpus is None:
        return None
    rest = frozenset(os.sched_getaffinity(0)) - cpus
    return rest or None


def start_h2_direct(procs: Processes, layout: Layout, workdir: Path,
                    cpus: frozenset[int] | None) -> PathUnderTest:
    """No proxy: h2load talks h2c to the h2 origin."""
    origin = start_origin(procs, layout, workdir, _load_cpus(cpus))
    return PathUnderTest("h2-direct", layout.origin_h2, notes="client -h2c-> origin", origin=origin, load="h2")


def start_h2(procs: Processes, layout: Layout, workdir: Path, cpus: frozenset[int] | None) -> PathUnderTest:
    """Two kizuna sidecars (static snapshots) in front of the h2 origin; h2c on both hops."""
    from kizuna.proxyconfig.bootstrap import Bootstrap

    origin = start_origin(procs, layout, workdir, _load_cpus(cpus))
    client_mesh, client_pod, server_mesh = layout.kizuna_h2_addresses
    server_boot, client_boot, inbound = write_kizuna_bootstraps(
        layout, workdir, origin=layout.origin_h2, addresses=(client_mesh, client_pod, server_mesh),
        prefix="kizuna-h2")
    server = procs.start("kizuna-h2-server-sidecar", kizuna_proxy_argv(server_boot), cpus)
    client = procs.start("kizuna-h2-client-sidecar", kizuna_proxy_argv(client_boot), cpus)
    outbound = Bootstrap.load(client_boot).outbound_port
    wait_for_port(server_mesh, inbound, START_TIMEOUT, server)
    wait_for_port(client_mesh, outbound, START_TIMEOUT, client)
    wait_until_serving((client_mesh, outbound), "the kizuna h2 path", [client, server, origin])
    return PathUnderTest("h2", (client_mesh, outbound), [client, server], origin=origin, load="h2",
                         notes=f"client -h2c-> kizuna outbound (:{outbound}) -h2c-> kizuna inbound (:{inbound}) "
                               "-h2c-> origin")


def run_h2load(argv: list[str], log_file: Path, warmup: float, seconds: float,
               cpus: frozenset[int] | None,
               on_measuring: Callable[[], None]) -> tuple[dict[str, Any], list[int], int]:
    """Run h2load; ``on_measuring()`` is called once its warm-up is over (by the clock: h2load's progress
    lines are block-buffered into a pipe). Returns the summary, 200-latencies (ns) and non-200 count."""
    preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          preexec_fn=preexec, start_new_session=True) as proc:
        try:
            time.sleep(warmup)
            on_measuring()
            out, err = proc.communicate(timeout=warmup + seconds + 30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"h2load exited {proc.returncode}: {err.strip()[-500:]}")
    summary = parse_summary(out)
    latencies, bad = parse_log(log_file.read_text())
    return summary, latencies, bad
