"""The processor captures, the saga pivots on the capture, and the simulator reports.

Against the real PostgreSQL and the real Temporal servers (the dev server, and the
time-skipping one where a hold must expire): settlement captures at the processor
before PaymentSettled is posted, a captured payment only ever settles (whatever the
ledger, an operator or the sweeper does), a payment that did not settle is voided and
never captured, and the simulator's settlement report holds exactly its window's
captures, with each injected discrepancy where its manifest says.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

from activities.ledger import LedgerActivities
from activities.processor import ProcessorActivities, ProcessorUnavailable, SimulatedProcessor
from activities.settlement_report import build_settlement_report, export_settlement_report
from activities.sweeper import SweeperActivities
from api.app import create_app
from ledger import errors
from ledger.store import EventStore
from paysaga.settings import Settings
from tests.harness.api import Api, make_keys, serve
from tests.harness.ledger import Payment as LedgerPayment
from tests.harness.operators import Gate, gated_worker, sweep, temporal_cli
from tests.harness.postgres import IsolatedDatabase
from tests.harness.saga import APPROVAL_POLICY, TEST_POLICY, Payments, wait_for, wait_for_state
from tests.harness.stack import clean_env, paysaga
from worker import build_worker
from workflows.models import (
    AuthorizationRequest,
    CaptureRequest,
    CaptureResult,
    FenceRequest,
    PaymentOutcome,
    Recorded,
    RecordEvent,
    RejectRequest,
    VoidRequest,
)
from workflows.payment import PaymentWorkflow

HAPPY = ["PaymentInitiated", "PaymentAuthorized", "FundsReserved", "PaymentSettled"]


# --- the simulator's rules ----------------------------------------------------------------
async def _authorized(processor: SimulatedProcessor, payment_id: str, amount_minor: int) -> None:
    request = AuthorizationRequest(
        payment_id=payment_id, amount_minor=amount_minor, currency="EUR", payer_account_id="a"
    )
    assert (await processor.authorize(request, 1)).approved


def _capture(payment_id: str, amount_minor: int, currency: str = "EUR") -> CaptureRequest:
    return CaptureRequest(payment_id=payment_id, amount_minor=amount_minor, currency=currency)


async def test_captured_and_voided_exclude_each_other_and_a_capture_happens_once(
    app_engine: AsyncEngine,
) -> None:
    processor = SimulatedProcessor(app_engine)  # as the services' role
    await _authorized(processor, "p-once", 1_000)
    first = await processor.capture(_capture("p-once", 1_000), 1)
    again = await processor.capture(_capture("p-once", 1_000), 2)
    assert first.captured and again.captured and again.capture_id == first.capture_id
    void = await processor.void(VoidRequest(payment_id="p-once", reason="test"), 1)
    assert (void.voided, void.captured) == (False, True)
    fence = await processor.fence_capture(FenceRequest(payment_id="p-once", reason="test"), 1)
    assert (fence.captured, fence.capture_id) == (True, first.capture_id)

    await _authorized(processor, "p-voided", 1_000)
    assert (await processor.void(VoidRequest(payment_id="p-voided", reason="test"), 1)).voided
    refused = await processor.capture(_capture("p-voided", 1_000), 1)
    assert not refused.captured and "voided" in (refused.refusal or "")

    await _authorized(processor, "p-fenced", 1_000)
    fence = await processor.fence_capture(FenceRequest(payment_id="p-fenced", reason="test"), 1)
    assert not fence.captured
    refused = await processor.capture(_capture("p-fenced", 1_000), 1)
    assert not refused.captured and "fenced" in (refused.refusal or "")
    # Fenced off is not voided: the void still comes, once the ledger says so.
    assert (await processor.void(VoidRequest(payment_id="p-fenced", reason="test"), 1)).voided

    await _authorized(processor, "p-more", 1_000)
    assert not (await processor.capture(_capture("p-more", 1_001), 1)).captured
    assert not (await processor.capture(_capture("p-more", 1_000, "USD"), 1)).captured
    assert not (await processor.capture(_capture("p-never", 1_000), 1)).captured

    async with app_engine.connect() as conn:
        captured = (await conn.execute(text("SELECT payment_id FROM processor_captures"))).all()
        rows = await conn.execute(text("SELECT payment_id, status FROM processor_authorizations"))
        statuses = {str(row.payment_id): str(row.status) for row in rows}
    assert [row.payment_id for row in captured] == ["p-once"]
    assert statuses == {
        "p-once": "captured",
        "p-voided": "voided",
        "p-fenced": "voided",
        "p-more": "authorized",
    }


async def test_concurrent_captures_and_fences_of_one_payment_agree(app_engine: AsyncEngine) -> None:
    """Whichever comes first wins; the others see it, whatever the interleaving."""
    processor = SimulatedProcessor(app_engine)
    for n in range(10):
        payment_id = f"p-race-{n}"
        await _authorized(processor, payment_id, 500)
        fence, results = await asyncio.gather(
            processor.fence_capture(FenceRequest(payment_id=payment_id, reason="race"), 1),
            asyncio.gather(*(processor.capture(_capture(payment_id, 500), 1) for _ in range(3))),
        )
        captures = [r for r in results if r.captured]
        if fence.captured:
            assert len(captures) == 3 and {c.capture_id for c in captures} == {fence.capture_id}
        else:
            assert captures == []


async def test_a_void_is_refused_until_the_ledger_says_the_payment_cannot_settle(
    bank: EventStore,
) -> None:
    """`processor.void` asks the ledger before it voids: a payment the ledger has settled,
    or could still settle (authorized, reserved, its hold released but its authorization
    not yet voided in the ledger), keeps its authorization at the processor as it was."""
    processor = SimulatedProcessor(bank.engine)
    void = ProcessorActivities(processor, LedgerActivities(bank)).void
    # The ledger's state -> its steps, and the authorization's status at the processor.
    cases = {
        "authorized": (["authorized"], "authorized"),
        "reserved": (["authorized", "reserved"], "authorized"),
        "released": (["authorized", "reserved", "released"], "authorized"),
        "settled": (["authorized", "reserved", "settled"], "captured"),
        "voided": (["authorized", "reserved", "released", "voided"], "authorized"),
    }
    payment_ids = {}
    for state, (steps, status) in cases.items():
        payment = LedgerPayment(bank, "alice", "bob", 1_000)
        await payment.run("initiated", *steps)
        await _authorized(processor, payment.payment_id, 1_000)
        if status == "captured":
            assert (await processor.capture(_capture(payment.payment_id, 1_000), 1)).captured
        payment_ids[state] = payment.payment_id

    for state, payment_id in payment_ids.items():
        voiding = ActivityEnvironment().run(void, VoidRequest(payment_id=payment_id, reason="t"))
        if state == "voided":
            result = await voiding
            assert (result.voided, result.captured) == (True, False)
            continue
        with pytest.raises(
            ApplicationError, match=f"ledger has payment {payment_id} {state}:"
        ) as refused:
            await voiding
        assert (refused.value.type, refused.value.non_retryable) == ("void_refused", True)

    async with bank.engine.connect() as conn:
        rows = await conn.execute(text("SELECT payment_id, status FROM processor_authorizations"))
        statuses = {str(row.payment_id): str(row.status) for row in rows}
        rows = await conn.execute(
            text("SELECT payment_id FROM processor_calls WHERE operation = 'void'")
        )
        voids = [str(row.payment_id) for row in rows]
    assert statuses == {
        payment_ids[state]: "voided" if state == "voided" else status
        for state, (_, status) in cases.items()
    }
    assert voids == [payment_ids["voided"]]


# --- the saga -------------------------------------------------------------------------------
async def test_every_settled_payment_is_captured_once_and_every_other_is_voided_never_captured(
    bank: EventStore, payments: Payments
) -> None:
    flaky = TEST_POLICY.model_copy(update={"processor_attempts_max": 3})
    rejected = await payments.start("alice", "bob", 6_000, policy=APPROVAL_POLICY)
    outcomes = list(
        await asyncio.gather(
            payments.run("alice", "bob", 12_500),
            payments.run("alice", "bob", 800, metadata={"simulate": "flaky"}, policy=flaky),
            payments.run("alice", "bob", 500, metadata={"simulate": "decline"}),
            payments.run("alice", "bob", 600_000),  # more than alice holds
        )
    )
    await wait_for_state(rejected, lambda s: s.status == "PENDING_APPROVAL")
    await rejected.execute_update(
        PaymentWorkflow.reject, RejectRequest(actor="ops:ana", reason="unknown beneficiary")
    )
    outcomes.append(await rejected.result())
    assert [o.status for o in outcomes] == ["SETTLED", "SETTLED", "DECLINED", "FAILED", "REJECTED"]

    for outcome in outcomes:
        payment_id = outcome.payment_id
        captures = await payments.captures(payment_id)
        calls = await payments.processor_calls(payment_id)
        status = await payments.authorization_status(payment_id)
        if outcome.status == "SETTLED":
            amount = (await bank.read_stream(f"payment-{payment_id}"))[-1].payload["postings"][0]
            ((capture_id, amount_minor, currency, _),) = captures
            assert (amount_minor, currency) == (amount["amount_minor"], "EUR")
            assert status == "captured" and calls.count(("capture", "captured")) == 1
            assert not [c for c in calls if c[0] in ("void", "fence_capture")]
            handle = payments.client.get_workflow_handle(
                f"payment-{payment_id}", result_type=PaymentOutcome
            )
            state = await handle.query(PaymentWorkflow.status)
            assert state.capture_id == capture_id
        else:
            assert captures == [] and not [c for c in calls if c[0] == "capture"]
            assert status in (None, "voided"), (outcome, status)
            assert calls.count(("void", "voided")) == (0 if status is None else 1)


@dataclass
class Outage:
    """The ledger fails the first `calls` appends of the settlement."""

    calls: int
    failed: int = 0


class LedgerDownAtSettlement(LedgerActivities):
    def __init__(self, store: EventStore, outage: Outage) -> None:
        super().__init__(store)
        self.outage = outage

    async def _append(self, record: RecordEvent) -> Recorded:
        if record.step == "settle" and self.outage.failed < self.outage.calls:
            self.outage.failed += 1
            raise errors.StoreUnavailable("the ledger is down (injected, settle)")
        return await super()._append(record)


class CaptureAnswersLost(SimulatedProcessor):
    """The processor captures, but its answer never reaches the saga."""

    async def capture(self, request: CaptureRequest, attempt: int) -> CaptureResult:
        await super().capture(request, attempt)
        raise ProcessorUnavailable("the processor's answer was lost (injected)")


@asynccontextmanager
async def _skipping_saga(
    env: WorkflowEnvironment,
    store: EventStore,
    settings: Settings,
    queue: str,
    ledger: LedgerActivities,
    processor: SimulatedProcessor,
) -> AsyncIterator[Payments]:
    activities = [*ledger.all(), *ProcessorActivities(processor, ledger).all()]
    async with build_worker(env.client, settings, task_queue=queue, activities=activities):
        yield Payments(env.client, store, queue)


# A two-minute hold, and a ledger that gives up quickly: every wait below is longer.
SHORT_HOLD = TEST_POLICY.model_copy(update={"hold_expiry_s": 120, "ledger_attempts_max": 2})


async def _slept_s(payments: Payments, workflow_id: str) -> float:
    """How long, in workflow time, the payment's run waited on timers."""
    history = await payments.client.get_workflow_handle(workflow_id).fetch_history()
    return sum(
        event.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta().total_seconds()
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_TIMER_STARTED
    )


async def test_a_ledger_outage_after_the_capture_outlasting_the_hold_still_ends_settled(
    time_skipping_env: WorkflowEnvironment, bank: EventStore, settings: Settings, task_queue: str
) -> None:
    outage = Outage(calls=30)  # about six rounds, three minutes: past the hold's expiry
    ledger = LedgerDownAtSettlement(bank, outage)
    async with _skipping_saga(
        time_skipping_env, bank, settings, task_queue, ledger, SimulatedProcessor(bank.engine)
    ) as payments:
        handle = await payments.start("alice", "bob", 2_000, policy=SHORT_HOLD)
        outcome = await handle.result()
        slept_s = await _slept_s(payments, handle.id)
    assert outage.failed == outage.calls
    assert slept_s > SHORT_HOLD.hold_expiry_s, "the outage must outlast the hold"
    assert outcome.status == "SETTLED", outcome
    assert await payments.event_types(outcome.payment_id) == HAPPY
    calls = await payments.processor_calls(outcome.payment_id)
    assert calls.count(("capture", "captured")) == 1
    assert not [c for c in calls if c[0] in ("void", "fence_capture")]
    assert await payments.authorization_status(outcome.payment_id) == "captured"
    alice, bob = await bank.get_position("alice"), await bank.get_position("bob")
    assert (alice.debits_pending, bob.credits_posted) == (0, 2_000)


async def test_a_capture_whose_answer_was_lost_settles_when_the_close_finds_it(
    time_skipping_env: WorkflowEnvironment, bank: EventStore, settings: Settings, task_queue: str
) -> None:
    """The saga never hears that the capture landed; at the hold's expiry it closes, and
    the capture fence tells it the processor captured: it settles, and voids nothing."""
    async with _skipping_saga(
        time_skipping_env,
        bank,
        settings,
        task_queue,
        LedgerActivities(bank),
        CaptureAnswersLost(bank.engine),
    ) as payments:
        outcome = await payments.run("alice", "bob", 3_000, policy=SHORT_HOLD)
    assert outcome.status == "SETTLED", outcome
    assert await payments.event_types(outcome.payment_id) == HAPPY
    calls = await payments.processor_calls(outcome.payment_id)
    assert calls.count(("capture", "captured")) == 1
    assert ("fence_capture", "captured") in calls
    assert not [c for c in calls if c[0] == "void"]
    assert len(await payments.captures(outcome.payment_id)) == 1


async def _park_after_capture(payments: Payments, gate: Gate) -> str:
    """A payment captured at the processor, its PaymentSettled held at the gate."""
    handle = await payments.start("alice", "bob", 4_000)
    await gate.reached.wait()
    payment_id = handle.id.removeprefix("payment-")
    assert len(await payments.captures(payment_id)) == 1
    assert await payments.event_types(payment_id) == HAPPY[:3]
    return payment_id


async def test_a_payment_terminated_after_its_capture_is_settled_by_the_sweeper(
    temporal_client: Client, bank: EventStore, settings: Settings, task_queue: str
) -> None:
    gate = Gate("settle")
    async with gated_worker(temporal_client, bank, settings, task_queue, gate) as payments:
        payment_id = await _park_after_capture(payments, gate)
        temporal_cli(
            temporal_client,
            "workflow",
            "terminate",
            "--workflow-id",
            f"payment-{payment_id}",
            "--reason",
            "operator pulled the plug",
        )
        report = await sweep(temporal_client, task_queue)
        ((repair,),) = [report.repaired]
        assert (repair.payment_id, repair.status) == (payment_id, "SETTLED")
        assert "captured" in repair.cause
        settled = (await bank.read_stream(f"payment-{payment_id}"))[-1]
        assert settled.event_type == "PaymentSettled" and settled.actor == "sweeper"

        # The terminated run's posting, let through at last, finds the same event there.
        gate.opened.set()

        async def held_step_ran() -> bool:
            return bool(gate.outcomes)

        await wait_for(held_step_ran, what="the held settlement")
        assert gate.outcomes[0] == "found", gate.outcomes
        assert (await sweep(temporal_client, task_queue)).repaired == []
    assert await payments.event_types(payment_id) == HAPPY
    calls = await payments.processor_calls(payment_id)
    assert ("fence_capture", "captured") in calls
    assert not [c for c in calls if c[0] == "void"]
    assert await payments.authorization_status(payment_id) == "captured"
    assert (await bank.get_position("bob")).credits_posted == 4_000


async def test_reconciliations_fix_posts_a_capture_the_ledger_is_missing(
    temporal_client: Client, bank: EventStore, settings: Settings, task_queue: str
) -> None:
    """`settle_if_captured`, the automatic fix of missing_in_ledger: it posts the saga's
    own settlement, once; it fences nothing and touches nothing it cannot prove."""
    gate = Gate("settle")
    async with gated_worker(temporal_client, bank, settings, task_queue, gate) as payments:
        payment_id = await _park_after_capture(payments, gate)
        temporal_cli(
            temporal_client, "workflow", "terminate", "--workflow-id", f"payment-{payment_id}"
        )
        sweeper = SweeperActivities(
            LedgerActivities(bank), SimulatedProcessor(bank.engine), temporal_client
        )
        note = await sweeper.settle_if_captured(payment_id)
        assert note is not None and "posted PaymentSettled" in note
        assert await sweeper.settle_if_captured(payment_id) is None  # settled now
        assert await payments.event_types(payment_id) == HAPPY
        # Reserved but not captured: nothing to post, and no fence left behind for its
        # saga (whose capture may be on its way) to trip on.
        reserved = LedgerPayment(bank, "alice", "bob", 100)
        await reserved.run("initiated", "authorized", "reserved")
        await _authorized(SimulatedProcessor(bank.engine), reserved.payment_id, 100)
        assert await sweeper.settle_if_captured(reserved.payment_id) is None
        calls = await payments.processor_calls(reserved.payment_id)
        assert calls == [("authorize", "authorized")]
        # Closed here, so that the bank fixture finds every hold settled or released.
        await reserved.run("released", "voided", "failed")


async def test_a_captured_payment_unknown_to_temporal_is_left_open_for_reconciliation(
    temporal_client: Client, bank: EventStore, settings: Settings, task_queue: str
) -> None:
    """Without its workflow, the settlement (its fee) cannot be derived: the sweeper neither
    settles nor releases it, and says so; reconciliation finds the capture."""
    orphan = LedgerPayment(bank, "alice", "bob", 2_000)
    await orphan.run("initiated", "authorized", "reserved")
    processor = SimulatedProcessor(bank.engine)
    await _authorized(processor, orphan.payment_id, 2_000)
    assert (await processor.capture(_capture(orphan.payment_id, 2_000), 1)).captured
    async with gated_worker(temporal_client, bank, settings, task_queue, Gate("none")) as payments:
        report = await sweep(temporal_client, task_queue)
    ((repair,),) = [report.repaired]
    assert (repair.payment_id, repair.status) == (orphan.payment_id, "RESERVED")
    assert "captured" in repair.cause and "reconciliation" in repair.cause
    assert await payments.event_types(orphan.payment_id) == HAPPY[:3]
    calls = await payments.processor_calls(orphan.payment_id)
    assert ("fence_capture", "captured") in calls and not [c for c in calls if c[0] == "void"]
    assert (await bank.get_position("alice")).debits_pending == 2_000
    # Nor can reconciliation's fix derive the settlement: it leaves the payment be.
    sweeper = SweeperActivities(LedgerActivities(bank), processor, temporal_client)
    assert await sweeper.settle_if_captured(orphan.payment_id) is None


async def test_a_cancel_after_the_capture_is_refused_as_settling(
    temporal_client: Client,
    bank: EventStore,
    settings: Settings,
    task_queue: str,
    owner_engine: AsyncEngine,
) -> None:
    gate = Gate("settle")
    async with gated_worker(temporal_client, bank, settings, task_queue, gate) as payments:
        payment_id = await _park_after_capture(payments, gate)
        keys = await make_keys(owner_engine, settings.api_key_secret.get_secret_value())
        # The capture is a local activity, held here at the gate: the workflow answered
        # the cancel only after about 16 s, past the default wait.
        patient = settings.model_copy(update={"api_update_wait_s": 60.0})
        app = create_app(patient, store=bank, temporal_client=temporal_client)
        async with serve(app) as http:
            api = Api(http, keys)
            cancel = await api.post(f"/v1/payments/{payment_id}/cancel", idempotency_key=None)
            assert cancel.status_code == 409, cancel.text
            assert cancel.json()["code"] == "cancel_refused"
            assert "settling" in cancel.json()["detail"]
            gate.opened.set()
            handle = temporal_client.get_workflow_handle(
                f"payment-{payment_id}", result_type=PaymentOutcome
            )
            assert (await handle.result()).status == "SETTLED"
    assert await payments.event_types(payment_id) == HAPPY
    assert not [c for c in await payments.processor_calls(payment_id) if c[0] == "void"]


# --- the settlement report ------------------------------------------------------------------
DAY = datetime(2026, 11, 20, tzinfo=UTC)


async def _captures_on(
    app_engine: AsyncEngine,
    owner_engine: AsyncEngine,
    captures: dict[str, tuple[int, str, datetime]],
) -> None:
    """Authorize and capture through the simulator, then date each capture as given."""
    processor = SimulatedProcessor(app_engine)
    for payment_id, (amount_minor, currency, _) in captures.items():
        request = AuthorizationRequest(
            payment_id=payment_id,
            amount_minor=amount_minor,
            currency=currency,
            payer_account_id="a",
        )
        assert (await processor.authorize(request, 1)).approved
        assert (await processor.capture(_capture(payment_id, amount_minor, currency), 1)).captured
    async with owner_engine.begin() as conn:
        for payment_id, (_, _, at) in captures.items():
            await conn.execute(
                text(
                    "UPDATE processor_captures SET captured_at = :at, settles_at = :at "
                    "WHERE payment_id = :p"
                ),
                {"at": at, "p": payment_id},
            )


def _eur(amount_minor: int) -> str:
    """How the report writes an amount of EUR (integers only: no floats near money)."""
    return f"{amount_minor // 100}.{amount_minor % 100:02d}"


def _rows(content: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(content.decode("utf-8"))))


async def test_the_report_holds_exactly_the_captures_of_its_window(
    app_engine: AsyncEngine, owner_engine: AsyncEngine
) -> None:
    await _captures_on(
        app_engine,
        owner_engine,
        {
            "p-before": (100, "EUR", DAY - timedelta(microseconds=1)),
            "p-first": (12_345, "EUR", DAY),
            "p-yen": (1_200, "JPY", DAY + timedelta(hours=9)),
            "p-dinar": (1_500, "KWD", DAY + timedelta(hours=23, minutes=59)),
            "p-next-day": (700, "EUR", DAY + timedelta(days=1)),
        },
    )
    content = await export_settlement_report(app_engine, DAY, DAY + timedelta(days=1))
    assert content.decode("utf-8") == (
        "date,reference,amount,currency,type\n"
        "2026-11-20,p-dinar,1.500,KWD,capture\n"
        "2026-11-20,p-first,123.45,EUR,capture\n"
        "2026-11-20,p-yen,1200,JPY,capture\n"
    )
    two_days = await build_settlement_report(app_engine, DAY, DAY + timedelta(days=2))
    assert sorted(two_days.settled) == ["p-dinar", "p-first", "p-next-day", "p-yen"]
    assert two_days.injected == () and two_days.late_arrivals == ()
    assert _rows(two_days.content)[-1]["date"] == "2026-11-21"


async def test_each_injected_discrepancy_is_where_the_manifest_says(
    app_engine: AsyncEngine, owner_engine: AsyncEngine
) -> None:
    captures = {f"p-{n:02d}": (1_000 + n, "EUR", DAY + timedelta(hours=n)) for n in range(12)}
    await _captures_on(app_engine, owner_engine, captures)
    inject = {kind: 1 for kind in ("missing", "extra", "wrong_amount", "wrong_currency")}
    inject.update(duplicate=2, late=1)
    report = await build_settlement_report(
        app_engine, DAY, DAY + timedelta(days=1), inject=inject, seed=7
    )
    rows = _rows(report.content)
    references = [row["reference"] for row in rows]
    touched = {kind: report.touched(kind) for kind in inject}
    assert {kind: len(ids) for kind, ids in touched.items()} == inject
    # Each capture is touched by one injection at most.
    real = [p for kind, ids in touched.items() if kind != "extra" for p in ids]
    assert len(real) == len(set(real)) == 6

    (missing,), (late,), (extra,) = touched["missing"], touched["late"], touched["extra"]
    assert missing not in references and late not in references
    assert extra not in captures and references.count(extra) == 1
    for injected in report.injected:
        if injected.row is not None:
            assert rows[injected.row - 1]["reference"] == injected.payment_id, injected
    (wrong_amount,) = touched["wrong_amount"]
    line = rows[references.index(wrong_amount)]
    assert line["amount"] != _eur(captures[wrong_amount][0]) and line["currency"] == "EUR"
    (wrong_currency,) = touched["wrong_currency"]
    line = rows[references.index(wrong_currency)]
    assert line["currency"] != "EUR" and line["amount"] == _eur(captures[wrong_currency][0])
    for duplicate in touched["duplicate"]:
        first = references.index(duplicate)
        assert references.count(duplicate) == 2 and rows[first] == rows[first + 1]
    for payment_id in set(captures) - set(real):
        (line,) = [row for row in rows if row["reference"] == payment_id]
        assert (line["amount"], line["currency"], line["date"], line["type"]) == (
            _eur(captures[payment_id][0]),
            "EUR",
            "2026-11-20",
            "capture",
        )
    assert len(rows) == 12 - 2 + 1 + 2  # less missing and late, plus extra and duplicates

    # Deterministic, and asking again changes nothing (the late capture stays late).
    again = await build_settlement_report(
        app_engine, DAY, DAY + timedelta(days=1), inject=inject, seed=7
    )
    assert (again.content, again.injected) == (report.content, report.injected)
    assert json.loads(json.dumps(report.manifest()))["injected"][0]["kind"]

    # The late capture arrives in the next window's report, dated later.
    next_day = await build_settlement_report(
        app_engine, DAY + timedelta(days=1), DAY + timedelta(days=2)
    )
    assert next_day.late_arrivals == (late,)
    assert [(row["reference"], row["date"]) for row in _rows(next_day.content)] == [
        (late, "2026-11-21")
    ]
    # And without injections, the first window now reports everything but the late one.
    plain = await build_settlement_report(app_engine, DAY, DAY + timedelta(days=1))
    assert sorted(plain.settled) == sorted(set(captures) - {late})


async def test_a_bad_report_request_is_refused_and_changes_nothing(
    app_engine: AsyncEngine, owner_engine: AsyncEngine
) -> None:
    await _captures_on(app_engine, owner_engine, {"p-only": (500, "EUR", DAY)})
    window = (DAY, DAY + timedelta(days=1))
    for inject, message in (
        ({"late": 1, "missing": 1}, "missing=1"),  # one capture cannot be both
        ({"typo": 1}, "unknown injection typo"),
        ({"extra": -1}, "between 0 and"),
    ):
        with pytest.raises(ValueError, match=message):
            await build_settlement_report(app_engine, *window, inject=inject)
    with pytest.raises(ValueError, match="time zones"):
        await build_settlement_report(app_engine, DAY.replace(tzinfo=None), window[1])
    with pytest.raises(ValueError, match="empty"):
        await build_settlement_report(app_engine, window[1], window[0])
    report = await build_settlement_report(app_engine, *window)
    assert report.settled == ("p-only",)  # the refused `late` moved nothing


async def test_paysaga_processor_report_writes_the_csv_and_the_manifest(
    database: IsolatedDatabase, app_engine: AsyncEngine, owner_engine: AsyncEngine, tmp_path: Path
) -> None:
    await _captures_on(
        app_engine,
        owner_engine,
        {"p-a": (1_000, "EUR", DAY), "p-b": (2_000, "EUR", DAY + timedelta(hours=1))},
    )
    out = tmp_path / "report.csv"
    env = clean_env(DATABASE_URL=database.urls.owner_url)
    result = paysaga(
        "processor", "report", "--from", "2026-11-20", "--to", "2026-11-21",
        "--inject", "missing=1", "--out", str(out), env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stderr)
    ((missing,),) = [[i["payment_id"] for i in manifest["injected"]]]
    rows = _rows(out.read_bytes())
    assert [row["reference"] for row in rows] == sorted({"p-a", "p-b"} - {missing})
    refused = paysaga(
        "processor", "report", "--from", "2026-11-20", "--to", "2026-11-21",
        "--inject", "missing=3", env=env,
    )  # fmt: skip
    assert refused.returncode == 2 and "missing=3" in refused.stderr
