"""The gateway's metrics (names follow the Prometheus conventions; see docs/operations.md)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

JOBS_SUBMITTED = Counter("jobstream_jobs_submitted_total", "Jobs accepted by Submit.", ["kind"])
WATCH_STREAMS = Gauge("jobstream_watch_streams_open", "Watch streams open on this gateway.")
WATCH_PARTITIONS_READ = Gauge(
    "jobstream_watch_partitions_read", "Partitions of jobs.updates this gateway reads for its Watch streams."
)
EVENT_LATENCY = Histogram(
    "jobstream_event_latency_seconds",
    "From the report (or state change) behind an event to this gateway sending it live.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
OUTBOX_BACKLOG = Gauge("jobstream_outbox_backlog", "Outbox messages not yet published to Kafka.")
GRPC_REQUESTS = Counter(
    "jobstream_grpc_requests_total",
    "JobService calls by method and status code (health checks not counted).",
    ["method", "code"],
)
GRPC_LATENCY = Histogram(
    "jobstream_grpc_request_duration_seconds",
    "JobService call duration by method (streams: until the stream ends).",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60, 600),
)
