"""Tenant quotas on a real gateway: each refusal is RESOURCE_EXHAUSTED with a retry hint, and a
refused Submit writes nothing. Each test restarts the gateway with the quota it exercises."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import psycopg
import pytest

from jobstream.v1 import jobstream_pb2 as pb
from jobstream.v1 import jobstream_pb2_grpc as pb_grpc
from tests.conftest import running_stack
from tests.helpers import count_jobs, new_tenant, params, read_rest, wait_for, watch_all, watch_until
from tests.stack import Stack

if TYPE_CHECKING:
    from tests.helpers import Client

pytestmark = pytest.mark.e2e
Db = psycopg.AsyncConnection[tuple[Any, ...]]
NO_QUOTAS = {
    "JOBSTREAM_TENANT_SUBMIT_RATE": "0",
    "JOBSTREAM_TENANT_MAX_UNFINISHED_JOBS": "0",
    "JOBSTREAM_TENANT_MAX_WATCH_STREAMS": "0",
}


@pytest.fixture(scope="module")
async def own(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with running_stack(tmp_path_factory.mktemp("quotas"), workers=1) as stack:
        yield stack


async def _gateway_with(stack: Stack, **quotas: str) -> None:
    stack.services["gateway"].terminate()
    stack.start_service("gateway", "services.gateway", **{**NO_QUOTAS, **quotas})
    await stack.wait_gateway()


def _hanging() -> pb.SubmitRequest:
    return pb.SubmitRequest(kind="demo.sleep", params=params(chunks=1, hang_chunk=0))


async def _refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
    return refused.value


def _retry_after(err: grpc.aio.AioRpcError) -> float:
    metadata: Any = err.trailing_metadata() or ()  # (key, value) pairs, whatever the stubs say
    hints = [value for key, value in metadata if key == "retry-after-seconds"]
    assert len(hints) == 1, f"no retry hint in {err.trailing_metadata()}"
    return float(hints[0])


async def test_submits_over_the_rate_are_refused_with_a_retry_hint(own: Stack, own_client: Client, own_db: Db) -> None:
    await _gateway_with(own, JOBSTREAM_TENANT_SUBMIT_RATE="0.2", JOBSTREAM_TENANT_SUBMIT_BURST="3")
    quick = pb.SubmitRequest(kind="demo.sleep", params=params(chunks=1, ms=0))
    for _ in range(3):
        await own_client.Submit(quick)
    before = await count_jobs(own_db)

    err = await _refused(own_client.Submit(quick))

    assert "submit rate" in (err.details() or "")
    assert 0 < _retry_after(err) <= 5
    assert await count_jobs(own_db) == before
    # Another tenant has a bucket of its own: it submits at once, and its job runs.
    async with _other_tenant(own, own_db) as other:
        job = (await other.Submit(quick)).job
        assert (await watch_all(other, job.id))[-1].type == pb.JOB_SUCCEEDED


async def test_a_tenant_at_its_unfinished_jobs_quota_is_refused_until_one_ends(
    own: Stack, own_client: Client, own_db: Db
) -> None:
    await _gateway_with(own, JOBSTREAM_TENANT_MAX_UNFINISHED_JOBS="2")
    await _cancel_unfinished(own_client)
    first = (await own_client.Submit(_hanging())).job
    await own_client.Submit(_hanging())
    before = await count_jobs(own_db)

    err = await _refused(own_client.Submit(_hanging()))

    assert "2 jobs are queued or running" in (err.details() or "") and _retry_after(err) > 0
    assert await count_jobs(own_db) == before
    async with _other_tenant(own, own_db) as other:
        job = (await other.Submit(_hanging())).job
        await other.Cancel(pb.CancelRequest(job_id=job.id))
    await own_client.Cancel(pb.CancelRequest(job_id=first.id))
    assert (await watch_all(own_client, first.id))[-1].type == pb.JOB_CANCELLED
    await own_client.Submit(_hanging())
    await _cancel_unfinished(own_client)


async def test_a_burst_of_concurrent_submits_admits_exactly_the_quota(
    own: Stack, own_client: Client, own_db: Db
) -> None:
    await _gateway_with(own, JOBSTREAM_TENANT_MAX_UNFINISHED_JOBS="5")
    await _cancel_unfinished(own_client)
    before = await count_jobs(own_db)

    outcomes = await asyncio.gather(*(own_client.Submit(_hanging()) for _ in range(20)), return_exceptions=True)

    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(refused) == 15 and all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused), outcomes
    assert await count_jobs(own_db) == before + 5
    await _cancel_unfinished(own_client)


async def test_watch_streams_over_the_quota_are_refused_until_one_closes(
    own: Stack, own_client: Client, own_db: Db
) -> None:
    await _gateway_with(own, JOBSTREAM_TENANT_MAX_WATCH_STREAMS="1")
    job = (await own_client.Submit(_hanging())).job
    open_stream, _ = await watch_until(own_client, job.id, lambda e: e.type == pb.JOB_QUEUED)

    second = own_client.Watch(pb.WatchRequest(job_id=job.id))
    err = await _refused(_first(second))

    assert "1 Watch streams are open" in (err.details() or "") and _retry_after(err) > 0
    async with _other_tenant(own, own_db) as other:
        theirs = (await other.Submit(_hanging())).job
        their_stream, _ = await watch_until(other, theirs.id, lambda e: e.type == pb.JOB_QUEUED)
        await other.Cancel(pb.CancelRequest(job_id=theirs.id))
        assert (await read_rest(their_stream, theirs.id))[-1].type == pb.JOB_CANCELLED
    await own_client.Cancel(pb.CancelRequest(job_id=job.id))
    assert (await read_rest(open_stream, job.id))[-1].type == pb.JOB_CANCELLED
    # The ended stream gave its place back: a new one reads the job to its end.
    assert (await watch_all(own_client, job.id))[-1].type == pb.JOB_CANCELLED


@contextlib.asynccontextmanager
async def _other_tenant(stack: Stack, db: Db) -> AsyncIterator[Client]:
    """A client of a tenant of its own, to show one tenant's quota does not hold back another."""
    _, token = await new_tenant(db, "other")
    async with stack.channel(token) as channel:
        yield pb_grpc.JobServiceStub(channel)


async def _first(stream: Any) -> None:
    async for _ in stream:
        return


async def _cancel_unfinished(own_client: Client) -> None:
    """Cancels every queued or running job and waits until they have ended."""

    async def unfinished() -> list[str]:
        listed = [
            await own_client.ListJobs(pb.ListJobsRequest(state=s, page_size=1000)) for s in (pb.QUEUED, pb.RUNNING)
        ]
        return [job.id for page in listed for job in page.jobs]

    for job_id in await unfinished():
        await own_client.Cancel(pb.CancelRequest(job_id=job_id))

    async def none_left() -> bool:
        return not await unfinished()

    await wait_for(none_left, what="cancelled jobs to end")
