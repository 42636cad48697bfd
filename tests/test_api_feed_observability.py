"""The event feed, request ids, metrics and structured logs."""

from __future__ import annotations

import io
import json
import logging
import uuid

import psycopg
from sqlalchemy import text

from ledger.db import to_libpq_url
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


async def test_the_feed_delivers_a_late_commit_exactly_once_and_in_order(
    api: Api, store: EventStore, database: IsolatedDatabase
) -> None:
    """An append takes its global_seq, then stays uncommitted while later events commit.

    The feed stops below it, as long as it may still commit; once it commits, the feed
    hands it out, then the later ones: every event exactly once, in order.
    """
    await open_account(store, "a")
    delivered = await _drain(api, after_seq=0)
    urls = database.urls
    with psycopg.connect(to_libpq_url(urls.app_url)) as held:
        held_seq = held.execute(
            "SELECT global_seq FROM ledger_append(%s, 'account-held', 'AccountOpened', 1, "
            "%s::jsonb, 'test', NULL, NULL, NULL, NULL)",
            (
                uuid.uuid4(),
                json.dumps(
                    {
                        "account_id": "held",
                        "currency": "EUR",
                        "kind": "customer",
                        "overdraft_limit_minor": 0,
                        "metadata": {},
                    }
                ),
            ),
        ).fetchone()[0]  # type: ignore[index]
        for account in ("b", "c", "d"):
            await open_account(store, account)
        later = [e.global_seq for e in await store.read_range(after_seq=held_seq)]
        assert later and min(later) > held_seq  # they committed; the held one has not

        delivered += await _drain(api, after_seq=delivered[-1])
        assert max(delivered) < held_seq, "the feed skipped past an uncommitted append"
        metrics = api.http._transport.app.state.metrics  # type: ignore[attr-defined]
        await metrics.refresh_ledger_lags(store)
        lag = (await api.get("/metrics")).text
        assert "paysaga_ledger_horizon_lag_events 4.0" in lag
        held.commit()

    delivered += await _drain(api, after_seq=delivered[-1])
    every = [e.global_seq for e in await store.read_range(after_seq=0)]
    assert delivered == every
    assert held_seq in delivered and len(delivered) == len(set(delivered))


async def test_a_rolled_back_append_is_passed_at_once(
    api: Api, store: EventStore, database: IsolatedDatabase
) -> None:
    await open_account(store, "a")
    with psycopg.connect(to_libpq_url(database.urls.owner_url), autocommit=True) as conn:
        gap = conn.execute("SELECT nextval('events_global_seq')").fetchone()[0]  # type: ignore[index]
    await open_account(store, "b")
    page = (await api.get("/v1/events", params={"after_seq": 0})).json()
    assert [e["global_seq"] for e in page["events"]] == [gap - 1, gap + 1]
    assert page["next_after_seq"] == page["safe_seq"] == gap + 1


async def _drain(api: Api, *, after_seq: int) -> list[int]:
    """Page through the feed from after_seq until it has nothing more to give."""
    seqs: list[int] = []
    while True:
        page = (await api.get("/v1/events", params={"after_seq": after_seq, "limit": 2})).json()
        seqs += [e["global_seq"] for e in page["events"]]
        if page["next_after_seq"] == after_seq:
            return seqs
        after_seq = page["next_after_seq"]


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
