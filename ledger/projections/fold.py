"""The read models as a fold over events, in Python: their second, independent
implementation.

The projections apply events in set-based SQL; this module folds the same events one
at a time. `paysaga ledger check` and the tests compare the two: each read model must
equal this fold up to its checkpoint (invariant 7).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ledger.projections.payments import STATE_BY_EVENT
from ledger.state_machine import PAYMENT_STATUS_BY_STATE, TERMINAL_STATES

# Each read model's rows, keyed as its table is, in the column order of `ROW_COLUMNS`.
Rows = dict[Any, tuple[Any, ...]]

KEY_COLUMNS: dict[str, tuple[str, ...]] = {
    "balances": ("account_id",),
    "statement": ("account_id", "global_seq"),
    "payments": ("payment_id",),
    "risk_alerts": ("global_seq",),
}
ROW_COLUMNS: dict[str, tuple[str, ...]] = {
    "balances": (
        "currency",
        "kind",
        "overdraft_limit_minor",
        "debits_pending",
        "debits_posted",
        "credits_pending",
        "credits_posted",
        "opened_seq",
        "last_seq",
    ),
    "statement": (
        "recorded_at",
        "event_type",
        "payment_id",
        "debits_pending_delta",
        "debits_posted_delta",
        "credits_pending_delta",
        "credits_posted_delta",
        "debits_pending",
        "debits_posted",
        "credits_pending",
        "credits_posted",
        "at_debits_pending",
        "at_debits_posted",
        "at_credits_pending",
        "at_credits_posted",
    ),
    "payments": (
        "initiated_seq",
        "payer_account_id",
        "payee_account_id",
        "amount_minor",
        "currency",
        "reference",
        "metadata",
        "state",
        "status",
        "failure_reason",
        "created_at",
        "updated_at",
        "last_seq",
    ),
    "risk_alerts": (
        "event_id",
        "account_id",
        "rule",
        "payment_id",
        "trigger_seq",
        "reason",
        "raised_at",
    ),
}
TABLE_OF: dict[str, str] = {
    "balances": "balances",
    "statement": "entries",
    "payments": "payments",
    "risk_alerts": "risk_alerts",
}


@dataclass
class _Entry:
    recorded_at: datetime
    event_type: str
    payment_id: str
    deltas: list[int]
    running: tuple[int, ...] = ()


@dataclass
class ReadModelFold:
    """Every read model's rows, folded from events given in global_seq order."""

    balances: dict[str, list[Any]] = field(default_factory=dict)
    entries: dict[str, dict[int, _Entry]] = field(default_factory=lambda: defaultdict(dict))
    payments: dict[str, dict[str, Any]] = field(default_factory=dict)
    alerts: Rows = field(default_factory=dict)
    initiated: dict[str, dict[str, Any]] = field(default_factory=dict)
    approval: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    def apply(self, event: Any) -> None:
        """Fold one event: any object with the events table's columns as attributes."""
        seq, kind, payload = event.global_seq, event.event_type, event.payload
        if kind == "AccountOpened":
            self.balances[payload["account_id"]] = [
                payload["currency"],
                payload["kind"],
                payload.get("overdraft_limit_minor"),
                0,
                0,
                0,
                0,
                seq,
                seq,
            ]
        elif kind == "RiskAlertRaised":
            self.alerts[seq] = (
                event.event_id,
                payload["account_id"],
                payload["rule"],
                payload["payment_id"],
                payload["trigger_seq"],
                payload["reason"],
                event.recorded_at,
            )
        if not event.stream_id.startswith("payment-"):
            return
        payment_id = event.stream_id.removeprefix("payment-")
        if kind == "PaymentInitiated":
            self.initiated[payment_id] = payload
            self.payments[payment_id] = {
                "initiated_seq": seq,
                "payer_account_id": payload["payer_account_id"],
                "payee_account_id": payload["payee_account_id"],
                "amount_minor": payload["amount_minor"],
                "currency": payload["currency"],
                "reference": payload.get("reference"),
                "metadata": payload.get("metadata", {}),
                "state": "initiated",
                "status": "INITIATED",
                "failure_reason": None,
                "created_at": event.recorded_at,
                "updated_at": event.recorded_at,
                "last_seq": seq,
            }
            return
        self.approval[payment_id].add(kind)
        state = STATE_BY_EVENT.get(kind)
        if kind == "AuthorizationVoided":
            seen = self.approval[payment_id]
            waiting = "ApprovalRequested" in seen and "PaymentApproved" not in seen
            state = "voided_unapproved" if waiting else "voided"
        row = self.payments[payment_id]
        row.update(
            state=state,
            status=PAYMENT_STATUS_BY_STATE[str(state)],
            failure_reason=payload.get("reason")
            if state in TERMINAL_STATES and state != "settled"
            else None,
            updated_at=event.recorded_at,
            last_seq=seq,
        )
        if kind in ("FundsReserved", "FundsReleased", "PaymentSettled"):
            self._move(event, payment_id)

    def _move(self, event: Any, payment_id: str) -> None:
        hold = self.initiated[payment_id]
        sign = 1 if event.event_type == "FundsReserved" else -1
        deltas: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        deltas[hold["payer_account_id"]][0] += sign * hold["amount_minor"]
        deltas[hold["payee_account_id"]][2] += sign * hold["amount_minor"]
        if event.event_type == "PaymentSettled":
            for posting in event.payload["postings"]:
                side = 1 if posting["side"] == "debit" else 3
                deltas[posting["account_id"]][side] += posting["amount_minor"]
        for account_id, delta in deltas.items():
            balance = self.balances[account_id]
            for i in range(4):
                balance[3 + i] += delta[i]
            balance[8] = event.global_seq
            self.entries[account_id][event.global_seq] = _Entry(
                event.recorded_at, event.event_type, payment_id, delta
            )

    def rows(self, name: str) -> Rows:
        """The rows `name` should hold, as of the events folded so far."""
        if name == "balances":
            return {(k,): tuple(v) for k, v in self.balances.items()}
        if name == "payments":
            columns = ROW_COLUMNS["payments"]
            return {(k,): tuple(v[c] for c in columns) for k, v in self.payments.items()}
        if name == "risk_alerts":
            return {(k,): v for k, v in self.alerts.items()}
        if name == "statement":
            return self._statement_rows()
        raise KeyError(name)

    def _statement_rows(self) -> Rows:
        rows: Rows = {}
        for account_id, entries in self.entries.items():
            by_seq = _running(sorted(entries.items()))
            by_time = _running(sorted(entries.items(), key=lambda kv: (kv[1].recorded_at, kv[0])))
            for seq, entry in entries.items():
                rows[(account_id, seq)] = (
                    entry.recorded_at,
                    entry.event_type,
                    entry.payment_id,
                    *entry.deltas,
                    *by_seq[seq],
                    *by_time[seq],
                )
        return rows


def _running(ordered: list[tuple[int, _Entry]]) -> dict[int, tuple[int, ...]]:
    total = [0, 0, 0, 0]
    out = {}
    for seq, entry in ordered:
        total = [t + d for t, d in zip(total, entry.deltas, strict=True)]
        out[seq] = tuple(total)
    return out
