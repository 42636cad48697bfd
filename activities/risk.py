"""Risk rules: checked before the processor sees a payment.

- **payment limit**: no single payment above `risk_payment_limit_minor`;
- **velocity**: no payer starts more than `risk_velocity_count_max` payments within a
  sliding `risk_velocity_window_s`. Funding accounts (kind `external`) are exempt:
  bulk funding is ordinary traffic for them.

The window ends at the payment's own PaymentInitiated, and counts only payments
recorded before it: a verdict is a function of facts already recorded, so a step re-run
hours later (an operator's reset) reaches the same one.

A declined payment names the rule that declined it.
"""

from __future__ import annotations

from ledger.store import EventStore
from workflows.models import RiskDecision, RiskInput


async def assess(store: EventStore, risk: RiskInput) -> RiskDecision:
    policy = risk.policy
    if risk.amount_minor > policy.risk_payment_limit_minor:
        return RiskDecision(
            approved=False,
            rule="payment_limit",
            reason=f"amount {risk.amount_minor} exceeds the per-payment limit of "
            f"{policy.risk_payment_limit_minor}",
        )
    payer = await store.payer_activity(
        risk.payer_account_id,
        window_s=policy.risk_velocity_window_s,
        before_seq=risk.initiated_seq,
        until=risk.initiated_at,
    )
    recent = payer.recent_payments
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
