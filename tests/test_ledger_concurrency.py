"""Many connections at once: no overdraft, one winner per version, no duplicates, no deadlock."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger import errors
from ledger.store import AppendResult, EventStore, NewEvent
from ledger.verify import check_ledger, verify_chain
from paysaga.db import open_store
from tests.harness.ledger import Payment, fund, open_account
from tests.harness.postgres import IsolatedDatabase

CONNECTIONS = 40


@pytest.fixture
async def wide_store(database: IsolatedDatabase) -> AsyncIterator[EventStore]:
    """A store with a connection for every concurrent writer."""
    store = await open_store(database.urls, pool_size=CONNECTIONS)
    yield store
    await store.close()


@pytest.fixture
def wide_engine(wide_store: EventStore) -> AsyncEngine:
    return wide_store.engine


async def _prove(engine: AsyncEngine) -> None:
    for report in (await verify_chain(engine), await check_ledger(engine)):
        assert report.ok, report.lines()


async def test_concurrent_reservations_never_overdraw_an_account(
    wide_store: EventStore, wide_engine: AsyncEngine
) -> None:
    await open_account(wide_store, "payer", overdraft_limit_minor=250)
    await open_account(wide_store, "shop", kind="merchant")
    await fund(wide_store, "payer", 1_000)
    payments = [Payment(wide_store, "payer", "shop", 100) for _ in range(CONNECTIONS)]
    for payment in payments:
        await payment.run("initiated", "authorized")

    async def reserve(payment: Payment) -> bool:
        try:
            await wide_store.append(payment.reserved())
            return True
        except errors.InsufficientFunds:
            return False

    outcomes = await asyncio.gather(*(reserve(p) for p in payments))
    # 1 000 funded + 250 overdraft = exactly 12 holds of 100; never a 13th.
    assert sum(outcomes) == 12
    position = await wide_store.get_position("payer")
    assert position.debits_pending == 1_200
    assert position.available_minor == 50
    await _prove(wide_engine)


async def test_concurrent_appends_to_one_stream_have_exactly_one_winner_per_version(
    wide_store: EventStore,
) -> None:
    await open_account(wide_store, "a")
    await open_account(wide_store, "b")
    await fund(wide_store, "a", 1_000)
    payment = Payment(wide_store, "a", "b", 10)
    # Each round, every writer tries to append the stream's next event at the version it
    # last saw; the unique (stream, version) rule lets exactly one through.
    for version, step in enumerate(("initiated", "authorized", "reserved", "settled")):
        contenders = [
            NewEvent(payment.stream_id, getattr(payment, step)().event, event_id, "writer")
            for event_id in (payment.new(f"{step}-{i}", None).event_id for i in range(20))
        ]

        async def attempt(new: NewEvent, expected: int = version) -> AppendResult | None:
            try:
                return await wide_store.append(new, expected_version=expected)
            except errors.WrongExpectedVersion:
                return None

        results = await asyncio.gather(*(attempt(new) for new in contenders))
        winners = [r for r in results if r is not None and r.appended]
        assert len(winners) == 1, f"version {version + 1}: {len(winners)} winners"
        assert winners[0].event.stream_version == version + 1
    events = await wide_store.read_stream(payment.stream_id)
    assert [e.stream_version for e in events] == [1, 2, 3, 4]


async def test_concurrent_duplicates_of_one_event_append_it_once(
    wide_store: EventStore, wide_engine: AsyncEngine
) -> None:
    await open_account(wide_store, "a")
    await open_account(wide_store, "b")
    await fund(wide_store, "a", 1_000)
    payment = Payment(wide_store, "a", "b", 600)
    for step in ("initiated", "authorized", "reserved", "settled"):
        results = await asyncio.gather(
            *(wide_store.append(getattr(payment, step)()) for _ in range(CONNECTIONS // 2))
        )
        assert sum(r.appended for r in results) == 1
        assert len({r.event.global_seq for r in results}) == 1
    assert len(await wide_store.read_stream(payment.stream_id)) == 4
    assert (await wide_store.get_position("b")).credits_posted == 600
    await _prove(wide_engine)


async def test_crossing_payments_in_both_directions_never_deadlock(
    wide_store: EventStore, wide_engine: AsyncEngine
) -> None:
    names = ["n0", "n1", "n2", "n3"]
    for name in names:
        await open_account(wide_store, name)
        await fund(wide_store, name, 5_000)
    # Fees accounts whose ids sort between the customers', so a settlement with a fee
    # locks three positions, in an order that differs from the postings' own.
    fees_accounts = ["n0-fees", "n2-fees"]
    for name in fees_accounts:
        await open_account(wide_store, name, kind="fees")
    rng = random.Random(7)

    async def lifecycle() -> None:
        payer, payee = rng.sample(names, 2)
        payment = Payment(wide_store, payer, payee, rng.randint(1, 400))
        await payment.run("initiated", "authorized")
        try:
            await wide_store.append(payment.reserved())
        except errors.InsufficientFunds:
            await payment.run("voided", "failed")
            return
        if rng.random() < 0.8:
            fee_minor = rng.choice([0, 1]) if payment.amount_minor > 1 else 0
            await wide_store.append(
                payment.settled(fee_minor=fee_minor, fees_account=rng.choice(fees_accounts))
            )
        else:
            await payment.run("released", "voided", "failed")

    await asyncio.wait_for(asyncio.gather(*(lifecycle() for _ in range(200))), timeout=120)
    await _prove(wide_engine)
