"""Postgres plumbing: the connection pool every service uses and the schema migrations.

Statements pass lists as binary parameters (`%b`, an array's SQL unchanged): psycopg's text
format quotes an array element by element in Python, 3 to 4 times the client CPU of the binary
format (300 chunk successes: 5.3 ms against 1.4 ms a statement). Passing rows as one JSON
document instead costs as little, but jsonb_to_recordset is planned as 100 rows, and a cached
plan of a statement prepared while a table was small then scans the whole table.
"""

from __future__ import annotations

import asyncio
import logging
import random
import select
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, TypeVar

import psycopg
import psycopg.errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from jobstream.config import Settings

log = logging.getLogger(__name__)

# Any constant works; it only has to be the same for every process applying migrations.
_MIGRATION_LOCK = 0x6A6F6273


# Errors that mean Postgres cannot be reached right now, rather than a fault in what was asked of it:
# a loop that meets one waits and replays its input instead of dying.
# A session the server ended for sitting idle inside a transaction (its process was paused) is as
# lost as one whose server went away: the transaction rolled back, and the work is done again.
DATABASE_UNAVAILABLE = (psycopg.OperationalError, PoolTimeout, psycopg.errors.IdleInTransactionSessionTimeout)
# How long such a loop waits before it tries again.
DATABASE_RETRY_SECONDS = 1.0
# Postgres aborted the transaction to break a deadlock or a serialization conflict: running the
# same transaction again is the fix.
CONFLICTS = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
CONFLICT_TRIES = 5

T = TypeVar("T")


async def retry_conflicts(transaction: Callable[[], Awaitable[T]], what: str) -> T:
    """Runs `transaction` (one whole transaction, safe to run again) until it is not aborted by a
    conflict with a concurrent one, a few times at most."""
    for attempt in range(1, CONFLICT_TRIES):
        try:
            return await transaction()
        except CONFLICTS as err:
            log.info("%s: %s; running it again (try %d)", what, type(err).__name__, attempt + 1)
            await asyncio.sleep(random.uniform(0, 0.02 * attempt))
    return await transaction()


async def check_idle_connection(conn: psycopg.AsyncConnection[Any]) -> None:
    """Raises if a pooled connection is known dead, without a round trip to the server.

    An idle connection has nothing to read; if its socket is readable, the server closed it or sent
    a fatal error (a restart, a failover, an admin's terminate). psycopg_pool's own check runs a
    query on every checkout instead, which doubled the round trips of every short transaction.
    Discarding a healthy connection that merely got a notice is harmless: the pool opens another.
    """
    if conn.closed or conn.broken:
        raise psycopg.OperationalError("the connection is closed")
    readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    if readable:
        # Closed here, so the pool discards it and opens a new one (a connection that still looks
        # OK to libpq would go back into the pool and be handed out again).
        await conn.close()
        raise psycopg.OperationalError("the server closed the connection or sent an error while it was idle")


async def open_pool(
    settings: Settings, *, name: str, min_size: int = 1, idle_transaction_timeout_s: float | None = None
) -> AsyncConnectionPool:
    """Opens a pool and waits for its first connection, so a wrong URL fails at start, not later.

    With `idle_transaction_timeout_s`, the server ends a session that sits that long inside a
    transaction (its process paused or stuck), so the locks it holds do not stall everyone else.
    """
    kwargs: dict[str, Any] = {"autocommit": True, "application_name": f"jobstream-{name}"}
    if idle_transaction_timeout_s is not None:
        kwargs["options"] = f"-c idle_in_transaction_session_timeout={int(idle_transaction_timeout_s * 1000)}"
    pool = AsyncConnectionPool(
        settings.database_url,
        min_size=min_size,
        max_size=max(min_size, settings.db_pool_max),
        name=name,
        kwargs=kwargs,
        # A connection that died with the server (a restart, a failover) is replaced when taken,
        # instead of failing the first statement that uses it.
        check=check_idle_connection,
        open=False,
    )
    await pool.open(wait=True, timeout=30)
    return pool


def _migrations() -> list[tuple[int, str, str]]:
    files = resources.files("jobstream.schema")
    found = []
    for entry in files.iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


async def apply_schema(database_url: str) -> list[str]:
    """Applies the migrations not yet applied, each in its own transaction; returns their names.

    An advisory lock serialises concurrent starters (several replicas booting at once).
    """
    applied: list[str] = []
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cur = await conn.execute("SELECT version FROM schema_migrations")
            done = {row[0] for row in await cur.fetchall()}
            for version, name, sql in _migrations():
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql.encode())
                    await conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name))
                log.info("applied migration %s", name)
                applied.append(name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    return applied


async def broker_epoch(pool: AsyncConnectionPool) -> int:
    """The number of times a scheduler found the broker empty; a change means topics were re-created."""
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT coalesce(max(id), 0) FROM broker_epochs")
        row = await cur.fetchone()
    return int(row[0]) if row else 0
