"""Running payments for real: a worker on the test's queue, and helpers to read outcomes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from temporalio.client import Client, WorkflowHandle

from ledger.store import EventStore
from paysaga.payments import start_payment
from workflows.models import PaymentOutcome, PaymentPolicy, PaymentRequest, PaymentState
from workflows.payment import PaymentWorkflow

# Fast enough for tests on the real dev server, realistic in shape.
TEST_POLICY = PaymentPolicy(
    approval_threshold_minor=1_000_000,
    approval_deadline_s=3_600,
    hold_expiry_s=3_600,
    processor_timeout_s=10,
    processor_heartbeat_s=2,
    processor_attempts_max=2,
)
# The same, but a payment of 50.00 or more waits for an operator's approval.
APPROVAL_POLICY = TEST_POLICY.model_copy(update={"approval_threshold_minor": 5_000})


@dataclass
class Payments:
    """Start payments on one task queue and read what became of them."""

    client: Client
    store: EventStore
    task_queue: str

    async def start(
        self,
        payer: str,
        payee: str,
        amount_minor: int,
        *,
        currency: str = "EUR",
        metadata: dict[str, Any] | None = None,
        policy: PaymentPolicy = TEST_POLICY,
        payment_id: str | None = None,
    ) -> WorkflowHandle[PaymentWorkflow, PaymentOutcome]:
        request = PaymentRequest(
            payment_id=payment_id or f"pay-{uuid.uuid4().hex[:12]}",
            payer_account_id=payer,
            payee_account_id=payee,
            amount_minor=amount_minor,
            currency=currency,
            metadata=metadata or {},
            requested_by="test",
            policy=policy,
        )
        return await start_payment(self.client, request, task_queue=self.task_queue)

    async def run(self, *args: Any, **kwargs: Any) -> PaymentOutcome:
        handle = await self.start(*args, **kwargs)
        return await handle.result()

    async def event_types(self, payment_id: str) -> list[str]:
        return [e.event_type for e in await self.store.read_stream(f"payment-{payment_id}")]

    async def processor_calls(self, payment_id: str) -> list[tuple[str, str]]:
        async with self.store.engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT operation, outcome FROM processor_calls WHERE payment_id = :p "
                    "ORDER BY call_id"
                ),
                {"p": payment_id},
            )
            return [(row.operation, row.outcome) for row in rows]

    async def captures(self, payment_id: str) -> list[tuple[str, int, str, Any]]:
        """The processor's captures of a payment: (capture id, amount, currency, when)."""
        async with self.store.engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT capture_id, amount_minor, currency, captured_at "
                    "FROM processor_captures WHERE payment_id = :p"
                ),
                {"p": payment_id},
            )
            return [
                (row.capture_id, row.amount_minor, row.currency, row.captured_at) for row in rows
            ]

    async def authorization_status(self, payment_id: str) -> str | None:
        async with self.store.engine.connect() as conn:
            return (
                await conn.execute(
                    text("SELECT status FROM processor_authorizations WHERE payment_id = :p"),
                    {"p": payment_id},
                )
            ).scalar_one_or_none()


async def wait_for(
    check: Callable[[], Awaitable[bool]], *, timeout_s: float = 20.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.1)


async def wait_for_state(
    handle: WorkflowHandle[PaymentWorkflow, PaymentOutcome],
    predicate: Callable[[PaymentState], bool],
    *,
    timeout_s: float = 20.0,
) -> PaymentState:
    seen: list[PaymentState] = []

    async def check() -> bool:
        state = await handle.query(PaymentWorkflow.status)
        seen.append(state)
        return predicate(state)

    try:
        await wait_for(check, timeout_s=timeout_s, what="the payment's state")
    except AssertionError as error:
        last = seen[-1] if seen else None
        raise AssertionError(f"{error}; last seen: {last!r}") from None
    return seen[-1]
