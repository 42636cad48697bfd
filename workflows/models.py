"""The payment saga's inputs, outputs and messages: one typed model per purpose.

Everything a payment needs to run deterministically is in its `PaymentRequest`,
including the `PaymentPolicy` (thresholds, timeouts, risk limits, fees) captured from
the configuration when it starts: changing the configuration later never changes a
payment in flight.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

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
    # The processor's capture (which posts PaymentSettled itself) as a local activity
    # (the default: measured faster, see workflows/payment.py) or as a regular one (for
    # a processor whose captures can be slow, and for comparison).
    capture_activity: Literal["local", "regular"] = "local"
    # How many times a ledger step is tried before the saga gives up and compensates.
    ledger_attempts_max: Annotated[int, Field(ge=1, le=100)] = 8
    # A compensation or a settlement that keeps failing goes on in rounds; once the
    # history is this long, it continues as a new run, so an outage of any length
    # keeps the history bounded.
    history_events_max: Annotated[int, Field(ge=50, le=40_000)] = 2_000


class Resume(_Model):
    """Where a payment that continued as new picks up: settling, or closing."""

    phase: Literal["settling", "closing"]
    # settling: when the hold expires, in the ledger's time and in workflow time.
    hold_expires_at: datetime | None = None
    settle_until: datetime | None = None
    # settling: the processor's capture, once it captured the payment (the pivot): the
    # settlement is then posted until it lands, whatever the hold.
    capture_id: str | None = None
    status: PaymentStatus | None = None
    step: str = "settle"
    reason: str = ""
    authorization_id: str | None = None
    cancel: CancelRequest | None = None
    decision_actor: str | None = None
    rounds: int = 0


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
    # Set only when the payment continued as new (see Resume).
    resume: Resume | None = None

    @property
    def workflow_id(self) -> str:
        return workflow_id_for(self.payment_id)


PAYMENT_WORKFLOW_ID_PREFIX = "payment-"


def workflow_id_for(payment_id: str) -> str:
    return f"{PAYMENT_WORKFLOW_ID_PREFIX}{payment_id}"


def payment_id_of(workflow_id: str) -> str | None:
    """The payment whose workflow this is; None for any other workflow."""
    if not workflow_id.startswith(PAYMENT_WORKFLOW_ID_PREFIX):
        return None
    return workflow_id.removeprefix(PAYMENT_WORKFLOW_ID_PREFIX)


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
    # The processor's capture, once it has captured the payment (the saga's pivot).
    capture_id: str | None = None


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


class FindEvent(_Model):
    """Which recorded event of a payment's stream to look up."""

    payment_id: PaymentId
    event_type: str


class Recorded(_Model):
    """An event in the ledger: the one just appended, or the one a retry found there."""

    global_seq: int
    appended: bool
    recorded_at: datetime
    # The stream's state now. A step re-run after a reset learns here that the ledger
    # went further (or ended) while the run that appended it was alive.
    state: str
    # The ledger's clock as it answered. Deadlines recorded in the ledger (a hold's
    # expiry, an approval's deadline) are waited for as "deadline - checked_at" from
    # now, in workflow time, whatever the skew between the two clocks.
    checked_at: datetime


class RiskInput(_Model):
    payment_id: PaymentId
    payer_account_id: AccountId
    amount_minor: AmountMinor
    policy: PaymentPolicy
    # The payment's PaymentInitiated: the rules judge the ledger as it stood then.
    initiated_seq: int
    initiated_at: datetime


class RiskDecision(_Model):
    approved: bool
    rule: str | None = None
    reason: str | None = None


class InitiateResult(_Model):
    recorded: Recorded
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
    # The PaymentAuthorized event, when the processor authorized.
    recorded: Recorded | None = None


class VoidRequest(_Model):
    payment_id: PaymentId
    reason: Reason


class VoidResult(_Model):
    voided: bool
    authorization_id: str | None = None
    # The processor refused: it had captured the payment. The money moved at the
    # processor, so reconciliation, not a void, deals with it.
    captured: bool = False


# How a capture's failure tells the saga which side of the pivot it is on.
CAPTURE_REFUSED = "capture_refused"  # nothing was captured, and nothing will be
CAPTURED_NOT_POSTED = "captured_not_posted"  # captured: the settlement must be posted


class CaptureRequest(_Model):
    """Capture a payment's authorization (idempotent by payment id), then post
    `settlement`, the payment's PaymentSettled, in the same activity."""

    payment_id: PaymentId
    amount_minor: AmountMinor
    currency: CurrencyCode
    metadata: Metadata = Field(default_factory=dict)
    settlement: RecordEvent | None = None


class CaptureResult(_Model):
    """The processor's answer to a capture: captured (now, or by an earlier call), or
    refused (`refusal` says why: the authorization was voided or fenced off)."""

    captured: bool
    capture_id: str | None = None
    refusal: str | None = None
    # The PaymentSettled event, once the capture was posted.
    recorded: Recorded | None = None


class FenceRequest(_Model):
    """Make any later capture of a payment impossible, unless one has happened."""

    payment_id: PaymentId
    reason: Reason


class CaptureFence(_Model):
    """Either the payment was captured (it must settle), or no capture can land any more."""

    captured: bool
    capture_id: str | None = None


def settlement_payload(request: PaymentRequest) -> dict[str, Any]:
    """The payment's PaymentSettled payload: a function of the request alone (its policy
    fixes the fee), so the saga, a re-run and the sweeper all post the same event."""
    policy = request.policy
    fee = min(
        request.amount_minor - 1,
        request.amount_minor * policy.fee_bps // 10_000 + policy.fee_fixed_minor,
    )
    fee = fee if policy.fees_account_id else 0
    postings: list[dict[str, Any]] = [
        {
            "account_id": request.payer_account_id,
            "side": "debit",
            "amount_minor": request.amount_minor,
        },
        {
            "account_id": request.payee_account_id,
            "side": "credit",
            "amount_minor": request.amount_minor - fee,
        },
    ]
    if fee > 0:
        postings.append(
            {"account_id": policy.fees_account_id, "side": "credit", "amount_minor": fee}
        )
    return {
        "payment_id": request.payment_id,
        "currency": request.currency,
        "postings": postings,
        "fee_minor": fee,
    }


class Close(_Model):
    """Compensate from the ledger's facts, then close the stream with this outcome.

    What to undo is read from the ledger, never from the caller's memory: a hold still
    held is released, an authorization still recorded is voided (the ledger first, so
    that the payment can no longer settle), and only then, once `processor_voided`,
    the terminal event is appended. `initiate` lets a payment whose PaymentInitiated
    never landed be recorded, so that it can be closed.
    """

    payment_id: PaymentId
    status: Literal["DECLINED", "REJECTED", "FAILED", "CANCELLED"]
    step: Annotated[str, Field(min_length=1, max_length=50)]
    reason: Reason
    actor: Actor
    causation_id: str | None = None
    # A decline names who declined; nothing was authorized, so nothing is voided.
    declined_by: Literal["processor", "risk"] | None = None
    rule: Annotated[str, Field(max_length=100)] | None = None
    # A reserved payment is released only once the processor can no longer capture it.
    capture_fenced: bool = False
    processor_voided: bool = False
    initiate: PaymentRequest | None = None


class Closed(_Model):
    """How far a Close got: the stream is closed, or the processor must void first."""

    closed: bool
    state: str
    status: PaymentStatus
    # The reason on the terminal event, which an earlier closer may have written.
    reason: str | None = None
    needs_processor_void: bool = False
    # Still reserved: the processor must fence off any capture (or say it captured)
    # before the hold may be released.
    needs_capture_fence: bool = False


# --- The sweeper ------------------------------------------------------------------------
class SweepRequest(_Model):
    """Which open payments one sweep looks at."""

    # A payment whose last event is younger than this is in the middle of a step.
    idle_s: Annotated[float, Field(ge=0, le=86_400)] = 30.0
    payments_max: Annotated[int, Field(ge=1, le=10_000)] = 500


class Repair(_Model):
    payment_id: str
    cause: str
    status: PaymentStatus


class SweepReport(_Model):
    """What one sweep found: open payments checked, and those it closed."""

    checked: int
    repaired: list[Repair]
