"""The read models after real traffic: each equals a fold of the log up to its checkpoint."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.events import PaymentDeclined
from ledger.projections import READ_MODELS
from ledger.projections.check import differences, read_table
from ledger.projections.fold import ReadModelFold
from ledger.projections.statement import STATEMENT
from ledger.projector import catch_up
from ledger.replay import materialise, plan_materialise, rebuild, seq_at
from ledger.store import EventStore
from ledger.verify import check_ledger
from tests.harness.ledger import Payment
from tests.harness.postgres import IsolatedDatabase
from tests.harness.read_side import connect_app, connect_owner, project


async def _mixed_traffic(bank: EventStore) -> dict[str, Payment]:
    payments = {
        "settled": Payment(bank, "alice", "bob", 10_000),
        "settled_with_fee": Payment(bank, "alice", "bob", 20_000),
        "released": Payment(bank, "alice", "bob", 5_000),
        "cancelled": Payment(bank, "alice", "bob", 7_000),
        "failed": Payment(bank, "alice", "bob", 3_000),
        "open": Payment(bank, "alice", "bob", 1_000),
        "declined": Payment(bank, "alice", "bob", 2_000),
    }
    await payments["settled"].settle_fully()
    await payments["settled_with_fee"].run("initiated", "authorized", "reserved")
    await bank.append(payments["settled_with_fee"].settled(fee_minor=500))
    await payments["released"].run(
        "initiated", "authorized", "reserved", "released", "voided", "failed"
    )
    await payments["cancelled"].run("initiated", "cancelled")
    await payments["failed"].run("initiated", "authorized", "voided", "failed")
    await payments["open"].run("initiated", "authorized", "reserved")
    await payments["declined"].run("initiated")
    await bank.append(
        payments["declined"].new(
            "decline",
            PaymentDeclined(
                payment_id=payments["declined"].payment_id,
                declined_by="processor",
                reason="do not honour",
            ),
        )
    )
    return payments


async def test_each_read_model_equals_a_fold_of_the_log(
    bank: EventStore, database: IsolatedDatabase
) -> None:
    payments = await _mixed_traffic(bank)
    assert await project(bank, database) > 0
    report = await check_ledger(bank.engine)
    assert report.ok, report.lines()
    assert report.read_models == 4

    async with bank.engine.connect() as conn:
        balance = (
            await conn.execute(text("SELECT * FROM projection.balances WHERE account_id='bob'"))
        ).one()
        statuses: dict[str, str] = dict(
            (await conn.execute(text("SELECT payment_id, status FROM projection.payments"))).all()
        )
    assert balance.credits_posted == 10_000 + 19_500
    assert balance.credits_pending == 1_000
    assert {p.payment_id: statuses[p.payment_id] for p in payments.values()} == {
        payments["settled"].payment_id: "SETTLED",
        payments["settled_with_fee"].payment_id: "SETTLED",
        payments["released"].payment_id: "FAILED",
        payments["cancelled"].payment_id: "CANCELLED",
        payments["failed"].payment_id: "FAILED",
        payments["open"].payment_id: "RESERVED",
        payments["declined"].payment_id: "DECLINED",
    }


async def test_an_event_recorded_before_rows_already_projected_reorders_the_time_columns(
    database: IsolatedDatabase, owner_engine: AsyncEngine
) -> None:
    """Two credits to one merchant can commit with global_seq and recorded_at in opposite
    orders (they land on different stripes). Written here as the owner, out of the
    ledger's path, to make that order certain: the statement's time-order columns, and
    so `as_of`, must come out exact whichever batch each event arrives in."""
    t0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
    seconds = [0, 0, 0, 10, 11, 20, 19, 18, 25, 17]  # 7 and 8 before 6, 10 before all
    at = {seq: t0 + timedelta(seconds=s) for seq, s in enumerate(seconds, 1)}
    events = [
        (
            1,
            "account-payer",
            1,
            "AccountOpened",
            {
                "account_id": "payer",
                "currency": "EUR",
                "kind": "customer",
                "overdraft_limit_minor": 10_000,
                "metadata": {},
            },
        ),
        (
            2,
            "account-shop",
            1,
            "AccountOpened",
            {
                "account_id": "shop",
                "currency": "EUR",
                "kind": "merchant",
                "overdraft_limit_minor": 0,
                "metadata": {},
            },
        ),
        (
            3,
            "account-fees",
            1,
            "AccountOpened",
            {
                "account_id": "fees",
                "currency": "EUR",
                "kind": "fees",
                "overdraft_limit_minor": 0,
                "metadata": {},
            },
        ),
        (4, "payment-a", 1, "PaymentInitiated", _initiated("a", 300)),
        (5, "payment-b", 1, "PaymentInitiated", _initiated("b", 500)),
        (6, "payment-a", 2, "FundsReserved", _reserved("a", 300)),
        (7, "payment-b", 2, "FundsReserved", _reserved("b", 500)),
        (8, "payment-b", 3, "PaymentSettled", _settled("b", 500, fee=20)),
        (
            9,
            "payment-a",
            3,
            "FundsReleased",
            {"payment_id": "a", "amount_minor": 300, "reason": "x"},
        ),
        (
            10,
            "payment-a",
            4,
            "PaymentFailed",
            {"payment_id": "a", "step": "reserve", "reason": "x"},
        ),
    ]
    async with owner_engine.begin() as conn:
        for seq, stream, version, kind, payload in events:
            await conn.execute(
                text(
                    "INSERT INTO events (global_seq, stream_id, stream_version, event_id, "
                    "event_type, schema_version, payload, actor, recorded_at, prev_hash, hash, "
                    "hash_scheme) VALUES (:seq, :stream, :version, :id, :kind, 1, "
                    "CAST(:payload AS jsonb), 'test', :at, :zero, :zero, 2)"
                ),
                {
                    "seq": seq,
                    "stream": stream,
                    "version": version,
                    "id": uuid.uuid4(),
                    "kind": kind,
                    "payload": json.dumps(payload),
                    "at": at[seq],
                    "zero": bytes(32),
                },
            )
    conn_app = await connect_app(database)
    try:
        # Batches that end between the late events and the rows they precede in time.
        for until in (6, 7, 8, 10):
            await catch_up(conn_app, STATEMENT, until=until, events_max=1 if until == 8 else 2)
    finally:
        await conn_app.close()

    await _assert_statement_exact(owner_engine, at, "the projector")

    # A replay from event 1 builds in bulk and puts the time order right once, at the
    # end: the same rows, whichever batches the late events fall in.
    for events_max in (1, 2, 3, 1_000):
        owner = await connect_owner(database)
        try:
            await rebuild(owner, STATEMENT, events_max=events_max, restart=True)
            leftovers = await owner.execute(
                "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'entries_bulk%'"
            )
            assert await leftovers.fetchone() == (0,), "the bulk build left its tables"
        finally:
            await owner.close()
        await _assert_statement_exact(owner_engine, at, f"a rebuild in batches of {events_max}")

    # `replay --until <instant>`: an instant stands for the events before the first one
    # recorded after it. At 18 s that is events 1 to 5: 7, 8 and 10 were recorded by
    # then, but 6 was not.
    instants = sorted(
        {t0 - timedelta(seconds=1)}
        | {a + timedelta(microseconds=d) for a in at.values() for d in (-1, 0, 1)}
    )
    owner = await connect_owner(database)
    try:
        for instant in instants:
            first_after = min((seq for seq, a in at.items() if a > instant), default=len(at) + 1)
            assert await seq_at(owner, instant) == first_after - 1, instant
        until = await seq_at(owner, t0 + timedelta(seconds=18))
        assert until == 5
        for projection in READ_MODELS.values():
            await plan_materialise(owner, projection, "inquiry", until)
            await materialise(owner, projection, "inquiry", until)
    finally:
        await owner.close()
    async with owner_engine.connect() as conn:
        rows = (await conn.execute(text("SELECT * FROM events ORDER BY global_seq"))).all()
        fold = ReadModelFold()
        for row in rows[:until]:
            fold.apply(row)
        for name in READ_MODELS:
            table = await read_table(conn, name, "inquiry")
            assert differences(name, fold.rows(name), table) == [], name


async def _assert_statement_exact(
    owner_engine: AsyncEngine, at: dict[int, datetime], built_by: str
) -> None:
    async with owner_engine.connect() as conn:
        rows = (await conn.execute(text("SELECT * FROM events ORDER BY global_seq"))).all()
        fold = ReadModelFold()
        for row in rows:
            fold.apply(row)
        assert (
            differences("statement", fold.rows("statement"), await read_table(conn, "statement"))
            == []
        ), built_by
        instants = sorted(
            {
                a + d
                for a in at.values()
                for d in (timedelta(0), timedelta(microseconds=-1), timedelta(microseconds=1))
            }
        )
        for account in ("payer", "shop", "fees"):
            for instant in instants:
                expected = _fold_until(rows, account, instant)
                got = (
                    await conn.execute(
                        text(
                            "SELECT at_debits_pending, at_debits_posted, at_credits_pending, "
                            "at_credits_posted FROM projection.entries WHERE account_id = :a "
                            "AND recorded_at <= :t ORDER BY recorded_at DESC, global_seq DESC "
                            "LIMIT 1"
                        ),
                        {"a": account, "t": instant},
                    )
                ).one_or_none()
                assert tuple(got or (0, 0, 0, 0)) == expected, (built_by, account, instant)


def _initiated(payment_id: str, amount: int) -> dict[str, Any]:
    return {
        "payment_id": payment_id,
        "payer_account_id": "payer",
        "payee_account_id": "shop",
        "amount_minor": amount,
        "currency": "EUR",
        "reference": None,
        "metadata": {},
    }


def _reserved(payment_id: str, amount: int) -> dict[str, Any]:
    return {
        "payment_id": payment_id,
        "payer_account_id": "payer",
        "payee_account_id": "shop",
        "amount_minor": amount,
        "currency": "EUR",
        "expires_at": "2026-11-24T10:00:00Z",
    }


def _settled(payment_id: str, amount: int, fee: int) -> dict[str, Any]:
    return {
        "payment_id": payment_id,
        "currency": "EUR",
        "fee_minor": fee,
        "postings": [
            {"account_id": "payer", "side": "debit", "amount_minor": amount},
            {"account_id": "shop", "side": "credit", "amount_minor": amount - fee},
            {"account_id": "fees", "side": "credit", "amount_minor": fee},
        ],
    }


def _fold_until(rows: Sequence[Any], account: str, instant: datetime) -> tuple[int, int, int, int]:
    """(dp, dP, cp, cP) of `account` from every event recorded at or before `instant`."""
    fold = ReadModelFold()
    for row in rows:
        fold.apply(row)
    total = [0, 0, 0, 0]
    for entry in fold.entries.get(account, {}).values():
        if entry.recorded_at <= instant:
            total = [t + d for t, d in zip(total, entry.deltas, strict=True)]
    return (total[0], total[1], total[2], total[3])
