"""Risk alerts as listed: one row per RiskAlertRaised in the ledger."""

from __future__ import annotations

from typing import Any

import psycopg

from ledger.projections.base import Projection, range_params, statement

_RAISED = """
INSERT INTO {s}.risk_alerts (global_seq, event_id, account_id, rule, payment_id,
                             trigger_seq, reason, raised_at)
SELECT e.global_seq, e.event_id, e.payload->>'account_id', e.payload->>'rule',
       e.payload->>'payment_id', (e.payload->>'trigger_seq')::bigint, e.payload->>'reason',
       e.recorded_at
  FROM events e
 WHERE e.global_seq > %(after)s AND e.global_seq <= %(upto)s
   AND e.event_type = 'RiskAlertRaised'
"""


async def apply(conn: psycopg.AsyncConnection[Any], schema: str, after: int, upto: int) -> None:
    await conn.execute(statement(_RAISED, schema), range_params(after, upto))


RISK_ALERTS = Projection(
    name="risk_alerts",
    tables=("risk_alerts",),
    apply=apply,
    summary="the alerts the risk consumer raised, for GET /v1/risk/alerts",
)
