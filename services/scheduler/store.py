"""The scheduler's SQL. Every write happens inside the batch transaction that holds the job rows'
locks (SELECT ... FOR UPDATE), which is what makes each chunk result count exactly once and each
event seq unique.

The batch runs in pipeline mode (see Scheduler._record): a statement whose result nobody reads
is sent without waiting for it, so no write here may use COPY, which pipelines cannot carry."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from jobstream.states import ChunkState, JobState

# Lists go to Postgres as binary parameters (%b): see jobstream.db.

Conn = AsyncConnection[Any]


@dataclass
class JobRow:
    """The locked job row, changed in memory during a batch and written back once."""

    id: uuid.UUID
    tenant_id: str
    kind: str
    params_json: str  # as Postgres writes the stored jsonb out
    options_json: str
    state: int
    total_chunks: int
    done_chunks: int
    failed_chunks: int
    progress_message: str
    last_seq: int
    cancel_requested: bool
    started_at: float | None
    result: Any = None
    error: str = ""
    finished: bool = False
    changed: bool = False

    # Parsed only when a batch needs them (to split the job, retry or finish it): most batches
    # only count progress, and parsing every locked job's JSON cost the scheduler 5% of its time.
    @functools.cached_property
    def params(self) -> dict[str, Any]:
        return json.loads(self.params_json)  # type: ignore[no-any-return]

    @functools.cached_property
    def options(self) -> dict[str, Any]:
        return json.loads(self.options_json)  # type: ignore[no-any-return]


# How long a scheduler taking partitions over waits for a batch the old owner has under way.
TAKEOVER_WAIT_S = 10.0


async def take_partitions(conn: Conn, partitions: Sequence[int], owner: str) -> dict[int, int]:
    """Raises the epoch of each partition, so a previous owner's writes to its jobs are refused
    from now on; returns partition -> the epoch this scheduler now writes with.

    A batch of the previous owner that already holds a partition's row (share-locked by
    lock_jobs) is waited for: it began while that owner still owned the partition.
    """
    cur = await conn.execute(
        "INSERT INTO partition_owners AS o (partition, epoch, owner)"
        " SELECT p, 1, %s FROM unnest(%b::smallint[]) AS p ORDER BY p"
        " ON CONFLICT (partition) DO UPDATE SET epoch = o.epoch + 1, owner = excluded.owner, since = now()"
        " RETURNING o.partition, o.epoch",
        (owner, sorted(partitions)),
    )
    return {partition: epoch for partition, epoch in await cur.fetchall()}


async def take_over(
    pool: AsyncConnectionPool, partitions: Sequence[int], owner: str, wait_s: float = TAKEOVER_WAIT_S
) -> tuple[dict[int, int], int]:
    """take_partitions, ending the sessions of schedulers that keep it waiting longer than wait_s;
    returns the epochs and how many sessions were ended.

    A batch the old owner has under way is waited for, but not forever. The server ends a session
    idle inside a transaction after wait_s by itself; a scheduler paused in the middle of a
    statement (SIGSTOP, a frozen VM, in the middle of sending a COPY) looks active instead, and
    would hold the partitions' owner rows until it woke. Ending its session rolls that batch back;
    the new owner replays what it covered from Kafka.
    """
    async with pool.connection() as conn:
        taking = asyncio.ensure_future(take_partitions(conn, partitions, owner))
        ended = 0
        try:
            while True:
                done, _ = await asyncio.wait({taking}, timeout=wait_s)
                if done:
                    return taking.result(), ended
                async with pool.connection() as watcher:
                    cur = await watcher.execute(
                        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                        " WHERE pid = ANY(pg_blocking_pids(%s))"
                        " AND application_name = current_setting('application_name')",
                        (conn.info.backend_pid,),
                    )
                    row = await cur.fetchone()
                ended += int(row[0]) if row else 0
        finally:
            if not taking.done():
                taking.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await taking


async def lock_jobs(conn: Conn, job_ids: Sequence[uuid.UUID], epochs: Mapping[int, int]) -> list[JobRow]:
    """Locks the rows of the jobs whose partition this scheduler still owns at its epoch, in id
    order, so two transactions never wait on each other in a cycle.

    The epoch is checked in this same statement, and the partition's owner row stays share-locked
    until commit, so a takeover (take_partitions) either happened before, and these jobs are not
    returned, or waits for this transaction: a stale scheduler's batch changes nothing.
    """
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT j.id, j.tenant_id, j.kind, j.params::text AS params_json, j.options::text AS options_json,"
            " j.state, j.total_chunks, j.done_chunks, j.failed_chunks, j.progress_message, j.last_seq,"
            " j.cancel_requested_at IS NOT NULL AS cancel_requested,"
            " extract(epoch FROM j.started_at)::float8 AS started_at"
            " FROM jobs j JOIN partition_owners o ON o.partition = j.partition"
            " JOIN unnest(%b::smallint[], %b::bigint[]) AS mine(partition, epoch)"
            " ON mine.partition = o.partition AND mine.epoch = o.epoch"
            " WHERE j.id = ANY(%b) ORDER BY j.id FOR UPDATE OF j FOR SHARE OF o",
            (list(epochs), list(epochs.values()), list(job_ids)),
        )
        return [JobRow(**row) for row in await cur.fetchall()]


async def save_jobs(conn: Conn, jobs: Iterable[JobRow]) -> None:
    """Writes back the batch's changed jobs in one statement (one UPDATE per job made Postgres plan
    and run a statement for every job that merely moved its progress on)."""
    changed = [job for job in jobs if job.changed]
    if not changed:
        return
    await conn.execute(
        "UPDATE jobs j SET state = v.state, total_chunks = v.total_chunks, done_chunks = v.done_chunks,"
        " failed_chunks = v.failed_chunks, progress_message = v.progress_message, last_seq = v.last_seq,"
        " result = v.result, error = v.error, started_at = to_timestamp(v.started_at),"
        " finished_at = CASE WHEN v.finished THEN coalesce(j.finished_at, now()) END"
        " FROM unnest(%b::uuid[], %b::smallint[], %b::int[], %b::int[], %b::int[], %b::text[], %b::bigint[],"
        " %b::jsonb[], %b::text[], %b::float8[], %b::bool[])"
        " AS v(id, state, total_chunks, done_chunks, failed_chunks, progress_message, last_seq,"
        " result, error, started_at, finished)"
        " WHERE j.id = v.id",
        (
            [job.id for job in changed],
            [job.state for job in changed],
            [job.total_chunks for job in changed],
            [job.done_chunks for job in changed],
            [job.failed_chunks for job in changed],
            [job.progress_message for job in changed],
            [job.last_seq for job in changed],
            [None if job.result is None else Jsonb(job.result) for job in changed],
            [job.error for job in changed],
            [job.started_at for job in changed],
            [job.finished for job in changed],
        ),
    )


async def insert_events(conn: Conn, events: Sequence[tuple[uuid.UUID, int, bytes]]) -> None:
    """(job, seq, event) rows of a batch, in one statement."""
    await _insert_rows(conn, "job_events (job_id, seq, event)", ("uuid", "bigint", "bytea"), events)


async def read_inputs(conn: Conn, job_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, bytes]:
    """The inputs of the jobs a batch starts, in one query; a job without input is absent."""
    if not job_ids:
        return {}
    cur = await conn.execute("SELECT job_id, data FROM job_inputs WHERE job_id = ANY(%b)", (list(job_ids),))
    return {job_id: bytes(data) for job_id, data in await cur.fetchall()}


async def insert_chunks(conn: Conn, rows: Sequence[tuple[uuid.UUID, int, bytes]]) -> None:
    """(job, idx, payload) rows of every job a batch starts, in one statement."""
    await _insert_rows(conn, "chunks (job_id, idx, payload)", ("uuid", "int", "bytea"), rows)


async def _insert_rows(conn: Conn, into: str, types: tuple[str, ...], rows: Sequence[tuple[Any, ...]]) -> None:
    """Inserts rows as one array per column (unnest), the form a pipeline can carry (COPY is not)."""
    if not rows:
        return
    arrays = ", ".join(f"%b::{t}[]" for t in types)
    columns = [list(column) for column in zip(*rows, strict=True)]
    await conn.execute(f"INSERT INTO {into} SELECT * FROM unnest({arrays})", columns)


async def pending_chunks(
    conn: Conn, job_id: uuid.UUID, only: Sequence[tuple[int, int]] | None = None
) -> tuple[list[tuple[int, int, bytes]], list[tuple[int, int, float]]]:
    """The job's chunks waiting for a worker: (idx, attempt, payload) due now, and
    (idx, attempt, seconds to wait) of those still in a retry backoff.

    With `only`, just those (idx, attempt) pairs, and only if still pending at that attempt: a retry
    that a cancel or an earlier success overtook is not dispatched.
    """
    if only is None:
        cur = await conn.execute(
            "SELECT idx, attempt, payload, greatest(0, extract(epoch FROM not_before - now()))::float8"
            " FROM chunks WHERE job_id = %s AND state = %s ORDER BY idx",
            (job_id, ChunkState.PENDING),
        )
    else:
        cur = await conn.execute(
            "SELECT c.idx, c.attempt, c.payload, 0::float8 FROM chunks c"
            " JOIN unnest(%b::uuid[], %b::int[], %b::int[]) AS t(job_id, idx, attempt)"
            " ON c.job_id = t.job_id AND c.idx = t.idx AND c.attempt = t.attempt"
            " WHERE c.state = %s ORDER BY c.idx",
            ([job_id] * len(only), [i for i, _ in only], [a for _, a in only], ChunkState.PENDING),
        )
    due: list[tuple[int, int, bytes]] = []
    later: list[tuple[int, int, float]] = []
    for idx, attempt, payload, wait_s in await cur.fetchall():
        if wait_s and wait_s > 0:
            later.append((idx, attempt, wait_s))
        else:
            due.append((idx, attempt, bytes(payload)))
    return due, later


async def record_successes(conn: Conn, results: Sequence[tuple[uuid.UUID, int, str]]) -> dict[uuid.UUID, list[int]]:
    """Marks (job, chunk) succeeded unless already final, for every job of a batch in one statement;
    returns per job the chunks this call counted.

    First completion wins, whatever its attempt: a late duplicate finds the chunk final and is not
    counted again.
    """
    if not results:
        return {}
    # The job id comes with every row of the unnest: with a constant, a job whose chunks were just
    # inserted (no statistics yet) got a scan of all its chunks per batch, which made a
    # 100,000-chunk job crawl; joined per row it is one primary-key lookup per chunk.
    # Locked in (job, chunk) order, as claims and heartbeats lock them, so they never deadlock.
    cur = await conn.execute(
        "WITH done AS ("
        "  SELECT c.job_id, c.idx, t.result FROM chunks c"
        "  JOIN unnest(%b::uuid[], %b::int[], %b::text[]) AS t(job_id, idx, result)"
        "    ON c.job_id = t.job_id AND c.idx = t.idx"
        "  WHERE c.state IN (%s, %s) ORDER BY c.job_id, c.idx FOR UPDATE OF c)"
        " UPDATE chunks c SET state = %s, result = d.result::jsonb, finished_at = now(),"
        " lease_expires_at = NULL, error = NULL"
        " FROM done d WHERE c.job_id = d.job_id AND c.idx = d.idx RETURNING c.job_id, c.idx",
        (
            [j for j, _, _ in results],
            [i for _, i, _ in results],
            [r for _, _, r in results],
            ChunkState.PENDING,
            ChunkState.RUNNING,
            ChunkState.SUCCEEDED,
        ),
    )
    counted: dict[uuid.UUID, list[int]] = {}
    for job_id, idx in await cur.fetchall():
        counted.setdefault(job_id, []).append(idx)
    return counted


async def running_failures(conn: Conn, job_id: uuid.UUID, idx: int, attempt: int) -> int | None:
    """The chunk's failures so far if it is running at exactly this attempt, else None (a stale
    attempt's failure, or one for a chunk that already finished, is ignored)."""
    cur = await conn.execute(
        "SELECT failures FROM chunks WHERE job_id = %s AND idx = %s AND attempt = %s AND state = %s",
        (job_id, idx, attempt, ChunkState.RUNNING),
    )
    row = await cur.fetchone()
    return None if row is None else int(row[0])


async def retry_chunk(conn: Conn, job_id: uuid.UUID, idx: int, error: str, delay_s: float) -> int:
    cur = await conn.execute(
        "UPDATE chunks SET state = %s, attempt = attempt + 1, failures = failures + 1, error = %s,"
        " worker_id = NULL, lease_expires_at = NULL, not_before = now() + make_interval(secs => %s)"
        " WHERE job_id = %s AND idx = %s RETURNING attempt",
        (ChunkState.PENDING, error, delay_s, job_id, idx),
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def requeue(conn: Conn, job_id: uuid.UUID, idx: int, attempt: int, *, lease_expired: bool = False) -> int | None:
    """Makes a running attempt pending again as the next attempt; None if it is not running it.

    With lease_expired, only while its lease is still expired: the sweep that found it read
    outside this transaction, and a heartbeat may have renewed the lease since.
    """
    cur = await conn.execute(
        "UPDATE chunks SET state = %s, attempt = attempt + 1, worker_id = NULL, lease_expires_at = NULL,"
        " not_before = NULL WHERE job_id = %s AND idx = %s AND attempt = %s AND state = %s"
        " AND (NOT %s OR lease_expires_at < now()) RETURNING attempt",
        (ChunkState.PENDING, job_id, idx, attempt, ChunkState.RUNNING, lease_expired),
    )
    row = await cur.fetchone()
    return None if row is None else int(row[0])


async def fail_chunk(conn: Conn, job_id: uuid.UUID, idx: int, error: str) -> None:
    await conn.execute(
        "UPDATE chunks SET state = %s, failures = failures + 1, error = %s, finished_at = now(),"
        " lease_expires_at = NULL WHERE job_id = %s AND idx = %s",
        (ChunkState.FAILED, error, job_id, idx),
    )


async def mark_cancelled(conn: Conn, job_id: uuid.UUID, stopped: Sequence[tuple[int, int]] | None = None) -> None:
    """Cancels the job's pending chunks, or just the running attempts (idx, attempt) that stopped.

    Running chunks stay running until their worker says they stopped, so the chunk table tells
    the truth about what still runs; an older attempt's word leaves a newer one running.
    """
    if stopped is None:
        await conn.execute(
            "UPDATE chunks SET state = %s, finished_at = now() WHERE job_id = %s AND state = %s",
            (ChunkState.CANCELLED, job_id, ChunkState.PENDING),
        )
    else:
        await conn.execute(
            "UPDATE chunks SET state = %s, finished_at = now(), lease_expires_at = NULL"
            " WHERE job_id = %s AND state = %s"
            " AND (idx, attempt) IN (SELECT * FROM unnest(%b::int[], %b::int[]))",
            (
                ChunkState.CANCELLED,
                job_id,
                ChunkState.RUNNING,
                [idx for idx, _ in stopped],
                [attempt for _, attempt in stopped],
            ),
        )


async def chunk_results(conn: Conn, job_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[Any]]:
    """The results of each job's succeeded chunks, in chunk order (a job with none gets [])."""
    results: dict[uuid.UUID, list[Any]] = {job_id: [] for job_id in job_ids}
    if not job_ids:
        return results
    cur = await conn.execute(
        "SELECT c.job_id, c.result FROM unnest(%b::uuid[]) AS t(job_id)"
        " JOIN chunks c ON c.job_id = t.job_id WHERE c.state = %s ORDER BY c.job_id, c.idx",
        (list(job_ids), ChunkState.SUCCEEDED),
    )
    for job_id, result in await cur.fetchall():
        results[job_id].append(result)
    return results


async def count_running(pool: AsyncConnectionPool, partitions: Sequence[int]) -> tuple[int, int]:
    """(running, stalled) jobs on these partitions; stalled = no event for 5 minutes."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE e.created_at < now() - interval '5 minutes')"
            " FROM jobs j JOIN job_events e ON e.job_id = j.id AND e.seq = j.last_seq"
            " WHERE j.partition = ANY(%b) AND j.state = %s",
            (list(partitions), JobState.RUNNING),
        )
        row = await cur.fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)
