"""The dev tenant's API key for a local stack, kept in a file only its owner can read.

A stack started again on the same data finds its key still valid and keeps it, so a terminal that
already uses the token goes on working; a key that was revoked (or data that was wiped) gets a new one.
"""

from __future__ import annotations

from pathlib import Path

import psycopg

from jobstream import api_keys
from jobstream.local_files import read_local, write_secret

DEV_TENANT = "dev"


async def provision_dev_token(database_url: str, path: Path) -> str:
    """The dev tenant's token: the one in `path` while it is valid, else a new key written there."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        token = read_local(path.name, path.parent)
        if token and await api_keys.key_is_valid(conn, token):
            return token
        await api_keys.ensure_tenant(conn, DEV_TENANT, "development")
        created = await api_keys.create_key(conn, DEV_TENANT, name="dev (local stack)")
    write_secret(path, created.token)
    return created.token
