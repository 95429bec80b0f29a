"""The pool's check finds connections the server dropped while they sat idle, without a query."""

from __future__ import annotations

import psycopg
import pytest

from jobstream.db import check_idle_connection
from tests.helpers import wait_for
from tests.stack import Stack

pytestmark = pytest.mark.e2e


async def test_a_healthy_idle_connection_passes_and_a_terminated_one_is_closed(stack: Stack) -> None:
    async with (
        await psycopg.AsyncConnection.connect(stack.database_url, autocommit=True) as idle,
        await psycopg.AsyncConnection.connect(stack.database_url, autocommit=True) as admin,
    ):
        await idle.execute("SELECT 1")
        await check_idle_connection(idle)  # nothing to read: healthy

        await admin.execute("SELECT pg_terminate_backend(%s)", (idle.info.backend_pid,))

        async def refused() -> bool:
            try:
                await check_idle_connection(idle)
            except psycopg.OperationalError:
                return True
            return False

        await wait_for(refused, within=10, what="the check to notice the terminated connection")
        assert idle.closed  # so the pool discards it rather than handing it out again
