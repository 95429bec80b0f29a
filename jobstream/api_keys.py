"""Tenants and their API keys: the token format, and the rows behind them.

A token reads `jsk_<key id>_<secret>`. The key id is public (listed, revoked by it); the secret is
shown once, when the key is created, and only its SHA-256 is kept. The gateway checks a token with
one primary-key read per call, so a revoked key stops working on its very next call. The CLI's
`tenants` and `keys` commands and the embedded stack's dev key use the same functions.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg.errors

from jobstream.errors import AlreadyExists, InvalidArgument, NotFound, Unauthenticated

PREFIX = "jsk_"
KEY_ID_HEX = 16
TOKEN = re.compile(rf"{PREFIX}(?P<key_id>[0-9a-f]{{{KEY_ID_HEX}}})_(?P<secret>.+)", re.DOTALL)
TENANT_ID = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
Connection = psycopg.AsyncConnection[Any]


@dataclass(frozen=True)
class ApiKey:
    id: str
    tenant_id: str
    name: str
    created_at: dt.datetime
    revoked_at: dt.datetime | None


@dataclass(frozen=True)
class NewKey:
    key: ApiKey
    token: str  # the only time the secret exists outside the caller's hands


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_token(token: str) -> tuple[str, str]:
    """(key id, secret) of a well-formed token; Unauthenticated names what is wrong with another."""
    match = TOKEN.fullmatch(token)
    if match is None:
        raise Unauthenticated(f"the API key is malformed: jobstream keys look like {PREFIX}<16 hex digits>_<secret>")
    return match["key_id"], match["secret"]


def bearer_token(metadata: Any) -> str:
    """The token of the call's `authorization: Bearer <token>` metadata."""
    values = [value for key, value in metadata or () if key == "authorization"]
    if not values:
        raise Unauthenticated("no API key: send the metadata 'authorization: Bearer <api key>'")
    scheme, _, token = str(values[0]).partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the authorization metadata must read 'Bearer <api key>'")
    return token.strip()


Parsed = tuple[str, str] | Unauthenticated  # (key id, secret), or why the token is malformed
KeyRow = tuple[str, bytes]  # an unrevoked key's tenant and secret digest


def parse_tokens(tokens: list[str]) -> list[Parsed]:
    parsed: list[Parsed] = []
    for token in tokens:
        try:
            parsed.append(parse_token(token))
        except Unauthenticated as err:
            parsed.append(err)
    return parsed


async def tenants_of(conn: Connection, tokens: list[str]) -> list[str | Unauthenticated]:
    """For each token, the tenant of its valid, unrevoked key, or why it is refused; one query
    for all of them."""
    parsed = parse_tokens(tokens)
    key_ids = sorted({p[0] for p in parsed if isinstance(p, tuple)})
    rows: dict[str, KeyRow] = {}
    if key_ids:  # malformed tokens alone cost no query
        cur = await conn.execute(
            "SELECT id, tenant_id, secret_sha256 FROM api_keys WHERE id = ANY(%s) AND revoked_at IS NULL", (key_ids,)
        )
        rows = {str(r[0]): (str(r[1]), bytes(r[2])) for r in await cur.fetchall()}
    return [verify(p, rows.get(p[0]) if isinstance(p, tuple) else None) for p in parsed]


def verify(parsed: Parsed, key: KeyRow | None) -> str | Unauthenticated:
    """The tenant of a parsed token whose key row (unrevoked, else None) was read; or why not."""
    if isinstance(parsed, Unauthenticated):
        return parsed
    key_id, secret = parsed
    # Compared in constant time, and the same answer for an unknown, a revoked and a wrong key.
    if key is None or not hmac.compare_digest(key[1], _digest(secret)):
        return Unauthenticated(f"API key {key_id} is unknown, revoked or wrong")
    return key[0]


async def tenant_of(conn: Connection, token: str) -> str:
    """The tenant a valid, unrevoked key belongs to."""
    (outcome,) = await tenants_of(conn, [token])
    if isinstance(outcome, Unauthenticated):
        raise outcome
    return outcome


def check_tenant_id(tenant_id: str) -> None:
    if not TENANT_ID.fullmatch(tenant_id):
        raise InvalidArgument(
            f"tenant id {tenant_id[:80]!r}: use 1 to 63 lower-case letters, digits and inner dashes", field="tenant"
        )


async def create_tenant(conn: Connection, tenant_id: str, name: str = "") -> None:
    check_tenant_id(tenant_id)
    try:
        await conn.execute("INSERT INTO tenants (id, name) VALUES (%s, %s)", (tenant_id, name or tenant_id))
    except psycopg.errors.UniqueViolation:
        raise AlreadyExists(f"tenant {tenant_id} already exists") from None


async def ensure_tenant(conn: Connection, tenant_id: str, name: str = "") -> None:
    check_tenant_id(tenant_id)
    await conn.execute(
        "INSERT INTO tenants (id, name) VALUES (%s, %s) ON CONFLICT (id) DO NOTHING", (tenant_id, name or tenant_id)
    )


async def list_tenants(conn: Connection) -> list[tuple[str, str, dt.datetime]]:
    cur = await conn.execute("SELECT id, name, created_at FROM tenants ORDER BY id")
    return [(str(r[0]), str(r[1]), r[2]) for r in await cur.fetchall()]


async def create_key(conn: Connection, tenant_id: str, name: str = "") -> NewKey:
    key_id, secret = secrets.token_hex(KEY_ID_HEX // 2), secrets.token_urlsafe(32)
    try:
        cur = await conn.execute(
            "INSERT INTO api_keys (id, tenant_id, name, secret_sha256) VALUES (%s, %s, %s, %s)"
            " RETURNING id, tenant_id, name, created_at, revoked_at",
            (key_id, tenant_id, name, _digest(secret)),
        )
    except psycopg.errors.ForeignKeyViolation:
        raise NotFound(f"tenant {tenant_id} does not exist; create it with `jobstream tenants create`") from None
    row = await cur.fetchone()
    assert row is not None
    return NewKey(ApiKey(*row), f"{PREFIX}{key_id}_{secret}")


async def revoke_key(conn: Connection, key_id: str) -> ApiKey:
    """Revokes the key (again is fine: the first revocation time stays)."""
    cur = await conn.execute(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = %s"
        " RETURNING id, tenant_id, name, created_at, revoked_at",
        (key_id,),
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"API key {key_id} does not exist")
    return ApiKey(*row)


async def list_keys(conn: Connection, tenant_id: str = "") -> list[ApiKey]:
    cur = await conn.execute(
        "SELECT id, tenant_id, name, created_at, revoked_at FROM api_keys"
        " WHERE %s = '' OR tenant_id = %s ORDER BY tenant_id, created_at",
        (tenant_id, tenant_id),
    )
    return [ApiKey(*row) for row in await cur.fetchall()]


async def key_is_valid(conn: Connection, token: str) -> bool:
    try:
        await tenant_of(conn, token)
    except Unauthenticated:
        return False
    return True
