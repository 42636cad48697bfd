"""Reads of the risk alerts read model (`projection.risk_alerts`), saying how fresh they are.

A page is one SQL statement that starts from the `risk_alerts` checkpoint row, so its
rows and its `as_of_seq` come from one snapshot: they hold every RiskAlertRaised at or
below `as_of_seq` and none above it. Each combination of filters is its own statement,
a backward range of one index, at most `limit` rows: (global_seq), (account_id,
global_seq) or (rule, global_seq).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import TextClause, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

RISK_ALERTS_CHECKPOINT = "risk_alerts"
RISK_ALERTS_PAGE_MAX = 1_000
SEQ_MAX = 2**63 - 1


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


_COLUMNS = "global_seq, event_id, account_id, rule, payment_id, trigger_seq, reason, raised_at"


def _page(*, by_account: bool, by_rule: bool) -> TextClause:
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
              SELECT {_COLUMNS} FROM projection.risk_alerts
               WHERE global_seq < :before{filters}
               ORDER BY global_seq DESC LIMIT :limit) AS r ON true
         WHERE c.projection = :checkpoint
         ORDER BY r.global_seq DESC
        """
    )


_PAGES = {
    (by_account, by_rule): _page(by_account=by_account, by_rule=by_rule)
    for by_account in (False, True)
    for by_rule in (False, True)
}


async def risk_alerts(
    engine: AsyncEngine,
    *,
    before_seq: int = SEQ_MAX,
    limit: int,
    account_id: str | None = None,
    rule: str | None = None,
) -> RiskAlertsPage:
    """Alerts newest first, raised before `before_seq`, at most `limit`, optionally of
    one payer and one rule."""
    if not 1 <= limit <= RISK_ALERTS_PAGE_MAX:
        raise ValueError(f"limit must be between 1 and {RISK_ALERTS_PAGE_MAX}")
    rows = await _fetch(
        engine,
        _PAGES[(account_id is not None, rule is not None)],
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
    alerts = [
        RiskAlertRow(
            global_seq=row.global_seq,
            event_id=row.event_id,
            account_id=row.account_id,
            rule=row.rule,
            payment_id=row.payment_id,
            trigger_seq=row.trigger_seq,
            reason=row.reason,
            raised_at=row.raised_at,
        )
        for row in rows
        if row.global_seq is not None
    ]
    return RiskAlertsPage(alerts=alerts, as_of_seq=int(rows[0].as_of_seq))


async def _fetch(engine: AsyncEngine, statement: TextClause, params: dict[str, Any]) -> list[Any]:
    """Run one read. A connection lost to a database restart is retried once: reads are
    safe to repeat, and the pool drops the dead connections on the first error."""
    for attempt in (1, 2):
        try:
            async with engine.connect() as conn:
                return list((await conn.execute(statement, params)).all())
        except DBAPIError as error:
            if attempt == 2 or not error.connection_invalidated:
                raise
    raise AssertionError("unreachable: the loop returns or raises")
