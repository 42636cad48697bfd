"""The risk consumer: reads the log in order and flags payers as it happens.

Three rules, each about one payer (funding accounts, kind `external`, are exempt, as in
the pre-authorization rule of `activities/risk.py`):

- **velocity**: more than `velocity_count_max` payments initiated within a sliding
  `velocity_window_s`, the window ending at the payment's own PaymentInitiated. A burst
  raises one alert, at the payment that crosses the count.
- **amount_outlier**: a payment more than `amount_stddevs` standard deviations above
  the mean of the payer's earlier payments, once there are `amount_history_min` of them.
- **decline_streak**: `declines_in_row_max` payments declined in a row; a settled
  payment of the payer ends the streak.

Alerts are facts: `RiskAlertRaised` events on the payer's `risk-` stream, appended
through the store. It runs as a projection (`ledger/projector.py`): one batch reads the
range's events, loads the memory of the batch's payers (`projection.risk_payers`),
decides event by event in `global_seq` order, appends the alerts (each committed at
once, by the store) and writes the memory back in the transaction that moves the
checkpoint `risk_consumer`.

Every decision is a function of the log alone (amounts, `recorded_at`, order), never of
the clock, and an alert's event id is derived from its payer, rule and triggering
event. So a batch that crashes after appending an alert but before its checkpoint
moved is applied again, from the same memory, and appends nothing new. The arithmetic
is in integers throughout.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg

from ledger import errors
from ledger.events import RiskAlertRaised, RiskRule, event_id_for, payment_stream, risk_stream
from ledger.projections.base import Projection, range_params, statement
from ledger.store import EventStore, NewEvent

log = logging.getLogger("paysaga.risk")

ACTOR = "risk-consumer"
# Bounds of the thresholds, named once (the settings hold the same ones).
VELOCITY_WINDOW_S_MAX = 86_400
VELOCITY_COUNT_MAX_MAX = 1_000  # timestamps kept per payer
AMOUNT_STDDEVS_MAX = 100
AMOUNT_HISTORY_MIN_MAX = 10_000
DECLINES_IN_ROW_MAX_MAX = 1_000


@dataclass(frozen=True)
class RiskThresholds:
    """When the risk consumer raises an alert (see the module docstring)."""

    velocity_window_s: int
    velocity_count_max: int
    amount_stddevs: int
    amount_history_min: int
    declines_in_row_max: int

    def __post_init__(self) -> None:
        bounds = {
            "velocity_window_s": (1, VELOCITY_WINDOW_S_MAX),
            "velocity_count_max": (1, VELOCITY_COUNT_MAX_MAX),
            "amount_stddevs": (1, AMOUNT_STDDEVS_MAX),
            # A standard deviation needs two payments at least.
            "amount_history_min": (2, AMOUNT_HISTORY_MIN_MAX),
            "declines_in_row_max": (1, DECLINES_IN_ROW_MAX_MAX),
        }
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= high:
                raise ValueError(f"{name} must be an integer from {low} to {high}, not {value!r}")


@dataclass
class PayerMemory:
    """What the consumer remembers of one payer: one row of `risk_payers`."""

    account_id: str
    payments_n: int = 0
    amount_sum: int = 0
    amount_sum_sq: int = 0
    # When its latest payments were initiated, in log order, at most velocity_count_max.
    recent_at: list[datetime] = field(default_factory=list)
    velocity_over: bool = False
    declines_in_row: int = 0
    last_seq: int = 0


@dataclass(frozen=True)
class Alert:
    account_id: str
    rule: RiskRule
    payment_id: str
    trigger_seq: int
    # The triggering event, recorded as the alert's cause.
    trigger_event_id: uuid.UUID
    reason: str

    @property
    def event_id(self) -> uuid.UUID:
        return alert_event_id(self.account_id, self.rule, self.trigger_seq)

    def new_event(self) -> NewEvent:
        return NewEvent(
            stream_id=risk_stream(self.account_id),
            event=RiskAlertRaised(
                account_id=self.account_id,
                rule=self.rule,
                payment_id=self.payment_id,
                trigger_seq=self.trigger_seq,
                reason=self.reason,
            ),
            event_id=self.event_id,
            actor=ACTOR,
            correlation_id=payment_stream(self.payment_id),
            causation_id=str(self.trigger_event_id),
        )


def alert_event_id(account_id: str, rule: str, trigger_seq: int) -> uuid.UUID:
    """The alert's event id: the same for the same payer, rule and triggering event."""
    return event_id_for(f"risk-{account_id}", f"{rule}/{trigger_seq}")


# --- the rules: pure functions of the memory and one event ------------------------------
def on_initiated(
    memory: PayerMemory,
    thresholds: RiskThresholds,
    *,
    seq: int,
    event_id: uuid.UUID,
    payment_id: str,
    amount_minor: int,
    recorded_at: datetime,
) -> list[Alert]:
    """A payment of this payer was initiated: the velocity and amount rules."""
    alerts = []
    payer = memory.account_id

    # Within the window: the kept timestamps later than its start, and this payment.
    window_start = recorded_at - timedelta(seconds=thresholds.velocity_window_s)
    kept = memory.recent_at[-thresholds.velocity_count_max :]
    count = 1 + sum(1 for at in kept if at > window_start)
    over = count > thresholds.velocity_count_max
    if over and not memory.velocity_over:
        alerts.append(
            Alert(
                payer,
                "velocity",
                payment_id,
                seq,
                event_id,
                f"payer {payer} started {count} payments within "
                f"{thresholds.velocity_window_s} s (at most {thresholds.velocity_count_max})",
            )
        )
    memory.velocity_over = over
    memory.recent_at = [*kept, recorded_at][-thresholds.velocity_count_max :]

    # a - mean > k * stddev, over n earlier amounts with sum s1 and sum of squares s2:
    # n*a - s1 > k * sqrt(n*s2 - s1^2), squared (both sides are positive) to stay exact.
    n, s1, s2 = memory.payments_n, memory.amount_sum, memory.amount_sum_sq
    k = thresholds.amount_stddevs
    above = n * amount_minor - s1
    spread = n * s2 - s1 * s1
    assert spread >= 0, f"the variance of payer {payer}'s amounts is negative: {memory}"
    if n >= thresholds.amount_history_min and above > 0 and above * above > k * k * spread:
        alerts.append(
            Alert(
                payer,
                "amount_outlier",
                payment_id,
                seq,
                event_id,
                f"amount {amount_minor} is more than {k} standard deviations above the mean "
                f"of payer {payer}'s {n} earlier payments (mean {s1 // n}, "
                f"standard deviation {math.isqrt(spread) // n})",
            )
        )
    memory.payments_n = n + 1
    memory.amount_sum = s1 + amount_minor
    memory.amount_sum_sq = s2 + amount_minor * amount_minor
    memory.last_seq = seq
    return alerts


def on_declined(
    memory: PayerMemory,
    thresholds: RiskThresholds,
    *,
    seq: int,
    event_id: uuid.UUID,
    payment_id: str,
) -> list[Alert]:
    """A payment of this payer was declined: the decline streak grows."""
    memory.declines_in_row += 1
    memory.last_seq = seq
    if memory.declines_in_row != thresholds.declines_in_row_max:
        return []
    payer = memory.account_id
    return [
        Alert(
            payer,
            "decline_streak",
            payment_id,
            seq,
            event_id,
            f"payer {payer} had {memory.declines_in_row} payments declined in a row "
            f"(alert at {thresholds.declines_in_row_max})",
        )
    ]


def on_settled(memory: PayerMemory, *, seq: int) -> None:
    """A payment of this payer settled: the decline streak ends."""
    memory.declines_in_row = 0
    memory.last_seq = seq


# --- one batch ---------------------------------------------------------------------------
# The range's payment events that the rules read, each with its payer: a decline or a
# settlement names it only through its payment's PaymentInitiated, the stream's first
# event (a seek on the unique (stream_id, stream_version)).
_EVENTS = """
SELECT e.global_seq, e.event_id, e.event_type, e.recorded_at,
       e.payload->>'payment_id' AS payment_id,
       coalesce(e.payload->>'payer_account_id', i.payload->>'payer_account_id') AS payer,
       (e.payload->>'amount_minor')::bigint AS amount_minor
  FROM events e
  LEFT JOIN events i
    ON e.event_type <> 'PaymentInitiated' AND i.stream_id = e.stream_id AND i.stream_version = 1
 WHERE e.global_seq > %(after)s AND e.global_seq <= %(upto)s
   AND e.event_type IN ('PaymentInitiated', 'PaymentDeclined', 'PaymentSettled')
 ORDER BY e.global_seq
"""
# The batch's payers: their kind, and what the consumer remembers of them.
_PAYERS = """
SELECT p.account_id, a.kind, r.payments_n, r.amount_sum, r.amount_sum_sq, r.recent_at,
       r.velocity_over, r.declines_in_row, r.last_seq
  FROM unnest(%(payers)s::text[]) AS p(account_id)
  LEFT JOIN accounts a ON a.account_id = p.account_id
  LEFT JOIN {s}.risk_payers r ON r.account_id = p.account_id
"""
# The alerts of this batch already in the log: raised before a crash, or by a replay.
_RAISED = "SELECT event_id FROM events WHERE event_id = ANY (%(ids)s::uuid[])"
_SAME_ALERT = """
SELECT count(*) FROM events
 WHERE event_id = %(id)s AND stream_id = %(stream)s AND event_type = 'RiskAlertRaised'
   AND payload = %(payload)s::jsonb
"""
_REMEMBER = """
INSERT INTO {s}.risk_payers (account_id, payments_n, amount_sum, amount_sum_sq, recent_at,
                             velocity_over, declines_in_row, last_seq)
SELECT r.account_id, r.payments_n, r.amount_sum, r.amount_sum_sq, r.recent_at,
       r.velocity_over, r.declines_in_row, r.last_seq
  FROM jsonb_to_recordset(%(rows)s::jsonb) AS r(
       account_id text, payments_n bigint, amount_sum numeric, amount_sum_sq numeric,
       recent_at timestamptz[], velocity_over boolean, declines_in_row integer,
       last_seq bigint)
ON CONFLICT (account_id) DO UPDATE
   SET payments_n = excluded.payments_n, amount_sum = excluded.amount_sum,
       amount_sum_sq = excluded.amount_sum_sq, recent_at = excluded.recent_at,
       velocity_over = excluded.velocity_over, declines_in_row = excluded.declines_in_row,
       last_seq = excluded.last_seq
"""


async def _load_payers(
    conn: psycopg.AsyncConnection[Any], schema: str, payers: list[str]
) -> dict[str, PayerMemory]:
    """The memory of each of `payers` that the rules apply to (not external accounts)."""
    cursor = await conn.execute(statement(_PAYERS, schema), {"payers": payers})
    memories = {}
    for row in await cursor.fetchall():
        account_id, kind, n, s1, s2, recent_at, over, declines, last_seq = row
        if kind == "external":
            continue
        if n is None:
            memories[account_id] = PayerMemory(account_id=account_id)
            continue
        memories[account_id] = PayerMemory(
            account_id=account_id,
            payments_n=int(n),
            amount_sum=_exact_int(s1),
            amount_sum_sq=_exact_int(s2),
            recent_at=list(recent_at),
            velocity_over=bool(over),
            declines_in_row=int(declines),
            last_seq=int(last_seq),
        )
    return memories


def _exact_int(value: Any) -> int:
    """A numeric column as an int; it only ever holds integers."""
    whole = int(value)
    assert whole == value, f"a risk sum holds a fraction: {value}"
    return whole


async def _raise(conn: psycopg.AsyncConnection[Any], store: EventStore, alerts: list[Alert]) -> int:
    """Append the alerts not in the log yet; how many were appended."""
    if not alerts:
        return 0
    # Known by id alone, so an alert raised before a crash is never raised again, even
    # if its reason would now read differently (the thresholds changed meanwhile).
    cursor = await conn.execute(_RAISED, {"ids": [a.event_id for a in alerts]})
    raised = {row[0] for row in await cursor.fetchall()}
    appended = 0
    for alert in alerts:
        if alert.event_id not in raised:
            appended += int(await append_alert(conn, store, alert))
    return appended


async def append_alert(conn: psycopg.AsyncConnection[Any], store: EventStore, alert: Alert) -> bool:
    """Append one alert: True if it is new, False if the log already had it."""
    new = alert.new_event()
    try:
        result = await store.append(new)
    except errors.IdempotencyConflict:
        # ledger_append recognises a retry by its event id only when the stream refuses
        # the event; a risk stream never does (it only grows), so a second append of the
        # same alert (a retry after a lost connection, a concurrent apply) hits the
        # unique key instead. The same alert stored is fine; anything else is a bug.
        if await _stored(conn, new):
            return False
        raise
    if result.appended:
        log.info(
            "risk alert raised",
            extra={
                "account_id": alert.account_id,
                "rule": alert.rule,
                "payment_id": alert.payment_id,
                "trigger_seq": alert.trigger_seq,
            },
        )
    return result.appended


async def _stored(conn: psycopg.AsyncConnection[Any], new: NewEvent) -> bool:
    """Whether the log holds exactly this event (read committed: a fresh snapshot)."""
    cursor = await conn.execute(
        _SAME_ALERT,
        {
            "id": new.event_id,
            "stream": new.stream_id,
            "payload": json.dumps(new.event.payload()),
        },
    )
    row = await cursor.fetchone()
    return row is not None and int(row[0]) == 1


async def _remember(
    conn: psycopg.AsyncConnection[Any], schema: str, memories: list[PayerMemory]
) -> None:
    if not memories:
        return
    rows = [
        {
            "account_id": m.account_id,
            "payments_n": m.payments_n,
            "amount_sum": m.amount_sum,
            "amount_sum_sq": m.amount_sum_sq,
            "recent_at": [at.isoformat() for at in m.recent_at],
            "velocity_over": m.velocity_over,
            "declines_in_row": m.declines_in_row,
            "last_seq": m.last_seq,
        }
        for m in memories
    ]
    await conn.execute(statement(_REMEMBER, schema), {"rows": json.dumps(rows)})


def risk_consumer(store: EventStore, thresholds: RiskThresholds) -> Projection:
    """The risk consumer as a projection named `risk_consumer`, for the projector."""

    async def apply(conn: psycopg.AsyncConnection[Any], schema: str, after: int, upto: int) -> None:
        cursor = await conn.execute(_EVENTS, range_params(after, upto))
        events = await cursor.fetchall()
        payers = sorted({row[5] for row in events if row[5] is not None})
        memories = await _load_payers(conn, schema, payers)
        touched: dict[str, PayerMemory] = {}
        alerts: list[Alert] = []
        for seq, event_id, event_type, recorded_at, payment_id, payer, amount in events:
            memory = memories.get(payer)
            if memory is None:
                continue  # an exempt payer (or a stream with no PaymentInitiated)
            touched[payer] = memory
            if event_type == "PaymentInitiated":
                alerts += on_initiated(
                    memory,
                    thresholds,
                    seq=seq,
                    event_id=event_id,
                    payment_id=payment_id,
                    amount_minor=int(amount),
                    recorded_at=recorded_at,
                )
            elif event_type == "PaymentDeclined":
                alerts += on_declined(
                    memory, thresholds, seq=seq, event_id=event_id, payment_id=payment_id
                )
            else:
                on_settled(memory, seq=seq)
        await _raise(conn, store, alerts)
        await _remember(conn, schema, list(touched.values()))

    return Projection(
        name="risk_consumer",
        tables=("risk_payers",),
        apply=apply,
        summary="the risk consumer's memory of each payer; its alerts go to the ledger",
    )
