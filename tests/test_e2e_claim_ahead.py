"""A worker claims ahead of its free slots once its chunks run short, runs no more than its
slots, hands unstarted chunks back at once when it stops, and stops them on Cancel."""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from jobstream.states import ChunkState
from jobstream.v1 import jobstream_pb2 as pb
from tests.conftest import running_stack
from tests.helpers import assert_contiguous, read_rest, scrape, submit, wait_for, watch_all, watch_until
from tests.stack import Stack

if TYPE_CHECKING:
    from tests.helpers import Client

pytestmark = pytest.mark.e2e
Db = psycopg.AsyncConnection[tuple[Any, ...]]
SLOTS = 2
PREFETCH = 3
WORKER = "worker-1"


@pytest.fixture(scope="module")
async def own(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with running_stack(
        tmp_path_factory.mktemp("claim-ahead"),
        workers=1,
        JOBSTREAM_WORKER_CONCURRENCY=str(SLOTS),
        JOBSTREAM_WORKER_PREFETCH=str(PREFETCH),
        JOBSTREAM_DRAIN_SECONDS="30",
        # No heartbeat within a test: a cancel reaches the worker through jobs.control or not at all
        # (the heartbeat would otherwise learn of it within 3 s and hide a lost stop).
        JOBSTREAM_LEASE_SECONDS="180",
        JOBSTREAM_HEARTBEAT_SECONDS="60",
    ) as stack:
        yield stack


async def gauges(stack: Stack) -> dict[str, float]:
    """The worker's chunks_in_flight and chunks_claimed_waiting."""
    text = await scrape(stack, WORKER)
    found = re.findall(r"^jobstream_worker_chunks_(in_flight|claimed_waiting) ([0-9.e+-]+)$", text, re.MULTILINE)
    return {name: float(value) for name, value in found}


async def chunk_states(db: Db, job_id: str) -> dict[tuple[int, int], int]:
    """(state, attempt) -> how many chunks of the job are in it."""
    cur = await db.execute(
        "SELECT state, attempt, count(*) FROM chunks WHERE job_id = %s GROUP BY state, attempt", (job_id,)
    )
    return {(state, attempt): count for state, attempt, count in await cur.fetchall()}


async def short_chunks_ran(client: Client) -> None:
    """Chunks of no time at all: the worker learns its chunks are short and claims ahead."""
    job = await submit(client, "demo.sleep", chunks=4 * (SLOTS + PREFETCH), ms=0)
    assert (await watch_all(client, job.id))[-1].type == pb.JOB_SUCCEEDED


async def holds_a_full_window(db: Db, stack: Stack, job_id: str) -> None:
    async def full() -> bool:
        states = await chunk_states(db, job_id)
        return states.get((ChunkState.RUNNING, 1)) == SLOTS + PREFETCH and await gauges(stack) == {
            "in_flight": SLOTS,
            "claimed_waiting": PREFETCH,
        }

    await wait_for(full, what=f"{SLOTS} chunks running and {PREFETCH} claimed ahead")


async def test_a_worker_claims_ahead_but_runs_no_more_chunks_than_its_slots(
    own: Stack, own_client: Client, own_db: Db
) -> None:
    await short_chunks_ran(own_client)
    job = await submit(own_client, "demo.sleep", chunks=SLOTS + PREFETCH + 1, ms=1500)
    stream, events = await watch_until(own_client, job.id, lambda e: e.type == pb.JOB_STARTED)
    await holds_a_full_window(own_db, own, job.id)

    # Now that its chunks take 1.5 s, the worker claims no further ahead than its slots.
    async def done() -> bool:
        assert (await gauges(own))["in_flight"] <= SLOTS
        return (await chunk_states(own_db, job.id)).get((ChunkState.SUCCEEDED, 1)) == SLOTS + PREFETCH + 1

    await wait_for(done, within=60, what="every chunk to succeed")
    events += await read_rest(stream, job.id)
    assert_contiguous(events)
    assert events[-1].type == pb.JOB_SUCCEEDED
    cur = await own_db.execute("SELECT max(claims) FROM chunks WHERE job_id = %s", (job.id,))
    assert await cur.fetchone() == (1,)


async def test_cancel_stops_the_chunks_a_worker_claimed_ahead(own: Stack, own_client: Client, own_db: Db) -> None:
    await short_chunks_ran(own_client)
    job = await submit(own_client, "demo.sleep", chunks=SLOTS + PREFETCH, ms=20_000)
    stream, events = await watch_until(own_client, job.id, lambda e: e.type == pb.JOB_STARTED)
    await holds_a_full_window(own_db, own, job.id)

    await own_client.Cancel(pb.CancelRequest(job_id=job.id))
    events += await read_rest(stream, job.id)

    assert events[-1].type == pb.JOB_CANCELLED
    # Running or claimed ahead, each chunk reports itself cancelled; none ran out its 20 s.
    await wait_for(
        lambda: _equals(chunk_states(own_db, job.id), {(ChunkState.CANCELLED, 1): SLOTS + PREFETCH}),
        within=15,
        what="every chunk recorded cancelled",
    )
    assert await gauges(own) == {"in_flight": 0, "claimed_waiting": 0}


async def test_a_stopping_worker_hands_back_unstarted_chunks_before_it_drains(
    own: Stack, own_client: Client, own_db: Db
) -> None:
    await short_chunks_ran(own_client)
    job = await submit(own_client, "demo.sleep", chunks=SLOTS + PREFETCH, ms=4000)
    stream, events = await watch_until(own_client, job.id, lambda e: e.type == pb.JOB_STARTED)
    await holds_a_full_window(own_db, own, job.id)

    worker = own.services[WORKER]
    worker.send_signal(signal.SIGTERM)
    # The chunks that never started are dispatched again while the started ones still run.
    await wait_for(
        lambda: _equals(
            chunk_states(own_db, job.id), {(ChunkState.RUNNING, 1): SLOTS, (ChunkState.PENDING, 2): PREFETCH}
        ),
        what="the unstarted chunks handed back while the started ones run",
    )
    assert await asyncio.to_thread(worker.wait, 30) == 0
    own.start_worker(WORKER)
    events += await read_rest(stream, job.id)

    assert_contiguous(events)
    assert events[-1].type == pb.JOB_SUCCEEDED
    cur = await own_db.execute(
        "SELECT attempt, claims, failures, count(*) FROM chunks WHERE job_id = %s GROUP BY 1, 2, 3 ORDER BY 1",
        (job.id,),
    )
    assert await cur.fetchall() == [(1, 1, 0, SLOTS), (2, 2, 0, PREFETCH)]


async def _equals(value: Any, expected: object) -> bool:
    return bool(await value == expected)
