"""A ledger outage at every step: the saga compensates and closes, however long it lasts.

Row 9 of issue 8: an outage longer than the retries at initiate, at the approval
records or at the decline record failed the workflow without compensating. Here the
ledger fails, for real (the store's own StoreUnavailable), at each step in turn, on
the time-skipping server so that retry pauses of minutes pass in a moment.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from activities.ledger import LedgerActivities
from activities.processor import ProcessorActivities, SimulatedProcessor
from ledger import errors
from ledger.store import EventStore
from paysaga.settings import Settings
from tests.harness.saga import TEST_POLICY, Payments, wait_for_state
from worker import build_worker
from workflows.models import ApproveRequest, PaymentOutcome, Recorded, RecordEvent
from workflows.payment import PaymentWorkflow

pytestmark = pytest.mark.slow


@dataclass
class Outage:
    """The ledger fails the first `calls` appends of `step` (a saga step name)."""

    step: str
    calls: int
    failed: int = 0
    steps_seen: list[str] = field(default_factory=list)


class LedgerWithOutage(LedgerActivities):
    def __init__(self, store: EventStore, outage: Outage) -> None:
        super().__init__(store)
        self.outage = outage

    async def _append(self, record: RecordEvent) -> Recorded:
        self.outage.steps_seen.append(record.step)
        if record.step == self.outage.step and self.outage.failed < self.outage.calls:
            self.outage.failed += 1
            raise errors.StoreUnavailable(f"the ledger is down (injected, {record.step})")
        return await super()._append(record)


@asynccontextmanager
async def saga_with(
    env: WorkflowEnvironment, store: EventStore, settings: Settings, queue: str, outage: Outage
) -> AsyncIterator[Payments]:
    ledger = LedgerWithOutage(store, outage)
    processor = ProcessorActivities(SimulatedProcessor(store.engine), ledger)
    activities = [*ledger.all(), *processor.all()]
    async with build_worker(env.client, settings, task_queue=queue, activities=activities):
        yield Payments(env.client, store, queue)


# A hold of two minutes: waiting it out takes a few rounds of retries, each of which
# spends a second or two of real time in the worker's own backoff.
QUICK = TEST_POLICY.model_copy(
    update={"ledger_attempts_max": 2, "approval_threshold_minor": 5_000, "hold_expiry_s": 120}
)


async def _approve_when_pending(handle: WorkflowHandle[PaymentWorkflow, PaymentOutcome]) -> None:
    await wait_for_state(handle, lambda s: s.status == "PENDING_APPROVAL")
    await handle.execute_update(PaymentWorkflow.approve, ApproveRequest(actor="ops:ana"))


# step -> (amount, metadata, how many appends fail, outcome, the stream's events)
CASES = {
    "initiate": (1_000, {}, 2, "FAILED", ["PaymentInitiated", "PaymentFailed"]),
    "approval-request": (
        6_000,
        {},
        2,
        "FAILED",
        ["PaymentInitiated", "PaymentAuthorized", "AuthorizationVoided", "PaymentFailed"],
    ),
    "approve": (
        6_000,
        {},
        2,
        "FAILED",
        [
            "PaymentInitiated",
            "PaymentAuthorized",
            "ApprovalRequested",
            "AuthorizationVoided",
            "PaymentFailed",
        ],
    ),
    # The decline is the closing event itself: it fails for a whole round and more.
    "decline": (
        1_000,
        {"simulate": "decline"},
        7,
        "DECLINED",
        ["PaymentInitiated", "PaymentDeclined"],
    ),
    "reserve": (
        1_000,
        {},
        2,
        "FAILED",
        ["PaymentInitiated", "PaymentAuthorized", "AuthorizationVoided", "PaymentFailed"],
    ),
    # Down after the processor captured: the settlement is posted in rounds until it
    # lands (tests/test_processor_capture.py has an outage longer than the hold).
    "settle": (
        1_000,
        {},
        12,
        "SETTLED",
        ["PaymentInitiated", "PaymentAuthorized", "FundsReserved", "PaymentSettled"],
    ),
}


@pytest.mark.parametrize("step", list(CASES))
async def test_a_ledger_outage_at_any_step_compensates_and_closes_the_stream(
    time_skipping_env: WorkflowEnvironment,
    bank: EventStore,
    settings: Settings,
    task_queue: str,
    step: str,
) -> None:
    amount, metadata, calls, status, events = CASES[step]
    outage = Outage(step, calls)
    async with saga_with(time_skipping_env, bank, settings, task_queue, outage) as payments:
        handle = await payments.start("alice", "bob", amount, metadata=metadata, policy=QUICK)
        if amount >= QUICK.approval_threshold_minor and step == "approve":
            await _approve_when_pending(handle)
        outcome = await handle.result()
        assert outage.failed >= min(calls, 2), "the outage must have been hit"
        assert outcome.status == status, outcome
        assert await payments.event_types(outcome.payment_id) == events
        calls_made = await payments.processor_calls(outcome.payment_id)
        captures = await payments.captures(outcome.payment_id)
        if status == "SETTLED":
            assert len(captures) == 1 and ("void", "voided") not in calls_made
            assert await payments.authorization_status(outcome.payment_id) == "captured"
        elif "PaymentAuthorized" in events:
            assert calls_made.count(("void", "voided")) == 1
            assert await payments.authorization_status(outcome.payment_id) == "voided"
        else:
            assert ("void", "voided") not in calls_made
        if status != "SETTLED":
            assert captures == []
    alice, bob = await bank.get_position("alice"), await bank.get_position("bob")
    paid = amount if status == "SETTLED" else 0
    assert (alice.debits_pending, bob.credits_pending, alice.posted_minor) == (
        0,
        0,
        500_000 - paid,
    )


async def test_an_outage_of_any_length_keeps_the_history_bounded(
    time_skipping_env: WorkflowEnvironment, bank: EventStore, settings: Settings, task_queue: str
) -> None:
    """Compensation fails for hours (every round, with a pause between rounds): the saga
    continues as new whenever its history grows past `history_events_max`, then closes
    once the ledger is back."""
    policy = QUICK.model_copy(update={"history_events_max": 50, "approval_threshold_minor": 10**9})
    outage = Outage("void", 80)  # the AuthorizationVoided of a payment refused at reserve
    async with saga_with(time_skipping_env, bank, settings, task_queue, outage) as payments:
        handle = await payments.start("alice", "bob", 900_000, policy=policy)  # too much
        first_run = handle.result_run_id
        outcome = await handle.result()
        assert outage.failed == 80
        assert outcome.status == "FAILED" and outcome.step == "reserve"
        assert await payments.event_types(outcome.payment_id) == [
            "PaymentInitiated",
            "PaymentAuthorized",
            "AuthorizationVoided",
            "PaymentFailed",
        ]
        runs, lengths = await _runs(payments, handle.id, first_run)
    assert runs >= 3, f"expected continue-as-new, saw {runs} run(s)"
    # Each run stops at the first round past the limit; a round adds a handful of events.
    assert max(lengths) <= policy.history_events_max + 30, lengths
    assert (await bank.get_position("alice")).debits_pending == 0


async def _runs(
    payments: Payments, workflow_id: str, first_run: str | None
) -> tuple[int, list[int]]:
    """How many runs the workflow took, following continue-as-new, and their lengths."""
    run_id, runs, lengths = first_run, 0, []
    while run_id:
        history = await payments.client.get_workflow_handle(
            workflow_id, run_id=run_id
        ).fetch_history()
        runs += 1
        lengths.append(len(history.events))
        last = history.events[-1]
        run_id = None
        if last.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
            run_id = last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
        await asyncio.sleep(0)
    return runs, lengths
