"""`temporal workflow terminate` at every state, then one sweep: the payment is repaired.

Row 6 of issue 8: a payment terminated from the UI in PENDING_APPROVAL or RESERVED got
no terminal event, ever; the hold and the processor's authorization stayed; `ledger
verify` and `ledger check` said OK; and cancel answered 409. Now the API tells the
truth while the repair is pending, and within one sweep each payment ends FAILED,
with no hold and its authorization voided exactly once (or fenced, if it had none).
A workflow that timed out or failed, or that Temporal no longer knows, is repaired the
same way.
"""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError

from activities.ledger import LedgerActivities
from activities.processor import ProcessorActivities, SimulatedProcessor
from activities.sweeper import SweeperActivities
from api.app import create_app
from ledger.store import EventStore
from paysaga.settings import Settings
from tests.harness.api import Api, make_keys, serve
from tests.harness.operators import Gate, gated_worker, sweep, temporal_cli
from tests.harness.saga import APPROVAL_POLICY, Payments, wait_for, wait_for_state
from worker import build_worker
from workflows.models import (
    CaptureFence,
    CaptureRequest,
    CaptureResult,
    FenceRequest,
    PaymentOutcome,
    PaymentRequest,
)
from workflows.payment import PaymentWorkflow

pytestmark = pytest.mark.slow


async def _park(
    payments: Payments, gate: Gate, state: str
) -> WorkflowHandle[PaymentWorkflow, PaymentOutcome]:
    """A payment left standing in `state`."""
    if state == "INITIATED":
        handle = await payments.start(
            "alice", "bob", 1_000, metadata={"simulate": "slow", "simulate_delay_s": 60}
        )
        await wait_for_state(handle, lambda s: "processor" in (s.waiting_for or ""))
    elif state == "PENDING_APPROVAL":
        handle = await payments.start("alice", "bob", 6_000, policy=APPROVAL_POLICY)
        await wait_for_state(handle, lambda s: s.status == "PENDING_APPROVAL")
    else:
        handle = await payments.start("alice", "bob", 1_000)
        await gate.reached.wait()
        await wait_for_state(handle, lambda s: s.status == state)
    return handle


# The state to terminate in -> the step held open meanwhile, and the ledger's events
# once repaired.
CASES = {
    "INITIATED": ("none", ["PaymentInitiated", "PaymentFailed"]),
    "AUTHORIZED": (
        "reserve",
        ["PaymentInitiated", "PaymentAuthorized", "AuthorizationVoided", "PaymentFailed"],
    ),
    "PENDING_APPROVAL": (
        "none",
        [
            "PaymentInitiated",
            "PaymentAuthorized",
            "ApprovalRequested",
            "AuthorizationVoided",
            "PaymentFailed",
        ],
    ),
    # Reserved, its capture under way: the sweeper fences the capture off before it
    # releases the hold, and the stale capture is refused.
    "RESERVED": (
        "capture",
        [
            "PaymentInitiated",
            "PaymentAuthorized",
            "FundsReserved",
            "FundsReleased",
            "AuthorizationVoided",
            "PaymentFailed",
        ],
    ),
}


@pytest.mark.parametrize("state", list(CASES))
async def test_a_terminated_payment_is_repaired_within_one_sweep(
    temporal_client: Client,
    bank: EventStore,
    settings: Settings,
    task_queue: str,
    owner_engine: AsyncEngine,
    state: str,
) -> None:
    held_step, events = CASES[state]
    gate = Gate(held_step)
    async with gated_worker(temporal_client, bank, settings, task_queue, gate) as payments:
        handle = await _park(payments, gate, state)
        payment_id = handle.id.removeprefix("payment-")
        temporal_cli(
            temporal_client,
            "workflow",
            "terminate",
            "--workflow-id",
            handle.id,
            "--reason",
            "operator pulled the plug",
        )
        identity = await _terminating_identity(handle)

        # While the repair is pending, reads say what the ledger says, and that the
        # workflow is gone; cancel cannot reach it and says why.
        keys = await make_keys(owner_engine, settings.api_key_secret.get_secret_value())
        app = create_app(settings, store=bank, temporal_client=temporal_client)
        async with serve(app) as http:
            api = Api(http, keys)
            read = (await api.get(f"/v1/payments/{payment_id}")).json()
            assert read["status"] == state
            assert read["workflow_status"] == "TERMINATED"
            assert read["repair_pending"] is True
            cancel = await api.post(f"/v1/payments/{payment_id}/cancel", idempotency_key=None)
            assert cancel.status_code == 409
            assert cancel.json()["code"] == "workflow_not_running"

            report = await sweep(temporal_client, task_queue)
            assert [r.payment_id for r in report.repaired] == [payment_id]
            read = (await api.get(f"/v1/payments/{payment_id}")).json()
            assert read["status"] == "FAILED" and read["repair_pending"] is False

        # A step left running by the terminated run finds the payment closed.
        gate.opened.set()
        if held_step != "none":

            async def held_step_ran() -> bool:
                return bool(gate.outcomes)

            await wait_for(held_step_ran, what="the held step")
            assert gate.outcomes[0].startswith("refused"), gate.outcomes

        assert await payments.event_types(payment_id) == events
        failed = (await bank.read_stream(f"payment-{payment_id}"))[-1]
        assert failed.payload["step"] == "repair"
        assert f"terminated by {identity}: operator pulled the plug" in failed.payload["reason"]
        assert failed.actor == "sweeper"
        calls = await payments.processor_calls(payment_id)
        if "PaymentAuthorized" in events:
            assert calls.count(("void", "voided")) == 1
            assert await payments.authorization_status(payment_id) == "voided"
        else:
            assert await payments.authorization_status(payment_id) == "fenced"
        if "FundsReserved" in events:
            assert ("fence_capture", "fenced") in calls
        assert await payments.captures(payment_id) == []
        # A second sweep finds nothing left to repair.
        assert (await sweep(temporal_client, task_queue)).repaired == []
    alice, bob = await bank.get_position("alice"), await bank.get_position("bob")
    assert (alice.debits_pending, bob.credits_pending, alice.posted_minor) == (0, 0, 500_000)


class _FailingTheSaga(SimulatedProcessor):
    """A processor plug-in that refuses the saga's capture, then fails the saga's capture
    fence with an error Temporal does not retry: the saga's close stops there, and its
    workflow fails with the payment reserved. Called by the sweeper (from its own
    activity, not the saga's), the fence and the void are the simulator's."""

    async def capture(self, request: CaptureRequest, attempt: int) -> CaptureResult:
        return CaptureResult(captured=False, refusal="refused by the test's processor")

    async def fence_capture(self, request: FenceRequest, attempt: int) -> CaptureFence:
        if activity.info().activity_type == "processor.fence_capture":
            raise ApplicationError(
                "the processor rejects the request", type="bad_request", non_retryable=True
            )
        return await super().fence_capture(request, attempt)


# Long enough to reach PENDING_APPROVAL on a busy machine (0.3 s measured at a load of 8),
# short enough to wait out.
RUN_TIMEOUT = timedelta(seconds=2.5)


async def test_a_payment_whose_workflow_timed_out_or_failed_is_repaired_within_one_sweep(
    temporal_client: Client,
    bank: EventStore,
    settings: Settings,
    task_queue: str,
    owner_engine: AsyncEngine,
) -> None:
    """The other ways a workflow ends with its payment open: it timed out waiting for
    approval (an execution timeout set when it was started), or it failed (its close hit an error
    Temporal does not retry) with the hold still held. A workflow cancelled from the UI
    or the API never ends CANCELED with its payment open: `run` closes the payment,
    shielded, before it lets the cancellation through, and if that close fails the
    workflow ends FAILED, as here."""
    ledger = LedgerActivities(bank)
    authorizer = _FailingTheSaga(bank.engine)
    activities = [
        *ledger.all(),
        *ProcessorActivities(authorizer, ledger).all(),
        *SweeperActivities(ledger, authorizer, temporal_client).all(),
    ]
    async with build_worker(
        temporal_client, settings, task_queue=task_queue, activities=activities
    ):
        payments = Payments(temporal_client, bank, task_queue)
        request = PaymentRequest(
            payment_id=f"pay-{uuid.uuid4().hex[:12]}",
            payer_account_id="alice",
            payee_account_id="bob",
            amount_minor=6_000,
            currency="EUR",
            requested_by="test",
            policy=APPROVAL_POLICY,
        )
        timed = await temporal_client.start_workflow(
            PaymentWorkflow.run,
            request,
            id=request.workflow_id,
            task_queue=task_queue,
            execution_timeout=RUN_TIMEOUT,
        )
        failing = await payments.start("alice", "bob", 1_000)
        await wait_for_state(timed, lambda s: s.status == "PENDING_APPROVAL")
        with pytest.raises(WorkflowFailureError):
            await failing.result()
        timed_id, failed_id = request.payment_id, failing.id.removeprefix("payment-")
        # The failed workflow left its hold behind.
        assert (await bank.get_position("alice")).debits_pending == 1_000

        keys = await make_keys(owner_engine, settings.api_key_secret.get_secret_value())
        app = create_app(settings, store=bank, temporal_client=temporal_client)

        async def timed_out() -> bool:
            return (await timed.describe()).status == WorkflowExecutionStatus.TIMED_OUT

        await wait_for(timed_out, timeout_s=30, what="the run timeout")
        expected = {
            timed_id: ("PENDING_APPROVAL", "TIMED_OUT", "its workflow timed out"),
            failed_id: ("RESERVED", "FAILED", "its workflow failed before it closed the payment"),
        }
        async with serve(app) as http:
            api = Api(http, keys)
            # While the repair is pending, reads say what the ledger says, and how the
            # workflow ended.
            for payment_id, (state, workflow_status, _) in expected.items():
                read = (await api.get(f"/v1/payments/{payment_id}")).json()
                assert (read["status"], read["workflow_status"]) == (state, workflow_status)
                assert read["repair_pending"] is True

            report = await sweep(temporal_client, task_queue)
            assert {r.payment_id: r.cause for r in report.repaired} == {
                payment_id: cause for payment_id, (_, _, cause) in expected.items()
            }
            for payment_id in expected:
                read = (await api.get(f"/v1/payments/{payment_id}")).json()
                assert read["status"] == "FAILED" and read["repair_pending"] is False

        assert await payments.event_types(timed_id) == CASES["PENDING_APPROVAL"][1]
        assert await payments.event_types(failed_id) == CASES["RESERVED"][1]
        for payment_id, (_, _, cause) in expected.items():
            failed = (await bank.read_stream(f"payment-{payment_id}"))[-1]
            assert (failed.payload["step"], failed.payload["reason"]) == ("repair", cause)
            assert failed.actor == "sweeper"
            calls = await payments.processor_calls(payment_id)
            assert calls.count(("void", "voided")) == 1, calls
            assert await payments.authorization_status(payment_id) == "voided"
            assert await payments.captures(payment_id) == []
        assert ("fence_capture", "fenced") in await payments.processor_calls(failed_id)
    alice, bob = await bank.get_position("alice"), await bank.get_position("bob")
    assert (alice.debits_pending, bob.credits_pending, alice.posted_minor) == (0, 0, 500_000)


async def test_a_running_payment_is_left_alone_by_the_sweeper(
    temporal_client: Client, bank: EventStore, settings: Settings, task_queue: str
) -> None:
    gate = Gate("settle")
    async with gated_worker(temporal_client, bank, settings, task_queue, gate) as payments:
        handle = await _park(payments, gate, "RESERVED")
        report = await sweep(temporal_client, task_queue)
        assert report.checked == 1 and report.repaired == []
        gate.opened.set()
        assert (await handle.result()).status == "SETTLED"


@pytest.mark.parametrize("hold", ["live", "expired"])
async def test_an_open_payment_unknown_to_temporal_is_repaired(
    temporal_client: Client, bank: EventStore, settings: Settings, task_queue: str, hold: str
) -> None:
    """Temporal lost the workflow (its data was wiped): the ledger still knows, and a hold
    past its expiry is named as such."""
    from datetime import UTC, datetime, timedelta

    from tests.harness.ledger import Payment

    orphan = Payment(bank, "alice", "bob", 2_000)
    if hold == "expired":
        orphan.hold_expires_at = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    await orphan.run("initiated", "authorized", "reserved")
    assert (await bank.get_position("alice")).debits_pending == 2_000
    gate = Gate("none")
    async with gated_worker(temporal_client, bank, settings, task_queue, gate):
        report = await sweep(temporal_client, task_queue)
    assert [r.payment_id for r in report.repaired] == [orphan.payment_id]
    cause = report.repaired[0].cause
    assert "unknown to Temporal" in cause
    assert ("hold expired at" in cause) is (hold == "expired")
    types = [e.event_type for e in await bank.read_stream(orphan.stream_id)]
    assert types[-3:] == ["FundsReleased", "AuthorizationVoided", "PaymentFailed"]
    assert (await bank.get_position("alice")).debits_pending == 0


async def test_a_payment_terminated_before_its_first_step_is_recorded_and_closed(
    temporal_client: Client, bank: EventStore, settings: Settings, task_queue: str
) -> None:
    """Found by the chaos run: the API acknowledged a payment (202), an operator
    terminated its workflow before it recorded anything, and the payment was lost: no
    stream in the ledger, so the sweeper never saw it, and GET answered 404 for good."""
    from tests.harness.saga import Payments

    # No worker yet: the workflow cannot take its first step before it is terminated.
    handle = await Payments(temporal_client, bank, task_queue).start("alice", "bob", 2_000)
    payment_id = handle.id.removeprefix("payment-")
    temporal_cli(
        temporal_client,
        "workflow",
        "terminate",
        "--workflow-id",
        handle.id,
        "--reason",
        "pulled at once",
    )
    repaired: list[str] = []
    async with gated_worker(temporal_client, bank, settings, task_queue, Gate("none")) as payments:
        assert await payments.event_types(payment_id) == []

        async def swept() -> bool:
            repaired.extend(
                r.payment_id for r in (await sweep(temporal_client, task_queue)).repaired
            )
            return bool(repaired)

        # Visibility (which the sweep lists) may trail the termination by a moment.
        await wait_for(swept, timeout_s=10, what="a sweep that repairs the payment")
        assert repaired == [payment_id]
        assert (await sweep(temporal_client, task_queue)).repaired == []
        assert await payments.event_types(payment_id) == ["PaymentInitiated", "PaymentFailed"]
        failed = (await bank.read_stream(f"payment-{payment_id}"))[-1]
        assert "pulled at once" in failed.payload["reason"]
        assert "before the ledger recorded the payment" in failed.payload["reason"]
        # A late authorization of it would be declined.
        assert await payments.authorization_status(payment_id) == "fenced"
    assert (await bank.get_position("alice")).debits_pending == 0


async def test_a_payment_its_own_workflow_closed_after_the_listing_is_not_repaired(
    temporal_client: Client, bank: EventStore
) -> None:
    """Found by the chaos run: a sweep lists the open payments, then asks Temporal about
    each; a payment whose workflow completed in between (closing it in the ledger) was
    reported as repaired ("its workflow ended (COMPLETED) with the payment open"),
    though the ledger had closed it and the sweep appended nothing."""
    from tests.harness.ledger import Payment
    from workflows.models import SweepRequest

    payment = Payment(bank, "alice", "bob", 2_000)
    await payment.run("initiated", "authorized", "reserved")

    class LateLook(SweeperActivities):
        async def workflow_gone(self, payment_id: str) -> str | None:
            await payment.run("settled")  # the saga finishes while the sweep looks
            return "its workflow ended (COMPLETED) with the payment open"

    ledger = LedgerActivities(bank)
    sweeper = LateLook(ledger, SimulatedProcessor(bank.engine), temporal_client)
    report = await sweeper.sweep(SweepRequest(idle_s=0))
    assert (report.checked, report.repaired) == (1, [])
    types = [e.event_type for e in await bank.read_stream(payment.stream_id)]
    assert types == ["PaymentInitiated", "PaymentAuthorized", "FundsReserved", "PaymentSettled"]


async def _terminating_identity(handle: WorkflowHandle[PaymentWorkflow, PaymentOutcome]) -> str:
    history = await handle.fetch_history()
    last = history.events[-1]
    assert last.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED
    identity = last.workflow_execution_terminated_event_attributes.identity
    assert identity, json.dumps(str(last))
    return identity


async def test_the_sweeper_schedule_is_created_once_and_follows_the_settings(
    temporal_client: Client, settings: Settings
) -> None:
    from temporalio.client import ScheduleActionStartWorkflow

    from worker import ensure_sweeper_schedule, sweeper_schedule_id

    handle = temporal_client.get_schedule_handle(sweeper_schedule_id(settings.task_queue))
    try:
        assert await ensure_sweeper_schedule(temporal_client, settings) is True
        assert await ensure_sweeper_schedule(temporal_client, settings) is False
        described = await handle.describe()
        assert [i.every.total_seconds() for i in described.schedule.spec.intervals] == [60]
        action = described.schedule.action
        assert isinstance(action, ScheduleActionStartWorkflow)
        assert (action.workflow, action.task_queue) == ("SweeperWorkflow", settings.task_queue)
        hourly = settings.model_copy(update={"sweep_interval_s": 3_600})
        assert await ensure_sweeper_schedule(temporal_client, hourly) is False
        described = await handle.describe()
        assert [i.every.total_seconds() for i in described.schedule.spec.intervals] == [3_600]
    finally:
        await handle.delete()
