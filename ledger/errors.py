"""Domain errors. The store translates database errors into these; callers never see SQL.

Each has a stable `code`, used as the Temporal ApplicationError type and the API's
problem type, so clients and workflows can branch on it.
"""

from __future__ import annotations

from typing import Any


class LedgerError(Exception):
    """Base of every error the ledger reports on purpose."""

    code = "ledger_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidTransition(LedgerError):
    """The event is not allowed in the stream's current state (e.g. settle before reserve)."""

    code = "invalid_transition"


class StreamClosed(InvalidTransition):
    """The stream reached a terminal event; nothing more may be appended."""

    code = "stream_closed"


class WrongExpectedVersion(LedgerError):
    """Optimistic concurrency: another writer appended to the stream first."""

    code = "wrong_expected_version"


class IdempotencyConflict(LedgerError):
    """The event id exists already, with different content."""

    code = "idempotency_conflict"


class InsufficientFunds(LedgerError):
    """The reservation would take the payer's available balance below minus its overdraft."""

    code = "insufficient_funds"


class UnknownAccount(LedgerError):
    code = "unknown_account"


class AccountExists(LedgerError):
    code = "account_exists"


class CurrencyMismatch(LedgerError):
    code = "currency_mismatch"


class InvalidPostings(LedgerError):
    """Settlement postings that do not balance or do not match the hold."""

    code = "invalid_postings"


class InvalidEvent(LedgerError):
    """An event the catalog refuses: a payload of the wrong shape, or a bad envelope."""

    code = "invalid_event"


class AmountOutOfRange(LedgerError):
    """A position would leave the range of a 64-bit integer."""

    code = "amount_out_of_range"


class StoreUnavailable(LedgerError):
    """Transient: the database could not complete the append after the bounded retries."""

    code = "store_unavailable"
