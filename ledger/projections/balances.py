"""Balances: each account's position (posted, pending, available) as of the checkpoint."""

from __future__ import annotations

from typing import Any

import psycopg

from ledger.projections.base import Projection, range_params, statement
from ledger.projections.moves import MOVES_CTE

_OPENED = """
INSERT INTO {s}.balances (account_id, currency, kind, overdraft_limit_minor, opened_seq,
                          last_seq)
SELECT e.payload->>'account_id', e.payload->>'currency', e.payload->>'kind',
       (e.payload->>'overdraft_limit_minor')::bigint, e.global_seq, e.global_seq
  FROM events e
 WHERE e.global_seq > %(after)s AND e.global_seq <= %(upto)s
   AND e.event_type = 'AccountOpened'
"""
_MOVED = (
    "WITH "
    + MOVES_CTE
    + """,
per_account AS (
    SELECT account_id, sum(dp)::bigint AS dp, sum(dpo)::bigint AS dpo,
           sum(cp)::bigint AS cp, sum(cpo)::bigint AS cpo, max(global_seq) AS last_seq
      FROM moves GROUP BY account_id
)
UPDATE {s}.balances b
   SET debits_pending = b.debits_pending + m.dp,
       debits_posted = b.debits_posted + m.dpo,
       credits_pending = b.credits_pending + m.cp,
       credits_posted = b.credits_posted + m.cpo,
       last_seq = m.last_seq
  FROM per_account m
 WHERE b.account_id = m.account_id
"""
)


async def apply(conn: psycopg.AsyncConnection[Any], schema: str, after: int, upto: int) -> None:
    params = range_params(after, upto)
    await conn.execute(statement(_OPENED, schema), params)
    await conn.execute(statement(_MOVED, schema), params)


BALANCES = Projection(
    name="balances",
    tables=("balances",),
    apply=apply,
    summary="each account's posted, pending and available balance",
)
