"""Saturation runs with wrk: build its command line and parse what it prints.

``wrk.lua`` prints one ``KIZUNA_WRK {json}`` summary line from its ``done`` hook; that line is the source of
truth. wrk's own human-readable ``Requests/sec:`` line is parsed too, as a cross-check that the two agree.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).with_name("wrk.lua")
SUMMARY_PREFIX = "KIZUNA_WRK "
_RPS_LINE = re.compile(r"^Requests/sec:\s+([0-9.]+)\s*$", re.MULTILINE)
_NON_2XX_LINE = re.compile(r"^\s*Non-2xx or 3xx responses:\s+(\d+)\s*$", re.MULTILINE)


class WrkOutputError(ValueError):
    """wrk's output lacks the summary line or is inconsistent with itself."""


@dataclass(frozen=True, slots=True)
class WrkResult:
    """One wrk run: how many requests completed in how long, errors by kind, and latency percentiles."""

    requests: int
    duration_s: float
    bytes: int
    errors: dict[str, int] = field(default_factory=dict)
    latency_us: dict[str, float] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        """Completed requests per second over the whole run."""
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "duration_s": self.duration_s, "rps": self.rps,
                "bytes": self.bytes, "errors": dict(self.errors), "latency_us": dict(self.latency_us)}


def command(url: str, *, threads: int, connections: int, seconds: float, target: str, host: str,
            wrk: str = "wrk") -> list[str]:
    """The wrk argv for a saturation run that sends ``GET <target>`` with ``Host: <host>`` to ``url``."""
    return [wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s",
            "-s", str(SCRIPT), url, "--", target, host]


def parse_output(text: str) -> WrkResult:
    """Parse wrk's stdout (with ``wrk.lua``'s summary line) into a :class:`WrkResult`."""
    summary: dict[str, Any] | None = None
    for line in text.splitlines():
        if line.startswith(SUMMARY_PREFIX):
            try:
                summary = json.loads(line[len(SUMMARY_PREFIX):])
            except json.JSONDecodeError as exc:
                raise WrkOutputError(f"bad wrk summary line: {line!r}") from exc
    if summary is None:
        raise WrkOutputError("no KIZUNA_WRK summary line in wrk output (was wrk.lua loaded?)")
    try:
        result = WrkResult(
            requests=int(summary["requests"]),
            duration_s=int(summary["duration_us"]) / 1e6,
            bytes=int(summary["bytes"]),
            errors={k: int(v) for k, v in summary["errors"].items()},
            latency_us={k: float(v) for k, v in summary["latency_us"].items()},
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise WrkOutputError(f"incomplete wrk summary: {summary!r}") from exc
    rps_match = _RPS_LINE.search(text)
    # wrk rounds to two decimals; anything beyond 1% apart means we parsed the wrong thing.
    if rps_match and result.requests and abs(float(rps_match.group(1)) - result.rps) > 0.01 * result.rps:
        raise WrkOutputError(f"wrk says {rps_match.group(1)} req/s, summary gives {result.rps:.2f}")
    non_2xx = _NON_2XX_LINE.search(text)
    if non_2xx and int(non_2xx.group(1)) != result.errors.get("status", 0):
        raise WrkOutputError(f"wrk reports {non_2xx.group(1)} non-2xx responses, summary "
                             f"{result.errors.get('status')}")
    return result
