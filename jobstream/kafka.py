"""Kafka clients configured the one way every service needs them.

No idempotent or transactional producer: the embedded broker refuses them, and correctness never
rests on them anyway. Postgres decides what counts, so every consumer is idempotent and every
producer may deliver twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata
from aiokafka.errors import KafkaError, UnknownTopicOrPartitionError
from aiokafka.helpers import create_ssl_context
from google.protobuf.message import DecodeError, Message

from jobstream.config import Settings

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)
T = TypeVar("T")

PARTITION_CHECK_SECONDS = 5.0
# Clients refresh metadata this often. Group members notice a topic whose partitions changed (a
# broker that came back empty re-creates topics that producers may have auto-created with the
# wrong count) only through metadata, so this bounds how long part of a topic goes unread.
METADATA_MAX_AGE_MS = 5_000
# How long a stopping group member may take to leave. Stopped in the middle of a rebalance, the
# consumer first waits for its join to complete, and a SyncGroup the broker holds back can take
# the whole request timeout (40 s): a worker given SIGTERM in a test ran out its stop time that way
# after it had drained and handed back all its chunks. Past this bound the member is left to its
# session timeout, as if it had crashed; nothing is lost, since its work is recorded already.
MEMBER_STOP_SECONDS = 5.0


def security(settings: Settings) -> dict[str, Any]:
    """The connection security arguments every aiokafka client of these settings takes."""
    protocol = settings.kafka_security_protocol
    found: dict[str, Any] = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        found["ssl_context"] = create_ssl_context(cafile=settings.kafka_ssl_cafile or None)
    if protocol.startswith("SASL_"):
        found |= {
            "sasl_mechanism": settings.kafka_sasl_mechanism,
            "sasl_plain_username": settings.kafka_sasl_username,
            "sasl_plain_password": settings.kafka_sasl_password,
        }
    return found


def make_producer(settings: Settings) -> AIOKafkaProducer:
    """No linger: a message goes out as soon as the producer has no request in flight, and what
    arrives while one is in flight goes out together in the next (one request per broker at a
    time), so batches grow with the load without a timer, as Postgres batches do
    (jobstream.batching). A linger of 2 ms cost every event 2 ms per hop and batched little: at
    jobstream's rates a request rarely holds two messages for one partition."""
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        linger_ms=0,
        max_batch_size=256 * 1024,
        max_request_size=8 * 1024 * 1024,
        request_timeout_ms=15_000,
        metadata_max_age_ms=METADATA_MAX_AGE_MS,
        client_id=f"jobstream-{settings.worker_id}",
        **security(settings),
    )


Outgoing = tuple[str, int, bytes, bytes]  # topic, partition, key, value


async def send_all(producer: AIOKafkaProducer, messages: Sequence[Outgoing]) -> list[asyncio.Future[Any]]:
    """Queues messages for named partitions; returns the futures of their acknowledgements.

    aiokafka checks a named partition against its metadata with a bare assert. A broker that lost
    its data can list a topic with fewer partitions for a while (a producer's send re-creates it
    at the broker's default count, until ensure_topics makes it right): that is the broker not
    being ready, so it raises the retriable UnknownTopicOrPartitionError, after asking for fresh
    metadata, before queueing anything. Each topic is checked once, not once a message.
    """
    for topic in {t for t, _, _, _ in messages}:
        known = await producer.partitions_for(topic)
        missing = sorted({p for t, p, _, _ in messages if t == topic} - known)
        if missing:
            producer.client.force_metadata_update()
            raise UnknownTopicOrPartitionError(f"{topic} has {len(known)} partitions, not partition {missing[0]}")
    return [await producer.send(t, value=v, key=k, partition=p) for t, p, k, v in messages]


async def retry_broker_errors(attempt: Callable[[], Awaitable[T]], what: str) -> T:
    """Runs `attempt` until the broker lets it through, backing off from 0.2 s up to 5 s: for work
    whose outcome Postgres already holds, and whose consumers count a repeat once."""
    delay = 0.2
    while True:
        try:
            return await attempt()
        except KafkaError as err:
            log.warning("%s failed (%s); retrying in %.1fs", what, err, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def make_group_consumer(
    settings: Settings,
    group: str,
    topics: Iterable[str],
    listener: ConsumerRebalanceListener | None = None,
    fetch_wait_ms: int | None = None,
) -> AIOKafkaConsumer:
    """A member of a consumer group that commits offsets itself, after the work is recorded."""
    consumer: AIOKafkaConsumer
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=settings.group(group),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=settings.kafka_fetch_wait_ms if fetch_wait_ms is None else fetch_wait_ms,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=1_000,
        max_poll_interval_ms=300_000,
        max_partition_fetch_bytes=8 * 1024 * 1024,
        metadata_max_age_ms=METADATA_MAX_AGE_MS,
        client_id=f"jobstream-{settings.worker_id}",
        partition_assignment_strategy=(counted_round_robin(lambda: consumer._client.cluster),),
        **security(settings),
    )
    consumer.subscribe([settings.topic(t) for t in topics], listener=listener)
    return consumer


def co_partitioned(
    cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata], version: int = 0
) -> dict[str, ConsumerProtocolMemberAssignment]:
    """Deals partition numbers round robin over the members, each member getting its numbers on
    every topic it subscribes to.

    The job-keyed topics carry one job on the same partition number, and its scheduler must read
    all of them: plain round robin over every topic-partition keeps numbers together only while
    the member count divides the partition count (a 5th scheduler would read the progress of jobs
    whose submits another one owns, and both would be fenced off them).
    """
    subscribed = {topic for member in members.values() for topic in member.subscription}
    partitions = {topic: set(cluster.partitions_for_topic(topic) or ()) for topic in subscribed}
    numbers = sorted(set().union(*partitions.values()))
    ordered = sorted(members)
    dealt: dict[str, dict[str, list[int]]] = {member: {} for member in ordered}
    for i, number in enumerate(numbers):
        member = ordered[i % len(ordered)]
        for topic in sorted(members[member].subscription):
            if number in partitions[topic]:
                dealt[member].setdefault(topic, []).append(number)
    return {
        member: ConsumerProtocolMemberAssignment(version, sorted(topics.items()), b"")
        for member, topics in dealt.items()
    }


def counted_round_robin(current: Callable[[], ClusterMetadata]) -> type[AbstractPartitionAssignor]:
    """Co-partitioned round robin (co_partitioned), with partition counts in each member's metadata.

    When a topic's partition count changes (a broker that came back empty re-creates topics that a
    producer auto-created with the wrong count), the group leader joins again to assign the new
    partitions. The embedded broker takes a new assignment only from a join whose metadata changed.
    So the metadata carries the counts this member sees now and the counts its last assignment was
    computed from: the leader's join after a change differs from its previous one even when its
    earlier join reported counts from a stale cache.
    """
    assigned_with: dict[str, int] = {}

    def counts(cluster: ClusterMetadata, topics: Iterable[str]) -> dict[str, int]:
        return {topic: len(cluster.partitions_for_topic(topic) or ()) for topic in sorted(topics)}

    class CountedRoundRobin(AbstractPartitionAssignor):  # type: ignore[misc]  # aiokafka ships no hints
        name = "jobstream-roundrobin"
        version = 0

        @classmethod
        def assign(
            cls, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata]
        ) -> dict[str, ConsumerProtocolMemberAssignment]:
            topics = {topic for member in members.values() for topic in member.subscription}
            assigned_with.clear()
            assigned_with.update(counts(cluster, topics))
            return co_partitioned(cluster, members, cls.version)

        @classmethod
        def metadata(cls, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
            subscribed = sorted(topics)
            seen = {"now": counts(current(), subscribed), "assigned": assigned_with}
            return ConsumerProtocolMemberMetadata(cls.version, subscribed, json.dumps(seen).encode())

        @classmethod
        def on_assignment(cls, assignment: ConsumerProtocolMemberAssignment) -> None:
            pass

    return CountedRoundRobin


class GroupMember:
    """A consumer-group membership that can be renewed.

    After a broker came back empty, a member may keep an assignment computed from topics that
    producers auto-created with the wrong partition count, even once they are re-created right;
    joining again as a new member is what reliably brings the full assignment back.
    """

    def __init__(
        self,
        settings: Settings,
        group: str,
        topics: Iterable[str],
        listener: ConsumerRebalanceListener | None = None,
        fetch_wait_ms: int | None = None,
    ) -> None:
        self._settings = settings
        self._group = group
        self._topics = list(topics)
        self._listener = listener
        self._fetch_wait_ms = fetch_wait_ms
        self.consumer = self._make()

    def _make(self) -> AIOKafkaConsumer:
        return make_group_consumer(self._settings, self._group, self._topics, self._listener, self._fetch_wait_ms)

    async def start(self) -> None:
        await self.consumer.start()
        if not self._settings.kafka_leave_group:
            leave_silently(self.consumer)

    async def stop(self) -> None:
        try:
            await asyncio.wait_for(self.consumer.stop(), MEMBER_STOP_SECONDS)
        except TimeoutError:
            log.warning("left the consumer group without waiting: stopping took over %.0fs", MEMBER_STOP_SECONDS)
        except Exception as err:  # a member that cannot stop cleanly is as good as gone
            log.warning("stopping the group member failed: %s", err)

    async def renew(self) -> None:
        log.warning("joining the consumer group again after the broker came back empty")
        await self.stop()
        self.consumer = self._make()
        await self.start()


def leave_silently(consumer: AIOKafkaConsumer) -> None:
    """Makes a started group member stop without a LeaveGroup request; the broker drops it once
    its session times out.

    The embedded broker keeps a departed member as the leader of a group that is rebalancing, so
    after a leader leaves mid-rebalance no member can ever complete a join (the broker test
    `test_a_leader_leaving_mid_rebalance_strands_the_group` records this). An expired member is
    handled right, at the price of its partitions waiting out the session timeout.
    """
    coordinator = consumer._coordinator
    assert coordinator is not None, "only a started group member has a coordinator"

    async def forget_membership() -> None:
        coordinator.reset_generation()

    # aiokafka leaves through this method both on close and when the consumer sat idle too long.
    coordinator._maybe_leave_group = forget_membership


def make_broadcast_consumer(settings: Settings, fetch_wait_ms: int | None = None) -> AIOKafkaConsumer:
    """A consumer outside any group, for topics every replica must read whole (updates, control)."""
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=None,
        enable_auto_commit=False,
        # Only reached when a position falls off the log: after a broker came back empty, all of
        # the re-created topic is new.
        auto_offset_reset="earliest",
        fetch_max_wait_ms=settings.kafka_fetch_wait_ms if fetch_wait_ms is None else fetch_wait_ms,
        max_partition_fetch_bytes=8 * 1024 * 1024,
        client_id=f"jobstream-{settings.worker_id}",
        **security(settings),
    )


async def rewind_to_committed(consumer: AIOKafkaConsumer) -> None:
    """Moves every assigned partition back to its committed offset, so what was read since the last
    commit (and not recorded) is read again."""
    for tp in consumer.assignment():
        try:
            committed = await consumer.committed(tp)
        except KafkaError as err:
            log.warning("reading the committed offset of %s failed: %s", tp, err)
            continue
        if committed is None:
            await consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, committed)


async def assign_all_unread(consumer: AIOKafkaConsumer, topic: str) -> None:
    """Assigns every partition of a topic, waiting for it to exist, and reads none of them yet.

    A reader starts each partition it needs with `read_from_end` and pauses it once nothing needs
    it, so a process with nothing to follow fetches nothing: every fetch, empty or not, costs the
    process and the broker CPU. Each partition gets a position at the end now, so a reader that
    resumes one without `read_from_end` (its broker did not answer) reads on from here, not from
    the start of the topic.
    """
    tps = await _wait_partitions(consumer, topic)
    consumer.assign(tps)
    await consumer.seek_to_end(*tps)
    consumer.pause(*tps)


async def read_from_end(consumer: AIOKafkaConsumer, *tps: TopicPartition) -> None:
    """Reads those partitions from an offset no later than now.

    The embedded broker may report an end offset before the true end (when the newest batch held
    several records), so a few old records can come again: readers must dedupe (by seq, by job id).
    """
    await consumer.seek_to_end(*tps)
    consumer.resume(*tps)


def partitions_read(consumer: AIOKafkaConsumer) -> set[TopicPartition]:
    """The assigned partitions the consumer fetches: those not paused."""
    paused: set[TopicPartition] = consumer.paused()
    return {tp for tp in consumer.assignment() if tp not in paused}


async def follow_partition_changes(
    consumer: AIOKafkaConsumer, topic: str, every_s: float = PARTITION_CHECK_SECONDS
) -> None:
    """Re-assigns when the topic's partitions change (a broker that came back empty re-creates
    its topics), reading new partitions from their start: everything on them is new. A partition
    paused before stays paused: its reader starts it again when it needs it."""
    while True:
        await asyncio.sleep(every_s)
        try:
            tps = await _wait_partitions(consumer, topic)
        except KafkaError as err:
            log.warning("checking the partitions of %s failed: %s", topic, err)
            continue
        current = set(consumer.assignment())
        if set(tps) != current:
            log.info("partitions of %s changed; following %d", topic, len(tps))
            paused = consumer.paused()
            consumer.assign(tps)
            consumer.pause(*[tp for tp in tps if tp in paused])
            await consumer.seek_to_beginning(*[tp for tp in tps if tp not in current])


async def _wait_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    warned = False
    while True:
        await consumer._client.force_metadata_update()
        partitions = consumer.partitions_for_topic(topic)
        if partitions:
            return [TopicPartition(topic, p) for p in sorted(partitions)]
        if not warned:
            log.warning("waiting for topic %s to exist", topic)
            warned = True
        await asyncio.sleep(0.5)


def decode(message_type: type[M], record: ConsumerRecord[Any, Any]) -> M | None:
    """The record's value as `message_type`, or None (logged) when it is not one: a malformed
    message is skipped, it must not stop the consumer and every message behind it."""
    try:
        return message_type.FromString(record.value or b"")
    except DecodeError as err:
        log.error(
            "skipping unreadable %s at %s[%d]@%d: %s",
            message_type.DESCRIPTOR.name,
            record.topic,
            record.partition,
            record.offset,
            err,
        )
        return None
