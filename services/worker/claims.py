"""A worker's leases in Postgres: the claim that must succeed before a chunk runs, and heartbeats.

The claim moves a chunk from pending to running for exactly the dispatched attempt. Cancel moves
pending chunks to cancelled under the same row locks, so a chunk of a cancelled job can never be
claimed, and a second delivery of the same attempt (a rebalance, a replay) finds it running and
is refused: the chunk does not run twice at once.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from psycopg_pool import AsyncConnectionPool

from jobstream.bus.v1 import bus_pb2
from jobstream.db import retry_conflicts
from jobstream.states import ChunkState, JobState

# Lists go to Postgres as binary parameters (%b): see jobstream.db.

ChunkKey = tuple[str, int]


async def claim(
    pool: AsyncConnectionPool, tasks: Sequence[bus_pb2.ChunkTask], worker_id: str, lease_s: float
) -> set[ChunkKey]:
    """Claims what it can of `tasks` in one statement; returns the (job_id, idx) it now holds."""
    if not tasks:
        return set()
    ordered = sorted(tasks, key=lambda t: (uuid.UUID(t.job_id), t.chunk_index))

    async def attempt() -> set[ChunkKey]:
        async with pool.connection() as conn:
            # Rows are locked in (job, chunk) order, the order the scheduler writes them in, so the
            # two rarely wait on each other in a cycle; when they do, Postgres aborts one and it runs again.
            cur = await conn.execute(
                "WITH wanted AS ("
                "  SELECT c.job_id, c.idx FROM chunks c"
                "  JOIN unnest(%b::uuid[], %b::int[], %b::int[]) AS t(job_id, idx, attempt)"
                "    ON c.job_id = t.job_id AND c.idx = t.idx AND c.attempt = t.attempt"
                "  WHERE c.state = %s ORDER BY c.job_id, c.idx FOR UPDATE OF c)"
                " UPDATE chunks c SET state = %s, worker_id = %s, claimed_at = now(), claims = claims + 1,"
                " lease_expires_at = now() + make_interval(secs => %s)"
                " FROM wanted w WHERE c.job_id = w.job_id AND c.idx = w.idx AND c.state = %s"
                " RETURNING c.job_id, c.idx",
                (
                    [uuid.UUID(t.job_id) for t in ordered],
                    [t.chunk_index for t in ordered],
                    [t.attempt for t in ordered],
                    ChunkState.PENDING,
                    ChunkState.RUNNING,
                    worker_id,
                    lease_s,
                    ChunkState.PENDING,
                ),
            )
            return {(str(job_id), idx) for job_id, idx in await cur.fetchall()}

    return await retry_conflicts(attempt, "claiming chunks")


@dataclass
class Beat:
    """What one heartbeat found: the leases it extended, the chunks this worker still holds (those
    plus rows another transaction had locked, whose lease is unchanged), and the jobs among them
    whose cancel was recorded."""

    extended: set[ChunkKey] = field(default_factory=set)
    held: set[ChunkKey] = field(default_factory=set)
    stopped_jobs: set[str] = field(default_factory=set)


async def heartbeat(pool: AsyncConnectionPool, leases: Mapping[ChunkKey, float], worker_id: str) -> Beat:
    """Extends the leases this worker still holds, each by its own number of seconds.

    A worker that missed a cancel message, or whose lease was taken over after a long pause,
    learns it here (stopped_jobs, and a chunk missing from held) and stops those chunks.
    """
    if not leases:
        return Beat()

    keys = sorted(leases, key=lambda k: (uuid.UUID(k[0]), k[1]))
    job_ids, idxs = [uuid.UUID(j) for j, _ in keys], [i for _, i in keys]
    seconds = [leases[k] for k in keys]
    Key = tuple[uuid.UUID, int]

    async def attempt() -> tuple[list[Key], list[Key], set[uuid.UUID]]:
        async with pool.connection() as conn:
            # Rows another transaction has locked are skipped, not waited for: the scheduler locks
            # the chunks whose outcome it is recording, and a scheduler stalled inside that
            # transaction must not stall every heartbeat until the leases run out. Locked in
            # (job, chunk) order like every multi-row write to chunks. The update joins nothing
            # but its chunks: joined to jobs as well, the planner found each chunk by its job
            # alone and filtered the job's chunks for it, and a 100,000-chunk job's heartbeat
            # ran for minutes.
            cur = await conn.execute(
                "WITH held AS ("
                "  SELECT c.job_id, c.idx, t.secs FROM chunks c"
                "  JOIN unnest(%b::uuid[], %b::int[], %b::float8[]) AS t(job_id, idx, secs)"
                "    ON c.job_id = t.job_id AND c.idx = t.idx"
                "  WHERE c.worker_id = %s AND c.state = %s ORDER BY c.job_id, c.idx FOR UPDATE OF c SKIP LOCKED)"
                " UPDATE chunks c SET lease_expires_at = now() + make_interval(secs => h.secs)"
                " FROM held h WHERE c.job_id = h.job_id AND c.idx = h.idx"
                " RETURNING c.job_id, c.idx",
                (job_ids, idxs, seconds, worker_id, ChunkState.RUNNING),
            )
            extended: list[Key] = await cur.fetchall()
            held = extended
            if len(extended) < len(keys):
                # What was skipped is still this worker's if its last committed version says so.
                cur = await conn.execute(
                    "SELECT c.job_id, c.idx FROM chunks c"
                    " JOIN unnest(%b::uuid[], %b::int[]) AS t(job_id, idx) ON c.job_id = t.job_id AND c.idx = t.idx"
                    " WHERE c.worker_id = %s AND c.state = %s",
                    (job_ids, idxs, worker_id, ChunkState.RUNNING),
                )
                held = await cur.fetchall()
            if not held:
                return extended, held, set()
            cur = await conn.execute(
                "SELECT id FROM jobs WHERE id = ANY(%b) AND (cancel_requested_at IS NOT NULL OR state NOT IN (%s, %s))",
                (list({job_id for job_id, _ in held}), JobState.QUEUED, JobState.RUNNING),
            )
            return extended, held, {row[0] for row in await cur.fetchall()}

    extended, held, stopped = await retry_conflicts(attempt, "extending leases")
    return Beat(
        extended={(str(j), i) for j, i in extended},
        held={(str(j), i) for j, i in held},
        stopped_jobs={str(j) for j in stopped},
    )
