"""Concurrent Submits share transactions (group commit); each still gets exactly its own outcome."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any

import grpc
import psycopg
import pytest

from jobstream.v1 import jobstream_pb2 as pb
from jobstream.v1 import jobstream_pb2_grpc as pb_grpc
from tests.helpers import count_jobs, params, watch_all

if TYPE_CHECKING:
    from tests.helpers import Client
    from tests.stack import Stack

pytestmark = pytest.mark.e2e
Db = psycopg.AsyncConnection[Any]


async def _outcome(call: Any) -> str:
    """The job id, or the status code's name."""
    try:
        return str((await call).job.id)
    except grpc.aio.AioRpcError as err:
        return str(err.code().name)


async def test_concurrent_submits_each_make_their_own_job_and_every_job_runs(client: Client, db: Db) -> None:
    requests = [pb.SubmitRequest(kind="demo.sleep", params=params(chunks=1, ms=i % 5)) for i in range(60)]

    ids = await asyncio.gather(*(_outcome(client.Submit(r)) for r in requests))

    assert len(set(ids)) == 60, ids
    cur = await db.execute("SELECT count(*) FROM job_events WHERE job_id = ANY(%s) AND seq = 1", ([*ids],))
    assert (await cur.fetchone()) == (60,)
    ends = await asyncio.gather(*(watch_all(client, job_id) for job_id in ids))
    assert all(events[-1].type == pb.JOB_SUCCEEDED for events in ends)


async def test_one_idempotency_key_submitted_concurrently_makes_one_job(client: Client, db: Db) -> None:
    key = f"concurrent-{uuid.uuid4()}"
    same = pb.SubmitRequest(kind="demo.sleep", params=params(chunks=1, ms=0), idempotency_key=key)
    other = pb.SubmitRequest(kind="demo.sleep", params=params(chunks=2, ms=0), idempotency_key=key)

    outcomes = await asyncio.gather(*(_outcome(client.Submit(r)) for r in [same] * 20 + [other] * 20))

    cur = await db.execute("SELECT id::text FROM jobs WHERE idempotency_key = %s", (key,))
    (stored,) = [row[0] for row in await cur.fetchall()]
    # Whichever request stored the job, every copy of it gets that job, every other one is refused.
    winner = outcomes[:20] if outcomes[0] == stored else outcomes[20:]
    loser = outcomes[20:] if outcomes[0] == stored else outcomes[:20]
    assert winner == [stored] * 20, outcomes
    assert loser == ["ALREADY_EXISTS"] * 20, outcomes


async def test_a_batch_mixing_bad_keys_and_bad_requests_answers_every_call_on_its_own(
    stack: Stack, client: Client, db: Db
) -> None:
    good = pb.SubmitRequest(kind="demo.sleep", params=params(chunks=1, ms=0))
    bad = pb.SubmitRequest(kind="demo.sleep", params=params(chunks=0, ms=0))
    before = await count_jobs(db)
    async with stack.channel("jsk_0123456789abcdef_no-such-secret") as channel:
        anonymous = pb_grpc.JobServiceStub(channel)
        # Interleaved, so the calls that share a batch are of every sort.
        calls = [(client, good), (anonymous, good), (client, bad), (anonymous, bad)] * 10

        outcomes = await asyncio.gather(*(_outcome(stub.Submit(request)) for stub, request in calls))

    by_sort = [outcomes[i::4] for i in range(4)]
    assert len(set(by_sort[0])) == 10 and all(len(job_id) == 36 for job_id in by_sort[0]), outcomes
    # The key is checked before the request: a bad key with a bad request is still UNAUTHENTICATED.
    assert by_sort[1] == by_sort[3] == ["UNAUTHENTICATED"] * 10, outcomes
    assert by_sort[2] == ["INVALID_ARGUMENT"] * 10, outcomes
    assert await count_jobs(db) == before + 10
