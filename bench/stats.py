"""Latency summaries: nearest-rank percentiles over raw samples, so no histogram bucketing hides the tail."""

from __future__ import annotations

import math
from collections.abc import Sequence

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def percentile(sorted_values: Sequence[int], q: float) -> int:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of already sorted samples.

    Nearest rank returns a value that was actually observed, which is what a tail latency should be.
    """
    if not sorted_values:
        raise ValueError("percentile of no samples")
    if not 0.0 < q <= 100.0:
        raise ValueError(f"percentile must be in (0, 100]: {q}")
    # The epsilon keeps 90.0% of 10 samples at rank 9, not 10, despite 0.9 * 10 == 9.000000000000002.
    rank = math.ceil(q / 100.0 * len(sorted_values) - 1e-9)
    return sorted_values[max(rank, 1) - 1]


def summarize_ns(samples_ns: Sequence[int]) -> dict[str, float]:
    """Count, min, mean, max and the standard percentiles of nanosecond samples, reported in milliseconds."""
    if not samples_ns:
        return {"count": 0}
    ordered = sorted(samples_ns)
    out: dict[str, float] = {
        "count": len(ordered),
        "min_ms": ordered[0] / 1e6,
        "mean_ms": sum(ordered) / len(ordered) / 1e6,
        "max_ms": ordered[-1] / 1e6,
    }
    for q in PERCENTILES:
        out[f"p{q:g}_ms"] = percentile(ordered, q) / 1e6
    return out
