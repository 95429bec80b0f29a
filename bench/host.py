"""How fast the host ran and how much of it the bench had, so runs on different days compare.

The same code on the same kind of machine has measured two to three times slower on one day than
on another, with little CPU time stolen by the hypervisor: every latency and rate moves with the
host. The report therefore carries a fixed pure-Python workload's time, taken before and after
the scenarios, and the shares of CPU time the machine was busy and lost to other guests.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass

# The workload's size: 0.1 to 0.2 s a run on the 2-core development machine.
LOOP_ITERATIONS = 1_000_000
LOOP_RUNS = 5


@dataclass(frozen=True)
class CpuTicks:
    """The machine-wide counters of /proc/stat's first line, in clock ticks."""

    busy: int
    idle: int
    steal: int

    @property
    def total(self) -> int:
        return self.busy + self.idle + self.steal


def parse_cpu_line(line: str) -> CpuTicks:
    """Reads `cpu  user nice system idle iowait irq softirq steal [guest guest_nice]`; guest time
    is already inside user and nice, so it is not counted again."""
    fields = line.split()
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        raise ValueError(f"not the machine-wide cpu line of /proc/stat: {line!r}")
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return CpuTicks(busy=user + nice + system + irq + softirq, idle=idle + iowait, steal=steal)


def cpu_ticks() -> CpuTicks:
    with open("/proc/stat") as f:
        return parse_cpu_line(f.readline())


def shares(before: CpuTicks, after: CpuTicks) -> dict[str, float]:
    """Of the CPU time between two readings: how much this guest used, and how much it was
    ready to run but the hypervisor ran someone else (steal)."""
    total = after.total - before.total
    if total <= 0:
        return {"busy_share": 0.0, "steal_share": 0.0}
    return {"busy_share": (after.busy - before.busy) / total, "steal_share": (after.steal - before.steal) / total}


@dataclass(frozen=True)
class Start:
    """What was measured before the scenarios, to set against what is measured after them."""

    loop_ms: float
    ticks: CpuTicks


def start() -> Start:
    return Start(python_loop_ms(), cpu_ticks())


def finish(started: Start) -> dict[str, float]:
    """The report's `host` figures: the loop before and after, and the shares in between."""
    between = shares(started.ticks, cpu_ticks())
    return {"python_loop_ms_before": started.loop_ms, "python_loop_ms_after": python_loop_ms(), **between}


def summary(measured: Mapping[str, float]) -> str:
    """The report's line for the figures `finish` returned."""
    return (
        f"Host speed (bench.host, a fixed Python loop): {measured['python_loop_ms_before']:.0f} ms before the"
        f" scenarios, {measured['python_loop_ms_after']:.0f} ms after; during them the machine was busy"
        f" {measured['busy_share']:.0%} of its CPU time and lost {measured['steal_share']:.1%} to other guests."
    )


def python_loop_ms() -> float:
    """The median time of a fixed loop of the interpreter's everyday work (arithmetic, a dict, an
    attribute): a figure for how fast one core runs Python right now."""
    timings = []
    for _ in range(LOOP_RUNS):
        started = time.perf_counter()
        _workload(LOOP_ITERATIONS)
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


class _Counter:
    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


def _workload(iterations: int) -> int:
    seen: dict[int, int] = {}
    counter = _Counter()
    for i in range(iterations):
        seen[i & 1023] = i
        counter.n += i % 7
    return counter.n + len(seen)
