"""How big each scenario is: the full sizes the requirement names, and a smoke size that only
proves every scenario still runs end to end."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    # 1 + 2: throughput and the transport's own limit.
    jobs: int = 20
    chunks_per_job: int = 500
    worker_counts: tuple[int, ...] = (1, 2, 4)
    # 3: Submit.
    open_loop_rate: int = 500
    open_loop_seconds: float = 10.0
    callers: int = 64
    closed_loop_seconds: float = 10.0
    # 6: Cancel.
    cancel_jobs: int = 12
    cancel_chunks: int = 4
    # 4: event latency; each job runs one chunk that reports four times a second.
    event_rate: int = 1000
    event_seconds: float = 5.0
    # 7: one big job.
    big_chunks: int = 100_000
    # 5: Watch fan-out. Each job's chunk reports every fanout_step_ms (up to half as long again):
    # at 50 streams a job, 3 s makes about 1,300 deliveries a second from the gateway.
    streams: int = 5000
    fanout_jobs: int = 100
    fanout_channels: int = 10
    fanout_seconds: float = 10.0
    fanout_step_ms: int = 3000
    # 8: what a chunk and an event cost (docs/capacity.md).
    capacity_jobs: int = 10
    capacity_chunks_per_job: int = 1000
    capacity_event_jobs: int = 250
    # Every scenario after throughput runs on this worker pool: enough slots for every job of
    # the event and fan-out scenarios to have its chunk running at once. A job's chunk goes to the
    # worker that owns its partition, so the workers' shares of 250 jobs are uneven (about 62 each,
    # some over 70): at 64 slots a worker, the jobs past a full one ran seconds late, at a trickle.
    wide_workers: int = 4
    wide_concurrency: int = 96
    # Postgres backends publish their statistics (pg_stat_database) only after about 10 s idle:
    # rows and transactions are read this long after a load, or most of them are not counted yet.
    stats_flush_s: float = 11.0


FULL = Sizes()
SMOKE = Sizes(
    jobs=2,
    chunks_per_job=50,
    worker_counts=(1, 2),
    open_loop_rate=100,
    open_loop_seconds=1.0,
    callers=8,
    closed_loop_seconds=1.0,
    cancel_jobs=2,
    event_rate=40,
    event_seconds=2.0,
    big_chunks=1000,
    streams=100,
    fanout_jobs=5,
    fanout_channels=2,
    fanout_seconds=2.0,
    fanout_step_ms=500,
    capacity_jobs=2,
    capacity_chunks_per_job=50,
    capacity_event_jobs=10,
    wide_workers=2,
    wide_concurrency=16,
    # The smoke judges no figure, so its row counts need not be complete: three waits of 11 s
    # were a quarter of its time.
    stats_flush_s=0.0,
)
