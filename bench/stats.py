"""Percentiles of one run, and the median and spread of a figure over repeated runs."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

Run = dict[str, float]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest-rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def latencies_ms(prefix: str, seconds: Sequence[float]) -> Run:
    """p50 and p99 in milliseconds, and how many samples they rest on."""
    return {
        f"{prefix}_p50_ms": percentile(seconds, 50) * 1000,
        f"{prefix}_p99_ms": percentile(seconds, 99) * 1000,
        f"{prefix}_samples": float(len(seconds)),
    }


@dataclass(frozen=True)
class Figure:
    median: float
    low: float
    high: float
    runs: tuple[float, ...]

    def as_dict(self) -> dict[str, object]:
        return {"median": self.median, "min": self.low, "max": self.high, "runs": list(self.runs)}


def aggregate(runs: Sequence[Run]) -> dict[str, Figure]:
    """Each figure's median, min and max over the runs that have it (NaN samples skipped)."""
    names = list(dict.fromkeys(name for run in runs for name in run))
    figures: dict[str, Figure] = {}
    for name in names:
        values = [run[name] for run in runs if name in run and not math.isnan(run[name])]
        if values:
            figures[name] = Figure(statistics.median(values), min(values), max(values), tuple(values))
    return figures
