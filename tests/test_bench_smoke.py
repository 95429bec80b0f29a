"""The bench at smoke size, so it cannot rot: every implemented scenario runs end to end and
reports numbers. No figure is judged here; `make bench` reports them against the targets."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest

from bench.__main__ import NOT_IMPLEMENTED, SCENARIOS, main

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(360)
async def test_smoke_bench_reports_every_scenario_with_numbers(tmp_path: Path) -> None:
    json_path = await asyncio.to_thread(main, ["--smoke", "--out", str(tmp_path)])

    report = json.loads(json_path.read_text())
    assert report["errors"] == {}
    assert set(report["scenarios"]) == set(SCENARIOS)
    for name, figures in report["scenarios"].items():
        assert figures, f"{name} reported no figures"
        for figure, value in figures.items():
            assert math.isfinite(value["median"]), f"{name}.{figure} is {value['median']}"
    assert report["not_implemented"] == list(NOT_IMPLEMENTED)
    # The latency scenarios start each run on a fresh stack, and the report says so.
    assert report["fresh_stack_per_run"] == ["submit", "cancel", "events", "fanout"]
    stacks = "Each run of submit, cancel, events, fanout started on a fresh stack"
    assert stacks in json_path.with_suffix(".md").read_text()
    # The events seen are split where the scheduler published them (an event a stream read from
    # Postgres before its publish reached the broker has no timestamp yet, so "at most").
    events = report["scenarios"]["events"]
    for leg in ("until_published", "since_published"):
        assert 0 < events[f"{leg}_samples"]["median"] <= events["event_samples"]["median"]
    # And the events after the scenario's first second, which is its worst, are reported apart.
    assert 0 < events["event_after_first_second_samples"]["median"] < events["event_samples"]["median"]
    # What a call costs in CPU, by process: a Submit on the stack, a call of the bare handler.
    submit = report["scenarios"]["submit"]
    for figure in ("callers_cpu_ms_gateway", "callers_cpu_ms_client", "bare_callers_cpu_ms_server"):
        assert submit[figure]["median"] > 0, figure
    measured = report["host"]
    assert measured["python_loop_ms_before"] > 0 and measured["python_loop_ms_after"] > 0
    assert 0 <= measured["steal_share"] <= 1 and 0 < measured["busy_share"] <= 1
    assert json_path.with_suffix(".md").read_text().startswith("# jobstream bench")
