"""The outbox relay rides out a Postgres outage: it waits and retries, and what is written to the
outbox after Postgres is back still reaches Kafka. (A relay that died on the outage's first error
left every later Submit unannounced while the gateway still reported ready.)"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from psycopg_pool import AsyncConnectionPool

from jobstream import topics
from jobstream.config import Settings
from jobstream.embedded.postgres import EmbeddedPostgres
from jobstream.kafka import make_broadcast_consumer, make_producer
from jobstream.topics import ensure_topics, partition_of
from services.gateway.outbox import OutboxRelay
from tests.helpers import wait_for
from tests.stack import Stack

pytestmark = pytest.mark.e2e


async def _outbox_row(url: str, topic: str, key: bytes) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("INSERT INTO outbox (topic, key, value) VALUES (%s, %s, %s)", (topic, key, b"v"))


@dataclass
class Rig:
    """A relay between a Postgres of the test's own and the stack's broker, on topics of its own
    (the stack's services must not read what these tests publish), and a reader of what it sends."""

    settings: Settings
    pool: AsyncConnectionPool
    producer: AIOKafkaProducer
    consumer: AIOKafkaConsumer
    seen: dict[bytes, int] = field(default_factory=dict)  # key -> the partition it arrived on

    async def published(self, key: bytes) -> bool:
        batch = await self.consumer.getmany(timeout_ms=200)
        self.seen.update((bytes(r.key or b""), r.partition) for records in batch.values() for r in records)
        return key in self.seen


@contextlib.asynccontextmanager
async def _rig(stack: Stack, postgres: EmbeddedPostgres) -> AsyncIterator[Rig]:
    prefix = f"relay-{uuid.uuid4().hex[:8]}."
    settings = Settings(database_url=postgres.url, kafka_bootstrap=stack.bootstrap, topic_prefix=prefix)
    await ensure_topics(settings)
    # A short pool timeout, so an outage reaches the relay as errors within the test's time.
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
    try:
        yield Rig(settings, pool, producer, consumer)
    finally:
        await consumer.stop()
        await producer.stop()
        await pool.close()


@contextlib.asynccontextmanager
async def _running(relay: OutboxRelay) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        yield task
    finally:
        stop.set()
        relay.wake()
        await asyncio.wait_for(task, 10)


async def test_the_relay_outlives_a_postgres_outage(
    stack: Stack, postgres: EmbeddedPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    async with _rig(stack, postgres) as rig:
        relay = OutboxRelay(rig.settings, rig.pool, rig.producer)
        async with _running(relay) as task:
            before = uuid.uuid4().hex.encode()
            await _outbox_row(postgres.url, topics.CONTROL, before)
            relay.wake()
            await wait_for(lambda: rig.published(before), within=30, what="the row written before the outage to go out")

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
            await wait_for(lambda: rig.published(after), within=30, what="the row written after the outage to go out")
            assert not task.done(), task


async def test_a_commit_during_a_relay_round_is_relayed_without_waiting_for_the_poll(
    stack: Stack, postgres: EmbeddedPostgres
) -> None:
    during = uuid.uuid4().hex.encode()

    class CommitDuringTheFirstRound(OutboxRelay):
        rounds = 0

        async def relay_once(self) -> int:
            sent = await super().relay_once()
            self.rounds += 1
            if self.rounds == 1:
                # A Submit commits its outbox row after this round took the rows it sends.
                await _outbox_row(postgres.url, topics.CONTROL, during)
                self.wake()
            return sent

    async with _rig(stack, postgres) as rig:
        # An hour's idle poll: the row goes out within the test's time only if that wake is kept.
        relay = CommitDuringTheFirstRound(rig.settings, rig.pool, rig.producer, idle_poll_s=3600)
        async with _running(relay):
            await wait_for(lambda: rig.published(during), within=30, what="the row committed during a round to go out")


async def test_each_message_goes_to_the_partition_of_its_job(stack: Stack, postgres: EmbeddedPostgres) -> None:
    """The relay names partitions itself; they must be the ones the job's scheduler reads."""
    keys = [str(uuid.uuid4()).encode() for _ in range(12)]
    async with _rig(stack, postgres) as rig:
        relay = OutboxRelay(rig.settings, rig.pool, rig.producer)
        async with _running(relay):
            for key in keys:
                await _outbox_row(postgres.url, topics.CONTROL, key)
            relay.wake()
            for key in keys:
                await wait_for(functools.partial(rig.published, key), within=30, what=f"{key!r} to go out")
    expected = {key: partition_of(key.decode(), rig.settings.job_partitions) for key in keys}
    assert {key: rig.seen[key] for key in keys} == expected
