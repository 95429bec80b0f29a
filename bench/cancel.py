"""Scenario 6: Cancel latency on jobs whose chunks sleep 1 s, from Cancel returning to the last
running chunk stopping and to the CANCELLED event arriving.

A chunk's stop is the time the scheduler recorded the worker's report that it stopped
(chunks.finished_at): a little after the chunk stopped, so the figure errs high, never low.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import psycopg

from bench.client import Stub, channel, submit
from bench.client import stub as make_stub
from bench.sizes import Sizes
from bench.stack import BenchStack
from bench.stats import Run, latencies_ms
from jobstream.states import ChunkState
from jobstream.v1 import jobstream_pb2 as pb

CHUNK_MS = 1000


async def run(stack: BenchStack, sizes: Sizes, repeat: int) -> list[Run]:
    runs = []
    async with (
        channel(stack.gateway_addr, stack.token) as ch,
        await psycopg.AsyncConnection.connect(stack.database_url, autocommit=True) as db,
    ):
        stub = make_stub(ch)
        for _ in range(repeat):
            to_event: list[float] = []
            to_stop: list[float] = []
            missed = 0
            while len(to_event) < sizes.cancel_jobs:
                outcome = await _one(stub, db, sizes.cancel_chunks)
                if outcome is None:
                    missed += 1
                    if missed > sizes.cancel_jobs:
                        raise RuntimeError(f"{missed} jobs ended before their cancel took effect")
                    continue
                event_s, stop_s = outcome
                to_event.append(event_s)
                if stop_s is not None:
                    to_stop.append(stop_s)
            latencies = {**latencies_ms("event", to_event), **latencies_ms("chunks_stopped", to_stop)}
            runs.append({**latencies, "ended_before_cancel": float(missed)})
    return runs


async def _one(
    stub: Stub, db: psycopg.AsyncConnection[tuple[object, ...]], chunks: int
) -> tuple[float, float | None] | None:
    """Seconds from Cancel returning to the CANCELLED event and to the last running chunk's stop;
    None when the job ended some other way first (its progress event arrived too late)."""
    job_id = await submit(stub, chunks=chunks, ms=CHUNK_MS)
    stream = stub.Watch(pb.WatchRequest(job_id=job_id))
    cancelled_at = 0.0
    async for event in stream:
        if event.type == pb.JOB_PROGRESS and not cancelled_at:
            # Chunks are running: they report progress after their first quarter second.
            await stub.Cancel(pb.CancelRequest(job_id=job_id, reason="bench"))
            cancelled_at = time.time()
        elif event.type == pb.JOB_CANCELLED:
            event_s = time.time() - cancelled_at
            break
    else:
        return None
    return event_s, await _last_stop(db, uuid.UUID(job_id), cancelled_at)


async def _last_stop(db: psycopg.AsyncConnection[tuple[object, ...]], job_id: uuid.UUID, since: float) -> float | None:
    """Seconds from `since` to the last interrupted chunk's recorded stop; None if none was running."""
    deadline = time.monotonic() + 30
    while True:
        cur = await db.execute(
            "SELECT count(*) FILTER (WHERE state = %s),"
            " extract(epoch FROM max(finished_at) FILTER (WHERE state = %s AND claimed_at IS NOT NULL))"
            " FROM chunks WHERE job_id = %s",
            (ChunkState.RUNNING, ChunkState.CANCELLED, job_id),
        )
        row = await cur.fetchone()
        assert row is not None
        running, last = row
        if running == 0:
            return None if last is None else float(str(last)) - since
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id}: {running} chunks still running 30 s after cancel")
        await asyncio.sleep(0.05)
