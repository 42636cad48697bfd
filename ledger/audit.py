"""Read-only questions an auditor (the reliability checker) asks of the ledger's tables.

They read what `ledger check` does not: a run's own payments by their accounts, each
payment stream's path, and what the processor simulator holds for a payment the ledger
never recorded. Nothing here writes.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.store import fetch_all

_STREAMS_TOUCHING = text(
    "SELECT stream_id FROM events WHERE event_type = 'PaymentInitiated' AND "
    "(payload->>'payer_account_id' = ANY(:a) OR payload->>'payee_account_id' = ANY(:a))"
)
_STREAM_PATHS = text(
    "SELECT s.stream_id, s.state, e.event_type, e.recorded_at, "
    "CASE WHEN e.event_type = 'PaymentInitiated' THEN e.payload END AS payload "
    "FROM streams s JOIN events e ON e.stream_id = s.stream_id "
    "WHERE s.stream_id = ANY(:ids) ORDER BY e.stream_id, e.stream_version"
)
_EVENTS_PAGE = text(
    "SELECT global_seq, stream_id, event_id, event_type, payload, recorded_at "
    "FROM events WHERE global_seq > :after AND global_seq <= :upto "
    "ORDER BY global_seq LIMIT :limit"
)
_PROCESSOR_HOLDS_UNRECORDED = text(
    "SELECT a.payment_id, a.status FROM processor_authorizations a "
    "WHERE a.status IN ('authorized', 'captured') AND NOT EXISTS "
    "(SELECT 1 FROM streams s WHERE s.stream_id = 'payment-' || a.payment_id) "
    "ORDER BY a.payment_id LIMIT :limit"
)
_LIMITED_POSITIONS = text(
    "SELECT account_id, overdraft_limit_minor, "
    "credits_posted - debits_posted - debits_pending + overdraft_limit_minor AS available "
    "FROM account_positions WHERE overdraft_limit_minor IS NOT NULL ORDER BY account_id"
)
_PENDING = text(
    "SELECT account_id, debits_pending, credits_pending FROM account_positions "
    "WHERE account_id = ANY(:a) ORDER BY account_id"
)
_STREAM_STATE = text("SELECT state FROM streams WHERE stream_id = :s")


async def payment_streams_touching(engine: AsyncEngine, accounts: list[str]) -> set[str]:
    """The payment streams whose payer or payee is one of `accounts`."""
    rows = await fetch_all(engine, _STREAMS_TOUCHING, {"a": accounts})
    return {row.stream_id for row in rows}


async def stream_paths(engine: AsyncEngine, stream_ids: list[str]) -> list[Any]:
    """Each stream's state and its events' types and times, in stream order (with the
    PaymentInitiated payload)."""
    return await fetch_all(engine, _STREAM_PATHS, {"ids": stream_ids})


async def events_page(engine: AsyncEngine, after: int, upto: int, limit: int) -> list[Any]:
    """Events with after < global_seq <= upto, in order, at most `limit`."""
    return await fetch_all(engine, _EVENTS_PAGE, {"after": after, "upto": upto, "limit": limit})


async def processor_holds_unrecorded(engine: AsyncEngine, limit: int = 100) -> list[Any]:
    """Authorizations the processor holds (or captured) for payments the ledger has no
    stream for."""
    return await fetch_all(engine, _PROCESSOR_HOLDS_UNRECORDED, {"limit": limit})


async def stream_state(engine: AsyncEngine, stream_id: str) -> str | None:
    rows = await fetch_all(engine, _STREAM_STATE, {"s": stream_id})
    return str(rows[0].state) if rows else None


async def limited_positions(engine: AsyncEngine) -> list[Any]:
    """Each account with an overdraft limit, its limit and what it has available."""
    return await fetch_all(engine, _LIMITED_POSITIONS, {})


async def pending(engine: AsyncEngine, accounts: list[str]) -> list[Any]:
    """The pending debits and credits of `accounts`."""
    return await fetch_all(engine, _PENDING, {"a": accounts})
