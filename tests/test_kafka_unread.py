"""Partitions read only when needed (jobstream.kafka.assign_all_unread, read_from_end), on the
embedded broker: a Watch hub and a worker's cancel feed fetch nothing until they start a partition,
start it from its end, and keep what they paused paused when the topic's partitions change."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from jobstream.embedded.broker import EmbeddedBroker
from jobstream.kafka import assign_all_unread, follow_partition_changes, partitions_read, read_from_end
from tests.helpers import wait_for

TOPIC = "probe.unread"


@pytest.fixture
async def consumer(broker: EmbeddedBroker, admin: AIOKafkaAdminClient) -> AsyncIterator[AIOKafkaConsumer]:
    await admin.create_topics([NewTopic(TOPIC, num_partitions=2, replication_factor=1)])
    started = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, fetch_max_wait_ms=50, auto_offset_reset="earliest")
    await started.start()
    try:
        await assign_all_unread(started, TOPIC)
        yield started
    finally:
        await started.stop()


async def test_nothing_is_read_until_a_partition_is_started_and_then_only_what_came_after(
    consumer: AIOKafkaConsumer, producer: AIOKafkaProducer
) -> None:
    p0 = TopicPartition(TOPIC, 0)
    await producer.send_and_wait(TOPIC, b"before", partition=0)
    assert partitions_read(consumer) == set()
    assert await consumer.getmany(timeout_ms=300) == {}

    await read_from_end(consumer, p0)
    await producer.send_and_wait(TOPIC, b"after", partition=0)
    await producer.send_and_wait(TOPIC, b"unread", partition=1)

    assert partitions_read(consumer) == {p0}
    assert await _next_values(consumer, p0) == [b"after"]

    # Paused a while and started again: what came meanwhile is skipped, not read late.
    consumer.pause(p0)
    await producer.send_and_wait(TOPIC, b"while paused", partition=0)
    await read_from_end(consumer, p0)
    await producer.send_and_wait(TOPIC, b"started again", partition=0)
    assert await _next_values(consumer, p0) == [b"started again"]


async def _next_values(consumer: AIOKafkaConsumer, tp: TopicPartition) -> list[bytes]:
    """The next records the consumer fetches, all of them from `tp`."""
    values: list[bytes] = []

    async def fetched() -> bool:
        batch = await consumer.getmany(timeout_ms=500)
        assert set(batch) <= {tp}, f"read {sorted(batch)}"
        values.extend(bytes(r.value or b"") for r in batch.get(tp, []))
        return bool(values)

    await wait_for(fetched, within=10, what=f"a record on {tp}")
    return values


async def test_a_partition_change_keeps_paused_partitions_paused_and_reads_new_ones(
    consumer: AIOKafkaConsumer, admin: AIOKafkaAdminClient
) -> None:
    p0, p1, p2 = (TopicPartition(TOPIC, p) for p in range(3))
    await read_from_end(consumer, p0)
    following = asyncio.create_task(follow_partition_changes(consumer, TOPIC, every_s=0.2))
    try:
        await admin.delete_topics([TOPIC])
        await admin.create_topics([NewTopic(TOPIC, num_partitions=3, replication_factor=1)])

        async def reassigned() -> bool:
            assigned: set[TopicPartition] = consumer.assignment()
            return assigned == {p0, p1, p2}

        await wait_for(reassigned, within=30, what="the consumer to follow the re-created topic")
        assert partitions_read(consumer) == {p0, p2}
    finally:
        following.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await following
