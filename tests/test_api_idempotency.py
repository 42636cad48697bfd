"""Idempotency-Key: every rule, and 20 concurrent identical POSTs making one payment."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sqlalchemy import text
from temporalio.client import Client

from ledger.store import EventStore
from tests.harness.api import Api
from tests.harness.ledger import fund

BODY = {
    "payer_account_id": "alice",
    "payee_account_id": "bob",
    "amount_minor": 250,
    "currency": "EUR",
}


@pytest.fixture
async def bank(api: Api, store: EventStore) -> Api:
    await api.open_account("alice")
    await api.open_account("bob", kind="merchant")
    await fund(store, "alice", 100_000)
    return api


async def _initiated(store: EventStore) -> int:
    async with store.engine.connect() as conn:
        return int(
            (
                await conn.execute(
                    text("SELECT count(*) FROM events WHERE event_type = 'PaymentInitiated'")
                )
            ).scalar_one()
        )


async def _workflows(client: Client, task_queue: str) -> int:
    return len([wf async for wf in client.list_workflows(f'TaskQueue="{task_queue}"')])


async def test_a_post_without_a_key_is_400_and_creates_nothing(
    bank: Api, store: EventStore
) -> None:
    before = await _initiated(store)
    response = await bank.post("/v1/payments", BODY, idempotency_key=None)
    assert response.status_code == 400
    assert response.json()["code"] == "idempotency_key_missing"
    for bad in ("", "has space", "x" * 256, "tab\there"):
        refused = await bank.post("/v1/payments", BODY, idempotency_key=bad)
        assert refused.status_code == 400, bad
    assert (
        await bank.post(
            "/v1/accounts", {"currency": "EUR", "kind": "customer"}, idempotency_key=None
        )
    ).status_code == 400
    assert await _initiated(store) == before


async def test_the_same_key_and_body_replays_the_original_response(bank: Api) -> None:
    key = str(uuid.uuid4())
    first = await bank.post("/v1/payments", BODY, idempotency_key=key)
    again = await bank.post("/v1/payments", dict(reversed(BODY.items())), idempotency_key=key)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers


async def test_the_same_key_with_another_body_is_422(bank: Api, store: EventStore) -> None:
    key = str(uuid.uuid4())
    await bank.post("/v1/payments", BODY, idempotency_key=key, params={"wait": "settled"})
    before = await _initiated(store)
    response = await bank.post("/v1/payments", {**BODY, "amount_minor": 251}, idempotency_key=key)
    assert response.status_code == 422
    assert response.json()["code"] == "idempotency_key_reused"
    assert await _initiated(store) == before


async def test_the_same_key_while_the_first_request_is_in_flight_is_409(bank: Api) -> None:
    key = str(uuid.uuid4())
    slow = {**BODY, "metadata": {"simulate": "slow", "simulate_delay_s": 3}}
    first = asyncio.create_task(
        bank.post("/v1/payments", slow, idempotency_key=key, params={"wait": "settled"})
    )
    await asyncio.sleep(1.0)  # the first request is waiting for its payment to settle
    second = await bank.post("/v1/payments", slow, idempotency_key=key)
    assert second.status_code == 409
    assert second.json()["code"] == "idempotency_key_in_flight"
    assert second.headers["Retry-After"] == "1"
    assert (await first).json()["status"] == "SETTLED"
    third = await bank.post("/v1/payments", slow, idempotency_key=key)
    assert third.status_code == 202 and third.json()["status"] == "SETTLED"


async def test_keys_are_scoped_to_the_api_key_that_sent_them(bank: Api, store: EventStore) -> None:
    key = str(uuid.uuid4())
    mine = await bank.post(
        "/v1/accounts", {"currency": "EUR", "kind": "customer"}, idempotency_key=key
    )
    theirs = await bank.post(
        "/v1/accounts",
        {"currency": "EUR", "kind": "customer"},
        idempotency_key=key,
        caller="accounts",
    )
    assert mine.status_code == theirs.status_code == 201
    assert mine.json()["id"] != theirs.json()["id"]


async def test_twenty_concurrent_identical_posts_create_exactly_one_payment(
    bank: Api,
    store: EventStore,
    payments,
    task_queue: str,
) -> None:
    before_events = await _initiated(store)
    before_workflows = await _workflows(payments.client, task_queue)
    key = str(uuid.uuid4())
    responses = await asyncio.gather(
        *(
            bank.post("/v1/payments", BODY, idempotency_key=key, params={"wait": "settled"})
            for _ in range(20)
        )
    )
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {202, 409}
    accepted = [r for r in responses if r.status_code == 202]
    assert accepted
    assert len({r.json()["id"] for r in accepted}) == 1
    assert await _initiated(store) - before_events == 1

    async def one_more_workflow() -> bool:
        return await _workflows(payments.client, task_queue) - before_workflows == 1

    from tests.harness.saga import wait_for

    await wait_for(one_more_workflow, what="visibility")


async def test_a_bad_request_leaves_no_idempotency_record(bank: Api, store: EventStore) -> None:
    key = str(uuid.uuid4())
    bad = await bank.post(
        "/v1/payments", {**BODY, "payee_account_id": "nobody"}, idempotency_key=key
    )
    assert bad.status_code == 422
    # The same key is still free: nothing remembered it.
    good = await bank.post("/v1/payments", BODY, idempotency_key=key)
    assert good.status_code == 202
    assert "Idempotent-Replayed" not in good.headers
