"""The streams' state machines: which event may follow which.

The store enforces them at append time (it hands the allowed transitions to the
database, which checks them under the stream's lock), and `ledger check` replays
every stream through them. Paths through the payment machine never repeat an event
type, and every failure path compensates in reverse before its terminal event:
`FundsReleased` (if reserved), then `AuthorizationVoided` (if authorized), then
`PaymentFailed`, `PaymentCancelled` or `PaymentRejected`.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from ledger.errors import InvalidTransition, StreamClosed

NEW = "new"


class StreamKind(StrEnum):
    PAYMENT = "payment"
    ACCOUNT = "account"
    RISK = "risk"
    RECONCILIATION = "recon"


# (state, event type) -> next state.
PAYMENT_TRANSITIONS: dict[tuple[str, str], str] = {
    (NEW, "PaymentInitiated"): "initiated",
    ("initiated", "PaymentAuthorized"): "authorized",
    ("initiated", "PaymentDeclined"): "declined",
    ("initiated", "PaymentFailed"): "failed",
    ("initiated", "PaymentCancelled"): "cancelled",
    ("authorized", "ApprovalRequested"): "pending_approval",
    ("authorized", "FundsReserved"): "reserved",
    ("authorized", "AuthorizationVoided"): "voided",
    ("pending_approval", "PaymentApproved"): "approved",
    # Voided while waiting for approval: the one state from which a rejection may close.
    ("pending_approval", "AuthorizationVoided"): "voided_unapproved",
    ("approved", "FundsReserved"): "reserved",
    ("approved", "AuthorizationVoided"): "voided",
    ("reserved", "PaymentSettled"): "settled",
    ("reserved", "FundsReleased"): "released",
    ("released", "AuthorizationVoided"): "voided",
    ("voided", "PaymentFailed"): "failed",
    ("voided", "PaymentCancelled"): "cancelled",
    ("voided_unapproved", "PaymentRejected"): "rejected",
    ("voided_unapproved", "PaymentFailed"): "failed",
    ("voided_unapproved", "PaymentCancelled"): "cancelled",
}

ACCOUNT_TRANSITIONS: dict[tuple[str, str], str] = {
    (NEW, "AccountOpened"): "open",
}

# A payer's risk alerts: one stream per payer, which only ever grows.
RISK_TRANSITIONS: dict[tuple[str, str], str] = {
    (NEW, "RiskAlertRaised"): "open",
    ("open", "RiskAlertRaised"): "open",
}

# A reconciliation run: the differences it found, then its totals; each difference
# is resolved later, once (its event id is a function of the discrepancy).
RECONCILIATION_TRANSITIONS: dict[tuple[str, str], str] = {
    (NEW, "DiscrepancyDetected"): "running",
    ("running", "DiscrepancyDetected"): "running",
    (NEW, "ReconciliationCompleted"): "completed",
    ("running", "ReconciliationCompleted"): "completed",
    ("completed", "DiscrepancyResolved"): "completed",
}

TRANSITIONS: dict[StreamKind, dict[tuple[str, str], str]] = {
    StreamKind.PAYMENT: PAYMENT_TRANSITIONS,
    StreamKind.ACCOUNT: ACCOUNT_TRANSITIONS,
    StreamKind.RISK: RISK_TRANSITIONS,
    StreamKind.RECONCILIATION: RECONCILIATION_TRANSITIONS,
}

# Event types a stream may hold more than once (a payer's risk stream grows with each
# alert, a run's stream with each discrepancy). In every other stream an event type
# appears at most once (invariant 3).
REPEATABLE_EVENT_TYPES = frozenset(
    {"RiskAlertRaised", "DiscrepancyDetected", "DiscrepancyResolved"}
)

TERMINAL_STATES = frozenset({"settled", "declined", "rejected", "failed", "cancelled"})

# The payment's status, as the API and the search attributes show it. A payment that
# is compensating shows the status it is leaving until its terminal event lands.
PAYMENT_STATUS_BY_STATE: dict[str, str] = {
    "initiated": "INITIATED",
    "authorized": "AUTHORIZED",
    "pending_approval": "PENDING_APPROVAL",
    "approved": "AUTHORIZED",
    "reserved": "RESERVED",
    "released": "RESERVED",
    "voided": "AUTHORIZED",
    "voided_unapproved": "PENDING_APPROVAL",
    "settled": "SETTLED",
    "declined": "DECLINED",
    "rejected": "REJECTED",
    "failed": "FAILED",
    "cancelled": "CANCELLED",
}


def stream_kind(stream_id: str) -> StreamKind:
    prefix, _, rest = stream_id.partition("-")
    try:
        kind = StreamKind(prefix)
    except ValueError:
        raise InvalidTransition(f"unknown stream kind in {stream_id!r}") from None
    if not rest:
        raise InvalidTransition(f"stream id {stream_id!r} names no entity")
    return kind


def transitions_for(stream_id: str, event_type: str) -> dict[str, str]:
    """{from state: to state} for this event type in this stream's machine."""
    machine = TRANSITIONS[stream_kind(stream_id)]
    allowed = {state: to for (state, event), to in machine.items() if event == event_type}
    if not allowed:
        raise InvalidTransition(
            f"{event_type} does not belong in a {stream_kind(stream_id)} stream",
            stream_id=stream_id,
            event_type=event_type,
        )
    return allowed


def next_state(stream_id: str, state: str, event_type: str) -> str:
    """The state after `event_type`, or a domain error saying why it may not follow."""
    allowed = transitions_for(stream_id, event_type)
    if state in allowed:
        return allowed[state]
    if state in TERMINAL_STATES:
        raise StreamClosed(
            f"{stream_id} is closed ({state}); {event_type} may not follow",
            stream_id=stream_id,
            state=state,
            event_type=event_type,
        )
    raise InvalidTransition(
        f"{event_type} may not follow state {state!r} in {stream_id}; "
        f"it needs one of: {', '.join(sorted(allowed))}",
        stream_id=stream_id,
        state=state,
        event_type=event_type,
    )


def replay(stream_id: str, event_types: Iterable[str]) -> str:
    """The state after these events, in order; raises at the first one not allowed."""
    state = NEW
    for event_type in event_types:
        state = next_state(stream_id, state, event_type)
    return state
