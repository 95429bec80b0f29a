"""Fencing of schedulers, on a Postgres of the test's own: once a partition is taken over, the
scheduler that owned it locks none of its jobs, and a takeover waits for the batch the old owner
already has under way (which then lands, because it began while that owner owned the partition)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from jobstream.embedded.postgres import EmbeddedPostgres
from jobstream.states import JobState
from services.scheduler import store
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e

Conn = psycopg.AsyncConnection[Any]
PARTITION = 3
SCHEDULER = "jobstream-scheduler"  # the application name of a scheduler's sessions


async def _connect(pg: EmbeddedPostgres) -> Conn:
    return await psycopg.AsyncConnection.connect(pg.url, autocommit=True)


async def _job(conn: Conn, partition: int = PARTITION) -> uuid.UUID:
    job_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO jobs (id, tenant_id, partition, kind, params, request_hash, state)"
        " VALUES (%s, 'default', %s, 'demo.sleep', '{}', '', %s)",
        (job_id, partition, JobState.RUNNING),
    )
    return job_id


async def _locked(conn: Conn, job_id: uuid.UUID, epochs: dict[int, int]) -> list[uuid.UUID]:
    async with conn.transaction():
        return [job.id for job in await store.lock_jobs(conn, [job_id], epochs)]


async def test_the_old_owner_locks_none_of_the_jobs_of_a_partition_taken_over(postgres: EmbeddedPostgres) -> None:
    async with await _connect(postgres) as conn:
        job_id = await _job(conn)
        elsewhere = await _job(conn, partition=PARTITION + 1)
        old = await store.take_partitions(conn, [PARTITION, PARTITION + 1], "scheduler-a")
        assert await _locked(conn, job_id, old) == [job_id]

        new = await store.take_partitions(conn, [PARTITION], "scheduler-b")

        assert new == {PARTITION: old[PARTITION] + 1}
        assert await _locked(conn, job_id, old) == []
        assert await _locked(conn, job_id, new) == [job_id]
        # Only the partition taken over is fenced: the old owner keeps the other one.
        assert await _locked(conn, elsewhere, old) == [elsewhere]
        cur = await conn.execute("SELECT owner FROM partition_owners WHERE partition = %s", (PARTITION,))
        assert await cur.fetchone() == ("scheduler-b",)


async def test_a_takeover_waits_for_the_batch_the_old_owner_has_under_way(postgres: EmbeddedPostgres) -> None:
    async with await _connect(postgres) as a, await _connect(postgres) as b, await _connect(postgres) as watcher:
        job_id = await _job(a)
        old = await store.take_partitions(a, [PARTITION], "scheduler-a")

        async with a.transaction():
            assert [j.id for j in await store.lock_jobs(a, [job_id], old)] == [job_id]
            takeover = asyncio.create_task(store.take_partitions(b, [PARTITION], "scheduler-b"))

            async def b_waits_for_a_lock() -> bool:
                cur = await watcher.execute(
                    "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (b.info.backend_pid,)
                )
                row = await cur.fetchone()
                return row is not None and row[0] == "Lock"

            await wait_for(b_waits_for_a_lock, within=10, what="the takeover to wait for the old owner's batch")
            assert not takeover.done()
            await a.execute("UPDATE jobs SET last_seq = 7 WHERE id = %s", (job_id,))

        new = await asyncio.wait_for(takeover, 10)
        assert new == {PARTITION: old[PARTITION] + 1}
        cur = await a.execute("SELECT last_seq FROM jobs WHERE id = %s", (job_id,))
        assert await cur.fetchone() == (7,)  # the batch that began under the old epoch landed
        assert await _locked(a, job_id, old) == []


def _scheduler_pool(postgres: EmbeddedPostgres) -> AsyncConnectionPool:
    return AsyncConnectionPool(
        postgres.url, min_size=2, max_size=2, kwargs={"autocommit": True, "application_name": SCHEDULER}
    )


async def test_a_takeover_ends_an_old_owner_that_holds_its_batch_too_long(postgres: EmbeddedPostgres) -> None:
    async with (
        await psycopg.AsyncConnection.connect(postgres.url, autocommit=True, application_name=SCHEDULER) as stuck,
        _scheduler_pool(postgres) as pool,
    ):
        job_id = await _job(stuck)
        old = await store.take_partitions(stuck, [PARTITION], "scheduler-a")
        # The old owner locked its jobs and then stopped, in the middle of its batch, for good.
        await stuck.execute("BEGIN")
        assert [j.id for j in await store.lock_jobs(stuck, [job_id], old)] == [job_id]

        new, ended = await asyncio.wait_for(store.take_over(pool, [PARTITION], "scheduler-b", wait_s=0.5), 10)

        assert new == {PARTITION: old[PARTITION] + 1} and ended == 1
        with pytest.raises(psycopg.OperationalError):
            await stuck.execute("UPDATE jobs SET last_seq = 7 WHERE id = %s", (job_id,))
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT last_seq FROM jobs WHERE id = %s", (job_id,))
            assert await cur.fetchone() == (0,)  # its batch was rolled back, not applied


async def test_a_takeover_ends_no_session_of_another_application(postgres: EmbeddedPostgres) -> None:
    async with (
        await psycopg.AsyncConnection.connect(postgres.url, application_name="someone-else") as other,
        _scheduler_pool(postgres) as pool,
    ):
        await store.take_partitions(other, [PARTITION], "scheduler-a")
        await other.execute("SELECT 1 FROM partition_owners WHERE partition = %s FOR SHARE", (PARTITION,))

        taking = asyncio.ensure_future(store.take_over(pool, [PARTITION], "scheduler-b", wait_s=0.2))
        # Several times the wait, and the session that is not a scheduler's is still there.
        done, _ = await asyncio.wait({taking}, timeout=1.5)
        assert not done, "the takeover must keep waiting for a session that is not a scheduler's"
        await other.rollback()
        _, ended = await asyncio.wait_for(taking, 10)
        assert ended == 0
