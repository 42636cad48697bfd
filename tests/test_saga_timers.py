"""Deadlines and expiries, on the time-skipping test server: a day passes in a moment."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from temporalio.testing import WorkflowEnvironment

from activities.ledger import LedgerActivities
from activities.processor import (
    Authorizer,
    ProcessorActivities,
    ProcessorUnavailable,
    SimulatedProcessor,
)
from ledger.store import EventStore
from paysaga.settings import Settings
from tests.harness.ledger import fund, open_account
from tests.harness.saga import TEST_POLICY, Payments, wait_for_state
from worker import build_worker
from workflows.models import CaptureRequest, CaptureResult


@pytest.fixture
async def bank(store: EventStore) -> EventStore:
    await open_account(store, "alice")
    await open_account(store, "bob", kind="merchant")
    await fund(store, "alice", 500_000)
    return store


class ProcessorOutageAtCapture(SimulatedProcessor):
    """The processor fails every capture (an outage), and nothing else."""

    async def capture(self, request: CaptureRequest, attempt: int) -> CaptureResult:
        raise ProcessorUnavailable("the processor is unavailable (injected outage)")


@asynccontextmanager
async def _worker_payments(
    env: WorkflowEnvironment,
    store: EventStore,
    settings: Settings,
    task_queue: str,
    ledger: LedgerActivities,
    authorizer: Authorizer | None = None,
) -> AsyncIterator[Payments]:
    processor = ProcessorActivities(authorizer or SimulatedProcessor(store.engine), ledger)
    activities = [*ledger.all(), *processor.all()]
    async with build_worker(env.client, settings, task_queue=task_queue, activities=activities):
        yield Payments(env.client, store, task_queue)


@pytest.fixture
async def skipping(
    time_skipping_env: WorkflowEnvironment, bank: EventStore, settings: Settings, task_queue: str
) -> AsyncIterator[Payments]:
    async with _worker_payments(
        time_skipping_env, bank, settings, task_queue, LedgerActivities(bank)
    ) as payments:
        yield payments


async def test_an_approval_deadline_that_passes_rejects_and_compensates(
    skipping: Payments, bank: EventStore
) -> None:
    policy = TEST_POLICY.model_copy(
        update={"approval_threshold_minor": 1_000, "approval_deadline_s": 86_400}
    )
    handle = await skipping.start("alice", "bob", 2_000, policy=policy)
    outcome = await handle.result()  # the test server skips the day
    assert outcome.status == "REJECTED"
    assert outcome.failure_reason == "the approval deadline passed"
    assert await skipping.event_types(outcome.payment_id) == [
        "PaymentInitiated",
        "PaymentAuthorized",
        "ApprovalRequested",
        "AuthorizationVoided",
        "PaymentRejected",
    ]
    assert (await skipping.processor_calls(outcome.payment_id)).count(("void", "voided")) == 1
    assert (await bank.get_position("alice")).debits_pending == 0


async def test_a_hold_that_expires_before_the_capture_is_released_behind_a_capture_fence(
    time_skipping_env: WorkflowEnvironment, bank: EventStore, settings: Settings, task_queue: str
) -> None:
    policy = TEST_POLICY.model_copy(update={"hold_expiry_s": 120})
    async with _worker_payments(
        time_skipping_env,
        bank,
        settings,
        task_queue,
        LedgerActivities(bank),
        ProcessorOutageAtCapture(bank.engine),
    ) as payments:
        handle = await payments.start("alice", "bob", 3_000, policy=policy)
        state = await wait_for_state(handle, lambda s: s.status == "RESERVED")
        assert state.hold_expires_at is not None
        outcome = await handle.result()
    assert outcome.status == "FAILED"
    assert (outcome.step, outcome.failure_reason) == (
        "settle",
        "the hold expired before settlement",
    )
    assert await payments.event_types(outcome.payment_id) == [
        "PaymentInitiated",
        "PaymentAuthorized",
        "FundsReserved",
        "FundsReleased",
        "AuthorizationVoided",
        "PaymentFailed",
    ]
    # Nothing was captured, and the processor fenced captures off before the release.
    assert await payments.captures(outcome.payment_id) == []
    calls = await payments.processor_calls(outcome.payment_id)
    assert calls.index(("fence_capture", "fenced")) < calls.index(("void", "voided"))
    assert await payments.authorization_status(outcome.payment_id) == "voided"
    alice, bob = await bank.get_position("alice"), await bank.get_position("bob")
    assert (alice.debits_pending, bob.credits_pending, alice.posted_minor) == (0, 0, 500_000)
