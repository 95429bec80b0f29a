"""The group assignor's metadata: it must change whenever the leader has to hand out a new
assignment (see `jobstream.kafka.counted_round_robin`), and only then."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata

from jobstream.kafka import counted_round_robin


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
