"""Idempotency-Key: every rule, and 20 concurrent identical POSTs making one payment."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from api.app import create_app
from api.idempotency import IN_FLIGHT_LEASE_S, derived_id
from api.routers import payments as payments_router
from ledger.db import to_libpq_url
from ledger.events import payment_stream
from ledger.store import EventStore
from paysaga.settings import Settings
from tests.harness.api import Api, serve
from tests.harness.ledger import fund
from tests.harness.postgres import IsolatedDatabase, PostgresServer
from tests.harness.saga import wait_for

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


async def _key_row(store: EventStore, idempotency_key: str) -> tuple[str, bool] | None:
    """The key's state and whether a retry may take it over now, or None if it is gone."""
    async with store.engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT state, locked_until <= now() AS free FROM idempotency_keys "
                    "WHERE idempotency_key = :key"
                ),
                {"key": idempotency_key},
            )
        ).one_or_none()
    return None if row is None else (row.state, row.free)


async def test_a_request_outlasting_the_lease_keeps_its_key_until_it_answers(bank: Api) -> None:
    key = str(uuid.uuid4())
    delay_s = int(IN_FLIGHT_LEASE_S) + 3
    slow = {**BODY, "metadata": {"simulate": "slow", "simulate_delay_s": delay_s}}
    first = asyncio.create_task(
        bank.post("/v1/payments", slow, idempotency_key=key, params={"wait": "settled"})
    )
    # Past the lease the first request is still working: its renewals keep the key.
    await asyncio.sleep(IN_FLIGHT_LEASE_S + 1)
    second = await bank.post("/v1/payments", slow, idempotency_key=key)
    assert second.status_code == 409, second.text
    assert second.json()["code"] == "idempotency_key_in_flight"
    answered = await first
    assert answered.status_code == 202 and answered.json()["status"] == "SETTLED"
    again = await bank.post("/v1/payments", slow, idempotency_key=key)
    assert again.json() == answered.json()
    assert again.headers["Idempotent-Replayed"] == "true"


async def test_a_request_temporal_refuses_leaves_no_key(
    bank: Api, settings: Settings, store: EventStore, temporal_client: Client
) -> None:
    """Temporal refused to start the workflow, so nothing exists: the key is released."""
    nowhere = await Client.connect(
        temporal_client.service_client.config.target_host,
        namespace=f"missing-{uuid.uuid4().hex[:8]}",
        data_converter=pydantic_data_converter,
    )
    before = await _initiated(store)
    key = str(uuid.uuid4())
    async with serve(create_app(settings, store=store, temporal_client=nowhere)) as http:
        refused = await Api(http, bank.keys).post("/v1/payments", BODY, idempotency_key=key)
    assert refused.status_code == 503, refused.text
    assert refused.json()["code"] == "temporal_unavailable"
    assert await _key_row(store, key) is None
    # Nothing remembers the key: even another body may use it now.
    other = await bank.post(
        "/v1/payments", {**BODY, "amount_minor": 7}, idempotency_key=key, params={"wait": "settled"}
    )
    assert other.status_code == 202, other.text
    assert "Idempotent-Replayed" not in other.headers
    assert await _initiated(store) == before + 1


async def test_a_request_cut_off_from_the_database_is_a_503_and_its_retry_finishes_the_job(
    bank: Api,
    store: EventStore,
    owner_engine: AsyncEngine,
    pg_server: PostgresServer,
    database: IsolatedDatabase,
) -> None:
    """The database drops the request's connection after the payment started (a restart,
    as the API sees it): the key is handed over at once, not held for a lease, and the
    retry answers with the same payment."""
    key = str(uuid.uuid4())
    slow = {**BODY, "metadata": {"simulate": "slow", "simulate_delay_s": 3}}
    before = await _initiated(store)
    first = asyncio.create_task(
        bank.post("/v1/payments", slow, idempotency_key=key, params={"wait": "settled"})
    )
    await _until_started(store, derived_id("pay", bank.keys["client"].split("_")[1], key))
    async with owner_engine.connect() as locker:
        # Every write to the keys waits here, where the test can cut its connection.
        await locker.execute(text("LOCK TABLE idempotency_keys IN ACCESS EXCLUSIVE MODE"))
        await _cut_writes_to_the_keys_until_completion(pg_server, database.name)
        await locker.rollback()
    response = await first
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "database_unavailable"
    assert await _key_row(store, key) == ("in_flight", True)

    retried = await bank.post("/v1/payments", slow, idempotency_key=key, params={"wait": "settled"})
    assert retried.status_code == 202, retried.text
    assert retried.json()["status"] == "SETTLED"
    assert "Idempotent-Replayed" not in retried.headers
    assert await _initiated(store) == before + 1
    replayed = await bank.post("/v1/payments", slow, idempotency_key=key)
    assert replayed.json()["id"] == retried.json()["id"]
    assert replayed.headers["Idempotent-Replayed"] == "true"


CUT_TIMEOUT_S = 30.0


async def _until_started(store: EventStore, payment_id: str) -> None:
    async def initiated() -> bool:
        return bool(await store.read_stream(payment_stream(payment_id)))

    await wait_for(initiated, what="the payment to start")


async def _cut_writes_to_the_keys_until_completion(server: PostgresServer, database: str) -> None:
    """Terminate every connection waiting to write idempotency_keys, until the one that
    stores a request's answer has been cut too."""
    waiting = (
        "SELECT pid, query FROM pg_stat_activity WHERE datname = %s "
        "AND wait_event_type = 'Lock' AND query LIKE '%%idempotency_keys%%'"
    )
    deadline = asyncio.get_running_loop().time() + CUT_TIMEOUT_S
    async with await psycopg.AsyncConnection.connect(
        to_libpq_url(server.admin_url), autocommit=True
    ) as admin:
        while True:
            rows = await (await admin.execute(waiting, (database,))).fetchall()
            for pid, _query in rows:
                await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            if any("state = 'completed'" in query for _pid, query in rows):
                return
            assert asyncio.get_running_loop().time() < deadline, "no answer was stored"
            await asyncio.sleep(0.05)


async def test_a_wait_past_its_bound_answers_with_where_the_payment_stands(
    bank: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(payments_router, "WAIT_SETTLED_S_MAX", 1.0)
    slow = {**BODY, "metadata": {"simulate": "slow", "simulate_delay_s": 4}}
    response = await bank.post("/v1/payments", slow, params={"wait": "settled"})
    assert response.status_code == 202, response.text
    assert response.json()["status"] not in ("SETTLED", "DECLINED", "FAILED")
    payment_id = response.json()["id"]

    async def settled() -> bool:
        return bool((await bank.get(f"/v1/payments/{payment_id}")).json()["status"] == "SETTLED")

    await wait_for(settled, what="settlement")
