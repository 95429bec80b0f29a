"""The outbox relay rides out a Postgres outage: it waits and retries, and what is written to the
outbox after Postgres is back still reaches Kafka. (A relay that died on the outage's first error
left every later Submit unannounced while the gateway still reported ready.)"""

from __future__ import annotations

import asyncio
import logging
import uuid

import psycopg
import pytest
from aiokafka import TopicPartition
from psycopg_pool import AsyncConnectionPool

from jobstream import topics
from jobstream.config import Settings
from jobstream.embedded.postgres import EmbeddedPostgres
from jobstream.kafka import make_broadcast_consumer, make_producer
from jobstream.topics import ensure_topics
from services.gateway.outbox import OutboxRelay
from tests.helpers import wait_for
from tests.stack import Stack

pytestmark = pytest.mark.e2e


async def _outbox_row(url: str, topic: str, key: bytes) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("INSERT INTO outbox (topic, key, value) VALUES (%s, %s, %s)", (topic, key, b"v"))


async def test_the_relay_outlives_a_postgres_outage(
    stack: Stack, postgres: EmbeddedPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    # Topics of its own: the stack's services must not read what this test publishes.
    prefix = f"relay-{uuid.uuid4().hex[:8]}."
    settings = Settings(database_url=postgres.url, kafka_bootstrap=stack.bootstrap, topic_prefix=prefix)
    await ensure_topics(settings)
    # A short pool timeout, so the outage reaches the relay as errors within the test's time.
    pool = AsyncConnectionPool(postgres.url, min_size=1, timeout=1, kwargs={"autocommit": True}, open=False)
    await pool.open(wait=True)
    producer = make_producer(settings)
    consumer = make_broadcast_consumer(settings)
    await producer.start()
    await consumer.start()
    topic = settings.topic(topics.CONTROL)
    tps = [TopicPartition(topic, p) for p in range(settings.job_partitions)]
    consumer.assign(tps)
    await consumer.seek_to_end(*tps)
    relay = OutboxRelay(settings, pool, producer)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    seen: set[bytes] = set()

    async def published(key: bytes) -> bool:
        batch = await consumer.getmany(timeout_ms=200)
        seen.update(bytes(r.key or b"") for records in batch.values() for r in records)
        return key in seen

    try:
        before = uuid.uuid4().hex.encode()
        await _outbox_row(postgres.url, topics.CONTROL, before)
        relay.wake()
        await wait_for(lambda: published(before), within=30, what="the row written before the outage to go out")

        caplog.set_level(logging.WARNING, logger="services.gateway.outbox")
        await asyncio.to_thread(postgres.stop)
        relay.wake()

        async def retried() -> bool:
            return any("Postgres unavailable" in r.getMessage() for r in caplog.records)

        await wait_for(retried, within=30, what="the relay to meet the outage")
        assert not task.done(), task
        await asyncio.to_thread(postgres.start)
        after = uuid.uuid4().hex.encode()
        await _outbox_row(postgres.url, topics.CONTROL, after)
        relay.wake()
        await wait_for(lambda: published(after), within=30, what="the row written after the outage to go out")
        assert not task.done(), task
    finally:
        stop.set()
        relay.wake()
        await asyncio.wait_for(task, 10)
        await consumer.stop()
        await producer.stop()
        await pool.close()


async def test_a_commit_during_a_relay_round_is_relayed_without_waiting_for_the_poll(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The idle poll is an hour: only a wake that is not lost lets the second round run in time.
    monkeypatch.setattr("services.gateway.outbox.IDLE_POLL_SECONDS", 3600.0)
    stop = asyncio.Event()

    class Relay(OutboxRelay):
        rounds = 0

        async def relay_once(self) -> int:
            self.rounds += 1
            if self.rounds == 1:
                self.wake()  # a Submit commits while this round is under way
            else:
                stop.set()  # as the gateway stops it
                self.wake()
            return 0

    relay = Relay(Settings(), pool=None, producer=None)  # type: ignore[arg-type]  # relay_once needs neither

    await asyncio.wait_for(relay.run(stop), 10)

    assert relay.rounds == 2
