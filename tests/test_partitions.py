"""The partitions services name for their messages: where Kafka's own partitioner would put a
job's messages, and chunk tasks spread evenly over the partitions."""

from __future__ import annotations

import uuid
from collections import Counter

from aiokafka.partitioner import DefaultPartitioner

from jobstream.topics import chunk_partition, partition_of


def test_a_jobs_partition_is_the_one_kafkas_default_partitioner_picks_for_its_id() -> None:
    partitioner = DefaultPartitioner()
    for _ in range(500):
        job_id = str(uuid.uuid4())
        partitions = list(range(12))
        assert partition_of(job_id, 12) == partitioner(job_id.encode(), partitions, partitions)


def test_the_chunks_of_a_job_spread_evenly_over_the_partitions() -> None:
    job_id = str(uuid.uuid4())
    counts = Counter(chunk_partition(job_id, idx, 1, 24) for idx in range(24 * 10))
    assert counts == dict.fromkeys(range(24), 10)


def test_single_chunk_jobs_reach_every_partition() -> None:
    used = {chunk_partition(str(uuid.uuid4()), 0, 1, 24) for _ in range(2000)}
    assert used == set(range(24))


def test_a_new_attempt_of_a_chunk_moves_to_another_partition() -> None:
    job_id = str(uuid.uuid4())
    assert len({chunk_partition(job_id, 7, attempt, 24) for attempt in (1, 2, 3)}) == 3
