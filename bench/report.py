"""Turn one run's measurements into the comparisons, the stdout table and the machine description.

Everything here works on the plain result dict that ``bench.run`` also writes as JSON, so a saved result can
be re-printed: ``python -m bench.report bench/results/<timestamp>.json``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

# The targets a kizuna sidecar is held to, against HAProxy on the same path and machine.
TARGET_THROUGHPUT_RATIO = 0.50
TARGET_VCPU_AT_RATE = 0.10
TARGET_RSS_MIB = 40.0
TARGET_ADDED_P90_MS = 0.5
TARGET_TELEMETRY_RATIO = 0.90
"""Saturation throughput with Istio metrics recording on, over the same path with it off (issue 7: <= 10%)."""
# More CPU than this used by others during a phase marks it as disturbed (tick-sampled: keep a margin).
DISTURBED_VCPU = 0.25


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc.__class__.__name__})"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0].strip() if text else "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_mib() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def _dist(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, kernel, and the versions of every program involved."""
    repo = Path(__file__).resolve().parent.parent
    dirty = _first_line(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"])
    return {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": sorted(os.sched_getaffinity(0)),
        "memory_mib": _mem_total_mib(),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "haproxy": _first_line(["/usr/sbin/haproxy", "-v"]),
        "wrk": _first_line(["wrk", "-v"]),
        "h2load": _first_line(["h2load", "--version"]),
        "uvloop": _dist("uvloop"),
        "httptools": _dist("httptools"),
        "py-spy": _dist("py-spy"),
        "kizuna_commit": _first_line(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"]),
        "kizuna_tree_modified": dirty not in ("", "unknown"),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _check(value: float | None, target: float, higher_is_better: bool) -> str:
    if value is None:
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    return "ok" if ok else "MISS"


def comparisons(result: dict[str, Any]) -> dict[str, Any]:
    """Added latency over direct, and the kizuna-vs-HAProxy figures with their targets."""
    paths = result.get("paths", {})
    out: dict[str, Any] = {"added_latency_ms": {}}
    out["disturbed"] = [f"{name}/{phase}" for name, data in paths.items() for phase in ("fixed", "saturation")
                        if (data.get(phase, {}).get("others_vcpu") or 0.0) > DISTURBED_VCPU]
    for name, data in paths.items():
        # h2 paths are measured with h2load against an h2c origin: their baseline is direct h2c.
        base = "h2-direct" if data.get("load") == "h2" else "direct"
        direct = paths.get(base, {}).get("fixed", {}).get("latency", {})
        lat = data.get("fixed", {}).get("latency", {})
        if name != base and direct and lat.get("count"):
            out["added_latency_ms"][name] = {q: lat[f"{q}_ms"] - direct[f"{q}_ms"]
                                             for q in ("p50", "p90", "p99")}
    kz, hp = paths.get("kizuna"), paths.get("haproxy")
    if not kz:
        return out

    def sidecars() -> list[dict[str, Any]]:
        return list(kz["processes"].values())

    added = out["added_latency_ms"].get("kizuna", {})
    vcpu = max(p["fixed"]["vcpu"] for p in sidecars())
    rss_mib = max(p["peak_rss_kb"] for p in sidecars()) / 1024
    targets: list[dict[str, Any]] = [
        {"name": "sidecar vCPU at the fixed rate (max of the two)", "value": vcpu,
         "target": f"<= {TARGET_VCPU_AT_RATE}", "result": _check(vcpu, TARGET_VCPU_AT_RATE, False)},
        {"name": "sidecar peak RSS, MiB (max of the two)", "value": rss_mib,
         "target": f"<= {TARGET_RSS_MIB:g}", "result": _check(rss_mib, TARGET_RSS_MIB, False)},
        {"name": "added 2-hop p90 latency over direct, ms", "value": added.get("p90"),
         "target": f"<= {TARGET_ADDED_P90_MS}",
         "result": _check(added.get("p90"), TARGET_ADDED_P90_MS, False)},
    ]
    if hp:
        path_ratio = _ratio(kz["saturation"]["rps"], hp["saturation"]["rps"])
        targets.insert(0, {"name": "saturation throughput, kizuna path / HAProxy path", "value": path_ratio,
                           "target": f">= {TARGET_THROUGHPUT_RATIO}",
                           "result": _check(path_ratio, TARGET_THROUGHPUT_RATIO, True)})
        # Per CPU-second: does not depend on which process was the bottleneck on a 2-core machine.
        for index, hop in ((0, "client hop"), (1, "server hop")):
            kz_proc, hp_proc = _hop_pair(kz, hp, index)
            ratio = _ratio(kz_proc["saturation"]["requests_per_cpu_second"],
                           hp_proc["saturation"]["requests_per_cpu_second"])
            targets.insert(1, {"name": f"requests per CPU-second, kizuna / HAProxy, {hop}", "value": ratio,
                               "target": f">= {TARGET_THROUGHPUT_RATIO}",
                               "result": _check(ratio, TARGET_THROUGHPUT_RATIO, True)})
    off = paths.get("kizuna-no-telemetry")
    if off:
        # Istio metrics recording's cost (issue 7): the same two sidecars with recording off. Saturation
        # throughput, and requests per CPU-second of each hop (which other work on the machine disturbs less).
        ratio = _ratio(kz["saturation"]["rps"], off["saturation"]["rps"])
        targets.append({"name": "saturation throughput, telemetry on / off", "value": ratio,
                        "target": f">= {TARGET_TELEMETRY_RATIO}",
                        "result": _check(ratio, TARGET_TELEMETRY_RATIO, True)})
        for index, hop in ((0, "client hop"), (1, "server hop")):
            on_proc, off_proc = _hop_pair(kz, off, index)
            ratio = _ratio(on_proc["saturation"]["requests_per_cpu_second"],
                           off_proc["saturation"]["requests_per_cpu_second"])
            targets.append({"name": f"requests per CPU-second, telemetry on / off, {hop}", "value": ratio,
                            "target": f">= {TARGET_TELEMETRY_RATIO}",
                            "result": _check(ratio, TARGET_TELEMETRY_RATIO, True)})
    out["targets"] = targets
    return out


def _hop_pair(kz: dict[str, Any], hp: dict[str, Any], index: int) -> tuple[dict[str, Any], dict[str, Any]]:
    return list(kz["processes"].values())[index], list(hp["processes"].values())[index]


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(result: dict[str, Any]) -> str:
    """The human-readable report printed at the end of a run."""
    s, m = result["settings"], result["machine"]
    lines = [
        f"kizuna bench {result['timestamp']}",
        f"machine: {m['cpu_model']}, {m['cpus']} CPUs, {m['memory_mib']} MiB, Linux {m['kernel']}, "
        f"Python {m['python']}",
        f"tools: {m['haproxy'].split(' - ')[0]} | {m['wrk'].split(' Copyright')[0]} | "
        f"uvloop {m['uvloop']} httptools {m['httptools']} | "
        f"kizuna {m['kizuna_commit']}{' (modified tree)' if m['kizuna_tree_modified'] else ''}",
        f"pinning: {result['pinning']}",
        "request (HTTP/1.1 paths, both tools): GET http://bench:80/ HTTP/1.1 + Host: bench; "
        "response 200, 1024-byte body",
        "",
        f"Fixed rate: {s['rate']:g} req/s open loop, {s['connections']} keep-alive connections, "
        f"{s['fixed_seconds']:g} s (bench.paced); latency in ms, request written -> response parsed",
        f"{'path':<20}{'p50':>8}{'p90':>8}{'p99':>8}{'p99.9':>8}{'max':>8}{'+p50':>8}{'+p90':>8}{'+p99':>8}"
        f"{'errors':>8}{'queued':>8}",
    ]
    cmp = result.get("comparisons", {})
    for name, data in result["paths"].items():
        f = data["fixed"]
        lat, add = f["latency"], cmp.get("added_latency_ms", {}).get(name, {})
        lines.append(f"{name:<20}{_fmt(lat.get('p50_ms')):>8}{_fmt(lat.get('p90_ms')):>8}{_fmt(lat.get('p99_ms')):>8}"
                     f"{_fmt(lat.get('p99.9_ms')):>8}{_fmt(lat.get('max_ms')):>8}{_fmt(add.get('p50')):>8}"
                     f"{_fmt(add.get('p90')):>8}{_fmt(add.get('p99')):>8}{sum(f['errors'].values()):>8}"
                     f"{'-' if f['queued'] is None else f['queued']:>8}")
    if any(d.get("load") == "h2" for d in result["paths"].values()):
        lines.append(f"h2 rows: h2load -c{s['connections']} -m{s.get('h2_streams', 10)} --rps "
                     f"{s['rate'] / s['connections']:g} (per connection), h2c, :authority bench; +p* over h2-direct; "
                     "h2load does not report queued requests")
    lines += ["", f"Saturation: wrk -t{s['saturation_threads']} -c{s['saturation_connections']}, "
              f"{s['saturation_seconds']:g} s"
              + (f"; h2 rows: h2load -c{s['saturation_connections']} -m{s.get('h2_streams', 10)}"
                 if any(d.get("load") == "h2" for d in result["paths"].values()) else ""),
              f"{'path':<20}{'req/s':>10}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'errors':>8}"]
    for name, data in result["paths"].items():
        w = data["saturation"]
        lat = w["latency_us"]
        lines.append(f"{name:<20}{w['rps']:>10.0f}{lat['p50'] / 1000:>9.3f}{lat['p90'] / 1000:>9.3f}"
                     f"{lat['p99'] / 1000:>9.3f}{sum(w['errors'].values()):>8}")
    lines += ["", "Processes (CPU from /proc/<pid>/stat utime+stime; RSS peak = VmHWM over the whole run)",
              f"{'path':<20}{'process':<28}{'CPU s/1k req':>13}{'vCPU':>7}{'CPU s/1k req':>13}{'vCPU':>7}"
              f"{'req/CPU-s':>11}{'peak RSS':>10}",
              f"{'':<40}{'@ fixed rate':>20}{'@ saturation':>20}{'@ sat':>11}{'MiB':>10}"]
    for name, data in result["paths"].items():
        for proc_name, p in {**data["processes"], **data.get("shared", {})}.items():
            fx, st = p["fixed"], p["saturation"]
            rss = p.get("peak_rss_kb")
            lines.append(f"{name:<20}{proc_name:<28}{_fmt(fx['cpu_s_per_1k'], 4):>13}{_fmt(fx['vcpu'], 3):>7}"
                         f"{_fmt(st['cpu_s_per_1k'], 4):>13}{_fmt(st['vcpu'], 3):>7}"
                         f"{_fmt(st['requests_per_cpu_second'], 0):>11}"
                         f"{_fmt(rss / 1024 if rss else None, 1):>10}")
    busy_before = result.get("busy_before_vcpu", 0.0)
    lines += ["", "Machine CPU per phase (/proc/stat): busy/stolen vCPU per core; 'others' = busy beyond our",
              "processes, i.e. interference. /proc/stat samples at clock ticks and misses short bursts on a",
              f"mostly idle core: small or negative values are noise. Busy before the run: {busy_before:.2f}"]
    for name, data in result["paths"].items():
        for phase in ("fixed", "saturation"):
            machine = data[phase].get("machine", {})
            cells = [f"{cpu} {v['busy_vcpu']:.2f}/{v['steal_vcpu']:.2f}"
                     for cpu, v in sorted(machine.items()) if cpu != "cpu"]
            others = data[phase].get("others_vcpu")
            lines.append(f"{name:<20}{phase:<12}" + "   ".join(cells) + f"   others {_fmt(others, 2)}")
    for name, data in result["paths"].items():
        for attempt in data.get("earlier_attempts", ()):
            lines.append(f"note: {name} was measured again: other work disturbed "
                         f"{', '.join(attempt['disturbed'])} of an earlier attempt")
    if cmp.get("disturbed"):
        lines += ["", f"WARNING: other work on the machine used > {DISTURBED_VCPU} vCPU during "
                  f"{', '.join(cmp['disturbed'])}:",
                  "those numbers are not trustworthy; run again on a quiet machine"]
    if cmp.get("targets"):
        lines += ["", "kizuna sidecar vs targets"]
        for t in cmp["targets"]:
            lines.append(f"  {t['name']:<58}{_fmt(t['value']):>8}  {t['target']:<8} {t['result']}")
    if result.get("skipped"):
        lines += [""] + [f"skipped {name}: {why}" for name, why in result["skipped"].items()]
    if result.get("failed"):
        lines += [""] + [f"FAILED {name}: {why}" for name, why in result["failed"].items()]
    prof = result.get("profile")
    if prof and prof.get("hot", {}).get("by_self"):
        hot = prof["hot"]
        lines += ["", f"py-spy --native, {prof['process']} under saturation, alone on its core "
                  f"({prof['seconds']:g} s, {hot['total_samples']} samples, {hot['waiting_percent']:.0f}% "
                  "asleep in epoll left out)",
                  f"files: {', '.join(prof['files'].values())}",
                  f"  {'self %':>7}  {'total %':>7}  function (share of on-CPU samples)"]
        for row in prof["hot"]["by_self"]:
            lines.append(f"  {row['self']:>7.1f}  {row['total']:>7.1f}  {row['function']}")
    elif prof:
        lines += ["", f"py-spy profile: {prof.get('error', 'no samples')}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Re-print the table of a saved result file."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.report RESULT.json", file=sys.stderr)
        return 2
    print(format_table(json.loads(Path(args[0]).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
