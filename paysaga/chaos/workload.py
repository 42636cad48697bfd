"""The bank workload of a chaos run: accounts, clients that pay, operators, readers.

Everything goes through the HTTP API, as a client system and an operator would:

- **Accounts.** K customers funded from an external account, a merchant, and the fees
  account (the stack's `PAYSAGA_FEES_ACCOUNT_ID` if it charges fees, else one of the
  run's own).
- **Clients.** Concurrent clients submit payments: random amounts, some beyond the
  payer's balance; every `metadata.simulate` behaviour; some at or above the approval
  threshold, which an operator task approves or rejects at random; some cancelled at a
  random moment after they were acknowledged. A customer running low is topped up from
  the external account, so a long run keeps moving money.
- **Retries.** Every request is retried on a timeout, a lost connection, a 5xx, a 429
  or a 409 `idempotency_key_in_flight`, with the same Idempotency-Key and a bounded
  backoff; some submissions are sent twice on purpose, at once or after the answer.
- **Readers.** Concurrent readers fetch positions, statement pages and historical
  balances, and record what they saw.

Every request, action and observation is recorded in the run's history
(paysaga/chaos/history.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import httpx

from paysaga.chaos.history import HistoryWriter, RunAccounts, rfc3339
from workflows.models import TERMINAL_STATUSES

log = logging.getLogger("paysaga.chaos")

# --- requests ---------------------------------------------------------------------------------
REQUEST_TIMEOUT_S = 10.0
REQUEST_DEADLINE_S = 90.0
REQUEST_ATTEMPTS_MAX = 40
BACKOFF_S_MIN = 0.1
BACKOFF_S_MAX = 2.0
CONNECTIONS_MAX = 64
RETRYABLE_CONFLICTS = frozenset({"idempotency_key_in_flight"})
DETAIL_CHARS_MAX = 300

# --- the workload's shape -------------------------------------------------------------------
# (behaviour, weight): None is a payment that steers nothing.
SIMULATE_WEIGHTS: tuple[tuple[str | None, int], ...] = (
    (None, 50),
    ("decline", 10),
    ("timeout", 6),
    ("flaky", 14),
    ("slow", 20),
)
SLOW_DELAY_S_CHOICES = (1, 2, 3)
AMOUNT_SHARE_LARGE = 0.12  # at or above the approval threshold
AMOUNT_SHARE_BEYOND = 0.15  # beyond what the payer has
PAYEE_SHARE_MERCHANT = 0.7
APPROVE_SHARE = 0.6
CANCEL_SHARE = 0.12
CANCEL_AFTER_S_MAX = 3.0
DUPLICATE_SHARE = 0.1  # half sent at the same moment, half after the answer
APPROVAL_DELAY_S_MAX = 2.0
APPROVAL_POLL_S = 0.5
APPROVAL_POLL_S_MAX = 3.0
REDECIDE_REFUSED_S = 2.0
# A payment still asking for approval this long after the answer was taken is asked
# again (its workflow was reset); a busy worker may take seconds to act on an answer.
REDECIDE_AFTER_S = 15.0
TOP_UP_EVERY_OPS = 8
FUNDING_THRESHOLD_MULTIPLE = 5
FUNDING_MINOR_MIN = 5_000_000
READ_ENTRIES_LIMIT = 200
READ_WEIGHTS = (("balance", 4), ("entries", 3), ("balance_as_of", 3))
FUNDING_WAIT_S = 60.0
STATUS_POLL_S = 1.0
STATUS_READERS_MAX = 8


# --- HTTP with retries ----------------------------------------------------------------------
@dataclass
class HttpStats:
    """What the run's HTTP traffic did, for the summary."""

    requests: int = 0
    attempts: int = 0
    gave_up: int = 0
    status_codes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def retries(self) -> int:
        return self.attempts - self.requests


@dataclass
class Answer:
    """The final answer to one request, after its retries."""

    status_code: int | None
    body: Any
    attempts: int
    error: str | None

    @property
    def code(self) -> str | None:
        if isinstance(self.body, dict):
            code = self.body.get("code")
            return code if isinstance(code, str) else None
        return None

    @property
    def detail(self) -> str | None:
        """A refusal's explanation (the problem's `detail`), cut short."""
        if isinstance(self.body, dict) and not self.ok:
            detail = self.body.get("detail")
            return str(detail)[:DETAIL_CHARS_MAX] if detail is not None else None
        return None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def _retryable(status_code: int, body: Any) -> bool:
    if status_code >= 500 or status_code == 429:
        return True
    return status_code == 409 and isinstance(body, dict) and body.get("code") in RETRYABLE_CONFLICTS


class ApiClient:
    """The API over httpx, retrying as a careful client does: the same request (and
    Idempotency-Key) again, after a bounded, jittered backoff, until a deadline."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        stats: HttpStats | None = None,
        timeout_s: float = REQUEST_TIMEOUT_S,
        deadline_s: float = REQUEST_DEADLINE_S,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=CONNECTIONS_MAX),
        )
        self.stats = stats or HttpStats()
        self.deadline_s = deadline_s
        self._jitter = random.Random()

    async def close(self) -> None:
        await self.http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        retry: bool = True,
        deadline_s: float | None = None,
    ) -> Answer:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        deadline = time.monotonic() + (deadline_s or self.deadline_s)
        backoff_s = BACKOFF_S_MIN
        attempts = 0
        status_code: int | None = None
        payload: Any = None
        self.stats.requests += 1
        while True:
            attempts += 1
            self.stats.attempts += 1
            error: str | None
            try:
                response = await self.http.request(
                    method, path, json=body, params=params, headers=headers
                )
            except httpx.TimeoutException as exc:
                error = f"timeout ({type(exc).__name__})"
            except httpx.TransportError as exc:
                error = f"transport ({type(exc).__name__}: {exc})"[:200]
            else:
                status_code = response.status_code
                self.stats.status_codes[str(status_code)] += 1
                try:
                    payload = response.json()
                except ValueError:
                    payload = None
                if not _retryable(status_code, payload):
                    return Answer(status_code, payload, attempts, None)
                error = f"HTTP {status_code}" + (
                    f" {payload.get('code')}" if isinstance(payload, dict) else ""
                )
            self.stats.errors[error.split(" (")[0]] += 1
            pause_s = backoff_s * self._jitter.uniform(0.5, 1.0)
            if (
                not retry
                or attempts >= REQUEST_ATTEMPTS_MAX
                or (time.monotonic() + pause_s > deadline)
            ):
                self.stats.gave_up += 1
                return Answer(status_code, payload, attempts, error)
            await asyncio.sleep(pause_s)
            backoff_s = min(backoff_s * 2, BACKOFF_S_MAX)


# --- the workload ---------------------------------------------------------------------------
@dataclass
class WorkloadConfig:
    customers: int = 8
    clients: int = 8
    readers: int = 2
    currency: str = "USD"
    approval_threshold_minor: int = 1_000_000
    # The stack's fees account, when it charges fees (PAYSAGA_FEES_ACCOUNT_ID).
    fees_account_id: str | None = None
    think_s_max: float = 0.2
    read_pause_s_max: float = 0.3

    @property
    def funding_minor(self) -> int:
        return max(FUNDING_MINOR_MIN, FUNDING_THRESHOLD_MULTIPLE * self.approval_threshold_minor)


class ChaosSetupError(Exception):
    """The workload could not set itself up (accounts, funding); the message says why."""


@dataclass
class Plan:
    """One payment a client is about to submit."""

    key: str
    payer: str
    payee: str
    amount_minor: int
    simulate: str | None
    approval: Literal["approve", "reject"] | None
    cancel_at_s: float | None
    duplicate: Literal["concurrent", "after"] | None
    purpose: Literal["load", "funding"] = "load"
    # The amount is beyond the payer's available balance, as the client read it just
    # before (such a payment is meant to fail for want of funds, unless money came in).
    beyond_balance: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)


class Registry:
    """The payments acknowledged so far: what the operators' faults pick from."""

    def __init__(self) -> None:
        self.payment_ids: list[str] = []
        self._known: set[str] = set()

    def add(self, payment_id: str) -> None:
        if payment_id not in self._known:
            self._known.add(payment_id)
            self.payment_ids.append(payment_id)

    def __contains__(self, payment_id: object) -> bool:
        return payment_id in self._known

    def __len__(self) -> int:
        return len(self.payment_ids)


class OpsBudget:
    """The run's bound on submissions (--ops): once it is spent, it sets the run's `stop`,
    which ends the load (the clients, the readers, and the driver's wait)."""

    def __init__(self, ops_max: int, stop: asyncio.Event) -> None:
        self.ops_max = ops_max
        self.stop = stop
        self.used = 0

    def take(self) -> bool:
        """One submission more, if the budget has one left; the last one sets `stop`."""
        if self.used >= self.ops_max:
            self.stop.set()
            return False
        self.used += 1
        if self.used >= self.ops_max:
            self.stop.set()
        return True


class Workload:
    """Clients, operators and readers against one API, recording everything."""

    def __init__(
        self,
        api: ApiClient,
        history: HistoryWriter,
        config: WorkloadConfig,
        *,
        seed: int,
        run_tag: str,
        registry: Registry,
        run_started: datetime,
    ) -> None:
        self.api = api
        self.history = history
        self.config = config
        self.seed = seed
        self.tag = run_tag
        self.registry = registry
        self.run_started = run_started
        self.accounts: RunAccounts | None = None
        self.overdraft_limits: dict[str, int] = {}
        self.available: dict[str, int] = {}
        self._background: set[asyncio.Task[None]] = set()

    # --- set-up -----------------------------------------------------------------------------
    async def setup(self) -> RunAccounts:
        """Open the run's accounts and fund the customers (each funding waits until it
        settled). Nothing here is a fault's target yet."""
        currency = self.config.currency
        external = await self._open_account(f"{self.tag}-external", "external", None)
        merchant = await self._open_account(f"{self.tag}-merchant", "merchant", 0)
        fees_id = self.config.fees_account_id or f"{self.tag}-fees"
        fees = await self._open_account(fees_id, "fees", 0, may_exist=True)
        customers = [
            await self._open_account(f"{self.tag}-cust-{n:02d}", "customer", 0)
            for n in range(1, self.config.customers + 1)
        ]
        self.accounts = RunAccounts(
            customers=customers, merchant=merchant, fees=fees, external=external
        )
        rng = random.Random(f"{self.seed}-setup")
        fundings = [
            self._fund(rng, customer, self.config.funding_minor, wait=True)
            for customer in customers
        ]
        results = await asyncio.gather(*fundings)
        for customer, status in zip(customers, results, strict=True):
            if status != "SETTLED":
                raise ChaosSetupError(f"funding {customer} ended {status}, not SETTLED")
            self.available[customer] = self.config.funding_minor
        log.info("accounts open and funded", extra={"currency": currency})
        return self.accounts

    async def _open_account(
        self, account_id: str, kind: str, overdraft_limit: int | None, *, may_exist: bool = False
    ) -> str:
        body = {
            "id": account_id,
            "currency": self.config.currency,
            "kind": kind,
            "overdraft_limit_minor": overdraft_limit,
            "metadata": {"chaos_run": self.tag},
        }
        answer = await self.api.request(
            "POST", "/v1/accounts", body=body, idempotency_key=f"{self.tag}-open-{account_id}"
        )
        if answer.status_code == 409 and answer.code == "account_exists" and may_exist:
            existing = await self.api.request("GET", f"/v1/accounts/{account_id}")
            if not existing.ok or existing.body.get("currency") != self.config.currency:
                raise ChaosSetupError(
                    f"account {account_id} exists but does not hold {self.config.currency}"
                )
            answer = existing
        if not answer.ok:
            raise ChaosSetupError(
                f"could not open account {account_id}: {answer.status_code} {answer.body!r} "
                f"{answer.error or ''}"
            )
        limit = answer.body.get("overdraft_limit_minor")
        if limit is not None:
            self.overdraft_limits[account_id] = int(limit)
        return account_id

    async def _fund(
        self, rng: random.Random, customer: str, amount_minor: int, *, wait: bool
    ) -> str | None:
        """Pay `amount_minor` from the external account to `customer`; with `wait`, until
        it ends. Returns its status as last seen."""
        assert self.accounts is not None
        plan = Plan(
            key=f"{self.tag}-fund-{customer}-{rng.getrandbits(48):012x}",
            payer=self.accounts.external,
            payee=customer,
            amount_minor=amount_minor,
            simulate=None,
            # Funding at or above the threshold waits for approval too: the run's
            # operator gives it.
            approval="approve" if amount_minor >= self.config.approval_threshold_minor else None,
            cancel_at_s=None,
            duplicate=None,
            purpose="funding",
        )
        answer = await self._submit(plan)
        if answer is None or not wait:
            return None
        status = answer.get("status")
        deadline = time.monotonic() + FUNDING_WAIT_S
        while status not in TERMINAL_STATUSES and time.monotonic() < deadline:
            await asyncio.sleep(STATUS_POLL_S)
            read = await self.api.request("GET", f"/v1/payments/{answer['id']}")
            if read.ok:
                status = read.body.get("status")
        return str(status)

    # --- the load ---------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event, budget: OpsBudget) -> None:
        """Clients and readers until `stop` is set or the budget is spent (which sets
        `stop`). Actions scheduled on acknowledged payments keep running: see `drain`."""
        clients = [
            asyncio.create_task(self._client(n, stop, budget), name=f"chaos-client-{n}")
            for n in range(1, self.config.clients + 1)
        ]
        readers = [
            asyncio.create_task(self._reader(n, stop), name=f"chaos-reader-{n}")
            for n in range(1, self.config.readers + 1)
        ]
        results = await asyncio.gather(*clients, return_exceptions=True)
        stop.set()
        results += await asyncio.gather(*readers, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def drain(self, timeout_s: float) -> int:
        """Let the actions still scheduled (approvals, cancels) finish, within a bound.
        Returns how many were cut short."""
        pending = set(self._background)
        if not pending:
            return 0
        _, still = await asyncio.wait(pending, timeout=timeout_s)
        for task in still:
            task.cancel()
        for task in still:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return len(still)

    async def _client(self, n: int, stop: asyncio.Event, budget: OpsBudget) -> None:
        rng = random.Random(f"{self.seed}-client-{n}")
        done = 0
        while not stop.is_set():
            if not budget.take():
                return
            done += 1
            if done % TOP_UP_EVERY_OPS == 0 and await self._top_up(rng):
                continue
            plan = await self._plan(rng, n, done)
            await self._submit(plan)
            await asyncio.sleep(rng.uniform(0, self.config.think_s_max))

    async def _top_up(self, rng: random.Random) -> bool:
        """Fund the customer seen lowest, if it is below half its funding. True if done."""
        assert self.accounts is not None
        known = [(self.available.get(c, 0), c) for c in self.accounts.customers]
        lowest, customer = min(known)
        if lowest >= self.config.funding_minor // 2:
            return False
        await self._fund(rng, customer, self.config.funding_minor, wait=False)
        # Counted as spent at once, so that concurrent clients do not all top it up.
        self.available[customer] = lowest + self.config.funding_minor
        return True

    async def _plan(self, rng: random.Random, client: int, n: int) -> Plan:
        assert self.accounts is not None
        customers = self.accounts.customers
        payer = rng.choice(customers)
        others = [c for c in customers if c != payer]
        payee = (
            self.accounts.merchant
            if rng.random() < PAYEE_SHARE_MERCHANT or not others
            else rng.choice(others)
        )
        threshold = self.config.approval_threshold_minor
        funding = self.config.funding_minor
        roll = rng.random()
        beyond_balance = False
        if roll < AMOUNT_SHARE_LARGE:
            amount = rng.randint(threshold, 2 * threshold)
        elif roll < AMOUNT_SHARE_LARGE + AMOUNT_SHARE_BEYOND:
            available = await self._read_balance(payer)
            amount = max(available, 0) + rng.randint(1, max(funding // 10, 1))
            beyond_balance = True
        else:
            amount = rng.randint(100, max(min(funding // 50, threshold - 1), 100))
        simulate = rng.choices(
            [s for s, _ in SIMULATE_WEIGHTS], weights=[w for _, w in SIMULATE_WEIGHTS]
        )[0]
        metadata: dict[str, Any] = {"chaos_run": self.tag}
        if simulate is not None:
            metadata["simulate"] = simulate
        if simulate == "slow":
            metadata["simulate_delay_s"] = rng.choice(SLOW_DELAY_S_CHOICES)
        approval: Literal["approve", "reject"] | None = None
        if amount >= threshold:
            approval = "approve" if rng.random() < APPROVE_SHARE else "reject"
        cancel_at_s = (
            round(rng.uniform(0, CANCEL_AFTER_S_MAX), 3) if rng.random() < CANCEL_SHARE else None
        )
        duplicate: Literal["concurrent", "after"] | None = None
        if rng.random() < DUPLICATE_SHARE:
            duplicate = "concurrent" if rng.random() < 0.5 else "after"
        return Plan(
            key=f"{self.tag}-c{client}-{n}",
            payer=payer,
            payee=payee,
            amount_minor=amount,
            simulate=simulate,
            approval=approval,
            cancel_at_s=cancel_at_s,
            duplicate=duplicate,
            metadata=metadata,
            beyond_balance=beyond_balance,
        )

    async def _submit(self, plan: Plan) -> dict[str, Any] | None:
        """Submit one payment (and its deliberate duplicate), record it, and schedule what
        happens to it next. Returns the acknowledged payment, if any."""
        t = self.history.t()
        metadata = dict(plan.metadata)
        if plan.purpose == "funding":
            metadata = {"chaos_run": self.tag}
        body = {
            "payer_account_id": plan.payer,
            "payee_account_id": plan.payee,
            "amount_minor": plan.amount_minor,
            "currency": self.config.currency,
            "reference": plan.key,
            "metadata": metadata,
        }

        def send() -> Awaitable[Answer]:
            return self.api.request("POST", "/v1/payments", body=body, idempotency_key=plan.key)

        answers: list[Answer]
        if plan.duplicate == "concurrent":
            answers = list(await asyncio.gather(send(), send()))
        else:
            answers = [await send()]
            if plan.duplicate == "after":
                answers.append(await send())
        ids = sorted({a.body["id"] for a in answers if a.ok and isinstance(a.body, dict)})
        acked = bool(ids)
        first = answers[0]
        final = next((a for a in answers if a.ok), first)
        record: dict[str, Any] = {
            "key": plan.key,
            "payer": plan.payer,
            "payee": plan.payee,
            "amount_minor": plan.amount_minor,
            "currency": self.config.currency,
            "simulate": plan.simulate,
            "approval": plan.approval,
            "cancel_at_s": plan.cancel_at_s,
            "beyond_balance": plan.beyond_balance,
            "attempts": sum(a.attempts for a in answers),
            "duplicates": len(answers) - 1,
            "acked": acked,
            "payment_id": ids[0] if acked else None,
            "final_status_code": final.status_code,
            "error": None if acked else (final.error or f"HTTP {final.status_code} {final.code}"),
            "purpose": plan.purpose,
        }
        if len(ids) > 1:
            record["payment_ids"] = ids
        self.history.write("submit", t=t, **record)
        if not acked:
            return None
        payment_id = ids[0]
        self.registry.add(payment_id)
        if plan.approval is not None:
            self._spawn(self._decide(payment_id, plan.approval, plan.key))
        if plan.cancel_at_s is not None:
            self._spawn(self._cancel_later(payment_id, plan.cancel_at_s))
        answer: dict[str, Any] = final.body
        return answer

    def _spawn(self, work: Awaitable[None]) -> None:
        async def guarded() -> None:
            try:
                await work
            except asyncio.CancelledError:
                raise
            except Exception:  # an action's own failure must not end the run
                log.exception("a chaos action failed")

        task = asyncio.create_task(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _act(self, payment_id: str, op: str, body: dict[str, Any] | None) -> Answer:
        t = self.history.t()
        answer = await self.api.request("POST", f"/v1/payments/{payment_id}/{op}", body=body)
        self.history.write(
            "op",
            t=t,
            op=op,
            payment_id=payment_id,
            status_code=answer.status_code,
            attempts=answer.attempts,
            code=answer.code,
            detail=answer.detail,
            error=answer.error,
        )
        return answer

    async def _cancel_later(self, payment_id: str, after_s: float) -> None:
        await asyncio.sleep(after_s)
        await self._act(payment_id, "cancel", {"reason": "chaos: the client changed its mind"})

    async def _decide(self, payment_id: str, decision: str, key: str) -> None:
        """An operator: waits until the payment asks for approval, then answers, and keeps
        watching until it ends (a reset can make it ask again). Bounded by the run: the
        drain cuts short what is left when the load has stopped."""
        rng = random.Random(f"{self.seed}-decide-{key}")
        body = (
            {"note": "chaos: approved"}
            if decision == "approve"
            else {"reason": "chaos: rejected by an operator"}
        )
        watching_since = time.monotonic()
        answer_after = 0.0
        first = True
        while True:
            read = await self.api.request("GET", f"/v1/payments/{payment_id}")
            status = read.body.get("status") if read.ok else None
            if status in TERMINAL_STATUSES:
                return
            pending = status == "PENDING_APPROVAL" and not read.body.get("repair_pending")
            if pending and time.monotonic() >= answer_after:
                if first:
                    await asyncio.sleep(rng.uniform(0, APPROVAL_DELAY_S_MAX))
                    first = False
                answer = await self._act(payment_id, decision, body)
                # Taken: ask again only if it still asks much later. Refused (its
                # workflow was just reset, say, and is not waiting yet): soon.
                answer_after = time.monotonic() + (
                    REDECIDE_AFTER_S if answer.ok else REDECIDE_REFUSED_S
                )
            watched_s = time.monotonic() - watching_since
            await asyncio.sleep(min(APPROVAL_POLL_S + watched_s / 20, APPROVAL_POLL_S_MAX))

    # --- readers ----------------------------------------------------------------------------
    async def _reader(self, n: int, stop: asyncio.Event) -> None:
        assert self.accounts is not None
        rng = random.Random(f"{self.seed}-reader-{n}")
        accounts = [*self.accounts.customers, self.accounts.merchant, self.accounts.fees]
        cursors: dict[str, str | None] = {}
        kinds = [k for k, _ in READ_WEIGHTS]
        weights = [w for _, w in READ_WEIGHTS]
        while not stop.is_set():
            account = rng.choice(accounts)
            what = rng.choices(kinds, weights=weights)[0]
            if what == "balance":
                await self._read_balance(account)
            elif what == "entries":
                cursors[account] = await self._read_entries(account, cursors.get(account))
            else:
                await self._read_balance_as_of(account, rng)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    stop.wait(), timeout=rng.uniform(0, self.config.read_pause_s_max)
                )

    def _limit(self, account_id: str) -> int:
        return self.overdraft_limits.get(account_id, 0)

    async def _read_balance(self, account_id: str) -> int:
        """The ledger's position (strongly consistent); returns `available`."""
        t = self.history.t()
        answer = await self.api.request("GET", f"/v1/accounts/{account_id}")
        if not answer.ok:
            return self.available.get(account_id, 0)
        position = answer.body["position"]
        available = int(position["available"])
        self.available[account_id] = available
        self.history.write(
            "read",
            t=t,
            what="balance",
            account_id=account_id,
            posted=int(position["posted"]),
            pending=int(position["pending"]),
            available=available,
            overdraft_limit=self._limit(account_id),
            as_of_seq=position.get("as_of_seq"),
            as_of=None,
            entries_min_running_balance=None,
        )
        return available

    async def _read_entries(self, account_id: str, cursor: str | None) -> str | None:
        """One statement page from `cursor`; returns where the next read starts (the same
        cursor again at the end of the statement, so new entries show up there)."""
        t = self.history.t()
        params: dict[str, Any] = {"limit": READ_ENTRIES_LIMIT}
        if cursor:
            params["cursor"] = cursor
        answer = await self.api.request("GET", f"/v1/accounts/{account_id}/entries", params=params)
        if not answer.ok:
            return cursor
        entries = answer.body["entries"]
        lowest: int | None = None
        posted = pending = spendable = 0
        for entry in entries:
            after = entry["balance_after"]
            spendable = after["credits_posted"] - after["debits_posted"] - after["debits_pending"]
            posted, pending = after["posted"], after["pending"]
            lowest = spendable if lowest is None else min(lowest, spendable)
        limit = self._limit(account_id)
        self.history.write(
            "read",
            t=t,
            what="entries",
            account_id=account_id,
            posted=posted,
            pending=pending,
            available=spendable + limit,
            overdraft_limit=limit,
            as_of_seq=answer.body.get("as_of_seq"),
            as_of=None,
            entries_min_running_balance=lowest,
            entries=len(entries),
        )
        next_cursor = answer.body.get("next_cursor")
        return str(next_cursor) if next_cursor else cursor

    async def _read_balance_as_of(self, account_id: str, rng: random.Random) -> None:
        t = self.history.t()
        span_s = max((datetime.now(UTC) - self.run_started).total_seconds(), 0.0)
        instant = self.run_started + timedelta(seconds=rng.uniform(0, span_s))
        as_of = rfc3339(instant)
        answer = await self.api.request(
            "GET", f"/v1/accounts/{account_id}/balance", params={"as_of": as_of}
        )
        if not answer.ok:
            return
        balance = answer.body
        self.history.write(
            "read",
            t=t,
            what="balance_as_of",
            account_id=account_id,
            posted=int(balance["posted"]),
            pending=int(balance["pending"]),
            available=int(balance["available"]),
            overdraft_limit=self._limit(account_id),
            as_of_seq=balance.get("as_of_seq"),
            as_of=as_of,
            entries_min_running_balance=None,
        )

    # --- the end --------------------------------------------------------------------------
    async def final_statuses(self, timeout_s: float) -> dict[str, str | None]:
        """Every acknowledged payment's status as the API reports it, waiting (within
        `timeout_s`) for those still open to end."""
        statuses: dict[str, str | None] = dict.fromkeys(self.registry.payment_ids)
        deadline = time.monotonic() + timeout_s
        gate = asyncio.Semaphore(STATUS_READERS_MAX)

        async def read(payment_id: str) -> None:
            async with gate:
                answer = await self.api.request(
                    "GET", f"/v1/payments/{payment_id}", deadline_s=REQUEST_TIMEOUT_S
                )
            if answer.ok:
                statuses[payment_id] = str(answer.body.get("status"))

        while True:
            open_ids = [p for p, s in statuses.items() if s not in TERMINAL_STATUSES]
            await asyncio.gather(*(read(p) for p in open_ids))
            still_open = [p for p, s in statuses.items() if s not in TERMINAL_STATUSES]
            if not still_open or time.monotonic() + STATUS_POLL_S > deadline:
                return statuses
            await asyncio.sleep(STATUS_POLL_S)


async def wait_ready(http: httpx.AsyncClient, timeout_s: float) -> float | None:
    """Seconds until /readyz answered 200, or None if it did not within `timeout_s`."""
    started = time.monotonic()
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if (await http.get("/readyz", timeout=3.0)).status_code == 200:
                return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            return None
        await asyncio.sleep(0.2)
