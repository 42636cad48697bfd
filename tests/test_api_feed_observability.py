"""The event feed, request ids, metrics and structured logs."""

from __future__ import annotations

import asyncio
import io
import json
import logging

from sqlalchemy import text

from ledger.store import EventStore
from paysaga.logs import JsonFormatter
from tests.harness.api import Api
from tests.harness.ledger import Payment, fund, open_account
from tests.harness.postgres import IsolatedDatabase


async def test_the_feed_pages_through_every_event_in_order(api: Api, store: EventStore) -> None:
    await open_account(store, "a")
    await open_account(store, "b")
    await fund(store, "a", 1_000)
    for _ in range(3):
        await Payment(store, "a", "b", 10).settle_fully()
    seen = []
    after = 0
    while True:
        page = (await api.get("/v1/events", params={"after_seq": after, "limit": 5})).json()
        if not page["events"]:
            break
        seen += page["events"]
        after = page["next_after_seq"]
    total = len(await store.read_range(limit=10_000))
    assert [e["global_seq"] for e in seen] == sorted(e["global_seq"] for e in seen)
    assert len(seen) == total
    for bad in ({"after_seq": -1}, {"limit": 0}, {"limit": 1001}):
        assert (await api.get("/v1/events", params=bad)).status_code == 422


async def test_the_feed_waits_at_a_gap_that_a_late_commit_may_still_fill(
    api: Api, store: EventStore, database: IsolatedDatabase
) -> None:
    import psycopg

    from ledger.db import to_libpq_url

    await open_account(store, "a")
    # A sequence number taken by an append that has not committed (here: never will).
    with psycopg.connect(to_libpq_url(database.urls.owner_url), autocommit=True) as conn:
        gap = conn.execute("SELECT nextval('events_global_seq')").fetchone()[0]  # type: ignore[index]
    await open_account(store, "b")
    page = (await api.get("/v1/events", params={"after_seq": 0})).json()
    assert [e["global_seq"] for e in page["events"]] == [gap - 1]
    assert page["next_after_seq"] == gap - 1
    await asyncio.sleep(2.2)  # past the grace: the gap is a rolled-back append
    page = (await api.get("/v1/events", params={"after_seq": page["next_after_seq"]})).json()
    assert [e["global_seq"] for e in page["events"]] == [gap + 1]


async def test_every_response_carries_a_request_id(api: Api) -> None:
    echoed = await api.http.get("/healthz", headers={"X-Request-Id": "req-abc.123"})
    assert echoed.headers["X-Request-Id"] == "req-abc.123"
    generated = await api.http.get("/healthz")
    assert len(generated.headers["X-Request-Id"]) == 36
    unsafe = await api.http.get("/healthz", headers={"X-Request-Id": "bad id\twith spaces"})
    assert unsafe.headers["X-Request-Id"] != "bad id\twith spaces"
    problem = await api.http.get(
        "/v1/payments/pay_nope", headers={**api.headers(), "X-Request-Id": "req-404"}
    )
    assert problem.headers["X-Request-Id"] == "req-404"
    assert problem.json()["request_id"] == "req-404"


async def test_metrics_count_requests_and_payments_by_terminal_status(
    api: Api, store: EventStore
) -> None:
    await api.open_account("alice")
    await api.open_account("bob", kind="merchant")
    await fund(store, "alice", 1_000)
    await api.pay("alice", "bob", 10)
    await api.pay("alice", "bob", 10, metadata={"simulate": "decline"})
    app = api.http._transport.app  # type: ignore[attr-defined]
    await app.state.metrics.refresh_payments(store)
    metrics = (await api.http.get("/metrics")).text
    assert (
        'paysaga_http_requests_total{method="POST",route="/v1/payments",status="202"} 2.0'
        in metrics
    )
    assert 'paysaga_payments{status="DECLINED"} 1.0' in metrics
    # The funding payment settled too.
    assert 'paysaga_payments{status="SETTLED"} 2.0' in metrics


async def test_logs_are_json_lines_with_request_payment_and_workflow_ids(
    api: Api, store: EventStore
) -> None:
    await api.open_account("alice")
    await api.open_account("bob", kind="merchant")
    await fund(store, "alice", 1_000)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("api"))
    logger = logging.getLogger("paysaga")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        response = await api.http.post(
            "/v1/payments",
            params={"wait": "settled"},
            json={
                "payer_account_id": "alice",
                "payee_account_id": "bob",
                "amount_minor": 5,
                "currency": "EUR",
            },
            headers={**api.headers(), "Idempotency-Key": "log-test", "X-Request-Id": "req-log"},
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    payment_id = response.json()["id"]
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    started = next(line for line in lines if line["msg"] == "payment started")
    assert started["request_id"] == "req-log"
    assert started["payment_id"] == payment_id
    assert started["workflow_id"] == f"payment-{payment_id}"
    request_line = next(line for line in lines if line["msg"] == "request")
    assert (request_line["route"], request_line["status"]) == ("/v1/payments", 202)
    async with store.engine.connect() as conn:
        initiated = (
            await conn.execute(
                text("SELECT causation_id FROM events WHERE stream_id = :s AND stream_version = 1"),
                {"s": f"payment-{payment_id}"},
            )
        ).scalar_one_or_none()
    # The audit trail links the payment's first event to the request that caused it.
    assert initiated == "req-log"
