"""The Kafka topics, their partition counts, and creating them before anything produces.

Job-keyed topics share one partition count so that a job's submitted, progress and control
messages land on the same partition number, and the range assignor hands all three to the same
scheduler: that scheduler owns the job. Brokers may not grow a topic later (the embedded one
cannot), so counts are chosen up front and creation is explicit: producing to a missing topic
would auto-create it with a default count.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.partitioner import murmur2

from jobstream.config import Settings

log = logging.getLogger(__name__)

SUBMITTED = "jobs.submitted"
CHUNKS = "jobs.chunks"
PROGRESS = "jobs.progress"
CONTROL = "jobs.control"
UPDATES = "jobs.updates"
DEAD_LETTER = "jobs.deadletter"

# Consumed by the scheduler group; every one keyed by job id.
SCHEDULER_TOPICS = (SUBMITTED, PROGRESS, CONTROL)


def partition_of(job_id: str, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for a message keyed by this job id."""
    return int((murmur2(job_id.encode()) & 0x7FFFFFFF) % partitions)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int


def topic_specs(settings: Settings) -> list[TopicSpec]:
    job = settings.job_partitions
    return [
        TopicSpec(settings.topic(SUBMITTED), job),
        TopicSpec(settings.topic(PROGRESS), job),
        TopicSpec(settings.topic(CONTROL), job),
        TopicSpec(settings.topic(UPDATES), job),
        TopicSpec(settings.topic(DEAD_LETTER), job),
        TopicSpec(settings.topic(CHUNKS), settings.chunk_partitions),
    ]


async def ensure_topics(settings: Settings, *, wait_s: float = 30.0) -> list[str]:
    """Creates the missing topics; returns the names it created. Existing topics are left alone."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=10_000)
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        try:
            await admin.start()
            break
        except KafkaError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)
    try:
        existing = set(await admin.list_topics())
        wanted = [spec for spec in topic_specs(settings) if spec.name not in existing]
        created: list[str] = []
        for spec in wanted:
            try:
                await admin.create_topics(
                    [
                        NewTopic(
                            spec.name,
                            num_partitions=spec.partitions,
                            replication_factor=settings.replication_factor,
                        )
                    ]
                )
                created.append(spec.name)
            except TopicAlreadyExistsError:
                pass  # another replica created it first
        if created:
            log.info("created topics %s", ", ".join(created))
        return created
    finally:
        await admin.close()
