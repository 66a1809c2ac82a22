"""What one benchmark run does: rates, durations, addresses, CPU pinning.

Every field is a command-line flag (``--fixed-seconds 5``) and an environment variable
(``BENCH_FIXED_SECONDS=5``); the flag wins. The parser is generated from the dataclass, so the two never
drift apart.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

ALL_PATHS = ("direct", "kizuna", "kizuna-mtls", "kizuna-no-telemetry", "haproxy", "haproxy-mtls", "transparent",
             "h2-direct", "h2")
DEFAULT_PATHS = ("direct", "kizuna", "kizuna-mtls", "kizuna-no-telemetry", "haproxy", "haproxy-mtls", "transparent",
                 "h2-direct", "h2")
"""Every path: the HTTP/2 rows (h2load, about one minute of the run) stand beside the HTTP/1.1 ones."""


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, slots=True)
class BenchSettings:
    """One benchmark run. Defaults give the full run (about three and a half minutes on 2 cores, of which
    the HTTP/2 rows take one)."""

    paths: str = _f(",".join(DEFAULT_PATHS), "comma-separated paths to measure: direct, kizuna, kizuna-mtls, "
                    "kizuna-no-telemetry, haproxy, transparent, h2-direct, h2 (h2 alone also runs h2-direct, "
                    "its baseline)")
    rate: float = _f(1000.0, "fixed-rate phase: requests per second (open loop)")
    connections: int = _f(4, "fixed-rate phase: keep-alive connections")
    warmup_seconds: float = _f(2.0, "warm-up at the fixed rate before the fixed-rate run (not reported)")
    fixed_seconds: float = _f(20.0, "fixed-rate phase duration")
    saturation_seconds: float = _f(10.0, "saturation phase (wrk) duration")
    saturation_connections: int = _f(4, "saturation phase: wrk connections")
    saturation_threads: int = _f(1, "saturation phase: wrk threads")
    h2_streams: int = _f(10, "h2 paths: concurrent streams per h2load connection (-m), both phases")
    profile_seconds: float = _f(5.0, "py-spy profile of the kizuna client sidecar under saturation; 0: skip")
    quiet_wait_seconds: float = _f(30.0, "before each path, wait up to this long for other work on the "
                                   "machine to stop (< 0.15 vCPU busy for 1 s); 0: do not wait")
    retries: int = _f(1, "measure a path again (up to this many times) when other work disturbed it")
    net: str = _f("127.50.1", "first three octets of the loopback /24 all processes bind in (127.50.0.0/16)")
    load_cpus: str = _f("0", "CPUs for the load generators and the origin (comma list; empty: no pinning)")
    proxy_cpus: str = _f("1", "CPUs for the proxies under test (comma list; empty: no pinning)")
    results_dir: str = _f("bench/results", "where <timestamp>.json, profiles and process logs go")
    keep_logs: bool = _f(False, "keep the per-process logs and configs even when the run succeeds")

    @property
    def path_list(self) -> tuple[str, ...]:
        chosen = tuple(p.strip() for p in self.paths.split(",") if p.strip())
        unknown = [p for p in chosen if p not in ALL_PATHS]
        if unknown:
            raise ValueError(f"unknown path(s) {unknown}; choose from {ALL_PATHS}")
        if "h2" in chosen and "h2-direct" not in chosen:
            # h2's added latency is over direct h2c; measure that baseline first.
            chosen = tuple(p for p in chosen if p != "h2") + ("h2-direct", "h2")
        return chosen

    def cpu_set(self, which: str) -> frozenset[int] | None:
        """The CPUs for ``load`` or ``proxy`` processes, or None when pinning is off or impossible here."""
        text = self.load_cpus if which == "load" else self.proxy_cpus
        cpus = frozenset(int(c) for c in text.split(",") if c.strip())
        available = os.sched_getaffinity(0)
        if not cpus or not cpus <= available:
            return None
        return cpus


def _convert(kind: Any, text: str) -> Any:
    if kind in (bool, "bool"):
        return text.strip().lower() in ("1", "true", "yes", "on")
    if kind in (int, "int"):
        return int(text)
    if kind in (float, "float"):
        return float(text)
    return text


def from_env(env: Mapping[str, str], base: BenchSettings | None = None) -> BenchSettings:
    """Apply ``BENCH_<FIELD>`` variables from ``env`` on top of ``base``."""
    base = base or BenchSettings()
    changes = {f.name: _convert(f.type, env[f"BENCH_{f.name.upper()}"])
               for f in fields(BenchSettings) if f"BENCH_{f.name.upper()}" in env}
    return replace(base, **changes)


def parse_args(argv: Sequence[str] | None, env: Mapping[str, str] | None = None) -> BenchSettings:
    """Settings from defaults, then the environment, then command-line flags."""
    base = from_env(os.environ if env is None else env)
    ap = argparse.ArgumentParser(prog="python -m bench.run",
                                 description="direct vs kizuna (2 sidecars) vs HAProxy (2 processes)")
    for f in fields(BenchSettings):
        flag = "--" + f.name.replace("_", "-")
        current = getattr(base, f.name)
        if f.type in (bool, "bool"):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=current,
                            help=f.metadata["help"])
        else:
            ap.add_argument(flag, type=functools.partial(_convert, f.type), default=current,
                            help=f"{f.metadata['help']} (default {current})")
    ns = ap.parse_args(argv)
    settings = BenchSettings(**vars(ns))
    settings.path_list  # noqa: B018 - validate early, before any process starts
    return settings
