"""`paysaga demo`: a day of realistic payments against a running stack, and where to look.

1. An API key with every scope (unless one is given), created as `paysaga apikey
   create` creates it (as the schema owner).
2. Named accounts in USD, opened idempotently: customers (alice, bob, carol, ...),
   merchants (coffee-shop, book-store, grocer) and an external funding account. Each
   customer is topped up to a target balance from the funding account, so that every
   run starts from the same balances: a re-run against the same stack reuses the
   accounts, and its payments are new (their Idempotency-Keys carry the run's tag).
3. A mix of payments through the HTTP API, each steered as the product allows:
   most settle; `metadata.simulate` makes the processor simulator decline, answer
   slowly (that payment is then cancelled through the API) or fail twice before it
   succeeds (flaky); an amount above the risk rules' per-payment limit
   (PAYSAGA_RISK_PAYMENT_LIMIT_MINOR) is declined by them; a customer who pays more
   than their balance hits insufficient funds; an amount at or above
   PAYSAGA_APPROVAL_THRESHOLD_MINOR waits for an operator's approval.
4. The processor simulator's settlement report for the run's window, with injected
   lies (a wrong amount, a wrong currency, a duplicated line, a line for a payment
   that never existed), dropped into the reconciliation inbox (or uploaded through
   the API when the inbox is not on this machine); then a reconciliation run through
   the API, and a wait until the discrepancies are open.
5. The Temporal UI's addresses for what is interesting: each payment's page, the
   lists filtered by PaymentStatus, the open discrepancies and the schedules.

The demo reads its settings from the environment, as every command does: the API's
address, Temporal's, the UI's port, the approval threshold and the risk limit must be
the stack's (with `--up` they are, since the demo starts the stack itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx

from ledger.money import AMOUNT_MINOR_MAX, format_amount
from paysaga.settings import Settings
from workflows.models import TERMINAL_STATUSES

CURRENCY = "USD"
ALL_SCOPES = frozenset(
    {"payments:write", "payments:read", "accounts:write", "accounts:read", "ops"}
)
# Bounds of the demo's waits and its traffic.
HTTP_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 10.0
STATUS_POLL_S = 0.25
OUTCOME_TIMEOUT_S_DEFAULT = 90.0
DISCREPANCY_TIMEOUT_S = 60.0
SUBMIT_CONCURRENCY_MAX = 8
DISCREPANCY_PAGES_MAX = 10
DISCREPANCY_PAGE_LIMIT = 200
TEMPORAL_CONNECT_TIMEOUT_S = 10.0
TEMPORAL_DESCRIBE_TIMEOUT_S = 5.0
# The slow payment's processor takes this long to answer; the demo cancels it first.
SLOW_DELAY_S = 600
# The settlement report's window ends a moment after the last capture the demo waited for.
REPORT_END_MARGIN = timedelta(seconds=1)
# `paysaga demo --up` starts a stack with these, unless the environment sets them: an
# approval threshold of 500.00 USD and a per-payment risk limit of 5,000.00 USD, so that
# "600.00 USD alice → coffee-shop" waits for approval and a 7,500.00 USD order is
# declined by the risk rules.
UP_DEFAULTS = {
    "PAYSAGA_APPROVAL_THRESHOLD_MINOR": "50000",
    "PAYSAGA_RISK_PAYMENT_LIMIT_MINOR": "500000",
}

Size = Literal["small", "full"]
Category = Literal[
    "settled",
    "flaky",
    "processor_declined",
    "risk_declined",
    "insufficient_funds",
    "pending_approval",
    "cancelled",
]
# What each category ends as, and how it reads in the table.
EXPECTED: dict[Category, tuple[str, str]] = {
    "settled": ("SETTLED", "settles"),
    "flaky": ("SETTLED", "flaky processor, still settles"),
    "processor_declined": ("DECLINED", "declined by the processor"),
    "risk_declined": ("DECLINED", "declined by the risk rules"),
    "insufficient_funds": ("FAILED", "insufficient funds"),
    "pending_approval": ("PENDING_APPROVAL", "waits for approval"),
    "cancelled": ("CANCELLED", "slow, then cancelled"),
}
# The customers and the balance (minor units) each starts every run with.
CUSTOMERS: dict[str, int] = {
    "alice": 2_000_00,
    "bob": 1_500_00,
    "carol": 800_00,
    "erin": 300_00,
    "dave": 20_00,
    "frank": 10_00,
}
MERCHANTS = ("coffee-shop", "book-store", "grocer")
FUNDING_ACCOUNT = "funding"
# An ordinary payment is at most this: the approval threshold must be above it.
ORDINARY_AMOUNT_MINOR_MAX = 150_00
APPROVAL_AMOUNTS_MINOR = (600_00, 750_00)


class DemoError(Exception):
    """Something the user can fix (the stack is down, a setting does not suit the demo);
    the message says what."""


@dataclass(frozen=True)
class Planned:
    """One payment the demo submits."""

    name: str
    category: Category
    payer: str
    payee: str
    amount_minor: int
    reference: str
    simulate: str | None = None


@dataclass
class PaymentResult:
    """A submitted payment, what it should end as and what it did."""

    name: str
    category: Category
    summary: str
    payer_account_id: str
    payee_account_id: str
    amount_minor: int
    currency: str
    reference: str
    expected_status: str
    expected: str
    payment_id: str
    workflow_id: str
    status: str | None = None
    failure_reason: str | None = None
    run_id: str | None = None
    ui_url: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == self.expected_status


@dataclass
class DiscrepancyResult:
    """A discrepancy the demo's statement should cause, and whether it was found open."""

    type: str
    subject: str
    injected: str
    id: str | None = None
    summary: str | None = None
    status: str | None = None
    workflow_id: str | None = None
    ui_url: str | None = None

    @property
    def found(self) -> bool:
        return self.id is not None


@dataclass
class DemoResult:
    """Everything the demo did, for the table, for `--json`, and for tests."""

    run_tag: str
    api_url: str
    ui_url: str | None
    namespace: str
    accounts: dict[str, str]
    fundings: list[dict[str, Any]]
    payments: list[PaymentResult]
    statement: dict[str, Any] = field(default_factory=dict)
    reconciliation_run_id: str | None = None
    reconciliation_workflow_id: str | None = None
    discrepancies: list[DiscrepancyResult] = field(default_factory=list)
    links: dict[str, str] = field(default_factory=dict)
    # What went wrong on the way without changing an outcome (a read the API failed).
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.payments) and all(d.found for d in self.discrepancies)

    def by_category(self, category: Category) -> list[PaymentResult]:
        return [p for p in self.payments if p.category == category]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        for payment, raw in zip(self.payments, data["payments"], strict=True):
            raw["ok"] = payment.ok
        for found, raw in zip(self.discrepancies, data["discrepancies"], strict=True):
            raw["found"] = found.found
        return data


@dataclass(frozen=True)
class DemoOptions:
    size: Size = "full"
    api_key: str | None = None
    # Put before every account id: for a stack whose `alice` is someone else's.
    prefix: str = ""
    # The Temporal UI's address; default: the dev server's (PAYSAGA_TEMPORAL_UI_PORT).
    ui_url: str | None = None
    outcome_timeout_s: float = OUTCOME_TIMEOUT_S_DEFAULT
    reconcile: bool = True


# --- the plan --------------------------------------------------------------------------------
def plan_payments(size: Size, settings: Settings) -> list[Planned]:
    """The payments of a run, in the order they are submitted.

    Amounts follow the stack's approval threshold and risk limit; a configuration in
    which the categories cannot be told apart is refused with the setting to change.
    """
    threshold = settings.approval_threshold_minor
    limit = settings.risk_payment_limit_minor
    if threshold <= ORDINARY_AMOUNT_MINOR_MAX:
        raise DemoError(
            f"the approval threshold ({format_amount(threshold, CURRENCY)}, "
            "PAYSAGA_APPROVAL_THRESHOLD_MINOR) is at or below the demo's ordinary payments "
            f"(up to {format_amount(ORDINARY_AMOUNT_MINOR_MAX, CURRENCY)}): every payment "
            "would wait for approval. Run the stack with a higher threshold, or use "
            "`paysaga demo --up`"
        )
    if limit <= ORDINARY_AMOUNT_MINOR_MAX or limit < threshold:
        raise DemoError(
            f"the risk rules' per-payment limit ({format_amount(limit, CURRENCY)}, "
            "PAYSAGA_RISK_PAYMENT_LIMIT_MINOR) is below the demo's ordinary payments or the "
            "approval threshold: the categories would be declined by risk instead"
        )
    # Approvals read like "600.00 USD alice → coffee-shop" when the threshold allows it.
    approvals = [max(amount, threshold) for amount in APPROVAL_AMOUNTS_MINOR]
    # Half as much again as the limit: "7500.00 USD" for a limit of 5,000.00.
    risk_amount = min(limit + limit // 2, AMOUNT_MINOR_MAX)
    if risk_amount <= limit:
        raise DemoError(
            "the risk rules' per-payment limit is the largest amount there is: no payment "
            "can exceed it (PAYSAGA_RISK_PAYMENT_LIMIT_MINOR)"
        )
    small = [
        Planned("flat-white", "settled", "alice", "coffee-shop", 4_50, "flat white"),
        Planned("paperback", "flaky", "carol", "book-store", 15_50, "paperback", "flaky"),
        Planned("rare-edition", "processor_declined", "bob", "book-store", 120_00,
                "rare edition", "decline"),
        Planned("bulk-order", "risk_declined", "alice", "book-store", risk_amount, "bulk order"),
        Planned("groceries", "insufficient_funds", "dave", "grocer", 85_00, "weekly groceries"),
        Planned("catering", "pending_approval", "alice", "coffee-shop", approvals[0], "catering"),
        Planned("cake-order", "cancelled", "carol", "coffee-shop", 9_99, "birthday cake",
                "slow"),
    ]  # fmt: skip
    if size == "small":
        return small
    more = [
        Planned("espresso", "settled", "erin", "coffee-shop", 3_80, "espresso"),
        Planned("atlas", "settled", "alice", "book-store", 42_00, "atlas"),
        Planned("vegetables", "settled", "carol", "grocer", 57_12, "vegetables"),
        Planned("cappuccino", "settled", "bob", "coffee-shop", 6_20, "cappuccino and croissant"),
        Planned("dinner-share", "settled", "carol", "alice", 25_00, "dinner, my share"),
        Planned("fruit", "settled", "erin", "grocer", 18_75, "fruit"),
        Planned("party", "settled", "bob", "grocer", 89_90, "party supplies"),
        Planned("cinema", "settled", "alice", "carol", 12_00, "cinema tickets"),
        Planned("novel", "settled", "erin", "book-store", 23_99, "novel"),
        Planned("tea", "flaky", "erin", "coffee-shop", 4_20, "green tea", "flaky"),
        Planned("olive-oil", "flaky", "alice", "grocer", 31_40, "olive oil", "flaky"),
        Planned("wine", "processor_declined", "erin", "grocer", 44_10, "wine", "decline"),
        Planned("headphones", "insufficient_funds", "frank", "book-store", 64_99,
                "audiobook headphones"),
        Planned("library", "pending_approval", "bob", "book-store", approvals[1],
                "library restock"),
    ]  # fmt: skip
    return small + more


def summary_of(payer: str, payee: str, amount_minor: int, currency: str) -> str:
    """How the payment reads in the Temporal UI (the workflow's static summary)."""
    return f"{format_amount(amount_minor, currency)} {payer} → {payee}"


# --- Temporal UI addresses -------------------------------------------------------------------
def ui_list_url(ui_url: str, namespace: str, query: str) -> str:
    """The workflow list filtered by a visibility query."""
    return (
        f"{ui_url}/namespaces/{quote(namespace, safe='')}/workflows?query={quote(query, safe='')}"
    )


def ui_workflow_url(ui_url: str, namespace: str, workflow_id: str, run_id: str) -> str:
    """A workflow run's page, on its event history."""
    return (
        f"{ui_url}/namespaces/{quote(namespace, safe='')}/workflows/"
        f"{quote(workflow_id, safe='')}/{quote(run_id, safe='')}/history"
    )


def ui_schedules_url(ui_url: str, namespace: str) -> str:
    return f"{ui_url}/namespaces/{quote(namespace, safe='')}/schedules"


PENDING_APPROVAL_QUERY = 'PaymentStatus="PENDING_APPROVAL"'
CANCELLED_QUERY = 'PaymentStatus="CANCELLED"'
OPEN_DISCREPANCIES_QUERY = 'WorkflowType="DiscrepancyWorkflow" AND ExecutionStatus="Running"'


# --- the HTTP API ----------------------------------------------------------------------------
@dataclass
class Answer:
    status_code: int
    body: Any

    @property
    def ok(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def code(self) -> str | None:
        return self.body.get("code") if isinstance(self.body, dict) else None

    def problem(self) -> str:
        if isinstance(self.body, dict):
            detail = self.body.get("detail") or self.body.get("title") or self.body
            return f"{self.status_code} {self.body.get('code') or ''}: {detail}"
        return f"{self.status_code}: {self.body!r}"


class DemoApi:
    """The HTTP API, as the demo's client: one key, and clear errors."""

    def __init__(self, http: httpx.AsyncClient, api_key: str) -> None:
        self.http = http
        self.headers = {"Authorization": f"Bearer {api_key}"}
        # Reads the API answered with a server error: the demo carries on, and says so.
        self.failed_reads: list[str] = []

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        idempotency_key: str | None = None,
        params: dict[str, Any] | None = None,
        files: dict[str, Any] | None = None,
    ) -> Answer:
        headers = dict(self.headers)
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        try:
            response = await self.http.request(
                method, path, json=body, headers=headers, params=params, files=files
            )
        except httpx.TransportError as error:
            raise DemoError(
                f"the API at {self.http.base_url} stopped answering ({method} {path}: "
                f"{error.__class__.__name__})"
            ) from None
        try:
            parsed = response.json()
        except ValueError:
            parsed = response.text
        answer = Answer(response.status_code, parsed)
        if answer.status_code == 401:
            raise DemoError(
                "the API refused the demo's key (401). A key created by the demo is hashed "
                "with PAYSAGA_API_KEY_SECRET: it must be the stack's. Or pass --api-key"
            )
        if answer.status_code == 403:
            raise DemoError(f"the demo's key lacks a scope: {answer.problem()}")
        return answer

    async def payment(self, payment_id: str) -> dict[str, Any] | None:
        """The payment as the API reads it; None when the API failed to read it (a 5xx:
        the demo reads again, and reports the failure)."""
        answer = await self.request("GET", f"/v1/payments/{payment_id}")
        if answer.status_code >= 500:
            self.failed_reads.append(f"GET /v1/payments/{payment_id}: {answer.problem()}")
            return None
        if not answer.ok:
            raise DemoError(f"could not read payment {payment_id}: {answer.problem()}")
        body: dict[str, Any] = answer.body
        return body


async def check_api(http: httpx.AsyncClient) -> None:
    """The API answers and is ready, or a DemoError says how to get a stack."""
    try:
        response = await http.get("/readyz", timeout=READY_TIMEOUT_S)
    except httpx.TransportError:
        raise DemoError(
            f"cannot reach the API at {http.base_url}. Is `paysaga up` running (with the "
            "same PAYSAGA_API_PORT)? Or run `paysaga demo --up` to start a stack"
        ) from None
    if response.status_code != 200:
        raise DemoError(f"the API at {http.base_url} is not ready: {response.text}")


async def create_demo_key(settings: Settings, name: str) -> str:
    """A key with every scope, stored as `paysaga apikey create` stores it (schema owner)."""
    from sqlalchemy.exc import OperationalError

    from api.keys import create_api_key
    from paysaga.db import DatabaseConfigError, create_owner_engine, owner_url

    try:
        engine = create_owner_engine(owner_url(settings))
    except DatabaseConfigError as error:
        raise DemoError(f"{error}; or pass --api-key") from None
    try:
        _, key = await create_api_key(
            engine, settings.api_key_secret.get_secret_value(), name=name, scopes=ALL_SCOPES
        )
    except OperationalError as error:
        raise DemoError(
            f"cannot reach the database to create the demo's API key ({error.orig}); is "
            "`paysaga up` running with the same PAYSAGA_DATA_DIR (or DATABASE_URL)? Or pass "
            "--api-key"
        ) from None
    finally:
        await engine.dispose()
    return key


# --- the run ---------------------------------------------------------------------------------
class Demo:
    """One run of the demo against one stack."""

    def __init__(
        self,
        settings: Settings,
        options: DemoOptions,
        api: DemoApi,
        tag: str,
        say: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.options = options
        self.api = api
        self.tag = tag
        self.say = say

    def account(self, name: str) -> str:
        return f"{self.options.prefix}{name}"

    async def open_accounts(self) -> dict[str, str]:
        """Open every account the demo uses, or find it as an earlier run left it."""
        wanted = [(FUNDING_ACCOUNT, "external")]
        wanted += [(name, "customer") for name in CUSTOMERS]
        wanted += [(name, "merchant") for name in MERCHANTS]
        opened: dict[str, str] = {}
        for name, kind in wanted:
            opened[name] = await self._open(self.account(name), kind)
        return opened

    async def _open(self, account_id: str, kind: str) -> str:
        body = {
            "id": account_id,
            "currency": CURRENCY,
            "kind": kind,
            "overdraft_limit_minor": None if kind == "external" else 0,
            "metadata": {"demo": True},
        }
        answer = await self.api.request(
            "POST", "/v1/accounts", body=body, idempotency_key=f"{self.tag}-open-{account_id}"
        )
        if answer.ok:
            return "opened"
        if answer.code != "account_exists":
            raise DemoError(f"could not open account {account_id}: {answer.problem()}")
        existing = await self.api.request("GET", f"/v1/accounts/{account_id}")
        if not existing.ok:
            raise DemoError(f"could not read account {account_id}: {existing.problem()}")
        held = (existing.body.get("currency"), existing.body.get("kind"))
        if held != (CURRENCY, kind):
            raise DemoError(
                f"an account {account_id!r} exists already as a {held[1]} account in "
                f"{held[0]}, not a {kind} account in {CURRENCY}; pass --prefix to use "
                "accounts of the demo's own"
            )
        return "reused"

    async def top_up(self) -> list[dict[str, Any]]:
        """Fund each customer from the funding account up to their target balance, and
        wait until each funding settled (approving those at or above the threshold)."""
        fundings = []
        for name, target_minor in CUSTOMERS.items():
            account_id = self.account(name)
            answer = await self.api.request("GET", f"/v1/accounts/{account_id}")
            if not answer.ok:
                raise DemoError(f"could not read account {account_id}: {answer.problem()}")
            available = int(answer.body["position"]["available"])
            if available < target_minor:
                fundings.append((account_id, target_minor - available))
        results = await asyncio.gather(*(self._fund(a, m) for a, m in fundings))
        return list(results)

    async def _fund(self, account_id: str, amount_minor: int) -> dict[str, Any]:
        payment_id = await self._submit(
            self.account(FUNDING_ACCOUNT),
            account_id,
            amount_minor,
            f"top-up of {account_id}",
            None,
            f"{self.tag}-fund-{account_id}",
        )
        deadline = time.monotonic() + self.options.outcome_timeout_s
        approved = False
        state: dict[str, Any] | None = None
        status = "unknown"
        while True:
            state = await self.api.payment(payment_id) or state
            status = state["status"] if state else "unknown"
            if status == "PENDING_APPROVAL" and not approved:
                answer = await self.api.request(
                    "POST",
                    f"/v1/payments/{payment_id}/approve",
                    body={"note": "demo: funding approved by the operator"},
                )
                if not answer.ok:
                    raise DemoError(f"could not approve funding {payment_id}: {answer.problem()}")
                approved = True
            elif status in TERMINAL_STATUSES:
                break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(STATUS_POLL_S)
        if status != "SETTLED":
            raise DemoError(
                f"funding {account_id} with {format_amount(amount_minor, CURRENCY)} ended "
                f"{status} ({(state or {}).get('failure_reason')}), not SETTLED: is a worker "
                "running?"
            )
        return {
            "payment_id": payment_id,
            "account_id": account_id,
            "amount_minor": amount_minor,
            "approved": approved,
            "status": status,
        }

    async def _submit(
        self,
        payer: str,
        payee: str,
        amount_minor: int,
        reference: str,
        simulate: str | None,
        idempotency_key: str,
    ) -> str:
        metadata: dict[str, Any] = {"demo_run": self.tag}
        if simulate is not None:
            metadata["simulate"] = simulate
        if simulate == "slow":
            metadata["simulate_delay_s"] = SLOW_DELAY_S
        answer = await self.api.request(
            "POST",
            "/v1/payments",
            body={
                "payer_account_id": payer,
                "payee_account_id": payee,
                "amount_minor": amount_minor,
                "currency": CURRENCY,
                "reference": reference,
                "metadata": metadata,
            },
            idempotency_key=idempotency_key,
        )
        if not answer.ok:
            raise DemoError(
                f"the API refused the payment {format_amount(amount_minor, CURRENCY)} "
                f"{payer} → {payee}: {answer.problem()}"
            )
        return str(answer.body["id"])

    async def submit(self, plan: Sequence[Planned]) -> list[PaymentResult]:
        """Submit every planned payment, a few at a time."""
        gate = asyncio.Semaphore(SUBMIT_CONCURRENCY_MAX)

        async def one(planned: Planned) -> PaymentResult:
            payer, payee = self.account(planned.payer), self.account(planned.payee)
            async with gate:
                payment_id = await self._submit(
                    payer,
                    payee,
                    planned.amount_minor,
                    planned.reference,
                    planned.simulate,
                    f"{self.tag}-{planned.name}",
                )
            expected_status, expected = EXPECTED[planned.category]
            return PaymentResult(
                name=planned.name,
                category=planned.category,
                summary=summary_of(payer, payee, planned.amount_minor, CURRENCY),
                payer_account_id=payer,
                payee_account_id=payee,
                amount_minor=planned.amount_minor,
                currency=CURRENCY,
                reference=planned.reference,
                expected_status=expected_status,
                expected=expected,
                payment_id=payment_id,
                workflow_id=f"payment-{payment_id}",
            )

        return list(await asyncio.gather(*(one(p) for p in plan)))

    async def cancel_when_slow(self, payment: PaymentResult) -> None:
        """Cancel the slow payment through the API once it waits for the processor."""
        deadline = time.monotonic() + self.options.outcome_timeout_s
        while time.monotonic() < deadline:
            state = await self.api.payment(payment.payment_id)
            if state is not None:
                if "processor" in (state.get("waiting_for") or "").lower():
                    break
                if state["status"] in TERMINAL_STATUSES:
                    return
            await asyncio.sleep(STATUS_POLL_S)
        answer = await self.api.request(
            "POST",
            f"/v1/payments/{payment.payment_id}/cancel",
            body={"reason": "the customer cancelled the order (demo)"},
        )
        if answer.status_code != 202:
            self.say(f"cancelling {payment.summary} answered {answer.problem()}")

    async def wait_outcomes(self, payments: Sequence[PaymentResult]) -> None:
        """Read each payment until it ends, or waits for approval, or time is up."""

        async def one(payment: PaymentResult) -> None:
            deadline = time.monotonic() + self.options.outcome_timeout_s
            while True:
                state = await self.api.payment(payment.payment_id)
                if state is not None:
                    payment.status = state["status"]
                    payment.failure_reason = state.get("failure_reason")
                    if payment.status in TERMINAL_STATUSES or payment.status == "PENDING_APPROVAL":
                        return
                if time.monotonic() > deadline:
                    return
                await asyncio.sleep(STATUS_POLL_S)

        await asyncio.gather(*(one(p) for p in payments))

    # --- reconciliation ----------------------------------------------------------------------
    async def reconcile(self, result: DemoResult, window_start: datetime) -> None:
        """The processor's report for the run with injected lies, into the inbox; then a
        run, and a wait until each lie is an open discrepancy."""
        end = datetime.now(UTC) + REPORT_END_MARGIN
        report, injected = await self._settlement_report(window_start, end)
        filename = f"processor-settlement-{self.tag}.csv"
        inbox = self.settings.recon_inbox_path
        if inbox.is_dir():
            # Written under a dot name, then renamed: the inbox watch skips dot files, so
            # it never reads half a file.
            partial = inbox / f".{filename}.part"
            partial.write_bytes(report.content)
            partial.rename(inbox / filename)
            where = str(inbox / filename)
        else:
            answer = await self.api.request(
                "POST", "/v1/statements", files={"file": (filename, report.content, "text/csv")}
            )
            if not answer.ok:
                raise DemoError(f"could not upload the statement: {answer.problem()}")
            where = "uploaded through POST /v1/statements"
        result.statement = {
            "file": filename,
            "where": where,
            "lines": len(report.lines),
            "window": [window_start.isoformat(), end.isoformat()],
            "injected": [
                {"kind": i.kind, "payment_id": i.payment_id, "detail": i.detail}
                for i in report.injected
            ],
        }
        self.say(f"statement {filename}: {len(report.lines)} line(s), into {where}")
        started = await self.api.request("POST", "/v1/reconciliations", body={"full": False})
        if not started.ok:
            raise DemoError(f"could not start a reconciliation: {started.problem()}")
        result.reconciliation_run_id = started.body["id"]
        result.reconciliation_workflow_id = started.body["workflow_id"]
        result.discrepancies = injected
        await self._wait_discrepancies(injected)
        await self._wait_run(started.body["id"])

    async def _settlement_report(self, start: datetime, end: datetime) -> Any:
        """The simulator's report of the window, with as many kinds of lies as it has
        captures for (read as the schema owner, as `paysaga processor report` does)."""
        from sqlalchemy.exc import OperationalError

        from activities.settlement_report import build_settlement_report
        from paysaga.db import DatabaseConfigError, create_owner_engine, owner_url

        try:
            engine = create_owner_engine(owner_url(self.settings))
        except DatabaseConfigError as error:
            raise DemoError(f"the statement needs the database: {error}") from None
        try:
            honest = await build_settlement_report(engine, start, end)
            kinds = ["wrong_amount", "duplicate", "wrong_currency"][: len(honest.settled)]
            inject = dict.fromkeys([*kinds, "extra"], 1)
            report = await build_settlement_report(engine, start, end, inject=inject)
        except OperationalError as error:
            raise DemoError(
                f"cannot reach the database for the processor's report ({error.orig})"
            ) from None
        finally:
            await engine.dispose()
        types = {
            "wrong_amount": "amount_mismatch",
            "duplicate": "duplicate_in_statement",
            "wrong_currency": "currency_mismatch",
            "extra": "missing_in_ledger",
        }
        injected = [
            DiscrepancyResult(type=types[i.kind], subject=i.payment_id, injected=i.detail)
            for i in report.injected
        ]
        return report, injected

    async def _wait_discrepancies(self, wanted: Sequence[DiscrepancyResult]) -> None:
        """Until every wanted discrepancy is recorded (or time is up)."""
        deadline = time.monotonic() + DISCREPANCY_TIMEOUT_S
        while True:
            missing = {(d.type, d.subject): d for d in wanted if not d.found}
            if not missing:
                return
            cursor: str | None = None
            for _ in range(DISCREPANCY_PAGES_MAX):
                params: dict[str, Any] = {"limit": DISCREPANCY_PAGE_LIMIT}
                if cursor is not None:
                    params["cursor"] = cursor
                page = await self.api.request("GET", "/v1/discrepancies", params=params)
                if not page.ok:
                    raise DemoError(f"could not list discrepancies: {page.problem()}")
                for row in page.body["discrepancies"]:
                    subject = row.get("payment_id") or row.get("reference")
                    found = missing.pop((row["type"], subject), None)
                    if found is not None:
                        found.id = row["id"]
                        found.summary = row["summary"]
                        found.status = row["status"]
                        found.workflow_id = row["workflow_id"]
                cursor = page.body.get("next_cursor")
                if not missing or cursor is None:
                    break
            if not missing or time.monotonic() > deadline:
                return
            await asyncio.sleep(STATUS_POLL_S * 4)

    async def _wait_run(self, run_id: str) -> None:
        deadline = time.monotonic() + DISCREPANCY_TIMEOUT_S
        while time.monotonic() < deadline:
            answer = await self.api.request("GET", f"/v1/reconciliations/{run_id}")
            if answer.ok and answer.body.get("status") != "running":
                return
            await asyncio.sleep(STATUS_POLL_S * 2)


async def run_demo(
    settings: Settings, options: DemoOptions, say: Callable[[str], None] = lambda _: None
) -> DemoResult:
    """Run the demo against the stack `settings` describe; raises DemoError for what the
    user can fix. The result says what ended as expected."""
    plan = plan_payments(options.size, settings)
    tag = f"demo-{datetime.now(UTC):%Y%m%d%H%M%S}-{secrets.token_hex(2)}"
    ui_url = (options.ui_url or settings.temporal_ui_url or "").rstrip("/") or None
    async with httpx.AsyncClient(base_url=settings.api_url, timeout=HTTP_TIMEOUT_S) as http:
        await check_api(http)
        api_key = options.api_key or await create_demo_key(settings, f"demo {tag}")
        demo = Demo(settings, options, DemoApi(http, api_key), tag, say)
        say(f"demo run {tag} against {settings.api_url}")
        accounts = await demo.open_accounts()
        window_start = datetime.now(UTC)
        fundings = await demo.top_up()
        say(f"accounts ready; {len(fundings)} top-up(s) settled")
        payments = await demo.submit(plan)
        say(f"submitted {len(payments)} payments")
        slow = [p for p in payments if p.category == "cancelled"]
        await asyncio.gather(*(demo.cancel_when_slow(p) for p in slow))
        await demo.wait_outcomes(payments)
        result = DemoResult(
            run_tag=tag,
            api_url=settings.api_url,
            ui_url=ui_url,
            namespace=settings.temporal_namespace,
            accounts={demo.account(name): how for name, how in accounts.items()},
            fundings=fundings,
            payments=payments,
        )
        if options.reconcile:
            await demo.reconcile(result, window_start)
        result.warnings = demo.api.failed_reads
        for warning in result.warnings:
            say(f"warning: the API failed a read, which the demo repeated: {warning}")
    await _add_ui_links(settings, result)
    return result


async def _add_ui_links(settings: Settings, result: DemoResult) -> None:
    """Each payment's and discrepancy's page in the Temporal UI, and the lists."""
    ui, namespace = result.ui_url, result.namespace
    if ui is None:
        return
    result.links = {
        "payments waiting for approval": ui_list_url(ui, namespace, PENDING_APPROVAL_QUERY),
        "cancelled payments": ui_list_url(ui, namespace, CANCELLED_QUERY),
        "open discrepancies": ui_list_url(ui, namespace, OPEN_DISCREPANCIES_QUERY),
        "schedules": ui_schedules_url(ui, namespace),
    }
    from paysaga.temporal import connect

    try:
        client = await connect(settings, timeout_s=TEMPORAL_CONNECT_TIMEOUT_S)
    except RuntimeError as error:
        raise DemoError(
            f"cannot reach Temporal at {settings.temporal_target} for the UI's links ({error})"
        ) from None

    async def run_id(workflow_id: str) -> str | None:
        with contextlib.suppress(Exception):  # a link less, never a failed demo
            described = await client.get_workflow_handle(workflow_id).describe(
                rpc_timeout=timedelta(seconds=TEMPORAL_DESCRIBE_TIMEOUT_S)
            )
            return described.run_id
        return None

    async def link_payment(payment: PaymentResult) -> None:
        payment.run_id = await run_id(payment.workflow_id)
        if payment.run_id is not None:
            payment.ui_url = ui_workflow_url(ui, namespace, payment.workflow_id, payment.run_id)

    async def link_discrepancy(found: DiscrepancyResult) -> None:
        if found.workflow_id is None:
            return
        run = await run_id(found.workflow_id)
        if run is not None:
            found.ui_url = ui_workflow_url(ui, namespace, found.workflow_id, run)

    await asyncio.gather(
        *(link_payment(p) for p in result.payments),
        *(link_discrepancy(d) for d in result.discrepancies),
    )
    if result.reconciliation_workflow_id is not None:
        run = await run_id(result.reconciliation_workflow_id)
        if run is not None:
            result.links["the reconciliation run"] = ui_workflow_url(
                ui, namespace, result.reconciliation_workflow_id, run
            )


# --- output ----------------------------------------------------------------------------------
def render(result: DemoResult) -> list[Any]:
    """The outcome table and the Temporal UI's addresses, as rich renderables."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"paysaga demo {result.run_tag}", header_style="bold")
    # Whole, in a narrow terminal too: the id is what to look for in the API and the UI.
    table.add_column(
        "payment",
        no_wrap=True,
        min_width=max(len(p.payment_id) for p in result.payments) if result.payments else None,
    )
    table.add_column("summary")
    table.add_column("expected")
    table.add_column("actual")
    table.add_column("", justify="center")
    for payment in result.payments:
        actual = payment.status or "?"
        if payment.failure_reason and payment.status != "SETTLED":
            actual += f": {_short(payment.failure_reason)}"
        table.add_row(
            payment.payment_id,
            payment.summary,
            f"{payment.expected_status} ({payment.expected})",
            actual,
            Text("ok", style="green") if payment.ok else Text("NO", style="bold red"),
        )
    out: list[Any] = [table]
    if result.discrepancies:
        found = Table(title="reconciliation: the statement's injected lies", header_style="bold")
        found.add_column("discrepancy")
        found.add_column("payment or reference")
        found.add_column("status")
        for item in result.discrepancies:
            found.add_row(item.type, item.subject, item.status or "not found")
        out.append(found)
    if result.ui_url is None:
        out.append(
            Text(
                "Temporal UI links: pass --ui-url (Temporal is external, so its UI's address "
                "is not known)"
            )
        )
        return out
    # One line each (printed with soft wrap): a URL cut in two no longer opens.
    lines = list(result.links.items())
    for category in EXPECTED:
        first = next((p for p in result.by_category(category) if p.ui_url), None)
        if first is not None and first.ui_url is not None:
            lines.append((f"{first.summary} ({EXPECTED[category][1]})", first.ui_url))
    first_case = next((d for d in result.discrepancies if d.ui_url), None)
    if first_case is not None and first_case.ui_url is not None:
        lines.append((f"a discrepancy ({first_case.type})", first_case.ui_url))
    out.append(Text("In the Temporal UI:", style="bold"))
    for name, url in lines:
        out.append(Text(f"  {name}", style="bold"))
        out.append(Text(f"    {url}"))
    return out


def _short(reason: str, chars_max: int = 60) -> str:
    return reason if len(reason) <= chars_max else reason[: chars_max - 1] + "…"


# --- `--up` ----------------------------------------------------------------------------------
def up_log_path(settings: Settings) -> Path:
    return settings.data_path / "logs" / "demo-up.log"


UP_READY_TIMEOUT_S = 120.0
UP_STOP_TIMEOUT_S = 60.0


@contextlib.contextmanager
def started_stack(settings: Settings, say: Callable[[str], None]) -> Iterator[StackProcess]:
    """`paysaga up` as a child process, its output in <data dir>/logs/demo-up.log, until
    the block ends (then it is stopped, as Ctrl-C stops it). The environment must already
    hold the settings it should run with."""
    from paysaga.db import DatabaseConfigError, ensure_private_dir

    log_path = up_log_path(settings)
    try:
        ensure_private_dir(settings.data_path)
        ensure_private_dir(log_path.parent)
    except DatabaseConfigError as error:
        raise DemoError(str(error)) from None
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "paysaga", "up"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    stack = StackProcess(process, log_path)
    say(f"starting the stack (`paysaga up`, its output in {log_path}) ...")
    try:
        stack.wait_ready(settings)
        yield stack
    finally:
        stack.stop()


@dataclass
class StackProcess:
    process: subprocess.Popen[bytes]
    log_path: Path

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def wait_ready(self, settings: Settings) -> None:
        deadline = time.monotonic() + UP_READY_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise DemoError(
                    f"`paysaga up` exited ({self.process.returncode}) before it was ready; "
                    f"the end of {self.log_path}:\n{self.tail()}"
                )
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{settings.api_url}/readyz", timeout=2).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the stack was not ready within {UP_READY_TIMEOUT_S:.0f} s; the end of "
                    f"{self.log_path}:\n{self.tail()}"
                )
            time.sleep(STATUS_POLL_S)

    def wait(self) -> int:
        """Until the stack exits (Ctrl-C reaches it too: it is in our process group)."""
        while True:
            try:
                return self.process.wait()
            except KeyboardInterrupt:
                continue

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(UP_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
