"""Building blocks for ledger tests: accounts and payment steps, appended for real."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg

from ledger.db import to_libpq_url
from ledger.events import (
    AccountOpened,
    AuthorizationVoided,
    FundsReleased,
    FundsReserved,
    PaymentAuthorized,
    PaymentCancelled,
    PaymentFailed,
    PaymentInitiated,
    PaymentSettled,
    Posting,
    event_id_for,
    payment_stream,
)
from ledger.sealer import seal_all
from ledger.store import AppendResult, EventStore, NewEvent
from ledger.verify import latest_digest
from tests.harness.postgres import IsolatedDatabase

ACTOR = "test"


async def open_account(
    store: EventStore,
    account_id: str,
    *,
    currency: str = "EUR",
    kind: str = "customer",
    overdraft_limit_minor: int | None = 0,
) -> AppendResult:
    return await store.open_account(
        AccountOpened(
            account_id=account_id,
            currency=currency,
            kind=kind,
            overdraft_limit_minor=overdraft_limit_minor,
        ),
        actor=ACTOR,
        event_id=event_id_for(f"account-{account_id}", "open"),
    )


@dataclass
class Payment:
    """One payment's steps, each with the deterministic event id a workflow would use."""

    store: EventStore
    payer: str
    payee: str
    amount_minor: int
    currency: str = "EUR"
    payment_id: str = ""

    def __post_init__(self) -> None:
        self.payment_id = self.payment_id or f"p-{uuid.uuid4().hex[:12]}"
        # Fixed once, as a workflow fixes it: a retried step must carry the same payload.
        self.hold_expires_at = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)

    @property
    def stream_id(self) -> str:
        return payment_stream(self.payment_id)

    def new(self, step: str, event: object) -> NewEvent:
        return NewEvent(
            stream_id=self.stream_id,
            event=event,  # type: ignore[arg-type]
            event_id=event_id_for(f"payment-{self.payment_id}", step),
            actor=ACTOR,
            correlation_id=f"payment-{self.payment_id}",
        )

    def initiated(self) -> NewEvent:
        return self.new(
            "initiate",
            PaymentInitiated(
                payment_id=self.payment_id,
                payer_account_id=self.payer,
                payee_account_id=self.payee,
                amount_minor=self.amount_minor,
                currency=self.currency,
            ),
        )

    def authorized(self) -> NewEvent:
        return self.new(
            "authorize",
            PaymentAuthorized(
                payment_id=self.payment_id,
                authorization_id=f"auth-{self.payment_id}",
                processor="sim",
            ),
        )

    def reserved(self, *, amount_minor: int | None = None) -> NewEvent:
        return self.new(
            "reserve",
            FundsReserved(
                payment_id=self.payment_id,
                payer_account_id=self.payer,
                payee_account_id=self.payee,
                amount_minor=amount_minor or self.amount_minor,
                currency=self.currency,
                expires_at=self.hold_expires_at,
            ),
        )

    def settled(self, *, fee_minor: int = 0, fees_account: str = "fees") -> NewEvent:
        postings = [
            Posting(account_id=self.payer, side="debit", amount_minor=self.amount_minor),
            Posting(
                account_id=self.payee, side="credit", amount_minor=self.amount_minor - fee_minor
            ),
        ]
        if fee_minor:
            postings.append(Posting(account_id=fees_account, side="credit", amount_minor=fee_minor))
        return self.new(
            "settle",
            PaymentSettled(
                payment_id=self.payment_id,
                currency=self.currency,
                postings=postings,
                fee_minor=fee_minor,
            ),
        )

    def released(self) -> NewEvent:
        return self.new(
            "release",
            FundsReleased(
                payment_id=self.payment_id, amount_minor=self.amount_minor, reason="test"
            ),
        )

    def voided(self) -> NewEvent:
        return self.new(
            "void",
            AuthorizationVoided(
                payment_id=self.payment_id,
                authorization_id=f"auth-{self.payment_id}",
                reason="test",
            ),
        )

    def failed(self, step: str = "reserve") -> NewEvent:
        return self.new("fail", PaymentFailed(payment_id=self.payment_id, step=step, reason="test"))

    def cancelled(self, step: str = "authorize") -> NewEvent:
        return self.new(
            "cancel",
            PaymentCancelled(
                payment_id=self.payment_id, step=step, reason="test", cancelled_by=ACTOR
            ),
        )

    async def run(self, *steps: str) -> list[AppendResult]:
        """Append the named steps in order (e.g. "initiated", "authorized", ...)."""
        return [await self.store.append(getattr(self, step)()) for step in steps]

    async def settle_fully(self) -> list[AppendResult]:
        return await self.run("initiated", "authorized", "reserved", "settled")


async def fund(
    store: EventStore, account: str, amount_minor: int, *, currency: str = "EUR"
) -> None:
    """Move money in from an external funding account (opened on first use)."""
    source = f"world-{currency.lower()}"
    if await store.get_account(source) is None:
        await open_account(
            store, source, currency=currency, kind="external", overdraft_limit_minor=None
        )
    await Payment(store, source, account, amount_minor, currency).settle_fully()


async def seal_until_everything_is_sealed(store: EventStore) -> None:
    head = (await store.safe_horizon()).head_seq
    for _ in range(50):
        await seal_all(store)
        digest = await latest_digest(store.engine)
        if digest is not None and digest.last_seq >= head:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the log up to {head} was not sealed")


def as_owner(database: IsolatedDatabase, *statements: tuple[str, tuple[object, ...]]) -> None:
    """As the owner, with the immutability triggers off: an attacker with the keys."""
    with psycopg.connect(to_libpq_url(database.urls.owner_url), autocommit=True) as conn:
        conn.execute("ALTER TABLE events DISABLE TRIGGER USER")
        conn.execute("ALTER TABLE ledger_blocks DISABLE TRIGGER USER")
        try:
            for statement, params in statements:
                conn.execute(statement, params)
        finally:
            conn.execute("ALTER TABLE events ENABLE TRIGGER USER")
            conn.execute("ALTER TABLE ledger_blocks ENABLE TRIGGER USER")
