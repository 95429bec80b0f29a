"""Starts a worker: one member of the worker consumer group on jobs.chunks."""

from __future__ import annotations

import asyncio
import logging

from jobstream import topics
from jobstream.config import Settings
from jobstream.db import open_pool
from jobstream.kafka import make_group_consumer, make_producer
from jobstream.observability import OpsServer, combine, kafka_ready, postgres_ready, track_lag, watch_pool
from services.worker.worker import Worker

log = logging.getLogger("worker")


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    pool = await open_pool(settings, name="worker", min_size=1)
    producer = make_producer(settings)
    await producer.start()
    consumer = make_group_consumer(settings, "workers", [topics.CHUNKS])
    await consumer.start()
    log.info("worker %s started (concurrency %d)", settings.worker_id, settings.worker_concurrency)
    watch_pool(pool)
    ops = OpsServer(settings.metrics_port, combine(lambda: postgres_ready(pool), lambda: kafka_ready(consumer)))
    await ops.start()
    lag = asyncio.create_task(track_lag(consumer, settings.group("workers")))
    try:
        await Worker(settings, pool, consumer, producer).run(stop)
    finally:
        lag.cancel()
        await ops.stop()
        await consumer.stop()
        await producer.stop()
        await pool.close()
    log.info("worker %s stopped", settings.worker_id)
