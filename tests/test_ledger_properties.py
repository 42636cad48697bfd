"""Property-based: random sequences of operations never break an invariant of the design.

After every step: per-currency zero-sum, no account below minus its overdraft, every
stream a valid path through its state machine, positions equal to a fold over the
events, and an intact hash chain (invariants 1, 2, 3, 5 and 6).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger import errors
from ledger.fold import zero_sum_violations
from ledger.store import EventStore
from ledger.verify import check_ledger, verify_chain
from paysaga.db import open_store
from tests.harness.ledger import Payment, fund, open_account
from tests.harness.postgres import PostgresServer

ACCOUNTS = ("a0", "a1", "a2", "a3")
CURRENCIES = ("EUR", "JPY")
# Each path is a sequence of steps; some are refused on purpose (insufficient funds,
# out-of-order events), and a refusal must change nothing.
PATHS = {
    "settle": ("initiated", "authorized", "reserved", "settled"),
    "release": ("initiated", "authorized", "reserved", "released", "voided", "failed"),
    "void": ("initiated", "authorized", "voided", "cancelled"),
    "fail-early": ("initiated", "failed"),
    "out-of-order": ("initiated", "settled", "authorized", "released", "reserved", "settled"),
    "after-terminal": ("initiated", "failed", "authorized", "reserved"),
}

open_op = st.tuples(
    st.just("open"),
    st.sampled_from(ACCOUNTS),
    st.sampled_from(CURRENCIES),
    st.sampled_from([0, 0, 50, 10_000]),
)
fund_op = st.tuples(st.just("fund"), st.sampled_from(ACCOUNTS), st.integers(1, 5_000))
pay_op = st.tuples(
    st.just("pay"),
    st.sampled_from(ACCOUNTS),
    st.sampled_from(ACCOUNTS),
    st.integers(1, 3_000),
    st.sampled_from(sorted(PATHS)),
)
retry_op = st.tuples(st.just("retry"), st.integers(0, 10_000))
operations = st.lists(st.one_of(open_op, fund_op, pay_op, retry_op), min_size=1, max_size=25)


@dataclass
class Model:
    store: EventStore
    currency: dict[str, str] = field(default_factory=dict)
    history: list[tuple[Payment, str]] = field(default_factory=list)

    async def step(self, payment: Payment, name: str) -> None:
        try:
            await self.store.append(getattr(payment, name)())
            self.history.append((payment, name))
        except errors.LedgerError:
            pass  # refused: the invariants below prove that nothing changed

    async def run(self, op: tuple[object, ...]) -> None:
        kind = op[0]
        if kind == "open":
            _, account, currency, overdraft = op
            try:
                await open_account(
                    self.store,
                    str(account),
                    currency=str(currency),
                    overdraft_limit_minor=int(overdraft),  # type: ignore[call-overload]
                )
                self.currency.setdefault(str(account), str(currency))
            except (errors.AccountExists, errors.IdempotencyConflict):
                pass  # opened before (with other terms, under the same deterministic id)
        elif kind == "fund" and op[1] in self.currency:
            await fund(self.store, str(op[1]), int(op[2]), currency=self.currency[str(op[1])])  # type: ignore[call-overload]
        elif kind == "pay":
            _, payer, payee, amount, path = op
            if payer == payee:
                return
            currency = self.currency.get(str(payer), "EUR")
            payment = Payment(self.store, str(payer), str(payee), int(amount), currency)  # type: ignore[call-overload]
            for name in PATHS[str(path)]:
                await self.step(payment, name)
        elif kind == "retry" and self.history:
            payment, name = self.history[int(op[1]) % len(self.history)]  # type: ignore[call-overload]
            result = await self.store.append(getattr(payment, name)())
            assert not result.appended, "a retried event must never be appended twice"


async def assert_invariants(store: EventStore, engine: AsyncEngine) -> None:
    positions = []
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT account_id FROM accounts"))
        ids = [r.account_id for r in rows]
    for account_id in ids:
        positions.append(await store.get_position(account_id))
    assert zero_sum_violations(positions) == []
    for position in positions:
        assert position.available_minor is None or position.available_minor >= 0
    for report in (await verify_chain(engine), await check_ledger(engine)):
        assert report.ok, report.lines()


@pytest.mark.slow
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ops=operations)
async def test_random_operations_keep_every_invariant(pg_server: PostgresServer, ops) -> None:
    with pg_server.database() as db:
        store = await open_store(db.urls, pool_size=2)
        try:
            model = Model(store)
            for op in ops:
                await model.run(op)
                await assert_invariants(store, store.engine)
        finally:
            await store.close()
