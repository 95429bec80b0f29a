from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import psycopg
import pytest

from jobstream.embedded.broker import EmbeddedBroker
from jobstream.embedded.postgres import EmbeddedPostgres
from jobstream.v1 import jobstream_pb2_grpc as pb_grpc
from tests.stack import Stack

if TYPE_CHECKING:
    from tests.helpers import Client

WORKERS = 3


@pytest.fixture(scope="session")
def stack_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
async def stack(stack_root: Path) -> AsyncIterator[Stack]:
    """One real stack for the session: Postgres, broker, scheduler, gateway and 3 workers."""
    stack = Stack(
        root=stack_root,
        postgres=EmbeddedPostgres(stack_root / "postgres", durable=False),
        broker=EmbeddedBroker(stack_root / "broker"),
    )
    try:
        await stack.start(workers=WORKERS)
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
async def channel(stack: Stack) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(stack.gateway_addr) as channel:
        yield channel


@pytest.fixture(scope="session")
def client(channel: grpc.aio.Channel) -> Client:
    return pb_grpc.JobServiceStub(channel)


@pytest.fixture
async def db(stack: Stack) -> AsyncIterator[psycopg.AsyncConnection[tuple[object, ...]]]:
    async with await psycopg.AsyncConnection.connect(stack.database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def new_id() -> Iterator[str]:
    yield str(uuid.uuid4())
