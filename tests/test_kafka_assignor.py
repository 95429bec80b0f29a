"""The group assignor: its metadata must change whenever the leader has to hand out a new
assignment (see `jobstream.kafka.counted_round_robin`), and only then; and a job's partition
number goes to one member on every job-keyed topic, whatever the member count."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata

from jobstream.kafka import co_partitioned, counted_round_robin


@dataclass
class Cluster:
    """What the assignor reads of the cluster metadata: partitions per topic."""

    counts: dict[str, int] = field(default_factory=dict)

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return set(range(self.counts[topic])) if topic in self.counts else None


def test_metadata_is_stable_while_nothing_changes() -> None:
    cluster = Cluster({"jobs.chunks": 24})
    assignor = counted_round_robin(lambda: cluster)

    assert assignor.metadata(["jobs.chunks"]).encode() == assignor.metadata(["jobs.chunks"]).encode()


def test_leader_metadata_changes_after_assigning_from_other_counts_than_it_reported() -> None:
    # The cache still holds the counts from before the broker came back empty...
    cached = Cluster({"jobs.chunks": 24})
    assignor = counted_round_robin(lambda: cached)
    joined = assignor.metadata(["jobs.chunks"])
    # ...while the leader assigns from fresh metadata: the topic auto-created with 4 partitions.
    members = {"m1": ConsumerProtocolMemberMetadata(0, ["jobs.chunks"], b"")}
    assignment = assignor.assign(Cluster({"jobs.chunks": 4}), members)
    assert assignment["m1"].assignment == [("jobs.chunks", [0, 1, 2, 3])]

    # The topic is re-created with 24: the leader's next join must not look like its last one.
    rejoined = assignor.metadata(["jobs.chunks"])

    assert rejoined.encode() != joined.encode()
    assignor.assign(Cluster({"jobs.chunks": 24}), members)
    assert assignor.metadata(["jobs.chunks"]).encode() != rejoined.encode()


def test_a_partition_count_change_changes_the_metadata() -> None:
    cluster = Cluster({"jobs.chunks": 4})
    assignor = counted_round_robin(lambda: cluster)
    before = assignor.metadata(["jobs.chunks"]).encode()

    cluster.counts["jobs.chunks"] = 24

    assert assignor.metadata(["jobs.chunks"]).encode() != before


JOB_TOPICS = ["jobs.submitted", "jobs.progress", "jobs.control"]


@pytest.mark.parametrize("count", [1, 2, 3, 5, 7, 8, 12, 13])
def test_every_member_reads_its_partition_numbers_on_every_job_topic(count: int) -> None:
    cluster = Cluster({topic: 12 for topic in JOB_TOPICS})
    members = {f"m{i}": ConsumerProtocolMemberMetadata(0, JOB_TOPICS, b"") for i in range(count)}

    assignment = co_partitioned(cluster, members)

    numbers = {}
    taken: list[tuple[str, int]] = []
    for member, given in assignment.items():
        per_topic = dict(given.assignment)
        assert set(per_topic) <= set(JOB_TOPICS)
        owned = {tuple(parts) for parts in per_topic.values()}
        assert len(owned) <= 1, f"{member} holds different partition numbers on different topics: {per_topic}"
        numbers[member] = next(iter(owned), ())
        taken += [(topic, p) for topic, parts in per_topic.items() for p in parts]
    assert sorted(taken) == sorted((topic, p) for topic in JOB_TOPICS for p in range(12))
    sizes = [len(n) for n in numbers.values()]
    assert max(sizes) - min(sizes) <= 1


def test_a_single_topic_is_dealt_round_robin() -> None:
    members = {m: ConsumerProtocolMemberMetadata(0, ["jobs.chunks"], b"") for m in ("a", "b", "c")}

    assignment = co_partitioned(Cluster({"jobs.chunks": 7}), members)

    assert {m: a.assignment for m, a in assignment.items()} == {
        "a": [("jobs.chunks", [0, 3, 6])],
        "b": [("jobs.chunks", [1, 4])],
        "c": [("jobs.chunks", [2, 5])],
    }
