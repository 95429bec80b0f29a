"""Starts the scheduler: one member of the scheduler consumer group on the job-keyed topics."""

from __future__ import annotations

import asyncio
import logging

from jobstream import topics
from jobstream.config import Settings
from jobstream.db import open_pool
from jobstream.kafka import GroupMember, make_producer
from jobstream.observability import OpsServer, combine, kafka_ready, postgres_ready, track_lag, watch_pool
from services.scheduler import store
from services.scheduler.loop import Ownership, Scheduler

log = logging.getLogger("scheduler")


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    # A scheduler paused inside a batch holds its partitions' owner rows; the one taking them over
    # waits for that batch, but not for longer than this (see store.take_over).
    pool = await open_pool(settings, name="scheduler", min_size=2, idle_transaction_timeout_s=store.TAKEOVER_WAIT_S)
    producer = make_producer(settings)
    await producer.start()
    ownership = Ownership(settings.topic(topics.SUBMITTED))
    member = GroupMember(settings, "scheduler", topics.SCHEDULER_TOPICS, ownership)
    await member.start()
    log.info("scheduler started")
    scheduler = Scheduler(settings, pool, member, producer, ownership)
    watch_pool(pool)
    ops = OpsServer(settings.metrics_port, combine(lambda: postgres_ready(pool), lambda: kafka_ready(member.consumer)))
    await ops.start()
    background = [
        asyncio.create_task(scheduler.track_jobs()),
        asyncio.create_task(track_lag(lambda: member.consumer, settings.group("scheduler"))),
    ]
    try:
        await _run_until_stopped(scheduler, stop)
    finally:
        for each in background:
            each.cancel()
        await ops.stop()
        await member.stop()
        await producer.stop()
        await pool.close()
    log.info("scheduler stopped")


async def _run_until_stopped(scheduler: Scheduler, stop: asyncio.Event) -> None:
    task = asyncio.create_task(scheduler.run(stop))
    stopped = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # the loop only ends on its own by raising
            return
        # The loop checks `stop` between batches; give the current batch time to finish.
        try:
            await asyncio.wait_for(task, timeout=10)
        except TimeoutError:
            log.warning("scheduler batch did not finish in time; it will be replayed")
    finally:
        stopped.cancel()
