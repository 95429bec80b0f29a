"""Job progress and ETA from chunk counts: pure, so the scheduler computes it in O(1) per update."""

from __future__ import annotations

from dataclasses import dataclass, field

from jobstream.v1 import jobstream_pb2 as pb


@dataclass
class ProgressTracker:
    """Tracks one job's progress between events.

    `partial` holds the reported fraction of chunks that are running, so a job of few long chunks
    still moves. Percent never goes down, even when a chunk fails and starts again: a progress bar
    that jumps back reads as a bug to the person watching it.
    """

    total: int
    done: int = 0
    failed: int = 0
    message: str = ""
    started_at: float | None = None
    partial: dict[int, float] = field(default_factory=dict)
    _percent: float = 0.0

    def chunk_progress(self, index: int, fraction: float) -> None:
        self.partial[index] = min(max(fraction, 0.0), 1.0)

    def chunk_finished(self, index: int) -> None:
        self.partial.pop(index, None)

    def percent(self) -> float:
        if self.total == 0:
            return 100.0 if self.started_at is not None else 0.0
        finished = self.done + self.failed
        in_flight = sum(self.partial.values())
        value = min(100.0, 100.0 * (finished + in_flight) / self.total)
        self._percent = max(self._percent, value)
        return self._percent

    def eta_seconds(self, now: float) -> float:
        """Remaining time at the average rate so far; 0 when unknown or finished."""
        if self.started_at is None or self.total == 0:
            return 0.0
        elapsed = now - self.started_at
        fraction = self.percent() / 100.0
        if fraction <= 0.0 or fraction >= 1.0 or elapsed <= 0:
            return 0.0
        return elapsed * (1.0 - fraction) / fraction

    def to_proto(self, now: float) -> pb.Progress:
        return pb.Progress(
            total_chunks=self.total,
            done_chunks=self.done,
            failed_chunks=self.failed,
            percent=round(self.percent(), 3),
            message=self.message,
            eta_seconds=round(self.eta_seconds(now), 3),
        )
