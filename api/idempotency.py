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

Retention: 30 days. The owner of an in-flight key holds a lease of
`IN_FLIGHT_LEASE_S`, renewed in the background for as long as it works, so a request
whose process died is taken over by a retry within seconds. A takeover finishes the
job: the resource id derives from the two keys, and every step that creates is
idempotent (the workflow start, the account's event id).

When a request fails, its key is:

- released (deleted, as if never sent) only when nothing was created;
- otherwise kept, with its request fingerprint (a different body still gets 422), and
  handed to the next retry at once, which finishes the job.

The lease's expiry time doubles as its fencing token: a renewal, a release or a
hand-over only touches the row while it still carries the expiry this request set,
so a request that lost its key to a takeover can no longer change it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from api.problems import ProblemError

log = logging.getLogger("paysaga.api.idempotency")

RETENTION = timedelta(days=30)
IN_FLIGHT_LEASE_S = 5.0
# Three renewals per lease: one lost renewal never lets a live request's key lapse.
LEASE_RENEW_INTERVAL_S = IN_FLIGHT_LEASE_S / 3
# Releasing or handing over a key after a failure: bounded, and done even when the
# request itself was cancelled (its client went away).
SETTLE_TIMEOUT_S = 5.0
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
    """Either ours to carry out (`replay` is None), or an answer already given.

    `lease_until` is the expiry of our lease on the key, when it is ours; `taken_over`
    says an earlier request held it first (and may have created the resource).
    """

    resource_id: str
    replay: Replay | None = None
    lease_until: datetime | None = None
    taken_over: bool = False


_LEASE = timedelta(seconds=IN_FLIGHT_LEASE_S)
_WHERE_KEY = "api_key_id = :api AND idempotency_key = :key"
_WHERE_OURS = f"{_WHERE_KEY} AND state = 'in_flight' AND locked_until = :lease_until"


class IdempotencyStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def lookup(self, api_key_id: str, key: str, fingerprint: bytes) -> Claim | None:
        """What became of an earlier request with this key, if there was one.

        Returns its stored answer (a replay), or None if the key is new; refuses a key
        reused for another request (422) or one still in flight (409). A request that
        died or failed in flight is handed over (returned as ours) once its lease is out.
        """
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT request_hash, state, resource_id, response_status, response_body, "
                        "locked_until <= now() AS lease_expired FROM idempotency_keys "
                        f"WHERE {_WHERE_KEY}"
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
        if row.lease_expired:
            lease_until = await self._take_over(api_key_id, key)
            if lease_until is not None:
                return Claim(row.resource_id, lease_until=lease_until, taken_over=True)
        raise ProblemError(
            409,
            "idempotency_key_in_flight",
            "a request with this Idempotency-Key is still being processed; retry shortly",
            headers={"Retry-After": "1"},
        )

    async def _take_over(self, api_key_id: str, key: str) -> datetime | None:
        async with self.engine.begin() as conn:
            taken: datetime | None = (
                await conn.execute(
                    text(
                        "UPDATE idempotency_keys SET locked_until = clock_timestamp() + :lease "
                        f"WHERE {_WHERE_KEY} AND state = 'in_flight' AND locked_until <= now() "
                        "RETURNING locked_until"
                    ),
                    {"api": api_key_id, "key": key, "lease": _LEASE},
                )
            ).scalar_one_or_none()
        return taken

    async def claim(self, api_key_id: str, key: str, fingerprint: bytes, resource_id: str) -> Claim:
        """Make this request the key's owner; or, if another got there first, defer to it."""
        async with self.engine.begin() as conn:
            lease_until: datetime | None = (
                await conn.execute(
                    text(
                        "INSERT INTO idempotency_keys (api_key_id, idempotency_key, request_hash, "
                        "state, resource_id, locked_until, expires_at) VALUES (:api, :key, :hash, "
                        "'in_flight', :resource, clock_timestamp() + :lease, now() + :retention) "
                        "ON CONFLICT DO NOTHING RETURNING locked_until"
                    ),
                    {
                        "api": api_key_id,
                        "key": key,
                        "hash": fingerprint,
                        "resource": resource_id,
                        "lease": _LEASE,
                        "retention": RETENTION,
                    },
                )
            ).scalar_one_or_none()
        if lease_until is not None:
            return Claim(resource_id, lease_until=lease_until)
        existing = await self.lookup(api_key_id, key, fingerprint)
        if existing is None:  # the owner released it meanwhile: try once more
            return await self.claim(api_key_id, key, fingerprint, resource_id)
        return existing

    @contextlib.asynccontextmanager
    async def hold(self, api_key_id: str, key: str, claim: Claim) -> AsyncIterator[Lease]:
        """Carry out a claimed request under a lease renewed until it is settled.

        A key left unsettled (by an exception) is released if nothing can have been
        created (no `Lease.may_create`, no earlier holder), and otherwise handed over to
        the next retry at once.
        """
        if claim.lease_until is None:
            raise ValueError("only a claim that is ours can be held")
        lease = Lease(self.engine, api_key_id, key, claim.lease_until, claim.taken_over)
        try:
            yield lease
        finally:
            # A task of its own, so that it finishes even if this request is cancelled
            # meanwhile (its client went away, or the server is stopping).
            settling = asyncio.create_task(lease.settle_if_unsettled())
            _settling.add(settling)
            settling.add_done_callback(_settling.discard)
            await asyncio.wait([settling], timeout=SETTLE_TIMEOUT_S)


_settling: set[asyncio.Task[None]] = set()


class Lease:
    """This request's hold on an in-flight key, from claim to settlement."""

    def __init__(
        self, engine: AsyncEngine, api_key_id: str, key: str, until: datetime, inherited: bool
    ) -> None:
        self._engine = engine
        self._params: dict[str, Any] = {"api": api_key_id, "key": key}
        self._until = until
        self._settled = False
        # An earlier holder may have created the resource before it died.
        self._inherited = inherited
        self._may_have_created = False
        # Stopped between statements, never cancelled inside one: a cancelled statement
        # can leave its pooled connection unusable.
        self._stop = asyncio.Event()
        self._renewer = asyncio.create_task(self._renew_until_stopped())

    def may_create(self) -> None:
        """From here on, a failure may leave something created: never release the key."""
        self._may_have_created = True

    async def complete(self, status: int, body: dict[str, Any]) -> None:
        """Store the answer: every later request with this key gets it back."""
        await self._stop_renewing()
        async with self._engine.begin() as conn:
            # Not fenced: a takeover answers for the same resource, and the first
            # answer stored is the one every repeat gets.
            await conn.execute(
                text(
                    "UPDATE idempotency_keys SET state = 'completed', response_status = :status, "
                    f"response_body = CAST(:body AS jsonb) WHERE {_WHERE_KEY} "
                    "AND state = 'in_flight'"
                ),
                {**self._params, "status": status, "body": json.dumps(body)},
            )
        self._settled = True

    async def release(self) -> None:
        """This request created nothing: forget the key, as if it had never been sent.

        Unless an earlier holder may have created something: then hand it over.
        """
        if self._inherited:
            await self.hand_over()
            return
        await self._settle(f"DELETE FROM idempotency_keys WHERE {_WHERE_OURS}")

    async def hand_over(self) -> None:
        """What the request did is unknown: keep the key, free for a retry to finish."""
        await self._settle(
            f"UPDATE idempotency_keys SET locked_until = '-infinity' WHERE {_WHERE_OURS}"
        )

    async def settle_if_unsettled(self) -> None:
        """Release or hand over a key its request left unsettled; bounded, never raises."""
        try:
            async with asyncio.timeout(SETTLE_TIMEOUT_S):
                await self._stop_renewing()
                if not self._settled:
                    await (self.hand_over() if self._may_have_created else self.release())
        except Exception:
            # The lease runs out within IN_FLIGHT_LEASE_S; a retry takes over then.
            log.warning("could not settle an idempotency key after a failure", exc_info=True)

    async def _settle(self, statement: str) -> None:
        await self._stop_renewing()
        async with self._engine.begin() as conn:
            await conn.execute(text(statement), {**self._params, "lease_until": self._until})
        self._settled = True

    async def _stop_renewing(self) -> None:
        self._stop.set()
        await asyncio.wait([self._renewer])

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _renew_until_stopped(self) -> None:
        """Push the lease out every LEASE_RENEW_INTERVAL_S, until stopped or lost."""
        while not await self._stopped_within(LEASE_RENEW_INTERVAL_S):
            try:
                async with self._engine.begin() as conn:
                    renewed: datetime | None = (
                        await conn.execute(
                            text(
                                "UPDATE idempotency_keys "
                                "SET locked_until = clock_timestamp() + :lease "
                                f"WHERE {_WHERE_OURS} RETURNING locked_until"
                            ),
                            {**self._params, "lease_until": self._until, "lease": _LEASE},
                        )
                    ).scalar_one_or_none()
            except Exception:
                # The database may be back before the lease runs out; the request decides.
                log.warning("could not renew an idempotency lease", exc_info=True)
                continue
            if renewed is None:
                log.warning("an idempotency key was taken over by a retry; no longer renewing")
                return
            self._until = renewed
