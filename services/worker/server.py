"""Starts a worker: one member of the worker consumer group on jobs.chunks."""

from __future__ import annotations

import asyncio
import logging

from jobstream import topics
from jobstream.config import Settings
from jobstream.db import open_pool
from jobstream.kafka import GroupMember, make_producer
from jobstream.observability import OpsServer, combine, kafka_ready, postgres_ready, track_lag, watch_pool
from services.worker.worker import Worker

log = logging.getLogger("worker")


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    pool = await open_pool(settings, name="worker", min_size=1)
    producer = make_producer(settings)
    await producer.start()
    member = GroupMember(settings, "workers", [topics.CHUNKS], fetch_wait_ms=settings.kafka_chunk_fetch_wait_ms)
    await member.start()
    log.info("worker %s started (concurrency %d)", settings.worker_id, settings.worker_concurrency)
    watch_pool(pool)
    ops = OpsServer(settings.metrics_port, combine(lambda: postgres_ready(pool), lambda: kafka_ready(member.consumer)))
    await ops.start()
    lag = asyncio.create_task(track_lag(lambda: member.consumer, settings.group("workers")))
    try:
        await Worker(settings, pool, member, producer).run(stop)
    finally:
        lag.cancel()
        await ops.stop()
        await member.stop()
        await producer.stop()
        await pool.close()
    log.info("worker %s stopped", settings.worker_id)
