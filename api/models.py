"""The HTTP API's models: one per purpose, never ORM rows or workflow internals.

Requests are strict: amounts are JSON integers (a string, a float or a boolean is
refused), currencies are ISO 4217 codes with a minor unit, unknown fields are refused,
free-form parts are bounded, and no string anywhere in a request holds a character
PostgreSQL cannot store (see `unstorable_path`).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from ledger.events import AccountId, AccountKind, Metadata
from ledger.money import AmountMinor, CurrencyCode, NonNegativeMinor
from workflows.models import PaymentStatus

METADATA_BYTES_MAX = 4_096
METADATA_KEYS_MAX = 50
REFERENCE_LENGTH_MAX = 200
REASON_LENGTH_MAX = 500


def _bounded_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    if len(metadata) > METADATA_KEYS_MAX:
        raise ValueError(f"metadata may have at most {METADATA_KEYS_MAX} keys")
    if len(json.dumps(metadata).encode()) > METADATA_BYTES_MAX:
        raise ValueError(f"metadata may be at most {METADATA_BYTES_MAX} bytes as JSON")
    return metadata


BoundedMetadata = Annotated[Metadata, AfterValidator(_bounded_metadata)]


UNSTORABLE_ERROR = "unstorable_text"
# PostgreSQL's text and jsonb cannot hold U+0000; a lone surrogate (which JSON lets a
# client send as "\ud800") is not Unicode at all and cannot even be encoded to UTF-8.
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


def printable(text: str) -> str:
    """`text` with every unstorable character spelled as an escape, safe to echo back."""
    return _UNSTORABLE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def unstorable_path(value: Any) -> tuple[str, str] | None:
    """Where in `value` (a JSON-like tree) an unstorable character is, and which one.

    Returns (the dotted path below `value`: "" for `value` itself, a bad key escaped;
    the character as U+XXXX), or None when every string and key can be stored. It
    walks without recursion, so no nesting depth can exhaust the stack.
    """
    pending: list[tuple[str, Any]] = [("", value)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, str):
            found = _UNSTORABLE.search(item)
            if found is not None:
                return path, f"U+{ord(found.group()):04X}"
        elif isinstance(item, dict):
            for key, child in item.items():
                child_path = ".".join(filter(None, (path, printable(str(key)))))
                pending.append((child_path, key))
                pending.append((child_path, child))
        elif isinstance(item, list | tuple):
            pending.extend(
                (".".join(filter(None, (path, str(index)))), child)
                for index, child in enumerate(item)
            )
    return None


def refuse_unstorable(value: Any) -> Any:
    """`value` unchanged, or a validation error naming the unstorable character and where."""
    found = unstorable_path(value)
    if found is None:
        return value
    path, character = found
    raise PydanticCustomError(
        UNSTORABLE_ERROR,
        "contains {character}, which cannot be stored",
        {"character": character, "path": path},
    )


# A string query parameter: the same rule as every string of a request body.
StorableStr = Annotated[str, AfterValidator(refuse_unstorable)]


class _Request(BaseModel):
    """Every request body: unknown fields refused, every string storable."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        # Before any other check, on the raw JSON: every key and value, unknown ones too.
        return refuse_unstorable(data)


# --- accounts -----------------------------------------------------------------------------
class AccountCreate(_Request):
    id: AccountId | None = Field(default=None, description="Chosen by the client, or generated.")
    currency: CurrencyCode
    kind: AccountKind
    overdraft_limit_minor: NonNegativeMinor | None = Field(
        default=0, description="0 by default; null (unlimited) only for `external` accounts."
    )
    metadata: BoundedMetadata = Field(default_factory=dict)

    @model_validator(mode="after")
    def _unlimited_only_for_external(self) -> AccountCreate:
        if self.overdraft_limit_minor is None and self.kind != "external":
            raise ValueError("only an external account may have an unlimited overdraft")
        return self


class PositionOut(BaseModel):
    debits_pending: int
    debits_posted: int
    credits_pending: int
    credits_posted: int
    posted: int = Field(description="credits_posted - debits_posted")
    pending: int = Field(description="credits_pending - debits_pending")
    available: int | None = Field(
        description="What may still be reserved; null for an unlimited (external) account."
    )
    as_of_seq: int = Field(description="The last ledger event that moved this position.")


class AccountOut(BaseModel):
    id: str
    currency: str
    kind: str
    overdraft_limit_minor: int | None
    metadata: dict[str, Any]
    created_at: datetime
    position: PositionOut


# --- read models (eventually consistent) -------------------------------------------------
AS_OF_SEQ_DESCRIPTION = (
    "How fresh this read model is: it holds every ledger event up to this global_seq, "
    "and none after it."
)


class MovementOut(BaseModel):
    """What one statement entry moved: signed changes of the four counters."""

    debits_pending: int
    debits_posted: int
    credits_pending: int
    credits_posted: int


class RunningBalanceOut(BaseModel):
    """The account's balance right after a statement entry, in ledger order."""

    debits_pending: int
    debits_posted: int
    credits_pending: int
    credits_posted: int
    posted: int = Field(description="credits_posted - debits_posted")
    pending: int = Field(description="credits_pending - debits_pending")


class EntryOut(BaseModel):
    global_seq: int
    recorded_at: datetime
    event_type: str
    payment_id: str
    movement: MovementOut
    balance_after: RunningBalanceOut


class EntryPage(BaseModel):
    account_id: str
    entries: list[EntryOut] = Field(description="In ledger order (global_seq), oldest first.")
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page."
    )
    as_of_seq: int = Field(description=AS_OF_SEQ_DESCRIPTION)


class BalanceOut(BaseModel):
    account_id: str
    currency: str
    debits_pending: int
    debits_posted: int
    credits_pending: int
    credits_posted: int
    posted: int = Field(description="credits_posted - debits_posted")
    pending: int = Field(description="credits_pending - debits_pending")
    available: int | None = Field(
        description="posted - debits_pending + the overdraft limit; null for an unlimited "
        "(external) account."
    )
    as_of: datetime | None = Field(
        description="The instant asked for (`?as_of=`); null for the current balance."
    )
    last_seq: int | None = Field(
        description="The last ledger event, at or before `as_of`, that moved (or opened) "
        "the account; null if none had."
    )
    as_of_seq: int = Field(description=AS_OF_SEQ_DESCRIPTION)


# --- payments -----------------------------------------------------------------------------
class PaymentCreate(_Request):
    payer_account_id: AccountId
    payee_account_id: AccountId
    amount_minor: AmountMinor
    currency: CurrencyCode
    reference: Annotated[str, Field(max_length=REFERENCE_LENGTH_MAX)] | None = None
    metadata: BoundedMetadata = Field(default_factory=dict)

    @model_validator(mode="after")
    def _distinct_accounts(self) -> PaymentCreate:
        if self.payer_account_id == self.payee_account_id:
            raise ValueError("payer_account_id and payee_account_id must differ")
        return self


class PaymentOut(BaseModel):
    id: str
    status: PaymentStatus
    status_url: str
    payer_account_id: str
    payee_account_id: str
    amount_minor: int
    currency: str
    reference: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    updated_at: datetime
    failure_reason: str | None = None
    waiting_for: str | None = Field(
        default=None, description="What the payment waits for, while it runs."
    )
    workflow_status: str | None = Field(
        default=None,
        description="Its workflow's status (RUNNING, TERMINATED, TIMED_OUT, NOT_FOUND, ...), "
        "when the payment is still open in the ledger.",
    )
    repair_pending: bool = Field(
        default=False,
        description="True when the payment is open in the ledger but its workflow no longer "
        "runs: the sweeper will close it from the ledger's facts.",
    )


class PaymentList(BaseModel):
    payments: list[PaymentOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page.")
    as_of_seq: int = Field(description=AS_OF_SEQ_DESCRIPTION)


class EventOut(BaseModel):
    global_seq: int
    stream_id: str
    stream_version: int
    event_id: str
    event_type: str
    schema_version: int
    payload: dict[str, Any]
    actor: str
    correlation_id: str | None
    causation_id: str | None
    recorded_at: datetime
    prev_hash: str = Field(description="Hex SHA-256 of the previous event in the stream.")
    hash: str = Field(description="Hex SHA-256 of this event and prev_hash.")


class PaymentEvents(BaseModel):
    payment_id: str
    events: list[EventOut]


class EventFeed(BaseModel):
    events: list[EventOut]
    next_after_seq: int = Field(description="Pass as `after_seq` for the next page.")
    safe_seq: int = Field(
        description="The ledger's safe horizon when the page was read: no event at or below "
        "it can still appear, so paging on never skips one that commits late."
    )


class CancelIn(_Request):
    reason: Annotated[str, Field(min_length=1, max_length=REASON_LENGTH_MAX)] = (
        "cancelled on request"
    )


class ApproveIn(_Request):
    note: Annotated[str, Field(max_length=REASON_LENGTH_MAX)] | None = None


class RejectIn(_Request):
    reason: Annotated[str, Field(min_length=1, max_length=REASON_LENGTH_MAX)]


class ActionAccepted(BaseModel):
    id: str
    action: Literal["cancel", "approve", "reject"]
    status: PaymentStatus
    status_url: str
