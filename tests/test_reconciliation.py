"""Reconciliation end to end, with a real PostgreSQL, a real Temporal and the worker's
real activities: statements arrive (upload, inbox), runs match them against real
settled payments, every discrepancy is found once, recorded in the ledger and worked by
its own workflow, and operators resolve them through the API."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client, WorkflowExecutionDescription, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from activities.settlement_report import build_settlement_report
from api.app import create_app
from ledger.db import to_libpq_url
from ledger.events import ReconciliationCompleted
from ledger.money import format_amount
from ledger.store import EventStore
from paysaga.reconciliation import discrepancy_workflow_id, open_case, start_run, watch_inbox
from paysaga.settings import Settings
from recon.formats import parse_statement
from recon.formats.build import bank_line, build_bai2, build_camt053, build_mt940, statement
from recon.store import ingest
from tests.harness.api import Api, make_keys, serve
from tests.harness.ledger import Payment, as_owner, seal_until_everything_is_sealed
from tests.harness.operators import Gate, gated_worker, temporal_cli
from tests.harness.postgres import IsolatedDatabase
from tests.harness.read_side import project
from tests.harness.saga import Payments
from tests.harness.stack import clean_env, paysaga
from worker import build_worker, worker_activities
from workflows.reconciliation_models import DiscrepancyCase
from workflows.search_attributes import DISCREPANCY_TYPE

# An uploaded statement's discrepancies are in the ledger within this: the upload test
# asserts it (measured 1.3 to 1.6 s, and printed in the test's output).
STREAMING_DEADLINE_S = 10.0
# How long a test waits for events, workflows and fixes before it fails: generous, so
# that a loaded machine makes a test slow rather than wrong.
EVENTS_WAIT_S = 30.0


@dataclass
class Recon:
    api: Api
    store: EventStore
    settings: Settings
    client: Client

    async def events(self, event_type: str) -> list[Any]:
        return await ledger_events(self.store, event_type)

    async def wait_for_events(self, event_type: str, count: int) -> list[Any]:
        return await wait_for_events(self.store, event_type, count)

    async def resolve(self, discrepancy_id: Any, body: dict[str, Any]) -> Any:
        return await self.api.post(
            f"/v1/discrepancies/{discrepancy_id}/resolve",
            body,
            caller="ops",
            idempotency_key=None,
        )

    async def upload(self, name: str, content: bytes) -> Any:
        return await self.api.http.post(
            "/v1/statements",
            files={"file": (name, content, "text/csv")},
            headers=self.api.headers("ops"),
        )


async def ledger_events(store: EventStore, event_type: str) -> list[Any]:
    """Every event of this type in the ledger, in order."""
    found: list[Any] = []
    after = 0
    while True:
        batch = await store.read_range(after_seq=after, limit=1000)
        if not batch:
            return found
        found += [e for e in batch if e.event_type == event_type]
        after = batch[-1].global_seq


async def wait_for_events(store: EventStore, event_type: str, count: int) -> list[Any]:
    """The events of this type once there are `count` of them (or at the deadline)."""
    deadline = time.monotonic() + EVENTS_WAIT_S
    while True:
        found = await ledger_events(store, event_type)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.1)


async def describe_when_started(client: Client, workflow_id: str) -> WorkflowExecutionDescription:
    """The workflow's description, once it has been started (within the deadline)."""
    deadline = time.monotonic() + EVENTS_WAIT_S
    while True:
        try:
            return await client.get_workflow_handle(workflow_id).describe()
        except RPCError as error:
            if error.status != RPCStatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.1)


@pytest.fixture
async def recon(
    request: pytest.FixtureRequest,
    temporal_client: Client,
    bank: EventStore,
    settings: Settings,
    task_queue: str,
    owner_engine: AsyncEngine,
) -> AsyncIterator[Recon]:
    """A worker with every activity on the test's queue, its inbox watch, and the API.
    Settlements count as missing from statements at once (no settlement window), and
    any open payment with no workflow is internal drift at once. A test parametrised
    indirectly with a dict of settings changes them (a settlement window, say)."""
    changes = {"recon_settlement_window_s": 0, "sweep_idle_s": 0, **getattr(request, "param", {})}
    settings = settings.model_copy(update=changes)
    activities = worker_activities(bank, temporal_client, settings)
    stop = asyncio.Event()
    async with build_worker(
        temporal_client, settings, task_queue=task_queue, activities=activities
    ):
        watcher = asyncio.create_task(watch_inbox(temporal_client, settings, stop))
        keys = await make_keys(owner_engine, settings.api_key_secret.get_secret_value())
        app = create_app(settings, store=bank, temporal_client=temporal_client)
        try:
            async with serve(app) as http:
                yield Recon(Api(http, keys), bank, settings, temporal_client)
        finally:
            stop.set()
            await watcher


def _major(amount_minor: int, currency: str) -> str:
    return format_amount(amount_minor, currency).split(" ")[0]


def processor_csv(lines: list[tuple[date, str, int, str]]) -> bytes:
    """The processor's settlement report: captures, in its own CSV format."""
    rows = ["date,reference,amount,currency,type"]
    rows += [
        f"{d.isoformat()},{ref},{_major(amount, cur)},{cur},capture"
        for d, ref, amount, cur in lines
    ]
    return ("\n".join(rows) + "\n").encode()


async def _settled_lines(recon: Recon) -> dict[str, tuple[date, str, int, str]]:
    """Every settlement in the ledger, as the processor would report it."""
    lines = {}
    for event in await recon.events("PaymentSettled"):
        payload = event.payload
        debit = sum(p["amount_minor"] for p in payload["postings"] if p["side"] == "debit")
        day = event.recorded_at.astimezone(UTC).date()
        lines[payload["payment_id"]] = (day, payload["payment_id"], debit, payload["currency"])
    return lines


async def test_an_uploaded_statement_is_matched_within_seconds_and_each_discrepancy_found_once(
    recon: Recon,
) -> None:
    store = recon.store
    ok = [Payment(store, "alice", "bob", 1_000 + i) for i in range(3)]
    wrong_amount = Payment(store, "alice", "bob", 2_000)
    wrong_currency = Payment(store, "alice", "bob", 3_000)
    duplicated = Payment(store, "alice", "bob", 4_000)
    missing = Payment(store, "alice", "bob", 5_000)
    for payment in [*ok, wrong_amount, wrong_currency, duplicated, missing]:
        await payment.settle_fully()
    settled = await _settled_lines(recon)
    day = next(iter(settled.values()))[0]
    lines = [v for k, v in settled.items() if k not in {missing.payment_id}]
    lines = [
        (
            d,
            ref,
            amount + 50 if ref == wrong_amount.payment_id else amount,
            "USD" if ref == wrong_currency.payment_id else cur,
        )
        for d, ref, amount, cur in lines
    ]
    lines.append((day, duplicated.payment_id, 4_000, "EUR"))
    lines.append((day, "ghost-payment", 777, "EUR"))
    content = processor_csv(lines)

    started = time.monotonic()
    uploaded = await recon.upload("report-1.csv", content)
    assert uploaded.status_code == 201, uploaded.text
    assert uploaded.json()["lines_new"] == len(lines)
    detected = await recon.wait_for_events("DiscrepancyDetected", 5)
    elapsed_s = time.monotonic() - started
    print(f"\nupload to the 5th DiscrepancyDetected: {elapsed_s:.2f} s")
    by_type = {e.payload["discrepancy_type"]: e.payload for e in detected}
    assert len(detected) == 5, [e.payload for e in detected]
    assert elapsed_s < STREAMING_DEADLINE_S, f"{elapsed_s:.2f} s from upload to ledger"
    assert by_type["amount_mismatch"]["payment_id"] == wrong_amount.payment_id
    assert by_type["amount_mismatch"]["statement_amount_minor"] == 2_050
    assert by_type["amount_mismatch"]["ledger_amount_minor"] == 2_000
    assert by_type["currency_mismatch"]["payment_id"] == wrong_currency.payment_id
    assert by_type["currency_mismatch"]["statement_currency"] == "USD"
    assert by_type["duplicate_in_statement"]["reference"] == duplicated.payment_id
    assert by_type["missing_in_statement"]["payment_id"] == missing.payment_id
    assert by_type["missing_in_ledger"]["reference"] == "ghost-payment"
    completed = await recon.wait_for_events("ReconciliationCompleted", 1)
    assert completed[0].payload["discrepancies"] == 5

    # The same file again adds nothing; a new incremental run finds nothing new.
    again = await recon.upload("report-1-again.csv", content)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    handle = await start_run(recon.client, recon.settings, kind="manual")
    report = await handle.result()
    assert report.discrepancies == 0, report
    assert len(await recon.events("DiscrepancyDetected")) == 5

    # Operators read the run, its report and the open discrepancies.
    run_id = completed[0].payload["run_id"]
    run = await recon.api.get(f"/v1/reconciliations/{run_id}", caller="ops")
    assert run.status_code == 200, run.text
    assert {d["type"] for d in run.json()["discrepancies"]} == set(by_type)
    page = await recon.api.get(f"/v1/reconciliations/{run_id}/report", caller="ops")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "data:image/png;base64," in page.text and "amount mismatch" in page.text
    listed = await recon.api.get("/v1/discrepancies", caller="ops", params={"status": "open"})
    assert listed.status_code == 200
    open_ = {d["type"]: d for d in listed.json()["discrepancies"]}
    assert set(open_) == set(by_type)
    assert "2,050" not in open_["amount_mismatch"]["summary"]
    assert "20.50 EUR" in open_["amount_mismatch"]["summary"]
    assert (await recon.api.get("/v1/discrepancies", caller="client")).status_code == 403

    # Each has its workflow, found in the Temporal UI by DiscrepancyType, headed by the
    # problem in a sentence, and naming the payment's workflow where there is a payment.
    for type_, listed_one in open_.items():
        described = await describe_when_started(recon.client, f"discrepancy-{listed_one['id']}")
        assert described.typed_search_attributes.get(DISCREPANCY_TYPE) == type_
        assert await described.static_summary() == listed_one["summary"]
        details = await described.static_details() or ""
        payment_id = by_type[type_]["payment_id"]
        if payment_id is None:
            assert "payment-" not in details, details
        else:
            assert f"Payment workflow: payment-{payment_id}" in details, details
    assert by_type["missing_in_ledger"]["payment_id"] is None

    # An operator resolves one: the workflow records it in the ledger, once.
    target = open_["amount_mismatch"]["id"]
    resolved = await recon.resolve(
        target, {"resolution": "accepted", "note": "the processor charged a 0.50 surcharge"}
    )
    assert resolved.status_code == 200, resolved.text
    assert resolved.json()["resolution"] == "accepted"
    events = await recon.events("DiscrepancyResolved")
    assert [e.payload["discrepancy_id"] for e in events] == [target]
    twice = await recon.resolve(target, {"resolution": "written_off", "note": "again"})
    assert twice.status_code == 409
    automatic = await recon.resolve(
        open_["missing_in_ledger"]["id"],
        {"resolution": "posted_capture", "note": "not mine to choose"},
    )
    assert automatic.status_code == 422
    assert len(await recon.events("DiscrepancyResolved")) == 1

    # Its case opened again (a later run's `recon.open_cases`, as when a second ledger met
    # the same Temporal): the completed workflow comes back, not started again, not failed.
    resolved_workflow = recon.client.get_workflow_handle(discrepancy_workflow_id(target))
    await resolved_workflow.result()
    first_run = (await resolved_workflow.describe()).run_id
    case = DiscrepancyCase(
        discrepancy_id=target,
        run_id=run_id,
        discrepancy_type="amount_mismatch",
        payment_id=wrong_amount.payment_id,
        summary=open_["amount_mismatch"]["summary"],
    )
    reopened = await open_case(recon.client, recon.settings.task_queue, case)
    described = await reopened.describe()
    assert described.run_id == first_run
    assert described.status == WorkflowExecutionStatus.COMPLETED
    assert (await reopened.result()).resolution == "accepted"
    assert len(await recon.events("DiscrepancyResolved")) == 1


@pytest.mark.parametrize(
    "recon", [{"recon_settlement_window_s": 3_600}], indirect=True, ids=["window-1h"]
)
async def test_a_late_settlement_inside_the_window_raises_nothing_and_matches_when_it_arrives(
    recon: Recon, task_queue: str
) -> None:
    """The simulator settles a capture late, in the next window's report. Inside the
    settlement window (here an hour) a settlement on no statement yet is not missing:
    the first report raises nothing, and the next one matches it. (Past the window it is
    `missing_in_statement` until its line comes: see the simulator's report test.)"""
    payments = Payments(recon.client, recon.store, task_queue)
    start = datetime.now(UTC) - timedelta(minutes=1)
    outcomes = [await payments.run("alice", "bob", 1_500 * (i + 1)) for i in range(2)]
    assert {o.status for o in outcomes} == {"SETTLED"}
    end = datetime.now(UTC) + timedelta(minutes=1)
    first = await build_settlement_report(recon.store.engine, start, end, inject={"late": 1})
    (late,) = first.touched("late")
    on_time = {o.payment_id for o in outcomes} - {late}
    assert {line.reference for line in first.lines} == on_time
    assert (await recon.upload("window-1.csv", first.content)).status_code == 201
    completed = await recon.wait_for_events("ReconciliationCompleted", 1)
    assert completed[0].payload["lines_matched"] == 1
    assert completed[0].payload["discrepancies"] == 0

    # The next window's report holds the late capture, settled when the first closed.
    second = await build_settlement_report(recon.store.engine, end, end + timedelta(minutes=1))
    assert second.late_arrivals == (late,)
    assert [line.reference for line in second.lines] == [late]
    assert (await recon.upload("window-2.csv", second.content)).status_code == 201
    completed = await recon.wait_for_events("ReconciliationCompleted", 2)
    assert completed[1].payload["lines_matched"] == 1
    assert completed[1].payload["discrepancies"] == 0
    assert await recon.events("DiscrepancyDetected") == []
    assert await recon.events("DiscrepancyResolved") == []


async def test_a_file_dropped_in_the_inbox_is_ingested_matched_and_moved(recon: Recon) -> None:
    inbox = recon.settings.recon_inbox_path
    settled = await _settled_lines(recon)
    extra = [(next(iter(settled.values()))[0], "nobody-paid-this", 999, "EUR")]
    (inbox / "report.csv").write_bytes(processor_csv([*settled.values(), *extra]))
    (inbox / "broken.csv").write_bytes(
        b"date,reference,amount,currency,type\n2026-11-24,x,12.3x,EUR,capture\n"
    )
    detected = await recon.wait_for_events("DiscrepancyDetected", 1)
    assert [e.payload["reference"] for e in detected] == ["nobody-paid-this"]
    for _ in range(100):
        if (inbox / "done" / "report.csv").exists() and (inbox / "refused" / "broken.csv").exists():
            break
        await asyncio.sleep(0.1)
    assert (inbox / "done" / "report.csv").exists()
    reason = (inbox / "refused" / "broken.csv.error.txt").read_text()
    assert "line 2" in reason, reason
    assert not (inbox / "report.csv").exists()


async def test_a_malformed_upload_is_refused_whole_and_changes_nothing(recon: Recon) -> None:
    settled = await _settled_lines(recon)
    good = processor_csv(list(settled.values()))
    truncated = good + b"2026-11-24,p-x,12.5"
    refused = await recon.upload("truncated.csv", truncated)
    assert refused.status_code == 422, refused.text
    assert refused.json()["code"] == "invalid_statement"
    assert "line" in refused.json()["detail"]
    handle = await start_run(recon.client, recon.settings, kind="manual")
    report = await handle.result()
    # Nothing of the refused file was ingested: every settlement is missing from statements.
    assert report.counts.get("lines_considered", 0) == 0
    assert report.counts.get("missing_in_statement", 0) == len(settled)


async def test_an_open_payment_whose_workflow_is_gone_is_internal_drift_found_once(
    recon: Recon,
) -> None:
    stranded = Payment(
        recon.store, "alice", "bob", 7_000, payment_id=f"stranded-{uuid.uuid4().hex[:6]}"
    )
    await stranded.run("initiated", "authorized", "reserved")
    first = await (await start_run(recon.client, recon.settings, kind="manual")).result()
    assert first.counts["internal_drift"] == 1, first
    drift = [
        e.payload
        for e in await recon.events("DiscrepancyDetected")
        if e.payload["discrepancy_type"] == "internal_drift"
    ]
    assert [d["payment_id"] for d in drift] == [stranded.payment_id]
    assert "unknown to Temporal" in drift[0]["description"]
    second = await (await start_run(recon.client, recon.settings, kind="manual")).result()
    assert second.counts["internal_drift"] == 0
    # Close it, so that the ledger the fixture checks has no open payment left behind.
    await stranded.run("released", "voided", "failed")
    assert ReconciliationCompleted.event_type == "ReconciliationCompleted"


async def test_each_run_verifies_the_seal_from_the_block_the_last_one_reached(
    recon: Recon, database: IsolatedDatabase
) -> None:
    async def checkpoints() -> list[tuple[int, bool]]:
        async with await psycopg.AsyncConnection.connect(
            to_libpq_url(database.urls.owner_url)
        ) as conn:
            cursor = await conn.execute(
                "SELECT block_no, full_run FROM recon.seal_verifications ORDER BY block_no"
            )
            return [(int(row[0]), bool(row[1])) for row in await cursor.fetchall()]

    async def run(*, full: bool = False) -> Any:
        return await (
            await start_run(recon.client, recon.settings, kind="manual", full=full)
        ).result()

    await Payment(recon.store, "alice", "bob", 100).settle_fully()
    await seal_until_everything_is_sealed(recon.store)
    await run(full=True)
    (full_block, was_full), *_ = reversed(await checkpoints())
    assert was_full

    later = Payment(recon.store, "alice", "bob", 200)
    await later.settle_fully()
    await seal_until_everything_is_sealed(recon.store)
    assert (await run()).counts["internal_drift"] == 0
    reached, was_full = (await checkpoints())[-1]
    assert reached > full_block and not was_full

    # An event sealed after the last verified block, changed: the next run finds it.
    newest = Payment(recon.store, "alice", "bob", 300)
    await newest.settle_fully()
    await seal_until_everything_is_sealed(recon.store)
    victim = (await recon.store.read_stream(newest.stream_id))[-1]
    as_owner(
        database,
        ("UPDATE events SET actor = 'mallory' WHERE global_seq = %s", (victim.global_seq,)),
    )
    try:
        found = await run()
        assert found.counts["internal_drift"] >= 1, found
        drift = [
            e.payload["description"]
            for e in await recon.events("DiscrepancyDetected")
            if e.payload["discrepancy_type"] == "internal_drift"
        ]
        assert any("ledger seal, hash-mismatch" in d and victim.stream_id in d for d in drift), (
            drift
        )
        assert (await checkpoints())[-1][0] == reached, "a failed verification moves nothing"
    finally:
        as_owner(
            database,
            (
                "UPDATE events SET actor = %s WHERE global_seq = %s",
                (victim.actor, victim.global_seq),
            ),
        )


def test_the_inbox_lives_in_the_data_directory(settings: Settings, tmp_path: Path) -> None:
    assert settings.recon_inbox_path == (settings.data_dir / "inbox").resolve()


# --- the processor simulator's own report ---------------------------------------------------
async def test_the_simulators_report_with_every_injected_kind_is_found_as_its_manifest_says(
    recon: Recon, task_queue: str
) -> None:
    payments = Payments(recon.client, recon.store, task_queue)
    start = datetime.now(UTC) - timedelta(minutes=1)
    outcomes = [await payments.run("alice", "bob", 1_000 * (i + 1)) for i in range(7)]
    assert {o.status for o in outcomes} == {"SETTLED"}
    end = datetime.now(UTC) + timedelta(minutes=1)
    kinds = ("missing", "extra", "wrong_amount", "wrong_currency", "duplicate", "late")
    report = await build_settlement_report(
        recon.store.engine, start, end, inject=dict.fromkeys(kinds, 1), seed=7
    )
    uploaded = await recon.upload("simulator.csv", report.content)
    assert uploaded.status_code == 201, uploaded.text
    funding = {  # settled in the ledger by the fixture, never captured at the processor
        p for p in (await _settled_lines(recon)) if p not in {o.payment_id for o in outcomes}
    }
    (late,) = report.touched("late")
    expected = {
        ("missing_in_statement", report.touched("missing")[0]),
        ("amount_mismatch", report.touched("wrong_amount")[0]),
        ("currency_mismatch", report.touched("wrong_currency")[0]),
        ("duplicate_in_statement", report.touched("duplicate")[0]),
        ("missing_in_ledger", report.touched("extra")[0]),
        # With no settlement window (this fixture's), a capture settled late is missing
        # at once; inside a window it is not (the test above).
        ("missing_in_statement", late),
        *{("missing_in_statement", p) for p in funding},
    }
    detected = await recon.wait_for_events("DiscrepancyDetected", len(expected))
    found = {
        (e.payload["discrepancy_type"], e.payload["payment_id"] or e.payload["reference"])
        for e in detected
    }
    assert found == expected
    assert len(detected) == len(expected)

    # The late capture comes in the next window's report: it matches, the workflow of
    # the discrepancy it had raised closes it, and nothing new is found.
    (late_missing,) = [
        e.payload["discrepancy_id"]
        for e in detected
        if (e.payload["discrepancy_type"], e.payload["payment_id"])
        == ("missing_in_statement", late)
    ]
    following = await build_settlement_report(recon.store.engine, end, end + timedelta(minutes=1))
    assert following.late_arrivals == (late,)
    assert (await recon.upload("simulator-next.csv", following.content)).status_code == 201
    resolved = await recon.wait_for_events("DiscrepancyResolved", 1)
    assert [(e.payload["discrepancy_id"], e.payload["resolution"]) for e in resolved] == [
        (late_missing, "matched_later")
    ]
    completed = await recon.wait_for_events("ReconciliationCompleted", 2)
    assert completed[-1].payload["lines_matched"] == 1
    assert completed[-1].payload["discrepancies"] == 0
    assert len(await recon.events("DiscrepancyDetected")) == len(expected)


async def test_a_capture_the_ledger_never_posted_is_posted_by_its_discrepancy_workflow(
    temporal_client: Client,
    bank: EventStore,
    settings: Settings,
    task_queue: str,
    owner_engine: AsyncEngine,
) -> None:
    """The saga captured, then its workflow was terminated before PaymentSettled landed:
    the processor's report shows a capture the ledger lacks. Its DiscrepancyWorkflow
    posts the settlement (the saga's own event) and closes the discrepancy itself."""
    gate = Gate("settle")
    recon_settings = settings.model_copy(
        update={"task_queue": f"{task_queue}-recon", "recon_settlement_window_s": 3_600}
    )
    start = datetime.now(UTC) - timedelta(minutes=1)
    async with gated_worker(temporal_client, bank, settings, task_queue, gate) as payments:
        handle = await payments.start("alice", "bob", 4_000)
        await gate.reached.wait()
        payment_id = handle.id.removeprefix("payment-")
        temporal_cli(
            temporal_client, "workflow", "terminate", "--workflow-id", handle.id, "--reason", "x"
        )
        activities = worker_activities(bank, temporal_client, recon_settings)
        worker = build_worker(
            temporal_client,
            recon_settings,
            task_queue=recon_settings.task_queue,
            activities=activities,
        )
        async with worker:
            report = await build_settlement_report(
                bank.engine, start, datetime.now(UTC) + timedelta(minutes=1)
            )
            assert report.settled == (payment_id,)
            # A refund naming the same payment is no evidence of its capture: it is left
            # to an operator, never auto-fixed.
            refund = f"{datetime.now(UTC).date().isoformat()},{payment_id},40.00,USD,refund\n"
            parsed = parse_statement(report.content + refund.encode(), "report.csv")
            conn = await psycopg.AsyncConnection.connect(
                to_libpq_url(settings.database_app_url or ""), autocommit=True
            )
            try:
                await ingest(conn, parsed, source="simulator", filename="report.csv")
            finally:
                await conn.close()
            run = await (await start_run(temporal_client, recon_settings)).result()
            assert run.counts["missing_in_ledger"] == 2, run
            resolved = await wait_for_events(bank, "DiscrepancyResolved", 1)
        gate.opened.set()
    assert [e.payload["resolution"] for e in resolved] == ["posted_capture"]
    assert resolved[0].payload["evidence_line_id"] is not None
    detected = await bank.read_stream(f"recon-{run.run_id}")
    by_id = {
        e.payload["discrepancy_id"]: e.payload
        for e in detected
        if e.event_type == "DiscrepancyDetected"
    }
    fixed = by_id.pop(resolved[0].payload["discrepancy_id"])
    assert fixed["statement_amount_minor"] == 4_000
    assert [d["statement_amount_minor"] for d in by_id.values()] == [-4_000]
    stream = await bank.read_stream(f"payment-{payment_id}")
    assert [e.event_type for e in stream][-1] == "PaymentSettled"
    assert (await bank.get_position("bob")).credits_posted == 4_000
    # The next run matches the line to the settlement now posted: nothing new.
    async with build_worker(
        temporal_client,
        recon_settings,
        task_queue=recon_settings.task_queue,
        activities=worker_activities(bank, temporal_client, recon_settings),
    ):
        again = await (await start_run(temporal_client, recon_settings)).result()
    assert again.discrepancies == 0


async def test_the_simulators_export_is_ingested_and_matched_from_the_cli(
    recon: Recon, task_queue: str, database: IsolatedDatabase, owner_engine: AsyncEngine
) -> None:
    payments = Payments(recon.client, recon.store, task_queue)
    outcome = await payments.run("alice", "bob", 2_500)
    assert outcome.status == "SETTLED"
    today = datetime.now(UTC).date()
    env = clean_env(
        DATABASE_URL=database.urls.owner_url,
        TEMPORAL_ADDRESS=recon.settings.temporal_target,
        TEMPORAL_NAMESPACE=recon.settings.temporal_namespace,
        PAYSAGA_TASK_QUEUE=task_queue,
    )
    window = ["--from", today.isoformat(), "--to", (today + timedelta(days=1)).isoformat()]
    result = paysaga("processor", "report", *window, "--ingest", "--out", "/dev/null", env=env)
    assert result.returncode == 0, result.stderr
    assert "ingested 1 line(s)" in result.stderr
    completed = await recon.wait_for_events("ReconciliationCompleted", 1)
    assert completed[0].payload["lines_matched"] == 1
    async with owner_engine.connect() as conn:
        sources = (await conn.execute(text("SELECT source FROM recon.statement_files"))).all()
    assert [row.source for row in sources] == ["simulator"]
    again = paysaga("processor", "report", *window, "--ingest", "--out", "/dev/null", env=env)
    assert again.returncode == 0 and "ingested before" in again.stderr


async def test_hostile_uploads_and_resolutions_get_a_clear_4xx_and_change_nothing(
    recon: Recon, owner_engine: AsyncEngine
) -> None:
    header = b"date,reference,amount,currency,type\n"
    hostile = {
        "empty.csv": b"",
        "nul.csv": header + b"2026-11-24,p-\x00x,12.50,EUR,capture\n",
        "not-utf8.csv": b"\xff\xfe\x00garbage",
        "huge-amount.csv": header + b"2026-11-24,p-x,9" + b"9" * 30 + b".00,EUR,capture\n",
        "fractional.csv": header + b"2026-11-24,p-x,12.505,EUR,capture\n",
        "bad-currency.csv": header + b"2026-11-24,p-x,12.50,XXX,capture\n",
        "injection.csv": header + b"2026-11-24,p');DROP TABLE recon.runs;--,1.00,EUR,capture\n",
        "entity.xml": b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
        b"<Document>&e;</Document>",
    }
    for name, content in hostile.items():
        response = await recon.upload(name, content)
        assert response.status_code in (201, 422), (name, response.status_code, response.text)
        if response.status_code == 422:
            assert response.json()["code"] == "invalid_statement", name
    # Of these, only the quotes in a reference are a readable statement: stored as text.
    async with owner_engine.connect() as conn:
        files = (await conn.execute(text("SELECT filename FROM recon.statement_files"))).all()
    assert [f.filename for f in files] == ["injection.csv"]
    too_big = await recon.api.http.post(
        "/v1/statements",
        files={"file": ("big.csv", header + b"x" * (21 * 1024 * 1024), "text/csv")},
        headers=recon.api.headers("ops"),
    )
    assert too_big.status_code == 413
    no_file = await recon.api.http.post("/v1/statements", headers=recon.api.headers("ops"))
    assert no_file.status_code == 422
    unknown = await recon.resolve(uuid.uuid4(), {"resolution": "accepted", "note": "x"})
    assert unknown.status_code == 404
    for body in (
        {"resolution": "accepted", "note": ""},
        {"resolution": "accepted", "note": "x" * 501},
        {"resolution": "made_up", "note": "x"},
        {"resolution": "accepted"},
    ):
        refused = await recon.resolve(uuid.uuid4(), body)
        assert refused.status_code == 422, (body, refused.text)
    bad_id = await recon.resolve("not-a-uuid", {"resolution": "accepted", "note": "x"})
    assert bad_id.status_code == 422
    for cursor in ("junk", "ZDpub3QtYS1kYXRlfHg", "x" * 121):
        listed = await recon.api.get("/v1/discrepancies", caller="ops", params={"cursor": cursor})
        assert listed.status_code in (400, 422), (cursor, listed.text)
    missing_run = await recon.api.get("/v1/reconciliations/no-such-run", caller="ops")
    assert missing_run.status_code == 404


@pytest.mark.parametrize(
    "statement_format", ["camt.053.001.02", "camt.053.001.08", "mt940", "bai2"]
)
async def test_bank_statements_in_each_format_built_from_real_settlements_are_reconciled(
    recon: Recon, statement_format: str
) -> None:
    store = recon.store
    matched = [Payment(store, "alice", "bob", 1_100 + i) for i in range(2)]
    wrong_amount = Payment(store, "alice", "bob", 2_200)
    duplicated = Payment(store, "alice", "bob", 3_300)
    missing = Payment(store, "alice", "bob", 4_400)
    wrong_currency = Payment(store, "alice", "bob", 5_500)
    for payment in [*matched, wrong_amount, duplicated, missing, wrong_currency]:
        await payment.settle_fully()
    settled = await _settled_lines(recon)
    bai2 = statement_format == "bai2"  # BAI2 carries no end-to-end id: the bank reference

    def line(reference: str, amount_minor: int, day: date, currency: str = "EUR") -> Any:
        if bai2:
            return bank_line(amount_minor, currency, day, bank_reference=reference)
        return bank_line(amount_minor, currency, day, end_to_end_id=reference)

    lines = [
        line(ref, amount + (25 if ref == wrong_amount.payment_id else 0), day)
        for ref, (day, _, amount, _) in settled.items()
        if ref not in (missing.payment_id, wrong_currency.payment_id)
    ]
    day = lines[0].value_date
    lines += [line(duplicated.payment_id, 3_300, day), line("ghost-transfer", 990, day)]
    # A EUR settlement reported in dollars. camt.053 gives each entry its own currency,
    # so the line sits in the EUR statement; MT940 and BAI2 give one currency to a whole
    # statement (account), so the line is in a second, USD statement of the same file.
    in_dollars = line(wrong_currency.payment_id, 5_500, day, "USD")
    account = "NL91ABNA0417164300"
    statement_id = f"stmt-{uuid.uuid4().hex[:8]}"
    if statement_format.startswith("camt"):
        built = [statement(statement_id, account, [*lines, in_dollars], currency="EUR")]
        content = build_camt053(built, version=statement_format.removeprefix("camt.053."))
    else:
        built = [
            statement(statement_id, account, lines, currency="EUR"),
            statement(f"usd-{statement_id[5:]}", "US-OPERATING-2", [in_dollars], currency="USD"),
        ]
        content = build_mt940(built) if statement_format == "mt940" else build_bai2(built)
    assert sum(len(s.lines) for s in parse_statement(content).statements) == len(lines) + 1
    uploaded = await recon.upload(f"statement.{statement_format}", content)
    assert uploaded.status_code == 201, uploaded.text
    assert uploaded.json()["format"] == statement_format

    # The run's DiscrepancyDetected events are appended before its ReconciliationCompleted.
    completed = await recon.wait_for_events("ReconciliationCompleted", 1)
    detected = await recon.events("DiscrepancyDetected")
    found = [
        (e.payload["discrepancy_type"], e.payload["payment_id"] or e.payload["reference"])
        for e in detected
    ]
    assert sorted(found) == sorted(
        [
            ("amount_mismatch", wrong_amount.payment_id),
            ("currency_mismatch", wrong_currency.payment_id),
            ("duplicate_in_statement", duplicated.payment_id),
            ("missing_in_statement", missing.payment_id),
            ("missing_in_ledger", "ghost-transfer"),
        ]
    )
    (currency,) = [
        e.payload for e in detected if e.payload["discrepancy_type"] == "currency_mismatch"
    ]
    assert (currency["statement_currency"], currency["ledger_currency"]) == ("USD", "EUR")
    assert (currency["statement_amount_minor"], currency["ledger_amount_minor"]) == (5_500, 5_500)
    assert completed[0].payload["discrepancies"] == 5
    assert completed[0].payload["lines_matched"] == len(settled) - 3


async def test_open_discrepancies_show_in_the_metrics_and_overdue_ones_raise_the_alert(
    recon: Recon, settings: Settings
) -> None:
    settled = await _settled_lines(recon)
    day = next(iter(settled.values()))[0]
    content = processor_csv([*settled.values(), (day, "stray-capture", 1_234, "EUR")])
    assert (await recon.upload("stray.csv", content)).status_code == 201
    await recon.wait_for_events("DiscrepancyDetected", 1)
    app = recon.api.http._transport.app  # type: ignore[attr-defined]
    await app.state.metrics.refresh_discrepancies(recon.store, overdue_after_s=3_600)
    text_ = (await recon.api.http.get("/metrics")).text
    assert 'paysaga_discrepancies_open{type="missing_in_ledger"} 1.0' in text_
    assert 'paysaga_discrepancies_overdue{type="missing_in_ledger"} 0.0' in text_
    await app.state.metrics.refresh_discrepancies(recon.store, overdue_after_s=0)
    text_ = (await recon.api.http.get("/metrics")).text
    assert 'paysaga_discrepancies_overdue{type="missing_in_ledger"} 1.0' in text_


async def test_paysaga_recon_run_reports_a_run_with_its_counts(
    recon: Recon, task_queue: str, database: IsolatedDatabase
) -> None:
    env = clean_env(
        DATABASE_APP_URL=database.urls.app_url,
        TEMPORAL_ADDRESS=recon.settings.temporal_target,
        TEMPORAL_NAMESPACE=recon.settings.temporal_namespace,
        PAYSAGA_TASK_QUEUE=task_queue,
    )
    # In a thread: the worker that runs the reconciliation shares this event loop.
    result = await asyncio.to_thread(paysaga, "recon", "run", env=env)
    assert result.returncode == 0, result.stderr
    assert "lines matched" in result.stdout and "new discrepancies" in result.stdout
    completed = await recon.wait_for_events("ReconciliationCompleted", 1)
    assert completed[0].payload["kind"] == "manual"


async def test_a_read_model_or_a_position_that_disagrees_with_the_ledger_is_internal_drift(
    recon: Recon, database: IsolatedDatabase, owner_engine: AsyncEngine
) -> None:
    """The owner changes a read model's row and a position's row behind the ledger's
    back: one run names each, as internal drift."""
    await project(recon.store, database)
    tampered = (
        "UPDATE projection.balances SET credits_posted = credits_posted {op} 1 "
        "WHERE account_id = 'bob'",
        "UPDATE positions SET credits_posted = credits_posted {op} 1 "
        "WHERE account_id = 'bob' AND stripe = 0",
    )
    async with owner_engine.begin() as conn:
        for statement_ in tampered:
            changed = await conn.execute(text(statement_.format(op="+")))
            assert changed.rowcount == 1, statement_
    try:
        run = await (await start_run(recon.client, recon.settings, kind="manual")).result()
        assert run.counts["internal_drift"] >= 2, run
        drift = [
            e.payload
            for e in await recon.events("DiscrepancyDetected")
            if e.payload["discrepancy_type"] == "internal_drift"
        ]
        descriptions = [d["description"] for d in drift]
        assert any("read-model" in d and "balances" in d for d in descriptions), descriptions
        assert any("position-mismatch" in d and "bob" in d for d in descriptions), descriptions
        assert len(drift) == run.counts["internal_drift"]
    finally:
        async with owner_engine.begin() as conn:
            for statement_ in tampered:
                await conn.execute(text(statement_.format(op="-")))


async def test_operators_may_terminate_or_reset_reconciliation_workflows_and_nothing_is_lost(
    recon: Recon,
) -> None:
    settled = await _settled_lines(recon)
    day = next(iter(settled.values()))[0]
    content = processor_csv([*settled.values(), (day, "orphan-capture", 4_321, "EUR")])
    assert (await recon.upload("orphan.csv", content)).status_code == 201
    (detected,) = await recon.wait_for_events("DiscrepancyDetected", 1)
    discrepancy_id = detected.payload["discrepancy_id"]

    # Reset a completed run to its first workflow task: the re-run is the same run, so
    # it records nothing again.
    handle = await start_run(recon.client, recon.settings, kind="manual")
    await handle.result()
    before = (
        len(await recon.events("DiscrepancyDetected")),
        len(await recon.events("ReconciliationCompleted")),
    )
    temporal_cli(
        recon.client, "workflow", "reset", "--workflow-id", handle.id,
        "--type", "FirstWorkflowTask", "--reason", "operator re-runs it",
    )  # fmt: skip
    reset = recon.client.get_workflow_handle(handle.id)
    await reset.result()
    after = (
        len(await recon.events("DiscrepancyDetected")),
        len(await recon.events("ReconciliationCompleted")),
    )
    assert after == before

    # Terminate the discrepancy's workflow: an operator can still resolve it, once.
    temporal_cli(
        recon.client, "workflow", "terminate", "--workflow-id", f"discrepancy-{discrepancy_id}",
        "--reason", "operator pulled the plug",
    )  # fmt: skip
    # No worker to take the resolution (the case is started again on a queue nobody
    # polls): a 503 within PAYSAGA_API_UPDATE_WAIT_S, never a request hanging for ever,
    # and nothing recorded. The operator then ends that stranded run too.
    unpolled = recon.settings.model_copy(
        update={"task_queue": f"nobody-{uuid.uuid4()}", "api_update_wait_s": 1.0}
    )
    app = create_app(unpolled, store=recon.store, temporal_client=recon.client)
    async with serve(app) as http:
        stranded = await Api(http, recon.api.keys).post(
            f"/v1/discrepancies/{discrepancy_id}/resolve",
            {"resolution": "written_off", "note": "nobody takes this one"},
            caller="ops",
            idempotency_key=None,
        )
    assert stranded.status_code == 503, stranded.text
    assert stranded.json()["code"] == "workflow_unresponsive"
    assert stranded.headers["Retry-After"] == "5"
    assert await recon.events("DiscrepancyResolved") == []
    temporal_cli(
        recon.client, "workflow", "terminate", "--workflow-id", f"discrepancy-{discrepancy_id}",
        "--reason", "started on a queue nobody polls",
    )  # fmt: skip
    resolved = await recon.resolve(
        discrepancy_id, {"resolution": "written_off", "note": "no such capture at the processor"}
    )
    assert resolved.status_code == 200, resolved.text
    events = await recon.events("DiscrepancyResolved")
    assert [(e.payload["discrepancy_id"], e.payload["resolution"]) for e in events] == [
        (discrepancy_id, "written_off")
    ]
    again = await recon.resolve(discrepancy_id, {"resolution": "accepted", "note": "again"})
    assert again.status_code == 409
