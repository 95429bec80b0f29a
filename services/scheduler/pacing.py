"""How often a job may emit a progress event: a token bucket per job.

A fixed "one event per interval" rule holds back any report that arrives a little early, and on a
busy scheduler whose batches land with jitter that is most of them: a job reporting four times a
second against a 200 ms interval saw half its events wait up to 200 ms. A bucket refills one event
per interval and holds a small burst, so jitter is absorbed and only a job reporting faster than the
interval on average is held back. Events per job stay bounded by duration / interval + burst.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

BURST = 2.0


@dataclass
class _Bucket:
    tokens: float
    at: float


class ProgressPacer:
    def __init__(self, interval_s: float, burst: float = BURST) -> None:
        self._interval = interval_s
        self._burst = burst
        self._buckets: dict[uuid.UUID, _Bucket] = {}

    def spend(self, job_id: uuid.UUID, now: float) -> float:
        """Takes one event from the job's bucket: returns 0 when it may go out now, otherwise how many
        seconds until it may (nothing is taken then)."""
        bucket = self._refilled(job_id, now)
        if bucket.tokens >= 1.0 - 1e-9:  # a timer due exactly at the refill may land a hair early
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) * self._interval

    def started(self, job_id: uuid.UUID, now: float) -> None:
        """The start event counts against the burst, as if it were the first progress event."""
        self._buckets[job_id] = _Bucket(self._burst - 1.0, now)

    def forget(self, job_id: uuid.UUID) -> None:
        self._buckets.pop(job_id, None)

    def _refilled(self, job_id: uuid.UUID, now: float) -> _Bucket:
        bucket = self._buckets.get(job_id)
        if bucket is None:
            bucket = self._buckets[job_id] = _Bucket(self._burst, now)
        elif self._interval > 0:
            bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.at) / self._interval)
        else:
            bucket.tokens = self._burst
        bucket.at = now
        return bucket
