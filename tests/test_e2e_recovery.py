"""Each recovery mechanism on its own, on a stack of its own whose processes the tests kill."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer

from jobstream import topics
from jobstream.bus.v1 import bus_pb2
from jobstream.states import ChunkState
from jobstream.v1 import jobstream_pb2 as pb
from jobstream.v1 import jobstream_pb2_grpc as pb_grpc
from services.worker.worker import REPORTED_MEMORY_LEASES
from tests.conftest import db_of, running_stack
from tests.helpers import assert_contiguous, metric, params, read_rest, wait_for, watch_all, watch_until
from tests.stack import Stack

if TYPE_CHECKING:
    from tests.helpers import Client

pytestmark = pytest.mark.e2e
Db = psycopg.AsyncConnection[tuple[Any, ...]]
LEASE_SECONDS = 2.0


@pytest.fixture(scope="module")
async def own(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with running_stack(
        tmp_path_factory.mktemp("recovery"),
        workers=2,
        JOBSTREAM_LEASE_SECONDS=str(LEASE_SECONDS),
        JOBSTREAM_HEARTBEAT_SECONDS="0.5",
        JOBSTREAM_DRAIN_SECONDS="1",
    ) as stack:
        yield stack


@pytest.fixture
async def client(own: Stack) -> AsyncIterator[Client]:
    async with own.channel() as channel:
        yield pb_grpc.JobServiceStub(channel)


@pytest.fixture
async def db(own: Stack) -> AsyncIterator[Db]:
    async with db_of(own) as conn:
        yield conn


async def submit(client: Client, options: pb.JobOptions | None = None, **values: Any) -> pb.Job:
    request = pb.SubmitRequest(kind="demo.sleep", params=params(**values), options=options)
    return (await client.Submit(request)).job


def quick_retries(max_attempts: int) -> pb.JobOptions:
    return pb.JobOptions(
        retry=pb.RetryPolicy(max_attempts=max_attempts, initial_backoff_seconds=0.05, max_backoff_seconds=0.1)
    )


async def chunk_row(db: Db, job_id: str, idx: int) -> dict[str, Any]:
    cur = await db.execute(
        "SELECT state, attempt, failures, claims, worker_id FROM chunks WHERE job_id = %s AND idx = %s", (job_id, idx)
    )
    row = await cur.fetchone()
    assert row is not None
    return dict(zip(("state", "attempt", "failures", "claims", "worker_id"), row, strict=True))


async def test_failed_attempt_is_retried_then_succeeds(client: Client, db: Db) -> None:
    job = await submit(client, quick_retries(3), chunks=3, ms=10, fail_attempts=1)

    events = await watch_all(client, job.id)

    assert_contiguous(events)
    assert events[-1].type == pb.JOB_SUCCEEDED
    failed = [e for e in events if e.type == pb.CHUNK_FAILED]
    retrying = [e for e in events if e.type == pb.CHUNK_RETRYING]
    assert sorted(e.chunk_index for e in failed) == [0, 1, 2]
    assert all(e.attempt == 1 and "injected failure" in e.error for e in failed)
    assert sorted((e.chunk_index, e.attempt) for e in retrying) == [(0, 2), (1, 2), (2, 2)]
    assert await chunk_row(db, job.id, 1) | {"worker_id": None} == {
        "state": 2,
        "attempt": 2,
        "failures": 1,
        "claims": 2,
        "worker_id": None,
    }


async def test_exhausted_retries_fail_the_job_and_dead_letter_the_chunk(own: Stack, client: Client) -> None:
    job = await submit(client, quick_retries(2), chunks=5, ms=10, fail_chunks="3")

    events = await watch_all(client, job.id)

    assert events[-1].type == pb.JOB_FAILED and events[-1].state == pb.FAILED
    assert "chunk 3" in events[-1].error and "2 failed attempts" in events[-1].error
    assert [e.attempt for e in events if e.type == pb.CHUNK_FAILED and e.chunk_index == 3] == [1, 2]
    dead = await _dead_letters(own, job.id)
    assert [(d.chunk_index, d.attempt) for d in dead] == [(3, 2)]
    assert "injected failure" in dead[0].error


async def test_a_job_that_allows_partial_results_succeeds_without_its_lost_chunks(own: Stack, client: Client) -> None:
    options = quick_retries(2)
    options.allow_partial = True
    job = await submit(client, options, chunks=5, ms=10, fail_chunks="1,3")

    events = await watch_all(client, job.id)

    assert_contiguous(events)
    last = events[-1]
    assert last.type == pb.JOB_SUCCEEDED and last.state == pb.SUCCEEDED
    assert (last.progress.done_chunks, last.progress.failed_chunks, last.progress.total_chunks) == (3, 2, 5)
    assert dict(last.result) == {"chunks": 3}
    final = await client.GetJob(pb.GetJobRequest(job_id=job.id))
    assert final.options.allow_partial and final.progress.failed_chunks == 2
    dead = await _dead_letters(own, job.id)
    assert sorted((d.chunk_index, d.attempt) for d in dead) == [(1, 2), (3, 2)]


async def test_chunk_timeout_counts_as_a_failed_attempt(client: Client) -> None:
    options = quick_retries(2)
    options.chunk_timeout_seconds = 0.3
    job = await submit(client, options, chunks=3, ms=10, hang_chunk=1)

    events = await watch_all(client, job.id)

    assert events[-1].type == pb.JOB_FAILED
    timeouts = [e for e in events if e.type == pb.CHUNK_FAILED]
    assert [(e.chunk_index, e.attempt) for e in timeouts] == [(1, 1), (1, 2)]
    assert all("timed out after 0.3s" in e.error for e in timeouts)


async def test_job_deadline_fails_the_job_and_stops_its_chunks(client: Client, db: Db) -> None:
    job = await submit(client, pb.JobOptions(deadline_seconds=1.0), chunks=2, ms=10, hang_chunk=0)

    events = await watch_all(client, job.id)

    assert events[-1].type == pb.JOB_FAILED and "deadline" in events[-1].error
    finished = await client.GetJob(pb.GetJobRequest(job_id=job.id))
    assert finished.state == pb.FAILED and finished.deadline.seconds > 0

    async def hang_stopped() -> bool:
        return bool((await chunk_row(db, job.id, 0))["state"] == 4)

    await wait_for(hang_stopped, within=10, what="the hanging chunk to be interrupted")


async def test_killed_worker_chunk_runs_elsewhere_after_its_lease(own: Stack, client: Client, db: Db) -> None:
    job = await submit(client, chunks=4, ms=50, crash_chunk=2)

    events = await watch_all(client, job.id, within=60)

    assert events[-1].type == pb.JOB_SUCCEEDED and events[-1].progress.done_chunks == 4
    crashed = await chunk_row(db, job.id, 2)
    assert crashed["attempt"] == 2 and crashed["claims"] == 2 and crashed["failures"] == 0
    # Every chunk the killed worker held runs again (chunk 2 among them), none counted twice.
    lost = [e for e in events if e.type == pb.CHUNK_RETRYING]
    assert (2, 2) in [(e.chunk_index, e.attempt) for e in lost]
    assert all(e.attempt == 2 and "lease expired" in e.message for e in lost)
    dead = [name for name, proc in own.services.items() if name.startswith("worker") and not proc.alive]
    assert len(dead) == 1 and own.services[dead[0]].returncode == 70
    own.start_worker(dead[0])


async def test_sigterm_worker_drains_hands_back_and_exits_zero(own: Stack, client: Client, db: Db) -> None:
    job = await submit(client, chunks=8, ms=4000)
    stream, events = await watch_until(client, job.id, lambda e: e.type == pb.JOB_STARTED)
    running_on: list[str] = []

    async def some_running() -> bool:
        cur = await db.execute("SELECT DISTINCT worker_id FROM chunks WHERE job_id = %s AND state = 1", (job.id,))
        running_on[:] = [row[0] for row in await cur.fetchall()]
        return bool(running_on)

    await wait_for(some_running, what="chunks of the job to run")
    victim_name = running_on[0]
    victim = own.services[victim_name]
    victim.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(victim.wait, 30)
    events += await read_rest(stream, job.id)

    assert code == 0
    assert_contiguous(events)
    assert events[-1].type == pb.JOB_SUCCEEDED
    handed_back = [e for e in events if e.type == pb.CHUNK_RETRYING]
    assert handed_back and all("gave the chunk back" in e.message for e in handed_back)
    cur = await db.execute(
        "SELECT max(failures), count(*) FILTER (WHERE worker_id = %s) FROM chunks WHERE job_id = %s",
        (victim_name, job.id),
    )
    assert await cur.fetchone() == (0, 0)
    own.start_worker(victim_name)


async def test_finished_chunks_keep_their_lease_until_a_lagging_scheduler_records_them(
    own: Stack, client: Client, db: Db
) -> None:
    # More reports than one scheduler batch pile up while the scheduler is paused past the lease:
    # the workers must keep vouching for chunks they finished, or they would all run again.
    chunks = 3000
    job = await submit(client, chunks=chunks, ms=0)
    stream, events = await watch_until(client, job.id, lambda e: e.type == pb.JOB_STARTED)
    scheduler = own.services["scheduler"]
    assert scheduler.pid is not None
    os.kill(scheduler.pid, signal.SIGSTOP)
    try:

        async def all_ran_and_leases_would_have_expired() -> bool:
            cur = await db.execute(
                "SELECT count(*) FILTER (WHERE state = %s AND claimed_at < now() - make_interval(secs => %s))"
                " FROM chunks WHERE job_id = %s",
                (ChunkState.RUNNING, 2 * LEASE_SECONDS, job.id),
            )
            row = await cur.fetchone()
            return row is not None and row[0] == chunks

        await wait_for(all_ran_and_leases_would_have_expired, within=90, what="every chunk run, twice the lease ago")
    finally:
        os.kill(scheduler.pid, signal.SIGCONT)
    events += await read_rest(stream, job.id, within=120)

    assert_contiguous(events)
    assert events[-1].type == pb.JOB_SUCCEEDED and events[-1].progress.done_chunks == chunks
    assert [e for e in events if e.type == pb.CHUNK_RETRYING] == []
    cur = await db.execute("SELECT sum(claims) FROM chunks WHERE job_id = %s", (job.id,))
    assert await cur.fetchone() == (chunks,)


async def test_scheduler_killed_mid_job_is_resumed_by_a_new_one(own: Stack, client: Client) -> None:
    job = await submit(client, chunks=30, ms=200)
    stream, events = await watch_until(client, job.id, lambda e: e.progress.done_chunks >= 5)

    own.services["scheduler"].kill()
    own.start_service("scheduler", "services.scheduler")
    events += await read_rest(stream, job.id)

    assert_contiguous(events)
    assert events[-1].type == pb.JOB_SUCCEEDED and events[-1].progress.done_chunks == 30


async def _dead_letters(stack: Stack, job_id: str) -> list[bus_pb2.ChunkReport]:
    return await _reports_on(stack, topics.DEAD_LETTER, job_id)


async def _reports_on(
    stack: Stack,
    topic: str,
    job_id: str,
    wanted: Callable[[bus_pb2.ChunkReport], bool] = lambda _: True,
    within: float = 10,
) -> list[bus_pb2.ChunkReport]:
    """The job's wanted reports on `topic`, read from its start until at least one came or
    `within` seconds passed."""
    consumer = AIOKafkaConsumer(
        stack.settings.topic(topic),
        bootstrap_servers=stack.bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        found: list[bus_pb2.ChunkReport] = []
        deadline = asyncio.get_running_loop().time() + within
        while not found and asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                found += [
                    report
                    for report in (bus_pb2.ChunkReport.FromString(r.value) for r in records)
                    if report.job_id == job_id and wanted(report)
                ]
        return found
    finally:
        await consumer.stop()


async def test_a_report_the_broker_lost_is_sent_again_and_its_chunk_runs_once(
    own: Stack, client: Client, db: Db
) -> None:
    # The chunk finishes while the scheduler is paused, so its report waits unread on the broker,
    # which then comes back empty. The worker keeps vouching for the chunk it finished, so only
    # its report sent again ends the chunk; without it the chunk would wait out the worker's
    # memory of it (30 leases) and then run a second time.
    job = await submit(client, chunks=1, ms=500)
    scheduler = own.services["scheduler"]
    assert scheduler.pid is not None

    async def chunk_claimed() -> bool:
        cur = await db.execute("SELECT state FROM chunks WHERE job_id = %s AND idx = 0", (job.id,))
        return await cur.fetchone() == (ChunkState.RUNNING,)

    await wait_for(chunk_claimed, what="the chunk to be claimed")
    os.kill(scheduler.pid, signal.SIGSTOP)
    try:
        succeeded = await _reports_on(
            own, topics.PROGRESS, job.id, lambda r: r.type == bus_pb2.CHUNK_SUCCEEDED, within=20
        )
        assert succeeded, "the worker reported the chunk"
        await asyncio.to_thread(own.broker.restart)
    finally:
        os.kill(scheduler.pid, signal.SIGCONT)

    events = await watch_all(client, job.id, within=3 * REPORTED_MEMORY_LEASES * LEASE_SECONDS / 4)

    assert events[-1].type == pb.JOB_SUCCEEDED, events[-1]
    row = await chunk_row(db, job.id, 0)
    assert (row["state"], row["claims"]) == (ChunkState.SUCCEEDED, 1), row
    resent = [await metric(own, name, "jobstream_worker_reports_resent_total") for name in own.workers()]
    assert sum(resent) >= 1, resent


async def test_submit_while_broker_down_is_durable_and_runs_when_it_returns(own: Stack, client: Client, db: Db) -> None:
    own.broker.kill()
    try:
        job = await submit(client, chunks=3, ms=10)
        cur = await db.execute("SELECT count(*) FROM outbox WHERE key = %s", (job.id.encode(),))
        assert await cur.fetchone() == (1,), "the submit must wait in the outbox while the broker is down"
    finally:
        # Comes back empty, as the embedded broker does: topics and offsets are gone too.
        own.broker.start()

    events = await watch_all(client, job.id, within=90)

    assert_contiguous(events)
    assert events[-1].type == pb.JOB_SUCCEEDED and events[-1].progress.done_chunks == 3
