"""How the CLI shows jobs and events, and how it reads `--param` values.

Pure functions of their arguments, so every format is tested without a server. The plain event
line and the outcome line are an interface: scripts and CI logs grep them, so change them only
by adding fields at the end.
"""

from __future__ import annotations

import datetime as dt
import json
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from jobstream.events import from_struct
from jobstream.v1 import jobstream_pb2 as pb

BAR_MIN, BAR_MAX = 8, 24
ELLIPSIS = "..."
TABLE_HEADER = ("ID", "KIND", "STATE", "PERCENT", "CREATED_AT")


# --- names and small values -------------------------------------------------------------------


def _name(enum: Any, value: int) -> str:
    # A newer server may send a value this client was not generated with: show the number.
    try:
        return str(enum.Name(value))
    except ValueError:
        return str(value)


def state_name(state: int) -> str:
    return _name(pb.JobState, state)


def event_name(event_type: int) -> str:
    return _name(pb.EventType, event_type)


def eta(seconds: float) -> str:
    """`3.1s` under ten seconds, then `42s`, `1m15s`, `2h01m`; `-` when unknown (the server sends 0)."""
    if not seconds > 0:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def compact_json(struct: struct_pb2.Struct) -> str:
    """One line, keys sorted, whole numbers as integers (a Struct stores every number as a double)."""
    return json.dumps(from_struct(struct), ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def quoted(text: str) -> str:
    """A JSON string literal: quotes and line breaks escaped, so a line stays one line and parseable."""
    return json.dumps(text, ensure_ascii=False)


def format_time(ts: timestamp_pb2.Timestamp) -> str:
    """UTC to the second, `2024-05-01T12:03:04Z`; `-` when unset."""
    if not ts.seconds and not ts.nanos:
        return "-"
    return dt.datetime.fromtimestamp(ts.seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- terminal width ---------------------------------------------------------------------------


def char_width(char: str) -> int:
    """Columns a character takes: East Asian wide characters take two, combining marks none."""
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def display_width(text: str) -> int:
    return sum(char_width(c) for c in text)


def single_line(text: str) -> str:
    """Control characters (line breaks, tabs, escapes) as spaces: they would break an in-place redraw."""
    return "".join(" " if unicodedata.category(c).startswith("C") else c for c in text)


def truncate(text: str, width: int) -> str:
    """`text` cut to at most `width` columns, ending in `...` when anything was cut."""
    if width <= 0:
        return ""
    if display_width(text) <= width:
        return text
    if width <= len(ELLIPSIS):
        return ELLIPSIS[:width]
    room = width - len(ELLIPSIS)
    kept: list[str] = []
    for char in text:
        room -= char_width(char)
        if room < 0:
            break
        kept.append(char)
    return "".join(kept) + ELLIPSIS


# --- events -----------------------------------------------------------------------------------


def bar(percent: float, cells: int) -> str:
    """`[#####-----]`; a cell fills only once its whole share is done, so 100% means really done."""
    filled = int(cells * min(max(percent, 0.0), 100.0) / 100.0)
    return "[" + "#" * filled + "-" * (cells - filled) + "]"


def bar_cells(width: int) -> int:
    return max(BAR_MIN, min(BAR_MAX, width // 2 - 6))


def progress_line(event: pb.JobEvent, width: int, message: str = "") -> str:
    """The live line: `[####----]  45.0% 9/20 chunks (1 failed) eta 12s last message`.

    Never wider than `width - 1` columns, because a line that fills the last column wraps on some
    terminals and `\\r` then redraws only its second half. `message` is the latest message seen,
    since most events carry none and the line should not blank what the job said last.
    """
    p = event.progress
    text = f"{bar(p.percent, bar_cells(width))} {p.percent:5.1f}% {p.done_chunks}/{p.total_chunks} chunks"
    if p.failed_chunks:
        text += f" ({p.failed_chunks} failed)"
    if p.eta_seconds > 0:
        text += f" eta {eta(p.eta_seconds)}"
    shown = message or event.message or p.message
    if shown:
        text += f"  {single_line(shown)}"
    return truncate(text, width - 1)


def event_line(event: pb.JobEvent) -> str:
    """`seq=3 JOB_PROGRESS RUNNING 45.0% 9/20 eta 1.2s msg="..."`: one stable, greppable line per event."""
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
        parts.append(f"msg={quoted(event.message)}")
    if event.error:
        parts.append(f"error={quoted(event.error)}")
    return " ".join(parts)


def chunk_failure_line(event: pb.JobEvent) -> str:
    return f"chunk {event.chunk_index} attempt {event.attempt} failed: {single_line(event.error or event.message)}"


def outcome_line(event: pb.JobEvent) -> str:
    """How the job ended: `job ID SUCCEEDED result={...}`, `job ID FAILED error="..."`.

    The result comes last so that a script can take everything after `result=` as JSON.
    """
    parts = [f"job {event.job_id}", state_name(event.state)]
    if event.error:
        parts.append(f"error={quoted(event.error)}")
    elif event.state == pb.CANCELLED and event.message:
        parts.append(f"reason={quoted(event.message)}")
    if event.result.fields:
        parts.append(f"result={compact_json(event.result)}")
    return " ".join(parts)


# --- jobs -------------------------------------------------------------------------------------


def job_json(job: pb.Job) -> str:
    return json_format.MessageToJson(job, indent=2, preserving_proto_field_name=True)


def job_row(job: pb.Job) -> tuple[str, str, str, str, str]:
    return (job.id, job.kind, state_name(job.state), f"{job.progress.percent:.1f}%", format_time(job.created_at))


def job_table(jobs: Sequence[pb.Job]) -> str:
    """Aligned columns in the order given (the server's: newest first); the header even when empty."""
    rows: list[Sequence[str]] = [TABLE_HEADER, *(job_row(job) for job in jobs)]
    widths = [max(display_width(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]
    lines = []
    for row in rows:
        cells = [cell + " " * (w - display_width(cell)) for cell, w in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# --- reading params ---------------------------------------------------------------------------


def _no_constants(name: str) -> Any:
    raise ValueError(name)


def parse_param(text: str) -> tuple[str, Any]:
    """`k=v`: v is read as JSON when it is JSON (numbers, true, null, lists, objects), else as text.

    So `chunks=20` is a number and `name=abc` a string; quote to force text: `name='"20"'`.
    NaN and Infinity stay text: JSON has no such numbers and no job kind accepts them.
    Raises ValueError (naming KEY=VALUE) when there is no `=` or no key.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--param wants KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw, parse_constant=_no_constants)
    except ValueError:
        return key, raw


def merge_params(params_json: str | None, pairs: Iterable[str]) -> dict[str, Any]:
    """`--params-json` first, then each `--param` on top, so a single value can be overridden.

    Raises ValueError saying which option is wrong.
    """
    params: dict[str, Any] = {}
    if params_json:
        try:
            loaded = json.loads(params_json, parse_constant=_no_constants)
        except ValueError as err:
            raise ValueError(f"--params-json is not valid JSON: {err}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"--params-json must be a JSON object, got {type(loaded).__name__}")
        params.update(loaded)
    for pair in pairs:
        key, value = parse_param(pair)
        params[key] = value
    return params
