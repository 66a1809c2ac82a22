"""``make bench``: direct vs kizuna (2 sidecars) vs HAProxy (2 processes), in one run on this machine.

For each path: start its processes, check the benchmark request comes back (200, 1 KB), then
1. fixed rate: ``bench.paced`` at 1000 req/s on 4 keep-alive connections (open loop) -> latency percentiles,
   and each proxy's CPU time and vCPU at that rate;
2. saturation: wrk, 1 thread, 4 connections -> throughput, and each proxy's CPU time per request;
3. peak RSS (VmHWM) of each proxy; for kizuna, a py-spy profile of the client sidecar under saturation.
Prints a table and writes ``bench/results/<timestamp>.json``. Every process started is stopped on any exit.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

from bench import h2, profile, wrk
from bench.mtls import start_haproxy_mtls, start_kizuna_mtls
from bench.paths import HOST_HEADER, STARTERS, TARGET, Layout, PathUnderTest, kizuna_unavailable, start_origin
from bench.procs import Processes, Started, cpu_seconds, memory_kb, repin, system_cpu
from bench.report import DISTURBED_VCPU, comparisons, format_table, machine_info
from bench.settings import BenchSettings, parse_args
from bench.stats import summarize_ns
from bench.telemetry import start_kizuna_no_telemetry
from bench.transparent import cleanup as transparent_cleanup
from bench.transparent import start_transparent, transparent_unavailable

STARTERS = {**STARTERS, "transparent": start_transparent, "h2-direct": h2.start_h2_direct, "h2": h2.start_h2,
            "kizuna-mtls": start_kizuna_mtls, "kizuna-no-telemetry": start_kizuna_no_telemetry,
            "haproxy-mtls": start_haproxy_mtls}


def _say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _pinned(cpus: frozenset[int] | None) -> Callable[[], None] | None:
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class _Meter:
    """CPU seconds of the watched processes over one phase, as per-request and per-wall-second figures.

    The machine's own per-CPU busy and steal time over the phase is kept too (``machine``), so a run disturbed
    by something else on the box, or by the hypervisor, shows it.
    """

    def __init__(self, watched: list[Started]) -> None:
        self.watched = watched
        self.machine: dict[str, dict[str, float]] = {}
        self.sys0 = system_cpu()
        self.cpu0 = {p.name: cpu_seconds(p.pid) for p in watched}
        self.t0 = time.monotonic()

    def stop(self, requests: int) -> dict[str, dict[str, float | None]]:
        wall = time.monotonic() - self.t0
        sys1 = system_cpu()
        self.machine = {cpu: {"busy_vcpu": (v["busy_s"] - self.sys0[cpu]["busy_s"]) / wall,
                              "steal_vcpu": (v["steal_s"] - self.sys0[cpu]["steal_s"]) / wall}
                        for cpu, v in sys1.items() if cpu in self.sys0}
        out: dict[str, dict[str, float | None]] = {}
        for p in self.watched:
            cpu = cpu_seconds(p.pid) - self.cpu0[p.name]
            out[p.name] = {"cpu_s": cpu, "wall_s": wall, "vcpu": cpu / wall if wall else None,
                           "cpu_s_per_1k": 1000 * cpu / requests if requests else None,
                           "requests_per_cpu_second": requests / cpu if cpu > 0 else None}
        return out


def _inside(path: PathUnderTest) -> list[str]:
    """The prefix that runs a load tool in the path's network namespace (transparent path), else nothing."""
    return ["ip", "netns", "exec", path.netns] if path.netns else []


def fixed_rate(path: PathUnderTest, watched: list[Started], s: BenchSettings, cpus: frozenset[int] | None,
               log: Path) -> tuple[dict[str, Any], dict[str, dict[str, float | None]]]:
    """Run bench.paced through the path; CPU is metered only between its READY and its result."""
    host, port = path.entry
    argv = [*_inside(path), sys.executable, "-m", "bench.paced", host, str(port), "--rate", str(s.rate),
            "--connections", str(s.connections), "--seconds", str(s.fixed_seconds),
            "--warmup", str(s.warmup_seconds), "--target", TARGET, "--host-header", HOST_HEADER]
    cpu_before = _children_cpu()
    with log.open("ab") as err:
        gen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                               preexec_fn=_pinned(cpus), start_new_session=True,
                               cwd=Path(__file__).resolve().parent.parent)
    try:
        assert gen.stdin is not None and gen.stdout is not None
        ready = gen.stdout.readline().strip()
        if ready != b"READY":
            raise RuntimeError(f"bench.paced did not get ready ({ready!r}); see {log}")
        meter = _Meter(watched)
        gen.stdin.write(b"go\n")
        gen.stdin.flush()
        line = gen.stdout.readline()
        result: dict[str, Any] = json.loads(line)
        cpu = meter.stop(result["completed"])
        result["machine"] = meter.machine
        gen.wait(10)
    finally:
        if gen.poll() is None:
            os.killpg(gen.pid, signal.SIGKILL)
            gen.wait()
    result["generator_cpu_s"] = _children_cpu() - cpu_before
    return result, cpu


def saturation(path: PathUnderTest, watched: list[Started], s: BenchSettings, cpus: frozenset[int] | None,
               seconds: float) -> tuple[dict[str, Any], dict[str, dict[str, float | None]]]:
    """Run wrk through the path as fast as it goes; returns its result and the processes' CPU use."""
    host, port = path.entry
    argv = _inside(path) + wrk.command(f"http://{host}:{port}/", threads=s.saturation_threads,
                                       connections=s.saturation_connections, seconds=seconds, target=TARGET,
                                       host=HOST_HEADER)
    cpu_before = _children_cpu()
    meter = _Meter(watched)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30,
                          preexec_fn=_pinned(cpus), start_new_session=True)
    parsed = wrk.parse_output(done.stdout)
    cpu = meter.stop(parsed.requests)
    out = parsed.to_json()
    out["wrk_cpu_s"] = _children_cpu() - cpu_before
    out["machine"] = meter.machine
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}: {done.stderr.strip()}")
    return out, cpu


def h2_phase(path: PathUnderTest, watched: list[Started], s: BenchSettings, cpus: frozenset[int] | None,
             log: Path, fixed: bool) -> tuple[dict[str, Any], dict[str, dict[str, float | None]]]:
    """One h2load run through an h2 path: rate-limited (``fixed``, s.rate over s.connections connections)
    or as fast as it goes (s.saturation_connections connections); result keyed like the HTTP/1.1 phases."""
    host, port = path.entry
    seconds = s.fixed_seconds if fixed else s.saturation_seconds
    warmup = s.warmup_seconds if fixed else 0.0
    clients = s.connections if fixed else s.saturation_connections
    argv = h2.command(f"http://{host}:{port}/", clients=clients, streams=s.h2_streams, seconds=seconds,
                      warmup=warmup, log_file=log, rps_per_client=s.rate / clients if fixed else None)
    cpu_before = _children_cpu()
    meters: list[_Meter] = []
    summary, latencies, bad = h2.run_h2load(argv, log, warmup, seconds, cpus,
                                            lambda: meters.append(_Meter(watched)))
    cpu = meters[0].stop(summary["succeeded"])
    errors = {"failed": summary["failed"], "errored": summary["errored"], "timeout": summary["timeout"],
              "non_200_logged": bad}
    lat = summarize_ns(latencies)
    out: dict[str, Any] = {"tool": "h2load", "argv": argv, "h2load": summary, "completed": summary["succeeded"],
                           "machine": meters[0].machine, "h2load_cpu_s": _children_cpu() - cpu_before}
    if fixed:
        # h2load does not count requests it held back for want of a free stream: no "queued" figure.
        out.update(errors={"failed": summary["failed"]}, queued=None, latency=lat, error_detail=errors)
    else:
        us = {k: lat.get(f"{k}_ms", 0.0) * 1000 for k in ("p50", "p90", "p99", "max", "mean")}
        out.update(requests=summary["succeeded"], duration_s=seconds, rps=summary["rps"],
                   errors={"failed": summary["failed"]}, error_detail=errors, latency_us=us)
    log.unlink(missing_ok=True)  # up to a few hundred thousand lines; the numbers are in the JSON
    return out, cpu


def run_profile(path: PathUnderTest, s: BenchSettings, cpus: frozenset[int] | None, results: Path,
                logs: Path, stamp: str) -> dict[str, Any]:
    """py-spy on the client sidecar while wrk saturates the path (an extra, unmeasured run).

    py-spy counts a runnable thread as busy wherever it stands, so a sidecar sharing its core with the other
    one would seem to live in ``write()`` (where the peer it just woke preempts it). For this run the other
    sidecar moves to the load CPUs and the profiled one has its core to itself.
    """
    target = path.proxies[0]
    if profile.py_spy() is None:
        return {"error": "py-spy not installed (.venv/bin/pip install py-spy)"}
    if cpus:
        for other in path.proxies[1:]:
            repin(other.pid, cpus)
    host, port = path.entry
    with subprocess.Popen(wrk.command(f"http://{host}:{port}/", threads=s.saturation_threads,
                                      connections=s.saturation_connections, seconds=s.profile_seconds + 2,
                                      target=TARGET, host=HOST_HEADER),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_pinned(cpus),
                          start_new_session=True) as load:
        try:
            time.sleep(1.0)  # let wrk reach full speed before sampling
            runs = profile.start_recording(target.pid, s.profile_seconds, results, logs, stamp)
            for proc, _ in runs:
                try:
                    proc.wait(s.profile_seconds + 30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            load.wait(s.profile_seconds + 30)
        finally:
            if load.poll() is None:
                os.killpg(load.pid, signal.SIGKILL)
    files = {out.suffix[1:]: str(out) for proc, out in runs if proc.returncode == 0 and out.exists()}
    if "txt" not in files:
        return {"process": target.name, "seconds": s.profile_seconds, "files": files,
                "error": f"py-spy failed; see {logs}/py-spy-txt.log"}
    hot = profile.hot_functions(profile.parse_collapsed(Path(files["txt"]).read_text()), top=10)
    return {"process": target.name, "seconds": s.profile_seconds, "files": files, "hot": hot}


def measure(path: PathUnderTest, origin: Started, s: BenchSettings, load_cpus: frozenset[int] | None,
            logs: Path) -> dict[str, Any]:
    """Both phases for one started path, and the memory of its proxies."""
    watched = [*path.proxies, origin]
    _say(f"{path.name}: fixed rate {s.rate:g} req/s for {s.fixed_seconds:g} s "
         f"(+{s.warmup_seconds:g} s warm-up)")
    if path.load == "h2":
        fixed, fixed_cpu = h2_phase(path, watched, s, load_cpus, logs / f"h2load-{path.name}-fixed.tsv", True)
    else:
        fixed, fixed_cpu = fixed_rate(path, watched, s, load_cpus, logs / f"paced-{path.name}.log")
    rss_after_fixed = {p.name: memory_kb(p.pid, "VmRSS") for p in path.proxies}
    _say(f"{path.name}: saturation for {s.saturation_seconds:g} s")
    if path.load == "h2":
        sat, sat_cpu = h2_phase(path, watched, s, load_cpus, logs / f"h2load-{path.name}-sat.tsv", False)
    else:
        sat, sat_cpu = saturation(path, watched, s, load_cpus, s.saturation_seconds)
    procs: dict[str, Any] = {}
    for p in path.proxies:
        procs[p.name] = {"pid": p.pid, "cpus": sorted(p.cpus) if p.cpus else None,
                         "fixed": fixed_cpu[p.name], "saturation": sat_cpu[p.name],
                         "rss_kb_after_fixed": rss_after_fixed[p.name],
                         "peak_rss_kb": memory_kb(p.pid, "VmHWM")}
    shared = {origin.name: {"fixed": fixed_cpu[origin.name], "saturation": sat_cpu[origin.name]}}
    fixed["others_vcpu"] = _others(fixed["machine"], fixed_cpu, fixed.get("h2load_cpu_s", fixed.get("cpu_s", 0.0)))
    sat["others_vcpu"] = _others(sat["machine"], sat_cpu, sat.get("h2load_cpu_s", sat.get("wrk_cpu_s", 0.0)))
    return {"notes": path.notes, "load": path.load, "entry": f"{path.entry[0]}:{path.entry[1]}", "fixed": fixed,
            "saturation": sat, "processes": procs, "shared": shared}


def _disturbed(data: dict[str, Any]) -> list[str]:
    return [phase for phase in ("fixed", "saturation")
            if (data[phase].get("others_vcpu") or 0.0) > DISTURBED_VCPU]


def measure_until_quiet(path: PathUnderTest, origin: Started, s: BenchSettings,
                        load_cpus: frozenset[int] | None, logs: Path) -> dict[str, Any]:
    """:func:`measure`, repeated (up to ``s.retries`` more times) while other work on the machine disturbs it.

    The processes stay up between attempts; the last attempt is kept, earlier ones are summarized.
    """
    earlier: list[dict[str, Any]] = []
    while True:
        data = measure(path, origin, s, load_cpus, logs)
        disturbed = _disturbed(data)
        if not disturbed or len(earlier) >= s.retries:
            data["earlier_attempts"] = earlier
            return data
        _say(f"{path.name}: other work on the machine disturbed {', '.join(disturbed)}; measuring again")
        earlier.append({"disturbed": disturbed,
                        "others_vcpu": {ph: data[ph].get("others_vcpu") for ph in ("fixed", "saturation")}})
        if s.quiet_wait_seconds > 0:
            _wait_quiet(s.quiet_wait_seconds)


def _others(machine: dict[str, dict[str, float]], watched: dict[str, dict[str, float | None]],
            client_cpu: float) -> float | None:
    """vCPU the machine was busy with beyond our processes and the load tool: interference from elsewhere.

    /proc/stat is sampled at clock ticks, so a few hundredths either way are noise.
    """
    if "cpu" not in machine or not watched:
        return None
    wall = next(iter(watched.values()))["wall_s"] or 0.0
    if wall <= 0:
        return None
    ours = sum(w["cpu_s"] or 0.0 for w in watched.values()) + client_cpu
    return machine["cpu"]["busy_vcpu"] - ours / wall


def _machine_busy(seconds: float = 1.0) -> float:
    before = system_cpu()["cpu"]["busy_s"]
    time.sleep(seconds)
    return (system_cpu()["cpu"]["busy_s"] - before) / seconds


QUIET_VCPU = 0.15


def _wait_quiet(limit: float) -> float:
    """Wait (at most ``limit`` seconds) until the machine is nearly idle; returns the last busy reading."""
    deadline = time.monotonic() + limit
    busy = _machine_busy()
    while busy > QUIET_VCPU and time.monotonic() < deadline:
        busy = _machine_busy()
    return busy


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(s: BenchSettings) -> dict[str, Any]:
    """The whole benchmark; returns the result dict (also written as JSON)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    results = Path(s.results_dir)
    logs = results / f"run-{stamp}"
    logs.mkdir(parents=True, exist_ok=True)
    layout = Layout(s.net)
    load_cpus, proxy_cpus = s.cpu_set("load"), s.cpu_set("proxy")
    pinning = (f"load generators and origin on CPU {sorted(load_cpus) if load_cpus else 'any'}; "
               f"proxies on CPU {sorted(proxy_cpus) if proxy_cpus else 'any'}")
    result: dict[str, Any] = {"timestamp": stamp, "settings": asdict(s), "machine": machine_info(),
                              "pinning": pinning, "paths": {}, "skipped": {}, "failed": {}}
    _say(f"results in {results}, logs in {logs}; {pinning}")
    result["busy_before_vcpu"] = _machine_busy()
    ok = False
    with Processes(logs) as shared:
        origin = start_origin(shared, layout, logs, load_cpus)
        for name in s.path_list:
            needs_kizuna = name in ("kizuna", "kizuna-mtls", "kizuna-no-telemetry", "transparent", "h2")
            reason = (kizuna_unavailable() if needs_kizuna else None) or (
                transparent_unavailable() if name == "transparent" else None) or (
                h2.h2load_unavailable() if name in ("h2", "h2-direct") else None)
            if reason:
                _say(f"{name}: skipped, {reason}")
                result["skipped"][name] = reason
                continue
            if s.quiet_wait_seconds > 0:
                busy = _wait_quiet(s.quiet_wait_seconds)
                if busy > QUIET_VCPU:
                    _say(f"{name}: machine still {busy:.2f} vCPU busy after {s.quiet_wait_seconds:g} s; "
                         "going on")
            with Processes(logs) as own:
                _say(f"{name}: starting")
                try:
                    path = STARTERS[name](own, layout, logs, proxy_cpus)
                    result["paths"][name] = measure_until_quiet(path, path.origin or origin, s, load_cpus,
                                                                logs)
                except (OSError, RuntimeError, ValueError, ImportError, subprocess.SubprocessError) as exc:
                    # One broken path must not cost the others' numbers; its logs are kept for a post-mortem.
                    _say(f"{name}: FAILED: {exc}")
                    result["failed"][name] = f"{exc.__class__.__name__}: {exc}"
                    continue
                finally:
                    if name == "transparent":
                        own.stop_all()  # the namespaces go only once nothing runs in them
                        transparent_cleanup()
                if name == "kizuna" and s.profile_seconds > 0:
                    _say(f"kizuna: py-spy on {path.proxies[0].name} for {s.profile_seconds:g} s "
                         "under saturation")
                    result["profile"] = run_profile(path, s, load_cpus, results, logs, stamp)
        ok = not result["failed"]
    result["comparisons"] = comparisons(result)
    out = results / f"{stamp}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    result["file"] = str(out)
    if ok and not s.keep_logs:
        shutil.rmtree(logs, ignore_errors=True)
    else:
        result["logs"] = str(logs)
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.run`` / ``make bench``."""
    settings = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = run(settings)
    except KeyboardInterrupt:
        _say("interrupted; all processes stopped")
        return 130
    print(format_table(result))
    print(f"\nJSON: {result['file']}" + (f"\nprocess logs: {result['logs']}" if "logs" in result else ""))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
