"""Garbage in, a clear status out: arbitrary requests and raw bytes thrown at the gateway never get
INTERNAL or UNKNOWN, never crash it, and a refused request writes nothing."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import grpc
import psycopg
import pytest
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# Imported here, at collection, rather than lazily by Hypothesis in the middle of a run: pytest
# rewrites the plugin's modules as they are imported, and CPython 3.11 can fail that compile from
# deep inside a running test ("AST constructor recursion depth mismatch", CPython gh-106905).
from hypothesis.internal.conjecture import optimiser, shrinker  # noqa: F401

from jobstream.v1 import jobstream_pb2 as pb
from tests.helpers import count_jobs

if TYPE_CHECKING:
    from tests.helpers import Client

pytestmark = pytest.mark.e2e
Db = psycopg.AsyncConnection[tuple[object, ...]]

# What a well-behaved gateway may answer to anything a client can send.
EXPECTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.NOT_FOUND,
}
FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
METHODS = ["Submit", "GetJob", "Cancel", "ListJobs"]

floats = st.floats(allow_nan=True, allow_infinity=True)
json_values = st.recursive(
    st.none() | st.booleans() | floats | st.integers(-(2**63), 2**63) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
params = st.dictionaries(st.text(max_size=20), json_values, max_size=6)
kinds = st.sampled_from(["demo.sleep", "text.wordcount", ""]) | st.text(max_size=40)
options = st.builds(
    pb.JobOptions,
    retry=st.builds(
        pb.RetryPolicy,
        max_attempts=st.integers(0, 2**32 - 1),
        initial_backoff_seconds=floats,
        max_backoff_seconds=floats,
        backoff_multiplier=floats,
    ),
    chunk_timeout_seconds=floats,
    deadline_seconds=floats,
    allow_partial=st.booleans(),
)
job_ids = st.text(max_size=50) | st.uuids().map(str)


def _struct(values: dict[str, Any]) -> struct_pb2.Struct | None:
    struct = struct_pb2.Struct()
    try:
        struct.update(values)
    except (ValueError, TypeError, OverflowError):
        return None  # not representable as a Struct: nothing a client could send
    return struct


async def _code(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        code: grpc.StatusCode = err.code()
        return code
    return grpc.StatusCode.OK


async def _first_event_code(stream: Any) -> grpc.StatusCode:
    """The status of a Watch once it sends its first event (OK) or ends with an error."""
    try:
        async for _ in stream:
            break
    except grpc.aio.AioRpcError as err:
        code: grpc.StatusCode = err.code()
        return code
    finally:
        stream.cancel()
    return grpc.StatusCode.OK


@FUZZ
@given(kind=kinds, values=params, data=st.binary(max_size=4096), key=st.text(max_size=300), opts=options)
async def test_any_submit_gets_a_clear_status_and_a_refusal_writes_nothing(
    client: Client, db: Db, kind: str, values: dict[str, Any], data: bytes, key: str, opts: pb.JobOptions
) -> None:
    struct = _struct(values)
    if struct is None:
        return
    before = await count_jobs(db)
    request = pb.SubmitRequest(kind=kind, params=struct, input=data, idempotency_key=key, options=opts)
    try:
        response = await client.Submit(request)
    except grpc.aio.AioRpcError as err:
        assert err.code() in EXPECTED - {grpc.StatusCode.OK}, f"{err.code()}: {err.details()}"
        assert err.details(), "a refusal must say why"
        assert await count_jobs(db) == before, f"refused with {err.code()} but a job was written"
        return
    # Accepted: the request was valid. Stop the job at once, so the fuzzing does not load the stack.
    assert all(math.isfinite(v) for v in (opts.chunk_timeout_seconds, opts.deadline_seconds))
    await client.Cancel(pb.CancelRequest(job_id=response.job.id, reason="fuzzed"))


@FUZZ
@given(
    job_id=job_ids,
    reason=st.text(max_size=1200),
    page_size=st.integers(0, 2**32 - 1),
    page_token=st.text(max_size=100),
    state=st.integers(-(2**31), 2**31 - 1),
    after_seq=st.integers(0, 2**64 - 1),
)
async def test_any_read_or_cancel_gets_a_clear_status(
    client: Client, job_id: str, reason: str, page_size: int, page_token: str, state: int, after_seq: int
) -> None:
    calls = {
        "GetJob": client.GetJob(pb.GetJobRequest(job_id=job_id)),
        "Cancel": client.Cancel(pb.CancelRequest(job_id=job_id, reason=reason)),
        "ListJobs": client.ListJobs(pb.ListJobsRequest(page_size=page_size, page_token=page_token, state=state)),  # type: ignore[arg-type]
    }
    for method, call in calls.items():
        assert await _code(call) in EXPECTED, method
    assert await _first_event_code(client.Watch(pb.WatchRequest(job_id=job_id, after_seq=after_seq))) in EXPECTED


@FUZZ
@given(method=st.sampled_from([*METHODS, "Watch"]), data=st.binary(max_size=512))
async def test_raw_bytes_get_a_clear_status(channel: grpc.aio.Channel, method: str, data: bytes) -> None:
    path = f"/jobstream.v1.JobService/{method}"
    if method == "Watch":
        stream = channel.unary_stream(path, request_serializer=bytes, response_deserializer=bytes)(data)
        code = await _first_event_code(stream)
    else:
        code = await _code(channel.unary_unary(path, request_serializer=bytes, response_deserializer=bytes)(data))
    assert code in EXPECTED, f"{method} answered {code}"
