"""Per-job overrides of a kind's retry policy, chunk timeout, deadline and partial results.

Stored as JSON on the job row (only what the client set), resolved against the kind's defaults
where they are used, so changing a kind's default changes every job that did not override it.
"""

from __future__ import annotations

import math
from typing import Any

from jobstream.errors import InvalidArgument
from jobstream.kinds import JobKind, RetryPolicy
from jobstream.v1 import jobstream_pb2 as pb

MAX_ATTEMPTS = 100
MAX_BACKOFF_S = 24 * 3600.0
MAX_CHUNK_TIMEOUT_S = 24 * 3600.0
MAX_DEADLINE_S = 30 * 24 * 3600.0

_RETRY_FIELDS = {
    "max_attempts": "max_attempts",
    "initial_backoff_seconds": "backoff_initial_s",
    "max_backoff_seconds": "backoff_max_s",
    "backoff_multiplier": "backoff_multiplier",
}


def options_from_proto(options: pb.JobOptions) -> dict[str, Any]:
    """The overrides the client set, validated; raises InvalidArgument naming the field."""
    found: dict[str, Any] = {}
    retry: dict[str, Any] = {}
    for name in _RETRY_FIELDS:
        value = getattr(options.retry, name)
        if value:
            retry[name] = value
    _check("options.retry.max_attempts", retry.get("max_attempts", 1), 1, MAX_ATTEMPTS)
    _check("options.retry.initial_backoff_seconds", retry.get("initial_backoff_seconds", 0), 0, MAX_BACKOFF_S)
    _check("options.retry.max_backoff_seconds", retry.get("max_backoff_seconds", 0), 0, MAX_BACKOFF_S)
    _check("options.retry.backoff_multiplier", retry.get("backoff_multiplier", 1), 1, 100)
    if retry:
        found["retry"] = retry
    if options.chunk_timeout_seconds:
        _check("options.chunk_timeout_seconds", options.chunk_timeout_seconds, 0.001, MAX_CHUNK_TIMEOUT_S)
        found["chunk_timeout_seconds"] = options.chunk_timeout_seconds
    if options.deadline_seconds:
        _check("options.deadline_seconds", options.deadline_seconds, 0.001, MAX_DEADLINE_S)
        found["deadline_seconds"] = options.deadline_seconds
    if options.allow_partial:
        found["allow_partial"] = True
    return found


def options_to_proto(stored: dict[str, Any]) -> pb.JobOptions:
    return pb.JobOptions(
        retry=pb.RetryPolicy(**stored.get("retry", {})),
        chunk_timeout_seconds=stored.get("chunk_timeout_seconds", 0.0),
        deadline_seconds=stored.get("deadline_seconds", 0.0),
        allow_partial=stored.get("allow_partial", False),
    )


def retry_policy(kind: JobKind, stored: dict[str, Any]) -> RetryPolicy:
    overrides = stored.get("retry", {})
    base = kind.retry
    values = {attr: overrides.get(name, getattr(base, attr)) for name, attr in _RETRY_FIELDS.items()}
    if values["backoff_max_s"] < values["backoff_initial_s"]:
        values["backoff_max_s"] = values["backoff_initial_s"]
    return RetryPolicy(**values)


def chunk_timeout_s(kind: JobKind, stored: dict[str, Any]) -> float | None:
    value = stored.get("chunk_timeout_seconds") or kind.chunk_timeout_s
    return float(value) if value else None


def allows_partial(kind: JobKind, stored: dict[str, Any]) -> bool:
    return kind.allow_partial or bool(stored.get("allow_partial"))


def _check(field: str, value: float, low: float, high: float) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidArgument(f"{field}: must be between {low:g} and {high:g}, got {value:g}", field=field)
