"""Risk rules: checked before the processor sees a payment.

- **payment limit**: no single payment above `risk_payment_limit_minor`;
- **velocity**: no payer starts more than `risk_velocity_count_max` payments within a
  sliding `risk_velocity_window_s`. Funding accounts (kind `external`) are exempt:
  bulk funding is ordinary traffic for them.

A declined payment names the rule that declined it.
"""

from __future__ import annotations

from sqlalchemy import text

from ledger.store import EventStore
from workflows.models import RiskDecision, RiskInput

# The payer's kind and its recent payments, in one round trip.
_RECENT_PAYMENTS = text(
    """
    SELECT a.kind,
           (SELECT count(*) FROM events e
             WHERE e.event_type = 'PaymentInitiated'
               AND e.payload->>'payer_account_id' = :payer
               AND e.recorded_at > clock_timestamp() - make_interval(secs => :window_s)
               AND e.stream_id <> :stream_id) AS recent
      FROM (SELECT :payer AS account_id) AS p
      LEFT JOIN accounts a ON a.account_id = p.account_id
    """
)


async def assess(store: EventStore, risk: RiskInput) -> RiskDecision:
    policy = risk.policy
    if risk.amount_minor > policy.risk_payment_limit_minor:
        return RiskDecision(
            approved=False,
            rule="payment_limit",
            reason=f"amount {risk.amount_minor} exceeds the per-payment limit of "
            f"{policy.risk_payment_limit_minor}",
        )
    async with store.engine.connect() as conn:
        payer = (
            await conn.execute(
                _RECENT_PAYMENTS,
                {
                    "payer": risk.payer_account_id,
                    "window_s": policy.risk_velocity_window_s,
                    "stream_id": f"payment-{risk.payment_id}",
                },
            )
        ).one()
    recent = int(payer.recent)
    if payer.kind == "external":
        return RiskDecision(approved=True)
    if recent >= policy.risk_velocity_count_max:
        return RiskDecision(
            approved=False,
            rule="velocity",
            reason=f"payer {risk.payer_account_id} started {recent} payments in the last "
            f"{policy.risk_velocity_window_s} s (limit {policy.risk_velocity_count_max})",
        )
    return RiskDecision(approved=True)
