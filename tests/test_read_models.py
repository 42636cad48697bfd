"""The read models after real traffic: each equals a fold of the log up to its checkpoint."""

from __future__ import annotations

from sqlalchemy import text

from ledger.store import EventStore
from ledger.verify import check_ledger
from tests.harness.ledger import Payment
from tests.harness.postgres import IsolatedDatabase
from tests.harness.read_side import project


async def _mixed_traffic(bank: EventStore) -> dict[str, Payment]:
    payments = {
        "settled": Payment(bank, "alice", "bob", 10_000),
        "settled_with_fee": Payment(bank, "alice", "bob", 20_000),
        "released": Payment(bank, "alice", "bob", 5_000),
        "cancelled": Payment(bank, "alice", "bob", 7_000),
        "failed": Payment(bank, "alice", "bob", 3_000),
        "open": Payment(bank, "alice", "bob", 1_000),
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
    }
