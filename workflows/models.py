"""The payment saga's inputs, outputs and messages: one typed model per purpose.

Everything a payment needs to run deterministically is in its `PaymentRequest`,
including the `PaymentPolicy` (thresholds, timeouts, risk limits, fees) captured from
the configuration when it starts: changing the configuration later never changes a
payment in flight.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from ledger.events import AccountId, Actor, Metadata, PaymentId, Reason
from ledger.money import AmountMinor, CurrencyCode, NonNegativeMinor

PaymentStatus = Literal[
    "INITIATED",
    "AUTHORIZED",
    "PENDING_APPROVAL",
    "RESERVED",
    "SETTLED",
    "DECLINED",
    "REJECTED",
    "FAILED",
    "CANCELLED",
]
TERMINAL_STATUSES: frozenset[str] = frozenset(
    {"SETTLED", "DECLINED", "REJECTED", "FAILED", "CANCELLED"}
)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PaymentPolicy(_Model):
    """The rules a payment runs under, fixed when it starts."""

    approval_threshold_minor: Annotated[int, Field(ge=1)] = 1_000_000
    approval_deadline_s: Annotated[int, Field(ge=1)] = 86_400
    hold_expiry_s: Annotated[int, Field(ge=1)] = 3_600
    processor_timeout_s: Annotated[int, Field(ge=1)] = 30
    processor_heartbeat_s: Annotated[int, Field(ge=1)] = 5
    processor_attempts_max: Annotated[int, Field(ge=1)] = 3
    risk_payment_limit_minor: Annotated[int, Field(ge=1)] = 10**12
    risk_velocity_window_s: Annotated[int, Field(ge=1)] = 60
    risk_velocity_count_max: Annotated[int, Field(ge=1)] = 10_000
    fee_bps: Annotated[int, Field(ge=0, le=10_000)] = 0
    fee_fixed_minor: NonNegativeMinor = 0
    fees_account_id: AccountId | None = None
    # Ledger steps as local activities (the default: measured faster, see
    # activities/ledger.py) or as regular ones (for comparison, bench/e2e_workflow.py).
    ledger_activities: Literal["local", "regular"] = "local"


class PaymentRequest(_Model):
    """What a client asked for, plus the policy it runs under."""

    payment_id: PaymentId
    payer_account_id: AccountId
    payee_account_id: AccountId
    amount_minor: AmountMinor
    currency: CurrencyCode
    reference: Annotated[str, Field(max_length=200)] | None = None
    metadata: Metadata = Field(default_factory=dict)
    requested_by: Actor = "system"
    # The request that caused the payment (an API request id), for the audit trail.
    causation_id: Annotated[str, Field(max_length=200)] | None = None
    policy: PaymentPolicy = Field(default_factory=PaymentPolicy)

    @property
    def workflow_id(self) -> str:
        return workflow_id_for(self.payment_id)


def workflow_id_for(payment_id: str) -> str:
    return f"payment-{payment_id}"


class PaymentState(_Model):
    """The live state of a payment, as the `status` query returns it."""

    payment_id: str
    status: PaymentStatus
    payer_account_id: str
    payee_account_id: str
    amount_minor: int
    currency: str
    reference: str | None = None
    step: str
    waiting_for: str | None = None
    authorization_id: str | None = None
    failure_reason: str | None = None
    created_at: datetime
    updated_at: datetime
    approval_deadline_at: datetime | None = None
    hold_expires_at: datetime | None = None
    cancel_requested: bool = False


class PaymentOutcome(_Model):
    """How a payment ended."""

    payment_id: str
    status: PaymentStatus
    failure_reason: str | None = None
    step: str


# --- Updates ------------------------------------------------------------------------------
class CancelRequest(_Model):
    actor: Actor
    reason: Reason = "cancelled on request"


class ApproveRequest(_Model):
    actor: Actor
    note: Annotated[str, Field(max_length=500)] | None = None


class RejectRequest(_Model):
    actor: Actor
    reason: Reason


class UpdateAccepted(_Model):
    """An update was accepted; what happens next shows in the payment's status."""

    payment_id: str
    status: PaymentStatus
    accepted: Literal[True] = True


# --- Activity inputs and outputs ----------------------------------------------------------
class RecordEvent(_Model):
    """Append one event to a payment's stream, under a deterministic id."""

    payment_id: PaymentId
    step: Annotated[str, Field(min_length=1, max_length=50)]
    event_type: str
    payload: dict[str, JsonValue]
    actor: Actor
    causation_id: str | None = None


class Recorded(_Model):
    global_seq: int
    appended: bool


class RiskInput(_Model):
    payment_id: PaymentId
    payer_account_id: AccountId
    amount_minor: AmountMinor
    policy: PaymentPolicy


class RiskDecision(_Model):
    approved: bool
    rule: str | None = None
    reason: str | None = None


class InitiateResult(_Model):
    global_seq: int
    # Why the payment cannot proceed (unknown account, currency mismatch), if it cannot.
    invalid_reason: str | None = None
    # The risk rules' verdict, for a payment that can proceed.
    risk: RiskDecision | None = None


class AuthorizationRequest(_Model):
    payment_id: PaymentId
    amount_minor: AmountMinor
    currency: CurrencyCode
    payer_account_id: AccountId
    metadata: Metadata = Field(default_factory=dict)
    # For the PaymentAuthorized event the activity appends once the processor agrees.
    actor: Actor = "system"
    causation_id: str | None = None


class AuthorizationResult(_Model):
    approved: bool
    authorization_id: str | None = None
    decline_reason: str | None = None
    processor: str


class VoidRequest(_Model):
    payment_id: PaymentId
    reason: Reason


class VoidResult(_Model):
    voided: bool
    authorization_id: str | None = None


class LedgerStatus(_Model):
    """A payment's state as the ledger records it."""

    payment_id: str
    state: str
    status: PaymentStatus


class Compensate(_Model):
    """Undo one step if, and only if, the ledger shows it happened."""

    payment_id: PaymentId
    reason: Reason
    actor: Actor
    causation_id: str | None = None
