"""Progress and ETA: pure logic, no servers."""

from __future__ import annotations

from jobstream.progress import ProgressTracker


def test_percent_counts_finished_and_partial_chunks() -> None:
    tracker = ProgressTracker(total=4, started_at=0.0)
    tracker.done = 1
    tracker.chunk_progress(1, 0.5)

    assert tracker.percent() == 37.5


def test_percent_never_goes_down_when_a_chunk_starts_again() -> None:
    tracker = ProgressTracker(total=2, started_at=0.0)
    tracker.chunk_progress(0, 0.8)
    high = tracker.percent()
    tracker.chunk_finished(0)  # the attempt failed; its partial progress is gone

    assert tracker.percent() == high


def test_eta_from_average_rate() -> None:
    tracker = ProgressTracker(total=10, done=5, started_at=100.0)

    assert tracker.eta_seconds(now=110.0) == 10.0
    assert ProgressTracker(total=10, started_at=None).eta_seconds(now=5.0) == 0.0


def test_to_proto_carries_counts() -> None:
    tracker = ProgressTracker(total=3, done=2, failed=1, message="almost", started_at=0.0)
    progress = tracker.to_proto(now=1.0)

    assert (progress.total_chunks, progress.done_chunks, progress.failed_chunks) == (3, 2, 1)
    assert progress.percent == 100.0 and progress.message == "almost" and progress.eta_seconds == 0.0
