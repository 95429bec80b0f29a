"""Scenario 7: one job of `big_chunks` chunks: Postgres rows and bytes (WAL) written per chunk, the
Watch client's event count and rate, and the memory of every service at the end."""

from __future__ import annotations

import asyncio
import time

import psycopg

from bench.client import Stub, channel, submit, watch_to_end
from bench.client import stub as make_stub
from bench.sizes import Sizes
from bench.stack import BenchStack
from bench.stats import Run
from jobstream.v1 import jobstream_pb2 as pb


async def run(stack: BenchStack, sizes: Sizes, repeat: int) -> list[Run]:
    runs = []
    async with channel(stack.gateway_addr, stack.token) as ch:
        stub = make_stub(ch)
        for _ in range(repeat):
            runs.append(await _one(stack, stub, sizes.big_chunks, sizes.stats_flush_s))
    return runs


async def _one(stack: BenchStack, stub: Stub, chunks: int, stats_flush_s: float) -> Run:
    before = await _written(stack.database_url)
    types: list[int] = []
    started = time.time()
    job_id = await submit(stub, chunks=chunks, ms=0)
    ended = await watch_to_end(stub, job_id, lambda event, _: types.append(event.type))
    await asyncio.sleep(stats_flush_s)
    after = await _written(stack.database_url)
    figures: Run = {
        "chunks_per_s": chunks / (ended - started),
        "rows_per_chunk": (after[0] - before[0]) / chunks,
        "wal_bytes_per_chunk": (after[1] - before[1]) / chunks,
        "events": float(len(types)),
        "progress_events": float(types.count(pb.JOB_PROGRESS)),
        "events_per_s": len(types) / (ended - started),
    }
    # Proportional set size: shared pages (libraries, Postgres's shared buffers) counted once.
    figures.update({f"memory_mib_{name}": pss / 2**20 for name, pss in stack.memory().items()})
    return figures


async def _written(database_url: str) -> tuple[int, int]:
    """Rows inserted, updated and deleted in the database so far, and the WAL position in bytes."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT tup_inserted + tup_updated + tup_deleted, pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint"
            " FROM pg_stat_database WHERE datname = current_database()"
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])
