"""How money events move accounts, per (event, account), in SQL: shared by the balances
and the statement.

A hold moves pending on both sides: FundsReserved adds it, FundsReleased and
PaymentSettled take it back. The hold is the payment's PaymentInitiated, found by one
unique-index seek (stream version 1): the ledger refuses a FundsReserved that differs
from it in payer, payee, amount or currency. A settlement then posts its postings.
"""

from __future__ import annotations

MONEY_EVENT_TYPES = ("FundsReserved", "FundsReleased", "PaymentSettled")

# One row per (global_seq, account_id): the four deltas, and the event's time and kind.
MOVES_CTE = """
ev AS (
    SELECT e.global_seq, e.stream_id, e.event_type, e.payload, e.recorded_at
      FROM events e
     WHERE e.global_seq > %(after)s AND e.global_seq <= %(upto)s
       AND e.event_type IN ('FundsReserved', 'FundsReleased', 'PaymentSettled')
),
raw_moves AS (
    SELECT ev.global_seq, ev.recorded_at, ev.event_type, i.payload->>'payment_id' AS payment_id,
           x.account_id, x.dp, 0::bigint AS dpo, x.cp, 0::bigint AS cpo
      FROM ev
      JOIN events i ON i.stream_id = ev.stream_id AND i.stream_version = 1
      CROSS JOIN LATERAL (
          SELECT CASE WHEN ev.event_type = 'FundsReserved' THEN 1 ELSE -1 END
                 * (i.payload->>'amount_minor')::bigint AS amount
      ) AS h
      CROSS JOIN LATERAL (VALUES
          (i.payload->>'payer_account_id', h.amount, 0::bigint),
          (i.payload->>'payee_account_id', 0::bigint, h.amount)
      ) AS x(account_id, dp, cp)
    UNION ALL
    SELECT ev.global_seq, ev.recorded_at, ev.event_type, ev.payload->>'payment_id',
           p.account_id, 0::bigint,
           CASE WHEN p.side = 'debit' THEN p.amount_minor ELSE 0 END,
           0::bigint,
           CASE WHEN p.side = 'credit' THEN p.amount_minor ELSE 0 END
      FROM ev
      CROSS JOIN LATERAL jsonb_to_recordset(ev.payload->'postings')
           AS p(account_id text, side text, amount_minor bigint)
     WHERE ev.event_type = 'PaymentSettled'
),
moves AS (
    SELECT global_seq, account_id, min(recorded_at) AS recorded_at,
           min(event_type) AS event_type, min(payment_id) AS payment_id,
           sum(dp)::bigint AS dp, sum(dpo)::bigint AS dpo,
           sum(cp)::bigint AS cp, sum(cpo)::bigint AS cpo
      FROM raw_moves
     GROUP BY global_seq, account_id
)
"""
