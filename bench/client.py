"""What the scenarios share as clients of the public API: channels, Submit, Watch to the end."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import struct_pb2

from jobstream.events import is_terminal
from jobstream.gateway_channel import gateway_channel
from jobstream.v1 import jobstream_pb2 as pb
from jobstream.v1 import jobstream_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from jobstream.v1.jobstream_pb2_grpc import JobServiceAsyncStub as Stub
else:
    Stub = pb_grpc.JobServiceStub

__all__ = ["OWN_CONNECTION", "Stub", "channel", "event_age", "event_time", "params", "stub", "submit", "watch_to_end"]

# Each channel gets its own TCP connection (gRPC otherwise shares one between equal channels), so
# "several client connections" means what it says.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def channel(addr: str, token: str = "") -> grpc.aio.Channel:
    """A channel on a connection of its own; with `token`, every call carries that API key."""
    return gateway_channel(addr, token=token, options=OWN_CONNECTION)


def stub(ch: grpc.aio.Channel) -> Stub:
    return pb_grpc.JobServiceStub(ch)


def params(**values: Any) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


async def submit(stub: Stub, kind: str = "demo.sleep", **values: Any) -> str:
    response = await stub.Submit(pb.SubmitRequest(kind=kind, params=params(**values)))
    return str(response.job.id)


def event_time(event: pb.JobEvent) -> float:
    """The event's wall time in seconds: the worker's report for progress, else the scheduler's."""
    return event.time.seconds + event.time.nanos / 1e9


def event_age(event: pb.JobEvent, now: float) -> float:
    """Seconds since the event's time."""
    return now - event_time(event)


async def watch_to_end(stub: Stub, job_id: str, seen: Callable[[pb.JobEvent, float], None] | None = None) -> float:
    """Reads the job's stream up to its terminal event; returns the wall time that event arrived.

    `seen` gets every event with its arrival wall time. Raises RuntimeError when the stream ends
    without a terminal event.
    """
    async for event in stub.Watch(pb.WatchRequest(job_id=job_id)):
        now = time.time()
        if seen is not None:
            seen(event, now)
        if is_terminal(event):
            return now
    raise RuntimeError(f"job {job_id}: the stream ended before the terminal event")
