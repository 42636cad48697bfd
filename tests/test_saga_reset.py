"""`temporal workflow reset`, to every point of a history: the ledger and the processor
end exactly as they were.

Row 7 of issue 8: a reset of a SETTLED payment to its first workflow task re-ran the
reservation with a new `expires_at`, conflicted, and voided the processor's
authorization while the ledger said SETTLED. Row 8: the same reset while PENDING_APPROVAL
failed the workflow outside any compensation. Now every payload is a function of
recorded facts, and a re-run that finds the ledger further on follows it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from temporalio.client import Client, WorkflowHandle

from ledger.store import EventStore
from tests.harness.operators import reset_points, reset_to, temporal_cli
from tests.harness.saga import APPROVAL_POLICY, TEST_POLICY, Payments, wait_for_state
from workflows.models import ApproveRequest, CancelRequest, PaymentOutcome, PaymentPolicy
from workflows.payment import PaymentWorkflow

pytestmark = pytest.mark.slow


async def _facts(payments: Payments, payment_id: str) -> tuple[Any, ...]:
    """What a reset must not change: the ledger's events, and the processor's state (its
    captures included: a re-run may ask again, and gets the first capture back)."""
    events = await payments.store.read_stream(f"payment-{payment_id}")
    calls = await payments.processor_calls(payment_id)
    return (
        [(e.event_id, e.event_type, e.hash) for e in events],
        await payments.authorization_status(payment_id),
        [call for call in calls if call[0] == "void"],
        await payments.captures(payment_id),
        [call for call in calls if call[0] == "capture" and call[1] != "replayed"],
    )


async def _positions(store: EventStore) -> tuple[tuple[int, int, int, int], ...]:
    alice, bob = await store.get_position("alice"), await store.get_position("bob")
    return (
        (alice.debits_pending, alice.debits_posted, alice.credits_pending, alice.credits_posted),
        (bob.debits_pending, bob.debits_posted, bob.credits_pending, bob.credits_posted),
    )


def _handle(
    payments: Payments, workflow_id: str, run_id: str | None = None
) -> WorkflowHandle[PaymentWorkflow, PaymentOutcome]:
    return payments.client.get_workflow_handle(
        workflow_id, run_id=run_id, result_type=PaymentOutcome
    )


async def _approve(payments: Payments, workflow_id: str) -> None:
    handle = _handle(payments, workflow_id)
    await wait_for_state(handle, lambda s: s.status == "PENDING_APPROVAL")
    await handle.execute_update(PaymentWorkflow.approve, ApproveRequest(actor="ops:ana"))


async def _cancel(payments: Payments, workflow_id: str) -> None:
    handle = _handle(payments, workflow_id)
    await wait_for_state(handle, lambda s: "processor" in (s.waiting_for or ""))
    await handle.execute_update(PaymentWorkflow.cancel, CancelRequest(actor="ops:ana"))


# name -> (amount, metadata, policy, what the operator does meanwhile, the outcome)
Act = Callable[[Payments, str], Awaitable[None]]
ENDED: dict[str, tuple[int, dict[str, Any], PaymentPolicy, Act | None, str]] = {
    "settled": (12_500, {}, TEST_POLICY, None, "SETTLED"),
    "approved then settled": (6_000, {}, APPROVAL_POLICY, _approve, "SETTLED"),
    "failed for lack of funds": (900_000, {}, TEST_POLICY, None, "FAILED"),
    "declined by the processor": (500, {"simulate": "decline"}, TEST_POLICY, None, "DECLINED"),
    "cancelled while authorizing": (
        400,
        {"simulate": "slow", "simulate_delay_s": 30},
        TEST_POLICY,
        _cancel,
        "CANCELLED",
    ),
}


@pytest.mark.parametrize("name", list(ENDED))
async def test_a_reset_to_any_point_of_an_ended_payment_changes_nothing(
    payments: Payments, bank: EventStore, name: str
) -> None:
    amount, metadata, policy, act, status = ENDED[name]
    handle = await payments.start("alice", "bob", amount, metadata=metadata, policy=policy)
    if act is not None:
        await act(payments, handle.id)
    assert (await handle.result()).status == status
    payment_id = handle.id.removeprefix("payment-")
    before, positions = await _facts(payments, payment_id), await _positions(bank)
    first_run = handle.result_run_id
    assert first_run is not None
    points = await reset_points(payments.client, handle.id, first_run)
    assert len(points) >= 2
    for event_id in points:
        run_id = await reset_to(payments.client, handle.id, first_run, event_id)
        rerun = _handle(payments, handle.id, run_id)
        outcome = await rerun.result()
        assert outcome.status == status, f"reset to event {event_id}: {outcome}"
        assert await _facts(payments, payment_id) == before, f"reset to event {event_id}"
        assert await _positions(bank) == positions


async def test_the_clis_reset_to_the_first_workflow_task_of_a_settled_payment(
    payments: Payments, bank: EventStore, temporal_client: Client
) -> None:
    """Row 7, exactly as it was reproduced."""
    handle = await payments.start("alice", "bob", 3_000)
    await handle.result()
    payment_id = handle.id.removeprefix("payment-")
    before = await _facts(payments, payment_id)
    for reset_type in ("FirstWorkflowTask", "LastWorkflowTask"):
        temporal_cli(
            temporal_client,
            "workflow",
            "reset",
            "--workflow-id",
            handle.id,
            "--type",
            reset_type,
            "--reason",
            "operator replays the payment",
        )
        latest = _handle(payments, handle.id)
        assert (await latest.result()).status == "SETTLED"
        assert await _facts(payments, payment_id) == before
    assert await payments.authorization_status(payment_id) == "captured"


async def test_a_payment_reset_while_waiting_for_approval_waits_again_then_settles(
    payments: Payments, bank: EventStore
) -> None:
    """Row 8: reset to each point while PENDING_APPROVAL, then approve the last run."""
    handle = await payments.start("alice", "bob", 6_000, policy=APPROVAL_POLICY)
    await wait_for_state(handle, lambda s: s.status == "PENDING_APPROVAL")
    payment_id = handle.id.removeprefix("payment-")
    before = await _facts(payments, payment_id)
    first_run = handle.result_run_id
    assert first_run is not None
    points = await reset_points(payments.client, handle.id, first_run)
    assert points
    for event_id in points:
        run_id = await reset_to(payments.client, handle.id, first_run, event_id)
        rerun = _handle(payments, handle.id, run_id)
        await wait_for_state(rerun, lambda s: s.status == "PENDING_APPROVAL")
        assert await _facts(payments, payment_id) == before, f"reset to event {event_id}"
        assert (await bank.get_position("alice")).debits_pending == 0
    await _approve(payments, handle.id)
    latest = _handle(payments, handle.id)
    assert (await latest.result()).status == "SETTLED"
    assert await payments.event_types(payment_id) == [
        "PaymentInitiated",
        "PaymentAuthorized",
        "ApprovalRequested",
        "PaymentApproved",
        "FundsReserved",
        "PaymentSettled",
    ]
    assert await payments.authorization_status(payment_id) == "captured"
    assert [c for c in await payments.processor_calls(payment_id) if c[0] == "void"] == []
