"""API keys: random, recognisable by their prefix, stored only as an HMAC.

A key reads `psk_<key id>_<secret>`. The key id is public and finds the row; the whole
key is hashed with HMAC-SHA256 under `PAYSAGA_API_KEY_SECRET`, so a copy of the
database alone cannot be used to forge or recover a key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

KEY_PREFIX = "psk_"
SCOPES = frozenset({"payments:write", "payments:read", "accounts:write", "accounts:read", "ops"})
KEY_NAME_LENGTH_MAX = 100
_KEY_PATTERN = re.compile(r"^psk_(?P<key_id>[a-z0-9]{12})_(?P<secret>[A-Za-z0-9_-]{43})$")


class ApiKeyError(ValueError):
    """Bad input to an API key command (unknown scope, bad name, unknown key)."""


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    name: str
    scopes: frozenset[str]
    created_at: datetime
    revoked_at: datetime | None


def parse_scopes(raw: str) -> frozenset[str]:
    """`a,b,c` into a set of known scopes; anything unknown is an error, not ignored."""
    scopes = frozenset(part.strip() for part in raw.split(",") if part.strip())
    if not scopes:
        raise ApiKeyError(
            "at least one scope is needed; known scopes: " + ", ".join(sorted(SCOPES))
        )
    unknown = scopes - SCOPES
    if unknown:
        raise ApiKeyError(
            f"unknown scope(s): {', '.join(sorted(unknown))}; known scopes: "
            + ", ".join(sorted(SCOPES))
        )
    return scopes


def hash_key(secret: str, presented: str) -> bytes:
    return hmac.new(secret.encode(), presented.encode(), hashlib.sha256).digest()


async def create_api_key(
    engine: AsyncEngine, secret: str, *, name: str, scopes: frozenset[str]
) -> tuple[str, str]:
    """Store a new key's hash. Returns (key id, the key): the only time the key exists."""
    name = name.strip()
    if not 1 <= len(name) <= KEY_NAME_LENGTH_MAX:
        raise ApiKeyError(f"the name must be 1 to {KEY_NAME_LENGTH_MAX} characters")
    parse_scopes(",".join(scopes))
    key_id = secrets.token_hex(6)
    key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO api_keys (key_id, name, key_hash, scopes) "
                "VALUES (:key_id, :name, :key_hash, :scopes)"
            ),
            {
                "key_id": key_id,
                "name": name,
                "key_hash": hash_key(secret, key),
                "scopes": sorted(scopes),
            },
        )
    return key_id, key


async def revoke_api_key(engine: AsyncEngine, key_id: str) -> ApiKey:
    """Disable a key for good. Revoking twice keeps the first revocation time."""
    async with engine.begin() as conn:
        row = (
            await conn.execute(
                text(
                    "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) "
                    "WHERE key_id = :key_id "
                    "RETURNING key_id, name, scopes, created_at, revoked_at"
                ),
                {"key_id": key_id},
            )
        ).one_or_none()
    if row is None:
        raise ApiKeyError(f"no API key with id {key_id!r}")
    return ApiKey(row.key_id, row.name, frozenset(row.scopes), row.created_at, row.revoked_at)


async def list_api_keys(engine: AsyncEngine) -> list[ApiKey]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT key_id, name, scopes, created_at, revoked_at FROM api_keys "
                "ORDER BY created_at"
            )
        )
        return [
            ApiKey(r.key_id, r.name, frozenset(r.scopes), r.created_at, r.revoked_at) for r in rows
        ]


async def authenticate(conn: AsyncConnection, secret: str, presented: str) -> ApiKey | None:
    """The live key that `presented` is, or None. Constant-time on the hash comparison."""
    match = _KEY_PATTERN.match(presented)
    if match is None:
        return None
    row = (
        await conn.execute(
            text(
                "SELECT key_id, name, key_hash, scopes, created_at, revoked_at "
                "FROM api_keys WHERE key_id = :key_id"
            ),
            {"key_id": match["key_id"]},
        )
    ).one_or_none()
    if row is None or row.revoked_at is not None:
        return None
    if not hmac.compare_digest(bytes(row.key_hash), hash_key(secret, presented)):
        return None
    return ApiKey(row.key_id, row.name, frozenset(row.scopes), row.created_at, None)
