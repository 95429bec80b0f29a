"""Chunk leases on a Postgres of the test's own: a heartbeat extends each lease by its own length,
reports a row another transaction has locked as held but not extended, and a lease renewed after
the scheduler's sweep read it expired is not taken away."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from jobstream.embedded.postgres import EmbeddedPostgres
from jobstream.states import ChunkState, JobState
from services.scheduler import store
from services.worker import claims

pytestmark = pytest.mark.e2e

Conn = psycopg.AsyncConnection[Any]
WORKER = "worker-1"


@pytest.fixture
async def conn(postgres: EmbeddedPostgres) -> AsyncIterator[Conn]:
    async with await psycopg.AsyncConnection.connect(postgres.url, autocommit=True) as conn:
        yield conn


@pytest.fixture
async def pool(postgres: EmbeddedPostgres) -> AsyncIterator[AsyncConnectionPool]:
    async with AsyncConnectionPool(postgres.url, min_size=1, max_size=2, open=False) as pool:
        yield pool


async def _running_job(conn: Conn, chunks: int, lease_s: float) -> str:
    job_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO jobs (id, tenant_id, partition, kind, params, request_hash, state, total_chunks)"
        " VALUES (%s, 'default', 0, 'demo.sleep', '{}', '', %s, %s)",
        (job_id, JobState.RUNNING, chunks),
    )
    await conn.execute(
        "INSERT INTO chunks (job_id, idx, payload, state, worker_id, claimed_at, lease_expires_at)"
        " SELECT %s, i, '', %s, %s, now(), now() + make_interval(secs => %s) FROM generate_series(0, %s - 1) i",
        (job_id, ChunkState.RUNNING, WORKER, lease_s, chunks),
    )
    return str(job_id)


async def _lease_left(conn: Conn, job_id: str, idx: int) -> float:
    cur = await conn.execute(
        "SELECT extract(epoch FROM lease_expires_at - now()) FROM chunks WHERE job_id = %s AND idx = %s",
        (job_id, idx),
    )
    row = await cur.fetchone()
    assert row is not None
    return float(row[0])


async def test_each_lease_is_extended_by_its_own_length(conn: Conn, pool: AsyncConnectionPool) -> None:
    job_id = await _running_job(conn, 2, lease_s=1)

    beat = await claims.heartbeat(pool, {(job_id, 0): 10.0, (job_id, 1): 600.0}, WORKER)

    assert beat.extended == beat.held == {(job_id, 0), (job_id, 1)}
    assert beat.stopped_jobs == set()
    assert 5 < await _lease_left(conn, job_id, 0) <= 10
    assert 500 < await _lease_left(conn, job_id, 1) <= 600


async def test_a_row_locked_elsewhere_is_held_but_not_extended(
    conn: Conn, pool: AsyncConnectionPool, postgres: EmbeddedPostgres
) -> None:
    job_id = await _running_job(conn, 2, lease_s=1)
    async with await psycopg.AsyncConnection.connect(postgres.url) as other, other.transaction():
        await other.execute("SELECT 1 FROM chunks WHERE job_id = %s AND idx = 0 FOR UPDATE", (job_id,))

        beat = await claims.heartbeat(pool, {(job_id, 0): 600.0, (job_id, 1): 600.0}, WORKER)

    assert beat.held == {(job_id, 0), (job_id, 1)}
    assert beat.extended == {(job_id, 1)}
    assert await _lease_left(conn, job_id, 0) <= 1


async def test_a_lease_renewed_after_the_sweep_is_not_taken_away(conn: Conn, pool: AsyncConnectionPool) -> None:
    job_id = await _running_job(conn, 1, lease_s=-1)  # the sweep finds it expired...
    await claims.heartbeat(pool, {(job_id, 0): 600.0}, WORKER)  # ...and then its worker renews it

    assert await store.requeue(conn, uuid.UUID(job_id), 0, 1, lease_expired=True) is None

    await conn.execute("UPDATE chunks SET lease_expires_at = now() - interval '1 s' WHERE job_id = %s", (job_id,))
    assert await store.requeue(conn, uuid.UUID(job_id), 0, 1, lease_expired=True) == 2
