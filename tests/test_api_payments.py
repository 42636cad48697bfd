"""Payments over HTTP: submit, read, list, audit trail, cancel, approve, reject."""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
import uuid
from datetime import timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import workflow
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from api.app import create_app
from api.idempotency import derived_id
from ledger.store import EventStore
from paysaga.settings import Settings
from tests.harness.api import Api, make_keys, serve
from tests.harness.ledger import fund, open_account
from tests.harness.postgres import IsolatedDatabase
from tests.harness.read_side import project
from tests.harness.saga import Payments, wait_for
from worker import build_worker, payment_activities
from workflows.models import workflow_id_for

PAYMENT = {"payer_account_id": "alice", "payee_account_id": "bob", "currency": "EUR"}


@pytest.fixture
async def bank(api: Api, store: EventStore) -> Api:
    await api.open_account("alice")
    await api.open_account("bob", kind="merchant")
    await fund(store, "alice", 500_000)
    return api


async def _status(api: Api, payment_id: str) -> str:
    return str((await api.get(f"/v1/payments/{payment_id}")).json()["status"])


async def test_a_submitted_payment_is_accepted_then_settles(bank: Api) -> None:
    response = await bank.post(
        "/v1/payments", {**PAYMENT, "amount_minor": 12_500, "reference": "INV-7"}
    )
    assert response.status_code == 202
    body = response.json()
    payment_id = body["id"]
    assert body["status"] in ("INITIATED", "AUTHORIZED", "RESERVED", "SETTLED")
    assert body["status_url"] == f"/v1/payments/{payment_id}"
    assert response.headers["Location"] == body["status_url"]
    await wait_for(lambda: _is(bank, payment_id, "SETTLED"), what="settlement")
    settled = (await bank.get(f"/v1/payments/{payment_id}")).json()
    assert settled["amount_minor"] == 12_500 and settled["reference"] == "INV-7"
    assert settled["failure_reason"] is None
    alice = (await bank.get("/v1/accounts/alice")).json()["position"]
    assert (alice["posted"], alice["pending"], alice["available"]) == (487_500, 0, 487_500)


async def _is(api: Api, payment_id: str, status: str) -> bool:
    return await _status(api, payment_id) == status


async def test_wait_settled_answers_once_the_payment_has_ended(bank: Api) -> None:
    response = await bank.pay("alice", "bob", 300)
    assert response.status_code == 202
    assert response.json()["status"] == "SETTLED"
    declined = await bank.pay("alice", "bob", 300, metadata={"simulate": "decline"})
    assert declined.json()["status"] == "DECLINED"
    assert "do not honour" in declined.json()["failure_reason"]


async def test_a_running_payment_is_read_live_from_its_workflow(bank: Api) -> None:
    response = await bank.post(
        "/v1/payments",
        {**PAYMENT, "amount_minor": 200, "metadata": {"simulate": "slow", "simulate_delay_s": 4}},
    )
    payment_id = response.json()["id"]

    async def waiting_for_processor() -> bool:
        body = (await bank.get(f"/v1/payments/{payment_id}")).json()
        return "processor" in (body.get("waiting_for") or "")

    await wait_for(waiting_for_processor, what="the live state")
    await wait_for(lambda: _is(bank, payment_id, "SETTLED"), what="settlement")


async def test_a_payment_reads_from_the_ledger_after_temporal_forgot_it(
    bank: Api,
    store: EventStore,
    settings: Settings,
    owner_engine: AsyncEngine,
    time_skipping_env: WorkflowEnvironment,
) -> None:
    payment_id = (await bank.pay("alice", "bob", 700)).json()["id"]
    # An API whose Temporal has never heard of the payment: what retention leaves behind.
    forgetful = create_app(settings, store=store, temporal_client=time_skipping_env.client)
    async with serve(forgetful) as http:
        amnesiac = Api(http, bank.keys)
        body = (await amnesiac.get(f"/v1/payments/{payment_id}")).json()
        assert (body["status"], body["amount_minor"]) == ("SETTLED", 700)
        events = (await amnesiac.get(f"/v1/payments/{payment_id}/events")).json()["events"]
        assert [e["event_type"] for e in events][-1] == "PaymentSettled"
        cancel = await amnesiac.post(f"/v1/payments/{payment_id}/cancel", idempotency_key=None)
        assert cancel.status_code == 409
        assert "SETTLED" in cancel.json()["detail"]


async def test_an_unknown_payment_is_404(bank: Api) -> None:
    for path in ("/v1/payments/pay_nope", "/v1/payments/pay_nope/events", "/v1/payments/%20bad"):
        response = await bank.get(path)
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == "payment_not_found"


async def test_the_audit_trail_lists_the_ledger_events_with_their_hash_chain(bank: Api) -> None:
    payment_id = (await bank.pay("alice", "bob", 900)).json()["id"]
    response = await bank.get(f"/v1/payments/{payment_id}/events")
    assert response.status_code == 200
    events = response.json()["events"]
    assert [e["event_type"] for e in events] == [
        "PaymentInitiated",
        "PaymentAuthorized",
        "FundsReserved",
        "PaymentSettled",
    ]
    assert events[0]["prev_hash"] == "00" * 32
    for before, after in itertools.pairwise(events):
        assert after["prev_hash"] == before["hash"]
        assert after["global_seq"] > before["global_seq"]
    assert {e["correlation_id"] for e in events} == {f"payment-{payment_id}"}


async def test_payments_are_listed_newest_first_filtered_and_paged(
    bank: Api, store: EventStore, database: IsolatedDatabase
) -> None:
    await bank.open_account("carol")
    await fund(store, "carol", 10_000)
    ids = [(await bank.pay("alice", "bob", 100 + i)).json()["id"] for i in range(3)]
    carol = (await bank.pay("carol", "bob", 50)).json()["id"]
    declined = (await bank.pay("alice", "bob", 5, metadata={"simulate": "decline"})).json()["id"]
    # The list is a read model: it shows what the projector has applied.
    await project(store, database)

    everything = (await bank.get("/v1/payments", params={"limit": 200})).json()["payments"]
    listed = [p["id"] for p in everything]
    assert listed.index(declined) < listed.index(carol) < listed.index(ids[2])

    mine = (await bank.get("/v1/payments", params={"account_id": "carol"})).json()["payments"]
    # carol's own payment, then the one that funded her.
    assert mine[0]["id"] == carol and len(mine) == 2
    assert all("carol" in (p["payer_account_id"], p["payee_account_id"]) for p in mine)
    only_declined = (await bank.get("/v1/payments", params={"status": "DECLINED"})).json()
    assert [p["id"] for p in only_declined["payments"]] == [declined]
    assert only_declined["payments"][0]["failure_reason"]

    first = (await bank.get("/v1/payments", params={"account_id": "alice", "limit": 2})).json()
    second = (
        await bank.get(
            "/v1/payments",
            params={"account_id": "alice", "limit": 2, "cursor": first["next_cursor"]},
        )
    ).json()
    paged = [p["id"] for p in first["payments"] + second["payments"]]
    assert paged == [declined, ids[2], ids[1], ids[0]]
    assert second["next_cursor"] is not None  # alice's own funding payment is next
    for bad in ({"limit": 0}, {"limit": 201}, {"status": "LOST"}, {"cursor": "!!"}):
        response = await bank.get("/v1/payments", params=bad)
        assert response.status_code in (400, 422), bad


async def test_a_cancel_during_authorization_is_accepted_and_compensated(
    bank: Api, store: EventStore
) -> None:
    response = await bank.post(
        "/v1/payments",
        {**PAYMENT, "amount_minor": 400, "metadata": {"simulate": "slow", "simulate_delay_s": 30}},
    )
    payment_id = response.json()["id"]

    async def authorizing() -> bool:
        body = (await bank.get(f"/v1/payments/{payment_id}")).json()
        return "processor" in (body.get("waiting_for") or "")

    await wait_for(authorizing, what="authorization to start")
    cancel = await bank.post(
        f"/v1/payments/{payment_id}/cancel", {"reason": "customer asked"}, idempotency_key=None
    )
    assert cancel.status_code == 202, cancel.text
    assert cancel.json()["action"] == "cancel"
    await wait_for(lambda: _is(bank, payment_id, "CANCELLED"), what="cancellation")
    body = (await bank.get(f"/v1/payments/{payment_id}")).json()
    assert body["failure_reason"] == "customer asked"
    assert (await store.get_position("alice")).debits_pending == 0


async def test_a_cancel_after_settlement_is_a_409_that_says_why(bank: Api) -> None:
    payment_id = (await bank.pay("alice", "bob", 100)).json()["id"]
    response = await bank.post(f"/v1/payments/{payment_id}/cancel", idempotency_key=None)
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "cancel_refused"
    assert "SETTLED" in problem["detail"] or "settled" in problem["detail"]
    assert await _status(bank, payment_id) == "SETTLED"


async def test_approve_and_reject_are_for_ops_and_only_for_payments_waiting_for_approval(
    bank: Api, settings: Settings
) -> None:
    big = settings.approval_threshold_minor
    await fund_more(bank, 3 * big)
    waiting = [
        (await bank.post("/v1/payments", {**PAYMENT, "amount_minor": big})).json()["id"]
        for _ in range(2)
    ]
    for payment_id in waiting:
        await wait_for(
            functools.partial(_is, bank, payment_id, "PENDING_APPROVAL"), what="approval wait"
        )

    forbidden = await bank.post(f"/v1/payments/{waiting[0]}/approve", idempotency_key=None)
    assert forbidden.status_code == 403
    approved = await bank.post(
        f"/v1/payments/{waiting[0]}/approve",
        {"note": "checked"},
        caller="ops",
        idempotency_key=None,
    )
    assert approved.status_code == 202, approved.text
    rejected = await bank.post(
        f"/v1/payments/{waiting[1]}/reject",
        {"reason": "no invoice"},
        caller="ops",
        idempotency_key=None,
    )
    assert rejected.status_code == 202
    no_reason = await bank.post(
        f"/v1/payments/{waiting[1]}/reject", {}, caller="ops", idempotency_key=None
    )
    assert no_reason.status_code == 422

    await wait_for(lambda: _is(bank, waiting[0], "SETTLED"), what="settlement")
    await wait_for(lambda: _is(bank, waiting[1], "REJECTED"), what="rejection")
    again = await bank.post(
        f"/v1/payments/{waiting[0]}/approve", caller="ops", idempotency_key=None
    )
    assert again.status_code == 409
    assert again.json()["code"] == "approve_refused"
    small = (await bank.pay("alice", "bob", 10)).json()["id"]
    not_waiting = await bank.post(
        f"/v1/payments/{small}/reject", {"reason": "x"}, caller="ops", idempotency_key=None
    )
    assert not_waiting.status_code == 409


async def fund_more(api: Api, amount_minor: int) -> None:
    # The test's ledger is reachable through the app's state.
    store: EventStore = api.http._transport.app.state.store  # type: ignore[attr-defined]
    await fund(store, "alice", amount_minor)


async def test_an_action_no_worker_takes_is_a_503_within_its_bound_and_is_not_lost(
    settings: Settings,
    store: EventStore,
    temporal_client: Client,
    task_queue: str,
    owner_engine: AsyncEngine,
) -> None:
    """With the payment's worker down, cancel, approve and reject waited for ever: with
    no timeout, the SDK asks Temporal again and again until a worker takes the Update.
    Each now answers 503 within PAYSAGA_API_UPDATE_WAIT_S and changes nothing meanwhile.
    Temporal keeps the cancel: once a worker is back, the payment ends CANCELLED with its
    hold released, and the approve and reject, refused by the workflow, change nothing."""
    await open_account(store, "alice")
    await open_account(store, "bob", kind="merchant")
    await fund(store, "alice", 10_000)
    payments = Payments(temporal_client, store, task_queue)
    handle = await payments.start("alice", "bob", 700)  # no worker polls the queue yet
    payment_id = handle.id.removeprefix("payment-")
    quick = settings.model_copy(update={"api_update_wait_s": 1.0})
    keys = await make_keys(owner_engine, quick.api_key_secret.get_secret_value())
    async with serve(create_app(quick, store=store, temporal_client=temporal_client)) as http:
        api = Api(http, keys)
        for action, body, caller in (
            ("approve", None, "ops"),
            ("reject", {"reason": "no invoice"}, "ops"),
            ("cancel", {"reason": "the client changed its mind"}, "client"),
        ):
            started = time.monotonic()
            response = await api.post(
                f"/v1/payments/{payment_id}/{action}", body, caller=caller, idempotency_key=None
            )
            waited_s = time.monotonic() - started
            assert response.status_code == 503, response.text
            assert response.json()["code"] == "workflow_unresponsive"
            assert f"did not take the {action} within 1 s" in response.json()["detail"]
            assert response.headers["Retry-After"] == "5"
            assert waited_s < 10, f"{action} answered after {waited_s:.1f} s; its bound is 1 s"
        assert await payments.event_types(payment_id) == []

        activities = payment_activities(store, temporal_client)
        async with build_worker(
            temporal_client, quick, task_queue=task_queue, activities=activities
        ):
            outcome = await asyncio.wait_for(handle.result(), 60)
            assert outcome.status == "CANCELLED", outcome
            again = await api.post(
                f"/v1/payments/{payment_id}/cancel", caller="client", idempotency_key=None
            )
            assert again.status_code == 409, again.text
            assert again.json()["code"] == "cancel_refused"
        read = (await api.get(f"/v1/payments/{payment_id}")).json()
        assert (read["status"], read["failure_reason"]) == (
            "CANCELLED",
            "the client changed its mind",
        )
    assert "PaymentSettled" not in await payments.event_types(payment_id)
    assert (await store.get_position("alice")).debits_pending == 0


async def test_concurrent_reads_while_payments_run(bank: Api) -> None:
    responses = await asyncio.gather(*(bank.pay("alice", "bob", 10) for _ in range(5)))
    assert {r.json()["status"] for r in responses} == {"SETTLED"}


@workflow.defn(name="UnreadablePayment")
class UnreadablePayment:
    """A workflow under a payment's id whose status query fails, as a worker's does when
    it cannot replay the history to answer."""

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: False)

    @workflow.query
    def status(self) -> None:
        raise RuntimeError("Failed decoding arguments")


async def test_a_payment_whose_status_query_fails_is_a_503_to_retry_not_a_500(
    api: Api, store: EventStore, temporal_client: Client
) -> None:
    """Nothing in the ledger yet and a worker that cannot answer: the client is told to
    retry, never a 500 (and never a 404, which would invite a second payment)."""
    payment_id = derived_id("pay", "unreadable", str(uuid.uuid4()))
    queue = f"unreadable-{uuid.uuid4()}"
    # Unsandboxed: the sandbox would re-import this module, and its imports with it.
    async with Worker(
        temporal_client,
        task_queue=queue,
        workflows=[UnreadablePayment],
        workflow_runner=UnsandboxedWorkflowRunner(),
    ):
        handle = await temporal_client.start_workflow(
            UnreadablePayment.run,
            id=workflow_id_for(payment_id),
            task_queue=queue,
            execution_timeout=timedelta(minutes=2),
            retry_policy=RetryPolicy(maximum_attempts=1),
        )
        try:
            response = await api.get(f"/v1/payments/{payment_id}")
            assert response.status_code == 503, response.text
            assert response.json()["code"] == "payment_state_unavailable"
            assert response.headers["Retry-After"] == "1"
        finally:
            await handle.terminate("test over")
