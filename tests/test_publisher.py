"""The scheduler's publisher against a real broker: batches that queued while one was announced go
out together and in the order they were recorded, and their offsets are committed once they are
acknowledged: when due, or at once on drain()."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from jobstream.embedded.broker import EmbeddedBroker
from services.scheduler import metrics
from services.scheduler.publisher import Publisher
from tests.helpers import read_partition, wait_for

IN = TopicPartition("probe.in", 0)
OUT = TopicPartition("probe.out", 0)


@pytest.fixture
async def clients(broker: EmbeddedBroker) -> AsyncIterator[tuple[AIOKafkaProducer, AIOKafkaConsumer]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(tp.topic, num_partitions=1, replication_factor=1) for tp in (IN, OUT)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    # Assigned by hand: commits need the group id, not a group membership (joining takes seconds).
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id="probe", enable_auto_commit=False)
    await producer.start()
    await consumer.start()
    consumer.assign([IN])
    try:
        yield producer, consumer
    finally:
        await consumer.stop()
        await producer.stop()


@contextlib.asynccontextmanager
async def running(publishing: Publisher) -> AsyncIterator[None]:
    task = asyncio.create_task(publishing.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _published_batches() -> tuple[float, float]:
    """(announcements, batches they carried) so far."""
    samples = {s.name: s.value for m in metrics.PUBLISHED_BATCHES.collect() for s in m.samples}
    return samples["jobstream_scheduler_published_batches_count"], samples["jobstream_scheduler_published_batches_sum"]


async def test_batches_queued_behind_one_go_out_together_in_order_and_drain_commits_them(
    broker: EmbeddedBroker, clients: tuple[AIOKafkaProducer, AIOKafkaConsumer]
) -> None:
    producer, consumer = clients
    # Only the first announcement (nothing committed yet) and drain() commit.
    publishing = Publisher(producer, lambda: consumer, commit_every_s=3600.0)
    # Recorded while nothing announced them: they queue, as behind a slow acknowledgement.
    for n, offset in ((1, 10), (2, 20), (3, 30)):
        messages = [(OUT.topic, OUT.partition, b"job", f"{n}.{i}".encode()) for i in range(2)]
        await publishing.put(messages, {IN: offset})
    before = _published_batches()

    async with running(publishing):
        await publishing.drain()

        announced, carried = (after - was for after, was in zip(_published_batches(), before, strict=True))
        assert (announced, carried) == (1, 3)
        sent = [b"1.0", b"1.1", b"2.0", b"2.1", b"3.0", b"3.1"]
        assert await read_partition(broker.bootstrap, OUT.topic, OUT.partition, 6) == sent
        assert await consumer.committed(IN) == 30

        # Due in an hour: announced, and not committed until drain().
        await publishing.put([(OUT.topic, OUT.partition, b"job", b"4.0")], {IN: 40})

        async def announced_again() -> bool:
            return _published_batches()[0] - before[0] == 2

        # The announcement decides about the commit without waiting once its metric is observed.
        await wait_for(announced_again, within=10, what="the fourth batch announced")
        assert await read_partition(broker.bootstrap, OUT.topic, OUT.partition, 7) == [*sent, b"4.0"]
        assert await consumer.committed(IN) == 30
        await publishing.drain()
        assert await consumer.committed(IN) == 40


async def test_acknowledged_offsets_are_committed_when_due_without_more_batches(
    clients: tuple[AIOKafkaProducer, AIOKafkaConsumer],
) -> None:
    producer, consumer = clients
    publishing = Publisher(producer, lambda: consumer, commit_every_s=1.0)

    def committed(offset: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return bool(await consumer.committed(IN) == offset)

        return check

    async with running(publishing):
        await publishing.put([(OUT.topic, OUT.partition, b"job", b"1")], {IN: 5})
        # Nothing was committed yet, so the first announcement commits at once...
        await wait_for(committed(5), within=10, what="the first announcement's commit")
        # ...and the next, a moment later, is not due: only the timer can commit it, no batch follows.
        await publishing.put([], {IN: 7})
        await wait_for(committed(7), within=10, what="the offsets committed by the publisher's timer")
