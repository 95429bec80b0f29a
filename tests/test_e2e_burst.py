"""A burst larger than the gateway's event loop can take up at once is queued, not dropped: with
gRPC's default limits on calls waiting to be handled, the excess ended as a bare CANCELLED."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import TYPE_CHECKING

import grpc
import pytest

from jobstream.v1 import jobstream_pb2 as pb

if TYPE_CHECKING:
    from tests.helpers import Client

pytestmark = pytest.mark.e2e
BURST = 4000  # over the 3,000 at which gRPC's default cancels even the soft limit's excess


async def test_a_burst_of_calls_is_answered_whole(client: Client) -> None:
    missing = str(uuid.uuid4())

    async def one() -> str:
        try:
            await client.GetJob(pb.GetJobRequest(job_id=missing))
        except grpc.aio.AioRpcError as err:
            return str(err.code().name)
        return "OK"

    codes = Counter(await asyncio.gather(*(one() for _ in range(BURST))))

    assert codes == Counter({"NOT_FOUND": BURST}), codes
