"""The per-job progress pace: jitter passes, a faster reporter is held to the interval on average."""

from __future__ import annotations

import uuid

import pytest

from services.scheduler.pacing import ProgressPacer

JOB = uuid.uuid4()


def test_reports_slower_than_the_interval_are_never_held_even_with_jitter() -> None:
    pacer = ProgressPacer(0.2)
    pacer.started(JOB, 0.0)
    # Every 250 ms on average, but batches land up to 90 ms early or late.
    times = [0.25 * i + (0.09 if i % 2 else -0.09) for i in range(1, 200)]
    assert [pacer.spend(JOB, t) for t in times] == [0.0] * len(times)


def test_a_fast_reporter_gets_one_event_per_interval_plus_the_burst() -> None:
    pacer = ProgressPacer(0.2, burst=2)
    sent, now, due = 0, 0.0, 0.0
    while now < 10.0:  # a report every 10 ms for 10 s; a held event goes out when it is due
        if now >= due:
            wait = pacer.spend(JOB, now)
            if wait == 0.0:
                sent += 1
            else:
                due = now + wait
        now += 0.01
    assert 10.0 / 0.2 <= sent <= 10.0 / 0.2 + 2


def test_a_held_event_is_allowed_when_the_wait_it_was_given_has_passed() -> None:
    pacer = ProgressPacer(0.2, burst=1)
    assert pacer.spend(JOB, 0.0) == 0.0
    wait = pacer.spend(JOB, 0.05)
    assert wait == pytest.approx(0.15)
    assert pacer.spend(JOB, 0.05 + wait) == 0.0


def test_the_start_event_counts_against_the_burst() -> None:
    pacer = ProgressPacer(0.2, burst=2)
    pacer.started(JOB, 0.0)
    assert pacer.spend(JOB, 0.0) == 0.0
    assert pacer.spend(JOB, 0.0) == pytest.approx(0.2)


def test_forgotten_jobs_start_again_with_a_full_bucket() -> None:
    pacer = ProgressPacer(0.2, burst=2)
    pacer.spend(JOB, 0.0)
    pacer.spend(JOB, 0.0)
    pacer.forget(JOB)
    assert pacer.spend(JOB, 0.0) == 0.0
