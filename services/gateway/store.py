"""The gateway's reads and writes in Postgres.

The gateway writes only at Submit (job, first event, outbox message: one transaction) and at Cancel
(the cancel request, the chunks that must never start, the outbox message: one transaction). Every
other state change belongs to the scheduler.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from jobstream import api_keys, topics
from jobstream.bus.v1 import bus_pb2
from jobstream.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from jobstream.events import dumps, now_timestamp
from jobstream.states import ChunkState, JobState
from jobstream.topics import partition_of
from jobstream.v1 import jobstream_pb2 as pb

JOB_COLUMNS = (
    "id, tenant_id, kind, params, options, deadline_at, state, total_chunks, done_chunks, failed_chunks,"
    " progress_message, result, error, last_seq, cancel_requested_at, created_at, started_at, finished_at"
)
JobRow = dict[str, Any]


@dataclass(frozen=True)
class NewJob:
    tenant_id: str
    kind: str
    params: dict[str, Any]
    data: bytes
    idempotency_key: str
    options: dict[str, Any]

    def request_hash(self) -> bytes:
        digest = hashlib.sha256()
        for part in (self.kind, dumps(self.params), dumps(self.options)):
            digest.update(part.encode())
            digest.update(b"\0")
        digest.update(self.data)
        return digest.digest()


def parse_job_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise InvalidArgument(f"job_id: {raw[:80]!r} is not a job id (a UUID)", field="job_id") from None


class JobStore:
    def __init__(self, pool: AsyncConnectionPool, job_partitions: int, max_unfinished: int = 0) -> None:
        self._pool = pool
        self._partitions = job_partitions
        self._max_unfinished = max_unfinished  # per tenant; 0 = no limit

    async def create(self, job: NewJob) -> tuple[JobRow, bool]:
        """Stores the job with its first event and its outbox message; returns (row, created).

        With an idempotency key already used by this tenant, returns the existing job when the
        request is the same, and raises AlreadyExists when it differs.
        """
        job_id = uuid.uuid4()
        request_hash = job.request_hash()
        key = job.idempotency_key or None
        queued = pb.JobEvent(
            job_id=str(job_id),
            seq=1,
            type=pb.JOB_QUEUED,
            state=pb.QUEUED,
            progress=pb.Progress(),
            time=now_timestamp(),
            message="job queued",
        )
        submitted = bus_pb2.JobSubmitted(job_id=str(job_id), tenant_id=job.tenant_id)
        async with (
            self._pool.connection() as conn,
            conn.transaction(),
            conn.cursor(row_factory=dict_row) as cur,
        ):
            await cur.execute(
                "INSERT INTO jobs (id, tenant_id, partition, kind, params, options, deadline_at,"
                " idempotency_key, request_hash, state, last_seq)"
                " VALUES (%s, %s, %s, %s, %s, %s, now() + make_interval(secs => %s), %s, %s, %s, 1)"
                " ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING"
                f" RETURNING {JOB_COLUMNS}",
                (
                    job_id,
                    job.tenant_id,
                    partition_of(str(job_id), self._partitions),
                    job.kind,
                    json.dumps(job.params),
                    json.dumps(job.options),
                    job.options.get("deadline_seconds"),
                    key,
                    request_hash,
                    JobState.QUEUED,
                ),
            )
            row = await cur.fetchone()
            if row is None:
                return await self._existing(cur, job.tenant_id, key, request_hash), False
            await self._check_unfinished(cur, job.tenant_id)
            if job.data:
                await cur.execute("INSERT INTO job_inputs (job_id, data) VALUES (%s, %s)", (job_id, job.data))
            await cur.execute(
                "INSERT INTO job_events (job_id, seq, event) VALUES (%s, 1, %s)",
                (job_id, queued.SerializeToString()),
            )
            await cur.execute(
                "INSERT INTO outbox (topic, key, value) VALUES (%s, %s, %s)",
                (topics.SUBMITTED, str(job_id).encode(), submitted.SerializeToString()),
            )
        return row, True

    async def _check_unfinished(self, cur: Any, tenant_id: str) -> None:
        """Refuses the job just inserted (its transaction rolls back) if it takes the tenant over
        its quota of jobs queued or running at once."""
        if self._max_unfinished <= 0:
            return
        await cur.execute(
            "SELECT count(*) AS n FROM jobs WHERE tenant_id = %s AND state IN (%s, %s)",
            (tenant_id, JobState.QUEUED, JobState.RUNNING),
        )
        row = await cur.fetchone()
        if row is not None and row["n"] > self._max_unfinished:
            raise ResourceExhausted(
                f"tenant {tenant_id}: {self._max_unfinished} jobs are queued or running, the most allowed;"
                " retry when one finishes",
                retry_after_seconds=1.0,
            )

    async def _existing(self, cur: Any, tenant_id: str, key: str | None, request_hash: bytes) -> JobRow:
        await cur.execute(
            f"SELECT {JOB_COLUMNS}, request_hash FROM jobs WHERE tenant_id = %s AND idempotency_key = %s",
            (tenant_id, key),
        )
        row: JobRow | None = await cur.fetchone()
        if row is None:  # the conflicting job was deleted between the two statements
            raise AlreadyExists(f"idempotency_key {key!r} is in use; submit again")
        if bytes(row.pop("request_hash")) != request_hash:
            raise AlreadyExists(
                f"idempotency_key {key!r} was already used for job {row['id']} with a different request"
            )
        return row

    async def tenant_of(self, token: str) -> str:
        async with self._pool.connection() as conn:
            return await api_keys.tenant_of(conn, token)

    async def get(self, tenant_id: str, job_id: uuid.UUID) -> JobRow:
        async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = %s AND tenant_id = %s", (job_id, tenant_id))
            row: JobRow | None = await cur.fetchone()
        if row is None:
            raise NotFound(f"job {job_id} not found")
        return row

    async def request_cancel(self, tenant_id: str, job_id: uuid.UUID, reason: str) -> JobRow:
        """Records the cancel and marks every pending chunk cancelled, in one transaction.

        A worker claims a chunk by moving it from pending to running under its row lock, so each
        chunk was either claimed before this commits (it is running and gets interrupted) or can
        never be claimed: no chunk starts after Cancel returns.
        """
        control = bus_pb2.JobControl(job_id=str(job_id), type=bus_pb2.CANCEL, reason=reason, time=now_timestamp())
        async with (
            self._pool.connection() as conn,
            conn.transaction(),
            conn.cursor(row_factory=dict_row) as cur,
        ):
            await cur.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = %s AND tenant_id = %s FOR UPDATE",
                (job_id, tenant_id),
            )
            row: JobRow | None = await cur.fetchone()
            if row is None:
                raise NotFound(f"job {job_id} not found")
            if JobState(row["state"]).terminal or row["cancel_requested_at"] is not None:
                return row
            await cur.execute(
                "UPDATE jobs SET cancel_requested_at = now(), cancel_reason = %s WHERE id = %s"
                f" RETURNING {JOB_COLUMNS}",
                (reason, job_id),
            )
            updated: JobRow | None = await cur.fetchone()
            assert updated is not None
            await cur.execute(
                "UPDATE chunks SET state = %s, finished_at = now() WHERE job_id = %s AND state = %s",
                (ChunkState.CANCELLED, job_id, ChunkState.PENDING),
            )
            await cur.execute(
                "INSERT INTO outbox (topic, key, value) VALUES (%s, %s, %s)",
                (topics.CONTROL, str(job_id).encode(), control.SerializeToString()),
            )
        return updated

    async def list_jobs(
        self, tenant_id: str, *, page_size: int, page_token: str, state: int, kind: str
    ) -> tuple[list[JobRow], str]:
        """Newest first, paged by (created_at, id) so pages stay stable while jobs are added."""
        where = ["tenant_id = %s"]
        args: list[Any] = [tenant_id]
        if state:
            where.append("state = %s")
            args.append(state)
        if kind:
            where.append("kind = %s")
            args.append(kind)
        if page_token:
            created_at, last_id = decode_page_token(page_token)
            where.append("(created_at, id) < (%s, %s)")
            args += [created_at, last_id]
        args.append(page_size + 1)
        async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE {' AND '.join(where)}"
                " ORDER BY created_at DESC, id DESC LIMIT %s",
                args,
            )
            rows: list[JobRow] = await cur.fetchall()
        if len(rows) <= page_size:
            return rows, ""
        rows = rows[:page_size]
        return rows, encode_page_token(rows[-1]["created_at"], rows[-1]["id"])

    async def events_after(self, job_id: uuid.UUID, after_seq: int, limit: int = 500) -> list[bytes]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT event FROM job_events WHERE job_id = %s AND seq > %s ORDER BY seq LIMIT %s",
                (job_id, after_seq, limit),
            )
            return [bytes(row[0]) for row in await cur.fetchall()]

    async def last_seqs(self, job_ids: list[uuid.UUID]) -> dict[str, int]:
        async with self._pool.connection() as conn:
            cur = await conn.execute("SELECT id, last_seq FROM jobs WHERE id = ANY(%s)", (job_ids,))
            return {str(row[0]): int(row[1]) for row in await cur.fetchall()}


def encode_page_token(created_at: dt.datetime, job_id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(job_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str) -> tuple[dt.datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        created_at, job_id = json.loads(raw)
        return dt.datetime.fromisoformat(created_at), uuid.UUID(job_id)
    except (ValueError, TypeError, UnicodeDecodeError):
        raise InvalidArgument("page_token: not a token from a previous ListJobs", field="page_token") from None
