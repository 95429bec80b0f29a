"""How the embedded broker's group coordinator treats a leader that goes away mid-rebalance.

These record a defect the services work around (`jobstream.kafka.leave_silently`): a broker upgrade
that fixes it makes the first test fail, and the workaround can go.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

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
    """Speaks the group protocol by hand, so a test decides exactly when each member acts."""

    def __init__(self, client: AIOKafkaClient, node: int) -> None:
        self._client = client
        self._node = node

    async def join(self, member_id: str = "") -> Joined:
        request = JoinGroupRequest(
            GROUP, SESSION_MS, SESSION_MS, member_id, None, ConsumerProtocol.PROTOCOL_TYPE, [("range", METADATA)]
        )
        response = await self._client.send(self._node, request)
        return Joined(_error(response.error_code), response.member_id, response.generation_id, response.leader_id)

    async def new_member(self) -> str:
        """Asks for a member id; the broker counts the member in from then on."""
        joined = await self.join()
        assert joined.error is errors.MemberIdRequired and joined.member_id
        return joined.member_id

    async def sync(self, joined: Joined) -> type[Exception]:
        assignments = [(joined.member_id, ASSIGNMENT)] if joined.leader == joined.member_id else []
        request = SyncGroupRequest(GROUP, joined.generation, joined.member_id, None, assignments)
        response = await self._client.send(self._node, request)
        return _error(response.error_code)

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
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(tmp_path) as started:
        yield started


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
