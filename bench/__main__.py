"""`python -m bench`: starts the embedded stack, runs the scenarios, writes JSON and Markdown.

python -m bench [--smoke] [--repeat N] [--out DIR] [--only throughput,submit,...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import bigjob, cancel, capacity, events, fanout, host, report, submit, throughput, transport
from bench.sizes import FULL, SMOKE, Sizes
from bench.stack import BenchStack
from bench.stats import Figure, Run, aggregate

Scenario = Callable[[BenchStack, Sizes, int], Awaitable[list[Run]]]

# In running order. Each scenario runs on a stack of its own, started for it: the embedded broker
# keeps every record in memory and a fetch lists every batch its partition holds, so on a shared
# stack a scenario would also measure the records the ones before it left (docs/capacity.md).
SCENARIOS: dict[str, Scenario] = {
    "throughput": throughput.run,
    "transport": transport.run,
    "submit": submit.run,
    "cancel": cancel.run,
    "events": events.run,
    "bigjob": bigjob.run,
    "capacity": capacity.run,
    "fanout": fanout.run,
}
# Except these, which run on the stack of the scenario named, right after it: the transport's
# limit is measured on the broker that carried the throughput scenario, with a chunk task it made.
SHARES_STACK_WITH = {"transport": "throughput"}
# And these start a fresh stack for every run, not only for their first: their figures are
# latencies, and each run leaves thousands of batches in the broker's partitions, which its fetches
# then pay for (a run of `events` measured an event p99 of 90 ms on a fresh stack, then 211 and
# 262 ms on the same stack after one and two runs). Their runs are then repeats of one measurement,
# and the median is not simply the run in the middle of the broker's growth.
FRESH_STACK_PER_RUN = frozenset({"submit", "cancel", "events", "fanout"})
NOT_IMPLEMENTED: tuple[str, ...] = ()
# Per scenario, all its repeats: past this something is stuck, not slow.
LIMIT_S = 600.0
SMOKE_LIMIT_S = 120.0
RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: proves every scenario runs (a minute or two)")
    parser.add_argument("--repeat", type=int, help="runs of each scenario (default 3, smoke 1)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"where results go (default {RESULTS})")
    parser.add_argument("--only", help=f"comma-separated scenarios, from: {', '.join(SCENARIOS)}")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",")] if args.only else list(SCENARIOS)
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    args.only = [s for s in SCENARIOS if s in chosen]
    if args.repeat is None:
        args.repeat = 1 if args.smoke else 3
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


class ScenarioFailed(RuntimeError):
    """A service died under the scenario, or the scenario overran its time."""


@dataclass
class Outcome:
    figures: dict[str, dict[str, Figure]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


async def run(names: Sequence[str], sizes: Sizes, repeat: int, root: Path, limit_s: float) -> Outcome:
    """Runs the named scenarios, each group on fresh stacks (see stack_runs). A scenario that fails
    is recorded with its error, and the next one runs."""
    outcome = Outcome()
    for group in stack_groups(names):
        runs: dict[str, list[Run]] = {name: [] for name in group}
        for n, runs_here in enumerate(stack_runs(group, repeat)):
            if all(name in outcome.errors for name in group):
                break
            stack = BenchStack(root / f"{'+'.join(group)}-{n}")
            try:
                await stack.start(workers=0)  # each scenario sizes the worker pool
                for name in group:
                    if name not in outcome.errors:
                        runs[name] += await _scenario(stack, name, sizes, runs_here, limit_s, outcome)
            except Exception as err:  # the stack itself would not start: every scenario of the group fails
                for name in group:
                    outcome.errors.setdefault(name, f"{type(err).__name__}: {err}")
                _say(f"{', '.join(group)}: FAILED, the stack did not start: {err}")
            finally:
                await asyncio.to_thread(stack.stop)
        for name in group:
            if name not in outcome.errors:
                outcome.figures[name] = aggregate(runs[name])
    return outcome


def stack_runs(group: Sequence[str], repeat: int) -> list[int]:
    """How many runs of the group go on each of its stacks, in order: a fresh stack for every run,
    or one stack for all of them."""
    if len(group) == 1 and group[0] in FRESH_STACK_PER_RUN:
        return [1] * repeat
    return [repeat]


def stack_groups(names: Sequence[str]) -> list[list[str]]:
    """The scenarios in running order, those that share a stack in one group."""
    groups: list[list[str]] = []
    for name in names:
        if groups and SHARES_STACK_WITH.get(name) in groups[-1]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


async def _scenario(
    stack: BenchStack, name: str, sizes: Sizes, repeat: int, limit_s: float, outcome: Outcome
) -> list[Run]:
    """The scenario's runs on this stack; none, with its error recorded in `outcome`, if it fails."""
    started = time.monotonic()
    _say(f"{name}: running")
    try:
        if name != "throughput":
            await stack.set_workers(sizes.wide_workers, sizes.wide_concurrency)
        runs = await _guarded(stack, SCENARIOS[name](stack, sizes, repeat), limit_s)
    except Exception as err:
        outcome.errors[name] = f"{type(err).__name__}: {err}"
        _say(f"{name}: FAILED after {time.monotonic() - started:.0f} s: {err}\n{stack.log_tails(15)}")
        stack.revive()
        return []
    _say(f"{name}: done in {time.monotonic() - started:.0f} s")
    return runs


async def _guarded(stack: BenchStack, scenario: Awaitable[list[Run]], limit_s: float) -> list[Run]:
    """Awaits the scenario, failing it at once when a service dies (its clients would wait forever)."""
    task = asyncio.ensure_future(scenario)
    deadline = time.monotonic() + limit_s
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=1.0)
            dead = stack.dead()
            if dead and not task.done():
                raise ScenarioFailed(f"{', '.join(dead)} exited during the scenario")
            if time.monotonic() > deadline and not task.done():
                raise ScenarioFailed(f"still running after {limit_s:.0f} s")
        return task.result()
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


def main(argv: Sequence[str] | None = None) -> Path:
    """Runs the bench and returns the path of the JSON it wrote."""
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING)
    sizes = SMOKE if args.smoke else FULL
    started = time.monotonic()
    host_at_start = host.start()
    with tempfile.TemporaryDirectory(prefix="jobstream-bench-") as tmp:
        outcome = asyncio.run(run(args.only, sizes, args.repeat, Path(tmp), SMOKE_LIMIT_S if args.smoke else LIMIT_S))
    figures = outcome.figures
    host_figures = host.finish(host_at_start)
    body: dict[str, object] = {
        "size": "smoke" if args.smoke else "full",
        "repeat": args.repeat,
        "seconds": time.monotonic() - started,
        "machine": report.machine(),
        "host": host_figures,
        "targets": report.targets(figures),
        "scenarios": figures,
        "errors": outcome.errors,
        "not_run": [s for s in SCENARIOS if s not in figures and s not in outcome.errors],
        "not_implemented": list(NOT_IMPLEMENTED),
        "fresh_stack_per_run": [s for s in args.only if s in FRESH_STACK_PER_RUN],
    }
    stem = time.strftime("bench-%Y%m%d-%H%M%S") + ("-smoke" if args.smoke else "")
    json_path, md_path = report.write(args.out, stem, body)
    print(md_path.read_text())
    _say(f"wrote {json_path} and {md_path}")
    return json_path


def _say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
