"""The scheduler's metrics. Counters move only after the batch that caused them committed."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

JOBS_FINISHED = Counter("jobstream_jobs_finished_total", "Jobs that reached a terminal state.", ["kind", "state"])
JOB_DURATION = Histogram(
    "jobstream_job_duration_seconds",
    "From a job's start (split) to its terminal state.",
    ["kind"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600, 4 * 3600),
)
CHUNK_RETRIES = Counter("jobstream_chunk_retries_total", "Failed chunk attempts that are run again.", ["kind"])
DEAD_LETTERS = Counter(
    "jobstream_chunk_dead_letters_total",
    "Chunks that failed every attempt and went to the dead letter topic.",
    ["kind"],
)
JOBS_RUNNING = Gauge("jobstream_jobs_running", "Running jobs owned by this scheduler.")
JOBS_STALLED = Gauge("jobstream_jobs_stalled", "Running jobs owned by this scheduler with no event for 5 minutes.")
BATCH_PHASE = Histogram(
    "jobstream_scheduler_batch_phase_seconds",
    "Time one scheduler batch spends in each phase: waiting for messages, the Postgres transaction, "
    "waiting behind earlier batches to be announced (queued), publishing what it decided, committing "
    "offsets. Their sum is what an event waits in the scheduler.",
    ["phase"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
BATCH_MESSAGES = Histogram(
    "jobstream_scheduler_batch_messages",
    "Messages consumed per scheduler batch.",
    buckets=(1, 5, 10, 50, 100, 500, 1000, 2000),
)
PUBLISHED_BATCHES = Histogram(
    "jobstream_scheduler_published_batches",
    "Recorded batches announced together in one send: more than one means batches queued while the "
    "broker acknowledged the ones before.",
    buckets=(1, 2, 4, 8),
)
FENCED_JOBS = Counter(
    "jobstream_scheduler_fenced_jobs_total",
    "Jobs a batch left alone because their partition is not this scheduler's at its epoch (it moved "
    "to another scheduler); non-zero around rebalances, steadily rising means a stale scheduler.",
)
