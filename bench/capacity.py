"""Scenario 8: what one chunk and one event cost, the inputs of docs/capacity.md.

For each: CPU time in every service (the bench's own clients excluded), Kafka messages and bytes
(keys and values, counted by a reader of every topic), and Postgres transactions, statements, rows
written and WAL bytes. A chunk is a `demo.sleep` chunk with ms=0, so its figures are jobstream's
own overhead; an event is a progress event of a running job delivered to one Watch stream (the
figures include that job's one chunk, spread over its twenty events). While events flow, a second
gateway with no client runs beside the first: what it spends is what a gateway costs that serves
no stream of these jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import psycopg
from aiokafka import TopicPartition

from bench import cpu
from bench.client import Stub, channel, submit, watch_to_end
from bench.client import stub as make_stub
from bench.sizes import Sizes
from bench.stack import BenchStack
from bench.stats import Run
from jobstream import topics
from jobstream.embedded.ports import free_port
from jobstream.kafka import make_broadcast_consumer
from jobstream.v1 import jobstream_pb2 as pb

EVENT_STEP_MS = 250
EVENT_JOB_MS = 20 * EVENT_STEP_MS
IDLE_GATEWAY = "idlegateway"


async def run(stack: BenchStack, sizes: Sizes, repeat: int) -> list[Run]:
    runs = []
    async with channel(stack.gateway_addr, stack.token) as ch:
        stub = make_stub(ch)
        for _ in range(repeat):
            figures: Run = {}
            figures.update(await _measure(stack, "chunk", lambda: _chunks(stub, sizes), sizes.stats_flush_s))
            async with _idle_gateway(stack):
                figures.update(await _measure(stack, "event", lambda: _events(stub, sizes), sizes.stats_flush_s))
            runs.append(figures)
    return runs


@contextlib.asynccontextmanager
async def _idle_gateway(stack: BenchStack) -> AsyncIterator[None]:
    """A second gateway that no client calls: a gateway reads only the updates its streams need, so
    its CPU per event (`event_cpu_ms_idlegateway`) is what one more gateway costs beside jobs it
    does not serve, and it would grow again if gateways read every update."""
    addr = f"127.0.0.1:{free_port()}"
    stack.start_service(IDLE_GATEWAY, "services.gateway", JOBSTREAM_GATEWAY_LISTEN=addr)
    try:
        await stack.wait_gateway(addr)
        yield
    finally:
        await asyncio.to_thread(stack.services.pop(IDLE_GATEWAY).terminate, 30)


async def _chunks(stub: Stub, sizes: Sizes) -> int:
    jobs = [await submit(stub, chunks=sizes.capacity_chunks_per_job, ms=0) for _ in range(sizes.capacity_jobs)]
    await asyncio.gather(*(watch_to_end(stub, job_id) for job_id in jobs))
    return sizes.capacity_jobs * sizes.capacity_chunks_per_job


async def _events(stub: Stub, sizes: Sizes) -> int:
    delivered = 0

    def seen(event: pb.JobEvent, _: float) -> None:
        nonlocal delivered
        delivered += event.type == pb.JOB_PROGRESS

    async def job() -> None:
        await watch_to_end(stub, await submit(stub, chunks=1, ms=EVENT_JOB_MS), seen)

    await asyncio.gather(*(job() for _ in range(sizes.capacity_event_jobs)))
    return delivered


async def _measure(stack: BenchStack, unit: str, load: Callable[[], Awaitable[int]], stats_flush_s: float) -> Run:
    """Runs the load and divides what the system spent by the units it reports."""
    tap = _KafkaTap(stack)
    await tap.start()
    try:
        cpu_before, pg_before = cpu.by_service(stack), await _postgres(stack.database_url)
        units = await load()
        await asyncio.sleep(stats_flush_s)
        cpu_after, pg_after = cpu.by_service(stack), await _postgres(stack.database_url)
    finally:
        await tap.stop()
    figures: Run = {f"{unit}s": float(units)}
    figures.update(cpu.per_unit(f"{unit}_cpu_ms", cpu_before, cpu_after, units))
    figures[f"{unit}_kafka_messages"] = tap.messages / units
    figures[f"{unit}_kafka_bytes"] = tap.bytes / units
    for key, value in pg_after.items():
        figures[f"{unit}_pg_{key}"] = (value - pg_before[key]) / units
    return figures


async def _postgres(database_url: str) -> dict[str, float]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        with contextlib.suppress(psycopg.Error):
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        cur = await conn.execute(
            "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint"
            " FROM pg_stat_database WHERE datname = current_database()"
        )
        row = await cur.fetchone()
        assert row is not None
        found = {"transactions": float(row[0]), "rows": float(row[1]), "wal_bytes": float(row[2])}
        with contextlib.suppress(psycopg.Error):
            cur = await conn.execute("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements")
            statements = await cur.fetchone()
            found["statements"] = float(statements[0]) if statements else 0.0
    return found


@dataclass
class _KafkaTap:
    """Counts every message (and its key and value bytes) on the stack's topics while it runs."""

    stack: BenchStack
    messages: int = 0
    bytes: int = 0
    _task: asyncio.Task[None] | None = None
    _ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._read())
        await asyncio.wait_for(self._ready.wait(), 30)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _read(self) -> None:
        settings = self.stack.settings
        consumer = make_broadcast_consumer(settings)
        await consumer.start()
        try:
            names = [settings.topic(t) for t in (topics.SUBMITTED, topics.CHUNKS, topics.PROGRESS, topics.CONTROL)]
            names += [settings.topic(t) for t in (topics.UPDATES, topics.DEAD_LETTER)]
            tps = [TopicPartition(n, p) for n in names for p in sorted(consumer.partitions_for_topic(n) or ())]
            consumer.assign(tps)
            # The broker's end offsets can fall short by a batch; from the last committed write on
            # that is at most a few messages out of many thousands.
            await consumer.seek_to_end(*tps)
            for tp in tps:
                await consumer.position(tp)
            self._ready.set()
            while True:
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    self.messages += len(records)
                    self.bytes += sum(len(r.value or b"") + len(r.key or b"") for r in records)
        finally:
            await consumer.stop()
