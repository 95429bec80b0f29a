"""The worker's metrics: what it runs, how long it takes, how full it is."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CHUNK_DURATION = Histogram(
    "jobstream_chunk_duration_seconds",
    "One chunk attempt on a worker, by kind and outcome (succeeded, failed, cancelled, stopped).",
    ["kind", "outcome"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
)
IN_FLIGHT = Gauge("jobstream_worker_chunks_in_flight", "Chunks this worker is running.")
CLAIMED_WAITING = Gauge(
    "jobstream_worker_chunks_claimed_waiting", "Chunks this worker claimed ahead that wait for a free slot."
)
CONCURRENCY = Gauge("jobstream_worker_concurrency", "Chunks this worker can run at once.")
CANCEL_FEED_PARTITIONS_READ = Gauge(
    "jobstream_worker_cancel_feed_partitions_read",
    "Partitions of jobs.control this worker reads for cancels (none while it has no chunk).",
)
REPORTS_RESENT = Counter(
    "jobstream_worker_reports_resent_total",
    "Chunk outcome reports sent again because the scheduler had not recorded them (lost on the way).",
)
