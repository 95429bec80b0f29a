"""The chaos suite: jobs keep every promise while workers, the scheduler, the gateway and the
broker die at random moments.

30 jobs of 20 chunks run on 3 workers. At seeded random moments the suite SIGKILLs a worker and
starts a new one (three times), SIGKILLs and restarts the scheduler and the gateway, and restarts the
broker empty. Every job is watched by a client that resumes with after_seq whenever its stream
breaks. JOBSTREAM_CHAOS_SEED replays a run.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import psycopg
import pytest

from jobstream.events import from_struct, is_terminal
from jobstream.v1 import jobstream_pb2 as pb
from jobstream.v1 import jobstream_pb2_grpc as pb_grpc
from tests.conftest import Record, running_stack
from tests.helpers import assert_contiguous, params, wait_for
from tests.stack import Stack

pytestmark = pytest.mark.e2e

JOBS = 30
CHUNKS = 20
SEED = int(os.environ.get("JOBSTREAM_CHAOS_SEED", "0")) or random.randrange(1, 10**6)
RESUMABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
Db = psycopg.AsyncConnection[tuple[Any, ...]]


@pytest.fixture(scope="module")
async def chaos_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with running_stack(
        tmp_path_factory.mktemp("chaos"),
        workers=3,
        JOBSTREAM_LEASE_SECONDS="3",
        JOBSTREAM_HEARTBEAT_SECONDS="1",
        JOBSTREAM_DRAIN_SECONDS="2",
    ) as stack:
        yield stack


async def watch_resuming(stack: Stack, job_id: str, seen: list[pb.JobEvent], resumes: list[int]) -> None:
    """Watches until the terminal event, resuming after the last seq seen whenever the stream breaks."""
    while True:
        try:
            async with stack.channel() as channel:
                stream = pb_grpc.JobServiceStub(channel).Watch(
                    pb.WatchRequest(job_id=job_id, after_seq=seen[-1].seq if seen else 0)
                )
                async for event in stream:
                    seen.append(event)
                    if is_terminal(event):
                        return
        except grpc.aio.AioRpcError as err:
            if err.code() not in RESUMABLE:
                raise
        resumes.append(seen[-1].seq if seen else 0)
        await asyncio.sleep(0.2)


class Chaos:
    """Kills processes and measures how long the system takes to notice and recover."""

    def __init__(self, stack: Stack, db: Db, rng: random.Random) -> None:
        self.stack = stack
        self.db = db
        self.rng = rng
        self.next_worker = 4
        self.handover_s: list[float] = []
        self.broker_recovery_s: float | None = None
        self.log: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def kill_worker(self) -> None:
        """Kills a worker that holds chunks right now (any worker if none does)."""
        alive = self.stack.workers()
        cur = await self.db.execute(
            "SELECT worker_id FROM chunks WHERE state = 1 AND worker_id = ANY(%s) GROUP BY worker_id", (alive,)
        )
        busy = sorted(row[0] for row in await cur.fetchall())
        victim = self.rng.choice(busy or alive)
        cur = await self.db.execute("SELECT job_id, idx FROM chunks WHERE state = 1 AND worker_id = %s", (victim,))
        held = [(str(j), i) for j, i in await cur.fetchall()]
        self.stack.services[victim].kill()
        killed_at = time.monotonic()
        self.stack.start_worker(f"worker-{self.next_worker}")
        self.next_worker += 1
        self.log.append(f"killed {victim} holding {len(held)} chunks")
        self.tasks.append(asyncio.create_task(self._measure_handover(victim, held, killed_at)))

    async def _measure_handover(self, victim: str, held: list[tuple[str, int]], killed_at: float) -> None:
        waiting = set(held)
        async with await psycopg.AsyncConnection.connect(self.stack.database_url, autocommit=True) as db:
            while waiting and time.monotonic() - killed_at < 120:
                cur = await db.execute(
                    "SELECT c.job_id::text, c.idx FROM chunks c"
                    " JOIN unnest(%s::uuid[], %s::int[]) AS w(job_id, idx) ON c.job_id = w.job_id AND c.idx = w.idx"
                    " WHERE c.state IN (1, 2) AND c.worker_id IS DISTINCT FROM %s",
                    ([j for j, _ in waiting], [i for _, i in waiting], victim),
                )
                for moved in await cur.fetchall():
                    waiting.discard((moved[0], moved[1]))
                    self.handover_s.append(time.monotonic() - killed_at)
                await asyncio.sleep(0.1)  # the polling pace of the measurement

    async def kill_scheduler(self) -> None:
        self.stack.services["scheduler"].kill()
        self.stack.start_service("scheduler", "services.scheduler")
        self.log.append("killed and restarted the scheduler")

    async def kill_gateway(self) -> None:
        self.stack.services["gateway"].kill()
        self.stack.start_service("gateway", "services.gateway")
        self.log.append("killed and restarted the gateway")

    async def wipe_broker(self) -> None:
        before = await self._last_seqs()
        # In this thread: a child's parent-death signal is tied to the thread that forked it.
        self.stack.broker.restart()
        restarted_at = time.monotonic()
        self.log.append(f"restarted the broker empty with {len(before)} jobs unfinished")
        self.tasks.append(asyncio.create_task(self._measure_broker_recovery(before, restarted_at)))

    async def _last_seqs(self) -> dict[str, int]:
        cur = await self.db.execute("SELECT id, last_seq FROM jobs WHERE state IN (1, 2)")
        return {str(j): s for j, s in await cur.fetchall()}

    async def _measure_broker_recovery(self, before: dict[str, int], restarted_at: float) -> None:
        async with await psycopg.AsyncConnection.connect(self.stack.database_url, autocommit=True) as db:
            while time.monotonic() - restarted_at < 120:
                cur = await db.execute("SELECT id, last_seq FROM jobs WHERE id = ANY(%s)", (list(before),))
                if all(seq > before[str(j)] for j, seq in await cur.fetchall()):
                    self.broker_recovery_s = time.monotonic() - restarted_at
                    return
                await asyncio.sleep(0.1)


async def test_chaos_every_job_succeeds_exactly_once_with_gapless_streams(chaos_stack: Stack, figures: Record) -> None:
    rng = random.Random(SEED)
    stack = chaos_stack
    async with (
        stack.channel() as channel,
        await psycopg.AsyncConnection.connect(stack.database_url, autocommit=True) as db,
    ):
        client = pb_grpc.JobServiceStub(channel)
        jobs = [
            (
                await client.Submit(
                    pb.SubmitRequest(kind="demo.sleep", params=params(chunks=CHUNKS, ms=rng.randint(500, 1000)))
                )
            ).job.id
            for _ in range(JOBS)
        ]
        seen: dict[str, list[pb.JobEvent]] = {job_id: [] for job_id in jobs}
        resumes: list[int] = []
        watchers = [asyncio.create_task(watch_resuming(stack, j, seen[j], resumes)) for j in jobs]

        chaos = Chaos(stack, db, rng)
        actions = [
            chaos.kill_worker,
            chaos.kill_worker,
            chaos.kill_worker,
            chaos.kill_scheduler,
            chaos.kill_gateway,
            chaos.wipe_broker,
        ]
        rng.shuffle(actions)
        await wait_for(lambda: _chunks_running(db), what="chunks to start running")
        for action in actions:
            await asyncio.sleep(rng.uniform(1.0, 3.0))
            await action()

        try:
            await asyncio.wait_for(
                asyncio.gather(*watchers), timeout=float(os.environ.get("JOBSTREAM_CHAOS_TIMEOUT", "240"))
            )
        except TimeoutError:
            raise AssertionError(await _diagnose(stack, db, chaos, seen)) from None

        cur = await db.execute(
            "SELECT j.id, j.state, j.done_chunks, j.result, count(c.*) FILTER (WHERE c.state = 2),"
            " count(c.*) FILTER (WHERE c.claims > 1), sum(c.claims) FROM jobs j JOIN chunks c ON c.job_id = j.id"
            " WHERE j.id = ANY(%s) GROUP BY j.id",
            (jobs,),
        )
        rows = {str(r[0]): r[1:] for r in await cur.fetchall()}

    summary = f"chaos seed {SEED}: " + "; ".join(chaos.log)
    for job_id in jobs:
        events = seen[job_id]
        assert_contiguous(events)
        assert events[-1].type == pb.JOB_SUCCEEDED, f"{summary}\njob {job_id}: {events[-1]}"
        assert from_struct(events[-1].result) == {"chunks": CHUNKS}
        state, done, result, succeeded_chunks, _, _ = rows[job_id]
        assert (state, done, result, succeeded_chunks) == (pb.SUCCEEDED, CHUNKS, {"chunks": CHUNKS}, CHUNKS)
    reran = sum(r[4] for r in rows.values())
    claims = sum(r[5] for r in rows.values())
    handover = sorted(chaos.handover_s)
    figures(summary)
    figures(
        json.dumps(
            {
                "chaos_seed": SEED,
                "worker_kill_to_chunks_running_elsewhere_s": {
                    "p50": round(statistics.median(handover), 2) if handover else None,
                    "max": round(handover[-1], 2) if handover else None,
                    "chunks": len(handover),
                },
                "empty_broker_to_all_jobs_moving_s": None
                if chaos.broker_recovery_s is None
                else round(chaos.broker_recovery_s, 2),
                "chunks_run_more_than_once": reran,
                "claims_total": claims,
                "chunks_total": JOBS * CHUNKS,
                "watch_reconnect_attempts": len(resumes),
            }
        )
    )


async def _chunks_running(db: Db) -> bool:
    cur = await db.execute("SELECT count(*) FROM chunks WHERE state = 1")
    row = await cur.fetchone()
    return row is not None and int(row[0]) > 0


async def _diagnose(stack: Stack, db: Db, chaos: Chaos, seen: dict[str, list[pb.JobEvent]]) -> str:
    lines = [f"chaos seed {SEED}: " + "; ".join(chaos.log)]
    cur = await db.execute(
        "SELECT j.id, j.state, j.last_seq, j.done_chunks, string_agg(c.state || ':' || c.attempt || ':' ||"
        " coalesce(c.worker_id, '-'), ' ' ORDER BY c.idx) FILTER (WHERE c.state <> 2)"
        " FROM jobs j LEFT JOIN chunks c ON c.job_id = j.id WHERE j.state IN (1, 2) GROUP BY j.id"
    )
    for row in await cur.fetchall():
        lines.append(f"unfinished {row[0]} state={row[1]} last_seq={row[2]} done={row[3]} chunks={row[4]}")
        lines.append(f"  watcher saw up to seq {seen[str(row[0])][-1].seq if seen[str(row[0])] else 0}")
    for name, proc in stack.services.items():
        lines.append(f"== {name} alive={proc.alive}\n{proc.log_tail(15)}")
    return "\n".join(lines)
