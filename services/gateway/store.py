"""The gateway's reads and writes in Postgres.

The gateway writes only at Submit (job, first event, outbox message: one statement) and at Cancel
(the cancel request, the chunks that must never start, the outbox message: one transaction). Every
other state change belongs to the scheduler.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from jobstream import api_keys, topics
from jobstream.batching import Coalescer
from jobstream.bus.v1 import bus_pb2
from jobstream.db import retry_conflicts
from jobstream.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from jobstream.events import dumps, now_timestamp
from jobstream.states import ChunkState, JobState
from jobstream.topics import partition_of
from jobstream.v1 import jobstream_pb2 as pb

# Lists go to Postgres as binary parameters (%b): see jobstream.db.

JOB_COLUMNS = (
    "id, tenant_id, kind, params, options, deadline_at, state, total_chunks, done_chunks, failed_chunks,"
    " progress_message, result, error, last_seq, cancel_requested_at, created_at, started_at, finished_at"
)
JobRow = dict[str, Any]
# Stored events are read in pages of this many; a shorter page is the last.
EVENTS_PAGE = 500
Created = tuple[JobRow, bool]  # the job, and whether this call stored it
Owned = tuple[str, JobRow]  # the caller's tenant, and its job
KeyAndJob = tuple[api_keys.KeyRow | None, JobRow | None]  # an unrevoked key's row, and its tenant's job
Outcomes = list[Created | Exception | None]  # one per call or job of a batch; None while undecided


# A job, its first event, its input and the outbox message announcing it: one statement, so one
# round trip and no transaction block. A job whose idempotency key is taken gets no companions.
INSERT_JOBS = (
    "WITH new AS (SELECT * FROM unnest(%b::uuid[], %b::text[], %b::smallint[], %b::text[], %b::text[], %b::text[],"
    "   %b::float8[], %b::text[], %b::bytea[], %b::bytea[], %b::bytea[], %b::bytea[])"
    "   AS t(id, tenant_id, partition, kind, params, options, deadline, key, request_hash, queued, submitted, input)),"
    " stored AS (INSERT INTO jobs (id, tenant_id, partition, kind, params, options, deadline_at,"
    "   idempotency_key, request_hash, state, last_seq)"
    "   SELECT id, tenant_id, partition, kind, params::jsonb, options::jsonb,"
    "   now() + make_interval(secs => deadline), nullif(key, ''), request_hash, %s, 1 FROM new"
    "   ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING"
    f"  RETURNING {JOB_COLUMNS}),"
    " first_events AS (INSERT INTO job_events (job_id, seq, event)"
    "   SELECT id, 1, queued FROM stored JOIN new USING (id)),"
    " announced AS (INSERT INTO outbox (topic, key, value)"
    "   SELECT %s, convert_to(id::text, 'UTF8'), submitted FROM stored JOIN new USING (id)),"
    " inputs AS (INSERT INTO job_inputs (job_id, data)"
    "   SELECT id, input FROM stored JOIN new USING (id) WHERE input IS NOT NULL)"
    " SELECT * FROM stored"
)


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


Admit = Callable[[str], NewJob]  # the caller's tenant -> the job to store; raises why not


def _queued_event(job_id: str, time: Timestamp) -> bytes:
    return pb.JobEvent(
        job_id=job_id,
        seq=1,
        type=pb.JOB_QUEUED,
        state=pb.QUEUED,
        progress=pb.Progress(),
        time=time,
        message="job queued",
    ).SerializeToString()


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
        self._submits: Coalescer[tuple[str, Admit], Created] = Coalescer(self._submit_batch)
        self._tenants: Coalescer[str, str] = Coalescer(self._tenants_batch)
        # Every Watch starts with checking its key and reading its job, then the job's stored
        # events: a burst of new streams (clients reconnecting after a gateway restart) reads them
        # in a few statements instead of two each.
        self._jobs: Coalescer[tuple[str, uuid.UUID], Owned] = Coalescer(self._jobs_batch)
        self._events: Coalescer[tuple[uuid.UUID, int], list[bytes]] = Coalescer(self._events_batch, max_batch=100)

    async def submit(self, token: str, admit: Admit) -> Created:
        """Authenticates the call, admits its job and stores it; returns (row, created).

        `admit` turns the caller's tenant into the job to store, or raises why not; it runs only
        once the key is known good, so a bad key is refused before anything about the request.
        Concurrent calls share one key lookup and one insert (see jobstream.batching).

        With an idempotency key already used by this tenant, returns the existing job when the
        request is the same, and raises AlreadyExists when it differs.
        """
        return await self._submits((token, admit))

    async def tenant_of(self, token: str) -> str:
        return await self._tenants(token)

    async def _tenants_batch(self, tokens: list[str]) -> list[str | Exception]:
        async with self._pool.connection() as conn:
            return list(await api_keys.tenants_of(conn, tokens))

    async def _submit_batch(self, calls: list[tuple[str, Admit]]) -> list[Created | Exception]:
        outcomes: Outcomes = [None] * len(calls)
        admitted: dict[int, NewJob] = {}
        async with self._pool.connection() as conn:
            tenants = await api_keys.tenants_of(conn, [token for token, _ in calls])
            for i, ((_, admit), tenant) in enumerate(zip(calls, tenants, strict=True)):
                if isinstance(tenant, Exception):
                    outcomes[i] = tenant
                    continue
                try:
                    admitted[i] = admit(tenant)
                except Exception as err:  # this call's own refusal; the others go on
                    outcomes[i] = err
            if admitted:
                stored = await self._store_jobs(conn, list(admitted.values()))
                for i, outcome in zip(admitted, stored, strict=True):
                    outcomes[i] = outcome
        return [outcome for outcome in outcomes if outcome is not None]

    async def _store_jobs(self, conn: Any, jobs: list[NewJob]) -> list[Created | Exception]:
        """Stores a batch of jobs, each with its first event, input and outbox message; one
        outcome per job, in order: (row, created), or the error that job alone gets. A reused
        idempotency key is resolved before any quota is applied, so a retried Submit gets its job
        back even when the tenant is at its limit.

        No transaction block: each job and its companions go in one statement, and the reads
        around it would see no more inside a transaction (READ COMMITTED) than outside one.
        """
        hashes = [job.request_hash() for job in jobs]

        async def attempt() -> list[Created | Exception]:
            outcomes: Outcomes = [None] * len(jobs)
            async with conn.cursor(row_factory=dict_row) as cur:
                await self._resolve_keys(cur, jobs, hashes, outcomes)
                await self._refuse_over_quota(cur, jobs, outcomes)
                # Sorted by key, so two batches inserting the same keys wait in one order, never a cycle.
                pending = sorted(
                    (i for i, outcome in enumerate(outcomes) if outcome is None),
                    key=lambda i: (jobs[i].tenant_id, jobs[i].idempotency_key),
                )
                ids = {i: uuid.uuid4() for i in pending}
                rows = await self._insert_jobs(cur, [(ids[i], jobs[i], hashes[i]) for i in pending])
                for i in pending:
                    if ids[i] in rows:
                        outcomes[i] = (rows[ids[i]], True)
                # The key was taken by an earlier job of this batch or by another gateway just now.
                await self._resolve_keys(cur, jobs, hashes, outcomes)
            return [
                AlreadyExists(f"idempotency_key {jobs[i].idempotency_key!r} is in use; submit again")
                if outcome is None
                else outcome
                for i, outcome in enumerate(outcomes)
            ]

        return await retry_conflicts(attempt, f"storing {len(jobs)} submitted jobs")

    async def _resolve_keys(self, cur: Any, jobs: list[NewJob], hashes: list[bytes], outcomes: Outcomes) -> None:
        """Settles the undecided jobs whose (tenant, idempotency key) a stored job already has."""
        keyed = [i for i, job in enumerate(jobs) if outcomes[i] is None and job.idempotency_key]
        if not keyed:
            return
        await cur.execute(
            f"SELECT {JOB_COLUMNS}, idempotency_key, request_hash FROM jobs"
            " WHERE (tenant_id, idempotency_key) IN (SELECT * FROM unnest(%b::text[], %b::text[]))",
            ([jobs[i].tenant_id for i in keyed], [jobs[i].idempotency_key for i in keyed]),
        )
        found = {(row["tenant_id"], row["idempotency_key"]): row for row in await cur.fetchall()}
        for i in keyed:
            row = found.get((jobs[i].tenant_id, jobs[i].idempotency_key))
            if row is None:
                continue
            if bytes(row["request_hash"]) != hashes[i]:
                outcomes[i] = AlreadyExists(
                    f"idempotency_key {jobs[i].idempotency_key!r} was already used for job {row['id']}"
                    " with a different request"
                )
            else:
                outcomes[i] = ({k: v for k, v in row.items() if k not in ("idempotency_key", "request_hash")}, False)

    async def _refuse_over_quota(self, cur: Any, jobs: list[NewJob], outcomes: Outcomes) -> None:
        """Refuses the new jobs that would take their tenant over its quota of jobs queued or
        running at once, in arrival order."""
        if self._max_unfinished <= 0:
            return
        pending = [i for i, outcome in enumerate(outcomes) if outcome is None]
        tenants = sorted({jobs[i].tenant_id for i in pending})
        if not tenants:
            return
        await cur.execute(
            "SELECT tenant_id, count(*) AS n FROM jobs WHERE tenant_id = ANY(%b) AND state IN (%s, %s)"
            " GROUP BY tenant_id",
            (tenants, JobState.QUEUED, JobState.RUNNING),
        )
        room = dict.fromkeys(tenants, self._max_unfinished)
        for row in await cur.fetchall():
            room[row["tenant_id"]] -= row["n"]
        for i in pending:
            tenant = jobs[i].tenant_id
            if room[tenant] > 0:
                room[tenant] -= 1
            else:
                outcomes[i] = ResourceExhausted(
                    f"tenant {tenant}: {self._max_unfinished} jobs are queued or running, the most allowed;"
                    " retry when one finishes",
                    retry_after_seconds=1.0,
                )

    async def _insert_jobs(self, cur: Any, new: list[tuple[uuid.UUID, NewJob, bytes]]) -> dict[uuid.UUID, JobRow]:
        """Inserts the jobs with their companions in one statement; returns the stored ones by id
        (a job whose key is taken is not stored, nor are its companions)."""
        if not new:
            return {}
        time = now_timestamp()
        ids = [str(job_id) for job_id, _, _ in new]  # each job's id, as its messages carry it
        await cur.execute(
            INSERT_JOBS,
            (
                [job_id for job_id, _, _ in new],
                [job.tenant_id for _, job, _ in new],
                [partition_of(job_id, self._partitions) for job_id in ids],
                [job.kind for _, job, _ in new],
                [json.dumps(job.params) for _, job, _ in new],
                [json.dumps(job.options) for _, job, _ in new],
                [job.options.get("deadline_seconds") for _, job, _ in new],
                [job.idempotency_key for _, job, _ in new],
                [request_hash for _, _, request_hash in new],
                [_queued_event(job_id, time) for job_id in ids],
                [
                    bus_pb2.JobSubmitted(job_id=job_id, tenant_id=job.tenant_id).SerializeToString()
                    for job_id, (_, job, _) in zip(ids, new, strict=True)
                ],
                [job.data or None for _, job, _ in new],
                JobState.QUEUED,
                topics.SUBMITTED,
            ),
        )
        return {row["id"]: row for row in await cur.fetchall()}

    async def job_for(self, token: str, job_id: uuid.UUID) -> Owned:
        """Authenticates the call and reads its job in one statement: (tenant, job row).

        The key is checked first, so a bad key gets Unauthenticated whether or not the job exists;
        another tenant's job is NotFound, as if it did not exist.
        """
        return await self._jobs((token, job_id))

    async def _jobs_batch(self, calls: list[tuple[str, uuid.UUID]]) -> list[Owned | Exception]:
        parsed = api_keys.parse_tokens([token for token, _ in calls])
        asked = [(p[0], job_id) for p, (_, job_id) in zip(parsed, calls, strict=True) if isinstance(p, tuple)]
        found: dict[tuple[str, uuid.UUID], KeyAndJob] = {}  # by (key id, job id) asked
        if asked:  # malformed tokens alone cost no query
            async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(
                    "SELECT r.key_id, r.wanted, k.tenant_id AS key_tenant, k.secret_sha256, j.*"
                    " FROM unnest(%b::text[], %b::uuid[]) AS r(key_id, wanted)"
                    " JOIN api_keys k ON k.id = r.key_id AND k.revoked_at IS NULL"
                    f" LEFT JOIN LATERAL (SELECT {JOB_COLUMNS} FROM jobs"
                    "   WHERE id = r.wanted AND tenant_id = k.tenant_id) j ON true",
                    ([key_id for key_id, _ in asked], [job_id for _, job_id in asked]),
                )
                for row in await cur.fetchall():
                    asked_for = (row.pop("key_id"), row.pop("wanted"))
                    key_row = (row.pop("key_tenant"), bytes(row.pop("secret_sha256")))
                    found[asked_for] = (key_row, row if row["id"] is not None else None)
        outcomes: list[Owned | Exception] = []
        nothing: KeyAndJob = (None, None)
        for p, (_, job_id) in zip(parsed, calls, strict=True):
            key, job = found.get((p[0], job_id), nothing) if isinstance(p, tuple) else nothing
            tenant = api_keys.verify(p, key)
            if isinstance(tenant, Exception):
                outcomes.append(tenant)
            elif job is None:
                outcomes.append(NotFound(f"job {job_id} not found"))
            else:
                outcomes.append((tenant, job))
        return outcomes

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

    async def events_after(self, job_id: uuid.UUID, after_seq: int) -> list[bytes]:
        """The job's stored events after `after_seq`, at most EVENTS_PAGE of them."""
        return await self._events((job_id, after_seq))

    async def _events_batch(self, keys: list[tuple[uuid.UUID, int]]) -> list[list[bytes] | Exception]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT w.i, e.event FROM unnest(%b::uuid[], %b::int8[]) WITH ORDINALITY AS w(job_id, after_seq, i)"
                " CROSS JOIN LATERAL (SELECT seq, event FROM job_events"
                "   WHERE job_id = w.job_id AND seq > w.after_seq ORDER BY seq LIMIT %s) e"
                " ORDER BY w.i, e.seq",
                ([job_id for job_id, _ in keys], [after for _, after in keys], EVENTS_PAGE),
            )
            pages: list[list[bytes]] = [[] for _ in keys]
            for i, event in await cur.fetchall():
                pages[i - 1].append(bytes(event))
        return [*pages]

    async def last_seqs(self, job_ids: list[uuid.UUID]) -> dict[str, int]:
        async with self._pool.connection() as conn:
            cur = await conn.execute("SELECT id, last_seq FROM jobs WHERE id = ANY(%b)", (job_ids,))
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
