"""The statement: every posting and hold movement of an account, with the position after
it, in the ledger's order and in time order (for `balance?as_of=`).

See `migrations/sql/0008_read_models.sql` (projection.entries) for why there are two
orders. A batch appends its rows with both running positions computed from the
account's last row in each order. When a new row's time falls before a row already
stored (a late commit on another stripe of the same account), the time-order columns of
the rows after it are recomputed: a few rows, since such a row can only be as late as
the appends in flight with it. A replay from event 1 builds in bulk instead
(`_BULK_APPEND`): without indexes, with each account's totals kept aside, and the time
order fixed once at the end.
"""

from __future__ import annotations

from typing import Any

import psycopg

from ledger.projections.base import Bulk, Projection, range_params, statement
from ledger.projections.moves import MOVES_CTE

_DELTAS = ("dp", "dpo", "cp", "cpo")
_COLUMNS = ("debits_pending", "debits_posted", "credits_pending", "credits_posted")

# Both running positions come from one sort, in the ledger's order: the time-order
# columns take the same sums from the account's last row in time order. That is right
# unless a new row belongs before an older one in time (one stored already, or one of
# this batch); those accounts are returned, and _REORDER recomputes their time columns.
_APPEND = (
    "WITH "
    + MOVES_CTE
    + """,
first_new AS (
    SELECT account_id, min(recorded_at) AS k0_at FROM moves GROUP BY account_id
),
acct AS (
    SELECT f.account_id, f.k0_at,
           coalesce(s.debits_pending, 0) AS s_dp, coalesce(s.debits_posted, 0) AS s_dpo,
           coalesce(s.credits_pending, 0) AS s_cp, coalesce(s.credits_posted, 0) AS s_cpo,
           coalesce(t.at_debits_pending, 0) AS t_dp, coalesce(t.at_debits_posted, 0) AS t_dpo,
           coalesce(t.at_credits_pending, 0) AS t_cp, coalesce(t.at_credits_posted, 0) AS t_cpo,
           t.recorded_at AS t_at
      FROM first_new f
      LEFT JOIN LATERAL (
          SELECT x.debits_pending, x.debits_posted, x.credits_pending, x.credits_posted
            FROM {s}.entries x WHERE x.account_id = f.account_id
           ORDER BY x.global_seq DESC LIMIT 1) AS s ON true
      LEFT JOIN LATERAL (
          SELECT x.at_debits_pending, x.at_debits_posted, x.at_credits_pending,
                 x.at_credits_posted, x.recorded_at
            FROM {s}.entries x WHERE x.account_id = f.account_id
           ORDER BY x.recorded_at DESC, x.global_seq DESC LIMIT 1) AS t ON true
),
numbered AS (
    SELECT m.account_id, m.global_seq, m.recorded_at, m.event_type, m.payment_id,
           m.dp, m.dpo, m.cp, m.cpo,
           projection.sum_bigint(m.dp) OVER by_seq AS c_dp,
           projection.sum_bigint(m.dpo) OVER by_seq AS c_dpo,
           projection.sum_bigint(m.cp) OVER by_seq AS c_cp,
           projection.sum_bigint(m.cpo) OVER by_seq AS c_cpo,
           -- A batch's rows of one account out of time order have at least one
           -- adjacent pair out of order.
           m.recorded_at < lag(m.recorded_at) OVER by_seq AS late
      FROM moves m
    WINDOW by_seq AS (PARTITION BY m.account_id ORDER BY m.global_seq)
),
appended AS (
    INSERT INTO {s}.entries (
        account_id, global_seq, recorded_at, event_type, payment_id,
        debits_pending_delta, debits_posted_delta, credits_pending_delta, credits_posted_delta,
        debits_pending, debits_posted, credits_pending, credits_posted,
        at_debits_pending, at_debits_posted, at_credits_pending, at_credits_posted)
    SELECT n.account_id, n.global_seq, n.recorded_at, n.event_type, n.payment_id,
           n.dp, n.dpo, n.cp, n.cpo,
           a.s_dp + n.c_dp, a.s_dpo + n.c_dpo, a.s_cp + n.c_cp, a.s_cpo + n.c_cpo,
           a.t_dp + n.c_dp, a.t_dpo + n.c_dpo, a.t_cp + n.c_cp, a.t_cpo + n.c_cpo
      FROM numbered n JOIN acct a USING (account_id)
)
SELECT a.account_id, a.k0_at FROM acct a WHERE a.t_at > a.k0_at
UNION
SELECT a.account_id, a.k0_at
  FROM acct a JOIN (SELECT DISTINCT n.account_id FROM numbered n WHERE n.late) AS l
    ON l.account_id = a.account_id
"""
)

# The time-order columns of every row from the first new one on, for the accounts where
# a new row landed before rows already stored.
_REORDER = """
UPDATE {s}.entries e
   SET at_debits_pending = x.dp, at_debits_posted = x.dpo,
       at_credits_pending = x.cp, at_credits_posted = x.cpo
  FROM (
      SELECT y.account_id, y.global_seq,
           coalesce(b.at_debits_pending, 0)
               + projection.sum_bigint(y.debits_pending_delta) OVER w AS dp,
           coalesce(b.at_debits_posted, 0)
               + projection.sum_bigint(y.debits_posted_delta) OVER w AS dpo,
           coalesce(b.at_credits_pending, 0)
               + projection.sum_bigint(y.credits_pending_delta) OVER w AS cp,
           coalesce(b.at_credits_posted, 0)
               + projection.sum_bigint(y.credits_posted_delta) OVER w AS cpo
        FROM unnest(%(accounts)s::text[], %(k0_at)s::timestamptz[]) AS f(account_id, k0_at)
        LEFT JOIN LATERAL (
            SELECT x.at_debits_pending, x.at_debits_posted, x.at_credits_pending,
                   x.at_credits_posted
              FROM {s}.entries x
             WHERE x.account_id = f.account_id
               AND x.recorded_at < f.k0_at
             ORDER BY x.recorded_at DESC, x.global_seq DESC LIMIT 1) AS b ON true
        JOIN {s}.entries y
          ON y.account_id = f.account_id AND y.recorded_at >= f.k0_at
      WINDOW w AS (PARTITION BY y.account_id ORDER BY y.recorded_at, y.global_seq)
  ) AS x
 WHERE e.account_id = x.account_id AND e.global_seq = x.global_seq
"""


# A replay's build from event 1 (`Bulk`): the entries have no index until the end, so
# each account's totals and latest time are kept in a small table of their own, and the
# accounts where a row landed before an older one in time are noted, to have their time
# columns recomputed once, at the end. A row's time-order position before that fix-up
# is its ledger-order one (both are the account's totals when it is the latest in time).
_BULK_BEGIN = """
DROP TABLE IF EXISTS {s}.entries_bulk_tails, {s}.entries_bulk_late;
CREATE TABLE {s}.entries_bulk_tails (
    account_id       text PRIMARY KEY,
    debits_pending   bigint NOT NULL,
    debits_posted    bigint NOT NULL,
    credits_pending  bigint NOT NULL,
    credits_posted   bigint NOT NULL,
    last_at          timestamptz NOT NULL
);
CREATE TABLE {s}.entries_bulk_late (account_id text NOT NULL, first_at timestamptz NOT NULL);
"""

# A part of the accounts, by a hash of the account id: each account's rows are built by
# one part, so the parts never touch the same totals or rows.
_BULK_APPEND = (
    "WITH "
    + MOVES_CTE
    + """,
mine AS (
    SELECT * FROM moves m
     WHERE (hashtext(m.account_id) & 2147483647) %% %(parts)s = %(part)s
),
numbered AS (
    SELECT m.account_id, m.global_seq, m.recorded_at, m.event_type, m.payment_id,
           m.dp, m.dpo, m.cp, m.cpo,
           projection.sum_bigint(m.dp) OVER by_seq AS c_dp,
           projection.sum_bigint(m.dpo) OVER by_seq AS c_dpo,
           projection.sum_bigint(m.cp) OVER by_seq AS c_cp,
           projection.sum_bigint(m.cpo) OVER by_seq AS c_cpo,
           m.recorded_at < lag(m.recorded_at) OVER by_seq AS late
      FROM mine m
    WINDOW by_seq AS (PARTITION BY m.account_id ORDER BY m.global_seq)
),
batch AS (
    SELECT m.account_id,
           projection.sum_bigint(m.dp) AS dp, projection.sum_bigint(m.dpo) AS dpo,
           projection.sum_bigint(m.cp) AS cp, projection.sum_bigint(m.cpo) AS cpo,
           min(m.recorded_at) AS first_at, max(m.recorded_at) AS last_at
      FROM mine m GROUP BY m.account_id
),
appended AS (
    INSERT INTO {s}.entries (
        account_id, global_seq, recorded_at, event_type, payment_id,
        debits_pending_delta, debits_posted_delta, credits_pending_delta, credits_posted_delta,
        debits_pending, debits_posted, credits_pending, credits_posted,
        at_debits_pending, at_debits_posted, at_credits_pending, at_credits_posted)
    SELECT n.account_id, n.global_seq, n.recorded_at, n.event_type, n.payment_id,
           n.dp, n.dpo, n.cp, n.cpo,
           coalesce(t.debits_pending, 0) + n.c_dp, coalesce(t.debits_posted, 0) + n.c_dpo,
           coalesce(t.credits_pending, 0) + n.c_cp, coalesce(t.credits_posted, 0) + n.c_cpo,
           coalesce(t.debits_pending, 0) + n.c_dp, coalesce(t.debits_posted, 0) + n.c_dpo,
           coalesce(t.credits_pending, 0) + n.c_cp, coalesce(t.credits_posted, 0) + n.c_cpo
      FROM numbered n LEFT JOIN {s}.entries_bulk_tails t USING (account_id)
),
tails AS (
    INSERT INTO {s}.entries_bulk_tails AS t (
        account_id, debits_pending, debits_posted, credits_pending, credits_posted, last_at)
    SELECT b.account_id, b.dp, b.dpo, b.cp, b.cpo, b.last_at FROM batch b
    ON CONFLICT (account_id) DO UPDATE
       SET debits_pending = t.debits_pending + excluded.debits_pending,
           debits_posted = t.debits_posted + excluded.debits_posted,
           credits_pending = t.credits_pending + excluded.credits_pending,
           credits_posted = t.credits_posted + excluded.credits_posted,
           last_at = greatest(t.last_at, excluded.last_at)
)
-- Every statement of a WITH sees the tails as they were before it.
INSERT INTO {s}.entries_bulk_late (account_id, first_at)
SELECT b.account_id, b.first_at
  FROM batch b LEFT JOIN {s}.entries_bulk_tails t USING (account_id)
 WHERE t.last_at > b.first_at
    OR b.account_id IN (SELECT n.account_id FROM numbered n WHERE n.late)
"""
)

_BULK_LATE = "SELECT account_id, min(first_at) FROM {s}.entries_bulk_late GROUP BY account_id"
_BULK_END = "DROP TABLE {s}.entries_bulk_tails, {s}.entries_bulk_late"


async def _reorder(
    conn: psycopg.AsyncConnection[Any], schema: str, late: list[tuple[Any, ...]]
) -> None:
    if late:
        await conn.execute(
            statement(_REORDER, schema),
            {"accounts": [row[0] for row in late], "k0_at": [row[1] for row in late]},
        )


async def apply(conn: psycopg.AsyncConnection[Any], schema: str, after: int, upto: int) -> None:
    cursor = await conn.execute(statement(_APPEND, schema), range_params(after, upto))
    await _reorder(conn, schema, await cursor.fetchall())


async def _bulk_begin(conn: psycopg.AsyncConnection[Any], schema: str) -> None:
    await conn.execute(statement(_BULK_BEGIN, schema))


async def _bulk_apply(
    conn: psycopg.AsyncConnection[Any], schema: str, after: int, upto: int, part: int, parts: int
) -> None:
    await conn.execute(
        statement(_BULK_APPEND, schema), {**range_params(after, upto), "part": part, "parts": parts}
    )


async def _bulk_finish(conn: psycopg.AsyncConnection[Any], schema: str) -> None:
    cursor = await conn.execute(statement(_BULK_LATE, schema))
    await _reorder(conn, schema, await cursor.fetchall())
    await conn.execute(statement(_BULK_END, schema))


STATEMENT = Projection(
    name="statement",
    tables=("entries",),
    apply=apply,
    summary="every posting and hold movement per account, with running balances",
    bulk=Bulk(
        marker="entries_bulk_tails", begin=_bulk_begin, apply=_bulk_apply, finish=_bulk_finish
    ),
)
