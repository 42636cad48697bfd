"""`paysaga chaos check`: judge a chaos run once the system is quiet, as Jepsen's bank
checker judges a history.

**Quiescence first.** The checker waits (at most `quiesce_timeout_s`) until no payment
workflow runs on the task queue, a sweep by the sweeper has run after the load stopped
(it runs the sweep itself, as `paysaga sweep` does, once every open payment is idle past
`PAYSAGA_SWEEP_IDLE_S`), no payment stream is open, and every read model has applied
the ledger's last event twice in a row. A run that does not quiesce is invalid.

**Then every invariant** (DESIGN.md, "Invariants"; issue 11, §3), each with the number of
things it examined, its violations, and the first of them:

| invariant         | what it proves                                                     |
|-------------------|--------------------------------------------------------------------|
| `conservation`    | per currency, posted balances sum to zero (`ledger check`)         |
| `no-overdraft`    | no position below its limit now, none at any event of the fold,    |
|                   | none in any reader's observation during the run                    |
| `payments-close`  | every acknowledged payment has a stream (none lost), every payment |
|                   | of the run ended exactly once (none stuck), within a bound         |
| `no-duplicates`   | one payment per Idempotency-Key (the API's answers, the ledger's   |
|                   | payments by reference, the key table), no event type twice        |
| `state-machines`  | every stream is a valid path through its machine (`ledger check`)  |
| `no-hold-leaks`   | no payment holds funds, no position has anything pending           |
| `positions`       | stored positions equal a fold over the events (`ledger check`)     |
| `seal-and-chains` | every hash, chain and sealed block verifies (`ledger verify`)      |
| `read-models`     | every read model equals a fold up to its checkpoint and caught up; |
|                   | historical balances (sampled, and every reader's) equal a fold     |
| `processor`       | an authorization of a payment that did not settle was voided       |
|                   | exactly once, a settled payment captured exactly once, never voided|
| `decisions`       | an operator's acknowledged approval or rejection held              |
| `reconciliation`  | a reconciliation of the processor's settlement report for the run  |
|                   | finds no discrepancy that was not expected                         |

The ledger checks are the product's own (`ledger/verify.py` `check_ledger` and
`verify_chain`, which cover the read models too); the historical balances are compared
with the product's second implementation of the read models (`ledger/projections/
fold.py`). What only a run can show (its history: acknowledgements, observations,
decisions) and what spans the ledger and the processor is checked here.

**Reconciliation's expected discrepancies.** Only internal drift named
`open-payment-without-workflow` whose payment has ended since: a scheduled
reconciliation that runs while an operator's `terminate` waits for the next sweep
records it, and the sweeper's repair is the answer to it. Anything else (a capture the
ledger lacks, a settlement the processor lacks, an amount or currency that differs, any
other drift) is a violation.
"""

from __future__ import annotations

import asyncio
import bisect
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger import audit
from ledger.db import create_reader_engine, to_libpq_url
from ledger.projections.fold import ReadModelFold
from ledger.projector import Lag
from ledger.read_models import ReadModels
from ledger.state_machine import PAYMENT_TRANSITIONS, TERMINAL_STATES
from ledger.store import EventStore, OpenPayment, fetch_all
from ledger.verify import Report, check_ledger, verify_chain
from paysaga.chaos.history import RunInfo, load_history
from paysaga.settings import Settings
from workflows.search_attributes import PAYMENT_STATUS

Say = Callable[[str], None]

QUIESCE_POLL_S = 1.0
# One look at the system (Temporal, the ledger, the read models) takes at most this long:
# a server that hangs must not hold the checker past its own deadline.
QUIESCE_LOOK_TIMEOUT_S = 30.0
TEMPORAL_RPC_TIMEOUT = timedelta(seconds=10)
# Between two sweeps of the checker's own, at least this long (a payment the sweeper
# cannot close would otherwise be swept every poll).
SWEEP_PAUSE_S_MIN = 5.0
SWEEP_TIMEOUT = timedelta(minutes=15)
TEMPORAL_CONNECT_TIMEOUT_S = 10.0
# Every payment of the run ends within this, from its PaymentInitiated to its terminal
# event: approvals (an operator answers within seconds), processor outages, restarts,
# and a terminated payment's repair by the sweeper (PAYSAGA_SWEEP_INTERVAL_S + _IDLE_S).
CLOSE_BOUND_S_DEFAULT = 300.0
# Historical balances read at random instants of the run, per account of the run.
HISTORICAL_SAMPLES_DEFAULT = 20
# Reader observations of historical balances compared with the fold, at most.
OBSERVATIONS_CHECKED_MAX = 5_000
RECON_TIMEOUT_S = 180.0
# Violations kept per invariant (all are counted).
EXAMPLES_KEPT_MAX = 20
OPEN_LISTED_MAX = 1_000
RUNNING_LISTED_MAX = 10
ID_BATCH = 2_000
EVENT_BATCH = 5_000
# Expected reconciliation findings (see the module's docstring).
EXPECTED_DRIFT_CHECKS = frozenset({"open-payment-without-workflow"})

TERMINAL_EVENT_TYPES = frozenset(
    event for (_, event), to in PAYMENT_TRANSITIONS.items() if to in TERMINAL_STATES
)

INVARIANTS: tuple[tuple[str, str], ...] = (
    (
        "quiescence",
        "the system went quiet: no payment workflow running, a sweep after the "
        "load, no open payment, every read model caught up",
    ),
    ("conservation", "per currency, the posted balances of all accounts sum to zero"),
    ("no-overdraft", "no balance below its limit: now, at any event, in any observation"),
    (
        "payments-close",
        "every acknowledged payment reached exactly one terminal state, "
        "within the bound: none lost, none stuck",
    ),
    ("no-duplicates", "one payment per Idempotency-Key; no event type twice in a stream"),
    ("state-machines", "every stream is a valid path through its state machine"),
    ("no-hold-leaks", "no payment holds funds; no position has anything pending"),
    ("positions", "stored positions equal a fold over the events"),
    ("seal-and-chains", "every hash, stream chain and sealed block verifies"),
    (
        "read-models",
        "read models equal a fold up to their checkpoints and caught up; "
        "historical balances equal a fold",
    ),
    (
        "processor",
        "unsettled payments' authorizations voided exactly once; settled "
        "payments captured exactly once and never voided",
    ),
    ("decisions", "an operator's acknowledged approval or rejection held"),
    (
        "reconciliation",
        "reconciling the processor's settlement report for the run finds no unexpected discrepancy",
    ),
)

# Where each rule of `ledger check` and `ledger verify` belongs.
_CHECK_RULES = {
    "zero-sum": "conservation",
    "position-mismatch": "positions",
    "position-without-events": "positions",
    "missing-position": "positions",
    "fold": "positions",
    "state-machine": "state-machines",
    "head-state": "state-machines",
    "malformed": "state-machines",
    "repeated-event-type": "no-duplicates",
    "read-model": "read-models",
    "read-model-fold": "read-models",
}
# The fold's own overdraft and sign checks (ledger/fold.py `_check`), run after every event.
_FOLD_OVERDRAFT = ("below its limit", "negative component")


class CheckError(Exception):
    """The run cannot be checked at all (no run directory, no database)."""


# --- the report ---------------------------------------------------------------------------------
@dataclass
class Invariant:
    """One invariant: how many things it examined, and what violated it."""

    name: str
    title: str
    checked: int = 0
    violations: int = 0
    examples: list[str] = field(default_factory=list)
    # Set when it could not be checked (which makes it invalid).
    error: str | None = None

    @property
    def valid(self) -> bool:
        return self.violations == 0 and self.error is None

    @property
    def first(self) -> str | None:
        if self.examples:
            return self.examples[0]
        return None if self.error is None else f"not checked: {self.error}"

    def violation(self, message: str) -> None:
        self.violations += 1
        if len(self.examples) < EXAMPLES_KEPT_MAX:
            self.examples.append(message)

    def to_json(self) -> dict[str, Any]:
        return {
            "valid?": self.valid,
            "title": self.title,
            "checked": self.checked,
            "violations": self.violations,
            "first": self.first,
            "examples": self.examples,
            "error": self.error,
        }


@dataclass
class Quiescence:
    awaited: bool
    reached: bool = False
    waited_s: float = 0.0
    sweeps: list[dict[str, Any]] = field(default_factory=list)
    running_payments: int | None = None
    running_examples: list[str] = field(default_factory=list)
    open_payments: list[str] = field(default_factory=list)
    lag_events: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    def describe(self) -> str:
        parts = []
        if self.running_payments:
            parts.append(
                f"{self.running_payments} payment workflow(s) still running "
                f"({', '.join(self.running_examples)})"
            )
        if self.open_payments:
            shown = ", ".join(self.open_payments[:5])
            parts.append(f"{len(self.open_payments)} payment(s) still open ({shown})")
        lagging = {k: v for k, v in self.lag_events.items() if v}
        if lagging:
            parts.append(f"read models behind the ledger: {lagging}")
        if not self.sweeps:
            parts.append("no sweep ran after the load")
        if self.error:
            parts.append(self.error)
        return "; ".join(parts) or "it did not settle"

    def to_json(self) -> dict[str, Any]:
        return {
            "awaited": self.awaited,
            "reached": self.reached,
            "waited_s": round(self.waited_s, 3),
            "sweeps": self.sweeps,
            "running_payments": self.running_payments,
            "open_payments": self.open_payments[:50],
            "lag_events": self.lag_events,
            "error": self.error,
        }


@dataclass
class CheckReport:
    """The verdict on a run: `valid` when every invariant holds."""

    run_dir: Path
    run: dict[str, Any]
    quiescence: Quiescence
    invariants: list[Invariant]
    payments: dict[str, Any]
    facts: dict[str, Any]
    checked_at: str
    elapsed_s: float

    @property
    def valid(self) -> bool:
        return all(invariant.valid for invariant in self.invariants)

    def invariant(self, name: str) -> Invariant:
        return next(i for i in self.invariants if i.name == name)

    def to_json(self) -> dict[str, Any]:
        return {
            "valid?": self.valid,
            "run_dir": str(self.run_dir),
            "run": self.run,
            "checked_at": self.checked_at,
            "elapsed_s": round(self.elapsed_s, 3),
            "quiescence": self.quiescence.to_json(),
            "payments": self.payments,
            "invariants": {i.name: i.to_json() for i in self.invariants},
            "facts": self.facts,
        }

    def lines(self) -> list[str]:
        """The verdict as plain text, one invariant a line."""
        out = [f"valid? {str(self.valid).lower()}  ({self.run_dir})"]
        for i in self.invariants:
            verdict = "true " if i.valid else "FALSE"
            line = (
                f"  {i.name:<16} valid? {verdict} checked {i.checked:>7}  violations {i.violations}"
            )
            if not i.valid and i.first:
                line += f"\n      first: {i.first}"
            out.append(line)
        per_state = ", ".join(f"{k} {v}" for k, v in self.payments.get("per_state", {}).items())
        out.append(f"  payments of the run: {per_state or 'none'}")
        return out

    def render(self) -> Any:
        """A rich renderable: the verdict, then a table of the invariants."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        verdict = Text(
            f"valid? {str(self.valid).lower()}",
            style="bold green" if self.valid else "bold red",
        )
        table = Table(title=f"chaos check of {self.run.get('run_tag') or self.run_dir.name}")
        table.add_column("invariant")
        table.add_column("valid?")
        table.add_column("checked", justify="right")
        table.add_column("violations", justify="right")
        table.add_column("first violation", overflow="fold")
        for i in self.invariants:
            table.add_row(
                i.name,
                Text("true", style="green") if i.valid else Text("false", style="bold red"),
                str(i.checked),
                str(i.violations),
                i.first or "",
            )
        per_state = ", ".join(f"{k} {v}" for k, v in self.payments.get("per_state", {}).items())
        footer = Text(
            f"payments of the run: {per_state or 'none'}; slowest to close: "
            f"{self.payments.get('slowest_close_s')} s; quiescence waited "
            f"{self.quiescence.waited_s:.1f} s, {len(self.quiescence.sweeps)} sweep(s); "
            f"checked in {self.elapsed_s:.1f} s"
        )
        return Group(verdict, table, footer)


# --- what the checker reads ---------------------------------------------------------------------
@dataclass
class RunHistory:
    info: RunInfo
    submits: list[dict[str, Any]]
    ops: list[dict[str, Any]]
    reads: list[dict[str, Any]]
    faults: list[dict[str, Any]]

    @classmethod
    def load(cls, run_dir: Path) -> RunHistory:
        info, records = load_history(run_dir)
        by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for record in records:
            by_type[record["type"]].append(record)
        return cls(info, by_type["submit"], by_type["op"], by_type["read"], by_type["fault"])

    @property
    def tag(self) -> str | None:
        tag = getattr(self.info, "run_tag", None)
        return tag if isinstance(tag, str) else None

    @property
    def accounts(self) -> list[str]:
        """The run's own accounts: customers, merchant, external (the fees account may be
        the stack's, shared with other runs)."""
        a = self.info.accounts
        return [*a.customers, a.merchant, a.external]

    @property
    def acked(self) -> dict[str, dict[str, Any]]:
        """Acknowledged submissions by payment id."""
        return {s["payment_id"]: s for s in self.submits if s.get("acked") and s.get("payment_id")}

    @property
    def keys(self) -> set[str]:
        return {s["key"] for s in self.submits}

    @property
    def started_at(self) -> datetime:
        return _instant(self.info.started_at)

    @property
    def ended_at(self) -> datetime | None:
        return _instant(self.info.ended_at) if self.info.ended_at else None


@dataclass
class PaymentFacts:
    """One payment stream, as the ledger has it."""

    payment_id: str
    state: str
    initiated: dict[str, Any]
    initiated_at: datetime | None
    types: list[str]
    closed_at: datetime | None

    @property
    def terminal_events(self) -> int:
        return sum(1 for t in self.types if t in TERMINAL_EVENT_TYPES)

    @property
    def holds(self) -> bool:
        return "FundsReserved" in self.types and not (
            {"FundsReleased", "PaymentSettled"} & set(self.types)
        )

    @property
    def close_s(self) -> float | None:
        if self.initiated_at is None or self.closed_at is None:
            return None
        return (self.closed_at - self.initiated_at).total_seconds()


def _instant(raw: str) -> datetime:
    value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def reader_url(settings: Settings) -> str:
    """Who reads for the checker: the application role (it holds SELECT on everything the
    checks read), or the owner when that is the only login this process was given."""
    from paysaga.db import service_urls

    if settings.database_url is not None and settings.database_app_url is None:
        return settings.database_url
    return service_urls(settings).app_url


# --- the entry point -----------------------------------------------------------------------------
async def check_run(
    run_dir: Path,
    settings: Settings,
    *,
    quiesce_timeout_s: float,
    close_bound_s: float = CLOSE_BOUND_S_DEFAULT,
    historical_samples: int = HISTORICAL_SAMPLES_DEFAULT,
    reconcile: bool = True,
    say: Say | None = None,
) -> CheckReport:
    """Wait for quiescence (0: do not wait, nor sweep), then check every invariant."""
    started = time.monotonic()
    tell: Say = say or (lambda _line: None)
    try:
        history = RunHistory.load(run_dir)
    except (OSError, ValueError) as error:
        raise CheckError(f"cannot read the run in {run_dir}: {error}") from error
    url = reader_url(settings)
    engine = create_reader_engine(url, pool_size=4, pool_overflow_max=4)
    store = await EventStore.open(url, pool_size=1, engine=engine)
    checker = _Checker(history, settings, engine, store, tell)
    try:
        quiet = await checker.quiesce(quiesce_timeout_s)
        invariants = await checker.evaluate(quiet, close_bound_s, historical_samples, reconcile)
    finally:
        await store.close()
        await engine.dispose()
    return CheckReport(
        run_dir=run_dir,
        run={
            "seed": history.info.seed,
            "run_tag": history.tag,
            "started_at": history.info.started_at,
            "ended_at": history.info.ended_at,
            "faults_requested": history.info.faults_requested,
        },
        quiescence=quiet,
        invariants=invariants,
        payments=checker.payment_summary(),
        facts=checker.facts,
        checked_at=datetime.now(UTC).isoformat(),
        elapsed_s=time.monotonic() - started,
    )


class _Checker:
    def __init__(
        self,
        history: RunHistory,
        settings: Settings,
        engine: AsyncEngine,
        store: EventStore,
        say: Say,
    ) -> None:
        self.history = history
        self.settings = settings
        self.engine = engine
        self.store = store
        self.say = say
        self.facts: dict[str, Any] = {}
        self.payments: dict[str, PaymentFacts] = {}
        self.close_bound_s = CLOSE_BOUND_S_DEFAULT
        self._client: Any = None

    async def client(self) -> Any:
        if self._client is None:
            from paysaga.temporal import connect

            self._client = await connect(self.settings, timeout_s=TEMPORAL_CONNECT_TIMEOUT_S)
        return self._client

    async def _fetch(self, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
        return await fetch_all(self.engine, text(sql), params or {})

    # --- quiescence -------------------------------------------------------------------------
    async def quiesce(self, timeout_s: float) -> Quiescence:
        """Wait until the system is quiet, sweeping as the sweeper would; see the module."""
        if timeout_s <= 0:
            return Quiescence(awaited=False)
        quiet = Quiescence(awaited=True)
        started = time.monotonic()
        deadline = started + timeout_s
        last_sweep: float | None = None
        steady_head: int | None = None
        self.say(f"waiting (at most {timeout_s:.0f} s) for the system to quiesce")
        while True:
            try:
                running, examples, opened, lags, ledger_now = await asyncio.wait_for(
                    self._look(), QUIESCE_LOOK_TIMEOUT_S
                )
                quiet.running_payments, quiet.running_examples = running, examples
                quiet.open_payments = [p.payment_id for p in opened]
                quiet.lag_events = {lag.projection: lag.events for lag in lags}
                head = max((lag.last_seq + lag.events for lag in lags), default=0)
                quiet.error = None
                now = time.monotonic()
                if running == 0:
                    idle = all(
                        (ledger_now - p.last_event_at).total_seconds() >= self.settings.sweep_idle_s
                        for p in opened
                    )
                    due = last_sweep is None or (opened and now - last_sweep >= SWEEP_PAUSE_S_MIN)
                    if due and idle:
                        quiet.sweeps.append(await self._sweep(deadline - now))
                        last_sweep = time.monotonic()
                        steady_head = None
                        continue
                    caught_up = all(events == 0 for events in quiet.lag_events.values())
                    if last_sweep is not None and not opened and caught_up:
                        if steady_head == head:
                            quiet.reached = True
                            break
                        steady_head = head
                    else:
                        steady_head = None
            except Exception as error:  # a server still coming back: keep polling
                quiet.error = f"{type(error).__name__}: {error}"[:500]
                steady_head = None
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(QUIESCE_POLL_S)
        quiet.waited_s = time.monotonic() - started
        self.say(
            f"quiescent after {quiet.waited_s:.1f} s"
            if quiet.reached
            else f"NOT quiescent after {quiet.waited_s:.1f} s: {quiet.describe()}"
        )
        return quiet

    async def _look(self) -> tuple[int, list[str], list[OpenPayment], list[Lag], datetime]:
        """Payment workflows running, payments open, read models' lags, the ledger's clock."""
        running, examples = await self._running_payments()
        opened = await self.store.open_payments(idle_s=0, limit=OPEN_LISTED_MAX)
        lags = await ReadModels(self.engine).lags()
        return running, examples, opened, lags, await self.store.clock()

    async def _running_payments(self) -> tuple[int, list[str]]:
        client = await self.client()
        queue = self.settings.task_queue.replace("\\", "\\\\").replace("'", "\\'")
        query = (
            "WorkflowType = 'PaymentWorkflow' AND ExecutionStatus = 'Running' "
            f"AND TaskQueue = '{queue}'"
        )
        count = (await client.count_workflows(query, rpc_timeout=TEMPORAL_RPC_TIMEOUT)).count
        examples: list[str] = []
        if count:
            async for execution in client.list_workflows(
                query, limit=RUNNING_LISTED_MAX, rpc_timeout=TEMPORAL_RPC_TIMEOUT
            ):
                status = execution.typed_search_attributes.get(PAYMENT_STATUS)
                examples.append(f"{execution.id} {status or '?'}")
        return int(count), examples

    async def _sweep(self, remaining_s: float) -> dict[str, Any]:
        """One sweep on the task queue, as the schedule (or `paysaga sweep`) runs it."""
        from workflows.models import SweepReport, SweepRequest
        from workflows.sweeper import SweeperWorkflow

        client = await self.client()
        queue = self.settings.task_queue
        self.say("sweeping")
        report: SweepReport = await asyncio.wait_for(
            client.execute_workflow(
                SweeperWorkflow.run,
                SweepRequest(idle_s=self.settings.sweep_idle_s),
                id=f"{queue}-sweep-check-{uuid.uuid4().hex[:8]}",
                task_queue=queue,
                execution_timeout=SWEEP_TIMEOUT,
            ),
            timeout=max(remaining_s, 1.0),
        )
        return {
            "checked": report.checked,
            "repaired": [r.model_dump(mode="json") for r in report.repaired][:50],
        }

    # --- the invariants ---------------------------------------------------------------------
    async def evaluate(
        self, quiet: Quiescence, close_bound_s: float, samples: int, reconcile: bool
    ) -> list[Invariant]:
        self.close_bound_s = close_bound_s
        invariants = {name: Invariant(name, title) for name, title in INVARIANTS}
        quiescence = invariants["quiescence"]
        if quiet.awaited:
            quiescence.checked = 1
            if not quiet.reached:
                quiescence.violation(
                    f"not quiescent within {quiet.waited_s:.0f} s: {quiet.describe()}"
                )
        self.say("folding and verifying the ledger")
        await self._load_payments()
        await self._ledger_reports(invariants)
        checks: list[tuple[str, Any]] = [
            ("no-overdraft", self._no_overdraft),
            ("payments-close", self._payments_close),
            ("no-duplicates", self._no_duplicates),
            ("no-hold-leaks", self._no_hold_leaks),
            ("read-models", lambda inv: self._read_models(inv, quiet, samples)),
            ("processor", self._processor),
            ("decisions", self._decisions),
        ]
        if reconcile:
            checks.append(("reconciliation", self._reconciliation))
        else:
            invariants["reconciliation"].error = "skipped (--no-reconcile)"
        for name, check in checks:
            self.say(f"checking {name}")
            try:
                await check(invariants[name])
            except Exception as error:
                invariants[name].error = f"{type(error).__name__}: {error}"[:1_000]
        return list(invariants.values())

    async def _load_payments(self) -> None:
        """The run's payments: every acknowledged one, and every payment from or to one of
        the run's own accounts (funding and load, acknowledged or not)."""
        streams = await audit.payment_streams_touching(self.engine, self.history.accounts)
        streams |= {f"payment-{p}" for p in self.history.acked}
        by_stream: dict[str, PaymentFacts] = {}
        ordered = sorted(streams)
        for i in range(0, len(ordered), ID_BATCH):
            rows = await audit.stream_paths(self.engine, ordered[i : i + ID_BATCH])
            for row in rows:
                facts = by_stream.get(row.stream_id)
                if facts is None:
                    facts = by_stream[row.stream_id] = PaymentFacts(
                        payment_id=row.stream_id.removeprefix("payment-"),
                        state=row.state,
                        initiated={},
                        initiated_at=None,
                        types=[],
                        closed_at=None,
                    )
                facts.types.append(row.event_type)
                if row.event_type == "PaymentInitiated":
                    facts.initiated = dict(row.payload)
                    facts.initiated_at = row.recorded_at
                if row.event_type in TERMINAL_EVENT_TYPES and facts.closed_at is None:
                    facts.closed_at = row.recorded_at
        self.payments = {f.payment_id: f for f in by_stream.values()}

    def payment_summary(self) -> dict[str, Any]:
        history = self.history
        per_state = Counter(
            f.state if f.state in TERMINAL_STATES else f"open:{f.state}"
            for f in self.payments.values()
        )
        closes = [s for f in self.payments.values() if (s := f.close_s) is not None]
        timed = [f for f in self.payments.values() if f.close_s is not None]
        slowest = max(timed, key=lambda f: f.close_s or 0.0, default=None)
        load = {
            s["payment_id"]
            for s in history.submits
            if s.get("acked") and s.get("purpose") != "funding"
        }
        load_states = Counter(self.payments[p].state for p in load if p in self.payments)
        return {
            "submitted": len(history.submits),
            "acknowledged": len(history.acked),
            "in_ledger": len(self.payments),
            "per_state": dict(sorted(per_state.items())),
            "load_per_state": dict(sorted(load_states.items())),
            "slowest_close_s": round(max(closes), 3) if closes else None,
            "close_bound_s": self.close_bound_s,
            # Which payment, and how it went: the first thing to look at near the bound.
            "slowest": None
            if slowest is None
            else {
                "payment_id": slowest.payment_id,
                "state": slowest.state,
                "events": slowest.types,
                "simulate": slowest.initiated.get("metadata", {}).get("simulate"),
                "amount_minor": slowest.initiated.get("amount_minor"),
            },
        }

    async def _ledger_reports(self, invariants: dict[str, Invariant]) -> None:
        """`ledger check` and `ledger verify`, their violations sorted into invariants."""
        checked = verified = None
        try:
            checked = await check_ledger(self.engine)
        except Exception as error:
            for name in ("conservation", "positions", "state-machines", "read-models"):
                invariants[name].error = f"ledger check failed: {error}"[:1_000]
        try:
            verified = await verify_chain(self.engine)
        except Exception as error:
            invariants["seal-and-chains"].error = f"ledger verify failed: {error}"[:1_000]
        if checked is not None:
            self.facts["ledger_check"] = _report_facts(checked)
            invariants["conservation"].checked = checked.accounts
            invariants["positions"].checked = checked.accounts
            invariants["state-machines"].checked = checked.streams
            invariants["no-duplicates"].checked += checked.streams
            invariants["read-models"].checked += checked.read_models
            invariants["no-overdraft"].checked += checked.events
            for v in _ordered(checked):
                name = _CHECK_RULES.get(v.rule, "positions")
                if v.rule == "fold" and any(s in v.message for s in _FOLD_OVERDRAFT):
                    name = "no-overdraft"
                invariants[name].violation(_violation_text(v))
        if verified is not None:
            self.facts["ledger_verify"] = _report_facts(verified)
            invariants["seal-and-chains"].checked = verified.events + verified.blocks
            for v in _ordered(verified):
                invariants["seal-and-chains"].violation(_violation_text(v))

    async def _no_overdraft(self, inv: Invariant) -> None:
        rows = await audit.limited_positions(self.engine)
        inv.checked += len(rows)
        for row in rows:
            if row.available < 0:
                inv.violation(
                    f"{row.account_id} is at {row.available} available now, below its limit "
                    f"of {row.overdraft_limit_minor}"
                )
        for read in self.history.reads:
            inv.checked += 1
            where = f"a reader at t={read['t']:.3f} s saw {read['account_id']} ({read['what']}"
            where += f", as of {read['as_of']})" if read.get("as_of") else ")"
            available = read.get("available")
            reads_available = read["what"] in ("balance", "balance_as_of")
            if reads_available and available is not None and available < 0:
                inv.violation(f"{where} at {available} available, below its limit")
            lowest = read.get("entries_min_running_balance")
            if read["what"] == "entries" and lowest is not None:
                limit = read.get("overdraft_limit") or 0
                if lowest + limit < 0:
                    inv.violation(
                        f"{where} with a running balance of {lowest} after an entry, below "
                        f"its limit of {limit}"
                    )

    async def _payments_close(self, inv: Invariant) -> None:
        acked = self.history.acked
        for payment_id, submit in sorted(acked.items(), key=lambda kv: kv[1]["t"]):
            inv.checked += 1
            if payment_id not in self.payments:
                inv.violation(
                    f"payment {payment_id} (key {submit['key']}) was acknowledged with HTTP "
                    f"{submit.get('final_status_code')} at t={submit['t']:.3f} s, but the "
                    "ledger has no stream for it: lost"
                )
        for facts in sorted(self.payments.values(), key=lambda f: f.payment_id):
            if facts.payment_id not in acked:
                inv.checked += 1
            if facts.state not in TERMINAL_STATES:
                inv.violation(
                    f"payment {facts.payment_id} is stuck in {facts.state} "
                    f"(events: {', '.join(facts.types)})"
                )
            elif facts.terminal_events != 1:
                inv.violation(
                    f"payment {facts.payment_id} has {facts.terminal_events} terminal events: "
                    f"{', '.join(facts.types)}"
                )
            elif (close_s := facts.close_s) is not None and close_s > self.close_bound_s:
                inv.violation(
                    f"payment {facts.payment_id} took {close_s:.1f} s to end {facts.state}, "
                    f"more than the bound of {self.close_bound_s:.0f} s"
                )

    async def _no_duplicates(self, inv: Invariant) -> None:
        # The API's answers: every answer for one key named one payment.
        keys: dict[str, set[str]] = defaultdict(set)
        for submit in self.history.submits:
            inv.checked += 1
            keys[submit["key"]] |= set(submit.get("payment_ids") or [])
            if submit.get("payment_id"):
                keys[submit["key"]].add(submit["payment_id"])
        for key, ids in sorted(keys.items()):
            if len(ids) > 1:
                inv.violation(
                    f"key {key} was answered with {len(ids)} different payments: "
                    f"{', '.join(sorted(ids))}"
                )
        # The ledger: the workload names each payment's reference after its key.
        by_reference: dict[str, list[str]] = defaultdict(list)
        for facts in self.payments.values():
            reference = facts.initiated.get("reference")
            if reference in keys:
                by_reference[reference].append(facts.payment_id)
        for reference, created in sorted(by_reference.items()):
            if len(created) > 1:
                inv.violation(
                    f"key {reference} created {len(created)} payments in the ledger: "
                    f"{', '.join(sorted(created))}"
                )
        # The API's key table: each key names the payment its answers named.
        answered = {s["key"]: s["payment_id"] for s in self.history.submits if s.get("payment_id")}
        names = sorted(answered)
        for i in range(0, len(names), ID_BATCH):
            rows = await self._fetch(
                "SELECT idempotency_key, resource_id, state FROM idempotency_keys "
                "WHERE idempotency_key = ANY(:keys) ORDER BY idempotency_key",
                {"keys": names[i : i + ID_BATCH]},
            )
            for row in rows:
                if row.resource_id != answered[row.idempotency_key]:
                    inv.violation(
                        f"key {row.idempotency_key} was answered with payment "
                        f"{answered[row.idempotency_key]}, but the API's key table names "
                        f"{row.resource_id}"
                    )

    async def _no_hold_leaks(self, inv: Invariant) -> None:
        for facts in sorted(self.payments.values(), key=lambda f: f.payment_id):
            inv.checked += 1
            if facts.holds:
                amount = facts.initiated.get("amount_minor")
                inv.violation(
                    f"payment {facts.payment_id} ({facts.state}) still holds {amount} of "
                    f"{facts.initiated.get('payer_account_id')}: neither settled nor released"
                )
        accounts = [*self.history.accounts, self.history.info.accounts.fees]
        rows = await audit.pending(self.engine, accounts)
        inv.checked += len(rows)
        for row in rows:
            if row.debits_pending or row.credits_pending:
                inv.violation(
                    f"{row.account_id} has {row.debits_pending} pending debits and "
                    f"{row.credits_pending} pending credits after every payment ended"
                )

    async def _read_models(self, inv: Invariant, quiet: Quiescence, samples: int) -> None:
        if quiet.awaited:
            inv.checked += len(quiet.lag_events)
            for projection, events in sorted(quiet.lag_events.items()):
                if events:
                    inv.violation(
                        f"read model {projection} is {events} event(s) behind the ledger after "
                        f"{quiet.waited_s:.0f} s of quiet: it does not converge"
                    )
        await self._historical_balances(inv, samples)

    async def _historical_balances(self, inv: Invariant, samples: int) -> None:
        """Sampled instants of the run, and every reader's historical balance, against
        the read models' fold (`ReadModelFold`) up to the read's own checkpoint."""
        history = self.history
        accounts = [*history.accounts, history.info.accounts.fees]
        start = history.started_at
        end = history.ended_at or datetime.now(UTC)
        rng = random.Random(f"{history.info.seed}-check")
        models = ReadModels(self.engine)
        # (account, instant, as_of_seq, observed figures, who observed it)
        queries: list[tuple[str, datetime, int, tuple[int, ...], str]] = []
        span_s = max((end - start).total_seconds(), 0.0)
        for account in accounts:
            for _ in range(samples):
                instant = start + timedelta(seconds=rng.uniform(0, span_s))
                read = await models.balance_as_of(account, instant)
                b = read.balance
                read_figures: tuple[int, ...] = (
                    (b.debits_pending, b.debits_posted, b.credits_pending, b.credits_posted)
                    if b is not None
                    else (0, 0, 0, 0)
                )
                queries.append((account, instant, read.as_of_seq, read_figures, "the checker"))
        observed = [
            r
            for r in history.reads
            if r["what"] == "balance_as_of" and r.get("as_of") and r.get("as_of_seq") is not None
        ]
        if len(observed) > OBSERVATIONS_CHECKED_MAX:
            observed = rng.sample(observed, OBSERVATIONS_CHECKED_MAX)
        for r in observed:
            queries.append(
                (
                    r["account_id"],
                    _instant(r["as_of"]),
                    int(r["as_of_seq"]),
                    (int(r["posted"]), int(r["pending"])),
                    f"a reader at t={r['t']:.3f} s",
                )
            )
        if not queries:
            return
        upto = max(q[2] for q in queries)
        fold = await self._fold_read_models(upto)
        timeline: dict[str, list[tuple[datetime, int, list[int]]]] = {}
        for account, entries in fold.entries.items():
            timeline[account] = sorted(
                ((e.recorded_at, seq, e.deltas) for seq, e in entries.items()),
                key=lambda item: (item[0], item[1]),
            )
        self.facts["historical_balances"] = {
            "sampled": len(queries) - len(observed),
            "observed": len(observed),
        }
        for account, instant, as_of_seq, figures, who in queries:
            inv.checked += 1
            rows = timeline.get(account, [])
            cut = bisect.bisect_right(rows, instant, key=lambda item: item[0])
            total = [0, 0, 0, 0]
            for _, seq, deltas in rows[:cut]:
                if seq <= as_of_seq:
                    total = [t + d for t, d in zip(total, deltas, strict=True)]
            expected: tuple[int, ...] = tuple(total)
            if len(figures) == 2:
                dp, dP, cp, cP = total
                expected = (cP - dP, cp - dp)
            if expected != figures:
                inv.violation(
                    f"{who}: {account}'s balance as of {instant.isoformat()} (checkpoint "
                    f"{as_of_seq}) read {figures}, the fold gives {expected}"
                    + (" (posted, pending)" if len(figures) == 2 else " (dp, dP, cp, cP)")
                )

    async def _fold_read_models(self, upto: int) -> ReadModelFold:
        fold = ReadModelFold()
        after = 0
        while after < upto:
            rows = await audit.events_page(self.engine, after, upto, EVENT_BATCH)
            if not rows:
                break
            for row in rows:
                fold.apply(row)
            after = rows[-1].global_seq
        return fold

    async def _processor(self, inv: Invariant) -> None:
        """The simulator's tables against the ledger's outcomes (migrations/sql/
        0011_processor_capture.sql: every call is logged in processor_calls)."""
        ids = sorted(self.payments)
        auth: dict[str, Any] = {}
        calls: dict[str, Counter[tuple[str, str]]] = defaultdict(Counter)
        for i in range(0, len(ids), ID_BATCH):
            batch = {"ids": ids[i : i + ID_BATCH]}
            for row in await self._fetch(
                "SELECT a.payment_id, a.status, a.authorization_id, a.amount_minor, "
                "c.capture_id, c.amount_minor AS captured_minor "
                "FROM processor_authorizations a "
                "LEFT JOIN processor_captures c ON c.payment_id = a.payment_id "
                "WHERE a.payment_id = ANY(:ids)",
                batch,
            ):
                auth[row.payment_id] = row
            for row in await self._fetch(
                "SELECT payment_id, operation, outcome, count(*) AS n FROM processor_calls "
                "WHERE payment_id = ANY(:ids) GROUP BY payment_id, operation, outcome",
                batch,
            ):
                calls[row.payment_id][(row.operation, row.outcome)] = int(row.n)
        for payment_id in ids:
            facts = self.payments[payment_id]
            if facts.state not in TERMINAL_STATES:
                continue  # stuck: payments-close says so
            inv.checked += 1
            row = auth.get(payment_id)
            made = calls[payment_id]
            captured, voided = made[("capture", "captured")], made[("void", "voided")]
            amount = facts.initiated.get("amount_minor")
            who = f"payment {payment_id} ({facts.state})"
            if facts.state == "settled":
                if captured != 1 or row is None or row.capture_id is None:
                    inv.violation(
                        f"{who} was captured {captured} time(s) at the processor, not once"
                    )
                elif row.captured_minor != amount:
                    inv.violation(
                        f"{who}: the processor captured {row.captured_minor}, the ledger "
                        f"settled {amount}"
                    )
                if voided or (row is not None and row.status != "captured"):
                    status = row.status if row is not None else "nothing"
                    inv.violation(
                        f"{who} was voided {voided} time(s) at the processor (its authorization "
                        f"is {status})"
                    )
                continue
            if captured or (row is not None and row.capture_id is not None):
                inv.violation(f"{who} did not settle, but the processor captured it")
            authorized = row is not None and row.authorization_id is not None
            if row is not None and authorized and (voided != 1 or row.status != "voided"):
                inv.violation(
                    f"{who} did not settle; its authorization is {row.status} and was voided "
                    f"{voided} time(s), not exactly once"
                )
            elif not authorized and voided:
                inv.violation(f"{who} was never authorized, but voided {voided} time(s)")
        # The processor holds nothing for a payment the ledger never heard of.
        for row in await audit.processor_holds_unrecorded(self.engine):
            inv.violation(
                f"the processor has payment {row.payment_id} {row.status}, but the ledger has "
                "no stream for it"
            )

    async def _decisions(self, inv: Invariant) -> None:
        """An approval the API accepted never ends REJECTED; an accepted rejection never
        ends SETTLED. Payments an operator terminated, cancelled or reset through Temporal
        are left out: their workflow's own record of the decision may be gone."""
        touched = {
            str(f.get("detail", {}).get("payment_id"))
            for f in self.history.faults
            if f.get("kind") in ("terminate", "cancel", "reset")
        }
        forbidden = {"approve": "rejected", "reject": "settled"}
        for op in self.history.ops:
            if op.get("op") not in forbidden or op.get("status_code") not in (200, 202):
                continue
            facts = self.payments.get(op["payment_id"])
            if facts is None or op["payment_id"] in touched:
                continue
            inv.checked += 1
            if facts.state == forbidden[op["op"]]:
                inv.violation(
                    f"payment {facts.payment_id}: the API accepted '{op['op']}' at "
                    f"t={op['t']:.3f} s, but it ended {facts.state}"
                )

    async def _reconciliation(self, inv: Invariant) -> None:
        """Ingest the processor's settlement report for the run (from where an earlier
        check of this run left off), run a reconciliation, and judge what reconciliation
        found since the run started."""
        import psycopg

        from activities.settlement_report import build_settlement_report
        from paysaga.reconciliation import start_run
        from recon import cases
        from recon.formats import parse_statement
        from recon.store import ingest

        history = self.history
        name = f"chaos-{history.tag or history.info.seed}"
        start = history.started_at
        previous = await self._fetch(
            "SELECT filename FROM recon.statement_files WHERE filename LIKE :prefix "
            "ORDER BY received_at DESC LIMIT 1",
            {"prefix": f"{name}-%"},
        )
        if previous:
            last_end_us = previous[0].filename.removesuffix(".csv").rsplit("-", 1)[-1]
            start = datetime.fromtimestamp(int(last_end_us) / 1_000_000, UTC)
        end = datetime.now(UTC)
        report = await build_settlement_report(self.engine, start, end)
        url = to_libpq_url(reader_url(self.settings))
        lines = 0
        if report.lines:
            filename = f"{name}-{_micros(start)}-{_micros(end)}.csv"
            parsed = parse_statement(report.content, filename)
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                result = await ingest(conn, parsed, source="simulator", filename=filename)
            lines = result.lines_new
        client = await self.client()
        handle = await start_run(client, self.settings, kind="manual")
        try:
            outcome = await asyncio.wait_for(handle.result(), RECON_TIMEOUT_S)
        except TimeoutError:
            raise TimeoutError(
                f"reconciliation run {handle.id} did not complete within {RECON_TIMEOUT_S:.0f} s"
            ) from None
        self.facts["reconciliation"] = {
            "run_id": outcome.run_id,
            "report_window": [start.isoformat(), end.isoformat()],
            "report_lines": len(report.lines),
            "lines_ingested": lines,
            "counts": outcome.counts,
        }
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            cursor = await conn.execute(
                "SELECT discrepancy_id::text FROM recon.discrepancies "
                "WHERE detected_at >= %s ORDER BY detected_at, discrepancy_id",
                (history.started_at,),
            )
            ids = [str(row[0]) for row in await cursor.fetchall()]
            found = await cases.discrepancies(conn, ids)
        inv.checked = int(outcome.counts.get("lines_considered", 0)) + int(
            outcome.counts.get("items_considered", 0)
        )
        expected = 0
        for row in sorted(found, key=lambda r: (r.detected_at, r.discrepancy_id)):
            check = str(row.details.get("check", ""))
            ended = (
                row.payment_id is not None
                and (facts := self.payments.get(row.payment_id)) is not None
                and facts.state in TERMINAL_STATES
            )
            drift = row.discrepancy_type == "internal_drift" and check in EXPECTED_DRIFT_CHECKS
            if drift and (ended or (row.payment_id and await self._ended(row.payment_id))):
                expected += 1
                continue
            inv.violation(f"{row.discrepancy_type} ({row.status}, run {row.run_id}): {row.summary}")
        self.facts["reconciliation"]["discrepancies"] = len(found)
        self.facts["reconciliation"]["expected"] = expected

    async def _ended(self, payment_id: str) -> bool:
        state = await audit.stream_state(self.engine, f"payment-{payment_id}")
        return state in TERMINAL_STATES


def _micros(instant: datetime) -> int:
    return int(instant.timestamp() * 1_000_000)


def _ordered(report: Report) -> Sequence[Any]:
    return sorted(report.violations, key=lambda v: (v.global_seq is None, v.global_seq or 0))


def _violation_text(v: Any) -> str:
    where = f"global_seq {v.global_seq}: " if v.global_seq is not None else ""
    return f"[ledger {v.rule}] {where}{v.message}"


def _report_facts(report: Report) -> dict[str, Any]:
    return {
        "events": report.events,
        "streams": report.streams,
        "accounts": report.accounts,
        "blocks": report.blocks,
        "unsealed": report.unsealed,
        "read_models": report.read_models,
        "violations": len(report.violations),
    }


def invariant_names() -> Iterable[str]:
    return (name for name, _ in INVARIANTS)
