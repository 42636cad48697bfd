"""Settlement items: the ledger's side of reconciliation, derived from the log.

Each `PaymentSettled` is one item of kind `capture` in `recon.items`: its reference is
the payment id, its amount the settled amount (the payer's debit posting), its value
date the UTC date the settlement was recorded, and it carries its `global_seq`. Items
are added in one set-based INSERT ... SELECT per call, only below the safe horizon (an
event that commits late, under a higher one already visible, is never skipped), and
idempotently: an event already turned into an item adds nothing.

Whoever reads or writes items in order holds `ITEMS_LOCK` (an advisory lock for the
span of a transaction): reconciliation does, so that item ids grow in the order runs
see them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from ledger.replay import safe_seq

# Events one call reads at most, by global_seq: a first run on a long ledger catches up
# over several runs rather than in one unbounded statement.
SYNC_SEQ_SPAN_MAX = 2_000_000
ITEMS_LOCK = "paysaga/recon/items"

_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended(%(key)s, 0))"
# A PaymentSettled whose payload is not one (only an event forged around ledger_append
# can be: no debit posting, no currency) is no item: `ledger check`, which every
# reconciliation runs, reports it as internal drift. It must not fail the sync, or every
# run after it would fail too.
_SYNC = """
INSERT INTO recon.items (global_seq, kind, payment_id, reference, amount_minor, currency,
                         value_date, settled_at)
SELECT e.global_seq, 'capture', e.payload->>'payment_id', e.payload->>'payment_id',
       debit.amount_minor::bigint, e.payload->>'currency',
       (e.recorded_at AT TIME ZONE 'UTC')::date, e.recorded_at
  FROM events e
 CROSS JOIN LATERAL (
       SELECT sum((p->>'amount_minor')::numeric) AS amount_minor
         FROM jsonb_array_elements(CASE jsonb_typeof(e.payload->'postings')
                                   WHEN 'array' THEN e.payload->'postings'
                                   ELSE '[]' END) AS p
        WHERE p->>'side' = 'debit' AND jsonb_typeof(p->'amount_minor') = 'number') AS debit
 WHERE e.global_seq > %(after)s AND e.global_seq <= %(upto)s
   AND e.event_type = 'PaymentSettled'
   AND debit.amount_minor BETWEEN 1 AND 9223372036854775807
   AND debit.amount_minor = trunc(debit.amount_minor)
   AND length(e.payload->>'payment_id') BETWEEN 1 AND 200
   AND e.payload->>'currency' ~ '^[A-Z]{3}$'
 ORDER BY e.global_seq
ON CONFLICT (global_seq, kind) DO NOTHING
"""


@dataclass(frozen=True)
class ItemsSync:
    """`upto`: items now hold every settlement with a global_seq at or below it."""

    after: int
    upto: int
    items_new: int


async def settlement_horizon(conn: psycopg.AsyncConnection[Any]) -> int:
    """The highest global_seq items may be brought up to: the safe horizon. `conn` must
    be in autocommit mode (outside any transaction), as for `ledger.replay.safe_seq`."""
    return await safe_seq(conn)


async def sync_settlement_items(
    conn: psycopg.AsyncConnection[Any], *, after: int, upto: int
) -> ItemsSync:
    """Add the items of the settlements with `after < global_seq <= upto` (at most
    `SYNC_SEQ_SPAN_MAX` sequence numbers of them), in the caller's transaction, under
    `ITEMS_LOCK`. `upto` must be at or below the safe horizon (`settlement_horizon`).
    Returns how far the items now reach."""
    if after < 0 or upto < 0:
        raise ValueError(f"global_seq bounds must not be negative: after={after}, upto={upto}")
    upto = min(max(upto, after), after + SYNC_SEQ_SPAN_MAX)
    async with conn.transaction():
        await conn.execute(_LOCK, {"key": ITEMS_LOCK})
        if upto == after:
            return ItemsSync(after, upto, 0)
        cursor = await conn.execute(_SYNC, {"after": after, "upto": upto})
        return ItemsSync(after, upto, max(cursor.rowcount, 0))
