"""The payment saga end to end: real Temporal dev server, real PostgreSQL, the simulator."""

from __future__ import annotations

import asyncio

import pytest
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.service import RPCError

from ledger.events import REASON_CHARS_MAX
from ledger.store import EventStore
from tests.harness.saga import APPROVAL_POLICY, TEST_POLICY, Payments, wait_for, wait_for_state
from workflows.models import ApproveRequest, CancelRequest, Close, RejectRequest
from workflows.payment import PaymentWorkflow, _Stop

HAPPY = ["PaymentInitiated", "PaymentAuthorized", "FundsReserved", "PaymentSettled"]


async def _no_hold(store: EventStore) -> None:
    alice, bob = await store.get_position("alice"), await store.get_position("bob")
    assert alice.debits_pending == 0 and bob.credits_pending == 0


async def test_a_payment_settles_with_exactly_four_events_in_order(
    bank: EventStore, payments: Payments
) -> None:
    handle = await payments.start("alice", "bob", 12_500)
    outcome = await handle.result()
    payment_id = outcome.payment_id
    assert outcome.status == "SETTLED"
    assert await payments.event_types(payment_id) == HAPPY
    alice, bob = await bank.get_position("alice"), await bank.get_position("bob")
    assert (alice.posted_minor, alice.debits_pending) == (500_000 - 12_500, 0)
    assert (bob.posted_minor, bob.credits_pending) == (12_500, 0)
    state = await handle.query(PaymentWorkflow.status)
    assert state.status == "SETTLED" and state.authorization_id
    described = await handle.describe()
    assert await described.static_summary() == "125.00 EUR alice → bob"


async def test_a_processor_decline_ends_declined_with_no_hold(
    bank: EventStore, payments: Payments
) -> None:
    outcome = await payments.run("alice", "bob", 500, metadata={"simulate": "decline"})
    assert outcome.status == "DECLINED"
    assert await payments.event_types(outcome.payment_id) == ["PaymentInitiated", "PaymentDeclined"]
    declined = (await bank.read_stream(f"payment-{outcome.payment_id}"))[-1]
    assert declined.payload["declined_by"] == "processor"
    await _no_hold(bank)


async def test_a_risk_decline_names_the_rule(bank: EventStore, payments: Payments) -> None:
    limited = TEST_POLICY.model_copy(update={"risk_payment_limit_minor": 1_000})
    outcome = await payments.run("alice", "bob", 1_001, policy=limited)
    assert outcome.status == "DECLINED"
    declined = (await bank.read_stream(f"payment-{outcome.payment_id}"))[-1]
    assert (declined.payload["declined_by"], declined.payload["rule"]) == ("risk", "payment_limit")
    assert await payments.processor_calls(outcome.payment_id) == []  # never reached it
    await _no_hold(bank)


async def test_the_velocity_rule_declines_a_payer_that_pays_too_often(
    bank: EventStore, payments: Payments
) -> None:
    strict = TEST_POLICY.model_copy(update={"risk_velocity_count_max": 2})
    outcomes = [await payments.run("alice", "bob", 100, policy=strict) for _ in range(3)]
    assert [o.status for o in outcomes] == ["SETTLED", "SETTLED", "DECLINED"]
    declined = (await bank.read_stream(f"payment-{outcomes[2].payment_id}"))[-1]
    assert declined.payload["rule"] == "velocity"


async def test_bulk_funding_from_an_external_account_is_never_declined(
    bank: EventStore, payments: Payments
) -> None:
    strict = TEST_POLICY.model_copy(update={"risk_velocity_count_max": 1})
    outcomes = await asyncio.gather(
        *(payments.run("world-eur", "bob", 100, policy=strict) for _ in range(5))
    )
    assert {o.status for o in outcomes} == {"SETTLED"}


async def test_insufficient_funds_fails_and_voids_the_authorization_exactly_once(
    bank: EventStore, payments: Payments
) -> None:
    outcome = await payments.run("alice", "bob", 500_001)
    assert outcome.status == "FAILED"
    assert outcome.step == "reserve"
    assert "available" in (outcome.failure_reason or "")
    assert await payments.event_types(outcome.payment_id) == [
        "PaymentInitiated",
        "PaymentAuthorized",
        "AuthorizationVoided",
        "PaymentFailed",
    ]
    calls = await payments.processor_calls(outcome.payment_id)
    assert calls.count(("void", "voided")) == 1
    assert await payments.authorization_status(outcome.payment_id) == "voided"
    await _no_hold(bank)


async def test_a_flaky_processor_settles_after_retries_without_duplicate_events(
    bank: EventStore, payments: Payments
) -> None:
    flaky = TEST_POLICY.model_copy(update={"processor_attempts_max": 3})
    outcome = await payments.run("alice", "bob", 800, metadata={"simulate": "flaky"}, policy=flaky)
    assert outcome.status == "SETTLED"
    assert await payments.event_types(outcome.payment_id) == HAPPY
    calls = await payments.processor_calls(outcome.payment_id)
    # A flaky processor fails its captures twice too; each retry is one capture at most.
    assert calls == [
        ("authorize", "failed"),
        ("authorize", "failed"),
        ("authorize", "authorized"),
        ("capture", "failed"),
        ("capture", "failed"),
        ("capture", "captured"),
    ]
    assert len(await payments.captures(outcome.payment_id)) == 1


async def test_a_processor_timeout_is_compensated(bank: EventStore, payments: Payments) -> None:
    quick = TEST_POLICY.model_copy(
        update={"processor_timeout_s": 2, "processor_heartbeat_s": 1, "processor_attempts_max": 2}
    )
    outcome = await payments.run(
        "alice", "bob", 300, metadata={"simulate": "timeout"}, policy=quick
    )
    assert outcome.status == "FAILED"
    assert outcome.step == "authorize"
    assert await payments.event_types(outcome.payment_id) == ["PaymentInitiated", "PaymentFailed"]
    calls = await payments.processor_calls(outcome.payment_id)
    assert calls.count(("authorize", "unanswered")) == 2
    # Whatever the processor might have done, the saga asked it to void, which fences
    # the payment off: a late answer to the unanswered call can authorize nothing.
    assert ("void", "fenced") in calls
    assert await payments.authorization_status(outcome.payment_id) == "fenced"
    await _no_hold(bank)


async def test_a_cancel_during_a_slow_authorization_ends_cancelled(
    bank: EventStore, payments: Payments
) -> None:
    handle = await payments.start(
        "alice", "bob", 400, metadata={"simulate": "slow", "simulate_delay_s": 30}
    )
    await wait_for_state(
        handle, lambda s: s.step == "authorize" and "processor" in (s.waiting_for or "")
    )
    accepted = await handle.execute_update(
        PaymentWorkflow.cancel, CancelRequest(actor="ops:ana", reason="customer asked")
    )
    assert accepted.accepted
    outcome = await handle.result()
    assert outcome.status == "CANCELLED"
    assert outcome.failure_reason == "customer asked"
    types = await payments.event_types(outcome.payment_id)
    assert types[0] == "PaymentInitiated" and types[-1] == "PaymentCancelled"
    assert "FundsReserved" not in types
    cancelled = (await bank.read_stream(f"payment-{outcome.payment_id}"))[-1]
    assert cancelled.payload["cancelled_by"] == "ops:ana"
    assert cancelled.actor == "ops:ana"
    assert await payments.authorization_status(outcome.payment_id) in ("voided", "fenced")
    await _no_hold(bank)


async def test_a_cancel_after_settlement_is_refused(bank: EventStore, payments: Payments) -> None:
    handle = await payments.start("alice", "bob", 100)
    await handle.result()
    with pytest.raises((WorkflowUpdateFailedError, RPCError)):
        await handle.execute_update(PaymentWorkflow.cancel, CancelRequest(actor="ops"))
    assert await payments.event_types(handle.id.removeprefix("payment-")) == HAPPY


async def test_an_approved_payment_settles(bank: EventStore, payments: Payments) -> None:
    handle = await payments.start("alice", "bob", 5_000, policy=APPROVAL_POLICY)
    state = await wait_for_state(handle, lambda s: s.status == "PENDING_APPROVAL")
    assert "approve" in (state.waiting_for or "")
    # What the Temporal UI shows as the workflow's current details.
    metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    assert "approve" in metadata.current_details
    await handle.execute_update(PaymentWorkflow.approve, ApproveRequest(actor="ops:ana"))
    # A second decision is refused (by the validator, or because the payment is done).
    with pytest.raises((WorkflowUpdateFailedError, RPCError)):
        await handle.execute_update(PaymentWorkflow.approve, ApproveRequest(actor="ops:bo"))
    outcome = await handle.result()
    assert outcome.status == "SETTLED"
    assert await payments.event_types(outcome.payment_id) == [
        "PaymentInitiated",
        "PaymentAuthorized",
        "ApprovalRequested",
        "PaymentApproved",
        "FundsReserved",
        "PaymentSettled",
    ]


async def test_a_rejected_payment_is_compensated(bank: EventStore, payments: Payments) -> None:
    handle = await payments.start("alice", "bob", 7_000, policy=APPROVAL_POLICY)
    await wait_for_state(handle, lambda s: s.status == "PENDING_APPROVAL")
    await handle.execute_update(
        PaymentWorkflow.reject, RejectRequest(actor="ops:ana", reason="unknown beneficiary")
    )
    outcome = await handle.result()
    assert outcome.status == "REJECTED"
    assert await payments.event_types(outcome.payment_id) == [
        "PaymentInitiated",
        "PaymentAuthorized",
        "ApprovalRequested",
        "AuthorizationVoided",
        "PaymentRejected",
    ]
    calls = await payments.processor_calls(outcome.payment_id)
    assert calls.count(("void", "voided")) == 1
    await _no_hold(bank)


async def test_approve_is_refused_for_a_payment_not_waiting_for_approval(
    bank: EventStore, payments: Payments
) -> None:
    handle = await payments.start(
        "alice", "bob", 100, metadata={"simulate": "slow", "simulate_delay_s": 5}
    )
    await wait_for_state(handle, lambda s: s.step == "authorize")
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await handle.execute_update(PaymentWorkflow.approve, ApproveRequest(actor="ops"))
    assert "waiting for approval" in str(refused.value.cause)
    assert (await handle.result()).status == "SETTLED"


async def test_status_search_attribute_finds_exactly_the_payments_waiting_for_approval(
    bank: EventStore, payments: Payments, task_queue: str
) -> None:
    waiting = [
        await payments.start("alice", "bob", 6_000, policy=APPROVAL_POLICY) for _ in range(3)
    ]
    settled = await payments.run("alice", "bob", 100, policy=APPROVAL_POLICY)
    for handle in waiting:
        await wait_for_state(handle, lambda s: s.status == "PENDING_APPROVAL")
    query = f'PaymentStatus="PENDING_APPROVAL" AND TaskQueue="{task_queue}"'

    async def listed() -> set[str]:
        return {wf.id async for wf in payments.client.list_workflows(query)}

    await wait_for(lambda: _equals(listed, {h.id for h in waiting}), what="visibility")
    settled_query = f'PaymentStatus="SETTLED" AND TaskQueue="{task_queue}"'
    await wait_for(
        lambda: _contains(payments, settled_query, f"payment-{settled.payment_id}"),
        what="the settled payment in visibility",
    )
    for handle in waiting:
        await handle.execute_update(
            PaymentWorkflow.reject, RejectRequest(actor="ops", reason="test")
        )
        await handle.result()
    await wait_for(lambda: _equals(listed, set()), what="visibility after rejection")


async def _equals(listed, expected: set[str]) -> bool:
    return bool(await listed() == expected)


async def _contains(payments: Payments, query: str, workflow_id: str) -> bool:
    return workflow_id in {wf.id async for wf in payments.client.list_workflows(query)}


async def test_a_fee_rule_posts_the_fee_to_the_fees_account(
    bank: EventStore, payments: Payments
) -> None:
    with_fee = TEST_POLICY.model_copy(
        update={"fee_bps": 150, "fee_fixed_minor": 10, "fees_account_id": "fees"}
    )
    outcome = await payments.run("alice", "bob", 10_000, policy=with_fee)
    assert outcome.status == "SETTLED"
    settled = (await bank.read_stream(f"payment-{outcome.payment_id}"))[-1]
    assert settled.payload["fee_minor"] == 160  # 1.5 % of 100.00 EUR, plus 0.10 EUR
    assert (await bank.get_position("bob")).credits_posted == 9_840
    assert (await bank.get_position("fees")).credits_posted == 160
    assert (await bank.get_position("alice")).debits_posted == 10_000


async def test_cancelling_the_workflow_itself_still_compensates(
    bank: EventStore, payments: Payments
) -> None:
    """An operator's Cancel in the Temporal UI: the saga still undoes and closes the stream."""
    handle = await payments.start(
        "alice", "bob", 600, metadata={"simulate": "slow", "simulate_delay_s": 30}
    )
    await wait_for_state(handle, lambda s: "processor" in (s.waiting_for or ""))
    await handle.cancel()
    with pytest.raises(WorkflowFailureError):
        await handle.result()
    payment_id = handle.id.removeprefix("payment-")
    types = await payments.event_types(payment_id)
    assert (types[0], types[-1]) == ("PaymentInitiated", "PaymentCancelled")
    assert ("void", "fenced") in await payments.processor_calls(payment_id)
    await _no_hold(bank)


def test_a_reason_longer_than_the_ledger_takes_is_shortened_not_refused() -> None:
    """An error's message becomes a payment's reason; a long one (seen in a chaos run,
    under a processor outage) failed every workflow task, and the payment never closed."""
    stop = _Stop("FAILED", "authorize", "the processor did not answer: " + "x" * 2_000)
    assert len(stop.reason) == REASON_CHARS_MAX and stop.reason.endswith("…")
    close = Close(
        payment_id="p-long", status="FAILED", step="authorize", reason=stop.reason, actor="saga"
    )
    assert close.reason == stop.reason
    assert _Stop("FAILED", "authorize", "short").reason == "short"
