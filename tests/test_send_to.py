"""Sending to a named partition while a topic has the wrong partition count, as it does for a while
after the broker lost its data: a retriable broker error, never aiokafka's bare assert (which took
the scheduler's publisher down), and the send goes through once the topic is right again."""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from jobstream.embedded.broker import EmbeddedBroker
from jobstream.kafka import send_all
from tests.helpers import read_partition, wait_for

TOPIC = "probe.named"


async def test_a_partition_the_topic_lacks_is_a_retriable_broker_error_until_the_topic_is_right(
    broker: EmbeddedBroker, admin: AIOKafkaAdminClient, producer: AIOKafkaProducer
) -> None:
    await admin.create_topics([NewTopic(TOPIC, num_partitions=4, replication_factor=1)])

    with pytest.raises(KafkaError, match="has 4 partitions, not partition 7"):
        await send_all(producer, [(TOPIC, 7, b"key", b"early")])
    # The metadata request it asked for names the topic, and the broker creates a topic it is asked
    # about: let it land before the topic is re-created, or it re-creates the old one.
    await producer.client.force_metadata_update()

    await admin.delete_topics([TOPIC])
    await admin.create_topics([NewTopic(TOPIC, num_partitions=12, replication_factor=1)])

    async def sent() -> bool:
        try:
            (sent_future,) = await send_all(producer, [(TOPIC, 7, b"key", b"on time")])
            await sent_future
        except KafkaError:
            return False
        return True

    await wait_for(sent, within=30, what="the producer to see the re-created topic")
    assert await read_partition(broker.bootstrap, TOPIC, 7, 1) == [b"on time"]


async def test_a_named_partition_gets_the_message(
    broker: EmbeddedBroker, admin: AIOKafkaAdminClient, producer: AIOKafkaProducer
) -> None:
    await admin.create_topics([NewTopic(TOPIC, num_partitions=4, replication_factor=1)])

    (sent_future,) = await send_all(producer, [(TOPIC, 2, b"key", b"hello")])
    await sent_future

    assert await read_partition(broker.bootstrap, TOPIC, 2, 1) == [b"hello"]
