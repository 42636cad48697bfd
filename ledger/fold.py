"""Positions as a fold over events: the ledger's second, independent implementation.

The database function moves positions as events are appended; this module recomputes
them from the events alone, in Python. `ledger check` and the property tests compare
the two, so a bug in either shows up as a disagreement.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ledger.errors import LedgerError
from ledger.state_machine import NEW, next_state


@dataclass
class FoldedPosition:
    account_id: str
    currency: str
    overdraft_limit_minor: int | None
    debits_pending: int = 0
    debits_posted: int = 0
    credits_pending: int = 0
    credits_posted: int = 0

    @property
    def available_minor(self) -> int | None:
        if self.overdraft_limit_minor is None:
            return None
        return (
            self.credits_posted
            - self.debits_posted
            - self.debits_pending
            + self.overdraft_limit_minor
        )

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.debits_pending, self.debits_posted, self.credits_pending, self.credits_posted)


class FoldError(LedgerError):
    code = "fold_error"


@dataclass
class LedgerFold:
    """Positions, stream states and holds, folded one event at a time in global order."""

    positions: dict[str, FoldedPosition] = field(default_factory=dict)
    states: dict[str, str] = field(default_factory=dict)
    holds: dict[str, dict[str, Any]] = field(default_factory=dict)

    def apply(self, stream_id: str, event_type: str, payload: dict[str, Any]) -> None:
        """Fold one event. Raises FoldError (or a state-machine error) if it cannot apply."""
        self.states[stream_id] = next_state(stream_id, self.states.get(stream_id, NEW), event_type)
        if event_type == "AccountOpened":
            account_id = payload["account_id"]
            if account_id in self.positions:
                raise FoldError(f"account {account_id} opened twice")
            self.positions[account_id] = FoldedPosition(
                account_id, payload["currency"], payload.get("overdraft_limit_minor", 0)
            )
        elif event_type == "FundsReserved":
            self.holds[stream_id] = payload
            amount = payload["amount_minor"]
            payer = self._account(payload["payer_account_id"], payload["currency"])
            payee = self._account(payload["payee_account_id"], payload["currency"])
            payer.debits_pending += amount
            payee.credits_pending += amount
            _check(payer, payee)
        elif event_type in ("FundsReleased", "PaymentSettled"):
            hold = self.holds.pop(stream_id, None)
            if hold is None:
                raise FoldError(f"{event_type} in {stream_id} without a hold")
            amount = hold["amount_minor"]
            payer = self._account(hold["payer_account_id"], hold["currency"])
            payee = self._account(hold["payee_account_id"], hold["currency"])
            payer.debits_pending -= amount
            payee.credits_pending -= amount
            touched = [payer, payee]
            if event_type == "PaymentSettled":
                touched += self._post(stream_id, hold, payload)
            _check(*touched)

    def _post(
        self, stream_id: str, hold: dict[str, Any], payload: dict[str, Any]
    ) -> list[FoldedPosition]:
        debits = sum(p["amount_minor"] for p in payload["postings"] if p["side"] == "debit")
        credits = sum(p["amount_minor"] for p in payload["postings"] if p["side"] == "credit")
        if debits != credits or debits != hold["amount_minor"]:
            raise FoldError(
                f"{stream_id}: postings {debits}/{credits} vs hold {hold['amount_minor']}"
            )
        touched = []
        for posting in payload["postings"]:
            account = self._account(posting["account_id"], hold["currency"])
            touched.append(account)
            if posting["side"] == "debit":
                if posting["account_id"] != hold["payer_account_id"]:
                    raise FoldError(f"{stream_id}: debit of {posting['account_id']}, not the payer")
                account.debits_posted += posting["amount_minor"]
            else:
                account.credits_posted += posting["amount_minor"]
        return touched

    def _account(self, account_id: str, currency: str) -> FoldedPosition:
        position = self.positions.get(account_id)
        if position is None:
            raise FoldError(f"unknown account {account_id}")
        if position.currency != currency:
            raise FoldError(f"{account_id} holds {position.currency}, not {currency}")
        return position

    def zero_sum_violations(self) -> list[str]:
        return zero_sum_violations(self.positions.values())


def _check(*positions: FoldedPosition) -> None:
    """Invariant 2 after every event: never below minus the overdraft, no negative part."""
    for position in positions:
        if min(position.as_tuple()) < 0:
            raise FoldError(f"{position.account_id} has a negative component")
        available = position.available_minor
        if available is not None and available < 0:
            raise FoldError(f"{position.account_id} is at {available} available, below its limit")


def zero_sum_violations(positions: Iterable[Any]) -> list[str]:
    """Per currency, posted balances sum to zero and pending debits equal pending credits."""
    posted: dict[str, int] = defaultdict(int)
    pending: dict[str, int] = defaultdict(int)
    for p in positions:
        posted[p.currency] += p.credits_posted - p.debits_posted
        pending[p.currency] += p.credits_pending - p.debits_pending
    problems = [f"{c}: posted balances sum to {v}, not 0" for c, v in posted.items() if v]
    problems += [f"{c}: pending credits - debits = {v}, not 0" for c, v in pending.items() if v]
    return problems
