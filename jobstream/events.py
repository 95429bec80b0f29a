"""Building and encoding job events and the JSON <-> protobuf Struct conversions around them."""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from jobstream.states import TERMINAL_EVENT_TYPES
from jobstream.v1 import jobstream_pb2 as pb


def to_struct(value: dict[str, Any] | None) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    if value:
        struct.update(value)
    return struct


def from_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    """Struct numbers are doubles; whole numbers come back as int so params read naturally."""
    return _ints(json_format.MessageToDict(struct))  # type: ignore[no-any-return]


def _ints(value: Any) -> Any:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


def timestamp(when: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if when is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(when)
    return ts


def now_timestamp() -> timestamp_pb2.Timestamp:
    # Five times cheaper than Timestamp.GetCurrentTime(), and every report and event takes one.
    ns = time.time_ns()
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def dumps(value: Any) -> str:
    """Canonical JSON: stable key order, so equal values hash and compare equal."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def is_terminal(event: pb.JobEvent) -> bool:
    return event.type in TERMINAL_EVENT_TYPES
