"""The chaos checker catches what it claims to check.

One small run through the real API and a real worker (settled, declined, rejected,
cancelled and duplicated payments, and readers' observations), recorded in the chaos
run's format: the checker finds it valid. Then the same run, broken one way at a time,
each time in the history or in the database (as its owner, as an attacker with the keys
would): the checker names the invariant that broke, and the thing that broke it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client
from temporalio.service import RPCError

from api.app import create_app
from ledger.db import to_libpq_url
from ledger.projections import READ_MODELS
from ledger.read_models import ReadModels
from ledger.risk_consumer import risk_consumer
from ledger.store import EventStore
from paysaga.chaos.checker import INVARIANTS, CheckReport, check_run
from paysaga.chaos.history import (
    CHECK_FILE,
    HISTORY_FILE,
    HistoryWriter,
    RunAccounts,
    RunInfo,
    rfc3339,
    write_run_info,
)
from paysaga.settings import Settings
from tests.harness.api import make_keys, serve
from tests.harness.ledger import Payment, as_owner
from tests.harness.postgres import IsolatedDatabase
from tests.harness.read_side import projector
from tests.harness.stack import clean_env
from worker import build_worker, worker_activities

CURRENCY = "EUR"
THRESHOLD_MINOR = 20_000
FUNDING_MINOR = 19_000  # below the approval threshold
STATUS_WAIT_S = 30.0
PROJECTOR_POLL_S = 0.2
# How long the checker waits for a quiet that cannot come (a read model held back).
QUIET_WAIT_S = 2.0


@dataclass
class Run:
    """A recorded run, and the payments it made."""

    run_dir: Path
    settings: Settings
    ids: dict[str, str]
    accounts: RunAccounts


class Recorder:
    """Drives the API as the chaos workload does, and records what it did and saw."""

    def __init__(self, http: httpx.AsyncClient, keys: dict[str, str], history: HistoryWriter):
        self.http = http
        self.headers = {"Authorization": f"Bearer {keys['treasury']}"}
        self.history = history

    async def open(self, account_id: str, kind: str, limit: int | None = 0) -> str:
        body = {"id": account_id, "currency": CURRENCY, "kind": kind}
        body["overdraft_limit_minor"] = limit  # type: ignore[assignment]
        response = await self.http.post(
            "/v1/accounts",
            json=body,
            headers={**self.headers, "Idempotency-Key": f"open-{account_id}"},
        )
        assert response.status_code == 201, response.text
        return account_id

    async def submit(
        self,
        key: str,
        payer: str,
        payee: str,
        amount_minor: int,
        *,
        simulate: str | None = None,
        twice: bool = False,
        purpose: str = "load",
    ) -> str:
        t = self.history.t()
        metadata: dict[str, Any] = {"chaos_run": "checker-test"}
        if simulate:
            metadata["simulate"] = simulate
        if simulate == "slow":
            metadata["simulate_delay_s"] = 3
        body = {
            "payer_account_id": payer,
            "payee_account_id": payee,
            "amount_minor": amount_minor,
            "currency": CURRENCY,
            "reference": key,
            "metadata": metadata,
        }
        answers = []
        for _ in range(2 if twice else 1):
            answers.append(
                await self.http.post(
                    "/v1/payments", json=body, headers={**self.headers, "Idempotency-Key": key}
                )
            )
        ids: list[str] = sorted({a.json()["id"] for a in answers if a.status_code == 202})
        assert len(ids) == 1, [a.text for a in answers]
        self.history.write(
            "submit",
            t=t,
            key=key,
            payer=payer,
            payee=payee,
            amount_minor=amount_minor,
            currency=CURRENCY,
            simulate=simulate,
            approval=None,
            cancel_at_s=None,
            attempts=len(answers),
            duplicates=len(answers) - 1,
            acked=True,
            payment_id=ids[0],
            final_status_code=answers[-1].status_code,
            error=None,
            purpose=purpose,
        )
        return ids[0]

    async def act(self, payment_id: str, op: str, body: dict[str, Any]) -> None:
        t = self.history.t()
        response = await self.http.post(
            f"/v1/payments/{payment_id}/{op}", json=body, headers=self.headers
        )
        assert response.status_code == 202, response.text
        self.history.write(
            "op", t=t, op=op, payment_id=payment_id, status_code=202, attempts=1, code=None
        )

    async def status(self, payment_id: str, wanted: str) -> None:
        deadline = asyncio.get_running_loop().time() + STATUS_WAIT_S
        while True:
            response = await self.http.get(f"/v1/payments/{payment_id}", headers=self.headers)
            status = response.json()["status"]
            if status == wanted:
                return
            assert asyncio.get_running_loop().time() < deadline, (payment_id, status, wanted)
            await asyncio.sleep(0.2)

    async def read_balance(self, account_id: str) -> None:
        t = self.history.t()
        response = await self.http.get(f"/v1/accounts/{account_id}", headers=self.headers)
        position = response.json()["position"]
        self.history.write(
            "read",
            t=t,
            what="balance",
            account_id=account_id,
            posted=position["posted"],
            pending=position["pending"],
            available=position["available"],
            overdraft_limit=0,
            as_of_seq=position["as_of_seq"],
            as_of=None,
            entries_min_running_balance=None,
        )

    async def read_entries(self, account_id: str) -> None:
        t = self.history.t()
        response = await self.http.get(
            f"/v1/accounts/{account_id}/entries", params={"limit": 200}, headers=self.headers
        )
        page = response.json()
        after = [e["balance_after"] for e in page["entries"]]
        spendable = [a["credits_posted"] - a["debits_posted"] - a["debits_pending"] for a in after]
        self.history.write(
            "read",
            t=t,
            what="entries",
            account_id=account_id,
            posted=after[-1]["posted"] if after else 0,
            pending=after[-1]["pending"] if after else 0,
            available=spendable[-1] if after else 0,
            overdraft_limit=0,
            as_of_seq=page["as_of_seq"],
            as_of=None,
            entries_min_running_balance=min(spendable) if spendable else None,
        )

    async def read_balance_as_of(self, account_id: str, instant: datetime) -> None:
        t = self.history.t()
        as_of = rfc3339(instant)
        response = await self.http.get(
            f"/v1/accounts/{account_id}/balance", params={"as_of": as_of}, headers=self.headers
        )
        assert response.status_code == 200, response.text
        balance = response.json()
        self.history.write(
            "read",
            t=t,
            what="balance_as_of",
            account_id=account_id,
            posted=balance["posted"],
            pending=balance["pending"],
            available=balance["available"],
            overdraft_limit=0,
            as_of_seq=balance["as_of_seq"],
            as_of=as_of,
            entries_min_running_balance=None,
        )


@asynccontextmanager
async def projecting(
    store: EventStore, database: IsolatedDatabase, settings: Settings
) -> AsyncIterator[None]:
    """The projector, running as `paysaga projector` runs it (the read models, then the
    risk consumer), until the block ends."""
    stop = asyncio.Event()
    projections = [*READ_MODELS.values(), risk_consumer(store, settings.risk_thresholds())]
    runner = projector(store, database, projections, poll_s=PROJECTOR_POLL_S)
    task = asyncio.create_task(runner.run(stop))
    try:
        yield
    finally:
        stop.set()
        await task


@pytest.fixture
async def run(
    settings: Settings,
    store: EventStore,
    database: IsolatedDatabase,
    temporal_client: Client,
    owner_engine: AsyncEngine,
    tmp_path: Path,
) -> AsyncIterator[Run]:
    """A worker (every workflow and activity, reconciliation's too), the projector and the
    API, on the test's own database and task queue; a small run through them, recorded."""
    settings = settings.model_copy(update={"approval_threshold_minor": THRESHOLD_MINOR})
    activities = worker_activities(store, temporal_client, settings)
    keys = await make_keys(owner_engine, settings.api_key_secret.get_secret_value())
    app = create_app(settings, store=store, temporal_client=temporal_client)
    run_dir = tmp_path / "run"
    async with (
        build_worker(temporal_client, settings, activities=activities),
        projecting(store, database, settings),
        serve(app) as http,
    ):
        started = datetime.now(UTC)
        history = HistoryWriter(run_dir)
        api = Recorder(http, keys, history)
        accounts = RunAccounts(
            customers=[await api.open("cust-1", "customer"), await api.open("cust-2", "customer")],
            merchant=await api.open("merchant", "merchant"),
            fees=await api.open("run-fees", "fees"),
            external=await api.open("world", "external", None),
        )
        ids: dict[str, str] = {}
        for customer in accounts.customers:
            funding = await api.submit(
                f"fund-{customer}", "world", customer, FUNDING_MINOR, purpose="funding"
            )
            await api.status(funding, "SETTLED")
        ids["settled"] = await api.submit("pay-1", "cust-1", "merchant", 1_000, twice=True)
        ids["declined"] = await api.submit("pay-2", "cust-1", "merchant", 700, simulate="decline")
        ids["rejected"] = await api.submit("pay-3", "cust-2", "merchant", THRESHOLD_MINOR)
        ids["cancelled"] = await api.submit("pay-4", "cust-2", "cust-1", 900, simulate="slow")
        await api.act(ids["cancelled"], "cancel", {"reason": "the client changed its mind"})
        await api.status(ids["rejected"], "PENDING_APPROVAL")
        await api.act(ids["rejected"], "reject", {"reason": "an operator said no"})
        for name, status in (
            ("settled", "SETTLED"),
            ("declined", "DECLINED"),
            ("rejected", "REJECTED"),
            ("cancelled", "CANCELLED"),
        ):
            await api.status(ids[name], status)
        # The read side, as readers see it once the projector has caught up.
        await _caught_up(store)
        middle = datetime.now(UTC)
        for account in (*accounts.customers, accounts.merchant):
            await api.read_balance(account)
            await api.read_entries(account)
            await api.read_balance_as_of(account, started + (middle - started) / 2)
            await api.read_balance_as_of(account, middle)
        history.close()
        write_run_info(
            run_dir,
            RunInfo(
                seed=7,
                started_at=rfc3339(started),
                ended_at=rfc3339(datetime.now(UTC)),
                api_url="http://paysaga",
                currency=CURRENCY,
                accounts=accounts,
                faults_requested=[],
                duration_s=1.0,
                ops_max=10,
                data_dir=None,
                run_tag=f"test-{uuid.uuid4().hex[:6]}",
            ),
        )
        try:
            yield Run(run_dir, settings, ids, accounts)
        finally:
            # Discrepancy workflow ids derive from what they name (a line id, a seq), so a
            # later test's database can name the same: leave none running on this queue.
            await _terminate_running(temporal_client, settings.task_queue)


async def _terminate_running(client: Client, task_queue: str) -> None:
    query = f"ExecutionStatus = 'Running' AND TaskQueue = '{task_queue}'"
    async for execution in client.list_workflows(query):
        with contextlib.suppress(RPCError):
            await client.get_workflow_handle(execution.id).terminate("the test is over")


async def _caught_up(store: EventStore) -> None:
    for _ in range(200):
        if all(lag.events == 0 for lag in await ReadModels(store.engine).lags()):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the projector did not catch up")


def _broken(report: CheckReport) -> dict[str, list[str]]:
    return {i.name: i.examples for i in report.invariants if not i.valid}


def _records(run: Run) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run.run_dir / HISTORY_FILE).read_text().splitlines()]


def _edited_history(run: Run, name: str, edit: Any) -> Path:
    """A copy of the run whose history `edit` changed (records in, records out)."""
    copy = run.run_dir.parent / name
    shutil.copytree(run.run_dir, copy)
    path = copy / HISTORY_FILE
    records = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in edit(records)))
    return copy


async def test_the_checker_finds_a_clean_run_valid_and_names_what_breaks_it(
    run: Run, database: IsolatedDatabase, store: EventStore
) -> None:
    settings = run.settings
    clean = await check_run(run.run_dir, settings, quiesce_timeout_s=60)
    assert clean.valid, "\n".join(clean.lines())
    assert [i.name for i in clean.invariants] == [name for name, _ in INVARIANTS]
    for invariant in clean.invariants:
        assert invariant.checked > 0, invariant.name
    assert clean.quiescence.reached and len(clean.quiescence.sweeps) == 1
    assert clean.payments["per_state"] == {
        "cancelled": 1,
        "declined": 1,
        "rejected": 1,
        "settled": 3,  # two fundings and one payment
    }
    recon = clean.facts["reconciliation"]
    assert recon["report_lines"] == 3 and recon["discrepancies"] == 0
    assert clean.facts["historical_balances"]["observed"] == 6

    # --- the history: what the clients and readers saw --------------------------------------
    def lies(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for record in records:
            if record["type"] == "read" and record["what"] == "balance":
                record = {**record, "available": -5}
            if record["type"] == "read" and record["what"] == "balance_as_of":
                record = {**record, "posted": record["posted"] + 1}
            if record["type"] == "submit" and record["key"] == "pay-1":
                record = {**record, "payment_ids": [record["payment_id"], "pay-other"]}
            out.append(record)
        lost = {**records[-1], "type": "submit", "key": "pay-9", "payment_id": "pay-lost"}
        lost.update(acked=True, final_status_code=202, purpose="load")
        approve = {"type": "op", "t": 1.0, "t_end": 1.0, "op": "approve", "status_code": 202}
        approve.update(payment_id=run.ids["rejected"], attempts=1)
        return [*out, lost, approve]

    # And a bound on a payment's life that none of them met.
    report = await check_run(
        _edited_history(run, "lies", lies),
        settings,
        quiesce_timeout_s=0,
        reconcile=False,
        close_bound_s=0.001,
    )
    broken = _broken(report)
    assert set(broken) == {
        "no-overdraft",
        "read-models",
        "no-duplicates",
        "payments-close",
        "decisions",
        "reconciliation",  # not checked (--no-reconcile) is not valid either
    }, broken
    assert "below its limit" in broken["no-overdraft"][0]
    assert "the fold gives" in broken["read-models"][0]
    assert "pay-other" in broken["no-duplicates"][0]
    assert "pay-lost" in broken["payments-close"][0] and "lost" in broken["payments-close"][0]
    late = f"payment {run.ids['settled']} took "
    assert any(m.startswith(late) and "more than the bound" in m for m in broken["payments-close"])
    assert "accepted 'approve'" in broken["decisions"][0]

    async def check() -> dict[str, list[str]]:
        report = await check_run(run.run_dir, settings, quiesce_timeout_s=0, reconcile=False)
        return {k: v for k, v in _broken(report).items() if k != "reconciliation"}

    # --- the processor: an extra void of a voided authorization, a void of a captured one, --
    # and a settled payment (a funding) whose capture it has no record of
    owner = to_libpq_url(database.urls.owner_url)
    funding = next(r["payment_id"] for r in _records(run) if r.get("purpose") == "funding")
    with psycopg.connect(owner, autocommit=True) as conn:
        for payment in (run.ids["rejected"], run.ids["settled"]):
            conn.execute(
                "INSERT INTO processor_calls (payment_id, operation, outcome, attempt) "
                "VALUES (%s, 'void', 'voided', 9)",
                (payment,),
            )
        hidden = conn.execute(
            "UPDATE processor_calls SET outcome = 'hidden' "
            "WHERE payment_id = %s AND operation = 'capture' AND outcome = 'captured'",
            (funding,),
        )
        assert hidden.rowcount == 1
    broken = await check()
    assert set(broken) == {"processor"}, broken
    assert any(run.ids["rejected"] in m and "voided 2 time(s)" in m for m in broken["processor"])
    assert any(run.ids["settled"] in m and "voided 1 time(s)" in m for m in broken["processor"])
    assert f"payment {funding} (settled) was captured 0 time(s)" in "\n".join(broken["processor"])
    with psycopg.connect(owner, autocommit=True) as conn:
        conn.execute("DELETE FROM processor_calls WHERE attempt = 9")
        conn.execute("UPDATE processor_calls SET outcome = 'captured' WHERE outcome = 'hidden'")
    assert await check() == {}

    # --- a hold nobody releases: a payment reserved in the ledger, with no workflow --------
    leak = Payment(store, "cust-1", "merchant", 4_200, CURRENCY)
    await leak.run("initiated", "authorized", "reserved")
    broken = await check()
    assert set(broken) == {"no-hold-leaks", "payments-close"}, broken
    assert (
        f"payment {leak.payment_id} (reserved) still holds 4200 of cust-1"
        in broken["no-hold-leaks"][0]
    )
    assert any("cust-1 has 4200 pending debits" in m for m in broken["no-hold-leaks"])
    assert f"payment {leak.payment_id} is stuck in reserved" in broken["payments-close"][0]

    # --- a read model that does not converge: a transaction holds its checkpoint, so the --
    # projector cannot apply what comes next (the leaked payment, closed as the sweeper
    # would close it)
    stuck = next(iter(READ_MODELS))
    with psycopg.connect(owner) as conn:
        conn.execute(
            "SELECT last_seq FROM projection.checkpoints WHERE projection = %s FOR UPDATE",
            (stuck,),
        )
        await leak.run("released", "voided", "failed")
        report = await check_run(
            run.run_dir, settings, quiesce_timeout_s=QUIET_WAIT_S, reconcile=False
        )
    broken = {k: v for k, v in _broken(report).items() if k != "reconciliation"}
    assert set(broken) == {"quiescence", "read-models"}, broken
    assert "read models behind the ledger" in broken["quiescence"][0]
    assert broken["read-models"][0].startswith(f"read model {stuck} is ")
    assert "it does not converge" in broken["read-models"][0]
    assert await check() == {}

    # --- positions moved around the ledger's function -------------------------------------
    with psycopg.connect(owner, autocommit=True) as conn:
        conn.execute(
            "UPDATE positions SET credits_posted = credits_posted + 1 "
            "WHERE account_id = 'merchant' AND stripe = 0"
        )
    broken = await check()
    assert set(broken) == {"positions", "conservation"}, broken
    assert "merchant" in broken["positions"][0] and "position-mismatch" in broken["positions"][0]
    assert "posted balances sum to 1" in broken["conservation"][0]
    with psycopg.connect(owner, autocommit=True) as conn:
        conn.execute(
            "UPDATE positions SET credits_posted = credits_posted - 1 "
            "WHERE account_id = 'merchant' AND stripe = 0"
        )
    assert await check() == {}

    # --- history rewritten: a payment's reference changed, then an event forged ------------
    as_owner(
        database,
        (
            "UPDATE events SET payload = jsonb_set(payload, '{reference}', '\"pay-x\"') "
            "WHERE stream_id = %s AND event_type = 'PaymentInitiated'",
            (f"payment-{run.ids['declined']}",),
        ),
    )
    broken = await check()
    assert set(broken) == {"seal-and-chains", "read-models"}, broken
    assert "hash-mismatch" in broken["seal-and-chains"][0]
    assert any("reference" in m for m in broken["read-models"])
    as_owner(
        database,
        (
            "INSERT INTO events (stream_id, stream_version, event_id, event_type, "
            "schema_version, payload, actor, recorded_at, prev_hash, hash, hash_scheme) "
            "VALUES (%s, 6, %s, 'PaymentSettled', 1, %s, 'mallory', now(), "
            "decode(repeat('00', 32), 'hex'), decode(repeat('11', 32), 'hex'), 2)",
            (
                f"payment-{run.ids['settled']}",
                uuid.uuid4(),
                json.dumps({"payment_id": run.ids["settled"], "currency": CURRENCY}),
            ),
        ),
    )
    broken = await check()
    assert {"seal-and-chains", "state-machines", "no-duplicates"} <= set(broken), broken
    assert any("repeated-event-type" in m for m in broken["no-duplicates"])
    twice = f"payment {run.ids['settled']} has 2 terminal events"
    assert any(m.startswith(twice) for m in broken["payments-close"]), broken

    # --- reconciliation: it now finds the drift, and a capture the ledger never settled ----
    with psycopg.connect(owner, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO processor_authorizations (payment_id, authorization_id, amount_minor, "
            "currency, status) VALUES ('pay-ghost', 'auth-ghost', 1234, %s, 'captured')",
            (CURRENCY,),
        )
        conn.execute(
            "INSERT INTO processor_captures (payment_id, capture_id, authorization_id, "
            "amount_minor, currency) VALUES ('pay-ghost', 'cap-ghost', 'auth-ghost', 1234, %s)",
            (CURRENCY,),
        )
    report = await check_run(run.run_dir, settings, quiesce_timeout_s=0)
    broken = _broken(report)
    assert any("pay-ghost" in m for m in broken["processor"]), broken["processor"]
    found = broken["reconciliation"]
    assert any(m.startswith("missing_in_ledger") and "pay-ghost" in m for m in found), found
    assert any(m.startswith("internal_drift") for m in found), found


async def test_the_command_writes_check_json_and_exits_by_the_verdict(
    run: Run, database: IsolatedDatabase
) -> None:
    settings = run.settings
    env = clean_env(
        DATABASE_URL=database.urls.owner_url,
        DATABASE_APP_URL=database.urls.app_url,
        TEMPORAL_ADDRESS=settings.temporal_target,
        TEMPORAL_NAMESPACE=settings.temporal_namespace,
        PAYSAGA_TASK_QUEUE=settings.task_queue,
    )

    async def command(run_dir: Path, *options: str) -> tuple[int, str]:
        # A process of its own, which leaves the loop the worker runs on free.
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "paysaga", "chaos", "check", str(run_dir), *options),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        return process.returncode, out.decode()

    code, out = await command(run.run_dir, "--quiesce-timeout-s", "30")
    assert code == 0, out
    written = json.loads((run.run_dir / CHECK_FILE).read_text())
    assert written["valid?"] is True
    assert set(written["invariants"]) == {name for name, _ in INVARIANTS}
    assert written["quiescence"]["reached"] is True
    assert "valid? true" in out

    # Everything holds, but reconciliation was not checked: not valid, and it says why.
    code, out = await command(run.run_dir, "--quiesce-timeout-s", "0", "--no-reconcile")
    assert code == 1, out
    invariants = json.loads((run.run_dir / CHECK_FILE).read_text())["invariants"]
    assert [k for k, v in invariants.items() if not v["valid?"]] == ["reconciliation"]
    assert invariants["reconciliation"]["first"] == "not checked: skipped (--no-reconcile)"
    assert "valid? false" in out

    code, out = await command(run.run_dir.parent / "missing")
    assert code == 2, out
