"""The bench's host figures read /proc/stat correctly: guest time is not counted twice, steal is
what the hypervisor took, and a line that is not the machine-wide one is refused."""

from __future__ import annotations

import pytest

from bench.host import CpuTicks, parse_cpu_line, shares


def test_the_machine_wide_line_splits_into_busy_idle_and_steal() -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice
    ticks = parse_cpu_line("cpu  100 5 40 800 20 3 2 30 50 0\n")
    assert ticks == CpuTicks(busy=100 + 5 + 40 + 3 + 2, idle=800 + 20, steal=30)


@pytest.mark.parametrize("line", ["cpu0 1 2 3 4 5 6 7 8", "intr 1 2 3", "cpu 1 2 3", ""])
def test_anything_else_is_refused(line: str) -> None:
    with pytest.raises(ValueError, match="machine-wide cpu line"):
        parse_cpu_line(line)


def test_shares_are_of_the_time_between_two_readings() -> None:
    before = CpuTicks(busy=1000, idle=5000, steal=100)
    after = CpuTicks(busy=1600, idle=5300, steal=200)
    assert shares(before, after) == {"busy_share": 0.6, "steal_share": 0.1}
    assert shares(after, after) == {"busy_share": 0.0, "steal_share": 0.0}
