"""The Kafka topics, their partition counts, and creating (or re-creating) them.

Job-keyed topics share one partition count so that a job's submitted, progress and control
messages land on the same partition number, and the range assignor hands all three to the same
scheduler: that scheduler owns the job. Brokers may not grow a topic later (the embedded one
cannot), so counts are chosen up front and creation is explicit: producing to a missing topic
auto-creates it with the broker's default count, which is why a repair deletes and re-creates a
topic whose count is wrong.

A marker topic that nothing ever produces to tells a broker that came back empty (the embedded
broker keeps nothing) from one that merely auto-created a topic.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.partitioner import murmur2

from jobstream import kafka
from jobstream.config import Settings, SettingsError

log = logging.getLogger(__name__)

SUBMITTED = "jobs.submitted"
CHUNKS = "jobs.chunks"
PROGRESS = "jobs.progress"
CONTROL = "jobs.control"
UPDATES = "jobs.updates"
DEAD_LETTER = "jobs.deadletter"
MARKER = "jobstream.marker"

# Consumed by the scheduler group; every one keyed by job id.
SCHEDULER_TOPICS = (SUBMITTED, PROGRESS, CONTROL)


@functools.lru_cache(maxsize=8192)
def partition_of(job_id: str, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for a message keyed by this job id.

    Services name the partition of what they send themselves: the partitioner hashes in pure
    Python, and hashing every report and chunk task cost a worker 5% and the scheduler 8% of their
    time. A job's messages hash once per process while it runs."""
    return int((murmur2(job_id.encode()) & 0x7FFFFFFF) % partitions)


def chunk_partition(job_id: str, chunk_index: int, attempt: int, partitions: int) -> int:
    """Where a chunk task goes: a job's chunks round the partitions from a place its id picks,
    so they spread evenly over the workers, and each new attempt moves on to the next partition
    (most likely another worker's)."""
    return (partition_of(job_id, partitions) + chunk_index + attempt - 1) % partitions


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """Every topic, the marker last: it exists only once all the others are right."""
    job = settings.job_partitions
    return [
        TopicSpec(settings.topic(SUBMITTED), job),
        TopicSpec(settings.topic(PROGRESS), job),
        TopicSpec(settings.topic(CONTROL), job),
        TopicSpec(settings.topic(UPDATES), job),
        TopicSpec(settings.topic(DEAD_LETTER), job),
        TopicSpec(settings.topic(CHUNKS), settings.chunk_partitions),
        TopicSpec(settings.topic(MARKER), 1),
    ]


async def _admin(settings: Settings, wait_s: float) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=10_000, **kafka.security(settings)
    )
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        try:
            await admin.start()
            return admin
        except KafkaError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


def _wrong_counts(specs: list[TopicSpec], counts: dict[str, int]) -> list[TopicSpec]:
    """The topics that exist with another partition count than their spec's."""
    return [spec for spec in specs if spec.name in counts and counts[spec.name] != spec.partitions]


async def _partition_counts(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    existing = set(await admin.list_topics())
    present = [n for n in names if n in existing]
    if not present:
        return {}
    described = await admin.describe_topics(present)
    return {d["topic"]: len(d["partitions"]) for d in described if not d.get("error_code")}


async def ensure_topics(settings: Settings, *, wait_s: float = 30.0) -> list[str]:
    """Creates missing topics and re-creates any whose partition count is wrong; returns what it
    (re-)created. Safe to run from several processes at once."""
    admin = await _admin(settings, wait_s)
    changed: list[str] = []
    try:
        for _ in range(10):
            specs = topic_specs(settings)
            counts = await _partition_counts(admin, [s.name for s in specs])
            wrong = _wrong_counts(specs, counts)
            missing = [s for s in specs if s.name not in counts]
            if not wrong and not missing:
                return changed
            if wrong:
                log.warning("re-creating topics with a wrong partition count: %s", ", ".join(s.name for s in wrong))
                await admin.delete_topics([s.name for s in wrong])
            for spec in wrong + missing:
                if spec.name == settings.topic(MARKER) and (len(wrong) + len(missing)) > 1:
                    continue  # the marker goes last, once everything else is right
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
                    changed.append(spec.name)
                except TopicAlreadyExistsError:
                    pass  # another replica created it first, or a producer auto-created it: checked again
        raise RuntimeError("could not bring the topics to their partition counts after 10 rounds")
    finally:
        if changed:
            log.info("created topics %s", ", ".join(changed))
        await admin.close()


async def check_partition_counts(settings: Settings, *, wait_s: float = 5.0) -> None:
    """Raises SettingsError when the topics were made with other partition counts than these
    settings name, so a service with a stale JOBSTREAM_JOB_PARTITIONS refuses to start instead
    of sending jobs to partitions no scheduler reads, or hashing them where another owns them.

    Checked only on a broker whose marker topic exists, that is, one whose topics were all made
    right: a broker that came back empty may hold topics that producers auto-created at its
    default count until the scheduler re-creates them. A broker that cannot be reached is not
    checked: every service starts without one and waits for it anyway.
    """
    try:
        admin = await _admin(settings, wait_s)
    except KafkaError as err:
        log.warning("could not check the topics' partition counts (%s); starting anyway", err)
        return
    specs = topic_specs(settings)
    try:
        counts = await _partition_counts(admin, [spec.name for spec in specs])
    finally:
        await admin.close()
    if settings.topic(MARKER) not in counts:
        return
    wrong = [
        f"{spec.name} has {counts[spec.name]} partitions, but {_count_variable(spec.name, settings)}"
        f" is {spec.partitions}"
        for spec in _wrong_counts(specs, counts)
    ]
    if wrong:
        raise SettingsError(
            "; ".join(wrong) + ". Every service must run with the partition counts the topics were made with."
        )


def _count_variable(topic: str, settings: Settings) -> str:
    return "JOBSTREAM_CHUNK_PARTITIONS" if topic == settings.topic(CHUNKS) else "JOBSTREAM_JOB_PARTITIONS"


async def broker_is_intact(settings: Settings) -> bool:
    """False when the marker topic is gone: the broker lost its data."""
    admin = await _admin(settings, 5.0)
    try:
        return settings.topic(MARKER) in set(await admin.list_topics())
    finally:
        await admin.close()
