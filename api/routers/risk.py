"""Risk alerts: what the risk consumer flagged (`ledger/risk_consumer.py`), for operators.

The list comes from the risk alerts read model, eventually consistent: each page says
how fresh it is (`as_of_seq`).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, cast

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from api.cursors import decode_cursor, encode_cursor
from api.deps import OpsKey, StoreDep
from api.problems import COMMON_RESPONSES
from ledger.events import ACCOUNT_ID_PATTERN, RiskRule
from ledger.read_models import SEQ_MAX, ReadModels, RiskAlertRow

router = APIRouter(prefix="/v1/risk", tags=["risk"], responses=COMMON_RESPONSES)

ALERTS_LIMIT_MAX = 200
ALERTS_LIMIT_DEFAULT = 50
CURSOR_LENGTH_MAX = 40


class RiskAlertOut(BaseModel):
    id: uuid.UUID = Field(description="The RiskAlertRaised event's id.")
    global_seq: int = Field(description="Where the alert stands in the ledger.")
    account_id: str = Field(description="The payer flagged.")
    rule: RiskRule
    payment_id: str = Field(description="The payment that tripped the rule.")
    trigger_seq: int = Field(description="The ledger event that tripped the rule.")
    reason: str = Field(description="What was observed, and the threshold.")
    raised_at: datetime


class RiskAlertList(BaseModel):
    alerts: list[RiskAlertOut] = Field(description="Newest first.")
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page."
    )
    as_of_seq: int = Field(
        description="How fresh this list is: it holds every alert up to this global_seq "
        "of the ledger, and none after it."
    )


RISK_CURSOR_TAG = "r:"


def _alert_out(row: RiskAlertRow) -> RiskAlertOut:
    return RiskAlertOut(
        id=row.event_id,
        global_seq=row.global_seq,
        account_id=row.account_id,
        rule=cast(RiskRule, row.rule),  # the ledger admits no other value
        payment_id=row.payment_id,
        trigger_seq=row.trigger_seq,
        reason=row.reason,
        raised_at=row.raised_at,
    )


@router.get("/alerts", response_model=RiskAlertList)
async def list_risk_alerts(
    store: StoreDep,
    key: OpsKey,
    account_id: Annotated[str | None, Query(pattern=ACCOUNT_ID_PATTERN)] = None,
    rule: Annotated[RiskRule | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=ALERTS_LIMIT_MAX)] = ALERTS_LIMIT_DEFAULT,
    cursor: Annotated[str | None, Query(max_length=CURSOR_LENGTH_MAX)] = None,
) -> RiskAlertList:
    """Risk alerts, newest first, optionally of one payer (`account_id`) and one `rule`.

    Needs the `ops` scope.
    """
    before = decode_cursor(cursor, RISK_CURSOR_TAG) if cursor is not None else SEQ_MAX
    page = await ReadModels(store.engine).risk_alerts(
        before_seq=before, limit=limit + 1, account_id=account_id, rule=rule
    )
    rows = page.alerts
    next_cursor = (
        encode_cursor(rows[limit - 1].global_seq, RISK_CURSOR_TAG) if len(rows) > limit else None
    )
    return RiskAlertList(
        alerts=[_alert_out(row) for row in rows[:limit]],
        next_cursor=next_cursor,
        as_of_seq=page.as_of_seq,
    )
