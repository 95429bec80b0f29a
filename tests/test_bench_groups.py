"""Which bench scenarios share a stack: each gets its own, except transport, which must run on
the broker that carried throughput (its ratio is read against that broker)."""

from __future__ import annotations

from bench.__main__ import SCENARIOS, stack_groups


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
