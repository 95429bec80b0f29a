"""How the CLI shows jobs and events: pure functions, so the output is tested without servers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format

from jobstream.events import from_struct
from jobstream.v1 import jobstream_pb2 as pb

BAR_WIDTH = 24


def state_name(state: int) -> str:
    return pb.JobState.Name(state)  # type: ignore[arg-type]


def event_name(type_: int) -> str:
    return pb.EventType.Name(type_)  # type: ignore[arg-type]


def eta(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def event_line(event: pb.JobEvent) -> str:
    """One stable, greppable line per event."""
    p = event.progress
    parts = [
        f"seq={event.seq}",
        event_name(event.type),
        state_name(event.state),
        f"{p.percent:.1f}%",
        f"{p.done_chunks}/{p.total_chunks}",
    ]
    if p.failed_chunks:
        parts.append(f"failed={p.failed_chunks}")
    if p.eta_seconds > 0:
        parts.append(f"eta {eta(p.eta_seconds)}")
    if event.type in (pb.CHUNK_FAILED, pb.CHUNK_RETRYING):
        parts.append(f"chunk={event.chunk_index} attempt={event.attempt}")
    if event.message:
        parts.append(f"msg={json.dumps(event.message, ensure_ascii=False)}")
    if event.error:
        parts.append(f"error={json.dumps(event.error, ensure_ascii=False)}")
    return " ".join(parts)


def progress_line(event: pb.JobEvent, width: int) -> str:
    """The live bar a terminal shows, cut to the terminal's width."""
    p = event.progress
    filled = min(BAR_WIDTH, int(BAR_WIDTH * p.percent / 100))
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    text = f"[{bar}] {p.percent:5.1f}% {p.done_chunks}/{p.total_chunks} chunks"
    if p.failed_chunks:
        text += f" ({p.failed_chunks} failed)"
    text += f" eta {eta(p.eta_seconds)} {state_name(event.state)}"
    message = event.error or event.message
    if message:
        text += f" {message}"
    return text[: max(10, width - 1)]


def outcome_line(event: pb.JobEvent) -> str:
    line = f"job {event.job_id} {state_name(event.state)}"
    if event.state == pb.SUCCEEDED and event.result.fields:
        line += " result=" + json.dumps(from_struct(event.result), ensure_ascii=False, separators=(",", ":"))
    if event.error:
        line += f" error={event.error}"
    return line


def job_json(job: pb.Job) -> str:
    return json_format.MessageToJson(job, indent=2)


def job_table(jobs: Sequence[pb.Job]) -> str:
    rows = [("ID", "KIND", "STATE", "PERCENT", "CREATED")]
    for job in jobs:
        created = job.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if job.created_at.seconds else "-"
        rows.append((job.id, job.kind, state_name(job.state), f"{job.progress.percent:.1f}%", created))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def parse_param(text: str) -> tuple[str, Any]:
    """`k=v`: v is read as JSON when it is JSON (numbers, true, lists), else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--param wants KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw
