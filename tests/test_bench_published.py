"""bench.published's split of an event's latency where the scheduler published it (pure logic)."""

from __future__ import annotations

import pytest

from bench.published import split_at_publish


def test_each_event_seen_and_published_splits_into_its_two_legs() -> None:
    seen = {("a", 3): (100.000, 100.050), ("b", 7): (200.000, 200.020)}
    published = {("a", 3): 100.030, ("b", 7): 200.005}

    until, since = split_at_publish(seen, published)

    assert until == pytest.approx([0.030, 0.005])
    assert since == pytest.approx([0.020, 0.015])


def test_events_not_published_in_the_window_read_are_left_out() -> None:
    # Published before the topic's end was marked, or after it was read: no timestamp to split at.
    seen = {("a", 1): (10.0, 10.1), ("a", 2): (11.0, 11.1)}
    published = {("a", 2): 11.04, ("z", 9): 5.0}

    until, since = split_at_publish(seen, published)

    assert until == pytest.approx([0.04])
    assert since == pytest.approx([0.06])


def test_the_same_seq_of_another_job_is_another_event() -> None:
    until, since = split_at_publish({("a", 1): (1.0, 2.0)}, {("b", 1): 1.5})

    assert (until, since) == ([], [])
