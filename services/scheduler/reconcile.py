"""What no Kafka message will bring: the reconciler's view of Postgres.

Three things make a scheduler look at Postgres instead of waiting for messages:
- it became the owner of partitions (start, rebalance, a broker that came back empty): every
  unfinished job on them is brought in line (split if queued, pending chunks dispatched again,
  retry timers set again, cancels that never arrived applied);
- a worker died: chunks whose lease expired are run again;
- time passed: jobs past their deadline fail.
It only finds the jobs; the state machine does the rest under the job's row lock.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from psycopg_pool import AsyncConnectionPool

from jobstream.config import Settings
from jobstream.db import broker_epoch
from jobstream.states import ChunkState, JobState
from jobstream.topics import broker_is_intact, ensure_topics
from services.scheduler.machine import JobWork

log = logging.getLogger(__name__)

# A cancel recorded in Postgres but not seen on jobs.control after this long is applied anyway.
CANCEL_GRACE_SECONDS = 5.0


class Reconciler:
    def __init__(self, settings: Settings, pool: AsyncConnectionPool) -> None:
        self._settings = settings
        self._pool = pool
        self._broker_epoch: int | None = None

    async def unfinished_jobs(self, partitions: Sequence[int]) -> list[uuid.UUID]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT id FROM jobs WHERE partition = ANY(%s) AND state IN (%s, %s) ORDER BY created_at",
                (list(partitions), JobState.QUEUED, JobState.RUNNING),
            )
            return [row[0] for row in await cur.fetchall()]

    async def sweep(self, partitions: Sequence[int]) -> dict[uuid.UUID, JobWork]:
        """Expired leases, passed deadlines and cancels that never arrived, on these partitions."""
        work: dict[uuid.UUID, JobWork] = {}
        if not partitions:
            return work
        owned = list(partitions)
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT c.job_id, c.idx, c.attempt, coalesce(c.worker_id, '') FROM chunks c"
                " JOIN jobs j ON j.id = c.job_id"
                " WHERE c.state = %s AND c.lease_expires_at < now() AND j.partition = ANY(%s) LIMIT 5000",
                (ChunkState.RUNNING, owned),
            )
            for job_id, idx, attempt, worker in await cur.fetchall():
                work.setdefault(job_id, JobWork()).expired.append((idx, attempt, worker))
            cur = await conn.execute(
                "SELECT id FROM jobs WHERE partition = ANY(%s) AND state IN (%s, %s) AND deadline_at < now()",
                (owned, JobState.QUEUED, JobState.RUNNING),
            )
            for (job_id,) in await cur.fetchall():
                work.setdefault(job_id, JobWork()).deadline = True
            cur = await conn.execute(
                "SELECT id FROM jobs WHERE partition = ANY(%s) AND state IN (%s, %s)"
                " AND cancel_requested_at < now() - make_interval(secs => %s)",
                (owned, JobState.QUEUED, JobState.RUNNING, CANCEL_GRACE_SECONDS),
            )
            for (job_id,) in await cur.fetchall():
                work.setdefault(job_id, JobWork()).cancel_reason = "cancelled"
        return work

    async def broker_wiped(self) -> bool:
        """True once per broker that came back empty, in every scheduler.

        The first scheduler to notice re-creates the topics and records a new broker epoch in
        Postgres; the others see the new epoch. Either way the caller reconciles what it owns.
        """
        if not await broker_is_intact(self._settings):
            log.warning("the broker lost its topics (came back empty?); re-creating them")
            await ensure_topics(self._settings)
            async with self._pool.connection() as conn:
                await conn.execute("INSERT INTO broker_epochs (detected_by) VALUES (%s)", (self._settings.worker_id,))
        epoch = await broker_epoch(self._pool)
        changed = self._broker_epoch is not None and epoch != self._broker_epoch
        self._broker_epoch = epoch
        return changed
