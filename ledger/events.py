"""The event catalog: every fact the ledger records, as a versioned pydantic model.

Events are named in the past tense and are immutable. A payload's shape is fixed by
its `event_type` and `schema_version`; changing a shape means a new version, and
readers keep understanding the old ones (upcasting), because stored events are never
rewritten.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    field_validator,
    model_validator,
)

from ledger.money import AMOUNT_MINOR_MAX, AmountMinor, CurrencyCode, NonNegativeMinor

# Identifiers that appear in stream ids and URLs: readable, bounded, no spaces.
ACCOUNT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
PAYMENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
AccountId = Annotated[str, Field(pattern=ACCOUNT_ID_PATTERN, examples=["acct-a"])]
PaymentId = Annotated[str, Field(pattern=PAYMENT_ID_PATTERN)]
REASON_CHARS_MAX = 500
Reason = Annotated[str, Field(min_length=1, max_length=REASON_CHARS_MAX)]
Actor = Annotated[str, Field(min_length=1, max_length=200)]
METADATA_DEPTH_MAX = 8


def _no_floats(value: JsonValue, depth: int = 0) -> JsonValue:
    """Metadata is free-form JSON, except floats: nothing in a payment carries one."""
    if depth > METADATA_DEPTH_MAX:
        raise ValueError(f"metadata nests deeper than {METADATA_DEPTH_MAX} levels")
    if isinstance(value, float):
        raise ValueError("metadata may not contain floating-point numbers; use strings or integers")
    if isinstance(value, dict):
        for item in value.values():
            _no_floats(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _no_floats(item, depth + 1)
    return value


Metadata = Annotated[dict[str, JsonValue], AfterValidator(_no_floats)]

AccountKind = Literal["customer", "merchant", "settlement", "fees", "external"]
ACCOUNT_KINDS: tuple[AccountKind, ...] = ("customer", "merchant", "settlement", "fees", "external")

# Deterministic event ids: uuid5 under this namespace, from the correlation id (the
# workflow id) and the step. A retried activity computes the same id, and the store
# appends nothing twice.
EVENT_ID_NAMESPACE = uuid.UUID("6f1d3c52-3a55-4c1e-9a57-5b1a3c0e7d11")


def event_id_for(correlation_id: str, step: str) -> uuid.UUID:
    return uuid.uuid5(EVENT_ID_NAMESPACE, f"{correlation_id}/{step}")


def payment_stream(payment_id: str) -> str:
    return f"payment-{payment_id}"


def account_stream(account_id: str) -> str:
    return f"account-{account_id}"


def risk_stream(account_id: str) -> str:
    return f"risk-{account_id}"


class DomainEvent(BaseModel):
    """Base of every event. Subclasses set `event_type` and `schema_version`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_type: ClassVar[str]
    schema_version: ClassVar[int] = 1

    def payload(self) -> dict[str, Any]:
        """The JSON payload as stored (datetimes as RFC 3339 strings, no floats)."""
        return self.model_dump(mode="json")


# --- account stream ---------------------------------------------------------------------
class AccountOpened(DomainEvent):
    event_type: ClassVar[str] = "AccountOpened"

    account_id: AccountId
    currency: CurrencyCode
    kind: AccountKind
    # None means unlimited, which only an `external` funding account may have.
    overdraft_limit_minor: NonNegativeMinor | None = 0
    metadata: Metadata = Field(default_factory=dict)

    @model_validator(mode="after")
    def _unlimited_only_for_external(self) -> AccountOpened:
        if self.overdraft_limit_minor is None and self.kind != "external":
            raise ValueError("only an external account may have an unlimited overdraft")
        return self


# --- payment stream: the happy path -----------------------------------------------------
class PaymentInitiated(DomainEvent):
    event_type: ClassVar[str] = "PaymentInitiated"

    payment_id: PaymentId
    payer_account_id: AccountId
    payee_account_id: AccountId
    amount_minor: AmountMinor
    currency: CurrencyCode
    reference: Annotated[str, Field(max_length=200)] | None = None
    metadata: Metadata = Field(default_factory=dict)

    @model_validator(mode="after")
    def _distinct_accounts(self) -> PaymentInitiated:
        if self.payer_account_id == self.payee_account_id:
            raise ValueError("payer and payee must differ")
        return self


class PaymentAuthorized(DomainEvent):
    event_type: ClassVar[str] = "PaymentAuthorized"

    payment_id: PaymentId
    authorization_id: Annotated[str, Field(min_length=1, max_length=200)]
    processor: Annotated[str, Field(min_length=1, max_length=100)]


class FundsReserved(DomainEvent):
    """A hold: the amount moves to the payer's debits_pending and the payee's credits_pending."""

    event_type: ClassVar[str] = "FundsReserved"

    payment_id: PaymentId
    payer_account_id: AccountId
    payee_account_id: AccountId
    amount_minor: AmountMinor
    currency: CurrencyCode
    expires_at: datetime


class Posting(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    account_id: AccountId
    side: Literal["debit", "credit"]
    amount_minor: AmountMinor


class PaymentSettled(DomainEvent):
    """The hold becomes posted: balanced postings, payer to payee (and fees, if any)."""

    event_type: ClassVar[str] = "PaymentSettled"

    payment_id: PaymentId
    currency: CurrencyCode
    postings: Annotated[list[Posting], Field(min_length=2, max_length=16)]
    fee_minor: NonNegativeMinor = 0

    @field_validator("postings")
    @classmethod
    def _balanced(cls, postings: list[Posting]) -> list[Posting]:
        debits = sum(p.amount_minor for p in postings if p.side == "debit")
        credits = sum(p.amount_minor for p in postings if p.side == "credit")
        if debits != credits:
            raise ValueError(f"postings do not balance: debits {debits} != credits {credits}")
        return postings


# --- payment stream: business outcomes --------------------------------------------------
class PaymentDeclined(DomainEvent):
    event_type: ClassVar[str] = "PaymentDeclined"

    payment_id: PaymentId
    declined_by: Literal["processor", "risk"]
    reason: Reason
    rule: Annotated[str, Field(max_length=100)] | None = None


class ApprovalRequested(DomainEvent):
    event_type: ClassVar[str] = "ApprovalRequested"

    payment_id: PaymentId
    threshold_minor: NonNegativeMinor
    deadline_at: datetime


class PaymentApproved(DomainEvent):
    event_type: ClassVar[str] = "PaymentApproved"

    payment_id: PaymentId
    approved_by: Actor
    note: Annotated[str, Field(max_length=500)] | None = None


class PaymentRejected(DomainEvent):
    event_type: ClassVar[str] = "PaymentRejected"

    payment_id: PaymentId
    rejected_by: Actor
    reason: Reason


# --- payment stream: compensations ------------------------------------------------------
class FundsReleased(DomainEvent):
    """The hold is returned: pending amounts go back, nothing is posted."""

    event_type: ClassVar[str] = "FundsReleased"

    payment_id: PaymentId
    amount_minor: AmountMinor
    reason: Reason


class AuthorizationVoided(DomainEvent):
    event_type: ClassVar[str] = "AuthorizationVoided"

    payment_id: PaymentId
    authorization_id: Annotated[str, Field(min_length=1, max_length=200)]
    reason: Reason


class PaymentFailed(DomainEvent):
    event_type: ClassVar[str] = "PaymentFailed"

    payment_id: PaymentId
    step: Annotated[str, Field(min_length=1, max_length=50)]
    reason: Reason


class PaymentCancelled(DomainEvent):
    event_type: ClassVar[str] = "PaymentCancelled"

    payment_id: PaymentId
    step: Annotated[str, Field(min_length=1, max_length=50)]
    reason: Reason
    cancelled_by: Actor


# --- risk stream ------------------------------------------------------------------------
RiskRule = Literal["velocity", "amount_outlier", "decline_streak"]
RISK_RULES: tuple[RiskRule, ...] = ("velocity", "amount_outlier", "decline_streak")


class RiskAlertRaised(DomainEvent):
    """The risk consumer flagged a payer: appended to the payer's own `risk-` stream.

    `trigger_seq` is the global_seq of the event that tripped the rule, which makes the
    alert a function of the log: a consumer that re-reads it appends nothing twice.
    """

    event_type: ClassVar[str] = "RiskAlertRaised"

    account_id: AccountId
    rule: RiskRule
    payment_id: PaymentId
    trigger_seq: Annotated[int, Field(ge=1, le=2**63 - 1)]
    reason: Reason


# --- reconciliation stream ---------------------------------------------------------------
# A reconciliation run's stream, `recon-<run_id>`: one DiscrepancyDetected per difference
# it found, its ReconciliationCompleted, and later each DiscrepancyResolved.
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
RunId = Annotated[str, Field(pattern=RUN_ID_PATTERN)]
DiscrepancyId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")]
SignedMinor = Annotated[int, Field(ge=-AMOUNT_MINOR_MAX, le=AMOUNT_MINOR_MAX)]
Count = Annotated[int, Field(ge=0, le=2**63 - 1)]
Seq = Annotated[int, Field(ge=0, le=2**63 - 1)]
DiscrepancyType = Literal[
    "missing_in_ledger",
    "missing_in_statement",
    "amount_mismatch",
    "currency_mismatch",
    "duplicate_in_statement",
    "internal_drift",
]
DISCREPANCY_TYPES: tuple[DiscrepancyType, ...] = (
    "missing_in_ledger",
    "missing_in_statement",
    "amount_mismatch",
    "currency_mismatch",
    "duplicate_in_statement",
    "internal_drift",
)
ReconciliationKind = Literal["continuous", "daily", "manual", "statement"]
# How a discrepancy was closed: by reconciliation itself where that is safe
# (`posted_capture`; `matched_later`, when a later run matched its line or settlement),
# otherwise by an operator.
Resolution = Literal[
    "posted_capture",
    "matched_later",
    "accepted",
    "corrected_at_source",
    "written_off",
    "duplicate_ignored",
    "false_positive",
]
RESOLUTIONS: tuple[Resolution, ...] = (
    "posted_capture",
    "matched_later",
    "accepted",
    "corrected_at_source",
    "written_off",
    "duplicate_ignored",
    "false_positive",
)


def recon_stream(run_id: str) -> str:
    return f"recon-{run_id}"


class DiscrepancyDetected(DomainEvent):
    """A difference a run found between a statement and the ledger, or inside the ledger
    (`internal_drift`). Its id is a function of what differs, so no later run records it
    again. Statement and ledger sides are given where each exists."""

    event_type: ClassVar[str] = "DiscrepancyDetected"

    run_id: RunId
    discrepancy_id: DiscrepancyId
    discrepancy_type: DiscrepancyType
    payment_id: PaymentId | None
    reference: Annotated[str, Field(max_length=200)] | None
    statement_amount_minor: SignedMinor | None
    statement_currency: CurrencyCode | None
    ledger_amount_minor: SignedMinor | None
    ledger_currency: CurrencyCode | None
    statement_line_id: Seq | None
    ledger_seq: Seq | None
    description: Reason


class ReconciliationCompleted(DomainEvent):
    """A run's totals: what it matched, what it found, and how far it read each side."""

    event_type: ClassVar[str] = "ReconciliationCompleted"

    run_id: RunId
    kind: ReconciliationKind
    lines_matched: Count
    items_matched: Count
    lines_unmatched: Count
    items_unmatched: Count
    discrepancies: Count
    missing_in_ledger: Count
    missing_in_statement: Count
    amount_mismatch: Count
    currency_mismatch: Count
    duplicate_in_statement: Count
    internal_drift: Count
    line_checkpoint: Seq
    item_checkpoint: Seq


class DiscrepancyResolved(DomainEvent):
    """How a discrepancy was closed, by whom, and on what evidence (a statement line)."""

    event_type: ClassVar[str] = "DiscrepancyResolved"

    run_id: RunId
    discrepancy_id: DiscrepancyId
    resolution: Resolution
    note: Reason
    resolved_by: Actor
    evidence_line_id: Seq | None


EVENT_TYPES: dict[str, type[DomainEvent]] = {
    cls.event_type: cls
    for cls in (
        AccountOpened,
        PaymentInitiated,
        PaymentAuthorized,
        FundsReserved,
        PaymentSettled,
        PaymentDeclined,
        ApprovalRequested,
        PaymentApproved,
        PaymentRejected,
        FundsReleased,
        AuthorizationVoided,
        PaymentFailed,
        PaymentCancelled,
        RiskAlertRaised,
        DiscrepancyDetected,
        ReconciliationCompleted,
        DiscrepancyResolved,
    )
}


def parse_event(event_type: str, schema_version: int, payload: dict[str, Any]) -> DomainEvent:
    """A stored payload as its model. Every stored version must stay readable."""
    cls = EVENT_TYPES.get(event_type)
    if cls is None:
        raise ValueError(f"unknown event type {event_type!r}")
    if schema_version != cls.schema_version:
        raise ValueError(
            f"{event_type} v{schema_version} has no reader (current: v{cls.schema_version})"
        )
    return cls.model_validate(payload)
