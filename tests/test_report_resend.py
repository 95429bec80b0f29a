"""Which finished chunks a heartbeat sends the report of again (services.worker.worker)."""

from __future__ import annotations

from services.worker.worker import Reported, reports_to_resend

NOW = 100.0


def _reported(resend_at: float) -> Reported:
    return Reported(at=0.0, lease_until=0.0, report=b"", resend_at=resend_at, resend_every=20.0)


def test_a_finished_chunk_still_held_past_its_resend_time_is_resent() -> None:
    key = ("job", 0)
    assert reports_to_resend([key], {key}, {}, {key: _reported(NOW)}, NOW) == [key]


def test_a_chunk_recorded_meanwhile_or_not_yet_due_is_not_resent() -> None:
    recorded, early = ("job", 0), ("job", 1)
    reported = {recorded: _reported(NOW - 1), early: _reported(NOW + 1)}
    assert reports_to_resend([recorded, early], {early}, {}, reported, NOW) == []


def test_a_chunk_running_again_here_is_not_resent() -> None:
    # The same worker claimed the chunk's next attempt: its old report says nothing now.
    key = ("job", 0)
    assert reports_to_resend([key], {key}, {key: object()}, {key: _reported(NOW - 1)}, NOW) == []


def test_a_chunk_that_ended_unreported_during_the_beat_is_skipped() -> None:
    # It was running when the beat began and ended without a report (abandoned, or its report
    # never went out): there is nothing to send, and the beat must not fail on it.
    key = ("job", 0)
    assert reports_to_resend([key], {key}, {}, {}, NOW) == []
