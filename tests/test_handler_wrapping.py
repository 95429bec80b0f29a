"""The gateway's wrappers reach every handler once, at registration, in their stated order."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from jobstream import errors
from jobstream.v1 import jobstream_pb2 as pb
from jobstream.v1 import jobstream_pb2_grpc as pb_grpc
from services.gateway.interceptors import ErrorMapping, Metrics, add_wrapped
from services.gateway.metrics import GRPC_REQUESTS


class _Refusing(pb_grpc.JobServiceServicer):
    """Raises domain errors only, as the real handlers do, and leaves the codes to the chain."""

    async def GetJob(self, request: pb.GetJobRequest, context: Any) -> pb.Job:
        raise errors.NotFound(f"job {request.job_id} not found")

    async def Watch(self, request: pb.WatchRequest, context: Any) -> AsyncIterator[pb.JobEvent]:
        yield pb.JobEvent(job_id=request.job_id, seq=1)
        raise errors.FailedPrecondition("the job's events are gone")


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server()
    servicer = _Refusing()  # type: ignore[abstract]  # the methods not defined answer UNIMPLEMENTED
    add_wrapped(server, pb_grpc.add_JobServiceServicer_to_server, servicer, [Metrics(), ErrorMapping()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as opened:
            yield opened
    finally:
        await server.stop(grace=None)


def _count(method: str, code: str) -> float:
    return GRPC_REQUESTS.labels(method=method, code=code)._value.get()  # type: ignore[no-any-return]


async def test_a_unary_handlers_domain_error_is_mapped_inside_and_counted_outside(channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.JobServiceStub(channel)
    before = _count("GetJob", "NOT_FOUND")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetJob(pb.GetJobRequest(job_id="j-1"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert raised.value.details() == "job j-1 not found"
    assert _count("GetJob", "NOT_FOUND") == before + 1


async def test_a_streams_domain_error_ends_it_with_its_code_after_what_it_sent(channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.JobServiceStub(channel)
    before = _count("Watch", "FAILED_PRECONDITION")
    call = stub.Watch(pb.WatchRequest(job_id="j-2"))
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for event in call:
            received.append(event.seq)
    assert received == [1]
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _count("Watch", "FAILED_PRECONDITION") == before + 1


async def test_undecodable_request_bytes_are_refused_as_an_invalid_argument(channel: grpc.aio.Channel) -> None:
    raw = channel.unary_unary("/jobstream.v1.JobService/GetJob", None, None)  # bytes out, bytes in
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await raw(b"\xff\xff\xff")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid jobstream.v1.GetJobRequest" in (raised.value.details() or "")


def test_a_registration_that_names_no_handlers_is_refused() -> None:
    def registers_nothing_by_name(servicer: Any, server: Any) -> None:
        server.add_generic_rpc_handlers(())

    with pytest.raises(RuntimeError, match="named no method handlers"):
        add_wrapped(grpc.aio.server(), registers_nothing_by_name, object(), [Metrics()])
