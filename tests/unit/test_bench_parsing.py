"""The benchmark harness's pure helpers: wrk output, /proc text, percentiles, py-spy stacks, settings."""

from __future__ import annotations

import pytest

from bench import wrk
from bench.paced import request_bytes
from bench.procs import CLOCK_TICKS, parse_proc_stat, parse_stat_cpu_ticks, parse_status_kb
from bench.profile import function_name, hot_functions, parse_collapsed
from bench.report import comparisons
from bench.settings import BenchSettings, from_env, parse_args
from bench.stats import percentile, summarize_ns

# Captured from `wrk -t1 -c4 -d2s -s bench/wrk.lua http://127.50.9.1:8080/ -- http://bench:80/ bench`.
WRK_OUTPUT = """\
Running 2s test @ http://127.50.9.1:8080/
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    74.53us   74.68us   2.22ms   97.73%
    Req/Sec    48.19k     4.66k   58.03k    76.19%
  100556 requests in 2.10s, 104.62MB read
Requests/sec:  47885.18
Transfer/sec:     49.82MB
KIZUNA_WRK {"requests": 100556, "duration_us": 2099940, "bytes": 109706596, \
"errors": {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}, \
"latency_us": {"p50": 65, "p90": 84, "p99": 314, "max": 2217, "mean": 74.5}}
"""


def test_wrk_summary_line_gives_throughput_errors_and_latency() -> None:
    result = wrk.parse_output(WRK_OUTPUT)
    assert result.requests == 100556
    assert result.duration_s == pytest.approx(2.09994)
    assert result.rps == pytest.approx(47885.18, rel=1e-4)
    assert result.error_count == 0
    assert result.latency_us["p99"] == 314
    assert result.to_json()["rps"] == pytest.approx(result.rps)


def test_wrk_status_errors_are_counted_and_cross_checked() -> None:
    text = WRK_OUTPUT.replace('"status": 0', '"status": 7').replace(
        "Requests/sec:", "  Non-2xx or 3xx responses: 7\nRequests/sec:")
    assert wrk.parse_output(text).errors["status"] == 7
    with pytest.raises(wrk.WrkOutputError, match="non-2xx"):
        wrk.parse_output(text.replace("responses: 7", "responses: 8"))


def test_wrk_output_without_summary_line_is_an_error() -> None:
    without = "\n".join(line for line in WRK_OUTPUT.splitlines() if not line.startswith("KIZUNA_WRK"))
    with pytest.raises(wrk.WrkOutputError, match="no KIZUNA_WRK"):
        wrk.parse_output(without)
    with pytest.raises(wrk.WrkOutputError, match="incomplete"):
        wrk.parse_output('KIZUNA_WRK {"requests": 1}\n')


def test_wrk_rps_line_disagreeing_with_summary_is_an_error() -> None:
    with pytest.raises(wrk.WrkOutputError, match="req/s"):
        wrk.parse_output(WRK_OUTPUT.replace("47885.18", "23000.00"))


def test_wrk_command_passes_target_and_host_to_the_script() -> None:
    argv = wrk.command("http://127.50.1.21:15001/", threads=1, connections=4, seconds=10,
                       target="http://bench:80/", host="bench")
    assert argv[:4] == ["wrk", "-t1", "-c4", "-d10s"]
    assert argv[-4:] == ["http://127.50.1.21:15001/", "--", "http://bench:80/", "bench"]
    assert str(wrk.SCRIPT) in argv


def test_paced_request_is_wrks_bytes() -> None:
    # The exact bytes wrk sent with wrk.lua (captured on a raw socket): both tools send the same request.
    wrk_sent = b"GET http://bench:80/ HTTP/1.1\r\nHost: bench\r\n\r\n"
    assert request_bytes("http://bench:80/", "bench") == wrk_sent


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 11))  # 1..10
    assert percentile(values, 50) == 5
    assert percentile(values, 90) == 9
    assert percentile(values, 99) == 10
    assert percentile(values, 100) == 10
    assert percentile([7], 99.9) == 7
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile(values, 0)


def test_summary_reports_milliseconds() -> None:
    summary = summarize_ns([1_000_000] * 99 + [5_000_000])
    assert summary["count"] == 100
    assert summary["p50_ms"] == 1.0
    assert summary["p99_ms"] == 1.0
    assert summary["p99.9_ms"] == 5.0
    assert summary["max_ms"] == 5.0
    assert summarize_ns([]) == {"count": 0}


def test_stat_cpu_ticks_survive_a_command_name_with_spaces_and_parens() -> None:
    line = ("4242 (python -c (x)) S 1 4242 4242 0 -1 4194560 1500 0 0 0 123 45 0 0 20 0 3 0 999 "
            "123456789 5000 18446744073709551615 1 1 0 0 0 0 0 16781312 2 0 0 0 17 1 0 0 0 0 0")
    assert parse_stat_cpu_ticks(line) == 123 + 45


def test_status_kb_lines() -> None:
    status = "Name:\tpython\nVmPeak:\t  300000 kB\nVmHWM:\t   31234 kB\nVmRSS:\t   29000 kB\n"
    assert parse_status_kb(status, "VmHWM") == 31234
    assert parse_status_kb(status, "VmRSS") == 29000
    assert parse_status_kb(status, "VmSwap") is None


def test_proc_stat_busy_and_steal() -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice, in clock ticks
    text = ("cpu  200 0 100 5000 10 3 2 7 0 0\n"
            "cpu0 150 0 50 2500 5 3 2 7 0 0\n"
            "cpu1 50 0 50 2500 5 0 0 0 0 0\n"
            "intr 12345\n")
    stats = parse_proc_stat(text)
    assert set(stats) == {"cpu", "cpu0", "cpu1"}
    assert stats["cpu0"]["busy_s"] == pytest.approx(205 / CLOCK_TICKS)  # iowait and idle are not busy
    assert stats["cpu0"]["steal_s"] == pytest.approx(7 / CLOCK_TICKS)
    assert stats["cpu1"]["steal_s"] == 0.0


def test_collapsed_stacks_rank_functions_by_self_and_total() -> None:
    text = ("main (kizuna/proxy/main.py:10);run_forever (asyncio/base_events.py:600);"
            "data_received (kizuna/proxy/outbound.py:40);feed (kizuna/protocols/http1.py:12) 30\n"
            "main (kizuna/proxy/main.py:10);run_forever (asyncio/base_events.py:600);"
            "data_received (kizuna/proxy/outbound.py:41) 50\n"
            "main (kizuna/proxy/main.py:10);run_forever (asyncio/base_events.py:600) 20\n"
            "main (kizuna/proxy/main.py:10);run_forever (asyncio/base_events.py:600);"
            "epoll_pwait (libc.so.6) 100\n")
    hot = hot_functions(parse_collapsed(text), top=3)
    assert hot["total_samples"] == 200
    assert hot["waiting_percent"] == 50.0  # asleep in epoll: not on-CPU, left out of the shares
    assert hot["by_self"][0] == {"function": "data_received (kizuna/proxy/outbound.py)", "self": 50.0,
                                 "total": 80.0}
    assert [r["function"] for r in hot["by_self"]][1:] == ["feed (kizuna/protocols/http1.py)",
                                                           "run_forever (asyncio/base_events.py)"]
    assert {r["function"] for r in hot["by_total"][:2]} == {"main (kizuna/proxy/main.py)",
                                                            "run_forever (asyncio/base_events.py)"}
    assert hot["by_total"][0]["total"] == 100.0
    assert function_name("f (a/b.py:12)") == "f (a/b.py)"
    with pytest.raises(ValueError):
        parse_collapsed("not a stack\n")


def test_recursive_frames_count_once_in_total() -> None:
    hot = hot_functions(parse_collapsed("a (m.py:1);a (m.py:2);a (m.py:3) 10\n"))
    assert hot["by_total"] == [{"function": "a (m.py)", "self": 100.0, "total": 100.0}]


def test_settings_flags_override_environment() -> None:
    env = {"BENCH_FIXED_SECONDS": "3", "BENCH_PATHS": "direct,haproxy", "BENCH_KEEP_LOGS": "yes"}
    assert from_env(env).fixed_seconds == 3.0
    s = parse_args(["--fixed-seconds", "7", "--rate", "500"], env)
    assert (s.fixed_seconds, s.rate, s.keep_logs) == (7.0, 500.0, True)
    assert s.path_list == ("direct", "haproxy")
    assert s.saturation_seconds == BenchSettings().saturation_seconds
    assert parse_args(["--no-keep-logs"], env).keep_logs is False


def test_settings_reject_unknown_paths() -> None:
    with pytest.raises(ValueError, match="envoy"):
        parse_args(["--paths", "direct,envoy"], {})


def _path(p90_ms: float, rps: float, procs: dict[str, tuple[float, float, int]],
          others: float = 0.0) -> dict[str, object]:
    """A result entry: latency, wrk rps, per process (vCPU at rate, req/CPU-s at saturation, peak RSS kB)."""
    return {
        "fixed": {"latency": {"count": 100, "p50_ms": p90_ms / 2, "p90_ms": p90_ms, "p99_ms": p90_ms * 2},
                  "others_vcpu": others},
        "saturation": {"rps": rps, "others_vcpu": 0.0},
        "processes": {name: {"fixed": {"vcpu": vcpu}, "saturation": {"requests_per_cpu_second": per_cpu},
                             "peak_rss_kb": rss} for name, (vcpu, per_cpu, rss) in procs.items()},
    }


def test_comparisons_judge_kizuna_against_haproxy_and_direct() -> None:
    result = {"paths": {
        "direct": _path(0.05, 100_000, {}),
        "kizuna": _path(0.45, 6_000, {"kz-client": (0.08, 20_000, 30 * 1024),
                                      "kz-server": (0.12, 30_000, 20 * 1024)}),
        "haproxy": _path(0.30, 10_000, {"hp-client": (0.05, 50_000, 14 * 1024),
                                        "hp-server": (0.05, 50_000, 14 * 1024)}, others=0.5),
    }}
    cmp = comparisons(result)
    assert cmp["added_latency_ms"]["kizuna"]["p90"] == pytest.approx(0.40)
    assert cmp["disturbed"] == ["haproxy/fixed"]
    verdicts = {t["name"]: (round(t["value"], 3), t["result"]) for t in cmp["targets"]}
    assert verdicts["saturation throughput, kizuna path / HAProxy path"] == (0.6, "ok")
    assert verdicts["requests per CPU-second, kizuna / HAProxy, client hop"] == (0.4, "MISS")
    assert verdicts["requests per CPU-second, kizuna / HAProxy, server hop"] == (0.6, "ok")
    assert verdicts["sidecar vCPU at the fixed rate (max of the two)"] == (0.12, "MISS")
    assert verdicts["sidecar peak RSS, MiB (max of the two)"] == (30.0, "ok")
    assert verdicts["added 2-hop p90 latency over direct, ms"] == (0.4, "ok")
