"""A worker killed in the middle of a payment: a new one finishes it, nothing is duplicated."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.service import RPCError

from ledger.store import EventStore
from ledger.verify import check_ledger, verify_chain
from paysaga.settings import Settings
from tests.harness.ledger import fund, open_account
from tests.harness.saga import TEST_POLICY, Payments, wait_for, wait_for_state
from tests.harness.stack import clean_env
from worker import sweeper_schedule_id
from workflows.payment import PaymentWorkflow

pytestmark = pytest.mark.slow


@pytest.fixture
async def worker_processes(
    settings: Settings, temporal_client: Client
) -> AsyncIterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.kill()
        process.wait()
    # A real worker creates its queue's sweeper schedule; the test's queue dies with it.
    with contextlib.suppress(RPCError):
        await temporal_client.get_schedule_handle(sweeper_schedule_id(settings.task_queue)).delete()


def _start_worker(
    settings: Settings, started: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    # A service gets the application role's login, never the owner's.
    env = clean_env(
        TEMPORAL_ADDRESS=settings.temporal_target,
        TEMPORAL_NAMESPACE=settings.temporal_namespace,
        PAYSAGA_TASK_QUEUE=settings.task_queue,
        PAYSAGA_WORKER_SHUTDOWN_GRACE_S=str(settings.worker_shutdown_grace_s),
    )
    if settings.database_app_url:
        env["DATABASE_APP_URL"] = settings.database_app_url
    process = subprocess.Popen([sys.executable, "-m", "paysaga", "worker"], env=env)
    started.append(process)
    return process


async def test_a_payment_survives_its_worker_being_killed(
    store: EventStore,
    settings: Settings,
    temporal_client: Client,
    worker_processes: list[subprocess.Popen[bytes]],
) -> None:
    await open_account(store, "alice")
    await open_account(store, "bob", kind="merchant")
    await fund(store, "alice", 10_000)
    payments = Payments(temporal_client, store, settings.task_queue)
    first = _start_worker(settings, worker_processes)
    policy = TEST_POLICY.model_copy(
        update={"processor_heartbeat_s": 1, "processor_attempts_max": 3}
    )
    handle = await payments.start(
        "alice", "bob", 2_500, metadata={"simulate": "slow", "simulate_delay_s": 8}, policy=policy
    )
    payment_id = handle.id.removeprefix("payment-")
    # Mid-payment: initiated in the ledger, the processor call under way.
    await wait_for_state(handle, lambda s: "processor" in (s.waiting_for or ""), timeout_s=60)
    assert await payments.event_types(payment_id) == ["PaymentInitiated"]
    first.send_signal(signal.SIGKILL)
    first.wait()

    _start_worker(settings, worker_processes)
    outcome = await handle.result()
    assert outcome.status == "SETTLED"
    events = await store.read_stream(f"payment-{payment_id}")
    assert [e.event_type for e in events] == [
        "PaymentInitiated",
        "PaymentAuthorized",
        "FundsReserved",
        "PaymentSettled",
    ]
    assert len({e.event_id for e in events}) == 4
    calls = await payments.processor_calls(payment_id)
    assert calls.count(("authorize", "authorized")) == 1
    state = await handle.query(PaymentWorkflow.status)
    assert state.status == "SETTLED"
    assert (await store.get_position("bob")).credits_posted == 2_500

    async def settled_listed() -> bool:
        query = f'WorkflowId="{handle.id}" AND PaymentStatus="SETTLED"'
        return bool([wf async for wf in temporal_client.list_workflows(query)])

    await wait_for(settled_listed, what="visibility")


async def test_sigterm_lets_an_in_flight_activity_finish(
    store: EventStore,
    settings: Settings,
    temporal_client: Client,
    worker_processes: list[subprocess.Popen[bytes]],
) -> None:
    await open_account(store, "alice")
    await open_account(store, "bob", kind="merchant")
    await fund(store, "alice", 10_000)
    payments = Payments(temporal_client, store, settings.task_queue)
    graceful = settings.model_copy(update={"worker_shutdown_grace_s": 20})
    first = _start_worker(graceful, worker_processes)
    handle = await payments.start(
        "alice", "bob", 700, metadata={"simulate": "slow", "simulate_delay_s": 3}
    )
    await wait_for_state(handle, lambda s: "processor" in (s.waiting_for or ""), timeout_s=60)
    first.send_signal(signal.SIGTERM)
    # The worker waits for the processor call to finish, then exits cleanly.
    assert await asyncio.to_thread(first.wait, 30) == 0
    payment_id = handle.id.removeprefix("payment-")
    assert await payments.processor_calls(payment_id) == [("authorize", "authorized")]
    _start_worker(settings, worker_processes)
    outcome = await handle.result()
    assert outcome.status == "SETTLED"
    # One authorization, not retried: the first worker finished it before leaving.
    calls = await payments.processor_calls(payment_id)
    assert calls == [("authorize", "authorized"), ("capture", "captured")]


@pytest.mark.timeout(420)
async def test_a_worker_killed_again_and_again_never_leaves_the_processor_at_odds_with_the_ledger(
    store: EventStore,
    settings: Settings,
    temporal_client: Client,
    worker_processes: list[subprocess.Popen[bytes]],
) -> None:
    """Row 14: with two workers killed (SIGKILL) time and again while payments run, the
    retried workflow tasks re-ran local ledger steps, which once computed new payloads,
    conflicted, compensated and voided settled payments at the processor."""
    await open_account(store, "alice")
    await open_account(store, "bob", kind="merchant")
    await fund(store, "alice", 60_000)
    payments = Payments(temporal_client, store, settings.task_queue)
    workers = [_start_worker(settings, worker_processes) for _ in range(2)]
    policy = TEST_POLICY.model_copy(
        update={"processor_heartbeat_s": 1, "processor_attempts_max": 5}
    )
    chooser = random.Random(14)
    handles = []
    for index in range(40):
        amount = chooser.choice([500, 900, 1_200, 5_000])  # some are beyond alice's balance
        metadata: dict[str, Any] = chooser.choice(
            [{}, {}, {"simulate": "flaky"}, {"simulate": "decline"}]
        )
        if index % 5 == 0:
            metadata = {"simulate": "slow", "simulate_delay_s": 2}
        handles.append(
            await payments.start("alice", "bob", amount, metadata=metadata, policy=policy)
        )
        if index % 5 == 4:
            victim = workers.pop(0)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            await asyncio.sleep(chooser.uniform(0.1, 0.6))
            workers.append(_start_worker(settings, worker_processes))
    kills = 40 // 5
    outcomes = [await handle.result() for handle in handles]

    settled = 0
    for outcome in outcomes:
        payment_id = outcome.payment_id
        head = await store.stream_head(f"payment-{payment_id}")
        assert head is not None and head.closed, (payment_id, head)
        authorization = await payments.authorization_status(payment_id)
        voids = [c for c in await payments.processor_calls(payment_id) if c == ("void", "voided")]
        captures = await payments.captures(payment_id)
        if head.state == "settled":
            settled += 1
            assert outcome.status == "SETTLED"
            assert (authorization, voids) == ("captured", []), payment_id
            assert len(captures) == 1, (payment_id, captures)
        else:
            assert authorization in (None, "voided", "fenced"), (payment_id, authorization)
            assert len(voids) <= 1, (payment_id, voids)
            assert captures == [], (payment_id, captures)
    assert settled >= 10, f"only {settled} of 40 settled: the test proved little"
    assert kills == 8
    alice, bob = await store.get_position("alice"), await store.get_position("bob")
    assert (alice.debits_pending, bob.credits_pending) == (0, 0)
    assert alice.posted_minor + bob.posted_minor == 60_000
    for report in (await verify_chain(store.engine), await check_ledger(store.engine)):
        assert report.ok, report.lines()
