"""The bench's CPU accounting: per-unit costs by process, replicas added up."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench import cpu


def test_replicas_of_a_service_add_up_and_every_process_is_divided_by_the_units() -> None:
    before = {"worker-1": 1.0, "worker-2": 2.0, "gateway": 0.5, "client": 3.0}
    after = {"worker-1": 1.2, "worker-2": 2.3, "gateway": 0.9, "client": 3.1}
    cost = cpu.per_unit("callers_cpu_ms", before, after, 100)
    assert cost == pytest.approx(
        {"callers_cpu_ms_worker": 5.0, "callers_cpu_ms_gateway": 4.0, "callers_cpu_ms_client": 1.0}
    )


def test_a_process_not_running_when_the_phase_began_is_left_out() -> None:
    assert cpu.per_unit("x", {}, {"idlegateway": 0.4}, 10) == {"x_idlegateway": 0.0}


def test_a_process_that_is_gone_has_spent_nothing() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert cpu.seconds(child.pid) == 0
    assert cpu.seconds(os.getpid()) > 0
