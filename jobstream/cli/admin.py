"""`jobstream tenants …` and `jobstream keys …`: operators manage tenants and API keys in Postgres.

These talk to the database itself rather than to the gateway: whoever may reach Postgres already
holds every key's power, and no API exists through which a leaked tenant key could mint others.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TextIO

import psycopg

from jobstream import api_keys
from jobstream.errors import JobstreamError
from jobstream.local_files import DATABASE_URL_FILE, STATE_DIR, read_local

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
Action = Callable[[api_keys.Connection, argparse.Namespace, TextIO], Awaitable[None]]


def _when(moment: dt.datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
    )


async def create_tenant(conn: api_keys.Connection, args: argparse.Namespace, out: TextIO) -> None:
    await api_keys.create_tenant(conn, args.tenant, args.name)
    print(f"tenant {args.tenant} created", file=out)


async def list_tenants(conn: api_keys.Connection, args: argparse.Namespace, out: TextIO) -> None:
    rows = [(tenant, name, _when(created)) for tenant, name, created in await api_keys.list_tenants(conn)]
    print(_table(("TENANT", "NAME", "CREATED"), rows), file=out)


async def create_key(conn: api_keys.Connection, args: argparse.Namespace, out: TextIO) -> None:
    created = await api_keys.create_key(conn, args.tenant, args.name)
    # The token alone on stdout, so `TOKEN=$(jobstream keys create …)` works; the rest on stderr.
    print(created.token, file=out)
    print(
        f"jobstream: key {created.key.id} for tenant {created.key.tenant_id}; the token is shown only now",
        file=sys.stderr,
    )


async def revoke_key(conn: api_keys.Connection, args: argparse.Namespace, out: TextIO) -> None:
    key = await api_keys.revoke_key(conn, args.key_id)
    print(f"key {key.id} of tenant {key.tenant_id} revoked at {_when(key.revoked_at)}", file=out)


async def list_keys(conn: api_keys.Connection, args: argparse.Namespace, out: TextIO) -> None:
    keys = await api_keys.list_keys(conn, args.tenant)
    rows = [(k.id, k.tenant_id, k.name, _when(k.created_at), _when(k.revoked_at)) for k in keys]
    print(_table(("KEY", "TENANT", "NAME", "CREATED", "REVOKED"), rows), file=out)


ACTIONS: dict[tuple[str, str], Action] = {
    ("tenants", "create"): create_tenant,
    ("tenants", "list"): list_tenants,
    ("keys", "create"): create_key,
    ("keys", "revoke"): revoke_key,
    ("keys", "list"): list_keys,
}


async def _act(action: Action, database_url: str, args: argparse.Namespace) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True, connect_timeout=10) as conn:
        await action(conn, args, sys.stdout)


def run(args: argparse.Namespace) -> int:
    """0 done, 1 refused (exists, not found, bad id), 2 no database named, 3 Postgres unreachable."""
    database_url = args.database_url or read_local(DATABASE_URL_FILE)
    if not database_url:
        print(
            f"jobstream: no database: pass --database-url, set JOBSTREAM_DATABASE_URL, or run `jobstream up`"
            f" (which writes {STATE_DIR / DATABASE_URL_FILE})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        asyncio.run(_act(ACTIONS[args.command, args.action], database_url, args))
    except JobstreamError as err:
        print(f"jobstream: {err}", file=sys.stderr)
        return EXIT_FAILED
    except psycopg.OperationalError as err:
        print(f"jobstream: cannot reach Postgres: {err}", file=sys.stderr)
        return EXIT_UNREACHABLE
    return EXIT_OK
