"""Where the embedded broker's group coordinator departs from Kafka's, with the group protocol
spoken by hand so a test decides exactly when each member acts.

These record defects the services work around: a leader that leaves mid-rebalance strands the group
(`jobstream.kafka.leave_silently`), and a formed group ignores a new assignment unless some member's
metadata changed (`jobstream.kafka.counted_round_robin`). A broker upgrade that fixes one makes its
test fail, and the workaround can go.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiokafka import errors
from aiokafka.client import AIOKafkaClient, CoordinationType
from aiokafka.coordinator.protocol import (
    ConsumerProtocol,
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)
from aiokafka.protocol.group import JoinGroupRequest, LeaveGroupRequest, SyncGroupRequest

from jobstream.embedded.broker import EmbeddedBroker

GROUP = "probe"
SESSION_MS = 6_000
METADATA = ConsumerProtocolMemberMetadata(0, ["probe.topic"], b"").encode()
ASSIGNMENT = ConsumerProtocolMemberAssignment(0, [("probe.topic", [0])], b"").encode()
WIDER = ConsumerProtocolMemberAssignment(0, [("probe.topic", [0, 1])], b"").encode()


@dataclass
class Joined:
    error: type[Exception]
    member_id: str
    generation: int
    leader: str


def _error(code: int) -> type[Exception]:
    error: type[Exception] = errors.for_code(code)
    return error


class Coordinator:
    """One client speaking the group protocol for any number of members."""

    def __init__(self, client: AIOKafkaClient, node: int) -> None:
        self._client = client
        self._node = node

    async def join(self, member_id: str = "", metadata: bytes = METADATA) -> Joined:
        request = JoinGroupRequest(
            GROUP, SESSION_MS, SESSION_MS, member_id, None, ConsumerProtocol.PROTOCOL_TYPE, [("range", metadata)]
        )
        response = await self._client.send(self._node, request)
        return Joined(_error(response.error_code), response.member_id, response.generation_id, response.leader_id)

    async def new_member(self) -> str:
        """Asks for a member id; the broker counts the member in from then on."""
        joined = await self.join()
        assert joined.error is errors.MemberIdRequired and joined.member_id
        return joined.member_id

    async def sync(self, joined: Joined, assignment: bytes = ASSIGNMENT) -> type[Exception]:
        return (await self.sync_assignment(joined, assignment))[0]

    async def sync_assignment(self, joined: Joined, assignment: bytes) -> tuple[type[Exception], bytes]:
        """Syncs, the leader proposing `assignment` for itself; returns what the broker hands out."""
        assignments = [(joined.member_id, assignment)] if joined.leader == joined.member_id else []
        request = SyncGroupRequest(GROUP, joined.generation, joined.member_id, None, assignments)
        response = await self._client.send(self._node, request)
        return _error(response.error_code), bytes(response.member_assignment)

    async def leave(self, member_id: str) -> type[Exception]:
        response = await self._client.send(self._node, LeaveGroupRequest(GROUP, member_id))
        return _error(response.error_code)

    async def form(self, member_id: str) -> Joined:
        """Joins until the member holds an assignment; returns the join that got it."""
        while True:
            joined = await self.join(member_id)
            if joined.error is errors.NoError and await self.sync(joined) is errors.NoError:
                return joined
            await asyncio.sleep(0.2)


@pytest.fixture
async def coordinator(broker: EmbeddedBroker) -> AsyncIterator[Coordinator]:
    client = AIOKafkaClient(bootstrap_servers=broker.bootstrap)
    await client.bootstrap()
    try:
        node = await client.coordinator_lookup(CoordinationType.GROUP, GROUP)
        yield Coordinator(client, node)
    finally:
        await client.close()


async def _leader_while_rebalancing(coordinator: Coordinator) -> tuple[str, str]:
    """A formed group led by `a`, that `b` has just started to join: the group is rebalancing."""
    a = await coordinator.new_member()
    formed = await asyncio.wait_for(coordinator.form(a), 30)
    assert formed.leader == a
    b = await coordinator.new_member()
    return a, b


async def test_a_leader_leaving_mid_rebalance_strands_the_group(coordinator: Coordinator) -> None:
    a, b = await _leader_while_rebalancing(coordinator)

    assert await coordinator.leave(a) is errors.NoError

    # Well past the session timeout, the departed member is still the leader the others wait for.
    deadline = asyncio.get_running_loop().time() + 3 * SESSION_MS / 1000
    while asyncio.get_running_loop().time() < deadline:
        joined = await coordinator.join(b)
        assert joined.leader == a
        assert await coordinator.sync(joined) is errors.RebalanceInProgressError


async def test_a_silent_leader_is_replaced_once_its_session_expires(coordinator: Coordinator) -> None:
    a, b = await _leader_while_rebalancing(coordinator)

    # `a` says nothing more, like a member that stops without leaving.
    formed = await asyncio.wait_for(coordinator.form(b), 60)

    assert formed.leader == b != a


async def test_a_formed_group_takes_a_new_assignment_only_from_changed_metadata(coordinator: Coordinator) -> None:
    a = await coordinator.new_member()
    await asyncio.wait_for(coordinator.form(a), 30)

    # The leader joins again as it does when a topic grew, and assigns the new partition too.
    same = await coordinator.join(a)
    assert same.leader == a
    assert await coordinator.sync_assignment(same, WIDER) == (errors.NoError, ASSIGNMENT)

    changed = await coordinator.join(a, ConsumerProtocolMemberMetadata(0, ["probe.topic"], b"2").encode())
    assert changed.generation > same.generation
    assert await coordinator.sync_assignment(changed, WIDER) == (errors.NoError, WIDER)
