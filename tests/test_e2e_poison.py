"""A message no service can read, on every topic a service consumes, is skipped with a log line:
no service stops, and jobs go on running."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import pytest

from jobstream import topics
from jobstream.kafka import make_producer
from jobstream.v1 import jobstream_pb2 as pb
from tests.helpers import params, watch_all
from tests.stack import Stack

if TYPE_CHECKING:
    from tests.helpers import Client

pytestmark = pytest.mark.e2e
# Field 14 with wire type 6, which does not exist: no protobuf message parses it.
GARBAGE = b"\x76\x00garbage"


async def test_unreadable_messages_on_every_topic_stop_no_service(stack: Stack, client: Client) -> None:
    settings = stack.settings
    producer = make_producer(settings)
    await producer.start()
    try:
        for topic in (topics.SUBMITTED, topics.PROGRESS, topics.CONTROL, topics.CHUNKS, topics.UPDATES):
            # A key of a real-looking job, so each consumer gets as far as parsing the value.
            await producer.send_and_wait(settings.topic(topic), value=GARBAGE, key=str(uuid.uuid4()).encode())
    finally:
        await producer.stop()

    job = (await client.Submit(pb.SubmitRequest(kind="demo.sleep", params=params(chunks=30, ms=5)))).job
    events = await watch_all(client, job.id)

    assert events[-1].type == pb.JOB_SUCCEEDED, events[-1]
    exited = {name: proc.returncode for name, proc in stack.services.items() if not proc.alive}
    assert not exited, f"services exited: {exited}"
