"""Several gateways, schedulers and workers at once: each job owned by one scheduler at a time,
jobs go on when a scheduler dies or stalls, and Watch works through any gateway."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import psycopg
import pytest

from jobstream.states import ChunkState
from jobstream.v1 import jobstream_pb2 as pb
from jobstream.v1 import jobstream_pb2_grpc as pb_grpc
from tests.conftest import db_of, running_stack
from tests.helpers import assert_contiguous, params, read_rest, wait_for, watch_all, watch_until
from tests.stack import Stack

if TYPE_CHECKING:
    from tests.helpers import Client

pytestmark = pytest.mark.e2e

Db = psycopg.AsyncConnection[tuple[Any, ...]]
JOBS = 40
CHUNKS = 12
CHUNK_MS = 250


@pytest.fixture(scope="module")
async def own(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with running_stack(
        tmp_path_factory.mktemp("scale"),
        workers=4,
        gateways=2,
        schedulers=2,
        JOBSTREAM_LEASE_SECONDS="3",
        JOBSTREAM_HEARTBEAT_SECONDS="0.5",
    ) as stack:
        yield stack


@pytest.fixture
async def db(own: Stack) -> AsyncIterator[Db]:
    async with db_of(own) as conn:
        yield conn


class Gateways:
    """One client per gateway."""

    def __init__(self, stack: Stack) -> None:
        self._channels = [stack.channel(gateway=i) for i in range(len(stack.gateway_addrs))]
        self.clients: list[Client] = [pb_grpc.JobServiceStub(ch) for ch in self._channels]

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close(None)


@pytest.fixture
async def gateways(own: Stack) -> AsyncIterator[Gateways]:
    found = Gateways(own)
    try:
        yield found
    finally:
        await found.close()


async def _submit_round_robin(gateways: Gateways, jobs: int) -> list[str]:
    ids = []
    for i in range(jobs):
        request = pb.SubmitRequest(kind="demo.sleep", params=params(chunks=CHUNKS, ms=CHUNK_MS))
        ids.append((await gateways.clients[i % 2].Submit(request)).job.id)
    return ids


def _watch_through_the_other_gateway(gateways: Gateways, ids: list[str]) -> list[asyncio.Task[list[pb.JobEvent]]]:
    return [
        asyncio.create_task(watch_all(gateways.clients[(i + 1) % 2], job_id, within=180))
        for i, job_id in enumerate(ids)
    ]


async def _has_running(db: Db, ids: list[str]) -> bool:
    cur = await db.execute(
        "SELECT EXISTS (SELECT 1 FROM chunks WHERE job_id = ANY(%s::uuid[]) AND state = %s)", (ids, ChunkState.RUNNING)
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def _assert_each_job_counted_once(db: Db, ids: list[str], streams: list[list[pb.JobEvent]]) -> None:
    for job_id, events in zip(ids, streams, strict=True):
        assert_contiguous(events)
        last = events[-1]
        assert last.type == pb.JOB_SUCCEEDED, f"job {job_id} ended {pb.EventType.Name(last.type)}: {last.error}"
        assert dict(last.result) == {"chunks": CHUNKS}
        assert last.progress.done_chunks == CHUNKS
    cur = await db.execute(
        "SELECT j.id::text, j.done_chunks, j.last_seq,"
        " (SELECT count(*) FROM chunks c WHERE c.job_id = j.id AND c.state = %s),"
        " (SELECT count(*) FROM job_events e WHERE e.job_id = j.id),"
        " (SELECT count(DISTINCT seq) FROM job_events e WHERE e.job_id = j.id),"
        " (SELECT max(seq) FROM job_events e WHERE e.job_id = j.id)"
        " FROM jobs j WHERE j.id = ANY(%s::uuid[])",
        (ChunkState.SUCCEEDED, ids),
    )
    rows = await cur.fetchall()
    assert len(rows) == len(ids)
    for job_id, done, last_seq, succeeded, events, distinct, top in rows:
        assert done == succeeded == CHUNKS, f"job {job_id}: done_chunks {done}, succeeded chunk rows {succeeded}"
        assert events == distinct == top == last_seq, f"job {job_id}: {events} events, seqs up to {top}"


async def test_jobs_go_on_through_a_scheduler_killed_and_another_started(
    own: Stack, gateways: Gateways, db: Db
) -> None:
    ids = await _submit_round_robin(gateways, JOBS)
    streams = _watch_through_the_other_gateway(gateways, ids)

    await wait_for(lambda: _has_running(db, ids), within=60, what="chunks running")
    own.services["scheduler"].kill()
    own.start_service("scheduler-3", "services.scheduler")

    results = await asyncio.gather(*streams)
    await _assert_each_job_counted_once(db, ids, results)


async def _owners(db: Db) -> set[str]:
    cur = await db.execute("SELECT owner FROM partition_owners")
    return {row[0] for row in await cur.fetchall()}


async def test_a_stale_scheduler_resumed_after_its_partitions_moved_writes_nothing_that_lands(
    own: Stack, gateways: Gateways, db: Db
) -> None:
    schedulers = [name for name, proc in own.services.items() if name.startswith("scheduler") and proc.alive]
    assert len(schedulers) == 2, schedulers
    stale, survivor = (own.services[name] for name in schedulers)
    assert stale.pid is not None and survivor.pid is not None

    async def both_own_partitions() -> bool:
        # The group has settled with these two (a scheduler killed earlier has left it): pausing
        # a member in the middle of a rebalance is another test.
        return {owner.rsplit("/", 1)[-1] for owner in await _owners(db)} == {str(stale.pid), str(survivor.pid)}

    await wait_for(both_own_partitions, within=90, what="both schedulers to own partitions")
    ids = await _submit_round_robin(gateways, JOBS // 2)
    streams = _watch_through_the_other_gateway(gateways, ids)
    await wait_for(lambda: _has_running(db, ids), within=60, what="chunks running")

    os.kill(stale.pid, signal.SIGSTOP)
    try:

        async def survivor_owns_every_partition() -> bool:
            return {owner.rsplit("/", 1)[-1] for owner in await _owners(db)} == {str(survivor.pid)}

        await wait_for(survivor_owns_every_partition, within=90, what="the partitions to move to the survivor")
    finally:
        os.kill(stale.pid, signal.SIGCONT)

    results = await asyncio.gather(*streams)
    await _assert_each_job_counted_once(db, ids, results)
    assert stale.alive


async def test_a_worker_added_during_a_job_runs_chunks_of_it(own: Stack, gateways: Gateways, db: Db) -> None:
    # About 25 s of work on the module's 32 slots: joining a group takes the embedded broker 5 to 9 s
    # (it waits for every member to rejoin), and the added worker must find chunks still waiting.
    request = pb.SubmitRequest(kind="demo.sleep", params=params(chunks=800, ms=1000))
    job = (await gateways.clients[0].Submit(request)).job
    stream, events = await watch_until(gateways.clients[1], job.id, lambda e: e.progress.done_chunks >= 1)

    own.start_worker("worker-added")
    events += await read_rest(stream, job.id, within=120)

    assert_contiguous(events)
    assert events[-1].type == pb.JOB_SUCCEEDED
    cur = await db.execute(
        "SELECT count(*) FROM chunks WHERE job_id = %s AND worker_id = 'worker-added' AND state = %s",
        (job.id, ChunkState.SUCCEEDED),
    )
    row = await cur.fetchone()
    assert row is not None and row[0] > 0, "the added worker ran no chunk of the running job"


async def test_a_gateway_dying_leaves_streams_on_the_other_alone_and_its_clients_resume_there(
    own: Stack, gateways: Gateways
) -> None:
    job = (await gateways.clients[0].Submit(pb.SubmitRequest(kind="demo.sleep", params=params(chunks=60, ms=150)))).job
    on_dying, seen_there = await watch_until(gateways.clients[0], job.id, lambda e: e.progress.done_chunks >= 5)
    on_other, seen_other = await watch_until(gateways.clients[1], job.id, lambda e: e.progress.done_chunks >= 5)

    own.services["gateway"].kill()
    try:
        with pytest.raises(grpc.aio.AioRpcError):
            seen_there += await read_rest(on_dying, job.id)
        resumed = await watch_all(gateways.clients[1], job.id, after_seq=seen_there[-1].seq, within=120)
        seen_other += await read_rest(on_other, job.id, within=120)
    finally:
        own.start_service("gateway", "services.gateway", JOBSTREAM_GATEWAY_LISTEN=own.gateway_addrs[0])
        await own.wait_gateway(own.gateway_addrs[0])

    assert_contiguous(seen_other)
    assert_contiguous(seen_there + resumed)
    assert [e.seq for e in seen_there + resumed] == [e.seq for e in seen_other]
    assert seen_other[-1].type == pb.JOB_SUCCEEDED


async def test_cancel_through_the_other_gateway_stops_the_job(gateways: Gateways) -> None:
    a, b = gateways.clients
    job = (await a.Submit(pb.SubmitRequest(kind="demo.sleep", params=params(chunks=200, ms=200)))).job
    stream, events = await watch_until(a, job.id, lambda e: e.type == pb.JOB_STARTED)

    cancelled = await b.Cancel(pb.CancelRequest(job_id=job.id, reason="from the other gateway"))
    events += await read_rest(stream, job.id)

    assert cancelled.job.id == job.id
    assert_contiguous(events)
    assert events[-1].type == pb.JOB_CANCELLED and events[-1].state == pb.CANCELLED
