"""Reads of the read models (schema `projection`), each saying how fresh it is.

Every read is one SQL statement that starts from the checkpoint row of the model it
reads, so its rows and its `as_of_seq` come from one snapshot: the rows hold every
event at or below `as_of_seq` and none above it (the projector moves a checkpoint in
the transaction that applies its events). Account terms (currency, kind, overdraft
limit) come from the ledger's `accounts` table in the same statement: they never change
once an account is opened, so they cannot disagree with any checkpoint.

Each read is a bounded index scan:

- `balance`: one primary-key lookup in `projection.balances`;
- `balance_as_of`: one backward seek in (account_id, recorded_at, global_seq) of
  `projection.entries`, whose at_* columns hold the position in time order, so the
  cost is O(log n) in the account's history, never a scan;
- `entries`: a range of the (account_id, global_seq) primary key, at most `limit` rows;
- `payments`: a backward range of (initiated_seq), (status, initiated_seq), or the
  payer and payee indexes merged, at most `limit` rows each;
- `risk_alerts`: a backward range of (global_seq), (account_id, global_seq) or (rule,
  global_seq), at most `limit` rows.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import TextClause, text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.projector import Lag
from ledger.store import PositionFigures, fetch_all

T = TypeVar("T")

PAGE_ROWS_MAX = 1_000
SEQ_MAX = 2**63 - 1

# The checkpoint of each read model these reads serve.
BALANCES_CHECKPOINT = "balances"
STATEMENT_CHECKPOINT = "statement"
PAYMENTS_CHECKPOINT = "payments"


@dataclass(frozen=True)
class Balance(PositionFigures):
    """An account's balance as a read model holds it: current, or at an instant."""

    account_id: str
    currency: str
    kind: str
    overdraft_limit_minor: int | None
    debits_pending: int
    debits_posted: int
    credits_pending: int
    credits_posted: int
    # The last event at or before the read that moved it (or opened it, for the current
    # balance); None when there is none yet.
    last_seq: int | None


@dataclass(frozen=True)
class BalanceRead:
    balance: Balance | None  # None: the ledger has no such account
    as_of_seq: int


@dataclass(frozen=True)
class StatementEntry:
    """One posting or hold movement of an account, and its position right after it, in
    the ledger's order."""

    global_seq: int
    recorded_at: datetime
    event_type: str
    payment_id: str
    debits_pending_delta: int
    debits_posted_delta: int
    credits_pending_delta: int
    credits_posted_delta: int
    debits_pending: int
    debits_posted: int
    credits_pending: int
    credits_posted: int


@dataclass(frozen=True)
class EntriesPage:
    account_known: bool  # False: the ledger has no such account (and `entries` is empty)
    entries: list[StatementEntry]
    as_of_seq: int


@dataclass(frozen=True)
class PaymentRow:
    """A payment as listed: its terms, and its status after its last projected event."""

    payment_id: str
    initiated_seq: int
    payer_account_id: str
    payee_account_id: str
    amount_minor: int
    currency: str
    reference: str | None
    metadata: dict[str, Any]
    state: str
    status: str
    failure_reason: str | None
    created_at: datetime
    updated_at: datetime
    last_seq: int


@dataclass(frozen=True)
class PaymentsPage:
    payments: list[PaymentRow]
    as_of_seq: int


_BALANCE = text(
    """
    SELECT c.last_seq AS as_of_seq, a.account_id, a.currency, a.kind,
           a.overdraft_limit_minor, b.debits_pending, b.debits_posted, b.credits_pending,
           b.credits_posted, b.last_seq
      FROM projection.checkpoints c
      LEFT JOIN accounts a ON a.account_id = :account
      LEFT JOIN projection.balances b ON b.account_id = :account
     WHERE c.projection = :checkpoint
    """
)
# The seek `balance?as_of=` promises: the last entry at or before the instant in time
# order, whose at_* columns are the position then. No entry: nothing had moved it yet.
BALANCE_AS_OF_SQL = text(
    """
    SELECT c.last_seq AS as_of_seq, a.account_id, a.currency, a.kind,
           a.overdraft_limit_minor, e.at_debits_pending AS debits_pending,
           e.at_debits_posted AS debits_posted, e.at_credits_pending AS credits_pending,
           e.at_credits_posted AS credits_posted, e.global_seq AS last_seq
      FROM projection.checkpoints c
      LEFT JOIN accounts a ON a.account_id = :account
      LEFT JOIN LATERAL (
          SELECT x.at_debits_pending, x.at_debits_posted, x.at_credits_pending,
                 x.at_credits_posted, x.global_seq
            FROM projection.entries x
           WHERE x.account_id = :account AND x.recorded_at <= :as_of
           ORDER BY x.recorded_at DESC, x.global_seq DESC
           LIMIT 1) AS e ON true
     WHERE c.projection = :checkpoint
    """
)
ENTRIES_SQL = text(
    """
    SELECT c.last_seq AS as_of_seq, a.account_id IS NOT NULL AS account_known, e.*
      FROM projection.checkpoints c
      LEFT JOIN accounts a ON a.account_id = :account
      LEFT JOIN LATERAL (
          SELECT x.global_seq, x.recorded_at, x.event_type, x.payment_id,
                 x.debits_pending_delta, x.debits_posted_delta, x.credits_pending_delta,
                 x.credits_posted_delta, x.debits_pending, x.debits_posted,
                 x.credits_pending, x.credits_posted
            FROM projection.entries x
           WHERE x.account_id = :account AND x.global_seq > :after_seq
           ORDER BY x.global_seq
           LIMIT :limit) AS e ON a.account_id IS NOT NULL
     WHERE c.projection = :checkpoint
     ORDER BY e.global_seq
    """
)

_PAYMENT_COLUMNS = (
    "payment_id, initiated_seq, payer_account_id, payee_account_id, amount_minor, currency, "
    "reference, metadata, state, status, failure_reason, created_at, updated_at, last_seq"
)


def _payments_page(*, by_status: bool, by_account: bool) -> TextClause:
    """The page query for one combination of filters: each its own statement, so each
    plans as the index scan that fits it (a generic plan over optional filters would not)."""
    status = "AND status = :status" if by_status else ""
    if by_account:
        # Payer and payee each walk their own index backwards; the payee side skips a
        # payment the payer side already has.
        page = f"""
            SELECT * FROM (
                (SELECT {_PAYMENT_COLUMNS} FROM projection.payments
                  WHERE payer_account_id = :account AND initiated_seq < :before {status}
                  ORDER BY initiated_seq DESC LIMIT :limit)
                UNION ALL
                (SELECT {_PAYMENT_COLUMNS} FROM projection.payments
                  WHERE payee_account_id = :account AND payer_account_id <> :account
                    AND initiated_seq < :before {status}
                  ORDER BY initiated_seq DESC LIMIT :limit)
            ) AS either ORDER BY initiated_seq DESC LIMIT :limit
        """
    else:
        page = f"""
            SELECT {_PAYMENT_COLUMNS} FROM projection.payments
             WHERE initiated_seq < :before {status}
             ORDER BY initiated_seq DESC LIMIT :limit
        """
    return text(
        f"""
        SELECT c.last_seq AS as_of_seq, p.*
          FROM projection.checkpoints c
          LEFT JOIN LATERAL ({page}) AS p ON true
         WHERE c.projection = :checkpoint
         ORDER BY p.initiated_seq DESC
        """
    )


_PAYMENTS = {
    (by_status, by_account): _payments_page(by_status=by_status, by_account=by_account)
    for by_status in (False, True)
    for by_account in (False, True)
}

# Each read model's lag behind the newest event, in events and seconds.
_LAGS = text(
    """
    SELECT c.projection, c.last_seq, c.updated_at,
           greatest(0, coalesce((SELECT max(global_seq) FROM events), 0) - c.last_seq)
               AS events,
           coalesce(extract(epoch FROM clock_timestamp() - (
               SELECT e.recorded_at FROM events e WHERE e.global_seq > c.last_seq
                ORDER BY e.global_seq LIMIT 1)), 0) AS seconds
      FROM projection.checkpoints c ORDER BY c.projection
    """
)


RISK_ALERTS_CHECKPOINT = "risk_alerts"


@dataclass(frozen=True)
class RiskAlertRow:
    """One RiskAlertRaised, as listed."""

    global_seq: int
    event_id: uuid.UUID
    account_id: str
    rule: str
    payment_id: str
    trigger_seq: int
    reason: str
    raised_at: datetime


@dataclass(frozen=True)
class RiskAlertsPage:
    alerts: list[RiskAlertRow]
    as_of_seq: int


_ALERT_COLUMNS = (
    "global_seq, event_id, account_id, rule, payment_id, trigger_seq, reason, raised_at"
)


def _risk_alerts_page(*, by_account: bool, by_rule: bool) -> TextClause:
    """The page query for one combination of filters, each planned as its own index scan."""
    filters = "".join(
        (
            " AND account_id = :account" if by_account else "",
            " AND rule = :rule" if by_rule else "",
        )
    )
    return text(
        f"""
        SELECT c.last_seq AS as_of_seq, r.*
          FROM projection.checkpoints c
          LEFT JOIN LATERAL (
              SELECT {_ALERT_COLUMNS} FROM projection.risk_alerts
               WHERE global_seq < :before{filters}
               ORDER BY global_seq DESC LIMIT :limit) AS r ON true
         WHERE c.projection = :checkpoint
         ORDER BY r.global_seq DESC
        """
    )


_RISK_ALERTS_PAGES = {
    (by_account, by_rule): _risk_alerts_page(by_account=by_account, by_rule=by_rule)
    for by_account in (False, True)
    for by_rule in (False, True)
}


class ReadModels:
    """The read models the API serves, read through the services' engine."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def _fetch(self, statement: TextClause, params: dict[str, Any]) -> list[Any]:
        return await fetch_all(self.engine, statement, params)

    async def _one(self, statement: TextClause, params: dict[str, Any]) -> Any:
        rows = await self._fetch(statement, params)
        # The checkpoint row anchors every read; migration 0008 creates it.
        assert len(rows) == 1, f"expected one row, got {len(rows)}: is the checkpoint there?"
        return rows[0]

    async def balance(self, account_id: str) -> BalanceRead:
        """The account's current balance in the balances read model.

        An account the ledger has but the model has not reached yet had nothing moved
        at `as_of_seq`: its balance then is zero.
        """
        row = await self._one(_BALANCE, {"account": account_id, "checkpoint": BALANCES_CHECKPOINT})
        return BalanceRead(balance=_balance(row), as_of_seq=int(row.as_of_seq))

    async def balance_as_of(self, account_id: str, instant: datetime) -> BalanceRead:
        """The account's balance at `instant` (timezone-aware): every movement recorded at
        or before it, and none after, from one index seek into the statement."""
        if instant.tzinfo is None:
            raise ValueError("instant must be timezone-aware")
        row = await self._one(
            BALANCE_AS_OF_SQL,
            {"account": account_id, "as_of": instant, "checkpoint": STATEMENT_CHECKPOINT},
        )
        return BalanceRead(balance=_balance(row), as_of_seq=int(row.as_of_seq))

    async def entries(self, account_id: str, *, after_seq: int, limit: int) -> EntriesPage:
        """The account's statement entries after `after_seq`, in ledger order, at most
        `limit`, each with the running position after it."""
        _check_limit(limit)
        rows = await self._fetch(
            ENTRIES_SQL,
            {
                "account": account_id,
                "after_seq": after_seq,
                "limit": limit,
                "checkpoint": STATEMENT_CHECKPOINT,
            },
        )
        assert rows, "the statement's checkpoint row is missing"
        entries = _listed(StatementEntry, rows)
        return EntriesPage(
            account_known=bool(rows[0].account_known),
            entries=entries,
            as_of_seq=int(rows[0].as_of_seq),
        )

    async def payments(
        self,
        *,
        before_seq: int = SEQ_MAX,
        limit: int,
        status: str | None = None,
        account_id: str | None = None,
    ) -> PaymentsPage:
        """Payments newest first (by their PaymentInitiated), initiated before
        `before_seq`, at most `limit`. `status` filters on the listed status;
        `account_id` on payer or payee."""
        _check_limit(limit)
        rows = await self._fetch(
            _PAYMENTS[(status is not None, account_id is not None)],
            {
                "before": before_seq,
                "limit": limit,
                "status": status,
                "account": account_id,
                "checkpoint": PAYMENTS_CHECKPOINT,
            },
        )
        assert rows, "the payments' checkpoint row is missing"
        payments = _listed(PaymentRow, rows)
        return PaymentsPage(payments=payments, as_of_seq=int(rows[0].as_of_seq))

    async def risk_alerts(
        self,
        *,
        before_seq: int = SEQ_MAX,
        limit: int,
        account_id: str | None = None,
        rule: str | None = None,
    ) -> RiskAlertsPage:
        """Alerts newest first, raised before `before_seq`, at most `limit`, optionally of
        one payer and one rule."""
        _check_limit(limit)
        rows = await self._fetch(
            _RISK_ALERTS_PAGES[(account_id is not None, rule is not None)],
            {
                "before": before_seq,
                "limit": limit,
                "account": account_id,
                "rule": rule,
                "checkpoint": RISK_ALERTS_CHECKPOINT,
            },
        )
        # The checkpoint row anchors the read; migration 0008 creates it.
        assert rows, "the risk_alerts checkpoint row is missing"
        alerts = _listed(RiskAlertRow, rows)
        return RiskAlertsPage(alerts=alerts, as_of_seq=int(rows[0].as_of_seq))

    async def lags(self) -> list[Lag]:
        """Each checkpoint's lag behind the newest event, in events and in seconds."""
        return [
            Lag(
                projection=row.projection,
                last_seq=int(row.last_seq),
                updated_at=row.updated_at,
                events=int(row.events),
                seconds=float(row.seconds),
            )
            for row in await self._fetch(_LAGS, {})
        ]


def _listed(cls: type[T], rows: list[Any]) -> list[T]:
    """The rows of a page, as `cls`. A page is anchored on its checkpoint row, so an empty
    page is that one row with the page's columns NULL: no row of the page."""
    names = [field.name for field in dataclasses.fields(cls)]  # type: ignore[arg-type]
    return [
        cls(**{name: getattr(row, name) for name in names})
        for row in rows
        if getattr(row, names[0]) is not None
    ]


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= PAGE_ROWS_MAX:
        raise ValueError(f"limit must be between 1 and {PAGE_ROWS_MAX}")


def _balance(row: Any) -> Balance | None:
    if row.account_id is None:
        return None
    return Balance(
        account_id=row.account_id,
        currency=row.currency,
        kind=row.kind,
        overdraft_limit_minor=row.overdraft_limit_minor,
        debits_pending=row.debits_pending or 0,
        debits_posted=row.debits_posted or 0,
        credits_pending=row.credits_pending or 0,
        credits_posted=row.credits_posted or 0,
        last_seq=row.last_seq,
    )
