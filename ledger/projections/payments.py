"""Payments as listed: each payment's terms and its status after its last event.

The status comes from the state machine (`ledger/state_machine.py`): every payment
event leads to one state, except AuthorizationVoided, which leads to
`voided_unapproved` when it voids a payment still waiting for approval (an
ApprovalRequested and no PaymentApproved before it), and to `voided` otherwise.
"""

from __future__ import annotations

from typing import Any

import psycopg

from ledger.projections.base import Projection, range_params, statement
from ledger.state_machine import PAYMENT_STATUS_BY_STATE, PAYMENT_TRANSITIONS, TERMINAL_STATES


def _state_by_event() -> dict[str, str]:
    """{event type: the state it leads to}, for every event with one destination."""
    targets: dict[str, set[str]] = {}
    for (_, event_type), to_state in PAYMENT_TRANSITIONS.items():
        targets.setdefault(event_type, set()).add(to_state)
    return {event: states.pop() for event, states in targets.items() if len(states) == 1}


STATE_BY_EVENT = _state_by_event()
assert set(STATE_BY_EVENT) | {"AuthorizationVoided"} == {e for _, e in PAYMENT_TRANSITIONS}


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _case(mapping: dict[str, str], subject: str) -> str:
    whens = " ".join(f"WHEN {_literal(k)} THEN {_literal(v)}" for k, v in sorted(mapping.items()))
    return f"CASE {subject} {whens} END"


_STATE_SQL = (
    "CASE WHEN l.event_type = 'AuthorizationVoided' THEN "
    "CASE WHEN EXISTS (SELECT 1 FROM events r WHERE r.stream_id = l.stream_id "
    "AND r.event_type = 'ApprovalRequested') AND NOT EXISTS (SELECT 1 FROM events r "
    "WHERE r.stream_id = l.stream_id AND r.event_type = 'PaymentApproved') "
    "THEN 'voided_unapproved' ELSE 'voided' END "
    f"ELSE {_case(STATE_BY_EVENT, 'l.event_type')} END"
)
_FAILED_STATES = ", ".join(_literal(s) for s in sorted(TERMINAL_STATES - {"settled"}))

_INITIATED = """
INSERT INTO {s}.payments (payment_id, initiated_seq, payer_account_id, payee_account_id,
                          amount_minor, currency, reference, metadata, state, status,
                          failure_reason, created_at, updated_at, last_seq)
SELECT e.payload->>'payment_id', e.global_seq, e.payload->>'payer_account_id',
       e.payload->>'payee_account_id', (e.payload->>'amount_minor')::bigint,
       e.payload->>'currency', e.payload->>'reference', e.payload->'metadata',
       'initiated', 'INITIATED', NULL, e.recorded_at, e.recorded_at, e.global_seq
  FROM events e
 WHERE e.global_seq > %(after)s AND e.global_seq <= %(upto)s
   AND e.event_type = 'PaymentInitiated'
"""
_MOVED = f"""
WITH last AS (
    SELECT DISTINCT ON (e.stream_id) e.stream_id, e.global_seq, e.event_type, e.payload,
           e.recorded_at
      FROM events e
     WHERE e.global_seq > %(after)s AND e.global_seq <= %(upto)s
       AND e.stream_id LIKE 'payment-%%' AND e.event_type <> 'PaymentInitiated'
     ORDER BY e.stream_id, e.global_seq DESC
),
moved AS (SELECT l.*, {_STATE_SQL} AS state FROM last l)
UPDATE {{s}}.payments p
   SET state = m.state,
       status = {_case(PAYMENT_STATUS_BY_STATE, "m.state")},
       failure_reason = CASE WHEN m.state IN ({_FAILED_STATES}) THEN m.payload->>'reason' END,
       updated_at = m.recorded_at,
       last_seq = m.global_seq
  FROM moved m
 WHERE p.payment_id = m.payload->>'payment_id'
"""


async def apply(conn: psycopg.AsyncConnection[Any], schema: str, after: int, upto: int) -> None:
    params = range_params(after, upto)
    await conn.execute(statement(_INITIATED, schema), params)
    await conn.execute(statement(_MOVED, schema), params)


PAYMENTS = Projection(
    name="payments",
    tables=("payments",),
    apply=apply,
    summary="every payment with its status, for GET /v1/payments",
)
