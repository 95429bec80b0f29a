"""Which bench scenarios share a stack: each gets its own, except transport, which must run on
the broker that carried throughput (its ratio is read against that broker); and which start a
fresh stack for every run: those that measure latency."""

from __future__ import annotations

from bench.__main__ import SCENARIOS, stack_groups, stack_runs


def test_every_scenario_gets_a_stack_of_its_own_but_transport_follows_throughput() -> None:
    assert stack_groups(list(SCENARIOS)) == [
        ["throughput", "transport"],
        ["submit"],
        ["cancel"],
        ["events"],
        ["bigjob"],
        ["capacity"],
        ["fanout"],
    ]


def test_transport_alone_or_apart_from_throughput_gets_its_own_stack() -> None:
    assert stack_groups(["transport"]) == [["transport"]]
    assert stack_groups(["throughput", "submit", "transport"]) == [["throughput"], ["submit"], ["transport"]]


def test_latency_scenarios_start_a_fresh_stack_for_every_run() -> None:
    for name in ("submit", "cancel", "events", "fanout"):
        assert stack_runs([name], 3) == [1, 1, 1], name


def test_the_others_run_all_their_runs_on_one_stack() -> None:
    assert stack_runs(["throughput", "transport"], 3) == [3]
    for name in ("bigjob", "capacity"):
        assert stack_runs([name], 3) == [3], name
    assert stack_runs(["events"], 1) == [1]
