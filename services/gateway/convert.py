"""Job rows from Postgres to the public Job message."""

from __future__ import annotations

import time
from typing import Any

from jobstream.events import timestamp, to_struct
from jobstream.job_options import options_to_proto
from jobstream.progress import ProgressTracker
from jobstream.v1 import jobstream_pb2 as pb


def job_to_proto(row: dict[str, Any]) -> pb.Job:
    tracker = ProgressTracker(
        total=row["total_chunks"],
        done=row["done_chunks"],
        failed=row["failed_chunks"],
        message=row["progress_message"],
        started_at=row["started_at"].timestamp() if row["started_at"] else None,
    )
    progress = tracker.to_proto(time.time())
    if row["finished_at"] is not None:
        progress.eta_seconds = 0.0
    job = pb.Job(
        id=str(row["id"]),
        kind=row["kind"],
        state=row["state"],
        progress=progress,
        error=row["error"],
        last_seq=row["last_seq"],
        params=to_struct(row["params"]),
        cancel_requested=row["cancel_requested_at"] is not None,
        options=options_to_proto(row["options"]),
    )
    if row["result"] is not None:
        job.result.CopyFrom(to_struct(row["result"]))
    for field, column in (
        ("created_at", "created_at"),
        ("started_at", "started_at"),
        ("finished_at", "finished_at"),
        ("deadline", "deadline_at"),
    ):
        ts = timestamp(row[column])
        if ts is not None:
            getattr(job, field).CopyFrom(ts)
    return job
