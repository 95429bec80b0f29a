"""CPU time spent by each process of the stack (and by the bench's own process) over a phase,
divided by what the phase did: what one call, chunk or event costs, which reads the same on a
slow host and a fast one, where rates do not."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

from bench.stack import BenchStack
from bench.stats import Run
from jobstream.embedded.procs import descendants

TICKS_PER_S = os.sysconf("SC_CLK_TCK")
CLIENT = "client"


def _short(service: str) -> str:
    """worker-3 -> worker: replicas of one service add up."""
    return service.split("-")[0]


def seconds(pid: int) -> float:
    """CPU seconds (user + system) `pid` has used so far; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S


def by_service(stack: BenchStack) -> dict[str, float]:
    """CPU seconds so far of each service, its child processes included."""
    roots = {name: proc.pid for name, proc in stack.services.items() if proc.alive and proc.pid}
    roots["broker"] = stack.broker.pid or 0
    roots["postgres"] = stack.postgres.pid or 0
    return {name: sum(seconds(p) for p in [pid, *descendants(pid)]) for name, pid in roots.items() if pid}


def with_client(spent: Mapping[str, float]) -> dict[str, float]:
    """`spent`, and this process's own CPU seconds so far as CLIENT."""
    return {**spent, CLIENT: time.process_time()}


def per_unit(prefix: str, before: Mapping[str, float], after: Mapping[str, float], units: float) -> Run:
    """Milliseconds of CPU per unit for each name (replicas added up), as `prefix`_`name`."""
    figures: Run = {}
    for name, seconds in after.items():
        key = f"{prefix}_{_short(name)}"
        figures[key] = figures.get(key, 0.0) + (seconds - before.get(name, seconds)) * 1000 / units
    return figures
