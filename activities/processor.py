"""The payment processor: a pluggable `Authorizer`, and the simulator that is the default.

The processor is the one external system in a payment. Its calls are **regular**
activities (they can be slow, so they heartbeat, and a worker that dies mid-call is
noticed by the heartbeat timeout and the call retried elsewhere). They are
idempotent by payment id, as real processors are by idempotency key: authorizing the
same payment twice returns the first authorization, and voiding twice voids once.

Two rules keep the processor in step with the ledger, whoever calls and however often:

- **A void asks the ledger first.** It is refused unless the ledger has recorded that
  the payment can no longer settle (the hold released and the authorization voided in
  the ledger, or nothing reserved yet); a settled payment's authorization is never
  voided.
- **A void fences.** Voiding a payment that has no authorization yet records that
  fact, and any later authorization for it is declined: a stale call that reaches
  the processor after the saga gave up cannot leave an authorization behind.

The simulator keeps its state in PostgreSQL (`processor_authorizations`, and every
call in `processor_calls`), so that tests can prove, for instance, that each
authorization was voided exactly once. A payment's `metadata.simulate` steers it:

| value     | behaviour                                                           |
|-----------|---------------------------------------------------------------------|
| `decline` | the processor declines                                              |
| `timeout` | the processor never answers within the activity timeout            |
| `flaky`   | fails twice, then succeeds                                          |
| `slow`    | answers after `metadata.simulate_delay_s` seconds (10 by default)   |
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.ledger import VOIDABLE_STATES, LedgerActivities
from ledger.events import payment_stream
from workflows.models import (
    AuthorizationRequest,
    AuthorizationResult,
    RecordEvent,
    VoidRequest,
    VoidResult,
)

SLOW_DELAY_S_DEFAULT = 10.0
SLOW_DELAY_S_MAX = 3_600.0
HEARTBEAT_EVERY_S = 0.5
FLAKY_FAILURES = 2


class ProcessorUnavailable(Exception):
    """Transient: the processor could not be reached. Retried."""


class Authorizer(Protocol):
    """What paysaga needs from a payment processor."""

    name: str

    async def authorize(self, request: AuthorizationRequest, attempt: int) -> AuthorizationResult:
        """Authorize the payment (idempotent by payment id), or decline it."""
        ...

    async def void(self, request: VoidRequest, attempt: int) -> VoidResult:
        """Void the payment's authorization, or, if there is none, refuse any later one
        (idempotent)."""
        ...


def _heartbeat(details: str) -> None:
    if activity.in_activity():
        activity.heartbeat(details)


class SimulatedProcessor:
    """The built-in processor simulator, steered by `metadata.simulate`."""

    name = "simulator"

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def _log(self, payment_id: str, operation: str, outcome: str, attempt: int) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO processor_calls (payment_id, operation, outcome, attempt) "
                    "VALUES (:p, :op, :outcome, :attempt)"
                ),
                {"p": payment_id, "op": operation, "outcome": outcome, "attempt": attempt},
            )

    async def authorize(self, request: AuthorizationRequest, attempt: int) -> AuthorizationResult:
        behaviour = request.metadata.get("simulate")
        if behaviour == "decline":
            await self._log(request.payment_id, "authorize", "declined", attempt)
            return AuthorizationResult(
                approved=False, decline_reason="do not honour (simulated)", processor=self.name
            )
        if behaviour == "timeout":
            await self._log(request.payment_id, "authorize", "unanswered", attempt)
            # Never answer, and never heartbeat: the activity's timeout decides.
            await asyncio.sleep(SLOW_DELAY_S_MAX)
        if behaviour == "flaky" and attempt <= FLAKY_FAILURES:
            await self._log(request.payment_id, "authorize", "failed", attempt)
            raise ProcessorUnavailable(f"processor unavailable (simulated, attempt {attempt})")
        if behaviour == "slow":
            delay_s = _delay_s(request.metadata.get("simulate_delay_s"))
            waited_s = 0.0
            while waited_s < delay_s:
                _heartbeat(f"waiting for the processor: {waited_s:.1f}/{delay_s:.1f} s")
                step_s = min(HEARTBEAT_EVERY_S, delay_s - waited_s)
                await asyncio.sleep(step_s)
                waited_s += step_s
        return await self._authorize(request, attempt)

    async def _authorize(self, request: AuthorizationRequest, attempt: int) -> AuthorizationResult:
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    _AUTHORIZE,
                    {
                        "p": request.payment_id,
                        "a": f"sim-auth-{uuid.uuid4().hex[:16]}",
                        "amount": request.amount_minor,
                        "currency": request.currency,
                        "attempt": attempt,
                    },
                )
            ).one_or_none()
        if row is None:
            # Another attempt for the same payment is authorizing at this very moment.
            raise ProcessorUnavailable("a concurrent authorization is in progress; retrying")
        if row.status in ("voided", "fenced"):
            return AuthorizationResult(
                approved=False,
                decline_reason="the payment was voided; it cannot be authorized again",
                processor=self.name,
            )
        return AuthorizationResult(
            approved=True, authorization_id=row.authorization_id, processor=self.name
        )

    async def void(self, request: VoidRequest, attempt: int) -> VoidResult:
        async with self.engine.begin() as conn:
            row = (await conn.execute(_VOID, {"p": request.payment_id, "attempt": attempt})).one()
        return VoidResult(voided=row.voided, authorization_id=row.authorization_id)


# One round trip each: the operation and its log line, in one statement.
_AUTHORIZE = text(
    """
    WITH created AS (
        INSERT INTO processor_authorizations
               (payment_id, authorization_id, amount_minor, currency, status)
        VALUES (:p, :a, :amount, :currency, 'authorized')
        ON CONFLICT (payment_id) DO NOTHING
        RETURNING authorization_id, status
    ), existing AS (
        SELECT authorization_id, status FROM processor_authorizations
         WHERE payment_id = :p AND NOT EXISTS (SELECT 1 FROM created)
    ), logged AS (
        INSERT INTO processor_calls (payment_id, operation, outcome, attempt)
        SELECT :p, 'authorize',
               CASE WHEN EXISTS (SELECT 1 FROM created) THEN 'authorized' ELSE 'replayed' END,
               :attempt
    )
    SELECT authorization_id, status FROM created
    UNION ALL
    SELECT authorization_id, status FROM existing
    """
)
# A void with nothing to void leaves a fence: a row that declines any later
# authorization of the payment. One statement, so a racing authorization either comes
# first (and is voided) or finds the fence.
_VOID = text(
    """
    WITH voided AS (
        UPDATE processor_authorizations
           SET status = 'voided', voided_at = clock_timestamp()
         WHERE payment_id = :p AND status = 'authorized'
        RETURNING authorization_id
    ), fenced AS (
        INSERT INTO processor_authorizations
               (payment_id, authorization_id, amount_minor, currency, status, voided_at)
        VALUES (:p, NULL, NULL, NULL, 'fenced', clock_timestamp())
        ON CONFLICT (payment_id) DO NOTHING
        RETURNING payment_id
    ), existing AS (
        SELECT authorization_id, status FROM processor_authorizations WHERE payment_id = :p
    ), logged AS (
        INSERT INTO processor_calls (payment_id, operation, outcome, attempt)
        SELECT :p, 'void',
               CASE WHEN EXISTS (SELECT 1 FROM voided) THEN 'voided'
                    WHEN EXISTS (SELECT 1 FROM fenced) THEN 'fenced'
                    WHEN (SELECT status FROM existing) = 'fenced' THEN 'already_fenced'
                    ELSE 'already_voided' END,
               :attempt
    )
    SELECT EXISTS (SELECT 1 FROM voided) AS voided,
           coalesce((SELECT authorization_id FROM voided),
                    (SELECT authorization_id FROM existing)) AS authorization_id
    """
)


def _delay_s(raw: object) -> float:
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw <= SLOW_DELAY_S_MAX:
        return float(raw)
    if isinstance(raw, str):
        try:
            value = float(raw)
        except ValueError:
            return SLOW_DELAY_S_DEFAULT
        if 0 <= value <= SLOW_DELAY_S_MAX:
            return value
    return SLOW_DELAY_S_DEFAULT


class ProcessorActivities:
    """Processor calls as activities, over any `Authorizer`."""

    def __init__(self, authorizer: Authorizer, ledger: LedgerActivities) -> None:
        self.authorizer = authorizer
        self.ledger = ledger

    @activity.defn(name="processor.authorize")
    async def authorize(self, request: AuthorizationRequest) -> AuthorizationResult:
        """Ask the processor; record an authorization in the ledger as soon as it is given.

        Recording it here, rather than in a step of its own, saves the saga a round trip
        per payment. It stays safe: a retry finds the processor's authorization (the
        payment id is its idempotency key) and the ledger's event (its id derives from
        the workflow id and the step) already there.
        """
        result = await self.authorizer.authorize(request, activity.info().attempt)
        if result.approved:
            recorded = await self.ledger.record(
                RecordEvent(
                    payment_id=request.payment_id,
                    step="authorize",
                    event_type="PaymentAuthorized",
                    payload={
                        "payment_id": request.payment_id,
                        "authorization_id": result.authorization_id,
                        "processor": result.processor,
                    },
                    actor=request.actor,
                    causation_id=request.causation_id,
                )
            )
            return result.model_copy(update={"recorded": recorded})
        return result

    @activity.defn(name="processor.void")
    async def void(self, request: VoidRequest) -> VoidResult:
        """Void at the processor, once the ledger says the payment can no longer settle."""
        head = await self.ledger.store.stream_head(payment_stream(request.payment_id))
        state = head.state if head is not None else "new"
        if state not in VOIDABLE_STATES:
            # Settled: its authorization is the money's; anything else could still
            # settle until the ledger records the release and the void.
            raise ApplicationError(
                f"the ledger has payment {request.payment_id} {state}: it is not voided "
                "at the processor until the ledger says it can no longer settle",
                type="void_refused",
                non_retryable=True,
            )
        return await self.authorizer.void(request, activity.info().attempt)

    def all(self) -> list[object]:
        return [self.authorize, self.void]
