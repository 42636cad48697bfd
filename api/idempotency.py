"""Idempotency-Key, following the IETF httpapi draft and Stripe.

A key is scoped to the API key that sent it and stored in PostgreSQL, where a
primary key makes one request the owner: concurrent identical requests create one
resource, and the rest are told to wait (409) or get the stored response.

| request                                   | answer                                        |
|-------------------------------------------|-----------------------------------------------|
| no key                                    | 400                                           |
| same key, same body                       | the stored response, `Idempotent-Replayed: true` |
| same key, different body                  | 422                                           |
| same key while the first is in flight     | 409                                           |

Retention: 30 days. A request that died in flight holds its key for a one-minute lease;
after that a retry takes it over and finishes the job, which is safe because the
resource id derives from the two keys and every step below is idempotent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from api.problems import ProblemError

RETENTION = timedelta(days=30)
IN_FLIGHT_LEASE = timedelta(seconds=60)
KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII, no spaces
REPLAYED_HEADER = "Idempotent-Replayed"


def require_key(raw: str | None) -> str:
    if raw is None:
        raise ProblemError(
            400,
            "idempotency_key_missing",
            "this request creates something: send an Idempotency-Key header",
        )
    if not KEY_PATTERN.match(raw):
        raise ProblemError(
            400,
            "idempotency_key_invalid",
            "an Idempotency-Key is 1 to 255 printable ASCII characters, without spaces",
        )
    return raw


def request_hash(method: str, path: str, body: dict[str, Any]) -> bytes:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{method} {path}\n{canonical}".encode()).digest()


def derived_id(prefix: str, api_key_id: str, idempotency_key: str) -> str:
    """The id of what a keyed request creates: the same for every repeat of it."""
    digest = hashlib.sha256(f"{api_key_id}\n{idempotency_key}".encode()).digest()
    return f"{prefix}_{base64.b32encode(digest).decode().lower().rstrip('=')[:26]}"


@dataclass(frozen=True)
class Replay:
    status: int
    body: dict[str, Any]


@dataclass(frozen=True)
class Claim:
    """Either ours to carry out (`replay` is None), or an answer already given."""

    resource_id: str
    replay: Replay | None = None


class IdempotencyStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def lookup(self, api_key_id: str, key: str, fingerprint: bytes) -> Claim | None:
        """What became of an earlier request with this key, if there was one.

        Returns its stored answer (a replay), or None if the key is new; refuses a key
        reused for another request (422) or one still in flight (409). A request that
        died in flight is handed over (returned as ours) once its lease runs out.
        """
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT request_hash, state, resource_id, response_status, response_body, "
                        "locked_until < now() AS lease_expired FROM idempotency_keys "
                        "WHERE api_key_id = :api AND idempotency_key = :key"
                    ),
                    {"api": api_key_id, "key": key},
                )
            ).one_or_none()
        if row is None:
            return None
        if bytes(row.request_hash) != fingerprint:
            raise ProblemError(
                422,
                "idempotency_key_reused",
                "this Idempotency-Key was used for a different request; use a new key",
            )
        if row.state == "completed":
            return Claim(row.resource_id, Replay(row.response_status, row.response_body))
        if row.lease_expired and await self._take_over(api_key_id, key):
            return Claim(row.resource_id)
        raise ProblemError(
            409,
            "idempotency_key_in_flight",
            "a request with this Idempotency-Key is still being processed; retry shortly",
            headers={"Retry-After": "1"},
        )

    async def _take_over(self, api_key_id: str, key: str) -> bool:
        async with self.engine.begin() as conn:
            taken = await conn.execute(
                text(
                    "UPDATE idempotency_keys SET locked_until = now() + :lease "
                    "WHERE api_key_id = :api AND idempotency_key = :key "
                    "AND state = 'in_flight' AND locked_until < now()"
                ),
                {"api": api_key_id, "key": key, "lease": IN_FLIGHT_LEASE},
            )
            return taken.rowcount == 1

    async def claim(self, api_key_id: str, key: str, fingerprint: bytes, resource_id: str) -> Claim:
        """Make this request the key's owner; or, if another got there first, defer to it."""
        async with self.engine.begin() as conn:
            inserted = (
                await conn.execute(
                    text(
                        "INSERT INTO idempotency_keys (api_key_id, idempotency_key, request_hash, "
                        "state, resource_id, locked_until, expires_at) VALUES (:api, :key, :hash, "
                        "'in_flight', :resource, now() + :lease, now() + :retention) "
                        "ON CONFLICT DO NOTHING RETURNING resource_id"
                    ),
                    {
                        "api": api_key_id,
                        "key": key,
                        "hash": fingerprint,
                        "resource": resource_id,
                        "lease": IN_FLIGHT_LEASE,
                        "retention": RETENTION,
                    },
                )
            ).scalar_one_or_none()
        if inserted is not None:
            return Claim(resource_id)
        existing = await self.lookup(api_key_id, key, fingerprint)
        if existing is None:  # the owner released it meanwhile: try once more
            return await self.claim(api_key_id, key, fingerprint, resource_id)
        return existing

    async def complete(self, api_key_id: str, key: str, status: int, body: dict[str, Any]) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                text(
                    "UPDATE idempotency_keys SET state = 'completed', response_status = :status, "
                    "response_body = CAST(:body AS jsonb) "
                    "WHERE api_key_id = :api AND idempotency_key = :key"
                ),
                {"api": api_key_id, "key": key, "status": status, "body": json.dumps(body)},
            )

    async def release(self, api_key_id: str, key: str) -> None:
        """The request failed before it created anything: forget the key, as if never sent."""
        async with self.engine.begin() as conn:
            await conn.execute(
                text(
                    "DELETE FROM idempotency_keys "
                    "WHERE api_key_id = :api AND idempotency_key = :key AND state = 'in_flight'"
                ),
                {"api": api_key_id, "key": key},
            )
